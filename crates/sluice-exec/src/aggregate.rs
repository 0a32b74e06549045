//! The stateful grouped aggregate of a streaming query.
//!
//! DataFusion plans the whole query once; this module cuts its physical plan
//! at the aggregate into three parts and runs them per micro-batch:
//!
//! ```text
//!  upper plan (projection, HAVING)      <- reads the emitted rows
//!        |
//!  Final        (state -> values)       <- emitted keys' states
//!  PartialReduce(state + state -> state) <- stored states of the batch's keys + the batch's partial states
//!  Partial      (rows -> state)         <- the batch's on-time rows
//!        |
//!  input plan (scan, filter, join, window columns)
//! ```
//!
//! The merged states go to the [`StateStore`], keyed by the group key
//! (window included). So any aggregate whose accumulator can export and
//! merge its state — count, sum, avg, min, max, count(DISTINCT), approx_*,
//! stddev, ... — runs incrementally, using DataFusion's own accumulators.
//!
//! Output modes: `update` emits the keys this batch changed; `changelog`
//! emits them as `-U` old value / `+U` new value (`+I` for a new key);
//! `complete` emits every key; `append` emits a window once the watermark
//! passes its end, then evicts it. With a window and a watermark, rows whose window had
//! closed at the start of the batch are late: not aggregated, counted
//! (except in complete mode, which never closes a window).

use std::path::PathBuf;
use std::sync::Arc;

use std::collections::{HashMap, HashSet};

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, UInt32Array,
};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch};
use datafusion::arrow::compute::{interleave, take_record_batch};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy};
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::{ExecutionPlan, collect};
use sluice_common::durable::Durability;
use sluice_common::{BatchId, Error, OutputMode, Result};
use sluice_planner::{BatchSlot, WINDOW_END};
use sluice_state::store::{CommitStats, StateStore, StateStoreOptions};

/// A plan fed from a slot.
#[derive(Debug)]
struct Stage {
    slot: Arc<BatchSlot>,
    plan: Arc<dyn ExecutionPlan>,
    /// The same plan over the slot's rows split in parts, run in parallel,
    /// for batches of at least [`PARALLEL_ROWS`] rows.
    wide: Option<Arc<dyn ExecutionPlan>>,
}

/// From how many rows a stage with a `wide` plan runs it.
const PARALLEL_ROWS: usize = 16_384;

impl Stage {
    async fn run(
        &self,
        rows: Vec<RecordBatch>,
        ctx: &Arc<TaskContext>,
    ) -> Result<Vec<RecordBatch>> {
        let n: usize = rows.iter().map(RecordBatch::num_rows).sum();
        self.slot.set(rows);
        let plan = match &self.wide {
            Some(wide) if n >= PARALLEL_ROWS => wide,
            _ => &self.plan,
        };
        let plan = reset_plan_states(Arc::clone(plan)).map_err(Error::from)?;
        let out = collect(plan, Arc::clone(ctx)).await;
        self.slot.set(Vec::new());
        out.map_err(Error::from)
    }
}

/// What one batch of the aggregate produced.
#[derive(Debug, Default)]
pub(crate) struct AggregateOutput {
    /// Rows for the sink (after the plan above the aggregate).
    pub rows: Vec<RecordBatch>,
    /// On-time rows aggregated.
    pub aggregated_rows: u64,
    /// Late rows left out.
    pub late_rows: u64,
    /// The late rows themselves, as they reached the aggregate.
    pub late: Vec<RecordBatch>,
    /// Milliseconds in each step: `input` (the plan below the aggregate and
    /// the late-row filter), `partial`, `state` (lookups, merge, updates,
    /// eviction), `emit` (final values and the plan above).
    pub steps: Vec<(&'static str, f64)>,
}

/// Turns stored aggregate states into aggregate values, outside the query:
/// for `SELECT * FROM state('<query>')`.
#[derive(Debug, Clone)]
pub struct StateFinalizer {
    group_by: PhysicalGroupBy,
    aggr: Vec<Arc<AggregateFunctionExpr>>,
    input_schema: SchemaRef,
    partial_schema: SchemaRef,
    agg_schema: SchemaRef,
    global: bool,
    /// Whether stored rows end with the TTL's last-update column.
    ttl: bool,
}

impl StateFinalizer {
    /// The schema of the values: group keys, then one column per aggregate.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.agg_schema)
    }

