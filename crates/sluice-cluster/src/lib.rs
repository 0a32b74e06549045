//! Sluice on a Ballista cluster.
//!
//! [Ballista](https://datafusion.apache.org/ballista/) is DataFusion's
//! distributed engine: a scheduler cuts a physical plan into stages at its
//! shuffles and executors run their tasks. This crate runs Sluice's
//! micro-batches on it:
//!
//! - [`start_scheduler`] and [`run_executor`] start Ballista's scheduler
//!   and executor with Sluice's session (its functions and the codec for
//!   its plan nodes, [`session`]); `sluice cluster scheduler` and `sluice
//!   cluster executor` are these two.
//! - [`ClusterRunner`] is a [`sluice_exec::PlanRunner`]: set as a query's
//!   runner, it submits each batch's plan to the scheduler as one job. The
//!   driver keeps the offset and commit logs, reads the sources, computes
//!   the watermark and writes the sinks, exactly as in one process; only
//!   the plan between the sources and the sink runs on the cluster.
//!
//! - A grouped aggregate, a join of two streams and a deduplication run
//!   as one task per partition of their state, in the checkpoint's
//!   `state/<op>/p<k>/`, which every executor reads and writes at the same
//!   path (a shared directory) or mounts (a bucket): see [`stateful`].
//!
//!   Chains of them run as one job, a stage per operator; each task writes
//!   a report beside its partition (its late rows, its state figures; see
//!   [`report`]) that the driver reads before the batch's commit.
//!
//! - Every stateful operator runs so (top-N and session windows too), and
//!   the executors read file and Kafka sources ([`source_read`]); other
//!   sources are read by the driver and shipped in the plan.

pub mod codec;
pub mod failure;
pub mod hash_check;
pub mod logging;
pub mod report;
pub mod rollback;
mod runner;
mod server;
pub mod session;
mod slice;
pub mod source_read;
pub mod stateful;

pub use runner::{ClusterRunner, DEFAULT_JOB_TIMEOUT, DEFAULT_STATE_PARTITIONS};
pub use server::{
    EXECUTOR_TIMEOUT, ExecutorOptions, HEARTBEAT, Scheduler, Scheduling, run_executor, start_local,
    start_scheduler, start_scheduler_with,
};
