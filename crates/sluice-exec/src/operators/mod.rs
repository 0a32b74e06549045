//! Stateful operators as nodes of the physical plan.
//!
//! DataFusion plans a streaming query as if it were a batch query; the
//! streaming planner ([`plan_stateful`]) then puts a stateful node where an
//! operator must remember rows across micro-batches: the grouped aggregate
//! ([`aggregate::StreamingAggregateExec`]) and deduplication
//! ([`dedup::DedupExec`]). The plan is built once
//! and re-executed every batch with `collect`, like a stateless plan.
//!
//! What a node needs per batch does not come from a loop around the plan: it
//! comes from the [`TaskContext`] the plan runs with. The query's
//! [`OperatorRuntime`] sits in the task's session config as an extension; it
//! holds the current [`BatchContext`] (batch id, trigger time, the query
//! watermark at the start and end of the batch) and one [`OperatorState`] per
//! stateful node, found by the node's operator id. A node's state lives in
//! `state/<operator id>/` of the checkpoint; the executor prepares every
//! operator's state before a batch and commits them all after it, before the
//! commit record that makes the batch durable.
//!
//! Operator ids are the operator's kind, numbered per kind from the bottom
//! of the plan up (`aggregate`, `aggregate-1`, ..., `dedup`, ...), so the
//! one aggregate of an older checkpoint keeps its directory
//! `state/aggregate`.

pub mod aggregate;
pub mod changelog;
pub mod dedup;
pub mod join;
pub mod topn;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{ExecutionPlan, Partitioning, PlanProperties};
use sluice_common::durable::Durability;
use sluice_common::{BatchId, Error, OutputMode, Result};
use sluice_planner::is_stream_scan;
use sluice_state::store::{CommitStats, StateStore, StateStoreOptions};

pub use aggregate::{StateFinalizer, StreamingAggregateExec};
pub use dedup::DedupExec;
pub use join::{JoinIndex, StreamJoinExec};
pub use topn::TopNExec;

/// What one micro-batch is, as the stateful nodes see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchContext {
    /// The batch's id; an operator's state is versioned by it.
    pub batch_id: BatchId,
    /// When the batch was planned (trigger clock, ms): for TTLs.
    pub now_ms: i64,
    /// The query's watermark in force during the batch (rows are late
    /// against it).
    pub watermark_start: Option<i64>,
    /// The query's watermark after the batch (state is evicted against it).
    pub watermark_end: Option<i64>,
    /// Rows the batch read from all sources: small batches skip the
    /// round-robin repartitions that only pay off for big ones.
    pub input_rows: u64,
}

impl BatchContext {
    /// The batch as an operator whose input watermark is `delay_ms` below
    /// the query's sees it (a join below it delays it).
    pub fn delayed(mut self, delay_ms: i64) -> Self {
        if delay_ms > 0 {
            self.watermark_start = self.watermark_start.map(|w| w.saturating_sub(delay_ms));
            self.watermark_end = self.watermark_end.map(|w| w.saturating_sub(delay_ms));
        }
        self
    }
}

/// One stateful operator's state: its store, and what its last run reported.
#[derive(Debug)]
pub struct OperatorState {
    /// The operator's versioned keyed state.
    pub store: StateStore,
    /// A run started and its commit has not happened: the store must be
    /// reloaded before the batch runs again.
    dirty: bool,
    /// What the last run did, taken by the executor after the batch.
    pub report: OperatorReport,
}

impl OperatorState {
    /// Loads the state as of `version` (the last committed batch).
    pub fn load(&mut self, version: Option<BatchId>) -> Result<()> {
        self.store.load(version)?;
        self.dirty = false;
        Ok(())
    }

    /// Makes sure the store holds exactly the state before batch `id`, so a
    /// re-run or a retry never applies a batch twice.
    pub fn prepare(&mut self, id: BatchId) -> Result<()> {
        let before = id.checked_sub(1);
        if self.dirty || self.store.version() != before {
            self.load(before)?;
        }
        self.report = OperatorReport::default();
        Ok(())
    }