    /// How many of [`Self::schema`]'s leading columns are group keys.
    pub fn key_count(&self) -> usize {
        self.group_by.expr().len()
    }

    /// A plan computing the values of `stored` (rows as the state store
    /// holds them: keys, then states).
    pub fn plan(&self, stored: RecordBatch) -> Result<Arc<dyn ExecutionPlan>> {
        let end = stored.num_columns() - usize::from(self.ttl);
        let cols = stored.columns()[usize::from(self.global)..end].to_vec();
        let rows = RecordBatch::try_new(Arc::clone(&self.partial_schema), cols)?;
        let input = MemorySourceConfig::try_new_exec(
            &[vec![rows]],
            Arc::clone(&self.partial_schema),
            None,
        )?;
        Ok(Arc::new(AggregateExec::try_new(
            AggregateMode::Final,
            self.group_by.clone(),
            self.aggr.clone(),
            vec![None; self.aggr.len()],
            input,
            Arc::clone(&self.input_schema),
        )?))
    }
}

/// The stateful aggregate of one query.
#[derive(Debug)]
pub(crate) struct AggregateOperator {
    input: Arc<dyn ExecutionPlan>,
    /// `input` without its round-robin repartitions, for small batches,
    /// where spreading rows over the cores costs more than it saves.
    narrow_input: Option<Arc<dyn ExecutionPlan>>,
    partial: Stage,
    reduce: Stage,
    finalize: Stage,
    upper: Stage,
    agg_schema: SchemaRef,
    partial_schema: SchemaRef,
    /// Group key columns (0: a global aggregate, stored under one constant key).
    n_keys: usize,
    window_end: Option<(usize, Arc<dyn PhysicalExpr>)>,
    /// For session windows: where window_start and window_end are among the keys.
    session: Option<(usize, usize)>,
    /// Keys not updated for this long (ms of trigger clock) are dropped.
    ttl: Option<i64>,
    mode: OutputMode,
    store: StateStore,
    dirty: bool,
    /// Human-readable description for EXPLAIN and errors.
    pub description: String,
    finalizer: StateFinalizer,
}

/// `plan` without the round-robin repartitions over a single partition
/// that DataFusion adds to spread rows over the cores; only for a plan
/// that is one chain (no joins or unions, whose inputs' partition counts
/// must agree), and `None` if there is nothing to remove.
fn narrow(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    use datafusion::physical_plan::repartition::RepartitionExec;
    use datafusion::physical_plan::{ExecutionPlanProperties, Partitioning};
    fn chain(p: &Arc<dyn ExecutionPlan>) -> bool {
        let children = p.children();
        children.len() <= 1 && children.into_iter().all(chain)
    }
    if !chain(plan) {
        return None;
    }
    let mut removed = false;
    let narrow = Arc::clone(plan)
        .transform_up(|node| {
            let any: &dyn std::any::Any = node.as_ref();
            if let Some(r) = any.downcast_ref::<RepartitionExec>()
                && matches!(r.partitioning(), Partitioning::RoundRobinBatch(_))
                && r.input().output_partitioning().partition_count() == 1
            {
                removed = true;
                return Ok(Transformed::yes(Arc::clone(r.input())));
            }
            Ok(Transformed::no(node))
        })
        .ok()?
        .data;
    removed.then_some(narrow)
}

/// How many parts a batch's rows are aggregated in: one per core, at most 4.
fn partial_parts() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

fn is_agg(plan: &Arc<dyn ExecutionPlan>) -> Option<&AggregateExec> {
    let any: &dyn std::any::Any = plan.as_ref();
    any.downcast_ref::<AggregateExec>()
}

/// The first aggregate in `plan`, top down.
fn find_top(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    if is_agg(plan).is_some() {
        return Some(Arc::clone(plan));
    }
    plan.children().into_iter().find_map(find_top)
}

