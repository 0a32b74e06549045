//! Shared foundations of Sluice: the error type, `WITH (...)` options, clocks,
//! progress records, and the durable, checksummed file writes that every
//! checkpoint file uses.
//!
//! The entry points of this crate are [`Error`] / [`Result`], [`Options`],
//! [`Clock`] (with [`ManualClock`] for tests) and [`durable`].
//!
//! ```
//! use sluice_common::{Options, Error};
//! let opts = Options::from_pairs("source 'clicks'", [("format", "json"), ("max_files_per_trigger", "2")]);
//! assert_eq!(opts.get_usize("max_files_per_trigger").unwrap(), Some(2));
//! assert!(matches!(opts.get_usize("format"), Err(Error::Plan(_))));
//! ```

pub mod clock;
pub mod connector;
pub mod durable;
pub mod error;
pub mod mode;
pub mod options;
pub mod progress;
pub mod remote;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result, ResultExt};
pub use mode::OutputMode;
pub use options::Options;
pub use progress::{Progress, SourceProgress, StateProgress};

/// The id of a micro-batch: 0, 1, 2, ... within one query's checkpoint.
pub type BatchId = u64;

/// Re-exported so that every crate names one DataFusion (and through it one
/// arrow and one parquet).
pub use datafusion;

/// The cores this process may use (at least 1), found once: the standard
/// library's answer reads the cgroup files on every call, and the engine
/// asks on every batch.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
