//! Stateful operators on a cluster: each one's state split into P
//! partitions of the checkpoint, one task per partition.
//!
//! On a cluster the driver replaces a grouped aggregate
//! ([`StreamingAggregateExec`]), a join of two streams ([`StreamJoinExec`])
//! or a deduplication ([`DedupExec`]) by a [`PartitionedExec`] over a hash
//! repartition of each of its inputs on its keys into P partitions (the
//! group keys, each side's equality keys, the distinct columns; P is
//! recorded in the operator's state directory, `state/<op>/partitions`,
//! when the first batch runs). Rows that meet in the operator (a group, a
//! pair that can match, a duplicate) have equal keys, so they meet in one
//! partition. The task for partition k, on whichever executor runs it:
//!
//! 1. takes the state of `state/<op>/p<k>/` as of batch N−1: the store this
//!    executor kept from its last task on that partition (with a join's
//!    index over it), if it is still that version and its delta file is
//!    the one on disk, or else loads it from the shared checkpoint;
//! 2. runs the operator over its partition's rows of batch N;
//! 3. commits version N of the partition (a delta, and a snapshot every
//!    tenth version), each file written whole to a temporary file and
//!    renamed into place;
//! 4. writes its report (its late rows among it; see [`crate::report`]) and
//!    returns the rows to emit.
//!
//! The job ends when every partition's task has; only then does the driver
//! write batch N's commit record. A retried or duplicated task writes the
//! same partition's files for the same version from the same state and
//! rows: any attempt's file is a complete, correct version N, and a later
//! load takes whichever was renamed last. A task whose batch is re-run after
//! a crash (version N written, no commit record) loads N−1 again, since its
//! kept store is at N.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use datafusion::arrow::array::RecordBatch;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use sluice_common::durable::Durability;
use sluice_common::{BatchId, Error, Result};
use sluice_exec::operators::changelog::SEQ;
use sluice_exec::operators::{
    BatchContext, DedupExec, JoinIndex, OperatorReport, StatefulExec, StreamJoinExec,
    StreamingAggregateExec, TopNExec,
};
use sluice_state::store::{StateStore, StateStoreOptions};

/// Where a partitioned operator's state is and which batch it runs.
#[derive(Debug, Clone)]
pub struct StateJob {
    /// The query's checkpoint: a directory at the same path on every
    /// executor (a shared directory), or a bucket URL that every executor
    /// mounts (`sluice_common::remote`).
    pub checkpoint: PathBuf,
    /// Whether state files are fsynced.
    pub durability: Durability,
    /// The batch, with the watermarks as this operator sees them.
    pub batch: BatchContext,
}

/// A stateful operator that runs on a cluster, one task per partition of
/// its state.
#[derive(Debug, Clone)]
pub enum PartitionedOp {
    /// A grouped aggregate (session windows partitioned by their other
    /// keys).
    Aggregate(StreamingAggregateExec),
    /// A join of two streams.
    Join(StreamJoinExec),
    /// A deduplication.
    Dedup(DedupExec),
    /// A `ROW_NUMBER()` top-N (partitioned by its `PARTITION BY` keys).
    TopN(TopNExec),
}

impl PartitionedOp {
    /// `plan` as an operator that runs on a cluster, if it is one.
    pub fn of(plan: &dyn ExecutionPlan) -> Option<Self> {
        let any: &dyn Any = plan;
        if let Some(a) = any.downcast_ref::<StreamingAggregateExec>() {
            return Some(PartitionedOp::Aggregate(a.clone()));
        }
        if let Some(j) = any.downcast_ref::<StreamJoinExec>() {
            return Some(PartitionedOp::Join(j.clone()));
        }
        if let Some(t) = any.downcast_ref::<TopNExec>() {
            return Some(PartitionedOp::TopN(t.clone()));
        }
        any.downcast_ref::<DedupExec>()
            .map(|d| PartitionedOp::Dedup(d.clone()))
    }

    /// The node, as a stateful node.
    pub fn node(&self) -> &dyn StatefulExec {
        match self {
            PartitionedOp::Aggregate(a) => a,
            PartitionedOp::Join(j) => j,
            PartitionedOp::Dedup(d) => d,
            PartitionedOp::TopN(t) => t,
        }
    }

