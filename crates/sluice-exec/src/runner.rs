//! Where a micro-batch's physical plan runs.
//!
//! By default the executor runs each batch's plan in this process with
//! DataFusion's `collect`. A [`PlanRunner`] in
//! [`QueryConfig::runner`](crate::QueryConfig::runner) runs it elsewhere instead: `sluice-cluster`'s runner
//! submits it to a Ballista cluster as one job per batch. Everything around
//! the plan (offsets, reading the sources, watermarks, sinks, the commit) stays
//! with the executor in this process, the driver.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use futures::future::BoxFuture;
use sluice_common::Result;

use crate::operators::BatchContext;

/// Runs the physical plan of one micro-batch and returns its rows.
pub trait PlanRunner: std::fmt::Debug + Send + Sync {
    /// Where plans run, for errors and progress (`ballista at
    /// http://127.0.0.1:50050`).
    fn describe(&self) -> String;

    /// Refuses, when the query starts, a plan this runner cannot run,
    /// naming what in it stands in the way.
    fn check(&self, plan: &Arc<dyn ExecutionPlan>) -> Result<()>;

    /// Runs `plan` as batch `batch`. When it is called the plan's stream
    /// scans hold the batch's rows, and `ctx` is the task context the plan
    /// would run with in this process.
    fn run(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        ctx: Arc<TaskContext>,
        batch: BatchContext,
    ) -> BoxFuture<'_, Result<Vec<RecordBatch>>>;
}
