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
}

/// Checks that `plan` reads at least one stream, can run incrementally, and
/// suits `mode`; returns its shape. `name` is the query's name, for messages.
pub fn check_streaming_plan(name: &str, plan: &LogicalPlan, mode: OutputMode) -> Result<PlanShape> {
    let mut shape = PlanShape::default();
    if !walk(plan, Above::Root, &mut shape)? {
        return Err(Error::plan(format!(
            "query '{name}' reads no stream (only static tables): run it as a batch query, or read a source created with CREATE SOURCE"
        )));
    }
    let has_watermark = stream_tables(plan).iter().any(|t| t.watermark().is_some());
    let (mut aggregates, mut dedups) = (0, 0);
    for a in shape.aggregates.iter_mut() {
        a.watermarked = has_watermark;
        let (kind, n) = if a.dedup {
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
    // A deduplication's rows never change: it may feed anything.
    for a in shape.aggregates.iter().filter(|a| a.feeds && !a.dedup) {
        if !(a.windowed && has_watermark) {
            return Err(Error::not_supported(format!(
                "query '{name}': the aggregate {} GROUP BY {} feeds another stateful operator, which needs rows that never change (an append-only edge): {}; an updating edge into a stateful operator is not supported yet",
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
    if let Some(a) = shape.top().filter(|a| a.dedup) {
        return match mode {
            OutputMode::Complete => Err(Error::plan(format!(
                "query '{name}': output mode complete re-emits a whole result table and needs an aggregate; the deduplication of [{}] emits each distinct row once, so use output_mode = 'append', 'update' or 'changelog'",
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
        (Some(a), OutputMode::Changelog) if a.session => Err(Error::not_supported(format!(
            "query '{name}': output mode changelog on session windows (a merge would retract sessions); use update, append or complete"
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

/// What stands above a node of the plan, as far as stateful operators care.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Above {
    /// Only projections, filters and aliases up to the root: an aggregate
    /// here is the topmost, and the sink gets its rows.
    Root,
    /// Stateless operators up to a stateful aggregate that reads the rows.
    Aggregate,
    /// Some other operator with no stateful one above it.
    Other,
}

/// Whether `plan` reads a stream. `above` says what stands between the
/// root and here. Fails on an operator that would need state.
fn walk(plan: &LogicalPlan, above: Above, shape: &mut PlanShape) -> Result<bool> {
    if let LogicalPlan::TableScan(scan) = plan {
        return Ok(as_stream_table(scan).is_some());
    }
    let passes = matches!(
        plan,
        LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_)
    );
    let below = match (plan, above) {
        (LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(_), _) => Above::Aggregate,
        (_, Above::Root) if passes => Above::Root,
        (_, Above::Aggregate) => Above::Aggregate,
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
            let aggs: Vec<String> = a
                .aggr_expr
                .iter()
                .map(|e| e.schema_name().to_string())
                .collect();
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
                keys,
                aggregates: aggs,
                windowed,
                watermarked: false,
                session: uses_session_end(&a.input),
                feeds: above == Above::Aggregate,
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
                feeds: above == Above::Aggregate,
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
                return stateful(
                    "a join of two streams".into(),
                    "stream-stream joins are not built yet; join a stream with a static table (CREATE EXTERNAL TABLE) instead",
                );
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
