//! Aggregates over an updating edge: an aggregate that reads the rows of
//! another aggregate whose values change (no event-time window closing
//! them), as Nexmark q4's average per category of each auction's highest
//! bid, which rises.
//!
//! The edge is carried as signed rows: the lower aggregate emits every
//! change of a key as its old value with sign −1 and its new value with
//! sign +1 (a new key only the latter). Any stateless operator passes
//! signed rows on unchanged in meaning: a filter that drops the new half of
//! an update leaves the old half, which retracts it. The upper aggregate is
//! rewritten into sums weighted by the sign, which it keeps like any other
//! aggregate state:
//!
//! ```text
//!  count(*)  -> sum(sign)
//!  count(x)  -> sum(x IS NOT NULL ? sign : 0)
//!  sum(x)    -> sum(x * sign), NULL while count(x) is 0
//!  avg(x)    -> sum(x * sign) / count(x)
//! ```
//!
//! plus the group's row count, `sum(sign)`: a group whose rows have all
//! been retracted is no longer in the result (a filter drops it, which a
//! changelog sink sees as `-D`). Functions that cannot be undone from such
//! sums (min, max, DISTINCT, ...) leave the query as it was, and the
//! validator refuses it naming them.
//!
//! In the logical plan the sign is a placeholder function
//! ([`SIGN_PLACEHOLDER`]) in a projection right above the lower aggregate;
//! the physical planner makes that aggregate emit its changes and puts the
//! sign of each change in the placeholder's place.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, ColumnarValue, Expr, ExprSchemable, Filter, LogicalPlan, Projection,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, SubqueryAlias, Volatility, cast, lit,
    when,
};
use sluice_common::{Error, Result};

use crate::stream_table::stream_tables;
use crate::validate::{WINDOW_END, row_number_filter, top_n_updates};

/// The placeholder function that stands for the sign of a change.
pub const SIGN_PLACEHOLDER: &str = "__sluice_change_sign";
/// The column that carries the sign of a change on an updating edge.
pub const SIGN: &str = "__sluice_sign";
/// The hidden row count of an aggregate over an updating edge.
const ROWS: &str = "rows [signed count]";
/// What a function's signed count of rows with a value is named after it.
const COUNT_PART: &str = " [signed count]";
/// What a function's signed sum is named after it.
const SUM_PART: &str = " [signed sum]";

