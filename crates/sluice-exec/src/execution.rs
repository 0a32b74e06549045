//! One query's micro-batch execution: the offset/commit protocol.
//!
//! Per batch N:
//! 1. ask each source how far its data reaches (capped per trigger);
//!    if no source moved, there is no batch;
//! 2. append batch N's `plan` record to the batch log — the ranges and the
//!    watermark — before anything of it is visible;
//! 3. read exactly those ranges into the query's stream tables;
//! 4. re-execute the physical plan (planned once at start), whose stateful
//!    nodes find the batch and their state in the task context, and commit
//!    every operator's state version N (with fsync on, on a thread of its
//!    own beside step 5);
//! 5. write the rows to the sink, idempotently keyed by N (and dead letters
//!    to their sink);
//! 6. append batch N's `commit` record, once 4 and 5 are done.
//!
//! A restart finds N's plan without its commit and re-runs N with the
//! logged ranges and watermark, so the sink sees the same rows again under the
//! same batch id and keeps them once.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::runner::{RemoteRange, SourceStats};
use datafusion::arrow::array::{Array, AsArray, RecordBatch, StringArray};
use datafusion::arrow::compute::{cast, max};
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::TaskContext;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::{ExecutionPlan, collect};
use serde_json::Value;
use sluice_common::connector::{DeadLetter, ReadBatch, Sink, SourceContext, SourceReader};
use sluice_common::durable::Durability;
use sluice_common::{BatchId, Clock, Error, Progress, Result, SourceProgress, StateProgress};
use sluice_planner::{OutputMode, StreamTable, check_streaming_plan, fingerprint, fork_streams};
use sluice_state::checkpoint::OffsetWrite;
use sluice_state::recovery::Resume;
use sluice_state::{Checkpoint, CheckpointOptions, CommitEntry, OffsetEntry, SourceRange};

use crate::fault::{Fault, FaultPoint};
use crate::operators::changelog::with_op_field;
use crate::operators::{
    BatchContext, OperatorRuntime, OperatorState, StateFinalizer, StatefulOptions,
    StreamingAggregateExec, as_stateful, first_aggregate, open_states, plan_stateful,
    stateful_nodes, watermark_delays,
};
use crate::trigger::Trigger;

/// How a query runs.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// The query's name (its sink's name).
    pub name: String,
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
    /// Sync checkpoint writes (default) or not.
    pub durability: Durability,
    /// When batches run.
    pub trigger: Trigger,
    /// How the sink receives results.
    pub output_mode: OutputMode,
    /// How often a batch that failed on a transient error is retried.
    pub max_batch_retries: u32,
    /// The first retry's delay; it doubles each time.
    pub retry_backoff: Duration,
    /// With no new data, how long the loop waits before looking again.
    pub poll_interval: Duration,
    /// Stop after this many batches (counting from this start).
    pub max_batches: Option<u64>,
    /// A crash to inject, for tests.
    pub fault: Option<Fault>,
    /// Tests: split the available input into random smaller batches (seeded),
    /// to check that results do not depend on where batches fall. Applies to
    /// sources whose offsets are counts (memory, file, rate).
    pub split_seed: Option<u64>,
    /// Drop an aggregate's keys not updated for this long (trigger clock).
    pub state_ttl: Option<Duration>,
    /// Rebuild state past an unreadable snapshot from an older one and the
    /// deltas after it (`SET state_snapshot_fallback = true`).
    pub state_snapshot_fallback: bool,
    /// Where each batch's plan runs: `None` for this process; a cluster's
    /// runner (`sluice-cluster`) to run it there.
    pub runner: Option<Arc<dyn crate::runner::PlanRunner>>,
}

impl QueryConfig {
    /// Defaults for query `name` checkpointed at `checkpoint`.
    pub fn new(name: impl Into<String>, checkpoint: impl Into<PathBuf>) -> Self {
        QueryConfig {
            name: name.into(),
            checkpoint: checkpoint.into(),
            durability: Durability::Fsync,
            trigger: Trigger::default(),
            output_mode: OutputMode::Append,
            max_batch_retries: 3,
            retry_backoff: Duration::from_millis(100),
            poll_interval: Duration::from_millis(50),
            max_batches: None,
            fault: Fault::from_env(),
            split_seed: None,
            state_ttl: None,
            state_snapshot_fallback: false,
            runner: None,
        }
    }
}

#[derive(Debug)]
struct StreamInput {
    table: StreamTable,
    reader: Box<dyn SourceReader>,
    /// Where the next batch starts: the end of the last committed (or
    /// planned) batch.
    committed: Value,
    /// The source's dead-letter sink as this query sees it (its own batch-id
    /// space, when several queries read the source).
    dead_letter: Option<Arc<dyn Sink>>,
    /// What was left after the planned batch's end when it was planned.
    backlog: Option<u64>,
}

/// The schema of dead-letter rows.
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("location", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
    ]))
}

fn dead_letter_batch(letters: &[DeadLetter]) -> Result<RecordBatch> {
    let col = |f: fn(&DeadLetter) -> &str| -> Arc<dyn Array> {
        Arc::new(StringArray::from(letters.iter().map(f).collect::<Vec<_>>()))
    };
    Ok(RecordBatch::try_new(
        dead_letter_schema(),
        vec![
            col(|d| &d.source),
            col(|d| &d.location),
            col(|d| &d.error),
            col(|d| &d.raw),
        ],
    )?)
}

/// The micro-batch executor of one query.
#[derive(Debug)]
pub struct MicroBatchExecution {
    config: QueryConfig,
    checkpoint: Checkpoint,
    inputs: Vec<StreamInput>,
    sink: Arc<dyn Sink>,
    output_schema: SchemaRef,
    plan: Arc<dyn ExecutionPlan>,
    /// The stateful operators, bottom up: (operator id, description).
    operators: Vec<(String, String)>,
    /// Per stateful operator, how far its input watermark is below the
    /// query's (see `watermark_delays`).
    delays: BTreeMap<String, i64>,
    /// Whether the runner reads the sources that can be read elsewhere
    /// (it says so, and no stream scan carries a limit of its own).
    remote_reads: bool,
    /// The batch and the operators' state, as the plan's stateful nodes
    /// find them in `task_ctx`.
    runtime: Arc<OperatorRuntime>,
    /// What turns the first aggregate's stored states into values.
    finalizer: Option<StateFinalizer>,
    /// When the topmost stateful operator is an aggregate (or a top-1
    /// without a window): its key columns, which identify a row of the
    /// result.
    result_keys: Option<Vec<String>>,
    /// Where late rows go, for each stream that asked for it.
    late_sinks: Vec<LateSink>,
    task_ctx: Arc<TaskContext>,
    next_batch: BatchId,
    pending: Option<OffsetEntry>,
    clock: Arc<dyn Clock>,
    watermark_ms: Option<i64>,
    event_time_max_ms: BTreeMap<String, i64>,
    /// Per source, when a batch last read rows from it (trigger clock).
    last_data_ms: BTreeMap<String, i64>,
    /// When the query's checkpoint was created (trigger clock): a source
    /// that never had data is idle from here.
    started_ms: i64,
    last_start_ms: Option<i64>,
    progress: Arc<Mutex<ProgressLog>>,
    batches_run: u64,
    /// The total backlog after the last few new batches, oldest first.
    backlogs: VecDeque<u64>,
}