    /// The node, as a plan.
    pub fn plan(&self) -> Arc<dyn ExecutionPlan> {
        match self {
            PartitionedOp::Aggregate(a) => Arc::new(a.clone()),
            PartitionedOp::Join(j) => Arc::new(j.clone()),
            PartitionedOp::Dedup(d) => Arc::new(d.clone()),
            PartitionedOp::TopN(t) => Arc::new(t.clone()),
        }
    }

    /// Its inputs (a join's left, then its right).
    pub fn inputs(&self) -> Vec<Arc<dyn ExecutionPlan>> {
        self.node().children().into_iter().cloned().collect()
    }

    /// Per input, the expressions its rows are partitioned by. Empty for
    /// an aggregate without keys: its state is one partition.
    pub fn key_exprs(&self) -> Vec<Vec<Arc<dyn PhysicalExpr>>> {
        match self {
            PartitionedOp::Aggregate(a) => vec![a.partition_exprs()],
            PartitionedOp::Join(j) => j.key_exprs().to_vec(),
            PartitionedOp::Dedup(d) => vec![d.key_exprs()],
            PartitionedOp::TopN(t) => vec![t.key_exprs()],
        }
    }

    /// How many partitions its state starts with: one when it has no
    /// keys (every row is one key), `default` otherwise.
    pub fn initial_partitions(&self, default: usize) -> usize {
        if self.key_exprs().iter().any(Vec::is_empty) {
            1
        } else {
            default
        }
    }

    /// The same operator over `inputs`. An aggregate is made anew, so that
    /// its inner stages are not shared with another task's; the others
    /// share what they were made with, which a run does not change.
    pub fn over(&self, inputs: Vec<Arc<dyn ExecutionPlan>>) -> Result<Self> {
        let rebuilt = match self {
            PartitionedOp::Aggregate(a) => {
                let [input] = <[_; 1]>::try_from(inputs)
                    .map_err(|_| Error::internal("an aggregate takes one input"))?;
                let node = StreamingAggregateExec::try_new_with_sessions(
                    a.operator_id().to_string(),
                    a.top_over(input)?,
                    a.ttl(),
                    Some(a.merges_sessions()),
                )?
                .with_emit(a.emit_mode())?;
                return Ok(PartitionedOp::Aggregate(node));
            }
            PartitionedOp::Join(_) | PartitionedOp::Dedup(_) | PartitionedOp::TopN(_) => {
                self.plan().replace_children(inputs, recompute())?
            }
        };
        PartitionedOp::of(rebuilt.as_ref())
            .ok_or_else(|| Error::internal("a stateful node rebuilt as another node"))
    }

    /// Runs over one batch with `store` (and `index`, for a join) as its
    /// state before the batch.
    async fn run_with(
        &self,
        store: &mut StateStore,
        index: &mut JoinIndex,
        batch: BatchContext,
        ctx: &Arc<TaskContext>,
    ) -> Result<(Vec<RecordBatch>, OperatorReport)> {
        match self {
            PartitionedOp::Aggregate(a) => a.run_with(store, batch, ctx).await,
            PartitionedOp::Join(j) => j.run_with(store, index, batch, ctx).await,
            PartitionedOp::Dedup(d) => d.run_with(store, batch, ctx).await,
            PartitionedOp::TopN(t) => t.run_with(store, batch, ctx).await,
        }
    }
}

/// A stateful operator whose state is split into partitions, one task
/// each (see the module docs).
///
/// Its children are the operator's inputs, each hash-partitioned on its
/// keys into P partitions, and last [`partition_ids`]: P one-row
/// partitions holding their own index. Ballista runs each task of a stage
/// over a plan restricted to the task's partitions (its readers and
/// in-memory scans keep only those, re-indexed from 0), so a task does not
/// know its partition's global index from the index it is asked for; the
/// last child, restricted alike, tells it which state partition its rows
/// are.
#[derive(Debug, Clone)]
pub struct PartitionedExec {
    op: PartitionedOp,
    ids: Arc<dyn ExecutionPlan>,
    job: StateJob,
    properties: Arc<PlanProperties>,
}