/// The functions an aggregate's names stand for: those of an aggregate
/// over an updating edge named after the functions they were rewritten
/// from, without its row count.
pub fn written_functions(names: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if n == ROWS {
            continue;
        }
        let f = n
            .strip_suffix(COUNT_PART)
            .or_else(|| n.strip_suffix(SUM_PART))
            .unwrap_or(&n)
            .to_string();
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

/// The sign placeholder as a function.
fn placeholder() -> Arc<ScalarUDF> {
    Arc::new(ScalarUDF::new_from_impl(SignPlaceholder {
        signature: Signature::nullary(Volatility::Volatile),
    }))
}

/// Whether `e` calls the sign placeholder.
pub fn is_sign_placeholder(e: &Expr) -> bool {
    matches!(e, Expr::ScalarFunction(f) if f.name() == SIGN_PLACEHOLDER)
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SignPlaceholder {
    signature: Signature,
}

impl ScalarUDFImpl for SignPlaceholder {
    fn name(&self) -> &str {
        SIGN_PLACEHOLDER
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, _: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        // The physical planner replaces every call; one that is left would
        // give every change the same sign.
        datafusion::common::internal_err!(
            "{SIGN_PLACEHOLDER} was not replaced by the sign of the aggregate's changes"
        )
    }
}

/// Rewrites every aggregate over an updating edge whose functions can be
/// undone (count, sum, avg) into sums weighted by the sign of each change,
/// and marks the edge with the sign placeholder. A plan without such an
/// edge, or already rewritten, comes back unchanged.
pub fn sign_updating_edges(plan: LogicalPlan) -> Result<LogicalPlan> {
    let watermarked = stream_tables(&plan).iter().any(|t| t.watermark().is_some());
    let out = plan
        .transform_up(|node| {
            // A top-N without a window over an updating edge: it keeps
            // every row of a partition and takes retracted ones back.
            if let Some((window, limit)) = row_number_filter(&node)
                && top_n_updates(window, limit)
                && !window.input.schema().has_column_with_unqualified_name(SIGN)
            {
                return match signed(&window.input, watermarked) {
                    Ok(Some(input)) => match over_signed_input(&node, input).and_then(without_sign)
                    {
                        Ok(plan) => Ok(Transformed::yes(plan)),
                        Err(e) => Err(datafusion::error::DataFusionError::External(Box::new(e))),
                    },
                    Ok(None) => Ok(Transformed::no(node)),
                    Err(e) => Err(datafusion::error::DataFusionError::External(Box::new(e))),
                };
            }
            let LogicalPlan::Aggregate(agg) = &node else {
                return Ok(Transformed::no(node));
            };
            if agg.input.schema().has_column_with_unqualified_name(SIGN)
                || stream_tables(&agg.input).is_empty()
            {
                return Ok(Transformed::no(node));
            }
            let Some(input) = signed(&agg.input, watermarked)? else {
                return Ok(Transformed::no(node));
            };
            match rewrite(agg, Arc::new(input)) {
                Ok(Some(plan)) => Ok(Transformed::yes(plan)),
                Ok(None) => Ok(Transformed::no(node)),
                Err(e) => Err(datafusion::error::DataFusionError::External(Box::new(e))),
            }
        })
        .map_err(|e| match e {
            datafusion::error::DataFusionError::External(inner) => {
                match inner.downcast::<Error>() {
                    Ok(e) => *e,
                    Err(other) => Error::plan(other.to_string()),
                }
            }
            e => Error::from(e),
        })?;
    Ok(out.data)
}

/// Whether an aggregate's values change after they are emitted: it has
/// functions (a deduplication emits each row once), and no event-time
/// window that a watermark closes.
fn updating(agg: &Aggregate, watermarked: bool) -> bool {
    let windowed = agg
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::Column(c) if c.name == WINDOW_END));
    let closes = windowed && watermarked;
    let dedup = agg.aggr_expr.is_empty();
    !(dedup || closes || crate::validate::uses_session_end(&agg.input))
}

/// `plan` carrying the sign column, if it reads (through projections,
/// filters and aliases) an updating aggregate over streams.
fn signed(plan: &LogicalPlan, watermarked: bool) -> Result<Option<LogicalPlan>> {
    let sign_of = |p: &LogicalPlan| -> Result<Expr> {
        let (q, f) = p
            .schema()
            .qualified_field_with_unqualified_name(SIGN)
            .map_err(Error::from)?;
        Ok(Expr::Column(Column::new(q.cloned(), f.name())))
    };
    // A top-N without a window emits changes too: its own sign replaces
    // the one it read.
    if let Some((window, limit)) = row_number_filter(plan)
        && top_n_updates(window, limit)
        && !stream_tables(plan).is_empty()
    {
        return Ok(Some(reproject_sign(plan.clone(), true)?));
    }
    Ok(match plan {
        LogicalPlan::Projection(p) => match signed(&p.input, watermarked)? {
            Some(input) => {
                let mut expr = p.expr.clone();
                expr.push(sign_of(&input)?);
                Some(LogicalPlan::Projection(Projection::try_new(
                    expr,
                    Arc::new(input),
                )?))
            }
            None => None,
        },
        LogicalPlan::Filter(f) => match signed(&f.input, watermarked)? {
            Some(input) => Some(LogicalPlan::Filter(Filter::try_new(
                f.predicate.clone(),
                Arc::new(input),
            )?)),
            None => None,
        },
        LogicalPlan::SubqueryAlias(a) => match signed(&a.input, watermarked)? {
            Some(input) => Some(LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(
                Arc::new(input),
                a.alias.clone(),
            )?)),
            None => None,
        },
        LogicalPlan::Aggregate(a)
            if !stream_tables(plan).is_empty()
                && !a.schema.has_column_with_unqualified_name(SIGN)
                && updating(a, watermarked) =>
        {
            Some(reproject_sign(plan.clone(), true)?)
        }
        _ => None,
    })
}

