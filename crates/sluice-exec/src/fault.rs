//! Crash injection at each step of the commit protocol, for tests.
//!
//! `SLUICE_CRASH_AT=<point>:<batch>` (points: `after-offsets`, `after-state`,
//! `after-sink`, `after-commit`) makes the process exit at once — no destructors, no
//! flushing — when batch `<batch>` reaches that point, as a `kill -9` would.
//! Library users can instead inject an error ([`Fault::error_at`]), which
//! leaves the checkpoint exactly as the crash would.

use std::fmt;
use std::str::FromStr;

use sluice_common::{BatchId, Error, Result};

/// A step of the commit protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Batch N's plan logged, nothing read yet.
    AfterOffsets,
    /// State version N committed, nothing written to the sink.
    AfterState,
    /// The sink holds batch N's rows, its commit not logged.
    AfterSink,
    /// Batch N's commit logged.
    AfterCommit,
}

impl FromStr for FaultPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "after-offsets" => Ok(FaultPoint::AfterOffsets),
            "after-state" => Ok(FaultPoint::AfterState),
            "after-sink" | "before-commit" => Ok(FaultPoint::AfterSink),
            "after-commit" => Ok(FaultPoint::AfterCommit),
            other => Err(Error::plan(format!(
                "fault point '{other}' is not one of after-offsets, after-state, after-sink, after-commit"
            ))),
        }
    }
}

impl fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultPoint::AfterOffsets => "after-offsets",
            FaultPoint::AfterState => "after-state",
            FaultPoint::AfterSink => "after-sink",
            FaultPoint::AfterCommit => "after-commit",
        })
    }
}

/// A crash to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Where.
    pub point: FaultPoint,
    /// In which batch.
    pub batch_id: BatchId,
    /// Exit the process (true) or return an error (false).
    pub exit_process: bool,
}

/// The exit code of an injected crash.
pub use sluice_common::durable::CRASH_EXIT_CODE;

impl Fault {
    /// An injected error at `point` of batch `batch_id`.
    pub fn error_at(point: FaultPoint, batch_id: BatchId) -> Self {
        Fault {
            point,
            batch_id,
            exit_process: false,
        }
    }

    /// The crash named by `SLUICE_CRASH_AT`, if set and valid.
    pub fn from_env() -> Option<Self> {
        let v = std::env::var("SLUICE_CRASH_AT").ok()?;
        let (point, batch) = v.split_once(':')?;
        Some(Fault {
            point: point.parse().ok()?,
            batch_id: batch.trim().parse().ok()?,
            exit_process: true,
        })
    }

    /// Fires the fault: exits the process, or returns the injected error.
    pub fn fire(&self) -> Result<()> {
        if self.exit_process {
            eprintln!(
                "sluice: injected crash {} of batch {}",
                self.point, self.batch_id
            );
            std::process::exit(CRASH_EXIT_CODE);
        }
        Err(Error::internal(format!(
            "injected fault {} of batch {}",
            self.point, self.batch_id
        )))
    }
}