    /// Marks the store as changed by a run that has not committed yet.
    pub fn begin(&mut self) {
        self.dirty = true;
    }

    /// Commits the state of batch `id`.
    pub fn commit(&mut self, id: BatchId) -> Result<CommitStats> {
        let stats = self.store.commit(id)?;
        self.dirty = false;
        Ok(stats)
    }
}

/// What a stateful operator's run over one batch reports.
#[derive(Debug, Default)]
pub struct OperatorReport {
    /// Rows that reached the operator on time.
    pub input_rows: u64,
    /// Rows left out because they were late.
    pub late_rows: u64,
    /// The late rows, as they reached the operator, each with the input
    /// it came in by (0 for a node with one input; 0 or 1 for a join).
    pub late: Vec<(usize, RecordBatch)>,
    /// Milliseconds per step of the run.
    pub steps: Vec<(&'static str, f64)>,
}

/// The state of every stateful operator of a query, by operator id.
pub type OperatorStates = BTreeMap<String, Arc<tokio::sync::Mutex<OperatorState>>>;

/// What a query's stateful nodes find in their [`TaskContext`]: the
/// current batch and every operator's state.
#[derive(Debug)]
pub struct OperatorRuntime {
    batch: Mutex<BatchContext>,
    states: OperatorStates,
    /// Per operator id, how far (ms) its input watermark is below the
    /// query's (see [`watermark_delays`]).
    delays: BTreeMap<String, i64>,
}

impl OperatorRuntime {
    /// A runtime over `states`, before any batch.
    pub fn new(states: OperatorStates) -> Arc<Self> {
        Self::with_delays(states, BTreeMap::new())
    }

    /// A runtime over `states` whose operators see the query watermark
    /// delayed by `delays` (ms, by operator id; see [`watermark_delays`]).
    pub fn with_delays(states: OperatorStates, delays: BTreeMap<String, i64>) -> Arc<Self> {
        Arc::new(OperatorRuntime {
            batch: Mutex::new(BatchContext::default()),
            states,
            delays,
        })
    }

    /// Sets the batch the next execution of the plan runs.
    pub fn set_batch(&self, batch: BatchContext) {
        *self.batch.lock().unwrap_or_else(|p| p.into_inner()) = batch;
    }

    /// The batch being run.
    pub fn batch(&self) -> BatchContext {
        *self.batch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How far (ms) operator `id`'s input watermark is below the query's.
    pub fn delay(&self, id: &str) -> i64 {
        self.delays.get(id).copied().unwrap_or(0).max(0)
    }

    /// Every operator's state.
    pub fn states(&self) -> &OperatorStates {
        &self.states
    }

    /// The runtime of the query `ctx` runs, and operator `id`'s state in it.
    pub fn of(
        ctx: &TaskContext,
        id: &str,
    ) -> datafusion::common::Result<(BatchContext, Arc<tokio::sync::Mutex<OperatorState>>)> {
        let rt = ctx
            .session_config()
            .get_extension::<OperatorRuntime>()
            .ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "stateful operator '{id}' ran outside a micro-batch (no operator runtime in the task context)"
                ))
            })?;
        let state = rt.states.get(id).cloned().ok_or_else(|| {
            DataFusionError::Internal(format!("stateful operator '{id}' has no state opened"))
        })?;
        Ok((rt.batch().delayed(rt.delay(id)), state))
    }

    /// A task context like `base` that carries this runtime.
    pub fn task_ctx(self: &Arc<Self>, base: &TaskContext) -> Arc<TaskContext> {
        Arc::new(TaskContext::new(
            base.task_id(),
            base.session_id(),
            base.session_config()
                .clone()
                .with_extension(Arc::clone(self)),
            base.scalar_functions().clone(),
            base.higher_order_functions().clone(),
            base.aggregate_functions().clone(),
            base.window_functions().clone(),
            base.runtime_env(),
        ))
    }
}