/// The name of [`partition_ids`]' one column.
const PARTITION: &str = "partition";

/// `n` partitions of one row each, partition k holding k.
pub fn partition_ids(n: usize) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::arrow::array::UInt64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![Field::new(
        PARTITION,
        DataType::UInt64,
        false,
    )]));
    let parts = (0..n as u64)
        .map(|k| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(UInt64Array::from(vec![k]))],
            )
            .map(|b| vec![b])
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let scan =
        datafusion::datasource::memory::MemorySourceConfig::try_new_exec(&parts, schema, None)?;
    Ok(scan)
}

impl PartitionedExec {
    /// `op` (whose inputs are already partitioned on its keys) running
    /// `job`'s batch, with `ids` ([`partition_ids`]) as many partitions as
    /// each of its inputs.
    ///
    /// The inputs' partitions are checked when a task runs, not here: a
    /// cluster's planner rebuilds the node while it rewrites its inputs
    /// (drops a coalesce, then puts one back where this node asks for it).
    pub fn new(op: PartitionedOp, ids: Arc<dyn ExecutionPlan>, job: StateJob) -> Result<Self> {
        let id_parts = ids.output_partitioning().partition_count();
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(op.node().schema()),
            Partitioning::UnknownPartitioning(id_parts),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Ok(PartitionedExec {
            op,
            ids,
            job,
            properties,
        })
    }

    /// The operator it runs.
    pub fn op(&self) -> &PartitionedOp {
        &self.op
    }

    /// The batch it runs and where its state is.
    pub fn job(&self) -> &StateJob {
        &self.job
    }
}

/// Options that have a rebuilt node work out its properties again.
pub(crate) fn recompute() -> datafusion::physical_plan::execution_plan::ReplaceChildrenOptions {
    use datafusion::physical_plan::execution_plan::{
        ChildrenPropertiesMode, ReplaceChildrenOptions,
    };
    ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute)
}

/// The directory of partition `k` of operator `op`'s state.
pub fn partition_dir(checkpoint: &Path, op: &str, k: usize) -> PathBuf {
    checkpoint.join("state").join(op).join(format!("p{k}"))
}

impl DisplayAs for PartitionedExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PartitionedExec: batch={}, ", self.job.batch.batch_id)?;
        self.op.node().fmt_as(t, f)
    }
}

impl ExecutionPlan for PartitionedExec {
    fn name(&self) -> &str {
        "PartitionedExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        let mut out = self.op.node().children();
        out.push(&self.ids);
        out
    }