/// The top-N `plan` (a filter over projections and aliases over a window
/// node) with the window node reading `input`, which carries the sign.
fn over_signed_input(plan: &LogicalPlan, input: LogicalPlan) -> Result<LogicalPlan> {
    Ok(match plan {
        LogicalPlan::Filter(f) => LogicalPlan::Filter(Filter::try_new(
            f.predicate.clone(),
            Arc::new(over_signed_input(&f.input, input)?),
        )?),
        LogicalPlan::Projection(p) => LogicalPlan::Projection(Projection::try_new(
            p.expr.clone(),
            Arc::new(over_signed_input(&p.input, input)?),
        )?),
        LogicalPlan::SubqueryAlias(a) => LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(
            Arc::new(over_signed_input(&a.input, input)?),
            a.alias.clone(),
        )?),
        LogicalPlan::Window(w) => {
            // The sign joins the ranking's order as a last key (every row
            // the top-N keeps has sign 1, so the ranks do not change): the
            // optimizer would otherwise drop the column, which nothing above
            // the window node reads. The expression keeps its name.
            let exprs: Vec<Expr> = w
                .window_expr
                .iter()
                .map(|e| {
                    let name = e.schema_name().to_string();
                    let inner = match e {
                        Expr::Alias(a) => a.expr.as_ref().clone(),
                        e => e.clone(),
                    };
                    match inner {
                        Expr::WindowFunction(mut wf) => {
                            wf.params
                                .order_by
                                .push(datafusion::logical_expr::SortExpr::new(
                                    Expr::Column(Column::new_unqualified(SIGN)),
                                    true,
                                    false,
                                ));
                            Expr::WindowFunction(wf).alias(name)
                        }
                        other => other.alias(name),
                    }
                })
                .collect();
            LogicalPlan::Window(datafusion::logical_expr::Window::try_new(
                exprs,
                Arc::new(input),
            )?)
        }
        other => {
            return Err(Error::internal(format!(
                "a top-N over changes: unexpected {} between its filter and its window node",
                other.display()
            )));
        }
    })
}

/// `plan` without the sign column it read (the top-N consumed it).
fn without_sign(plan: LogicalPlan) -> Result<LogicalPlan> {
    reproject_sign(plan, false)
}

/// `plan`'s columns but the sign it read (if any), and, with `mark`, a
/// new sign column from the placeholder: the edge out of `plan` carries
/// `plan`'s own changes.
fn reproject_sign(plan: LogicalPlan, mark: bool) -> Result<LogicalPlan> {
    let mut expr: Vec<Expr> = plan
        .schema()
        .columns()
        .into_iter()
        .filter(|c| c.name != SIGN)
        .map(Expr::Column)
        .collect();
    if mark {
        expr.push(
            Expr::ScalarFunction(datafusion::logical_expr::expr::ScalarFunction::new_udf(
                placeholder(),
                vec![],
            ))
            .alias(SIGN),
        );
    }
    Ok(LogicalPlan::Projection(Projection::try_new(
        expr,
        Arc::new(plan),
    )?))
}

/// One function of the upper aggregate, as sums of signed values.
enum Undo {
    /// `count(...)`: the sum of the signs of the counted rows.
    Count { counted: usize },
    /// `sum(x)`: the signed sum, and how many rows had a value.
    Sum { total: usize, counted: usize },
    /// `avg(x)`: the same two, divided.
    Avg { total: usize, counted: usize },
}