impl AggregateOperator {
    /// Cuts `physical` at its aggregate. `state_dir` holds the state store.
    pub(crate) fn plan(
        physical: &Arc<dyn ExecutionPlan>,
        mode: OutputMode,
        state_dir: PathBuf,
        durability: Durability,
        session: bool,
        ttl: Option<std::time::Duration>,
        snapshot_fallback: bool,
    ) -> Result<Self> {
        let top = find_top(physical).ok_or_else(|| {
            Error::internal("the query has an aggregate but its physical plan has none")
        })?;
        let top_agg = is_agg(&top).expect("found as an aggregate");
        // The aggregate that holds the expressions over raw rows: the Partial
        // under a Final, or a Single on its own.
        let src: Arc<dyn ExecutionPlan> = match top_agg.mode() {
            AggregateMode::Single | AggregateMode::SinglePartitioned => Arc::clone(&top),
            AggregateMode::Final | AggregateMode::FinalPartitioned => {
                let mut node = Arc::clone(top_agg.input());
                loop {
                    if is_agg(&node).is_some() {
                        break node;
                    }
                    let children = node.children();
                    if children.len() != 1 {
                        return Err(Error::internal(format!(
                            "unexpected plan under the final aggregate: {}",
                            node.name()
                        )));
                    }
                    node = Arc::clone(children[0]);
                }
            }
            other => {
                return Err(Error::internal(format!(
                    "unexpected aggregate mode {other:?} at the top"
                )));
            }
        };
        let src_agg = is_agg(&src).expect("found as an aggregate");
        if !matches!(
            src_agg.mode(),
            AggregateMode::Partial | AggregateMode::Single | AggregateMode::SinglePartitioned
        ) {
            return Err(Error::internal(format!(
                "expected a partial aggregate, found {:?}",
                src_agg.mode()
            )));
        }
        if src_agg.group_expr().has_grouping_set() {
            return Err(Error::not_supported("GROUPING SETS over a stream"));
        }
        // Aggregates over static tables may stand below (e.g. a joined
        // subquery): they are re-run with the rest of the input each batch.
        let input = Arc::clone(src_agg.input());
        let input_schema = src_agg.input_schema();
        let group_by = src_agg.group_expr().clone();
        let aggr = src_agg.aggr_expr().to_vec();
        let n = aggr.len();
        let unmergeable = |e: datafusion::error::DataFusionError| {
            Error::not_supported(format!(
                "an aggregate whose state cannot be merged across micro-batches ({}): {e}",
                aggr.iter()
                    .map(|a| a.name().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };

        let slot = BatchSlot::new();
        let partial_over = |scan: Arc<dyn ExecutionPlan>| -> Result<Arc<dyn ExecutionPlan>> {
            Ok(Arc::new(
                AggregateExec::try_new(
                    AggregateMode::Partial,
                    group_by.clone(),
                    aggr.clone(),
                    src_agg.filter_expr().to_vec(),
                    scan,
                    Arc::clone(&input_schema),
                )
                .map_err(unmergeable)?,
            ))
        };
        let partial_plan = partial_over(slot.scan(Arc::clone(&input_schema), None, None)?)?;
        // A big batch's rows are split over the cores: each part is
        // aggregated on its own, and PartialReduce merges the parts with the
        // stored states anyway. Session windows stay whole, as merging
        // sessions needs each key's rows together.
        let wide = match partial_parts() {
            n if n > 1 && !session => Some(partial_over(
                slot.scan_partitioned(Arc::clone(&input_schema), n)?,
            )?),
            _ => None,
        };
        let partial_schema = partial_plan.schema();
        let partial = Stage {
            slot,
            plan: partial_plan,
            wide,
        };
        let stage = |mode: AggregateMode| -> Result<Stage> {
            let slot = BatchSlot::new();
            let plan = AggregateExec::try_new(
                mode,
                group_by.as_final(),
                aggr.clone(),
                vec![None; n],
                slot.scan(Arc::clone(&partial_schema), None, None)?,
                Arc::clone(&input_schema),
            )
            .map_err(unmergeable)?;
            Ok(Stage {
                slot,
                plan: Arc::new(plan),
                wide: None,
            })
        };
        let reduce = stage(AggregateMode::PartialReduce)?;
        let finalize = stage(AggregateMode::Final)?;

        let agg_schema = top.schema();
        let upper_slot = BatchSlot::new();
        let leaf = upper_slot.scan(Arc::clone(&agg_schema), None, None)?;
        let upper_plan: Arc<dyn ExecutionPlan> = Arc::clone(physical)
            .transform_down(|node| {
                if std::ptr::addr_eq(Arc::as_ptr(&node), Arc::as_ptr(&top)) {
                    Ok(Transformed::yes(Arc::clone(&leaf)))
                } else {
                    Ok(Transformed::no(node))
                }
            })
            .map_err(Error::from)?
            .data;

        if mode == OutputMode::Changelog {
            // Old and new values go through the plan above separately and are
            // paired by position: only a projection keeps them aligned.
            let mut node = Arc::clone(&upper_plan);
            while !std::ptr::addr_eq(Arc::as_ptr(&node), Arc::as_ptr(&leaf)) {
                if node.name() != "ProjectionExec" || node.children().len() != 1 {
                    return Err(Error::not_supported(format!(
                        "output mode changelog with {} above the aggregate (e.g. HAVING); use update mode, or filter downstream",
                        node.name()
                    )));
                }
                node = Arc::clone(node.children()[0]);
            }
        }
        let n_keys = group_by.expr().len();
        let key_at = |name: &str| group_by.expr().iter().position(|(_, n)| n == name);
        let session = match (session, key_at("window_start"), key_at(WINDOW_END)) {
            (false, _, _) => None,
            (true, Some(s), Some(e)) => Some((s, e)),
            (true, _, _) => {
                return Err(Error::plan(
                    "a session window's aggregate must GROUP BY both window_start and window_end",
                ));
            }
        };
        let window_end = group_by
            .expr()
            .iter()
            .position(|(_, name)| name == WINDOW_END)
            .map(|i| (i, Arc::clone(&group_by.expr()[i].0)));
        let fields = partial_schema.fields();
        let key_schema: SchemaRef = if n_keys == 0 {
            Arc::new(Schema::new(vec![Field::new(
                "__all",
                DataType::Boolean,
                false,
            )]))
        } else {
            Arc::new(Schema::new(fields[..n_keys].to_vec()))
        };
        let mut values: Vec<_> = fields[n_keys..].to_vec();
        if ttl.is_some() {
            // When each key was last updated (trigger clock, ms), for the TTL.
            values.push(Arc::new(Field::new(UPDATED, DataType::Int64, false)));
        }
        let value_schema = Arc::new(Schema::new(values));
        let options = StateStoreOptions {
            durability,
            snapshot_fallback,
            ..StateStoreOptions::default()
        };
        let store = StateStore::new(Some(state_dir), key_schema, value_schema, options)?;
        let description = format!(
            "aggregate {} GROUP BY [{}]",
            aggr.iter()
                .map(|a| a.name().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            group_by
                .expr()
                .iter()
                .map(|(_, n)| n.clone())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let finalizer = StateFinalizer {
            group_by: group_by.as_final(),
            aggr: aggr.clone(),
            input_schema: Arc::clone(&input_schema),
            partial_schema: Arc::clone(&partial_schema),
            agg_schema: Arc::clone(&agg_schema),
            global: n_keys == 0,
            ttl: ttl.is_some(),
        };
        Ok(AggregateOperator {
            finalizer,
            narrow_input: narrow(&input),
            input,
            partial,
            reduce,
            finalize,
            upper: Stage {
                slot: upper_slot,
                plan: upper_plan,
                wide: None,
            },
            agg_schema,
            partial_schema,
            n_keys,
            window_end,
            session,
            ttl: ttl.map(|d| d.as_millis() as i64),
            mode,
            store,
            dirty: false,
            description,
        })
    }

    /// What loading state had to work around since the last call.
    pub(crate) fn take_warnings(&mut self) -> Vec<String> {
        self.store.take_fallbacks()
    }

    /// Whether rows can be late: the aggregate groups by a window end.
    pub fn has_late_rows(&self) -> bool {
        self.window_end.is_some()
    }

    /// The schema of the rows that reach the aggregate (and of late rows).
    pub(crate) fn input_schema(&self) -> SchemaRef {
        self.input.schema()
    }

    /// What turns this operator's stored states into values.
    pub(crate) fn finalizer(&self) -> StateFinalizer {
        self.finalizer.clone()
    }

    /// Loads the state as of `version` (the last committed batch).
    pub(crate) fn load(&mut self, version: Option<BatchId>) -> Result<()> {
        self.store.load(version)?;
        self.dirty = false;
        Ok(())
    }

    /// Makes sure the store holds exactly the state before batch `id`.
    pub(crate) fn prepare(&mut self, id: BatchId) -> Result<()> {
        let before = id.checked_sub(1);
        if self.dirty || self.store.version() != before {
            self.load(before)?;
        }
        Ok(())
    }

    /// Commits the state of batch `id`.
    pub(crate) fn commit(&mut self, id: BatchId) -> Result<CommitStats> {
        let stats = self.store.commit(id)?;
        self.dirty = false;
        Ok(stats)
    }

    /// Approximate bytes of state in memory.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.store.memory_bytes() as u64
    }

    /// Stored rows as the store sees them: a constant key for a global aggregate.
    fn store_rows(&self, batch: &RecordBatch, now_ms: i64) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = Vec::new();
        if self.n_keys == 0 {
            cols.push(Arc::new(BooleanArray::from(vec![true; batch.num_rows()])));
        }
        cols.extend(batch.columns().iter().cloned());
        if self.ttl.is_some() {
            cols.push(Arc::new(Int64Array::from(vec![now_ms; batch.num_rows()])));
        }
        Ok(RecordBatch::try_new(self.store.row_schema(), cols)?)
    }

    /// Stored rows back in the partial-state schema.
    fn state_rows(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let skip = usize::from(self.n_keys == 0);
        let end = batch.num_columns() - usize::from(self.ttl.is_some());
        Ok(RecordBatch::try_new(
            Arc::clone(&self.partial_schema),
            batch.columns()[skip..end].to_vec(),
        )?)
    }

    fn keys_of(&self, batch: &RecordBatch) -> Vec<ArrayRef> {
        if self.n_keys == 0 {
            vec![Arc::new(BooleanArray::from(vec![true; batch.num_rows()]))]
        } else {
            batch.columns()[..self.n_keys].to_vec()
        }
    }

    /// Runs the aggregate over the rows the query's stream slots hold.
    /// `wm_start` is the watermark at the start of the batch (decides late
    /// rows), `wm_end` the one at its end (closes windows).
    pub(crate) async fn run(
        &mut self,
        ctx: &Arc<TaskContext>,
        wm_start: Option<i64>,
        wm_end: Option<i64>,
        now_ms: i64,
        input_rows: u64,
    ) -> Result<AggregateOutput> {
        self.dirty = true;
        let mut clock = std::time::Instant::now();
        let mut lap = |out: &mut AggregateOutput, step: &'static str| {
            let now = std::time::Instant::now();
            out.steps
                .push((step, now.duration_since(clock).as_secs_f64() * 1000.0));
            clock = now;
        };
        let input = match &self.narrow_input {
            Some(narrow) if (input_rows as usize) < PARALLEL_ROWS => narrow,
            _ => &self.input,
        };
        let plan = reset_plan_states(Arc::clone(input)).map_err(Error::from)?;
        let raw = collect(plan, Arc::clone(ctx)).await.map_err(Error::from)?;
        let closes = self.mode != OutputMode::Complete;
        let mut out = AggregateOutput::default();
        let mut on_time = Vec::with_capacity(raw.len());
        for batch in raw {
            match (&self.window_end, wm_start) {
                (Some((_, expr)), Some(wm)) if closes => {
                    let end = expr.evaluate(&batch)?.into_array(batch.num_rows())?;
                    let keep = window_after(&end, wm)?;
                    let kept = filter_record_batch(&batch, &keep)?;
                    let late = batch.num_rows() - kept.num_rows();
                    if late > 0 {
                        out.late_rows += late as u64;
                        let gone = datafusion::arrow::compute::not(&keep)?;
                        out.late.push(filter_record_batch(&batch, &gone)?);
                    }
                    on_time.push(kept);
                }
                _ => on_time.push(batch),
            }
        }
        out.aggregated_rows = on_time.iter().map(|b| b.num_rows() as u64).sum();
        lap(&mut out, "input");

        let partial = self.partial.run(on_time, ctx).await?;
        let partial = concat_batches(&self.partial_schema, &partial)?;
        lap(&mut out, "partial");
        let (stored, partial) = match self.session {
            Some((ws, we)) => self.merge_sessions(partial, ws, we)?,
            None => {
                let stored = self.store.get(&self.keys_of(&partial))?;
                (self.state_rows(&stored)?, partial)
            }
        };
        let before = stored.clone();
        lap(&mut out, "get");
        let merged = self.reduce.run(vec![stored, partial], ctx).await?;
        let merged = concat_batches(&self.partial_schema, &merged)?;
        lap(&mut out, "merge");
        self.store.put(&self.store_rows(&merged, now_ms)?)?;
        lap(&mut out, "put");
        if let Some(ttl) = self.ttl {
            // Keys nobody updated for the TTL go, without a row to the sink.
            self.store.remove_where(|live| {
                let updated = live
                    .column(live.num_columns() - 1)
                    .as_primitive::<Int64Type>();
                Ok((0..live.num_rows())
                    .map(|i| Some(updated.value(i) < now_ms - ttl))
                    .collect())
            })?;
        }
        let changes = (self.mode == OutputMode::Changelog).then(|| merged.clone());

        let mut emit: Vec<RecordBatch> = match self.mode {
            OutputMode::Update => vec![merged],
            OutputMode::Complete => {
                let all = self.store.scan()?;
                vec![self.state_rows(&all)?]
            }
            _ => vec![],
        };
        if let (Some((i, _)), Some(wm), true) = (&self.window_end, wm_end, closes) {
            let i = *i;
            let closed = self.store.remove_keys_where(|keys| {
                let keep = window_after(keys.column(i), wm)?;
                Ok(datafusion::arrow::compute::not(&keep)?)
            })?;
            if self.mode == OutputMode::Append {
                emit.push(self.state_rows(&closed)?);
            }
        }
        lap(&mut out, "evict");
        if let Some(after) = changes {
            // A global aggregate's Final gives a row even over no state: a
            // key that had none has no old value.
            let old = if before.num_rows() == 0 {
                RecordBatch::new_empty(Arc::clone(&self.agg_schema))
            } else {
                self.values(vec![before], ctx).await?
            };
            let new = self.values(vec![after], ctx).await?;
            out.rows = self.changelog(old, new, ctx).await?;
            lap(&mut out, "emit");
            return Ok(out);
        }
        let values = self.values(emit, ctx).await?;
        out.rows = if values.num_rows() == 0 {
            vec![]
        } else {
            self.upper.run(vec![values], ctx).await?
        };
        lap(&mut out, "emit");
        Ok(out)
    }

    /// Session windows: gives the batch's sessions and the stored sessions
    /// of the same keys the bounds of the merged sessions they fall in (two
    /// sessions merge when one starts before the other ends), and takes
    /// those stored sessions out of the store — they come back merged.
    fn merge_sessions(
        &mut self,
        partial: RecordBatch,
        ws: usize,
        we: usize,
    ) -> Result<(RecordBatch, RecordBatch)> {
        let others: Vec<usize> = (0..self.n_keys).filter(|i| *i != ws && *i != we).collect();
        // No other keys: every session shares one (constant) key.
        let fields: Vec<SortField> = if others.is_empty() {
            vec![SortField::new(DataType::Boolean)]
        } else {
            others
                .iter()
                .map(|i| SortField::new(self.partial_schema.field(*i).data_type().clone()))
                .collect()
        };
        let conv = RowConverter::new(fields)?;
        let key_rows = |b: &RecordBatch| {
            let cols: Vec<ArrayRef> = if others.is_empty() {
                vec![Arc::new(BooleanArray::from(vec![true; b.num_rows()]))]
            } else {
                others.iter().map(|i| Arc::clone(b.column(*i))).collect()
            };
            conv.convert_columns(&cols)
        };
        let p_keys = key_rows(&partial)?;
        let wanted: HashSet<_> = (0..partial.num_rows())
            .map(|i| p_keys.row(i).owned())
            .collect();
        let all = self.state_rows(&self.store.scan()?)?;
        let a_keys = key_rows(&all)?;
        let take: BooleanArray = (0..all.num_rows())
            .map(|i| Some(wanted.contains(&a_keys.row(i).owned())))
            .collect();
        let stored = filter_record_batch(&all, &take)?;
        let s_keys = key_rows(&stored)?;

        let bounds = |b: &RecordBatch, i: usize| -> Result<Int64Array> {
            Ok(cast(b.column(i), &DataType::Int64)?
                .as_primitive::<Int64Type>()
                .clone())
        };
        let (ss, se, ps, pe) = (
            bounds(&stored, ws)?,
            bounds(&stored, we)?,
            bounds(&partial, ws)?,
            bounds(&partial, we)?,
        );
        // Per key, every session (from the store: side 0, from the batch: side 1).
        let mut groups: HashMap<OwnedRow, Vec<(i64, i64, usize, usize)>> = HashMap::new();
        for (side, keys, s, e) in [(0, &s_keys, &ss, &se), (1, &p_keys, &ps, &pe)] {
            for i in 0..s.len() {
                if s.is_valid(i) && e.is_valid(i) {
                    groups.entry(keys.row(i).owned()).or_default().push((
                        s.value(i),
                        e.value(i),
                        side,
                        i,
                    ));
                }
            }
        }
        let mut new_bounds: [Vec<Option<(i64, i64)>>; 2] =
            [vec![None; ss.len()], vec![None; ps.len()]];
        for sessions in groups.values_mut() {
            sessions.sort();
            // Only a run of sessions that the batch touches changes: a
            // stored session no batch session reaches stays as it is.
            let mut run: Vec<(usize, usize)> = Vec::new();
            let (mut lo, mut hi) = (sessions[0].0, sessions[0].1);
            for &(s, e, side, i) in sessions.iter() {
                if s >= hi && !run.is_empty() {
                    close_run(&mut run, (lo, hi), &mut new_bounds);
                    lo = s;
                    hi = e;
                }
                hi = hi.max(e);
                run.push((side, i));
            }
            close_run(&mut run, (lo, hi), &mut new_bounds);
        }
        let rebuild = |b: &RecordBatch,
                       nb: &[Option<(i64, i64)>],
                       s: &Int64Array,
                       e: &Int64Array|
         -> Result<RecordBatch> {
            let starts: Int64Array = (0..b.num_rows())
                .map(|i| nb[i].map(|x| x.0).or(s.is_valid(i).then(|| s.value(i))))
                .collect();
            let ends: Int64Array = (0..b.num_rows())
                .map(|i| nb[i].map(|x| x.1).or(e.is_valid(i).then(|| e.value(i))))
                .collect();
            let mut cols = b.columns().to_vec();
            cols[ws] = cast(&starts, b.column(ws).data_type())?;
            cols[we] = cast(&ends, b.column(we).data_type())?;
            Ok(RecordBatch::try_new(
                Arc::clone(&self.partial_schema),
                cols,
            )?)
        };
        // The stored sessions that take part: those in a run with the batch's.
        let involved: BooleanArray = new_bounds[0].iter().map(|b| Some(b.is_some())).collect();
        let stored = filter_record_batch(&stored, &involved)?;
        let (ss, se) = (bounds(&stored, ws)?, bounds(&stored, we)?);
        let kept: Vec<Option<(i64, i64)>> = new_bounds[0]
            .iter()
            .filter(|b| b.is_some())
            .copied()
            .collect();
        new_bounds[0] = kept;
        let stored_new = rebuild(&stored, &new_bounds[0], &ss, &se)?;
        let partial_new = rebuild(&partial, &new_bounds[1], &ps, &pe)?;
        // The stored sessions that took part leave the store; merged, they return.
        let full = RowConverter::new(
            (0..self.n_keys)
                .map(|i| SortField::new(self.partial_schema.field(i).data_type().clone()))
                .collect(),
        )?;
        let gone_rows = full.convert_columns(&stored.columns()[..self.n_keys])?;
        let gone: HashSet<OwnedRow> = (0..stored.num_rows())
            .map(|i| gone_rows.row(i).owned())
            .collect();
        if !gone.is_empty() {
            let n_keys = self.n_keys;
            self.store.remove_where(|live| {
                let keys = full.convert_columns(&live.columns()[..n_keys])?;
                Ok((0..live.num_rows())
                    .map(|i| Some(gone.contains(&keys.row(i).owned())))
                    .collect())
            })?;
        }
        Ok((stored_new, partial_new))
    }

    /// Final aggregate values of stored-state rows, in the schema the plan
    /// above was built for (same types; nullability as DataFusion's own
    /// final aggregate declared it).
    async fn values(
        &self,
        states: Vec<RecordBatch>,
        ctx: &Arc<TaskContext>,
    ) -> Result<RecordBatch> {
        let values = self.finalize.run(states, ctx).await?;
        let values: Vec<RecordBatch> = values
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| RecordBatch::try_new(Arc::clone(&self.agg_schema), b.columns().to_vec()))
            .collect::<std::result::Result<_, _>>()?;
        Ok(concat_batches(&self.agg_schema, &values)?)
    }

    /// The schema the sink receives: the plan's, with `_op` first in
    /// changelog mode.
    pub(crate) fn output_schema(&self) -> SchemaRef {
        let upper = self.upper.plan.schema();
        if self.mode != OutputMode::Changelog {
            return upper;
        }
        with_op_field(&upper)
    }

    /// Runs the (projection-only) plan above the aggregate over `values`.
    async fn project(&self, values: RecordBatch, ctx: &Arc<TaskContext>) -> Result<RecordBatch> {
        let schema = self.upper.plan.schema();
        if values.num_rows() == 0 {
            return Ok(RecordBatch::new_empty(schema));
        }
        let rows = self.upper.run(vec![values], ctx).await?;
        Ok(concat_batches(&schema, &rows)?)
    }

    /// `-U old, +U new` for keys that had a value, `+I new` for new keys.
    async fn changelog(
        &self,
        old: RecordBatch,
        new: RecordBatch,
        ctx: &Arc<TaskContext>,
    ) -> Result<Vec<RecordBatch>> {
        if new.num_rows() == 0 {
            return Ok(vec![]);
        }
        let n = self.n_keys;
        let matches: Vec<Option<u32>> = if n == 0 {
            vec![(old.num_rows() > 0).then_some(0)]
        } else {
            let conv = RowConverter::new(
                self.agg_schema.fields()[..n]
                    .iter()
                    .map(|f| SortField::new(f.data_type().clone()))
                    .collect(),
            )?;
            let old_keys = conv.convert_columns(&old.columns()[..n])?;
            let new_keys = conv.convert_columns(&new.columns()[..n])?;
            let index: HashMap<_, u32> = (0..old.num_rows())
                .map(|i| (old_keys.row(i).owned(), i as u32))
                .collect();
            (0..new.num_rows())
                .map(|j| index.get(&new_keys.row(j).owned()).copied())
                .collect()
        };
        let old_idx: UInt32Array = matches.iter().flatten().copied().collect();
        let old_sel = take_record_batch(&old, &old_idx)?;
        let upper_old = self.project(old_sel, ctx).await?;
        let upper_new = self.project(new, ctx).await?;
        let mut picks: Vec<(usize, usize)> = Vec::new();
        let mut ops: Vec<&str> = Vec::new();
        let mut k = 0;
        for (j, m) in matches.iter().enumerate() {
            if m.is_some() {
                picks.push((0, k));
                ops.push("-U");
                k += 1;
                picks.push((1, j));
                ops.push("+U");
            } else {
                picks.push((1, j));
                ops.push("+I");
            }
        }
        let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from(ops))];
        for c in 0..upper_old.num_columns() {
            cols.push(interleave(
                &[upper_old.column(c).as_ref(), upper_new.column(c).as_ref()],
                &picks,
            )?);
        }
        Ok(vec![RecordBatch::try_new(self.output_schema(), cols)?])
    }
}

