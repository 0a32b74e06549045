//! Micro-batch execution for Sluice.
//!
//! The entry point of this crate is [`MicroBatchExecution::start`]: it plans
//! a streaming query once, opens (or recovers) its checkpoint, and then
//! [`MicroBatchExecution::run_batch`] runs one micro-batch by the
//! offset → read → execute → sink → commit protocol. [`StreamingQuery`] runs
//! batches per a [`Trigger`] in the background and is the handle users hold.
//!
//! ```
//! use sluice_exec::Trigger;
//! assert_eq!("available-now".parse::<Trigger>().unwrap(), Trigger::AvailableNow);
//! ```

pub mod execution;
pub mod fault;
pub mod operators;
pub mod query;
pub mod runner;
pub mod trigger;

pub use execution::{
    MicroBatchExecution, ProgressListener, ProgressLog, QueryConfig, dead_letter_schema,
};
pub use fault::{CRASH_EXIT_CODE, Fault, FaultPoint};
pub use operators::StateFinalizer;
pub use query::{QueryInfo, QueryStatus, StreamingQuery};
pub use runner::{BatchJob, OperatorRun, PlanRunner, RemoteRange, RunOutput, SourceStats};
pub use trigger::Trigger;