/// The aggregate `agg` over `input` (which carries the sign) as signed
/// sums: `Projection(values) <- Filter(rows > 0) <- Aggregate(sums)`, with
/// the original output's names. `None` when a function cannot be undone.
fn rewrite(agg: &Aggregate, input: Arc<LogicalPlan>) -> Result<Option<LogicalPlan>> {
    if agg
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::Column(c) if c.name == WINDOW_END))
    {
        // Its windows would close and drop later retractions as late.
        return Ok(None);
    }
    let (sq, sf) = input
        .schema()
        .qualified_field_with_unqualified_name(SIGN)
        .map_err(Error::from)?;
    let sign = Expr::Column(Column::new(sq.cloned(), sf.name()));
    let in_schema: &DFSchema = input.schema();
    let mut sums: Vec<Expr> = Vec::new();
    let mut undo: Vec<Undo> = Vec::new();
    // Each sum is named after the function it stands for and what it sums.
    let push = |e: Expr, name: String, sums: &mut Vec<Expr>| -> usize {
        sums.push(sum(e).alias(name));
        sums.len() - 1
    };
    for e in &agg.aggr_expr {
        let inner = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            e => e,
        };
        let Expr::AggregateFunction(AggregateFunction { func, params }) = inner else {
            return Ok(None);
        };
        if params.distinct || !params.order_by.is_empty() || params.args.len() != 1 {
            return Ok(None);
        }
        // A FILTER clause counts a row only where it holds.
        let weight = match &params.filter {
            Some(f) => when(f.as_ref().clone(), sign.clone()).otherwise(lit(0i64))?,
            None => sign.clone(),
        };
        let mut x = params.args[0].clone();
        // avg of integers is planned over their cast to Float64: summing
        // the integers instead keeps every retraction exact.
        if let Expr::Cast(c) = &x
            && c.field.data_type() == &DataType::Float64
            && c.expr
                .get_type(in_schema)
                .is_ok_and(|t| t.is_signed_integer())
        {
            x = c.expr.as_ref().clone();
        }
        let written = e.schema_name().to_string();
        let counted = push(
            when(x.clone().is_not_null(), weight.clone()).otherwise(lit(0i64))?,
            format!("{written}{COUNT_PART}"),
            &mut sums,
        );
        let name = func.name().to_ascii_lowercase();
        let ty = x.get_type(in_schema).map_err(Error::from)?;
        let signed_value = |target: DataType| -> Expr {
            // NULL * sign is NULL, which sum skips, as it skips NULL x.
            cast(x.clone(), target) * weight.clone()
        };
        let u = match name.as_str() {
            "count" => Undo::Count { counted },
            "sum" | "avg" => {
                let target = match &ty {
                    DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                        DataType::Int64
                    }
                    DataType::Float16 | DataType::Float32 | DataType::Float64 => DataType::Float64,
                    DataType::Decimal128(_, _) if name == "sum" => ty.clone(),
                    // Unsigned values cannot carry a negative sign, and a
                    // decimal average divides with its own scale rules.
                    _ => return Ok(None),
                };
                let total = push(
                    signed_value(target),
                    format!("{written}{SUM_PART}"),
                    &mut sums,
                );
                if name == "sum" {
                    Undo::Sum { total, counted }
                } else {
                    Undo::Avg { total, counted }
                }
            }
            _ => return Ok(None),
        };
        undo.push(u);
    }
    sums.push(sum(sign.clone()).alias(ROWS));
    let inner = LogicalPlan::Aggregate(Aggregate::try_new(input, agg.group_expr.clone(), sums)?);
    let alive = LogicalPlan::Filter(Filter::try_new(
        Expr::Column(Column::new_unqualified(ROWS)).gt(lit(0i64)),
        Arc::new(inner),
    )?);
    // The values, under the names (and types) of the original output.
    let n_keys = agg.group_expr.len();
    let mut values: Vec<Expr> = Vec::new();
    let out_schema = agg.schema.as_ref();
    let inner_schema = alive.schema().clone();
    let s = |i: usize| -> Expr {
        let (q, f) = inner_schema.qualified_field(n_keys + i);
        Expr::Column(Column::new(q.cloned(), f.name()))
    };
    for i in 0..out_schema.fields().len() {
        let (q, f) = out_schema.qualified_field(i);
        let value = if i < n_keys {
            let (iq, inf) = inner_schema.qualified_field(i);
            Expr::Column(Column::new(iq.cloned(), inf.name()))
        } else {
            let none = Expr::Literal(ScalarValue::try_from(f.data_type())?, None);
            match undo[i - n_keys] {
                Undo::Count { counted } => s(counted),
                Undo::Sum { total, counted } => when(s(counted).eq(lit(0i64)), none)
                    .otherwise(cast(s(total), f.data_type().clone()))?,
                Undo::Avg { total, counted } => {
                    if f.data_type() != &DataType::Float64 {
                        return Ok(None);
                    }
                    when(s(counted).eq(lit(0i64)), none).otherwise(
                        cast(s(total), DataType::Float64) / cast(s(counted), DataType::Float64),
                    )?
                }
            }
        };
        values.push(
            cast_if_needed(value, f.data_type(), &inner_schema)?
                .alias_qualified(q.cloned(), f.name()),
        );
    }
    Ok(Some(LogicalPlan::Projection(Projection::try_new(
        values,
        Arc::new(alive),
    )?)))
}

