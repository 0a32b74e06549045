//! Running each micro-batch's plan as one Ballista job.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use ballista_core::execution_plans::execute_physical_plan;
use ballista_core::extension::SessionConfigExt;
use datafusion::arrow::array::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, Partitioning, collect_partitioned,
};
use datafusion_proto::physical_plan::AsExecutionPlan;
use datafusion_proto::protobuf::PhysicalPlanNode;
use futures::TryStreamExt;
use futures::future::BoxFuture;
use sluice_common::durable::{Durability, read_json, write_json};
use sluice_common::{Error, Result};
use sluice_exec::{BatchJob, OperatorRun, PlanRunner, RemoteRange, RunOutput, SourceStats};

use crate::source_read::{ReadMode, SourceReadExec, read_stats};
use sluice_planner::is_stream_scan;

use crate::failure::job_error;
use crate::rollback::{Marker, SluiceJobOptions};
use crate::session::{physical_codec, session_config};
use crate::stateful::{
    PartitionedExec, PartitionedOp, StateJob, partition_dir, partition_ids, recompute,
};

/// How many partitions a stateful operator's state is split into when its
/// first batch runs on a cluster, unless the runner is told otherwise.
pub const DEFAULT_STATE_PARTITIONS: usize = 8;

/// `state/<op>/partitions`: the partitions an operator's state was split
/// into, fixed when its first batch ran on a cluster.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PartitionsRecord {
    partitions: usize,
    /// Where the probe keys of the operator's key types go, per input (see
    /// [`crate::hash_check`]); none for one partition, or in a record
    /// written before the check was (taken from the build that reads it
    /// first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash_check: Option<Vec<u32>>,
}

