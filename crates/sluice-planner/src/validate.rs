//! Checks that a query over streams can run incrementally, naming the
//! operator, the mode and the fix when it cannot.
//!
//! A streaming query is either stateless — each micro-batch's output depends
//! only on that micro-batch's rows and static tables — or it has stateful
//! operators over its streams, today grouped aggregates, whose state the
//! executor keeps per operator. Aggregates may be chained: an aggregate may
//! read another one's rows when that edge is append-only (an event-time
//! window with a watermark, as in Spark). The topmost one may have only
//! projections and filters (e.g. `HAVING`) above it. Everything else that
//! would need state (DISTINCT, window functions, ORDER BY, LIMIT,
//! stream–stream joins) is refused at planning with a "not supported yet"
//! error, never run with a wrong answer.

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, JoinType, LogicalPlan};
pub use sluice_common::OutputMode;
use sluice_common::{Error, Result};

use crate::stream_table::{as_stream_table, stream_tables};

/// The name of the column that ends an event-time window (from `TUMBLE`).
pub const WINDOW_END: &str = "window_end";

/// What kind of incremental plan a query needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanShape {
    /// The grouped aggregates over streams, bottom up (the order their
    /// operator ids count in); the last is the topmost.
    pub aggregates: Vec<AggregateShape>,
}

impl PlanShape {
    /// Whether the query keeps state.
    pub fn is_stateful(&self) -> bool {
        !self.aggregates.is_empty()
    }

    /// The topmost stateful aggregate: the one whose rows the sink gets.
    pub fn top(&self) -> Option<&AggregateShape> {
        self.aggregates.last()
    }
}

/// A stateful operator of a query: a grouped aggregate, or a
/// deduplication (`SELECT DISTINCT`, an aggregate without functions).
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateShape {
    /// The operator id: its kind numbered bottom up (`aggregate`,
    /// `aggregate-1`, ..., `dedup`, ...).
    pub id: String,
    /// Whether it is a deduplication: it emits each distinct row once.
    pub dedup: bool,
    /// For `ROW_NUMBER() OVER (PARTITION BY keys ORDER BY ...) <= N`: N.
    pub topn: Option<usize>,
    /// For a join of two streams: its type (`Inner`, `Left`, ...); `keys`
    /// then holds its condition.
    pub join: Option<String>,
    /// The group keys, as written.
    pub keys: Vec<String>,
    /// The aggregate functions, as written.
    pub aggregates: Vec<String>,
    /// Whether the keys include an event-time window (`window_end`).
    pub windowed: bool,
    /// Whether some source of the query declares a watermark.
    pub watermarked: bool,
    /// Whether the window is a session window (sessions merge).
    pub session: bool,
    /// Whether another stateful operator reads its rows.
    pub feeds: bool,
    /// Whether it feeds an aggregate that undoes its old values (it emits
    /// each change as signed rows; see [`crate::retract`]).
    pub feeds_signed: bool,
    /// Whether it reads such signed rows: its functions are kept as signed
    /// sums, and it takes old values back.
    pub undoes: bool,
    /// For a top-N without a window (other than keep-first): its kept rows
    /// change, so it emits updates.
    pub updates: bool,
}

