//! Where a micro-batch's physical plan runs.
//!
//! By default the executor runs each batch's plan in this process with
//! DataFusion's `collect`. A [`PlanRunner`] in
//! [`QueryConfig::runner`](crate::QueryConfig::runner) runs it elsewhere instead: `sluice-cluster`'s runner
//! submits it to a Ballista cluster as one job per batch. Everything around
//! the plan (offsets, reading the sources, watermarks, sinks, the commit) stays
//! with the executor in this process, the driver.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use futures::future::BoxFuture;
use sluice_common::Result;
use sluice_common::durable::Durability;

use crate::operators::{BatchContext, OperatorReport};

/// What a runner knows of the batch whose plan it runs.
#[derive(Debug, Clone)]
pub struct BatchJob {
    /// The batch (its id, trigger time, watermarks, input rows).
    pub batch: BatchContext,
    /// The query's checkpoint directory.
    pub checkpoint: PathBuf,
    /// Whether checkpoint files are fsynced.
    pub durability: Durability,
    /// Per stateful operator id, how far (ms) its input watermark is below
    /// the query's (a join below it delays it).
    pub delays: BTreeMap<String, i64>,
}

/// What a runner's run of a batch's plan gives back.
#[derive(Debug, Default)]
pub struct RunOutput {
    /// The plan's rows, for the sink.
    pub rows: Vec<RecordBatch>,
    /// For a runner that keeps state ([`PlanRunner::keeps_state`]): what
    /// each stateful operator did in the batch (its late rows among it),
    /// which the executor reports and routes as it does an operator's run
    /// in this process.
    pub operators: Vec<OperatorRun>,
}

/// A source's range of one batch, to be read where the plan runs
/// ([`PlanRunner::reads_sources`]).
#[derive(Debug, Clone)]
pub struct RemoteRange {
    /// The source's name.
    pub name: String,
    /// The range, as other processes read it.
    pub read: sluice_common::connector::RemoteRead,
    /// The source's rows' schema.
    pub schema: datafusion::arrow::datatypes::SchemaRef,
    /// Its event-time column, if it has a watermark.
    pub watermark: Option<String>,
}

/// What reading a source's range found (see [`PlanRunner::count_reads`]).
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Rows read.
    pub rows: u64,
    /// The largest event time, if any row had one.
    pub max_event_ms: Option<i64>,
    /// Records dropped (`on_error = 'drop'`).
    pub dropped: u64,
    /// Records for the dead letters, in the range's order.
    pub dead_letters: Vec<sluice_common::connector::DeadLetter>,
    /// When the oldest record became available.
    pub available_ms: Option<i64>,
}

/// What one stateful operator did in a batch run by a [`PlanRunner`].
#[derive(Debug, Default)]
pub struct OperatorRun {
    /// Its operator id.
    pub id: String,
    /// Its one-line description.
    pub description: String,
    /// Its rows on time and late, and the time of its steps.
    pub report: OperatorReport,
    /// What the commit of its state did (summed over its partitions).
    pub stats: sluice_state::store::CommitStats,
    /// The memory its state takes where it ran (summed).
    pub memory_bytes: u64,
}

/// Runs the physical plan of one micro-batch and returns its rows.
pub trait PlanRunner: std::fmt::Debug + Send + Sync {
    /// Where plans run, for errors and progress (`ballista at
    /// http://127.0.0.1:50050`).
    fn describe(&self) -> String;

    /// Refuses, when the query starts, a plan this runner cannot run,
    /// naming what in it stands in the way.
    fn check(&self, plan: &Arc<dyn ExecutionPlan>) -> Result<()>;

    /// Whether the runner keeps the stateful operators' state itself (in
    /// the checkpoint, as the plan runs): the executor then opens,
    /// prepares and commits no state of its own, and the batch's commit
    /// record is written once `run` has returned, so the state of every
    /// operator must be written by then.
    fn keeps_state(&self) -> bool {
        false
    }

    /// Whether the ranges of the sources that can describe them
    /// ([`SourceReader::remote_read`](sluice_common::connector::SourceReader::remote_read))
    /// are read where the plan runs rather than by the driver: the
    /// executor then asks [`Self::count_reads`] for what it needs before
    /// the plan, and puts [`Self::read_node`] in place of those sources'
    /// scans.
    fn reads_sources(&self) -> bool {
        false
    }

    /// Reads `ranges` where plans run and gives, per source name, what
    /// they hold: their rows' count, largest event time, bad records.
    fn count_reads<'a>(
        &'a self,
        _ranges: &'a [RemoteRange],
        _ctx: Arc<TaskContext>,
    ) -> BoxFuture<'a, Result<std::collections::BTreeMap<String, SourceStats>>> {
        Box::pin(async {
            Err(sluice_common::Error::internal(
                "a runner that does not read sources was asked to",
            ))
        })
    }

    /// The plan node that reads `range` where the plan runs, with the
    /// source's schema.
    fn read_node(&self, _range: &RemoteRange) -> Result<Arc<dyn ExecutionPlan>> {
        Err(sluice_common::Error::internal(
            "a runner that does not read sources was asked to",
        ))
    }

    /// Runs `plan` as `job`'s batch. When it is called the plan's stream
    /// scans hold the batch's rows, and `ctx` is the task context the plan
    /// would run with in this process.
    fn run<'a>(
        &'a self,
        plan: Arc<dyn ExecutionPlan>,
        ctx: Arc<TaskContext>,
        job: &'a BatchJob,
    ) -> BoxFuture<'a, Result<RunOutput>>;
}
