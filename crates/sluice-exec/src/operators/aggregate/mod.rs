//! The streaming grouped aggregate: a node of the physical plan that keeps
//! its groups' accumulator states across micro-batches.
//!
//! DataFusion plans the aggregate as usual; [`StreamingAggregateExec`]
//! takes the place of its Final (or Single) aggregate, keeps DataFusion's
//! input plan as its child, and per batch runs:
//!
//! ```text
//!  Final        (state -> values)        <- the keys to emit
//!  PartialReduce(state + state -> state) <- stored states of the batch's keys + the batch's partial states
//!  Partial      (rows -> state)          <- the batch's on-time rows (its child's output)
//! ```
//!
//! The merged states go to the operator's [`StateStore`], keyed by the group
//! key (window included). So any aggregate whose accumulator can export and
//! merge its state — count, sum, avg, min, max, count(DISTINCT), approx_*,
//! stddev, ... — runs incrementally, using DataFusion's own accumulators.
//!
//! It emits per its mode: `append` a window once the watermark passes its
//! end (then evicts it), `update` the keys this batch changed, `complete`
//! every key, `changelog` the changed keys as `-U` old / `+U` new (`+I` for a
//! new key) in two trailing columns that [`super::changelog`] carries up the
//! plan. With a window and a watermark, rows whose window had closed at the
//! start of the batch are late: not aggregated, counted (except in complete
//! mode, which never closes a window).

mod sessions;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray, UInt64Array,
};
use datafusion::arrow::compute::{concat_batches, filter_record_batch, interleave};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::{PhysicalExpr, ScalarFunctionExpr};
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy};
use datafusion::physical_plan::execution_plan::{ReplaceChildrenOptions, reset_plan_states};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, collect,
};
use sluice_common::{Error, OutputMode, Result};
use sluice_planner::{BatchSlot, SESSION_END, WINDOW_END};
use sluice_state::store::StateStore;

use super::{
    BatchContext, OperatorReport, OperatorRuntime, StatefulExec, after_watermark, node_properties,
    run_once,
};
use crate::operators::changelog::with_change_fields;

/// A plan fed from a slot.
#[derive(Debug)]
struct Stage {
    slot: Arc<BatchSlot>,
    plan: Arc<dyn ExecutionPlan>,
    /// The same plan over the slot's rows split in parts, run in parallel,
    /// for batches of at least [`PARALLEL_ROWS`] rows.
    wide: Option<Arc<dyn ExecutionPlan>>,
}

/// From how many rows a stage with a `wide` plan runs it, and from how many
/// input rows the child runs with DataFusion's round-robin repartitions.
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

/// What an aggregate node is, apart from its input: built once per query
/// and shared by every copy DataFusion makes of the node.
#[derive(Debug)]
struct AggregateCore {
    partial: Stage,
    reduce: Stage,
    finalize: Stage,
    agg_schema: SchemaRef,
    partial_schema: SchemaRef,
    key_schema: SchemaRef,
    value_schema: SchemaRef,
    /// Group key columns (0: a global aggregate, stored under one constant key).
    n_keys: usize,
    window_end: Option<(usize, Arc<dyn PhysicalExpr>)>,
    /// For session windows: where window_start and window_end are among the keys.
    session: Option<(usize, usize)>,
    /// Keys not updated for this long (ms of trigger clock) are dropped.
    ttl: Option<i64>,
    finalizer: StateFinalizer,
    keys: Vec<String>,
    aggregates: Vec<String>,
    /// The partial aggregate's grouping and filters over the input, and the
    /// TTL as given: what [`StreamingAggregateExec::top_over`] rebuilds
    /// DataFusion's aggregate from.
    group_by: PhysicalGroupBy,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    ttl_given: Option<std::time::Duration>,
}

/// The stateful grouped aggregate of a streaming query (see the module docs).
#[derive(Debug, Clone)]
pub struct StreamingAggregateExec {
    id: String,
    input: Arc<dyn ExecutionPlan>,
    /// `input` without its round-robin repartitions, for small batches,
    /// where spreading rows over the cores costs more than it saves.
    narrow_input: Option<Arc<dyn ExecutionPlan>>,
    core: Arc<AggregateCore>,
    emit: OutputMode,
    properties: Arc<PlanProperties>,
}

/// `plan` as an aggregate.
fn as_agg(plan: &Arc<dyn ExecutionPlan>) -> Option<&AggregateExec> {
    let any: &dyn std::any::Any = plan.as_ref();
    any.downcast_ref::<AggregateExec>()
}