/// Checks that `plan` reads at least one stream, can run incrementally, and
/// suits `mode`; returns its shape. `name` is the query's name, for messages.
pub fn check_streaming_plan(name: &str, plan: &LogicalPlan, mode: OutputMode) -> Result<PlanShape> {
    let signed = crate::retract::sign_updating_edges(plan.clone())?;
    let plan = &signed;
    let mut shape = PlanShape::default();
    if !walk(plan, Above::Root, &mut shape)? {
        return Err(Error::plan(format!(
            "query '{name}' reads no stream (only static tables): run it as a batch query, or read a source created with CREATE SOURCE"
        )));
    }
    let has_watermark = stream_tables(plan).iter().any(|t| t.watermark().is_some());
    let (mut aggregates, mut dedups, mut topns, mut joins) = (0, 0, 0, 0);
    for a in shape.aggregates.iter_mut() {
        a.watermarked = has_watermark;
        let (kind, n) = if a.join.is_some() {
            ("join", &mut joins)
        } else if a.topn.is_some() {
            ("topn", &mut topns)
        } else if a.dedup {
            ("dedup", &mut dedups)
        } else {
            ("aggregate", &mut aggregates)
        };
        a.id = match *n {
            0 => kind.to_string(),
            k => format!("{kind}-{k}"),
        };
        *n += 1;
    }
    // A deduplication's or a top-N's rows never change: it may feed anything.
    for a in shape
        .aggregates
        .iter()
        .filter(|a| a.feeds && !a.feeds_signed && !a.dedup && a.topn.is_none() && a.join.is_none())
    {
        if !(a.windowed && has_watermark) {
            return Err(Error::not_supported(format!(
                "query '{name}': the aggregate {} GROUP BY {} feeds another stateful operator, which needs rows that never change (an append-only edge): {}; the one updating edge that runs is into an unwindowed aggregate of count, sum and avg (of signed integers or floats; sum also of decimals), without DISTINCT, which undoes old values",
                a.aggregates.join(", "),
                keys_text(a),
                if a.windowed {
                    "declare a WATERMARK on the stream's time column so that its windows close"
                } else {
                    "group it by an event-time window (TUMBLE/HOP) and declare a WATERMARK, so that it emits each window once, when it closes"
                }
            )));
        }
    }
    if let Some(a) = shape.top().filter(|a| a.updates) {
        let n = a.topn.unwrap_or(1);
        let fits = match mode {
            OutputMode::Changelog => true,
            OutputMode::Update => n == 1,
            _ => false,
        };
        if !fits {
            return Err(Error::plan(format!(
                "query '{name}': ROW_NUMBER() <= {n} without a window over [{}] changes the rows it kept (a better row pushes one out), so output mode {mode} cannot carry it; use output_mode = 'changelog'{}",
                a.keys.join(", "),
                if n == 1 {
                    " (-U old row, +U new row), or 'update' (the new row per key)"
                } else {
                    " (-U old row, +U new row, per rank)"
                }
            )));
        }
    }
    if let Some(a) = shape
        .top()
        .filter(|a| a.dedup || a.topn.is_some() || a.join.is_some())
    {
        return match mode {
            OutputMode::Complete => Err(Error::plan(format!(
                "query '{name}': output mode complete re-emits a whole result table and needs an aggregate; the {} of [{}] emits each row once, so use output_mode = 'append', 'update' or 'changelog'",
                if a.dedup {
                    "deduplication"
                } else if a.join.is_some() {
                    "stream-stream join"
                } else {
                    "ROW_NUMBER() top-N"
                },
                a.keys.join(", ")
            ))),
            OutputMode::Changelog if plan.schema().fields().iter().any(|f| f.name() == "_op") => {
                Err(Error::plan(format!(
                    "query '{name}': output mode changelog adds an _op column, and the query already has one; rename it"
                )))
            }
            _ => Ok(shape),
        };
    }
    match (shape.top(), mode) {
        (None, OutputMode::Append | OutputMode::Update) => Ok(shape),
        (None, OutputMode::Complete) => Err(Error::plan(format!(
            "query '{name}': output mode complete re-emits the whole result table and needs an aggregate; this query is stateless (projection/filter/join), so use output_mode = 'append' or 'update'"
        ))),
        (_, OutputMode::Changelog) if plan.schema().fields().iter().any(|f| f.name() == "_op") => {
            Err(Error::plan(format!(
                "query '{name}': output mode changelog adds an _op column, and the query already has one; rename it"
            )))
        }
        (_, OutputMode::Changelog) => Ok(shape),
        (Some(a), OutputMode::Append) if !(a.windowed && has_watermark) => {
            Err(Error::plan(format!(
                "query '{name}': output mode append on the aggregate {} GROUP BY {} emits a row once and never changes it, so it needs an event-time window (GROUP BY window_start, window_end of TUMBLE(...)) and a WATERMARK on the stream's time column; {}or use output_mode = 'update' or 'complete'",
                a.aggregates.join(", "),
                keys_text(a),
                match (a.windowed, has_watermark) {
                    (false, _) => "the aggregate has no window; ",
                    (true, false) => "no source declares a watermark; ",
                    _ => "",
                }
            )))
        }
        (Some(_), _) => Ok(shape),
    }
}