    // What the inputs must stay as they were sent: the optimizer a
    // cluster's planner runs over each stage drops a coalesce no node asks
    // for, and may spread an input over more partitions.
    fn required_input_distribution(&self) -> Vec<datafusion::physical_expr::Distribution> {
        use datafusion::physical_expr::Distribution;
        let single = self.properties.output_partitioning().partition_count() == 1;
        self.children()
            .iter()
            .map(|_| {
                if single {
                    Distribution::SinglePartition
                } else {
                    Distribution::UnspecifiedDistribution
                }
            })
            .collect()
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false; self.children().len()]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_expr::PhysicalExpr>,
        ) -> datafusion::common::Result<
            datafusion::common::tree_node::TreeNodeRecursion,
        >,
    ) -> datafusion::common::Result<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let inputs = self.op.inputs().len();
        if children.len() != inputs + 1 {
            return Err(datafusion::error::DataFusionError::Internal(format!(
                "PartitionedExec takes {} children, got {}",
                inputs + 1,
                children.len()
            )));
        }
        let ids = children.pop().expect("counted");
        let rebuilt = self.op.plan().replace_children(children, recompute())?;
        let op = PartitionedOp::of(rebuilt.as_ref()).ok_or_else(|| {
            datafusion::error::DataFusionError::Internal(
                "a stateful node rebuilt as another node".into(),
            )
        })?;
        Ok(Arc::new(Self::new(op, ids, self.job.clone())?))
    }

    fn execute(
        &self,
        partition: usize,
        ctx: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        use futures::{StreamExt, TryStreamExt};
        let parts = self.properties.output_partitioning().partition_count();
        if partition >= parts {
            return Err(datafusion::error::DataFusionError::Internal(format!(
                "PartitionedExec has {parts} partitions, asked for {partition}"
            )));
        }
        for input in self.op.inputs() {
            let input_parts = input.output_partitioning().partition_count();
            if input_parts != parts {
                return Err(datafusion::error::DataFusionError::Internal(format!(
                    "a partitioned operator over {input_parts} input partitions with {parts} partition ids"
                )));
            }
        }
        let op = self.op.clone();
        let ids = Arc::clone(&self.ids);
        let job = self.job.clone();
        let schema = self.schema();
        let rows = async move {
            let k = partition_id(&ids, partition, &ctx).await?;
            let rows = run_partition(op, partition, k, job, ctx)
                .await
                .map_err(crate::failure::task_error)?;
            rows.into_iter()
                .map(|b| pairs_apart(b, k, parts))
                .collect::<Result<Vec<_>>>()
                .map_err(datafusion::error::DataFusionError::from)
        };
        let stream = futures::stream::once(rows)
            .map_ok(|rows| futures::stream::iter(rows.into_iter().map(Ok)))
            .try_flatten()
            .boxed();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// `rows` of partition `k` of `n` with the numbers that pair the two rows
/// of an update (the changelog's last column, [`SEQ`]) made unique across
/// partitions: each partition numbers its updates from 0, and the
/// changelog's root pairs rows by number over the whole batch. Within a
/// batch the high half of a number is the batch id, the same everywhere;
/// the low half `j` becomes `j * n + k`.
fn pairs_apart(rows: RecordBatch, k: usize, n: usize) -> Result<RecordBatch> {
    use datafusion::arrow::array::{AsArray, UInt64Array};
    use datafusion::arrow::datatypes::{DataType, UInt64Type};
    let schema = rows.schema();
    let last = rows.num_columns().wrapping_sub(1);
    let is_seq = schema
        .fields()
        .last()
        .is_some_and(|f| f.name() == SEQ && *f.data_type() == DataType::UInt64);
    if !is_seq || n <= 1 {
        return Ok(rows);
    }
    let (k, n) = (k as u64, n as u64);
    let seqs: UInt64Array = rows
        .column(last)
        .as_primitive::<UInt64Type>()
        .unary(|s| ((s >> 32) << 32).wrapping_add((s & 0xFFFF_FFFF) * n + k));
    let mut cols = rows.columns().to_vec();
    cols[last] = Arc::new(seqs);
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// The global index of local partition `local`: the one value of that
/// partition of [`partition_ids`].
async fn partition_id(
    ids: &Arc<dyn ExecutionPlan>,
    local: usize,
    ctx: &Arc<TaskContext>,
) -> datafusion::common::Result<usize> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::UInt64Type;
    use futures::TryStreamExt;
    let batches: Vec<RecordBatch> = ids.execute(local, Arc::clone(ctx))?.try_collect().await?;
    let values: Vec<u64> = batches
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<UInt64Type>().values().to_vec())
        .collect();
    match values.as_slice() {
        [k] => Ok(*k as usize),
        other => Err(datafusion::error::DataFusionError::Internal(format!(
            "local partition {local} of a partitioned operator has {} partition ids",
            other.len()
        ))),
    }
}