/// The aggregate that holds the expressions over raw rows of the aggregate
/// `plan` ends — the Partial under a Final, or a Single on its own — if
/// `plan` is the top (Final or Single) aggregate of one.
pub(crate) fn top_aggregate(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    let top = as_agg(plan)?;
    match top.mode() {
        AggregateMode::Single | AggregateMode::SinglePartitioned => Some(Arc::clone(plan)),
        AggregateMode::Final | AggregateMode::FinalPartitioned => {
            let mut node = Arc::clone(top.input());
            loop {
                if as_agg(&node).is_some() {
                    return Some(node);
                }
                let children = node.children();
                if children.len() != 1 {
                    return None;
                }
                node = Arc::clone(children[0]);
            }
        }
        _ => None,
    }
}

/// Whether the raw-row stage `src` of an aggregate computes no aggregate
/// function: a `SELECT DISTINCT`, which is a deduplication.
pub(crate) fn without_functions(src: &Arc<dyn ExecutionPlan>) -> bool {
    as_agg(src).is_some_and(|a| a.aggr_expr().is_empty())
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
    sluice_common::cores().min(4)
}

/// Whether `plan` computes a session window's end below any other stateful
/// node: its aggregate then merges sessions.
fn computes_session_end(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        if super::as_stateful(node).is_some() {
            return Ok(TreeNodeRecursion::Jump);
        }
        let _ = node.apply_expressions(&mut |e| {
            let _ = e.apply(|x| {
                let any: &dyn std::any::Any = x.as_ref();
                if any
                    .downcast_ref::<ScalarFunctionExpr>()
                    .is_some_and(|f| f.name() == SESSION_END)
                {
                    found = true;
                }
                Ok(TreeNodeRecursion::Continue)
            });
            Ok(TreeNodeRecursion::Continue)
        });
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

impl StreamingAggregateExec {
    /// The node for the aggregate whose top (Final or Single) aggregate is
    /// `top`, as operator `id`; it emits append-only rows until
    /// [`Self::with_emit`] says otherwise.
    pub fn try_new(
        id: String,
        top: Arc<dyn ExecutionPlan>,
        ttl: Option<std::time::Duration>,
    ) -> Result<Self> {
        Self::try_new_with_sessions(id, top, ttl, None)
    }

    /// [`Self::try_new`], told whether it merges session windows rather
    /// than finding out from its input (which computes each row's session
    /// window): a cluster's task makes the node again over a slice of a
    /// shuffle, with that computation in another stage. `None` finds out.
    pub fn try_new_with_sessions(
        id: String,
        top: Arc<dyn ExecutionPlan>,
        ttl: Option<std::time::Duration>,
        merges_sessions: Option<bool>,
    ) -> Result<Self> {
        let src = top_aggregate(&top).ok_or_else(|| {
            Error::internal(format!("not the top of an aggregate: {}", top.name()))
        })?;
        let src_agg = as_agg(&src).expect("found as an aggregate");
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
        let session = merges_sessions.unwrap_or_else(|| computes_session_end(&input));
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
        let window_end = key_at(WINDOW_END).map(|i| (i, Arc::clone(&group_by.expr()[i].0)));
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
        let finalizer = StateFinalizer {
            group_by: group_by.as_final(),
            aggr: aggr.clone(),
            input_schema: Arc::clone(&input_schema),
            partial_schema: Arc::clone(&partial_schema),
            agg_schema: Arc::clone(&agg_schema),
            global: n_keys == 0,
            ttl: ttl.is_some(),
        };
        let core = AggregateCore {
            finalizer,
            partial,
            reduce,
            finalize,
            agg_schema,
            partial_schema,
            key_schema,
            value_schema,
            n_keys,
            window_end,
            session,
            ttl: ttl.map(|d| d.as_millis() as i64),
            keys: group_by.expr().iter().map(|(_, n)| n.clone()).collect(),
            aggregates: aggr.iter().map(|a| a.name().to_string()).collect(),
            filters: src_agg.filter_expr().to_vec(),
            group_by,
            ttl_given: ttl,
        };
        Ok(Self::build(id, input, Arc::new(core), OutputMode::Append))
    }

    fn build(
        id: String,
        input: Arc<dyn ExecutionPlan>,
        core: Arc<AggregateCore>,
        emit: OutputMode,
    ) -> Self {
        let schema = match emit {
            OutputMode::Changelog => with_change_fields(&core.agg_schema),
            _ => Arc::clone(&core.agg_schema),
        };
        let properties = node_properties(schema);
        StreamingAggregateExec {
            id,
            narrow_input: narrow(&input),
            input,
            core,
            emit,
            properties,
        }
    }

    /// This node emitting in `mode` (the sink's, for the topmost stateful
    /// node).
    pub fn with_emit(&self, mode: OutputMode) -> Result<Self> {
        Ok(Self::build(
            self.id.clone(),
            Arc::clone(&self.input),
            Arc::clone(&self.core),
            mode,
        ))
    }

    /// How this node emits.
    pub fn emit_mode(&self) -> OutputMode {
        self.emit
    }

    /// What turns this operator's stored states into values.
    pub fn finalizer(&self) -> StateFinalizer {
        self.core.finalizer.clone()
    }

    /// The eviction rule, for EXPLAIN.
    fn eviction(&self) -> &'static str {
        match (&self.core.window_end, self.emit) {
            (Some(_), OutputMode::Complete) => "none (complete mode keeps every window)",
            (Some(_), OutputMode::Append) => {
                "emit a window once window_end <= watermark at the end of the batch, then remove it (never without a watermark)"
            }
            (Some(_), _) => {
                "remove a window once window_end <= watermark at the end of the batch (never without a watermark)"
            }
            (None, _) if self.core.ttl.is_some() => "keys not updated for state_ttl",
            (None, _) => "none (unwindowed state is kept for every key)",
        }
    }

    /// DataFusion's aggregate this node was made from (a Final over a
    /// Partial), over `input`: `try_new(id, top_over(input), ttl())` makes
    /// the same node over another input, with state of its own (how an
    /// executor rebuilds it from the plan it is sent).
    pub fn top_over(&self, input: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        let core = &self.core;
        let input_schema = Arc::clone(&core.finalizer.input_schema);
        let aggr = core.finalizer.aggr.clone();
        let n = aggr.len();
        let partial = AggregateExec::try_new(
            AggregateMode::Partial,
            core.group_by.clone(),
            aggr.clone(),
            core.filters.clone(),
            input,
            Arc::clone(&input_schema),
        )?;
        let top = AggregateExec::try_new(
            AggregateMode::Final,
            core.group_by.as_final(),
            aggr,
            vec![None; n],
            Arc::new(partial),
            input_schema,
        )?;
        Ok(Arc::new(top))
    }

    /// The TTL of unwindowed keys it was made with.
    pub fn ttl(&self) -> Option<std::time::Duration> {
        self.core.ttl_given
    }

    /// The grouping expressions over its input's rows: rows equal on them
    /// are one key, so hashing them splits the input between state
    /// partitions.
    pub fn key_exprs(&self) -> Vec<Arc<dyn PhysicalExpr>> {
        self.core
            .group_by
            .expr()
            .iter()
            .map(|(e, _)| Arc::clone(e))
            .collect()
    }

    /// The grouping expressions rows must agree on to ever meet in one
    /// group: [`Self::key_exprs`], but without a session window's bounds
    /// (a row's own window, which merges with the other sessions of its
    /// key). Hashing them splits the input between state partitions.
    pub fn partition_exprs(&self) -> Vec<Arc<dyn PhysicalExpr>> {
        let session = self.core.session;
        self.key_exprs()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| session.is_none_or(|(ws, we)| *i != ws && *i != we))
            .map(|(_, e)| e)
            .collect()
    }

    /// Whether it merges session windows (a session's rows must meet other
    /// sessions of their key, not only their window's).
    pub fn merges_sessions(&self) -> bool {
        self.core.session.is_some()
    }

    /// Runs the aggregate over one batch with `store` as its state (the
    /// state before the batch), outside a query's operator runtime: its
    /// child's rows in, the rows to emit and what the run did out. The
    /// store is not committed.
    pub async fn run_with(
        &self,
        store: &mut StateStore,
        batch: BatchContext,
        ctx: &Arc<TaskContext>,
    ) -> Result<(Vec<RecordBatch>, OperatorReport)> {
        let mut report = OperatorReport::default();
        let rows = self.run_on(store, batch, ctx, &mut report).await?;
        Ok((rows, report))
    }

    /// Runs the aggregate over one batch: its child's rows in, the rows to
    /// emit out.
    async fn run(self, ctx: Arc<TaskContext>) -> Result<Vec<RecordBatch>> {
        let (batch, state) = OperatorRuntime::of(&ctx, &self.id)?;
        let mut guard = state.lock().await;
        let st = &mut *guard;
        st.begin();
        let mut report = OperatorReport::default();
        let out = self.run_on(&mut st.store, batch, &ctx, &mut report).await;
        st.report = report;
        out
    }

    async fn run_on(
        &self,
        store: &mut StateStore,
        batch: BatchContext,
        ctx: &Arc<TaskContext>,
        report: &mut OperatorReport,
    ) -> Result<Vec<RecordBatch>> {
        let core = &self.core;
        let mut clock = std::time::Instant::now();
        let mut lap = |report: &mut OperatorReport, step: &'static str| {
            let now = std::time::Instant::now();
            report
                .steps
                .push((step, now.duration_since(clock).as_secs_f64() * 1000.0));
            clock = now;
        };
        let input = match &self.narrow_input {
            Some(narrow) if (batch.input_rows as usize) < PARALLEL_ROWS => narrow,
            _ => &self.input,
        };
        let raw = collect(Arc::clone(input), Arc::clone(ctx))
            .await
            .map_err(Error::from)?;
        let closes = self.emit != OutputMode::Complete;
        let mut on_time = Vec::with_capacity(raw.len());
        for rows in raw {
            match (&core.window_end, batch.watermark_start) {
                (Some((_, expr)), Some(wm)) if closes => {
                    let end = expr.evaluate(&rows)?.into_array(rows.num_rows())?;
                    let keep = after_watermark(&end, wm)?;
                    let kept = filter_record_batch(&rows, &keep)?;
                    let late = rows.num_rows() - kept.num_rows();
                    if late > 0 {
                        report.late_rows += late as u64;
                        let gone = datafusion::arrow::compute::not(&keep)?;
                        report.late.push((0, filter_record_batch(&rows, &gone)?));
                    }
                    on_time.push(kept);
                }
                _ => on_time.push(rows),
            }
        }
        report.input_rows = on_time.iter().map(|b| b.num_rows() as u64).sum();
        lap(report, "input");

        let partial = core.partial.run(on_time, ctx).await?;
        let partial = concat_batches(&core.partial_schema, &partial)?;
        lap(report, "partial");
        let (stored, partial, before) = match core.session {
            Some((ws, we)) => core.merge_sessions(store, partial, ws, we)?,
            None => {
                let stored = core.state_rows(&store.get(&core.keys_of(&partial))?)?;
                let before = stored.clone();
                (stored, partial, before)
            }
        };
        lap(report, "get");
        let merged = core.reduce.run(vec![stored, partial], ctx).await?;
        let merged = concat_batches(&core.partial_schema, &merged)?;
        lap(report, "merge");
        store.put(&core.store_rows(store, &merged, batch.now_ms)?)?;
        lap(report, "put");
        if let Some(ttl) = core.ttl {
            // Keys nobody updated for the TTL go, without a row to the sink.
            let now_ms = batch.now_ms;
            store.remove_where(|live| {
                let updated = live
                    .column(live.num_columns() - 1)
                    .as_primitive::<Int64Type>();
                Ok((0..live.num_rows())
                    .map(|i| Some(updated.value(i) < now_ms - ttl))
                    .collect())
            })?;
        }
        let changes = (self.emit == OutputMode::Changelog).then(|| merged.clone());

        let mut emit: Vec<RecordBatch> = match self.emit {
            OutputMode::Update => vec![merged],
            OutputMode::Complete => {
                let all = store.scan()?;
                vec![core.state_rows(&all)?]
            }
            _ => vec![],
        };
        if let (Some((i, _)), Some(wm), true) = (&core.window_end, batch.watermark_end, closes) {
            let i = *i;
            // Through the store's time index: the work is the rows evicted.
            let closed = store.remove_keys_until(i, wm)?;
            if self.emit == OutputMode::Append {
                emit.push(core.state_rows(&closed)?);
            }
        }
        lap(report, "evict");
        let rows = match changes {
            Some(after) => {
                // A global aggregate's Final gives a row even over no state:
                // a key that had none has no old value.
                let old = if before.num_rows() == 0 {
                    RecordBatch::new_empty(Arc::clone(&core.agg_schema))
                } else {
                    core.values(vec![before], ctx).await?
                };
                let new = core.values(vec![after], ctx).await?;
                core.changelog(old, new, batch.batch_id)?
            }
            None => {
                let values = core.values(emit, ctx).await?;
                if values.num_rows() == 0 {
                    vec![]
                } else {
                    vec![values]
                }
            }
        };
        lap(report, "emit");
        Ok(rows)
    }
}