/// A query planned for micro-batches: its optimized logical plan, its stream
/// tables, and the physical plan with its stateful nodes.
struct Planned {
    plan: LogicalPlan,
    tables: Vec<StreamTable>,
    physical: Arc<dyn ExecutionPlan>,
}

/// Plans `plan` as [`MicroBatchExecution::start`] does, without opening
/// anything.
async fn plan_query(
    plan: LogicalPlan,
    state: &SessionState,
    config: &QueryConfig,
) -> Result<Planned> {
    let name = &config.name;
    // DISTINCT ON (from SQL, already rewritten, or from a DataFrame's
    // distinct_on) runs as the ROW_NUMBER() = 1 it means.
    let plan = sluice_planner::distinct_on_as_row_number(plan)?;
    let plan = state.optimize(&plan).map_err(Error::from)?;
    let plan = sluice_planner::sign_updating_edges(plan)?;
    let shape = check_streaming_plan(name, &plan, config.output_mode)?;
    let (plan, tables) = fork_streams(plan)?;
    let physical = state
        .create_physical_plan(&plan)
        .await
        .map_err(Error::from)?;
    let physical = if shape.is_stateful() {
        plan_stateful(
            physical,
            StatefulOptions {
                mode: config.output_mode,
                state_ttl: config.state_ttl,
                signed_edges: shape.aggregates.iter().filter(|a| a.feeds_signed).count(),
            },
            &crate::operators::event_time_columns(&plan),
        )
        .map_err(|e| e.context(format!("query '{name}'")))?
    } else {
        physical
    };
    Ok(Planned {
        plan,
        tables,
        physical,
    })
}

/// What turns the stored states of `plan`'s first aggregate into values,
/// with the plan's fingerprint (as a checkpoint's `metadata` records it):
/// plans the query as a start would, without opening its checkpoint or
/// sources (for `sluice state`). `None` when it has no aggregate.
pub async fn plan_finalizer(
    plan: LogicalPlan,
    state: &SessionState,
    config: &QueryConfig,
) -> Result<(Option<StateFinalizer>, String)> {
    let planned = plan_query(plan, state, config).await?;
    Ok((
        first_aggregate(&planned.physical).map(StreamingAggregateExec::finalizer),
        fingerprint(&planned.plan),
    ))
}

/// Over how many batches in a row a growing backlog counts as falling
/// behind.
const BACKLOG_GROWTH_BATCHES: usize = 3;

/// How many progress records are kept in memory.
const RECENT_PROGRESS: usize = 100;

/// Something told of every progress record as its batch completes (the
/// HTTP endpoint's metrics). It runs on the batch's path, under the lock of
/// the query's progress log: it must be quick, must not block, and must
/// not read the same query's progress (`QueryInfo::last_progress` and the
/// like take that lock, and would wait forever).
pub type ProgressListener = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A query's recent progress records, and who is told of new ones.
#[derive(Default)]
pub struct ProgressLog {
    recent: VecDeque<Progress>,
    listeners: Vec<ProgressListener>,
}

impl std::fmt::Debug for ProgressLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressLog")
            .field("recent", &self.recent.len())
            .field("listeners", &self.listeners.len())
            .finish()
    }
}

impl ProgressLog {
    /// Keeps `p` (dropping the oldest past the 100 kept) and tells
    /// every listener.
    pub fn push(&mut self, p: Progress) {
        for l in &self.listeners {
            l(&p);
        }
        if self.recent.len() == RECENT_PROGRESS {
            self.recent.pop_front();
        }
        self.recent.push_back(p);
    }

    /// The records kept, oldest first.
    pub fn recent(&self) -> &VecDeque<Progress> {
        &self.recent
    }

    /// Tells `listener` of every record kept so far, then of each new one:
    /// under the same lock as [`ProgressLog::push`], so none is missed or
    /// told twice.
    pub fn listen(&mut self, listener: ProgressListener) {
        for p in &self.recent {
            listener(p);
        }
        self.listeners.push(listener);
    }
}