/// What the executor and EXPLAIN need to know of a stateful node.
pub trait StatefulExec: ExecutionPlan {
    /// The operator id: its state directory under `state/`.
    fn operator_id(&self) -> &str;
    /// The key and value schemas of its state rows.
    fn state_schemas(&self) -> (SchemaRef, SchemaRef);
    /// A one-line description, for progress and errors.
    fn description(&self) -> String;
    /// Whether rows can be late for it (it closes event-time windows).
    fn has_late_rows(&self) -> bool;
    /// The schema of the rows that reach it (and of its late rows).
    fn input_schema(&self) -> SchemaRef;
    /// The inputs its late rows come in by, in the order
    /// [`OperatorReport::late`] numbers them.
    fn late_inputs(&self) -> Vec<Arc<dyn ExecutionPlan>> {
        self.children().into_iter().take(1).cloned().collect()
    }
    /// How far (ms) below its input watermark the event times of the rows
    /// it emits can be: the operators above it see a watermark delayed by
    /// that much (a join's bound; 0 for the others).
    fn output_delay_ms(&self) -> i64 {
        0
    }
}

/// `plan` as a stateful node, if it is one.
pub fn as_stateful(plan: &Arc<dyn ExecutionPlan>) -> Option<&dyn StatefulExec> {
    let any: &dyn std::any::Any = plan.as_ref();
    if let Some(a) = any.downcast_ref::<StreamingAggregateExec>() {
        return Some(a);
    }
    if let Some(d) = any.downcast_ref::<DedupExec>() {
        return Some(d);
    }
    if let Some(j) = any.downcast_ref::<StreamJoinExec>() {
        return Some(j);
    }
    any.downcast_ref::<TopNExec>()
        .map(|t| t as &dyn StatefulExec)
}

/// The stateful nodes of `plan`, bottom up (the order their ids count in).
pub fn stateful_nodes(plan: &Arc<dyn ExecutionPlan>) -> Vec<&dyn StatefulExec> {
    fn walk<'a>(p: &'a Arc<dyn ExecutionPlan>, out: &mut Vec<&'a dyn StatefulExec>) {
        for c in p.children() {
            walk(c, out);
        }
        if let Some(s) = as_stateful(p) {
            out.push(s);
        }
    }
    let mut out = Vec::new();
    walk(plan, &mut out);
    out
}