/// Gives every session of a finished run the run's bounds, if a session of
/// the batch (side 1) is among them; a run of stored sessions alone is left
/// untouched.
fn close_run(
    run: &mut Vec<(usize, usize)>,
    bounds: (i64, i64),
    new_bounds: &mut [Vec<Option<(i64, i64)>>; 2],
) {
    if run.iter().any(|(side, _)| *side == 1) {
        for &(side, i) in run.iter() {
            new_bounds[side][i] = Some(bounds);
        }
    }
    run.clear();
}

/// The state column holding when a key was last updated, with a TTL.
const UPDATED: &str = "__updated_ms";

/// `schema` with the changelog's `_op` column (`+I`, `-U`, `+U`) first.
pub(crate) fn with_op_field(schema: &SchemaRef) -> SchemaRef {
    let mut fields = vec![Arc::new(Field::new("_op", DataType::Utf8, false))];
    fields.extend(schema.fields().iter().cloned());
    Arc::new(Schema::new(fields))
}

/// `true` where the window end (a timestamp) is after `wm` (ms): the window
/// is still open.
fn window_after(end: &ArrayRef, wm: i64) -> Result<BooleanArray> {
    let ms = cast(end, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    let ms = ms.as_primitive::<TimestampMillisecondType>();
    Ok((0..ms.len())
        .map(|i| Some(ms.is_null(i) || ms.value(i) > wm))
        .collect())
}