impl MicroBatchExecution {
    /// Plans `plan` once, opens (or recovers) its checkpoint, opens its
    /// sources and sink.
    pub async fn start(
        plan: LogicalPlan,
        state: &SessionState,
        sink: Arc<dyn Sink>,
        config: QueryConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let name = config.name.clone();
        let ctx = |e: Error| e.context(format!("query '{name}'"));
        let Planned {
            plan,
            tables,
            physical,
        } = plan_query(plan, state, &config).await?;
        if let Some(runner) = &config.runner {
            runner
                .check(&physical)
                .map_err(|e| ctx(e.context(runner.describe())))?;
        }
        let names: Vec<String> = tables
            .iter()
            .map(|t| t.source().name().to_string())
            .collect();
        let options = CheckpointOptions {
            durability: config.durability,
            ..CheckpointOptions::default()
        };
        // A checkpoint in a bucket is worked on in a local cache, synced
        // with the bucket by `Checkpoint::open` under its lock (so not here
        // as well).
        let root = sluice_common::remote::local_dir_unsynced(&config.checkpoint).map_err(ctx)?;
        let checkpoint = Checkpoint::open(
            &root,
            &name,
            &fingerprint(&plan),
            &names,
            clock.now_millis(),
            options,
        )
        .map_err(ctx)?;
        // Opened once the checkpoint's lock is held: a store writes its
        // meta. A runner that keeps the state itself (a cluster's) opens
        // it where the plan runs; the layouts of the two differ, so a
        // checkpoint's state stays with the kind of run that wrote it.
        let keeps_state = config.runner.as_ref().is_some_and(|r| r.keeps_state());
        check_state_layout(&physical, &root, keeps_state).map_err(ctx)?;
        let states = if keeps_state {
            crate::operators::OperatorStates::new()
        } else {
            open_states(
                &physical,
                &root,
                config.durability,
                config.state_snapshot_fallback,
            )
            .map_err(ctx)?
        };
        let nodes = stateful_nodes(&physical);
        let operators: Vec<(String, String)> = nodes
            .iter()
            .map(|n| (n.operator_id().to_string(), n.description()))
            .collect();
        // Late rows of every operator that reads streams directly (not
        // through another operator), per input it has (a join has two):
        // (operator id, input index, input plan).
        let late_inputs: Vec<(String, usize, Arc<dyn ExecutionPlan>)> = nodes
            .iter()
            .filter(|n| n.has_late_rows())
            .flat_map(|n| {
                n.late_inputs()
                    .into_iter()
                    .enumerate()
                    .map(|(k, input)| (n.operator_id().to_string(), k, input))
            })
            .collect();
        let finalizer = first_aggregate(&physical).map(StreamingAggregateExec::finalizer);
        let result_keys = nodes.last().and_then(|n| {
            let any: &dyn std::any::Any = *n;
            match any.downcast_ref::<StreamingAggregateExec>() {
                Some(a) => {
                    let f = a.finalizer();
                    Some(
                        f.schema().fields()[..f.key_count()]
                            .iter()
                            .map(|k| k.name().clone())
                            .collect(),
                    )
                }
                None => any
                    .downcast_ref::<crate::operators::TopNExec>()
                    .and_then(crate::operators::TopNExec::upsert_keys),
            }
        });
        drop(nodes);
        let delays = watermark_delays(&physical);
        let runtime = OperatorRuntime::with_delays(states, delays.clone());
        let mut inputs = Vec::new();
        for table in tables {
            let src = Arc::clone(table.source());
            let reader = src
                .open(SourceContext {
                    dir: checkpoint.source_dir(src.name()),
                    durability: config.durability,
                    clock: Arc::clone(&clock),
                })
                .map_err(ctx)?;
            let dead_letter = match table.dead_letter() {
                Some(dl) => {
                    let dl = dl.for_query(&config.name).unwrap_or_else(|| Arc::clone(dl));
                    dl.open(&dead_letter_schema(), OutputMode::Append)
                        .await
                        .map_err(ctx)?;
                    Some(dl)
                }
                None => None,
            };
            let committed = reader.initial_offset();
            inputs.push(StreamInput {
                table,
                reader,
                committed,
                dead_letter,
                backlog: None,
            });
        }
        let mut late_sinks = Vec::new();
        for (operator, k, late_input) in &late_inputs {
            // The streams this input of the operator reads, not counting
            // those read through another stateful operator (rows late for
            // this one are that operator's output, not a source's rows).
            let read: Vec<usize> = (0..inputs.len())
                .filter(|&i| {
                    let mut found = false;
                    let _ = late_input.apply(|p| {
                        if as_stateful(p).is_some() {
                            return Ok(TreeNodeRecursion::Jump);
                        }
                        found |= inputs[i].table.is_scan_of(p.as_ref());
                        Ok(if found {
                            TreeNodeRecursion::Stop
                        } else {
                            TreeNodeRecursion::Continue
                        })
                    });
                    found
                })
                .collect();
            let asked: Vec<usize> = read
                .iter()
                .copied()
                .filter(|&i| inputs[i].table.late_rows().is_some())
                .collect();
            let Some(&source) = asked.first() else {
                continue;
            };
            if read.len() > 1 {
                return Err(ctx(Error::not_supported(format!(
                    "late_rows on source '{}', read together with other streams before the stateful operator its rows are late for: a late row reaches that operator without its source",
                    inputs[source].table.source().name()
                ))));
            }
            let sink = inputs[source].table.late_rows().expect("asked");
            let sink = sink
                .for_query(&config.name)
                .unwrap_or_else(|| Arc::clone(&sink));
            let schema = late_input.schema();
            sink.open(&late_schema(&schema), OutputMode::Append)
                .await
                .map_err(ctx)?;
            late_sinks.push(LateSink {
                operator: operator.clone(),
                input: *k,
                source,
                sink,
                schema,
            });
        }
        let stateful = !operators.is_empty();
        let output_schema = match (stateful, config.output_mode) {
            (false, OutputMode::Changelog) => with_op_field(&physical.schema()),
            _ => physical.schema(),
        };
        // A stateless query's update mode is append: every row is new (and
        // in changelog mode, an insert).
        let sink_mode = match (stateful, config.output_mode) {
            (true, mode) | (false, mode @ OutputMode::Changelog) => mode,
            (false, _) => OutputMode::Append,
        };
        sink.open(&output_schema, sink_mode).await.map_err(ctx)?;
        // A source that never had data is idle from when the query was first
        // created, so a re-run after any restart decides idleness alike.
        let started_ms = checkpoint.metadata().created_ms;
        let remote_reads = config.runner.as_ref().is_some_and(|r| r.reads_sources()) && {
            let mut limited = false;
            let _ = physical.apply(|p| {
                let any: &dyn std::any::Any = p.as_ref();
                if let Some(scan) =
                    any.downcast_ref::<datafusion::physical_plan::streaming::StreamingTableExec>()
                {
                    limited |= scan.limit().is_some();
                }
                Ok(TreeNodeRecursion::Continue)
            });
            !limited
        };
        let mut exec = MicroBatchExecution {
            checkpoint,
            inputs,
            sink,
            output_schema,
            plan: physical,
            delays,
            remote_reads,
            operators,
            task_ctx: runtime.task_ctx(&state.task_ctx()),
            runtime,
            finalizer,
            result_keys,
            late_sinks,
            next_batch: 0,
            pending: None,
            clock,
            watermark_ms: None,
            event_time_max_ms: BTreeMap::new(),
            last_data_ms: BTreeMap::new(),
            started_ms,
            last_start_ms: None,
            progress: Arc::default(),
            batches_run: 0,
            backlogs: VecDeque::new(),
            config,
        };
        exec.recover().await.map_err(ctx)?;
        Ok(exec)
    }

    /// Restores offsets and the watermark from the logs, and queues an
    /// uncommitted batch for re-running.
    async fn recover(&mut self) -> Result<()> {
        let last_committed = match self.checkpoint.resume()? {
            Resume::Fresh => None,
            Resume::Next { next } => {
                self.next_batch = next;
                Some(next - 1)
            }
            Resume::Rerun { batch_id } => {
                let entry = self.checkpoint.read_offsets(batch_id)?;
                self.next_batch = batch_id;
                self.pending = Some(entry);
                batch_id.checked_sub(1)
            }
        };
        if let Some(id) = last_committed {
            let offsets = self.checkpoint.read_offsets(id)?;
            let commit = self.checkpoint.read_commit(id)?;
            for input in &mut self.inputs {
                let name = input.table.source().name();
                let range = offsets.sources.get(name).ok_or_else(|| {
                    Error::checkpoint(
                        self.checkpoint.root(),
                        format!("the plan of batch {id} has no range for source '{name}'"),
                    )
                })?;
                input.committed = range.end.clone();
            }
            self.watermark_ms = commit.watermark_ms;
            self.event_time_max_ms = commit.event_time_max_ms;
            self.last_data_ms = commit.last_data_ms;
        }
        for (id, state) in self.runtime.states() {
            state
                .lock()
                .await
                .load(last_committed)
                .map_err(|e| e.context(format!("operator '{id}'")))?;
        }
        Ok(())
    }