/// The task of local partition `local`, state partition `k`: steps 1 to 4
/// of the module docs.
async fn run_partition(
    op: PartitionedOp,
    local: usize,
    k: usize,
    job: StateJob,
    ctx: Arc<TaskContext>,
) -> Result<Vec<RecordBatch>> {
    let id = op.node().operator_id().to_string();
    // A node of its own, over this partition of each input alone.
    let slices = op
        .inputs()
        .into_iter()
        .map(|input| {
            Arc::new(crate::slice::PartitionSliceExec::new(input, local)) as Arc<dyn ExecutionPlan>
        })
        .collect();
    let node = op.over(slices)?;
    // A checkpoint in a bucket: this process's cache of it, with the
    // partition's files made current (a file another attempt rewrote is
    // downloaded, so a kept store no longer matches it).
    // On a blocking thread: the downloads must not hold up the executor's
    // runtime (its heartbeats, its other task).
    let (checkpoint, op) = (job.checkpoint.clone(), id.clone());
    let dir = tokio::task::spawn_blocking(move || {
        let root = sluice_common::remote::local_dir_unsynced(&checkpoint)?;
        let dir = partition_dir(&root, &op, k);
        sluice_common::remote::sync(&dir)?;
        Ok::<_, Error>(dir)
    })
    .await
    .map_err(|e| Error::internal(format!("a state partition's sync panicked: {e}")))?
    .map_err(|e| e.context(format!("operator '{id}' partition {k}")))?;
    let (keys, values) = node.node().state_schemas();
    let id_n = job.batch.batch_id;
    let (mut store, mut index) = take_store(&dir, keys, values, job.durability, id_n)
        .map_err(|e| e.context(format!("operator '{id}' partition {k}")))?;
    let (rows, report) = node
        .run_with(&mut store, &mut index, job.batch, &ctx)
        .await?;
    let report_dir = dir.clone();
    let committed = tokio::task::spawn_blocking(move || {
        let stats = store.commit(id_n)?;
        crate::report::write(
            &report_dir,
            &crate::report::PartitionReport {
                batch_id: id_n,
                report,
                stats,
                memory_bytes: store.memory_bytes() as u64,
            },
        )?;
        Ok::<_, Error>(store)
    })
    .await
    .map_err(|e| Error::internal(format!("a state commit panicked: {e}")))?
    .map_err(|e| e.context(format!("operator '{id}' partition {k}")))?;
    // `SLUICE_CRASH_AT=after-state:N` in an executor's environment: the
    // executor dies once a task of batch N or later has committed its
    // partition, before the task reports (the scheduler runs the task
    // again elsewhere). "Or later", since which executor gets which task
    // is the scheduler's choice.
    if let Some(fault) = sluice_exec::Fault::from_env()
        && fault.point == sluice_exec::FaultPoint::AfterState
        && id_n >= fault.batch_id
    {
        fault.fire()?;
    }
    keep_store(&dir, committed, index);
    Ok(rows)
}

/// What identifies the file a version was committed in: a rewrite by
/// another attempt (a new file renamed into place) changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    inode: u64,
    modified: Option<std::time::SystemTime>,
}

fn stamp(dir: &Path, version: Option<BatchId>) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let v = version?;
    let meta = std::fs::metadata(dir.join(format!("{v}.delta"))).ok()?;
    Some(Stamp {
        len: meta.len(),
        inode: meta.ino(),
        modified: meta.modified().ok(),
    })
}

/// A partition's store this executor committed last, with the stamp of
/// the delta it wrote (and a join's index over it).
struct Kept {
    store: StateStore,
    index: JoinIndex,
    stamp: Option<Stamp>,
}

/// How much memory the stores an executor keeps may take by default: 1 GiB.
pub const DEFAULT_KEPT_STATE_BYTES: u64 = 1 << 30;

/// The stores this process's tasks committed, by partition directory, up
/// to a memory budget: a store kept beyond it is dropped, least recently
/// kept first (its partition is loaded from the checkpoint when its task
/// comes back). A store is only worth keeping until another executor runs
/// its partition, which this one cannot see; the budget bounds what such
/// stale copies take.
struct KeptStores {
    entries: HashMap<PathBuf, (u64, Kept)>,
    /// Ticks of [`Self::keep`], to order entries by when they were kept.
    tick: u64,
    budget: u64,
}

impl KeptStores {
    fn take(&mut self, dir: &Path) -> Option<Kept> {
        self.entries.remove(dir).map(|(_, k)| k)
    }

    /// Keeps `kept` for `dir`, then drops the least recently kept other
    /// stores while all of them take more than the budget. Returns the
    /// directories whose stores were dropped.
    fn keep(&mut self, dir: PathBuf, kept: Kept) -> Vec<PathBuf> {
        self.tick += 1;
        self.entries.insert(dir.clone(), (self.tick, kept));
        let mut total: u64 = self
            .entries
            .values()
            .map(|(_, k)| k.store.memory_bytes() as u64)
            .sum();
        let mut by_age: Vec<(u64, PathBuf, u64)> = self
            .entries
            .iter()
            .filter(|(d, _)| **d != dir)
            .map(|(d, (t, k))| (*t, d.clone(), k.store.memory_bytes() as u64))
            .collect();
        by_age.sort();
        let mut dropped = Vec::new();
        for (_, d, bytes) in by_age {
            if total <= self.budget {
                break;
            }
            self.entries.remove(&d);
            total -= bytes;
            dropped.push(d);
        }
        dropped
    }
}