/// A join kept by `state_ttl` has no time bound, so the rows it emits can
/// be any age: an operator above it that drops rows by event time (a
/// windowed aggregate, a join with a bound, ...) would drop them as late.
/// Refused, naming both.
fn refuse_ttl_join_under_event_time(plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
    fn ttl_join_below(p: &Arc<dyn ExecutionPlan>) -> Option<String> {
        for c in p.children() {
            let any: &dyn std::any::Any = c.as_ref();
            if let Some(j) = any.downcast_ref::<StreamJoinExec>()
                && j.kept_by_ttl()
            {
                return Some(j.operator_id().to_string());
            }
            if let Some(found) = ttl_join_below(c) {
                return Some(found);
            }
        }
        None
    }
    let mut refused = None;
    let _ = plan.apply(|p| {
        if let Some(op) = as_stateful(p).filter(|op| op.has_late_rows())
            && let Some(join) = ttl_join_below(p)
        {
            refused = Some(Error::not_supported(format!(
                "operator '{}' ({}) reads the rows of join '{join}', which has no time bound and keeps its rows for state_ttl: those rows can be of any age, and '{}' would drop them as late; bound the join's event times (b.ts BETWEEN a.ts AND a.ts + INTERVAL ...) or join equal windows",
                op.operator_id(),
                op.description(),
                op.operator_id()
            )));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    refused.map_or(Ok(()), Err)
}

/// Each stateful node's input watermark delay (ms), by operator id: as in
/// Spark 3.5, an operator's input watermark is the minimum of its inputs'
/// output watermarks, and a node's output watermark is its input watermark
/// less its [`StatefulExec::output_delay_ms`] (a join emits rows whose
/// event time can be that far behind). Only joins delay it, so a query
/// without one has every delay 0.
pub fn watermark_delays(plan: &Arc<dyn ExecutionPlan>) -> BTreeMap<String, i64> {
    fn walk(p: &Arc<dyn ExecutionPlan>, out: &mut BTreeMap<String, i64>) -> i64 {
        let below = p
            .children()
            .into_iter()
            .map(|c| walk(c, out))
            .max()
            .unwrap_or(0);
        match as_stateful(p) {
            Some(s) => {
                out.insert(s.operator_id().to_string(), below);
                below.saturating_add(s.output_delay_ms())
            }
            None => below,
        }
    }
    let mut out = BTreeMap::new();
    walk(plan, &mut out);
    out
}

/// The first (bottom-most) aggregate node of `plan`.
pub fn first_aggregate(plan: &Arc<dyn ExecutionPlan>) -> Option<&StreamingAggregateExec> {
    stateful_nodes(plan).into_iter().find_map(|n| {
        let any: &dyn std::any::Any = n;
        any.downcast_ref::<StreamingAggregateExec>()
    })
}

/// Whether `plan` reads a stream: a stream scan or a stateful node below.
fn reads_stream(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut found = false;
    let _ = plan.apply(|p| {
        if is_stream_scan(p.as_ref()) || as_stateful(p).is_some() {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// How the streaming planner configures the stateful nodes of one query.
#[derive(Debug, Clone, Copy)]
pub struct StatefulOptions {
    /// The sink's output mode: how the topmost stateful node emits (the
    /// ones below it emit append-only rows).
    pub mode: OutputMode,
    /// Drop an unwindowed aggregate's keys not updated for this long.
    pub state_ttl: Option<std::time::Duration>,
    /// How many updating edges the logical plan signs (operators whose
    /// changes an aggregate or a top-N takes back): the physical plan must
    /// have as many, or a sign was optimized away.
    pub signed_edges: usize,
}

/// The names of the streams' watermark columns in `plan`: a deduplication
/// keyed by one of them forgets keys as the watermark passes.
pub fn event_time_columns(plan: &datafusion::logical_expr::LogicalPlan) -> Vec<String> {
    sluice_planner::stream_tables(plan)
        .iter()
        .filter_map(|t| t.watermark().map(|w| w.column))
        .collect()
}

/// Puts stateful nodes into DataFusion's physical plan of a streaming
/// query: every aggregate over streams becomes a
/// [`StreamingAggregateExec`] (aggregates over static tables alone stay as
/// they are). The topmost stateful node emits in `options.mode`; in
/// changelog mode the plan above it carries the change columns, and a
/// [`changelog::ChangelogExec`] at the root turns them into `_op`.
pub fn plan_stateful(
    physical: Arc<dyn ExecutionPlan>,
    options: StatefulOptions,
    event_time_columns: &[String],
) -> Result<Arc<dyn ExecutionPlan>> {
    let mut count: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut failure: Option<Error> = None;
    let planned = physical
        .transform_up(|node| {
            if failure.is_some() {
                return Ok(Transformed::no(node));
            }
            match top_n(&node) {
                Ok(Some(RankFilter {
                    window,
                    through,
                    filter,
                    limit,
                })) if reads_stream(&window) => {
                    let n = count.entry("topn").or_default();
                    let id = operator_id("topn", *n);
                    *n += 1;
                    #[allow(deprecated)]
                    let rebuilt = topn_node(id, &window, limit).and_then(|t| {
                        let mut below: Arc<dyn ExecutionPlan> = Arc::new(t);
                        if let Some(p) = &through {
                            below = Arc::clone(p).with_new_children(vec![below])?;
                        }
                        Ok(Arc::clone(&filter).with_new_children(vec![below])?)
                    });
                    return match rebuilt {
                        Ok(plan) => Ok(Transformed::yes(plan)),
                        Err(e) => {
                            failure = Some(e);
                            Ok(Transformed::no(node))
                        }
                    };
                }
                Err(e) => {
                    failure = Some(e);
                    return Ok(Transformed::no(node));
                }
                _ => {}
            }
            {
                use datafusion::physical_plan::joins::HashJoinExec;
                let any: &dyn std::any::Any = node.as_ref();
                if let Some(join) = any.downcast_ref::<HashJoinExec>()
                    && reads_stream(join.left())
                    && reads_stream(join.right())
                {
                    let n = count.entry("join").or_default();
                    let id = operator_id("join", *n);
                    *n += 1;
                    return match StreamJoinExec::from_hash_join(
                        id,
                        join,
                        event_time_columns,
                        options.state_ttl,
                    ) {
                        Ok(exec) => Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>)),
                        Err(e) => {
                            failure = Some(e);
                            Ok(Transformed::no(node))
                        }
                    };
                }
                let two_streams = node.name().contains("Join")
                    && node.children().len() == 2
                    && node.children().iter().all(|c| reads_stream(c));
                if two_streams {
                    failure = Some(Error::not_supported(format!(
                        "a join of two streams planned as {}: a stream-stream join needs at least one equality between the two sides (a.k = b.k)",
                        node.name()
                    )));
                    return Ok(Transformed::no(node));
                }
            }
            match aggregate::top_aggregate(&node) {
                Some(src) if reads_stream(&node) && aggregate::without_functions(&src) => {
                    let n = count.entry("dedup").or_default();
                    let id = operator_id("dedup", *n);
                    *n += 1;
                    let any: &dyn std::any::Any = src.as_ref();
                    let built = any
                        .downcast_ref::<datafusion::physical_plan::aggregates::AggregateExec>()
                        .ok_or_else(|| Error::internal("a deduplication without its aggregate"))
                        .and_then(|agg| {
                            DedupExec::from_distinct(
                                id,
                                &node,
                                agg,
                                event_time_columns,
                                options.state_ttl,
                            )
                        });
                    match built {
                        Ok(exec) => Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>)),
                        Err(e) => {
                            failure = Some(e);
                            Ok(Transformed::no(node))
                        }
                    }
                }
                Some(_) if reads_stream(&node) => {
                    let n = count.entry("aggregate").or_default();
                    let id = operator_id("aggregate", *n);
                    *n += 1;
                    match StreamingAggregateExec::try_new(id, Arc::clone(&node), options.state_ttl)
                    {
                        Ok(exec) => Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>)),
                        Err(e) => {
                            failure = Some(e);
                            Ok(Transformed::no(node))
                        }
                    }
                }
                _ => Ok(Transformed::no(node)),
            }
        })
        .map_err(Error::from)?
        .data;
    if let Some(e) = failure {
        return Err(e);
    }
    refuse_ttl_join_under_event_time(&planned)?;
    // Aggregates that feed an aggregate undoing old values emit signed changes.
    let (planned, signed) = changelog::sign_edges(planned)?;
    if signed != options.signed_edges {
        return Err(Error::internal(format!(
            "the physical plan signs {signed} updating edge(s), the logical plan {}: a sign column was optimized away",
            options.signed_edges
        )));
    }
    // A window function over a stream that did not become a stateful node
    // would number each batch's rows on their own: refuse it.
    let mut stray = false;
    let _ = planned.apply(|p| {
        if window_parts(p).is_some() && reads_stream(p) {
            stray = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if stray {
        return Err(Error::not_supported(
            "a window function over a stream in this form keeps state across micro-batches; write ROW_NUMBER() OVER (PARTITION BY ... ORDER BY ...) AS rn in a subquery and filter it with WHERE rn <= N (or rn = 1) right above it",
        ));
    }
    if stateful_nodes(&planned).is_empty() || options.mode == OutputMode::Append {
        return Ok(planned);
    }
    // The topmost stateful node emits in the sink's mode.
    let planned = set_top_mode(planned, options.mode)?;
    if options.mode == OutputMode::Changelog {
        return changelog::carry_to_root(planned);
    }
    Ok(planned)
}

/// A filter on a window node's row number (see [`top_n`]).
struct RankFilter {
    window: Arc<dyn ExecutionPlan>,
    /// A projection between the filter and the window node.
    through: Option<Arc<dyn ExecutionPlan>>,
    filter: Arc<dyn ExecutionPlan>,
    limit: usize,
}

/// If `node` is a filter `row_number <= N` (or `= 1`, `< N + 1`) right over
/// a window node computing one `row_number` (or over a projection of its
/// columns): the window node, the projection, the filter, and N.
fn top_n(node: &Arc<dyn ExecutionPlan>) -> Result<Option<RankFilter>> {
    use datafusion::logical_expr::Operator;
    use datafusion::physical_plan::expressions::{BinaryExpr, Column, Literal};
    use datafusion::physical_plan::filter::FilterExec;
    let any: &dyn std::any::Any = node.as_ref();
    let Some(filter) = any.downcast_ref::<FilterExec>() else {
        return Ok(None);
    };
    // The filter reads the window node directly, or through a projection
    // that passes the row number on as a column.
    let mut window = Arc::clone(filter.input());
    let mut through: Option<Arc<dyn ExecutionPlan>> = None;
    let mut column_map: Option<Vec<Option<usize>>> = None;
    {
        let any: &dyn std::any::Any = window.as_ref();
        if let Some(p) = any.downcast_ref::<datafusion::physical_plan::projection::ProjectionExec>()
        {
            column_map = Some(
                p.expr()
                    .iter()
                    .map(|e| {
                        let any: &dyn std::any::Any = e.expr.as_ref();
                        any.downcast_ref::<Column>().map(Column::index)
                    })
                    .collect(),
            );
            through = Some(Arc::clone(&window));
            window = Arc::clone(p.input());
        }
    }
    let Some((exprs, _)) = window_parts(&window) else {
        return Ok(None);
    };
    let [expr] = exprs.as_slice() else {
        return Ok(None);
    };
    if !is_row_number(expr) {
        return Ok(None);
    }
    let rn = window.schema().fields().len() - 1;
    let pred: &dyn std::any::Any = filter.predicate().as_ref();
    let Some(b) = pred.downcast_ref::<BinaryExpr>() else {
        return Ok(None);
    };
    let col: &dyn std::any::Any = b.left().as_ref();
    let lit: &dyn std::any::Any = b.right().as_ref();
    let (Some(col), Some(lit)) = (col.downcast_ref::<Column>(), lit.downcast_ref::<Literal>())
    else {
        return Ok(None);
    };
    let read = match &column_map {
        Some(map) => map.get(col.index()).copied().flatten(),
        None => Some(col.index()),
    };
    if read != Some(rn) {
        return Ok(None);
    }
    let value = lit
        .value()
        .cast_to(&datafusion::arrow::datatypes::DataType::Int64)
        .ok()
        .and_then(|v| match v {
            datafusion::common::ScalarValue::Int64(Some(v)) => Some(v),
            _ => None,
        });
    let limit = match (b.op(), value) {
        (Operator::Eq, Some(1)) => 1,
        (Operator::LtEq, Some(n)) if n >= 1 => n,
        (Operator::Lt, Some(n)) if n >= 2 => n - 1,
        _ => return Ok(None),
    };
    Ok(Some(RankFilter {
        window,
        through,
        filter: Arc::clone(node),
        limit: limit as usize,
    }))
}

/// A window node's window expressions and its input.
type WindowParts = (
    Vec<Arc<dyn datafusion::physical_expr::window::WindowExpr>>,
    Arc<dyn ExecutionPlan>,
);

/// A window node's window expressions and input.
fn window_parts(plan: &Arc<dyn ExecutionPlan>) -> Option<WindowParts> {
    use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec};
    let any: &dyn std::any::Any = plan.as_ref();
    if let Some(w) = any.downcast_ref::<BoundedWindowAggExec>() {
        return Some((w.window_expr().to_vec(), Arc::clone(w.input())));
    }
    any.downcast_ref::<WindowAggExec>()
        .map(|w| (w.window_expr().to_vec(), Arc::clone(w.input())))
}

/// Whether a window expression is `ROW_NUMBER()` (whatever its alias).
fn is_row_number(expr: &Arc<dyn datafusion::physical_expr::window::WindowExpr>) -> bool {
    use datafusion::physical_expr::window::StandardWindowExpr;
    use datafusion::physical_plan::windows::WindowUDFExpr;
    let any: &dyn std::any::Any = expr.as_any();
    any.downcast_ref::<StandardWindowExpr>().is_some_and(|w| {
        w.get_standard_func_expr()
            .as_any()
            .downcast_ref::<WindowUDFExpr>()
            .is_some_and(|f| f.fun().name() == "row_number")
    })
}

/// The top-N node for the window node `window` (one `row_number`) kept to
/// `limit` rows per partition. Its child is the window node's input without
/// the sort and hash repartition DataFusion put under it for the window.
fn topn_node(id: String, window: &Arc<dyn ExecutionPlan>, limit: usize) -> Result<TopNExec> {
    use datafusion::physical_plan::expressions::Column;
    use datafusion::physical_plan::repartition::RepartitionExec;
    use datafusion::physical_plan::sorts::sort::SortExec;
    let (exprs, mut input) =
        window_parts(window).ok_or_else(|| Error::internal("not a window node"))?;
    loop {
        let any: &dyn std::any::Any = input.as_ref();
        if let Some(s) = any.downcast_ref::<SortExec>() {
            input = Arc::clone(s.input());
        } else if let Some(r) = any.downcast_ref::<RepartitionExec>() {
            input = Arc::clone(r.input());
        } else {
            break;
        }
    }
    let expr = &exprs[0];
    let partition = expr
        .partition_by()
        .iter()
        .map(|e| {
            let any: &dyn std::any::Any = e.as_ref();
            let name = any
                .downcast_ref::<Column>()
                .map_or_else(|| e.to_string(), |c| c.name().to_string());
            (Arc::clone(e), name)
        })
        .collect();
    TopNExec::try_new(
        id,
        input,
        partition,
        expr.order_by().to_vec(),
        limit,
        window.schema(),
    )
}

/// `plan` with its topmost stateful node emitting in `mode`, and the nodes
/// above it rebuilt over it.
fn set_top_mode(plan: Arc<dyn ExecutionPlan>, mode: OutputMode) -> Result<Arc<dyn ExecutionPlan>> {
    let any: &dyn std::any::Any = plan.as_ref();
    if let Some(agg) = any.downcast_ref::<StreamingAggregateExec>() {
        return Ok(Arc::new(agg.with_emit(mode)?));
    }
    if let Some(dedup) = any.downcast_ref::<DedupExec>() {
        return Ok(Arc::new(dedup.with_emit(mode)));
    }
    if let Some(topn) = any.downcast_ref::<TopNExec>() {
        return Ok(Arc::new(topn.with_emit(mode)));
    }
    if let Some(join) = any.downcast_ref::<StreamJoinExec>() {
        return Ok(Arc::new(join.with_emit(mode)));
    }
    let children = plan.children();
    if !children.iter().any(|c| !stateful_nodes(c).is_empty()) {
        return Ok(plan);
    }
    let new: Vec<Arc<dyn ExecutionPlan>> = children
        .into_iter()
        .map(|c| set_top_mode(Arc::clone(c), mode))
        .collect::<Result<_>>()?;
    #[allow(deprecated)]
    plan.with_new_children(new).map_err(Error::from)
}

/// The properties of a stateful node: one partition of `schema`, all of
/// it at the end of the batch.
pub(crate) fn node_properties(schema: SchemaRef) -> Arc<PlanProperties> {
    Arc::new(PlanProperties::new(
        EquivalenceProperties::new(schema),
        Partitioning::UnknownPartitioning(1),
        EmissionType::Final,
        Boundedness::Bounded,
    ))
}

/// A node's one-partition output: the batches `run` computes for the
/// batch, as a stream of `schema`.
pub(crate) fn run_once<F>(
    name: &str,
    partition: usize,
    schema: SchemaRef,
    run: F,
) -> datafusion::common::Result<SendableRecordBatchStream>
where
    F: std::future::Future<Output = Result<Vec<RecordBatch>>> + Send + 'static,
{
    use futures::{StreamExt, TryStreamExt};
    if partition != 0 {
        return Err(DataFusionError::Internal(format!(
            "{name} has one partition, asked for {partition}"
        )));
    }
    let rows = futures::stream::once(async move {
        run.await
            .map_err(|e| DataFusionError::External(Box::new(e)))
    })
    .map_ok(|batches| futures::stream::iter(batches.into_iter().map(Ok)))
    .try_flatten();
    Ok(Box::pin(RecordBatchStreamAdapter::new(
        schema,
        rows.boxed(),
    )))
}

/// `rows` (of `schema`) as inserts with the change columns: how a node whose
/// rows never change emits in changelog mode.
pub(crate) fn as_inserts(
    schema: &SchemaRef,
    rows: RecordBatch,
    batch_id: BatchId,
) -> Result<RecordBatch> {
    use datafusion::arrow::array::{StringArray, UInt64Array};
    let n = rows.num_rows();
    let mut cols = rows.columns().to_vec();
    cols.push(Arc::new(StringArray::from(vec!["+I"; n])));
    cols.push(Arc::new(UInt64Array::from_iter_values(
        (0..n as u64).map(|j| (batch_id << 32) | j),
    )));
    Ok(RecordBatch::try_new(
        changelog::with_change_fields(schema),
        cols,
    )?)
}

/// `true` where a timestamp (a window end, or an event time) is after the
/// watermark `wm` (ms), or NULL: the window is open, the row not late.
pub(crate) fn after_watermark(
    time: &datafusion::arrow::array::ArrayRef,
    wm: i64,
) -> Result<datafusion::arrow::array::BooleanArray> {
    use datafusion::arrow::array::{Array, AsArray, BooleanArray, TimestampMillisecondArray};
    use datafusion::arrow::compute::kernels::cmp::gt;
    use datafusion::arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
    let ms =
        datafusion::arrow::compute::cast(time, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    let ms = ms.as_primitive::<TimestampMillisecondType>();
    let later = gt(ms, &TimestampMillisecondArray::new_scalar(wm))?;
    // A null time is never behind the watermark.
    let keep = match ms.nulls() {
        Some(valid) => &!valid.inner() | later.values(),
        None => later.values().clone(),
    };
    Ok(BooleanArray::new(keep, None))
}

/// The id of the `n`th (from 0, bottom up) operator of a kind.
pub fn operator_id(kind: &str, n: usize) -> String {
    match n {
        0 => kind.to_string(),
        n => format!("{kind}-{n}"),
    }
}

/// Opens the state of every stateful node of `plan` under
/// `<checkpoint>/state/<operator id>` (checking or writing each store's
/// `meta`); call it with the checkpoint's lock held.
pub fn open_states(
    plan: &Arc<dyn ExecutionPlan>,
    checkpoint: &Path,
    durability: Durability,
    snapshot_fallback: bool,
) -> Result<OperatorStates> {
    let mut states = OperatorStates::new();
    for node in stateful_nodes(plan) {
        let (keys, values) = node.state_schemas();
        let options = StateStoreOptions {
            durability,
            snapshot_fallback,
            ..StateStoreOptions::default()
        };
        let id = node.operator_id().to_string();
        let dir = checkpoint.join("state").join(&id);
        let store = StateStore::new(Some(dir), keys, values, options)
            .map_err(|e| e.context(format!("operator '{id}'")))?;
        states.insert(
            id,
            Arc::new(tokio::sync::Mutex::new(OperatorState {
                store,
                dirty: false,
                report: OperatorReport::default(),
            })),
        );
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, TimestampMicrosecondArray};

    use super::after_watermark;

    #[test]
    fn a_time_after_the_watermark_or_null_is_kept_in_any_unit() {
        // Microseconds: 1.5 ms, 2 ms, 2.999 ms, null, 3 ms against 2 ms
        // (compared as milliseconds, as the watermark is).
        let t: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![
            Some(1_500),
            Some(2_000),
            Some(2_999),
            None,
            Some(3_000),
        ]));
        let keep = after_watermark(&t, 2).unwrap();
        let got: Vec<Option<bool>> = keep.iter().collect();
        assert_eq!(
            got,
            vec![
                Some(false),
                Some(false),
                Some(false),
                Some(true),
                Some(true)
            ]
        );
    }
}