    /// The query's sources, by name, in plan order.
    pub fn source_names(&self) -> Vec<String> {
        self.inputs
            .iter()
            .map(|i| i.table.source().name().to_string())
            .collect()
    }

    /// The query's sink, by name.
    pub fn sink_name(&self) -> &str {
        self.sink.name()
    }

    /// The query's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The query's id (fixed for the life of its checkpoint).
    pub fn id(&self) -> &str {
        &self.checkpoint.metadata().query_id
    }

    /// The shared list of recent progress records.
    pub fn progress_handle(&self) -> Arc<Mutex<ProgressLog>> {
        Arc::clone(&self.progress)
    }

    /// The configuration.
    pub fn config(&self) -> &QueryConfig {
        &self.config
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The output schema.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Batches run since this start.
    pub fn batches_run(&self) -> u64 {
        self.batches_run
    }

    /// Runs one micro-batch: the uncommitted batch first after a restart,
    /// otherwise a new one if any source has new data. Returns its progress,
    /// or `None` when there was nothing to do.
    pub async fn run_batch(&mut self) -> Result<Option<Progress>> {
        let started = Instant::now();
        let start_ms = self.clock.now_millis();
        let mut durations = BTreeMap::new();
        let (entry, recovered, mut offset_write) = match self.pending.take() {
            Some(e) => {
                // What a re-run leaves behind was not measured.
                for input in &mut self.inputs {
                    input.backlog = None;
                }
                (e, true, None)
            }
            None => {
                let t = Instant::now();
                let Some(entry) = self.plan_offsets(start_ms).await? else {
                    return Ok(None);
                };
                durations.insert("offsets".to_string(), ms(t.elapsed()));
                // The entry is synced while the batch runs; the batch waits
                // for it before its output leaves the engine.
                let w = self.checkpoint.start_write_offsets(&entry)?;
                // No attempt of this batch has reached a sink before.
                self.sink.planned(entry.batch_id);
                for ls in &self.late_sinks {
                    ls.sink.planned(entry.batch_id);
                }
                for input in &self.inputs {
                    if let Some(dl) = &input.dead_letter {
                        dl.planned(entry.batch_id);
                    }
                }
                (entry, false, Some(w))
            }
        };
        let id = entry.batch_id;
        // From here until its commit record is written, the batch is planned:
        // any failure leaves it to be re-run with exactly these offsets
        // (unless the plan record itself failed: then it is planned again).
        self.pending = Some(entry.clone());
        if self
            .config
            .fault
            .is_some_and(|f| f.point == FaultPoint::AfterOffsets && f.batch_id == id)
        {
            self.wait_offsets(&mut offset_write, &mut durations)?;
        }
        self.inject(FaultPoint::AfterOffsets, id)?;
        let mut attempt = 0;
        let outcome = loop {
            match self
                .execute(&entry, &mut durations, &mut offset_write)
                .await
            {
                Ok(o) => break o,
                Err(e)
                    if e.is_transient()
                        && attempt < self.config.max_batch_retries
                        && self.pending.is_some() =>
                {
                    attempt += 1;
                    let delay = self.config.retry_backoff * 2u32.saturating_pow(attempt - 1);
                    let until = self.clock.now_millis() + delay.as_millis() as i64;
                    self.clock.wait_until(until).await;
                }
                Err(e) => {
                    for input in &self.inputs {
                        input.table.clear_batch();
                    }
                    // Never leave the plan record being written: the next
                    // attempt must know whether it is there.
                    let _ = self.wait_offsets(&mut offset_write, &mut durations);
                    return Err(e.context(format!("query '{}', batch {id}", self.config.name)));
                }
            }
        };
        self.pending = None;
        for input in &mut self.inputs {
            if let Some(r) = entry.sources.get(input.table.source().name()) {
                input.committed = r.end.clone();
            }
        }
        self.next_batch = id + 1;
        self.batches_run += 1;
        durations.insert("total".to_string(), ms(started.elapsed()));
        // From the oldest record's arrival (or, where no source says, from
        // when the batch was planned) to the commit, on the trigger clock.
        let latency_ms = (outcome.input_rows > 0).then(|| {
            let from = outcome.available_ms.unwrap_or(entry.timestamp_ms);
            (self.clock.now_millis() - from).max(0) as f64
        });
        let total_s = started.elapsed().as_secs_f64().max(1e-9);
        let since_last_s = self
            .last_start_ms
            .map(|l| ((start_ms - l) as f64 / 1000.0).max(1e-3))
            .unwrap_or(total_s);
        self.last_start_ms = Some(start_ms);
        // Batches cannot keep up: one took longer than the trigger
        // interval, or the backlog grew batch after batch.
        let overran = match self.config.trigger {
            Trigger::ProcessingTime(iv) => !iv.is_zero() && started.elapsed() > iv,
            _ => false,
        };
        let falling_behind = self.backlog_grows(&outcome.sources) || overran;
        let progress = Progress {
            name: self.config.name.clone(),
            query_id: self.id().to_string(),
            batch_id: id,
            timestamp_ms: start_ms,
            input_rows: outcome.input_rows,
            output_rows: outcome.output_rows,
            input_rows_per_second: outcome.input_rows as f64 / since_last_s,
            processed_rows_per_second: outcome.input_rows as f64 / total_s,
            durations_ms: durations,
            sources: outcome.sources,
            watermark_ms: entry.watermark_ms,
            retries: attempt,
            falling_behind,
            late_rows: outcome.late_rows,
            operators: outcome.operators,
            latency_ms,
            recovered,
            warnings: self.take_warnings().await,
        };
        // Informational: a failure to record progress never fails a committed batch.
        let _ = self.checkpoint.append_progress(&progress);
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(progress.clone());
        self.inject(FaultPoint::AfterCommit, id)?;
        Ok(Some(progress))
    }

    /// Whether the backlog grew batch after batch over the last
    /// [`BACKLOG_GROWTH_BATCHES`] new batches (re-runs and sources that
    /// cannot tell break the run).
    fn backlog_grows(&mut self, sources: &[SourceProgress]) -> bool {
        let total: Option<u64> = sources.iter().map(|s| s.backlog).sum();
        match total {
            Some(t) => {
                if self.backlogs.len() == BACKLOG_GROWTH_BATCHES + 1 {
                    self.backlogs.pop_front();
                }
                self.backlogs.push_back(t);
            }
            None => self.backlogs.clear(),
        }
        self.backlogs.len() == BACKLOG_GROWTH_BATCHES + 1
            && self
                .backlogs
                .iter()
                .zip(self.backlogs.iter().skip(1))
                .all(|(a, b)| b > a)
    }

    /// Asks every source how far it reaches; `None` if nothing moved.
    async fn plan_offsets(&mut self, now_ms: i64) -> Result<Option<OffsetEntry>> {
        let mut sources = BTreeMap::new();
        let mut moved = false;
        for input in &mut self.inputs {
            let name = input.table.source().name().to_string();
            let end = input
                .reader
                .latest_offset(&input.committed)
                .await
                .map_err(|e| e.context(format!("source '{name}'")))?;
            let end = match self.config.split_seed {
                Some(seed) if end != input.committed => input.reader.split_offset(
                    &input.committed,
                    &end,
                    split_draw(seed, self.next_batch, &name),
                ),
                _ => end,
            };
            moved |= end != input.committed;
            // Informational: a source that cannot say never fails a batch.
            input.backlog = input.reader.backlog(&end).await.ok().flatten();
            sources.insert(
                name,
                SourceRange {
                    start: input.committed.clone(),
                    end,
                },
            );
        }
        if !moved {
            return Ok(None);
        }
        Ok(Some(OffsetEntry {
            batch_id: self.next_batch,
            timestamp_ms: now_ms,
            sources,
            watermark_ms: self.watermark_ms,
            config: BTreeMap::from([(
                "output_mode".to_string(),
                self.config.output_mode.to_string(),
            )]),
        }))
    }

    /// Waits for the batch's plan record to be durable; if it could not be
    /// written, the batch is not planned any more (its next attempt plans
    /// and logs it again).
    fn wait_offsets(
        &mut self,
        write: &mut Option<OffsetWrite>,
        durations: &mut BTreeMap<String, f64>,
    ) -> Result<()> {
        if let Some(w) = write.take() {
            match w.wait() {
                Ok(d) => {
                    durations.insert("offset_log".to_string(), ms(d));
                }
                Err(e) => {
                    self.pending = None;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Writes batch `id`'s rows to the sink, then the late rows to the
    /// late-rows sinks and the dead letters to theirs, once the batch's
    /// plan record is durable.
    #[allow(clippy::too_many_arguments)]
    async fn write_sinks(
        &mut self,
        id: BatchId,
        entry: &OffsetEntry,
        output: Vec<RecordBatch>,
        late: Vec<(String, usize, RecordBatch)>,
        dead: Vec<(Arc<dyn Sink>, Vec<DeadLetter>)>,
        offset_write: &mut Option<OffsetWrite>,
        durations: &mut BTreeMap<String, f64>,
    ) -> Result<()> {
        // Nothing of the batch leaves the engine before its offsets are
        // durable: a re-run must read exactly what the sink saw.
        self.wait_offsets(offset_write, durations)?;
        let t = Instant::now();
        self.sink.write(id, &self.output_schema, output).await?;
        // One write per stream's late-rows sink, every batch (empty too):
        // keyed by batch id like any sink, so the rows of every operator
        // input reading that stream (both sides of a self-join) go in that
        // one write. The stream's name and the batch's offset range say
        // where the rows came from.
        let mut written: Vec<usize> = Vec::new();
        for first in &self.late_sinks {
            if written.contains(&first.source) {
                continue;
            }
            written.push(first.source);
            let input = &self.inputs[first.source];
            let name = input.table.source().name();
            let query = self.config.name.as_str();
            let range = entry
                .sources
                .get(name)
                .map(|r| format!("[{}, {})", r.start, r.end))
                .unwrap_or_default();
            let mut rows = Vec::new();
            for ls in self.late_sinks.iter().filter(|l| l.source == first.source) {
                let schema = late_schema(&ls.schema);
                for (_, _, b) in late
                    .iter()
                    .filter(|(op, k, _)| *op == ls.operator && *k == ls.input)
                {
                    let n = b.num_rows();
                    let mut cols = b.columns().to_vec();
                    cols.push(Arc::new(StringArray::from(vec![name; n])));
                    cols.push(Arc::new(StringArray::from(vec![query; n])));
                    cols.push(Arc::new(datafusion::arrow::array::UInt64Array::from(
                        vec![id; n],
                    )));
                    cols.push(Arc::new(StringArray::from(vec![range.as_str(); n])));
                    rows.push(RecordBatch::try_new(Arc::clone(&schema), cols)?);
                }
            }
            first
                .sink
                .write(id, &late_schema(&first.schema), rows)
                .await?;
        }
        for (sink, letters) in dead {
            let batches = if letters.is_empty() {
                vec![]
            } else {
                vec![dead_letter_batch(&letters)?]
            };
            sink.write(id, &dead_letter_schema(), batches).await?;
        }
        durations.insert("sink".to_string(), ms(t.elapsed()));
        Ok(())
    }

    /// The progress of each operator whose state was committed.
    fn state_progress(
        &self,
        committed: Vec<CommittedState>,
        watermark: Option<i64>,
    ) -> Vec<StateProgress> {
        committed
            .into_iter()
            .map(|c| StateProgress {
                watermark_ms: watermark.map(|w| w.saturating_sub(self.runtime.delay(&c.id))),
                operator: c.description,
                id: c.id,
                rows: c.stats.rows,
                updated: c.stats.updated,
                removed: c.stats.removed,
                memory_bytes: c.memory_bytes,
                bytes_written: c.stats.bytes_written,
            })
            .collect()
    }

    async fn execute(
        &mut self,
        entry: &OffsetEntry,
        durations: &mut BTreeMap<String, f64>,
        offset_write: &mut Option<OffsetWrite>,
    ) -> Result<Outcome> {
        let id = entry.batch_id;
        let t = Instant::now();
        let mut sources = Vec::new();
        let mut input_rows = 0;
        let mut event_max = self.event_time_max_ms.clone();
        let mut last_data = self.last_data_ms.clone();
        let mut dead: Vec<(Arc<dyn Sink>, Vec<DeadLetter>)> = Vec::new();
        let mut available_ms = None;
        // Each source's range: read here, or (a runner that reads sources,
        // a source that can be read elsewhere) only described.
        let runner = self.config.runner.clone().filter(|_| self.remote_reads);
        let mut reads: Vec<Option<ReadBatch>> = Vec::with_capacity(self.inputs.len());
        let mut remote: Vec<(usize, RemoteRange)> = Vec::new();
        for (i, input) in self.inputs.iter_mut().enumerate() {
            let name = input.table.source().name().to_string();
            let range = entry.sources.get(&name).ok_or_else(|| {
                Error::checkpoint(
                    self.checkpoint.root(),
                    format!("the plan of batch {id} has no range for source '{name}'"),
                )
            })?;
            let described = match &runner {
                Some(_) => input.reader.remote_read(&range.start, &range.end)?,
                None => None,
            };
            match described {
                Some(read) => {
                    remote.push((
                        i,
                        RemoteRange {
                            name,
                            read,
                            schema: input.table.source().schema(),
                            watermark: input.table.watermark().map(|w| w.column.clone()),
                        },
                    ));
                    reads.push(None);
                }
                None => reads.push(Some(input.reader.read(&range.start, &range.end).await?)),
            }
        }
        // What the sources read elsewhere hold, counted where they are read.
        let mut counted = match (&runner, remote.is_empty()) {
            (Some(r), false) => {
                let ranges: Vec<RemoteRange> = remote.iter().map(|(_, r)| r.clone()).collect();
                r.count_reads(&ranges, Arc::clone(&self.task_ctx))
                    .await
                    .map_err(|e| e.context(r.describe()))?
            }
            _ => BTreeMap::new(),
        };
        for (input, read) in self.inputs.iter_mut().zip(reads) {
            let name = input.table.source().name().to_string();
            let range = &entry.sources[&name];
            let (batches, stats) = match read {
                Some(read) => {
                    let stats = SourceStats {
                        rows: read.batches.iter().map(|b| b.num_rows() as u64).sum(),
                        max_event_ms: match input.table.watermark() {
                            Some(wm) => max_event_time(&read.batches, &wm.column)?,
                            None => None,
                        },
                        dropped: read.dropped,
                        dead_letters: read.dead_letters,
                        available_ms: read.available_ms,
                    };
                    (Some(read.batches), stats)
                }
                None => (None, counted.remove(&name).unwrap_or_default()),
            };
            let rows = stats.rows;
            // For idleness, a watermarked source has data when it brings an
            // event time (rows with a NULL time cannot move its watermark).
            let mut had_data = rows > 0;
            if input.table.watermark().is_some() {
                let seen = stats.max_event_ms;
                had_data = seen.is_some();
                if let Some(m) = seen {
                    let e = event_max.entry(name.clone()).or_insert(m);
                    *e = (*e).max(m);
                }
            }
            input_rows += rows;
            if had_data {
                last_data.insert(name.clone(), entry.timestamp_ms);
            }
            sources.push(SourceProgress {
                name: name.clone(),
                start_offset: range.start.clone(),
                end_offset: range.end.clone(),
                input_rows: rows,
                dropped_rows: stats.dropped,
                dead_letter_rows: stats.dead_letters.len() as u64,
                backlog: input.backlog,
                backlog_unit: input
                    .backlog
                    .map(|_| input.reader.backlog_unit().to_string()),
            });
            if rows > 0
                && let Some(a) = stats.available_ms
            {
                available_ms = Some(available_ms.map_or(a, |m: i64| m.min(a)));
            }
            if let Some(dl) = &input.dead_letter {
                dead.push((Arc::clone(dl), stats.dead_letters));
            } else if !stats.dead_letters.is_empty() {
                return Err(Error::internal(format!(
                    "source '{name}' produced dead letters but has no dead-letter sink"
                )));
            }
            if let Some(batches) = batches {
                input.table.set_batch(batches);
            }
        }
        durations.insert("read".to_string(), ms(t.elapsed()));

        // Windows close against the watermark at the end of the batch.
        let watermark = self.watermark_after(&event_max, &last_data, entry.timestamp_ms);
        let t = Instant::now();
        let result = self.run_plan(entry, watermark, input_rows, &remote).await;
        for input in &self.inputs {
            input.table.clear_batch();
        }
        let (output, ran_elsewhere) = result?;
        let output_rows: u64 = output.iter().map(|b| b.num_rows() as u64).sum();
        // What the stateful operators did: late rows, and the time of their steps.
        let mut late_rows = 0;
        // (operator id, input index, rows): routed to the late-rows sinks
        // of the operators that read streams directly.
        let mut late: Vec<(String, usize, RecordBatch)> = Vec::new();
        for (id, _) in &self.operators {
            let Some(state) = self.runtime.states().get(id) else {
                continue;
            };
            let report = std::mem::take(&mut state.lock().await.report);
            late_rows += report.late_rows;
            late.extend(report.late.into_iter().map(|(k, b)| (id.clone(), k, b)));
            for (step, ms) in report.steps {
                durations.insert(format!("{}_{step}", id.replace('-', "_")), ms);
            }
        }
        // Operators a runner ran (and committed) elsewhere: reported the
        // same way, their state figures as their commits gave them.
        let mut committed_elsewhere = Vec::with_capacity(ran_elsewhere.len());
        for run in ran_elsewhere {
            late_rows += run.report.late_rows;
            late.extend(
                run.report
                    .late
                    .into_iter()
                    .map(|(k, b)| (run.id.clone(), k, b)),
            );
            for (step, ms) in run.report.steps {
                durations.insert(format!("{}_{step}", run.id.replace('-', "_")), ms);
            }
            committed_elsewhere.push(CommittedState {
                id: run.id,
                description: run.description,
                stats: run.stats,
                memory_bytes: run.memory_bytes,
            });
        }
        durations.insert("execute".to_string(), ms(t.elapsed()));
        // The state commit. Fsynced, it runs on a thread of its own beside
        // the sink, which stages its write (nothing is visible before the
        // offsets are durable, and a crash before the commit record re-runs
        // the batch from version N-1 whatever either has written); the
        // commit record waits for both. An armed `after-state` fault keeps
        // the two apart so that it fires with nothing written to the sink.
        let jobs: Vec<(String, String, Arc<tokio::sync::Mutex<OperatorState>>)> = self
            .operators
            .iter()
            .filter_map(|(op, d)| {
                let state = self.runtime.states().get(op)?;
                Some((op.clone(), d.clone(), Arc::clone(state)))
            })
            .collect();
        let fault_after_state = self
            .config
            .fault
            .is_some_and(|f| f.point == FaultPoint::AfterState && f.batch_id == id);
        let beside_sink =
            !jobs.is_empty() && self.config.durability == Durability::Fsync && !fault_after_state;
        let mut pending_state = None;
        let mut operators = self.state_progress(committed_elsewhere, watermark);
        if beside_sink {
            let (done, finished) = std::sync::mpsc::sync_channel::<()>(1);
            let task = tokio::task::spawn_blocking(move || {
                let committed = commit_states(jobs, id);
                drop(done);
                committed
            });
            pending_state = Some((task, CommitGuard(finished)));
        } else if !jobs.is_empty() {
            let t = Instant::now();
            let mut committed = Vec::with_capacity(jobs.len());
            for (op, description, state) in jobs {
                committed.push(commit_state(op, description, &mut *state.lock().await, id)?);
            }
            durations.insert("state_commit".to_string(), ms(t.elapsed()));
            operators = self.state_progress(committed, watermark);
            self.inject(FaultPoint::AfterState, id)?;
        }
        let sunk = self
            .write_sinks(id, entry, output, late, dead, offset_write, durations)
            .await;
        if let Some((task, _guard)) = pending_state {
            let (committed, took) = task
                .await
                .map_err(|e| Error::internal(format!("the state commit panicked: {e}")))??;
            durations.insert("state_commit".to_string(), ms(took));
            operators = self.state_progress(committed, watermark);
        }
        sunk?;
        self.inject(FaultPoint::AfterSink, id)?;

        let t = Instant::now();
        let written = self.checkpoint.write_commit(&CommitEntry {
            batch_id: id,
            committed_ms: self.clock.now_millis(),
            output_rows,
            watermark_ms: watermark,
            event_time_max_ms: event_max.clone(),
            last_data_ms: last_data.clone(),
        });
        // A failed append leaves no record (the log cuts it back), so the
        // batch may be retried; one that could not be cut back is a
        // checkpoint error, never retried: the query stops and a restart
        // reads the log to learn whether the batch committed.
        written?;
        durations.insert("commit_log".to_string(), ms(t.elapsed()));
        self.event_time_max_ms = event_max;
        self.last_data_ms = last_data;
        self.watermark_ms = watermark;
        Ok(Outcome {
            input_rows,
            available_ms,
            output_rows,
            late_rows,
            operators,
            sources,
        })
    }

    /// The query watermark: per source `max event time - delay`, the minimum
    /// over sources with a watermark, never decreasing. A source idle for its
    /// `idle_timeout` (no rows by the time `now_ms`) stops holding it back; a
    /// source that has seen no data yet and is not idle holds it where it is.
    fn watermark_after(
        &self,
        event_max: &BTreeMap<String, i64>,
        last_data: &BTreeMap<String, i64>,
        now_ms: i64,
    ) -> Option<i64> {
        let mut query: Option<i64> = None;
        for input in &self.inputs {
            let Some(wm) = input.table.watermark() else {
                continue;
            };
            let name = input.table.source().name();
            let since = last_data.get(name).copied().unwrap_or(self.started_ms);
            if wm
                .idle_timeout
                .is_some_and(|t| now_ms - since > t.as_millis() as i64)
            {
                continue;
            }
            let Some(m) = event_max.get(name) else {
                return self.watermark_ms;
            };
            let w = m - wm.delay.as_millis() as i64;
            query = Some(query.map_or(w, |q| q.min(w)));
        }
        match (query, self.watermark_ms) {
            (Some(q), Some(old)) => Some(q.max(old)),
            (q, old) => q.or(old),
        }
    }

    /// Fires the armed fault if it is for this step of this batch; it fires
    /// once, so the re-run after it goes through.
    fn inject(&mut self, point: FaultPoint, id: BatchId) -> Result<()> {
        match self.config.fault {
            Some(f) if f.point == point && f.batch_id == id => {
                self.config.fault = None;
                f.fire()
            }
            _ => Ok(()),
        }
    }

    /// What turns the query's (first aggregate's) stored states into
    /// values, if it keeps state.
    pub fn state_finalizer(&self) -> Option<StateFinalizer> {
        self.finalizer.clone()
    }

    /// When the topmost stateful operator is an aggregate: its key columns,
    /// which identify a row of the result (an update-mode sink's upsert key).
    pub fn result_keys(&self) -> Option<Vec<String>> {
        self.result_keys.clone()
    }

    /// What opening the checkpoint and loading state had to work around
    /// since the last batch.
    async fn take_warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self.checkpoint.take_repaired().into_iter().collect();
        for state in self.runtime.states().values() {
            out.extend(state.lock().await.store.take_fallbacks());
        }
        out
    }

    /// Runs the plan over the rows in the stream slots, as batch
    /// `entry.batch_id`: every operator's state is first made exactly the
    /// state before the batch, then the nodes run with the batch's context.
    async fn run_plan(
        &self,
        entry: &OffsetEntry,
        watermark: Option<i64>,
        input_rows: u64,
        remote: &[(usize, RemoteRange)],
    ) -> Result<(Vec<RecordBatch>, Vec<crate::runner::OperatorRun>)> {
        let id = entry.batch_id;
        for (op, state) in self.runtime.states() {
            state
                .lock()
                .await
                .prepare(id)
                .map_err(|e| e.context(format!("operator '{op}'")))?;
        }
        let batch = BatchContext {
            batch_id: id,
            now_ms: entry.timestamp_ms,
            watermark_start: entry.watermark_ms,
            watermark_end: watermark,
            input_rows,
        };
        self.runtime.set_batch(batch);
        let plan = reset_plan_states(Arc::clone(&self.plan)).map_err(Error::from)?;
        let (rows, ran) = match &self.config.runner {
            Some(runner) => {
                let plan = if remote.is_empty() {
                    plan
                } else {
                    self.reads_in_place(plan, runner.as_ref(), remote)?
                };
                let job = crate::runner::BatchJob {
                    batch,
                    checkpoint: self.config.checkpoint.clone(),
                    durability: self.config.durability,
                    delays: self.delays.clone(),
                };
                let out = runner
                    .run(plan, Arc::clone(&self.task_ctx), &job)
                    .await
                    .map_err(|e| e.context(runner.describe()))?;
                (out.rows, out.operators)
            }
            None => (
                collect(plan, Arc::clone(&self.task_ctx))
                    .await
                    .map_err(Error::from)?,
                vec![],
            ),
        };
        if self.operators.is_empty() && self.config.output_mode == OutputMode::Changelog {
            let rows = rows
                .into_iter()
                .map(|b| inserts(&self.output_schema, b))
                .collect::<Result<_>>()?;
            return Ok((rows, ran));
        }
        Ok((rows, ran))
    }

    /// `plan` with the scan of each source in `remote` replaced by the
    /// runner's node that reads its range where the plan runs, with the
    /// scan's projection, gathered into one partition as the scan was.
    fn reads_in_place(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        runner: &dyn crate::runner::PlanRunner,
        remote: &[(usize, RemoteRange)],
    ) -> Result<Arc<dyn ExecutionPlan>> {
        use datafusion::common::tree_node::Transformed;
        use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
        use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
        use datafusion::physical_plan::streaming::StreamingTableExec;
        let replaced = plan.transform_up(|p| {
            let any: &dyn std::any::Any = p.as_ref();
            let Some(scan) = any.downcast_ref::<StreamingTableExec>() else {
                return Ok(Transformed::no(p));
            };
            let Some((_, range)) = remote
                .iter()
                .find(|(i, _)| self.inputs[*i].table.is_scan_of(p.as_ref()))
            else {
                return Ok(Transformed::no(p));
            };
            let mut node = runner.read_node(range)?;
            if datafusion::physical_plan::ExecutionPlanProperties::output_partitioning(&node)
                .partition_count()
                > 1
            {
                node = Arc::new(CoalescePartitionsExec::new(node));
            }
            if let Some(columns) = scan.projection() {
                let schema = node.schema();
                let exprs = columns
                    .iter()
                    .map(|&c| {
                        let field = schema.field(c);
                        ProjectionExpr::new(
                            Arc::new(datafusion::physical_expr::expressions::Column::new(
                                field.name(),
                                c,
                            ))
                                as Arc<dyn datafusion::physical_expr::PhysicalExpr>,
                            field.name().clone(),
                        )
                    })
                    .collect::<Vec<_>>();
                node = Arc::new(ProjectionExec::try_new(exprs, node)?);
            }
            Ok(Transformed::yes(node))
        });
        Ok(replaced.map_err(Error::from)?.data)
    }

    /// Arms (or clears) a fault at a step of the commit protocol.
    pub fn set_fault(&mut self, fault: Option<Fault>) {
        self.config.fault = fault;
    }

    /// The checkpoint directory.
    pub fn checkpoint_dir(&self) -> &std::path::Path {
        self.checkpoint.root()
    }

    /// Whether this start has run its `max_batches`.
    pub fn reached_max_batches(&self) -> bool {
        self.config
            .max_batches
            .is_some_and(|m| self.batches_run >= m)
    }
}

struct Outcome {
    input_rows: u64,
    /// When the oldest record read became available, where a source said.
    available_ms: Option<i64>,
    output_rows: u64,
    late_rows: u64,
    operators: Vec<StateProgress>,
    sources: Vec<SourceProgress>,
}

/// Held while a state commit runs on a blocking thread: dropped (the batch's
/// future cancelled, or the commit awaited), it waits for the commit to
/// end, so that no commit outlives its batch and races a re-run of it.
struct CommitGuard(std::sync::mpsc::Receiver<()>);

impl Drop for CommitGuard {
    fn drop(&mut self) {
        // The sender goes when the commit ends, panicking or not.
        let _ = self.0.recv();
    }
}

/// One operator's committed state version, for its progress.
struct CommittedState {
    id: String,
    description: String,
    stats: sluice_state::store::CommitStats,
    memory_bytes: u64,
}

/// Commits version `id` of each operator's state (`(id, description,
/// state)`), bottom up; returns what each commit did and how long they took.
fn commit_states(
    jobs: Vec<(String, String, Arc<tokio::sync::Mutex<OperatorState>>)>,
    id: BatchId,
) -> Result<(Vec<CommittedState>, Duration)> {
    let t = Instant::now();
    let mut out = Vec::with_capacity(jobs.len());
    for (op, description, state) in jobs {
        out.push(commit_state(
            op,
            description,
            &mut state.blocking_lock(),
            id,
        )?);
    }
    Ok((out, t.elapsed()))
}

/// Commits version `id` of operator `op`'s state.
fn commit_state(
    op: String,
    description: String,
    state: &mut OperatorState,
    id: BatchId,
) -> Result<CommittedState> {
    let stats = state
        .commit(id)
        .map_err(|e| e.context(format!("operator '{op}'")))?;
    Ok(CommittedState {
        id: op,
        description,
        stats,
        memory_bytes: state.store.memory_bytes() as u64,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Where the late rows that reach a stateful operator by one of its inputs
/// go, when that input reads a stream directly: the late-rows sink of the
/// one stream it reads.
#[derive(Debug)]
struct LateSink {
    /// The operator's id.
    operator: String,
    /// Which input of the operator ([`OperatorReport::late`] numbers them).
    input: usize,
    /// The stream, as an index into the query's inputs.
    source: usize,
    sink: Arc<dyn Sink>,
    /// The schema of the rows that reach the operator by that input.
    schema: SchemaRef,
}

/// The schema of late rows: as they reached the aggregate, then the source,
/// the query, the batch and the batch's offset range for that source.
fn late_schema(input: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new("_source", DataType::Utf8, false)));
    fields.push(Arc::new(Field::new("_query", DataType::Utf8, false)));
    fields.push(Arc::new(Field::new("_batch_id", DataType::UInt64, false)));
    fields.push(Arc::new(Field::new("_offsets", DataType::Utf8, false)));
    Arc::new(Schema::new(fields))
}

/// A deterministic draw from (seed, batch, source), for random splits.
fn split_draw(seed: u64, batch: BatchId, source: &str) -> u64 {
    let mut h = seed ^ batch.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in source.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// A stateless query's rows as changelog inserts: `_op = '+I'` first.
fn inserts(schema: &SchemaRef, batch: RecordBatch) -> Result<RecordBatch> {
    let mut cols: Vec<Arc<dyn Array>> =
        vec![Arc::new(StringArray::from(vec!["+I"; batch.num_rows()]))];
    cols.extend(batch.columns().iter().cloned());
    Ok(RecordBatch::try_new(Arc::clone(schema), cols)?)
}

/// The largest value of timestamp column `column` over `batches`, in ms.
pub fn max_event_time(batches: &[RecordBatch], column: &str) -> Result<Option<i64>> {
    let mut out: Option<i64> = None;
    for b in batches {
        let Some(col) = b.column_by_name(column) else {
            continue;
        };
        let col = cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
        if let Some(m) = max(col.as_primitive::<TimestampMillisecondType>()) {
            out = Some(out.map_or(m, |o| o.max(m)));
        }
    }
    Ok(out)
}

/// The file that marks an operator's state directory as a cluster's: its
/// state split into partition directories `p<k>` (see `sluice-cluster`).
pub const CLUSTER_STATE_MARK: &str = "partitions";

/// Refuses to run an operator's state in a layout other than the one its
/// directory was written in: partition directories (`cluster`, marked by
/// [`CLUSTER_STATE_MARK`]) or one store.
fn check_state_layout(
    plan: &Arc<dyn ExecutionPlan>,
    checkpoint: &std::path::Path,
    cluster: bool,
) -> Result<()> {
    for node in stateful_nodes(plan) {
        let dir = checkpoint.join("state").join(node.operator_id());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let marked = names.iter().any(|n| n == CLUSTER_STATE_MARK);
        let single = names
            .iter()
            .any(|n| n.ends_with(".delta") || n.ends_with(".snapshot"));
        if cluster && single && !marked {
            return Err(Error::not_supported(format!(
                "the state of operator '{}' in {} was written by a run in one process; a cluster keeps state in partitions of its own: run this checkpoint without --cluster, or start a new checkpoint",
                node.operator_id(),
                dir.display()
            )));
        }
        if !cluster && marked {
            return Err(Error::not_supported(format!(
                "the state of operator '{}' in {} was written by a run on a cluster, in partitions: run this checkpoint with --cluster, or start a new checkpoint",
                node.operator_id(),
                dir.display()
            )));
        }
    }
    Ok(())
}