static KEPT: LazyLock<Mutex<KeptStores>> = LazyLock::new(|| {
    Mutex::new(KeptStores {
        entries: HashMap::new(),
        tick: 0,
        budget: DEFAULT_KEPT_STATE_BYTES,
    })
});

/// Sets how much memory the stores this process keeps between its tasks
/// may take (an executor's `--kept-state-mb`); 0 keeps none past the
/// store just committed.
pub fn set_kept_state_budget(bytes: u64) {
    KEPT.lock().unwrap_or_else(|p| p.into_inner()).budget = bytes;
}

/// The partition's state as of the batch before `batch`: the kept store
/// (and index) if it is exactly that, or else loaded from the checkpoint
/// (with an empty index, which the join rebuilds from the store).
fn take_store(
    dir: &Path,
    keys: datafusion::arrow::datatypes::SchemaRef,
    values: datafusion::arrow::datatypes::SchemaRef,
    durability: Durability,
    batch: BatchId,
) -> Result<(StateStore, JoinIndex)> {
    let before = batch.checked_sub(1);
    let kept = KEPT.lock().unwrap_or_else(|p| p.into_inner()).take(dir);
    if let Some(k) = kept
        && k.store.version() == before
        && k.stamp == stamp(dir, before)
    {
        return Ok((k.store, k.index));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let options = StateStoreOptions {
        durability,
        prepare_next: false,
        ..StateStoreOptions::default()
    };
    let mut store = StateStore::new(Some(dir.to_path_buf()), keys, values, options)?;
    store.load(before)?;
    Ok((store, JoinIndex::default()))
}

fn keep_store(dir: &Path, store: StateStore, index: JoinIndex) {
    let stamp = stamp(dir, store.version());
    let dropped = KEPT.lock().unwrap_or_else(|p| p.into_inner()).keep(
        dir.to_path_buf(),
        Kept {
            store,
            index,
            stamp,
        },
    );
    for d in dropped {
        log::info!(
            "dropped the kept store of {} (over the kept-state budget)",
            d.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{AsArray, Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
    use sluice_common::durable::Durability;
    use sluice_state::store::{StateStore, StateStoreOptions};

    use sluice_exec::operators::JoinIndex;

    use super::{KEPT, keep_store, take_store};

    fn schemas() -> (SchemaRef, SchemaRef) {
        (
            Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)])),
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)])),
        )
    }

    fn row(k: i64, v: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![k])),
                Arc::new(Int64Array::from(vec![v])),
            ],
        )
        .unwrap()
    }

    fn value(store: &StateStore) -> Vec<i64> {
        let all = store.scan().unwrap();
        all.column(1).as_primitive::<Int64Type>().values().to_vec()
    }

    fn kept(dir: &std::path::Path) -> bool {
        KEPT.lock().unwrap().entries.contains_key(dir)
    }

    /// Another attempt of the same task on another executor: a fresh store
    /// that writes `version` from the state before it.
    fn other_attempt(dir: &std::path::Path, version: u64, v: i64) {
        let (keys, values) = schemas();
        let options = StateStoreOptions {
            durability: Durability::NoSync,
            prepare_next: false,
            ..StateStoreOptions::default()
        };
        let mut store = StateStore::new(Some(dir.to_path_buf()), keys, values, options).unwrap();
        store.load(version.checked_sub(1)).unwrap();
        store.put(&row(1, v)).unwrap();
        store.commit(version).unwrap();
    }

    #[test]
    fn a_kept_store_serves_the_next_batch_only_while_its_file_is_the_one_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p0");
        let (keys, values) = schemas();
        let open = |batch| {
            take_store(
                &dir,
                keys.clone(),
                values.clone(),
                Durability::NoSync,
                batch,
            )
            .map(|(store, _index)| store)
        };

        // Batch 0 on this executor; batch 1 finds the store it kept.
        let mut store = open(0).unwrap();
        store.put(&row(1, 10)).unwrap();
        store.commit(0).unwrap();
        keep_store(&dir, store, JoinIndex::default());
        let mut store = open(1).unwrap();
        assert!(!kept(&dir), "the kept store was taken");
        assert_eq!(store.version(), Some(0));
        assert_eq!(value(&store), vec![10]);
        store.put(&row(1, 11)).unwrap();
        store.commit(1).unwrap();
        keep_store(&dir, store, JoinIndex::default());

        // Batch 1 is re-run elsewhere (a retried task, or a batch re-run
        // after the driver died) and writes version 1 anew: the kept store,
        // though at version 1, is not the file on disk, so batch 2 loads.
        other_attempt(&dir, 1, 12);
        let store = open(2).unwrap();
        assert_eq!(store.version(), Some(1));
        assert_eq!(value(&store), vec![12]);

        // A re-run of batch 1 on this executor, whose kept store is at
        // version 1, loads version 0 from disk.
        keep_store(&dir, store, JoinIndex::default());
        let store = open(1).unwrap();
        assert_eq!(store.version(), Some(0));
        assert_eq!(value(&store), vec![10]);
    }

    #[test]
    fn any_attempts_file_of_a_version_is_a_whole_version() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p3");
        std::fs::create_dir_all(&dir).unwrap();
        other_attempt(&dir, 0, 5);
        // Two attempts of batch 1 from the same state and rows, one after
        // the other: the second's file replaces the first's whole, and no
        // temporary file is left.
        other_attempt(&dir, 1, 6);
        other_attempt(&dir, 1, 6);
        let (keys, values) = schemas();
        let (store, _) = take_store(&dir, keys, values, Durability::NoSync, 2).unwrap();
        assert_eq!(value(&store), vec![6]);
        let leftovers: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn kept_stores_past_the_budget_are_dropped_least_recently_kept_first() {
        use super::{Kept, KeptStores};
        let tmp = tempfile::tempdir().unwrap();
        let store = |name: &str, rows: i64| {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let (keys, values) = schemas();
            let mut s = StateStore::new(
                Some(dir.clone()),
                keys,
                values,
                StateStoreOptions {
                    durability: Durability::NoSync,
                    prepare_next: false,
                    ..StateStoreOptions::default()
                },
            )
            .unwrap();
            for k in 0..rows {
                s.put(&row(k, k)).unwrap();
            }
            s.commit(0).unwrap();
            let kept = Kept {
                store: s,
                index: JoinIndex::default(),
                stamp: None,
            };
            (dir, kept)
        };
        let bytes = |k: &Kept| k.store.memory_bytes() as u64;
        let ((a, ka), (b, kb), (c, kc)) = (store("a", 100), store("b", 100), store("c", 100));
        let (sa, sb, sc) = (bytes(&ka), bytes(&kb), bytes(&kc));
        assert!(sa > 0 && sb > 0 && sc > 0);
        // Room for all but one byte of the three.
        let mut kept = KeptStores {
            entries: Default::default(),
            tick: 0,
            budget: sa + sb + sc - 1,
        };
        assert!(kept.keep(a.clone(), ka).is_empty());
        assert!(kept.keep(b.clone(), kb).is_empty());
        // The third drops the oldest, a.
        assert_eq!(kept.keep(c.clone(), kc), vec![a.clone()]);
        assert!(kept.take(&a).is_none());
        // b taken and kept again is now newer than c: a fourth drops c.
        let kb = kept.take(&b).unwrap();
        assert!(kept.keep(b.clone(), kb).is_empty());
        let (d, kd) = store("d", 100);
        kept.budget = sb + bytes(&kd);
        assert_eq!(kept.keep(d.clone(), kd), vec![c]);
        // One store larger than the budget is still kept: a task's next
        // batch needs it, and nothing else is.
        kept.budget = 1;
        let (e, ke) = store("e", 100);
        let mut dropped = kept.keep(e.clone(), ke);
        dropped.sort();
        assert_eq!(dropped, vec![b, d]);
        assert!(kept.take(&e).is_some());
    }
}