/// Where the probe keys of `op`'s key types go among `n` partitions, each
/// input's after the other's (a join's two sides must agree with the
/// record alike); `None` for one partition, where no key can move.
fn hash_check(op: &PartitionedOp, n: usize) -> Result<Option<Vec<u32>>> {
    if n <= 1 {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (input, keys) in op.inputs().iter().zip(op.key_exprs()) {
        let schema = input.schema();
        let types = keys
            .iter()
            .map(|k| k.data_type(&schema))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        out.extend(crate::hash_check::probe(&types, n)?);
    }
    Ok(Some(out))
}

/// Runs each batch's plan on a Ballista cluster, as one job submitted to
/// its scheduler.
///
/// The driver (the query's executor in this process) keeps the offsets,
/// the watermark and the sinks. The executors read the sources that can be
/// read elsewhere (file and Kafka, see [`crate::source_read`]); the driver
/// reads the others and puts their rows into the plan as in-memory scans.
/// The cluster runs the plan, shuffling at its hash repartitions, every
/// stateful operator as one task per partition of its state (see
/// [`crate::stateful`]), and the driver collects the job's rows and the
/// tasks' reports.
#[derive(Debug, Clone)]
pub struct ClusterRunner {
    url: String,
    session_id: String,
    partitions: usize,
    job_timeout: std::time::Duration,
    driver_reads: bool,
    /// Source ranges the executors were given to read so far.
    ranges_read: Arc<std::sync::atomic::AtomicU64>,
}

/// How many times a batch's job is run again, in one attempt of the
/// batch, because it ran a stage again whole.
pub const MAX_JOB_RERUNS: usize = 3;

/// How long a batch's job may take before the runner gives up on it.
pub const DEFAULT_JOB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl ClusterRunner {
    /// A runner for the scheduler at `scheduler` (`host:port`).
    pub fn new(scheduler: &str) -> Self {
        let url = if scheduler.contains("://") {
            scheduler.to_string()
        } else {
            format!("http://{scheduler}")
        };
        ClusterRunner {
            url,
            session_id: format!("sluice-{}", uuid::Uuid::new_v4()),
            partitions: DEFAULT_STATE_PARTITIONS,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            driver_reads: false,
            ranges_read: Arc::default(),
        }
    }

    /// Gives up on a batch's job that has not finished after `timeout`,
    /// with an I/O error, which the query retries as any transient failure
    /// (a new job; whatever the abandoned one writes is a whole version of
    /// the same state). A cluster that lost an executor in the middle of a
    /// job can leave the job waiting.
    pub fn with_job_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    /// Splits the state of an operator whose first batch runs with this
    /// runner into `n` partitions (at least 1). A checkpoint keeps the
    /// number it was started with.
    pub fn with_state_partitions(mut self, n: usize) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// Has the driver read every source and ship the rows in the plan, as
    /// for a source that cannot describe its ranges to the executors (a
    /// memory or Kafka source), instead of having the executors read the
    /// files of a file source.
    pub fn with_sources_read_by_driver(mut self) -> Self {
        self.driver_reads = true;
        self
    }

    /// How many source ranges (one source's part of one batch) the
    /// executors were given to read so far: 0 when the driver read
    /// everything.
    pub fn ranges_read(&self) -> u64 {
        self.ranges_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The scheduler's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// `plan` with every stream scan replaced by an in-memory scan of the
/// partitions `rows` gives for it.
fn scans_in_memory(
    plan: Arc<dyn ExecutionPlan>,
    mut rows: impl FnMut(&Arc<dyn ExecutionPlan>) -> Vec<Vec<RecordBatch>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let replaced = plan
        .transform_up(|p| {
            if !is_stream_scan(p.as_ref()) {
                return Ok(Transformed::no(p));
            }
            let scan = MemorySourceConfig::try_new_exec(&rows(&p), p.schema(), None)?;
            Ok(Transformed::yes(scan as Arc<dyn ExecutionPlan>))
        })
        .map_err(Error::from)?;
    Ok(replaced.data)
}

/// `plan` with every stream scan replaced by an in-memory scan of the rows
/// it yields now (the batch's rows, in as many partitions as the scan
/// had): a plan whose every node the cluster can decode and run.
async fn detach(
    plan: Arc<dyn ExecutionPlan>,
    ctx: Arc<TaskContext>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let mut scans: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
    plan.apply(|p| {
        if is_stream_scan(p.as_ref()) {
            scans.push(Arc::clone(p));
            return Ok(TreeNodeRecursion::Jump);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(Error::from)?;
    let mut rows: HashMap<usize, Vec<Vec<RecordBatch>>> = HashMap::new();
    for scan in scans {
        let key = Arc::as_ptr(&scan) as *const () as usize;
        if rows.contains_key(&key) {
            continue;
        }
        let parts = collect_partitioned(scan, Arc::clone(&ctx))
            .await
            .map_err(Error::from)?;
        rows.insert(key, parts);
    }
    scans_in_memory(plan, |p| {
        let key = Arc::as_ptr(p) as *const () as usize;
        rows.get(&key).cloned().unwrap_or_default()
    })
}

/// Aggregate functions whose result does not depend on the order of their
/// rows.
const ORDER_FREE: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "mean",
    "median",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "var",
    "var_pop",
    "var_samp",
    "var_population",
    "var_sample",
    "bool_and",
    "bool_or",
    "bit_and",
    "bit_or",
    "bit_xor",
    "approx_distinct",
    "approx_median",
    "approx_percentile_cont",
    "corr",
    "covar",
    "covar_pop",
    "covar_samp",
];

/// Whether `plan` has a stateful operator whose answer depends on the
/// order its rows arrive in: a top-N (which breaks ties by arrival, as one
/// process does) or an aggregate with a function not known to be free of
/// order (`first_value`, `last_value`, `array_agg`, `string_agg`, ...).
fn needs_arrival_order(plan: &Arc<dyn ExecutionPlan>) -> Result<bool> {
    for op in stateful_ops(plan)? {
        match &op {
            PartitionedOp::TopN(_) => return Ok(true),
            PartitionedOp::Aggregate(a) => {
                let input = op
                    .inputs()
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::internal("an aggregate without an input"))?;
                let top = a.top_over(Arc::new(
                    datafusion::physical_plan::empty::EmptyExec::new(input.schema()),
                ))?;
                let mut sensitive = false;
                top.apply(|p| {
                    let any: &dyn std::any::Any = p.as_ref();
                    if let Some(agg) =
                        any.downcast_ref::<datafusion::physical_plan::aggregates::AggregateExec>()
                    {
                        sensitive |= agg
                            .aggr_expr()
                            .iter()
                            .any(|e| !ORDER_FREE.contains(&e.fun().name()));
                    }
                    Ok(TreeNodeRecursion::Continue)
                })
                .map_err(Error::from)?;
                if sensitive {
                    return Ok(true);
                }
            }
            PartitionedOp::Join(_) | PartitionedOp::Dedup(_) => {}
        }
    }
    Ok(false)
}

/// `plan` with each range the executors read in several parts read in one
/// partition, part after part: the rows then reach every state partition
/// in the order one process reads them (a shuffle from several map tasks
/// hands a partition their outputs in the order the tasks finished).
async fn read_in_order(
    plan: Arc<dyn ExecutionPlan>,
    ctx: Arc<TaskContext>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let mut parts: HashMap<usize, Vec<RecordBatch>> = HashMap::new();
    let mut reads = Vec::new();
    plan.apply(|p| {
        if crate::source_read::as_source_read(p.as_ref()).is_some()
            && p.output_partitioning().partition_count() > 1
        {
            reads.push(Arc::clone(p));
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(Error::from)?;
    for read in &reads {
        let key = Arc::as_ptr(read) as *const () as usize;
        let scan = Arc::clone(read.children()[0]);
        let all: Vec<RecordBatch> = collect_partitioned(scan, Arc::clone(&ctx))
            .await
            .map_err(Error::from)?
            .into_iter()
            .flatten()
            .collect();
        parts.insert(key, all);
    }
    let replaced = plan
        .transform_up(|p| {
            let key = Arc::as_ptr(&p) as *const () as usize;
            if let Some(all) = parts.get(&key) {
                let scan = &p.children()[0];
                let one = MemorySourceConfig::try_new_exec(
                    std::slice::from_ref(all),
                    scan.schema(),
                    None,
                )?;
                return Ok(Transformed::yes(
                    p.replace_children(vec![one], recompute())?,
                ));
            }
            // A coalesce over what is now one partition would only be a
            // stage of its own (one without a limit of its own).
            let any: &dyn std::any::Any = p.as_ref();
            if any.is::<CoalescePartitionsExec>()
                && p.fetch().is_none()
                && let [child] = p.children().as_slice()
                && child.output_partitioning().partition_count() == 1
            {
                return Ok(Transformed::yes(Arc::clone(child)));
            }
            Ok(Transformed::no(p))
        })
        .map_err(Error::from)?;
    Ok(replaced.data)
}

/// `plan` with every stateful operator that runs on a cluster as a
/// [`PartitionedExec`] over each input hash-partitioned on its keys into
/// the operator's partitions (`partitions`, by operator id; one for an
/// aggregate without keys), and a coalesce above it, so that the plan
/// above sees one partition as before.
fn distribute(
    plan: Arc<dyn ExecutionPlan>,
    job: &BatchJob,
    partitions: &BTreeMap<String, usize>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let planned = plan
        .transform_up(|p| {
            let Some(op) = PartitionedOp::of(p.as_ref()) else {
                return Ok(Transformed::no(p));
            };
            let id = op.node().operator_id().to_string();
            let n = partitions
                .get(&id)
                .copied()
                .unwrap_or_else(|| op.initial_partitions(DEFAULT_STATE_PARTITIONS));
            let split = op
                .inputs()
                .into_iter()
                .zip(op.key_exprs())
                .map(|(input, keys)| {
                    Ok(
                        if n == 1 && input.output_partitioning().partition_count() == 1 {
                            // Already one partition (another operator's rows,
                            // coalesced): a second coalesce would be a stage
                            // of its own.
                            input
                        } else if n == 1 {
                            Arc::new(CoalescePartitionsExec::new(input)) as Arc<dyn ExecutionPlan>
                        } else {
                            Arc::new(RepartitionExec::try_new(
                                input,
                                Partitioning::Hash(keys, n),
                            )?)
                        },
                    )
                })
                .collect::<datafusion::common::Result<Vec<_>>>()?;
            let op = PartitionedOp::of(op.plan().replace_children(split, recompute())?.as_ref())
                .expect("a stateful node rebuilt is one");
            let batch = job.batch.delayed(job.delays.get(&id).copied().unwrap_or(0));
            let state = StateJob {
                checkpoint: job.checkpoint.clone(),
                durability: job.durability,
                batch,
            };
            let node = Arc::new(PartitionedExec::new(op, partition_ids(n)?, state)?);
            Ok(Transformed::yes(
                Arc::new(CoalescePartitionsExec::new(node)) as Arc<dyn ExecutionPlan>,
            ))
        })
        .map_err(Error::from)?;
    Ok(planned.data)
}

/// Each stateful operator's number of state partitions: as recorded in
/// the checkpoint, or `default` recorded now for one that has none yet.
fn state_partitions(
    plan: &Arc<dyn ExecutionPlan>,
    checkpoint: &Path,
    durability: Durability,
    default: usize,
) -> Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for op in stateful_ops(plan)? {
        let id = op.node().operator_id().to_string();
        let dir = checkpoint.join("state").join(&id);
        let path = dir.join(sluice_exec::execution::CLUSTER_STATE_MARK);
        let n = if path.exists() {
            let record = read_json::<PartitionsRecord>(&path)?;
            let n = record.partitions;
            if n == 0 {
                return Err(Error::checkpoint(
                    &path,
                    "an operator with 0 state partitions",
                ));
            }
            let check = hash_check(&op, n)?;
            match (&record.hash_check, &check) {
                (Some(was), Some(now)) if was != now => {
                    return Err(Error::checkpoint(
                        &path,
                        format!(
                            "operator '{id}' keeps its state in {n} partitions by a hash of its                              keys that this build computes differently (DataFusion's                              repartitioning hash changed): known keys would go to other                              partitions. Run the query with the build that wrote the                              checkpoint, or start a new checkpoint"
                        ),
                    ));
                }
                (None, Some(_)) => write_json(
                    &path,
                    &PartitionsRecord {
                        partitions: n,
                        hash_check: check,
                    },
                    durability,
                )?,
                _ => {}
            }
            n
        } else {
            let n = op.initial_partitions(default);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let record = PartitionsRecord {
                partitions: n,
                hash_check: hash_check(&op, n)?,
            };
            write_json(&path, &record, durability)?;
            n
        };
        out.insert(id, n);
    }
    Ok(out)
}

/// Encodes `plan` as the scheduler will receive it, naming the node that
/// cannot be.
fn encode(plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
    let codec = physical_codec();
    PhysicalPlanNode::try_from_physical_plan(Arc::clone(plan), codec.as_ref())
        .map(|_| ())
        .map_err(|e| Error::not_supported(format!("the plan cannot be sent to a cluster: {e}")))
}

impl ClusterRunner {
    /// Runs `plan` as one job and returns its rows; `what` names the job
    /// when it does not finish in time.
    async fn submit(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        what: String,
        options: Option<SluiceJobOptions>,
    ) -> Result<Vec<RecordBatch>> {
        let mut config = session_config();
        if let Some(options) = options {
            config.options_mut().extensions.insert(options);
        }
        let codec = physical_codec();
        let run = async {
            let stream = execute_physical_plan::<PhysicalPlanNode>(
                self.url.clone(),
                &config.ballista_config(),
                plan,
                codec.as_ref(),
                self.session_id.clone(),
                config.clone(),
            )
            .await
            .map_err(|e| job_error(&what, e))?;
            stream.try_collect().await.map_err(|e| job_error(&what, e))
        };
        match tokio::time::timeout(self.job_timeout, run).await {
            Ok(rows) => rows,
            Err(_) => Err(Error::io(
                format!("waiting for {what}"),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no result within {:?}", self.job_timeout),
                ),
            )),
        }
    }
}

impl ClusterRunner {
    /// Runs batch `job`'s `plan` as a job and returns its rows; again, as a
    /// new job, while a job ran a stage again whole (its rows may hold some
    /// twice: see [`crate::rollback`]), up to [`MAX_JOB_RERUNS`] times.
    async fn submit_until_clean(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        job: &BatchJob,
        root: &Path,
    ) -> Result<Vec<RecordBatch>> {
        let batch = job.batch.batch_id;
        let mut reruns = 0;
        loop {
            let marker = Marker::new(root, batch);
            let rows = self
                .submit(
                    Arc::clone(&plan),
                    format!("batch {batch}'s job"),
                    Some(marker.options(&job.checkpoint)),
                )
                .await?;
            let taken = tokio::task::spawn_blocking(move || marker.take())
                .await
                .map_err(|e| Error::internal(format!("reading a job's marker panicked: {e}")))??;
            let Some(task) = taken else {
                return Ok(rows);
            };
            if reruns == MAX_JOB_RERUNS {
                return Err(Error::io(
                    format!("running batch {batch} on the cluster"),
                    std::io::Error::other(format!(
                        "{} jobs in a row ran a stage again after losing an executor (last: {task})",
                        reruns + 1
                    )),
                ));
            }
            reruns += 1;
            log::warn!(
                "batch {batch}'s job ran a stage again ({task}); its rows are dropped and the batch runs again"
            );
        }
    }
}

impl PlanRunner for ClusterRunner {
    fn reads_sources(&self) -> bool {
        !self.driver_reads
    }

    fn count_reads<'a>(
        &'a self,
        ranges: &'a [RemoteRange],
        _ctx: Arc<TaskContext>,
    ) -> BoxFuture<'a, Result<BTreeMap<String, SourceStats>>> {
        Box::pin(async move {
            // Nothing to read (every range empty): no job.
            if ranges.iter().all(|r| r.read.parts.is_empty()) {
                return Ok(BTreeMap::new());
            }
            let mut counts: Vec<Arc<dyn ExecutionPlan>> = Vec::with_capacity(ranges.len());
            for r in ranges {
                counts.push(Arc::new(SourceReadExec::of_range(
                    &r.name,
                    &r.read,
                    Arc::clone(&r.schema),
                    r.watermark.clone(),
                    ReadMode::Stats,
                )?));
            }
            let plan: Arc<dyn ExecutionPlan> = match counts.len() {
                1 => counts.pop().expect("one"),
                _ => datafusion::physical_plan::union::UnionExec::try_new(counts)?,
            };
            let names: Vec<&str> = ranges.iter().map(|r| r.name.as_str()).collect();
            let rows = self
                .submit(
                    plan,
                    format!("the job reading sources {}", names.join(", ")),
                    // One stage, without shuffle reads: never rolled back.
                    None,
                )
                .await?;
            self.ranges_read
                .fetch_add(ranges.len() as u64, std::sync::atomic::Ordering::Relaxed);
            read_stats(&rows)
        })
    }

    fn read_node(&self, range: &RemoteRange) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(SourceReadExec::of_range(
            &range.name,
            &range.read,
            Arc::clone(&range.schema),
            range.watermark.clone(),
            ReadMode::Rows,
        )?))
    }

    fn describe(&self) -> String {
        format!("ballista at {}", self.url)
    }

    fn check(&self, plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
        // The plan as a batch sends it, with no rows in its scans: a node
        // the codec does not know is named.
        let empty = scans_in_memory(Arc::clone(plan), |_| vec![vec![]])?;
        let job = BatchJob {
            batch: Default::default(),
            checkpoint: std::path::PathBuf::new(),
            durability: Durability::NoSync,
            delays: BTreeMap::new(),
        };
        encode(&distribute(empty, &job, &BTreeMap::new())?)
    }

    fn keeps_state(&self) -> bool {
        true
    }

    fn run<'a>(
        &'a self,
        plan: Arc<dyn ExecutionPlan>,
        ctx: Arc<TaskContext>,
        job: &'a BatchJob,
    ) -> BoxFuture<'a, Result<RunOutput>> {
        Box::pin(async move {
            // The executors run elsewhere (another directory, another
            // machine with the checkpoint mounted at the same path): they
            // are sent the checkpoint's absolute path.
            // A checkpoint in a bucket is sent as its URL: each executor
            // mounts it in a cache of its own.
            let absolute = if sluice_common::remote::is_url(&job.checkpoint) {
                job.checkpoint.clone()
            } else {
                std::path::absolute(&job.checkpoint)
                    .map_err(|e| Error::io(format!("resolving {}", job.checkpoint.display()), e))?
            };
            let job = &BatchJob {
                checkpoint: absolute,
                ..job.clone()
            };
            let job_batch = job.batch.batch_id;
            let root = sluice_common::remote::local_dir(&job.checkpoint)?;
            let partitions = state_partitions(&plan, &root, job.durability, self.partitions)?;
            let described = described(&plan)?;
            let in_order = needs_arrival_order(&plan)?;
            let plan = detach(plan, Arc::clone(&ctx)).await?;
            let plan = if in_order {
                read_in_order(plan, ctx).await?
            } else {
                plan
            };
            let plan = distribute(plan, job, &partitions)?;
            // The job's last stage is one task. The scheduler keeps every
            // location a last-stage task ever reported, so a stage of
            // several whose task ran again (its executor taken for lost
            // while alive) would hand the driver that task's rows twice;
            // one task reports once, as the job ends.
            let plan = if plan.output_partitioning().partition_count() > 1 {
                Arc::new(CoalescePartitionsExec::new(plan)) as Arc<dyn ExecutionPlan>
            } else {
                plan
            };
            let rows = self.submit_until_clean(plan, job, &root).await?;
            // Every partition's task has written its report by now.
            let operators = tokio::task::spawn_blocking(move || {
                read_reports(&root, job_batch, described, &partitions)
            })
            .await
            .map_err(|e| Error::internal(format!("reading the tasks' reports panicked: {e}")))??;
            Ok(RunOutput { rows, operators })
        })
    }
}