/// Whether `plan` computes a session window's end (below any aggregate in
/// it: an aggregate over a session aggregate does not merge sessions).
pub fn uses_session_end(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        if matches!(node, LogicalPlan::Aggregate(_)) {
            return Ok(TreeNodeRecursion::Jump);
        }
        for e in node.expressions() {
            let _ = e.apply(|x| {
                if let Expr::ScalarFunction(f) = x
                    && f.name() == crate::windows::SESSION_END
                {
                    found = true;
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// `GROUP BY` keys as a user reads them.
fn keys_text(a: &AggregateShape) -> String {
    if a.keys.is_empty() {
        "()".to_string()
    } else {
        a.keys.join(", ")
    }
}

/// If `plan` is `WHERE rn = 1 | rn <= N | rn < N + 1` over (through
/// projections and aliases) a window node computing one `ROW_NUMBER()`:
/// that window node and N.
pub(crate) fn row_number_filter(
    plan: &LogicalPlan,
) -> Option<(&datafusion::logical_expr::Window, usize)> {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    let LogicalPlan::Filter(f) = plan else {
        return None;
    };
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = &f.predicate else {
        return None;
    };
    let (Expr::Column(_), Expr::Literal(v, _)) = (left.as_ref(), right.as_ref()) else {
        return None;
    };
    let n = match v
        .cast_to(&datafusion::arrow::datatypes::DataType::Int64)
        .ok()?
    {
        datafusion::common::ScalarValue::Int64(Some(n)) => n,
        _ => return None,
    };
    let limit = match (op, n) {
        (Operator::Eq, 1) => 1,
        (Operator::LtEq, n) if n >= 1 => n,
        (Operator::Lt, n) if n >= 2 => n - 1,
        _ => return None,
    };
    let mut node = f.input.as_ref();
    loop {
        match node {
            LogicalPlan::Projection(p) => node = p.input.as_ref(),
            LogicalPlan::SubqueryAlias(a) => node = a.input.as_ref(),
            LogicalPlan::Window(w)
                if w.window_expr.len() == 1 && row_number_parts(&w.window_expr[0]).is_some() =>
            {
                return Some((w, limit as usize));
            }
            _ => return None,
        }
    }
}

/// A `ROW_NUMBER()` window expression's partition keys and order.
fn row_number_parts(e: &Expr) -> Option<(&[Expr], &[datafusion::logical_expr::SortExpr])> {
    let e = match e {
        Expr::Alias(a) => a.expr.as_ref(),
        e => e,
    };
    let Expr::WindowFunction(wf) = e else {
        return None;
    };
    if !wf.fun.name().eq_ignore_ascii_case("row_number") {
        return None;
    }
    Some((&wf.params.partition_by, &wf.params.order_by))
}

/// Whether the top-N `ROW_NUMBER() ... <= limit` of `window` emits
/// updates: it has no window, and it is not keep-first. Keep-first
/// (append) is `= 1` ascending by a time column, rows arriving in time
/// order as Flink's deduplication assumes, or without an order (the first
/// to arrive, as `drop_duplicates`); by any other column a later row can
/// rank first.
pub(crate) fn top_n_updates(window: &datafusion::logical_expr::Window, limit: usize) -> bool {
    let Some((partition, order)) = row_number_parts(&window.window_expr[0]) else {
        return false;
    };
    let windowed = partition
        .iter()
        .any(|e| matches!(e, Expr::Column(c) if c.name == WINDOW_END));
    let by_time = order.first().is_none_or(|o| {
        use datafusion::logical_expr::ExprSchemable;
        o.asc
            && matches!(
                o.expr.get_type(window.input.schema()),
                Ok(datafusion::arrow::datatypes::DataType::Timestamp(_, _))
            )
    });
    !windowed && (limit > 1 || !by_time)
}

/// A `ROW_NUMBER() ... <= N` over a stream: a top-N per window, (N = 1,
/// ascending, no window) keep-first deduplication, or a top-N without a
/// window, which emits updates (so it must be the last stateful operator).
fn walk_top_n(
    window: &datafusion::logical_expr::Window,
    limit: usize,
    above: Above,
    shape: &mut PlanShape,
) -> Result<bool> {
    if !walk(&window.input, Above::Aggregate, shape)? {
        return Ok(false);
    }
    let (partition, _) = row_number_parts(&window.window_expr[0]).expect("checked");
    let keys: Vec<String> = partition
        .iter()
        .map(|e| e.schema_name().to_string())
        .collect();
    let windowed = partition.iter().any(|e| match e {
        Expr::Column(c) => c.name == WINDOW_END,
        _ => false,
    });
    let refuse = |what: &str, fix: &str| {
        Err(Error::not_supported(format!(
            "{what} over a stream keeps state across micro-batches and emits updates; it is not built yet; {fix}"
        )))
    };
    if above == Above::Other {
        return refuse(
            "ROW_NUMBER() followed by an operator other than a projection, a filter or an aggregate",
            "apply it last",
        );
    }
    let updates = top_n_updates(window, limit);
    if updates && !matches!(above, Above::Root | Above::Signed) {
        return refuse(
            &format!(
                "ROW_NUMBER() <= {limit} without a window (a top-N whose rows change) feeding another stateful operator"
            ),
            "partition by window_start, window_end of TUMBLE(...) for a top-N per window, whose rows never change; only an unwindowed count, sum or avg may read its changes",
        );
    }
    shape.aggregates.push(AggregateShape {
        id: String::new(),
        dedup: false,
        topn: Some(limit),
        join: None,
        keys,
        aggregates: vec![],
        windowed,
        watermarked: false,
        session: false,
        feeds: matches!(above, Above::Aggregate | Above::Signed),
        feeds_signed: above == Above::Signed,
        undoes: window
            .input
            .schema()
            .has_column_with_unqualified_name(crate::retract::SIGN),
        updates,
    });
    Ok(true)
}

/// Whether a join of two streams of this type runs (the join node and
/// this planner refuse the rest alike): all but mark joins.
pub fn stream_join_runs(join_type: JoinType) -> bool {
    matches!(
        join_type,
        JoinType::Inner
            | JoinType::Left
            | JoinType::Right
            | JoinType::Full
            | JoinType::LeftSemi
            | JoinType::RightSemi
            | JoinType::LeftAnti
            | JoinType::RightAnti
    )
}

/// A join of two streams: a stateful join node. Both sides need a
/// watermark (their rows are evicted by it); anti and mark joins are not
/// built. Whether the condition bounds the two event times is checked when
/// the physical plan is made (`plan_stateful`).
fn walk_stream_join(
    j: &datafusion::logical_expr::Join,
    above: Above,
    shape: &mut PlanShape,
) -> Result<bool> {
    if !stream_join_runs(j.join_type) {
        return Err(Error::not_supported(format!(
            "a {} join of two streams (a mark join, from EXISTS or IN under OR) keeps state across micro-batches; it is not built yet; inner, left, right, full outer, semi (EXISTS / IN) and anti (NOT EXISTS) joins of two streams are",
            j.join_type
        )));
    }
    if j.null_aware {
        return Err(Error::not_supported(
            "NOT IN over a stream (a null-aware anti join: one NULL on the other side empties the result, for ever) keeps state across micro-batches; it is not built yet; write NOT EXISTS (... WHERE a.k = b.k ...) instead",
        ));
    }
    for (side, input) in [("left", &j.left), ("right", &j.right)] {
        if let Some(t) = stream_tables(input)
            .iter()
            .find(|t| t.watermark().is_none())
        {
            return Err(Error::plan(format!(
                "a join of two streams needs a watermark on every stream it reads, to know when a row can no longer match; stream '{}' on its {side} side has none: declare WATERMARK FOR <time column> AS <time column> - INTERVAL '...' in its CREATE SOURCE",
                t.source().name()
            )));
        }
    }
    let mut keys: Vec<String> = j.on.iter().map(|(l, r)| format!("{l} = {r}")).collect();
    if let Some(f) = &j.filter {
        keys.push(f.to_string());
    }
    shape.aggregates.push(AggregateShape {
        id: String::new(),
        dedup: false,
        topn: None,
        join: Some(j.join_type.to_string()),
        keys,
        aggregates: vec![],
        windowed: false,
        watermarked: true,
        session: false,
        feeds: matches!(above, Above::Aggregate | Above::Signed),
        feeds_signed: above == Above::Signed,
        undoes: false,
        updates: false,
    });
    Ok(true)
}

/// What stands above a node of the plan, as far as stateful operators care.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Above {
    /// Only projections, filters and aliases up to the root: an aggregate
    /// here is the topmost, and the sink gets its rows.
    Root,
    /// Stateless operators up to a stateful aggregate that reads the rows.
    Aggregate,
    /// Stateless operators up to an aggregate that undoes old values,
    /// through the projection that gives each change its sign.
    Signed,
    /// Some other operator with no stateful one above it.
    Other,
}

/// Whether `plan` reads a stream. `above` says what stands between the
/// root and here. Fails on an operator that would need state.
fn walk(plan: &LogicalPlan, above: Above, shape: &mut PlanShape) -> Result<bool> {
    if let LogicalPlan::TableScan(scan) = plan {
        return Ok(as_stream_table(scan).is_some());
    }
    if let Some((window, limit)) = row_number_filter(plan) {
        return walk_top_n(window, limit, above, shape);
    }
    let passes = matches!(
        plan,
        LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_)
    );
    let stream_join = matches!(plan, LogicalPlan::Join(j)
        if !stream_tables(&j.left).is_empty() && !stream_tables(&j.right).is_empty());
    let signs = matches!(plan, LogicalPlan::Projection(p)
    if p.expr.iter().any(|e| crate::retract::is_sign_placeholder(match e {
        Expr::Alias(a) => a.expr.as_ref(),
        e => e,
    })));
    let below = match (plan, above) {
        (LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(_), _) => Above::Aggregate,
        (LogicalPlan::Join(_), _) if stream_join => Above::Aggregate,
        (_, Above::Aggregate | Above::Signed) if signs => Above::Signed,
        (_, Above::Root) if passes => Above::Root,
        (_, Above::Aggregate) => Above::Aggregate,
        (_, Above::Signed) if passes => Above::Signed,
        _ => Above::Other,
    };
    let mut flags = Vec::new();
    for input in plan.inputs() {
        flags.push(walk(input, below, shape)?);
    }
    if !flags.iter().any(|f| *f) {
        return Ok(false);
    }
    let stateful = |what: String, fix: &str| {
        Err(Error::not_supported(format!(
            "{what} keeps state across micro-batches; {fix}"
        )))
    };
    match plan {
        LogicalPlan::Aggregate(a) => {
            let keys: Vec<String> = a
                .group_expr
                .iter()
                .map(|e| e.schema_name().to_string())
                .collect();
            let aggs: Vec<String> = crate::retract::written_functions(
                a.aggr_expr
                    .iter()
                    .map(|e| e.schema_name().to_string())
                    .collect(),
            );
            if a.group_expr
                .iter()
                .any(|e| matches!(e, Expr::GroupingSet(_)))
            {
                return stateful(
                    "GROUPING SETS / ROLLUP / CUBE over a stream".into(),
                    "they are not built yet for streams; group by plain keys",
                );
            }
            if above == Above::Other {
                return stateful(
                    format!(
                        "the aggregate {} followed by an operator other than a projection, a filter or another aggregate (a join, a sort, a union, ...)",
                        aggs.join(", ")
                    ),
                    "only projections and filters (HAVING) may follow a streaming aggregate, or another aggregate over its windows",
                );
            }
            let windowed = a.group_expr.iter().any(|e| match e {
                Expr::Column(c) => c.name == WINDOW_END,
                _ => false,
            });
            shape.aggregates.push(AggregateShape {
                id: String::new(),
                dedup: aggs.is_empty(),
                topn: None,
                join: None,
                keys,
                aggregates: aggs,
                windowed,
                watermarked: false,
                session: uses_session_end(&a.input),
                feeds: matches!(above, Above::Aggregate | Above::Signed),
                feeds_signed: above == Above::Signed,
                undoes: a
                    .input
                    .schema()
                    .has_column_with_unqualified_name(crate::retract::SIGN),
                updates: false,
            });
            Ok(true)
        }
        LogicalPlan::Distinct(datafusion::logical_expr::Distinct::All(input)) => {
            // Planned as an aggregate without functions: a deduplication.
            if above == Above::Other {
                return stateful(
                    "SELECT DISTINCT followed by an operator other than a projection, a filter or an aggregate".into(),
                    "deduplicate last, or aggregate its rows",
                );
            }
            shape.aggregates.push(AggregateShape {
                id: String::new(),
                dedup: true,
                topn: None,
                join: None,
                keys: input
                    .schema()
                    .columns()
                    .iter()
                    .map(|c| c.flat_name())
                    .collect(),
                aggregates: vec![],
                windowed: false,
                watermarked: false,
                session: false,
                feeds: matches!(above, Above::Aggregate | Above::Signed),
                feeds_signed: above == Above::Signed,
                undoes: false,
                updates: false,
            });
            Ok(true)
        }
        LogicalPlan::Distinct(_) => stateful(
            "DISTINCT ON over a stream".into(),
            "it is not built yet for streams; use SELECT DISTINCT, or ROW_NUMBER() in a batch query over the sink",
        ),
        LogicalPlan::Window(w) => stateful(
            format!(
                "window function {} over a stream",
                w.window_expr
                    .iter()
                    .map(|e| e.schema_name().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "it is not built yet for streams; compute it over the sink's output as a batch query instead",
        ),
        LogicalPlan::Sort(_) => stateful(
            "ORDER BY over a stream".into(),
            "a stream has no end to sort to; sort the sink's output instead",
        ),
        LogicalPlan::Limit(_) => stateful(
            "LIMIT over a stream".into(),
            "limit the sink's output instead",
        ),
        LogicalPlan::Join(j) => {
            let (left, right) = (flags[0], flags[1]);
            if left && right {
                return walk_stream_join(j, above, shape);
            }
            let ok = match j.join_type {
                JoinType::Inner => true,
                JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => {
                    left
                }
                JoinType::Right
                | JoinType::RightSemi
                | JoinType::RightAnti
                | JoinType::RightMark => right,
                JoinType::Full => false,
            };
            if ok {
                Ok(true)
            } else {
                stateful(
                    format!(
                        "a {} join with the stream on its {} side (it must remember which static rows no stream row matched)",
                        j.join_type,
                        if left { "left" } else { "right" }
                    ),
                    "use an inner join, or an outer join that keeps the stream's rows",
                )
            }
        }
        LogicalPlan::RecursiveQuery(_) => stateful(
            "a recursive query over a stream".into(),
            "rewrite it without WITH RECURSIVE",
        ),
        LogicalPlan::Extension(e) => Err(Error::not_supported(format!(
            "operator {} over a stream",
            e.node.name()
        ))),
        _ => Ok(true),
    }
}