/// `e` cast to `ty` when its type differs (the keys keep theirs).
fn cast_if_needed(e: Expr, ty: &DataType, schema: &DFSchema) -> Result<Expr> {
    let t = e.get_type(schema).map_err(Error::from)?;
    Ok(if &t == ty { e } else { cast(e, ty.clone()) })
}

/// `SELECT DISTINCT ON (k) ... ORDER BY k, o` over streams as what it
/// means, `ROW_NUMBER() OVER (PARTITION BY k ORDER BY o) = 1`: the first
/// row per key by the order, which runs as a keep-first (ascending by a
/// time) or a top-1 that emits updates. The `ORDER BY` that DISTINCT ON
/// needs also sorts the output, which a stream cannot; that sort goes (a
/// sink's rows have no order). Plans without DISTINCT ON over a stream
/// come back unchanged.
pub fn distinct_on_as_row_number(plan: LogicalPlan) -> Result<LogicalPlan> {
    use datafusion::logical_expr::{Distinct, ExprFunctionExt, Window};
    if stream_tables(&plan).is_empty() {
        return Ok(plan);
    }
    let out = plan
        .transform_up(|node| {
            // The output sort right over a rewritten DISTINCT ON (through
            // projections) goes.
            if let LogicalPlan::Sort(s) = &node
                && marks_distinct_on(&s.input)
            {
                return Ok(Transformed::yes(s.input.as_ref().clone()));
            }
            let LogicalPlan::Distinct(Distinct::On(d)) = &node else {
                return Ok(Transformed::no(node));
            };
            if stream_tables(&d.input).is_empty() {
                return Ok(Transformed::no(node));
            }
            // The ORDER BY starts with the ON keys (DataFusion checks it);
            // within a key they are constant, and the rest is the order.
            let order: Vec<datafusion::logical_expr::SortExpr> = d
                .sort_expr
                .clone()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .filter(|(i, o)| d.on_expr.get(*i) != Some(&o.expr))
                .map(|(_, o)| o)
                .collect();
            let rn = datafusion::functions_window::expr_fn::row_number()
                .partition_by(d.on_expr.clone())
                .order_by(order)
                .build()?
                .alias(DISTINCT_ON_RANK);
            let window = LogicalPlan::Window(Window::try_new(vec![rn], Arc::clone(&d.input))?);
            let first = LogicalPlan::Filter(Filter::try_new(
                Expr::Column(Column::new_unqualified(DISTINCT_ON_RANK)).eq(lit(1u64)),
                Arc::new(window),
            )?);
            let values: Vec<Expr> = d
                .select_expr
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let (q, f) = d.schema.qualified_field(i);
                    e.clone().alias_qualified(q.cloned(), f.name())
                })
                .collect();
            Ok(Transformed::yes(LogicalPlan::Projection(
                Projection::try_new(values, Arc::new(first))?,
            )))
        })
        .map_err(Error::from)?;
    Ok(out.data)
}

/// The row number a rewritten DISTINCT ON filters on.
const DISTINCT_ON_RANK: &str = "__sluice_distinct_on_rank";

/// Whether `plan` is (through projections and aliases) a rewritten
/// DISTINCT ON.
fn marks_distinct_on(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Projection(p) => {
            matches!(p.input.as_ref(), LogicalPlan::Filter(f)
                if f.input.schema().has_column_with_unqualified_name(DISTINCT_ON_RANK))
                || marks_distinct_on(&p.input)
        }
        LogicalPlan::SubqueryAlias(a) => marks_distinct_on(&a.input),
        _ => false,
    }
}
