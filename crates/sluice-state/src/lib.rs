//! Checkpoints and state for Sluice.
//!
//! The entry point of this crate is [`Checkpoint`]: a directory holding a
//! query's `metadata`, its batch log ([`log`]: a `plan` record says what
//! batch N reads, written before it runs, and a `commit` record that batch N
//! is done), per-source metadata and progress records. [`recovery::decide`] is the pure decision of
//! where a restarted query resumes, kept apart from the disk so it can be
//! tested on its own.
//!
//! ```
//! use sluice_state::recovery::{decide, Resume};
//! // plans 0..=4 logged, commits 0..=3 logged: batch 4 is re-run.
//! assert_eq!(decide(Some(4), Some(3)).unwrap(), Resume::Rerun { batch_id: 4 });
//! ```
//!
//! [`store::StateStore`] is the versioned, partitioned state store the
//! stateful aggregate keeps its state in (deltas and snapshots as checksummed
//! Arrow IPC files, under `state/aggregate/` of the query's checkpoint).

pub mod checkpoint;
pub mod log;
pub mod recovery;
pub mod store;

pub use checkpoint::{
    Checkpoint, CheckpointOptions, CommitEntry, FORMAT_VERSION, Metadata, OffsetEntry, SourceRange,
};