impl AggregateCore {
    /// Stored rows as the store sees them: a constant key for a global aggregate.
    fn store_rows(
        &self,
        store: &StateStore,
        batch: &RecordBatch,
        now_ms: i64,
    ) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = Vec::new();
        if self.n_keys == 0 {
            cols.push(Arc::new(BooleanArray::from(vec![true; batch.num_rows()])));
        }
        cols.extend(batch.columns().iter().cloned());
        if self.ttl.is_some() {
            cols.push(Arc::new(Int64Array::from(vec![now_ms; batch.num_rows()])));
        }
        Ok(RecordBatch::try_new(store.row_schema(), cols)?)
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

    /// `-U old, +U new` for keys that had a value, `+I new` for new keys,
    /// `-D old` for old keys no new row has (sessions merged into another),
    /// with the change columns after the values: the operation, and a
    /// sequence number shared by the two rows of one update, unique in the
    /// batch (`batch id << 32 | pair`), so that a filter above can drop
    /// one half and the root still knows what is left.
    fn changelog(
        &self,
        old: RecordBatch,
        new: RecordBatch,
        batch_id: u64,
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
        // An old row no new row has the key of left the result: a session
        // merged into a larger one.
        let mut left = vec![true; old.num_rows()];
        for i in matches.iter().flatten() {
            left[*i as usize] = false;
        }
        let mut picks: Vec<(usize, usize)> = Vec::new();
        let mut ops: Vec<&str> = Vec::new();
        let mut seqs: Vec<u64> = Vec::new();
        for (j, m) in matches.iter().enumerate() {
            let seq = (batch_id << 32) | j as u64;
            if let Some(i) = m {
                picks.push((0, *i as usize));
                ops.push("-U");
                seqs.push(seq);
                picks.push((1, j));
                ops.push("+U");
                seqs.push(seq);
            } else {
                picks.push((1, j));
                ops.push("+I");
                seqs.push(seq);
            }
        }
        for (i, gone) in left.iter().enumerate() {
            if *gone {
                picks.push((0, i));
                ops.push("-D");
                seqs.push((batch_id << 32) | (new.num_rows() + i) as u64);
            }
        }
        let mut cols: Vec<ArrayRef> = Vec::new();
        for c in 0..new.num_columns() {
            cols.push(interleave(
                &[old.column(c).as_ref(), new.column(c).as_ref()],
                &picks,
            )?);
        }
        cols.push(Arc::new(StringArray::from(ops)));
        cols.push(Arc::new(UInt64Array::from(seqs)));
        Ok(vec![RecordBatch::try_new(
            with_change_fields(&self.agg_schema),
            cols,
        )?])
    }
}