/// Each stateful operator of `plan` that runs in partitions, bottom up:
/// its id and description.
fn described(plan: &Arc<dyn ExecutionPlan>) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = stateful_ops(plan)?
        .iter()
        .map(|op| {
            let node = op.node();
            (node.operator_id().to_string(), node.description())
        })
        .collect();
    out.reverse();
    Ok(out)
}

/// The stateful operators of `plan` that run in partitions, top down.
fn stateful_ops(plan: &Arc<dyn ExecutionPlan>) -> Result<Vec<PartitionedOp>> {
    let mut ops = Vec::new();
    plan.apply(|p| {
        ops.extend(PartitionedOp::of(p.as_ref()));
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(Error::from)?;
    Ok(ops)
}

/// What each operator in `ops` did in batch `batch`, from its partitions'
/// reports in the checkpoint at `root` (see [`crate::report`]): counts and
/// state figures summed, late rows in partition order, each step's time
/// the slowest partition's.
fn read_reports(
    root: &Path,
    batch: sluice_common::BatchId,
    ops: Vec<(String, String)>,
    partitions: &BTreeMap<String, usize>,
) -> Result<Vec<OperatorRun>> {
    let mut out = Vec::with_capacity(ops.len());
    for (id, description) in ops {
        let n = partitions.get(&id).copied().unwrap_or(0);
        let mut run = OperatorRun {
            id: id.clone(),
            description,
            ..OperatorRun::default()
        };
        for k in 0..n {
            let path = partition_dir(root, &id, k).join(crate::report::REPORT);
            let bytes = sluice_common::remote::read(&path)?.ok_or_else(|| {
                Error::io(
                    format!("reading operator '{id}' partition {k}'s report of batch {batch}"),
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{} is missing", path.display()),
                    ),
                )
            })?;
            let part = crate::report::decode(&path, &bytes)?;
            if part.batch_id != batch {
                return Err(Error::io(
                    format!("reading operator '{id}' partition {k}'s report of batch {batch}"),
                    std::io::Error::other(format!(
                        "{} is the report of batch {}",
                        path.display(),
                        part.batch_id
                    )),
                ));
            }
            let r = part.report;
            run.report.input_rows += r.input_rows;
            run.report.late_rows += r.late_rows;
            run.report.late.extend(r.late);
            for (step, ms) in r.steps {
                match run.report.steps.iter_mut().find(|(s, _)| *s == step) {
                    Some((_, slowest)) => *slowest = slowest.max(ms),
                    None => run.report.steps.push((step, ms)),
                }
            }
            run.stats.rows += part.stats.rows;
            run.stats.updated += part.stats.updated;
            run.stats.removed += part.stats.removed;
            run.stats.bytes_written += part.stats.bytes_written;
            run.memory_bytes += part.memory_bytes;
        }
        out.push(run);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::physical_plan::ExecutionPlan;
    use sluice_exec::PlanRunner;

    use super::ClusterRunner;

    #[test]
    fn a_plan_with_a_node_the_codec_does_not_know_is_refused_naming_it() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let scan = MemorySourceConfig::try_new_exec(&[vec![]], schema, None).unwrap();
        // A node that is built on an executor and never sent.
        let plan: Arc<dyn ExecutionPlan> = Arc::new(crate::slice::PartitionSliceExec::new(scan, 0));
        let err = ClusterRunner::new("127.0.0.1:9")
            .check(&plan)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be sent to a cluster"), "{err}");
        assert!(err.contains("PartitionSliceExec"), "{err}");
    }
}