impl DisplayAs for StreamingAggregateExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "StreamingAggregateExec: operator={}, emit={}, keys=[{}], aggregates=[{}], state=state/{}/, watermark=query watermark, eviction={}",
            self.id,
            self.emit,
            self.core.keys.join(", "),
            self.core.aggregates.join(", "),
            self.id,
            self.eviction()
        )?;
        if self.core.session.is_some() {
            write!(f, ", sessions merge")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for StreamingAggregateExec {
    fn name(&self) -> &str {
        "StreamingAggregateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::common::Result<TreeNodeRecursion>,
    ) -> datafusion::common::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(datafusion::error::DataFusionError::Internal(
                "StreamingAggregateExec takes one child".into(),
            ));
        }
        Ok(Arc::new(Self::build(
            self.id.clone(),
            children.swap_remove(0),
            Arc::clone(&self.core),
            self.emit,
        )))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::execution_plan::ChildrenPropertiesMode::Recompute,
            ),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        let this = self.clone();
        run_once(
            "StreamingAggregateExec",
            partition,
            self.schema(),
            this.run(context),
        )
    }
}

impl StatefulExec for StreamingAggregateExec {
    fn operator_id(&self) -> &str {
        &self.id
    }

    fn state_schemas(&self) -> (SchemaRef, SchemaRef) {
        (
            Arc::clone(&self.core.key_schema),
            Arc::clone(&self.core.value_schema),
        )
    }

    fn description(&self) -> String {
        format!(
            "aggregate {} GROUP BY [{}]",
            self.core.aggregates.join(", "),
            self.core.keys.join(", ")
        )
    }

    fn has_late_rows(&self) -> bool {
        self.core.window_end.is_some()
    }

    fn input_schema(&self) -> SchemaRef {
        self.input.schema()
    }
}

/// The state column holding when a key was last updated, with a TTL.
const UPDATED: &str = "__updated_ms";
