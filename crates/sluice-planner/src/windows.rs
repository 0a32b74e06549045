//! Window table functions in `FROM`: `TUMBLE(t, ts, size)` becomes a
//! subquery over `t` that adds `window_start` and `window_end`, so that a
//! windowed aggregate is an ordinary `GROUP BY window_start, window_end, ...`
//! that DataFusion plans and the streaming executor keeps state for.
//!
//! Both also add `window_time`, the window's last instant (its end minus
//! one unit of the timestamp), for a later window over an aggregate's rows.
//! `HOP(t, ts, slide, size)` gives each row one copy per window it falls in.
//! `SESSION(t, ts, gap)` gives each row the session `[ts, ts + gap)`, marked
//! by [`SESSION_END`]; the aggregate merges overlapping sessions per key.

use std::ops::ControlFlow;

use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, Query, Select,
    SelectItem, SetExpr, TableFactor, Value, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use sluice_common::{Error, Result};

/// Rewrites every window table function of `query` in place.
pub fn rewrite_windows(query: &mut Query) -> Result<()> {
    rewrite_window_grouping(query)?;
    let mut v = Rewriter;
    match query.visit(&mut v) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(e) => Err(e),
    }
}

struct Rewriter;

/// Spark's grouping function: `GROUP BY window(ts, '10 seconds' [, '5 seconds'])`
/// becomes `FROM TUMBLE(t, ts, ...)` (or `HOP`) with `GROUP BY window_start,
/// window_end`; in the select list `window.start` / `window.end` become
/// `window_start` / `window_end`, and `window` a struct of both.
fn rewrite_window_grouping(query: &mut Query) -> Result<()> {
    rewrite_set_expr(query.body.as_mut())
}

fn rewrite_set_expr(body: &mut SetExpr) -> Result<()> {
    match body {
        SetExpr::Select(select) => rewrite_select(select),
        SetExpr::Query(q) => rewrite_window_grouping(q),
        SetExpr::SetOperation { left, right, .. } => {
            rewrite_set_expr(left)?;
            rewrite_set_expr(right)
        }
        _ => Ok(()),
    }
}

/// `window(col, 'size' [, 'slide'])` or `session_window(col, 'gap')` as
/// (function, col, size or gap, slide).
fn window_call(e: &Expr) -> Option<(String, String, String, Option<String>)> {
    let Expr::Function(f) = e else { return None };
    let func = f.name.to_string().to_ascii_lowercase();
    if func != "window" && func != "session_window" {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    let args: Vec<&Expr> = list
        .args
        .iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect();
    let text = |e: &Expr| match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    };
    match args.as_slice() {
        [c, size] => Some((func, c.to_string(), text(size)?, None)),
        [c, size, slide] if func == "window" => {
            Some((func, c.to_string(), text(size)?, Some(text(slide)?)))
        }
        _ => None,
    }
}

fn rewrite_select(select: &mut Select) -> Result<()> {
    for twj in &mut select.from {
        if let TableFactor::Derived { subquery, .. } = &mut twj.relation {
            rewrite_window_grouping(subquery)?;
        }
    }
    let GroupByExpr::Expressions(keys, _) = &mut select.group_by else {
        return Ok(());
    };
    let Some(at) = keys.iter().position(|k| window_call(k).is_some()) else {
        return Ok(());
    };
    let (func, ts, size, slide) = window_call(&keys[at]).expect("found above");
    let [twj] = select.from.as_mut_slice() else {
        return Err(Error::not_supported(
            "window() with several tables in FROM; use TUMBLE(...) or HOP(...) in FROM instead",
        ));
    };
    if !twj.joins.is_empty() {
        return Err(Error::not_supported(
            "window() over a join; use TUMBLE(...) or HOP(...) in FROM instead",
        ));
    }
    let (table, alias) = match &twj.relation {
        TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } => (name.to_string(), alias.as_ref().map(|a| a.name.to_string())),
        TableFactor::Derived {
            subquery, alias, ..
        } => (
            format!("({subquery})"),
            alias.as_ref().map(|a| a.name.to_string()),
        ),
        other => return Err(Error::not_supported(format!("window() over {other}"))),
    };
    let interval = |d: &str| format!("INTERVAL '{}'", d.replace('\'', "''"));
    twj.relation = match (func.as_str(), &slide) {
        ("session_window", _) => rewrite("SESSION", &[table, ts, interval(&size)], alias)?,
        (_, None) => rewrite("TUMBLE", &[table, ts, interval(&size)], alias)?,
        (_, Some(slide)) => rewrite("HOP", &[table, ts, interval(slide), interval(&size)], alias)?,
    };
    keys.splice(
        at..=at,
        [
            Expr::Identifier(Ident::new("window_start")),
            Expr::Identifier(Ident::new("window_end")),
        ],
    );
    let as_struct = || {
        Parser::new(&GenericDialect {})
            .try_with_sql("named_struct('start', window_start, 'end', window_end)")
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| Error::internal(format!("window struct: {e}")))
    };
    for item in &mut select.projection {
        let (expr, unnamed) = match item {
            SelectItem::UnnamedExpr(e) => (e, true),
            SelectItem::ExprWithAlias { expr, .. } => (expr, false),
            _ => continue,
        };
        let whole = window_call(expr).is_some()
            || matches!(expr, Expr::Identifier(i) if i.value.eq_ignore_ascii_case(&func));
        if whole {
            let s = as_struct()?;
            *item = if unnamed {
                SelectItem::ExprWithAlias {
                    expr: s,
                    alias: Ident::new(func.clone()),
                }
            } else {
                let SelectItem::ExprWithAlias { alias, .. } = item else {
                    unreachable!()
                };
                SelectItem::ExprWithAlias {
                    expr: s,
                    alias: alias.clone(),
                }
            };
            continue;
        }
        let _ = expr.visit(&mut FieldRefs);
    }
    if let Some(h) = &mut select.having {
        let _ = h.visit(&mut FieldRefs);
    }
    Ok(())
}

/// `window.start` / `window.end` as the window columns.
struct FieldRefs;

impl VisitorMut for FieldRefs {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::CompoundIdentifier(parts) = e
            && let [w, field] = parts.as_slice()
            && (w.value.eq_ignore_ascii_case("window")
                || w.value.eq_ignore_ascii_case("session_window"))
        {
            let name = match field.value.to_ascii_lowercase().as_str() {
                "start" => "window_start",
                "end" => "window_end",
                _ => return ControlFlow::Continue(()),
            };
            *e = Expr::Identifier(Ident::new(name));
        }
        ControlFlow::Continue(())
    }
}

impl VisitorMut for Rewriter {
    type Break = Error;

    fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<Error> {
        let TableFactor::Table {
            name,
            args: Some(args),
            alias,
            ..
        } = tf
        else {
            return ControlFlow::Continue(());
        };
        let func = name.to_string().to_ascii_uppercase();
        if !matches!(func.as_str(), "TUMBLE" | "HOP" | "SESSION") {
            return ControlFlow::Continue(());
        }
        let args: Vec<String> = args
            .args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => e.to_string(),
                other => other.to_string(),
            })
            .collect();
        match rewrite(&func, &args, alias.as_ref().map(|a| a.name.to_string())) {
            Ok(new) => {
                *tf = new;
                ControlFlow::Continue(())
            }
            Err(e) => ControlFlow::Break(e),
        }
    }
}

fn rewrite(func: &str, args: &[String], alias: Option<String>) -> Result<TableFactor> {
    let (table, windows) = match (func, args) {
        ("TUMBLE", [table, ts, size]) => {
            // date_bin aligns windows to the Unix epoch, as Spark and Flink do.
            let start = format!("date_bin({size}, {ts}, {EPOCH})");
            let body = format!(
                "SELECT *, {start} AS window_start, {WINDOW_END_FN}({start}, {size}) AS window_end, {WINDOW_TIME_FN}({WINDOW_END_FN}({start}, {size})) AS window_time FROM {{input}}"
            );
            (table, body)
        }
        ("TUMBLE", _) => {
            return Err(Error::plan(format!(
                "TUMBLE takes (table, time column, size), e.g. TUMBLE(bids, ts, INTERVAL '10' SECOND); got {} arguments",
                args.len()
            )));
        }
        ("HOP", [table, ts, slide, size]) => {
            // A row is in every window [s, s + size) with s a multiple of
            // slide and ts - size < s <= ts: generate the grid points from
            // the one at or before ts - size up to the one at or before ts,
            // and keep the windows that contain ts.
            let first = format!("date_bin({slide}, {ts} - {size}, {EPOCH})");
            let last = format!("date_bin({slide}, {ts}, {EPOCH})");
            let body = format!(
                "SELECT * EXCLUDE (__hop_start), __hop_start AS window_start, {WINDOW_END_FN}(__hop_start, {size}) AS window_end, {WINDOW_TIME_FN}({WINDOW_END_FN}(__hop_start, {size})) AS window_time FROM \
                 (SELECT *, unnest(generate_series({first}, {last}, {slide})) AS __hop_start FROM {{input}}) \
                 WHERE {WINDOW_END_FN}(__hop_start, {size}) > {ts}"
            );
            (table, body)
        }
        ("SESSION", [table, ts, gap]) => {
            // Each row opens a session [ts, ts + gap); the aggregate merges
            // overlapping sessions of the same key, across batches too.
            let body = format!(
                "SELECT *, {ts} AS window_start, {SESSION_END}({ts}, {gap}) AS window_end FROM {{input}}"
            );
            (table, body)
        }
        ("SESSION", _) => {
            return Err(Error::plan(format!(
                "SESSION takes (table, time column, gap), e.g. SESSION(clicks, ts, INTERVAL '30' MINUTE); got {} arguments",
                args.len()
            )));
        }
        ("HOP", _) => {
            return Err(Error::plan(format!(
                "HOP takes (table, time column, slide, size), e.g. HOP(bids, ts, INTERVAL '5' SECOND, INTERVAL '10' SECOND); got {} arguments",
                args.len()
            )));
        }
        (other, _) => {
            return Err(Error::internal(format!("{other} is not a window function")));
        }
    };
    // A subquery as the table needs a name of its own.
    let (input, default_alias) = if table.trim_start().starts_with('(') {
        (
            format!("{table} AS __window_input"),
            func.to_ascii_lowercase(),
        )
    } else {
        (table.clone(), table.clone())
    };
    let alias = alias.unwrap_or(default_alias);
    let sql = format!(
        "SELECT * FROM ({}) AS {alias}",
        windows.replace("{input}", &input)
    );
    let mut q = Parser::new(&GenericDialect {})
        .try_with_sql(&sql)
        .and_then(|mut p| p.parse_query())
        .map_err(|e| Error::plan(format!("{func}({}): {e}", args.join(", "))))?;
    match q.body.as_mut() {
        datafusion::sql::sqlparser::ast::SetExpr::Select(s) => Ok(s.from.remove(0).relation),
        _ => Err(Error::internal("window rewrite did not produce a SELECT")),
    }
}

/// The function that ends a session window: `ts + gap`. Its name marks a
/// session window in a plan, so the aggregate knows to merge sessions.
pub const SESSION_END: &str = "sluice_session_end";

/// The function that ends a tumbling or hopping window: `start + size`.
pub const WINDOW_END_FN: &str = "sluice_window_end";

/// A window's last instant, `window_time`: its end minus one unit of the
/// timestamp (Spark's and Flink's `window_time`), so a later window over
/// an aggregate's rows puts each in the window its own window ends in.
pub const WINDOW_TIME_FN: &str = "sluice_window_time";

/// The scalar functions the window rewrites call, to register in a
/// session: `sluice_session_end`, `sluice_window_end`, `sluice_window_time`.
pub fn window_udfs() -> Vec<ScalarUDF> {
    vec![
        SessionEnd::udf(),
        SessionEnd::window_end_udf(),
        window_time_udf(),
    ]
}

/// `sluice_window_time`, to call from a DataFrame.
pub fn window_time_udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(WindowTime {
        signature: Signature::any(1, Volatility::Immutable),
    })
}

/// `sluice_window_time(end)`: `end` minus one unit of its timestamp type.
#[derive(Debug, PartialEq, Eq, Hash)]
struct WindowTime {
    signature: Signature,
}

impl ScalarUDFImpl for WindowTime {
    fn name(&self) -> &str {
        WINDOW_TIME_FN
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        match &arg_types[0] {
            t @ DataType::Timestamp(_, _) => Ok(t.clone()),
            other => datafusion::common::plan_err!(
                "{WINDOW_TIME_FN} takes a window end (a timestamp), got {other}"
            ),
        }
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        use datafusion::arrow::array::{
            DurationMicrosecondArray, DurationMillisecondArray, DurationNanosecondArray,
            DurationSecondArray,
        };
        use datafusion::arrow::datatypes::TimeUnit;
        let [end] = args.args.as_slice() else {
            return datafusion::common::internal_err!("{WINDOW_TIME_FN} takes one argument");
        };
        let end = end.to_array(args.number_rows)?;
        let one: datafusion::arrow::array::ArrayRef = match end.data_type() {
            DataType::Timestamp(TimeUnit::Second, _) => {
                std::sync::Arc::new(DurationSecondArray::from(vec![1]))
            }
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                std::sync::Arc::new(DurationMillisecondArray::from(vec![1]))
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => {
                std::sync::Arc::new(DurationMicrosecondArray::from(vec![1]))
            }
            DataType::Timestamp(TimeUnit::Nanosecond, _) => {
                std::sync::Arc::new(DurationNanosecondArray::from(vec![1]))
            }
            other => {
                return datafusion::common::plan_err!(
                    "{WINDOW_TIME_FN} takes a window end (a timestamp), got {other}"
                );
            }
        };
        Ok(ColumnarValue::Array(
            datafusion::arrow::compute::kernels::numeric::sub(
                &end,
                &datafusion::arrow::array::Scalar::new(one),
            )?,
        ))
    }
}

/// `sluice_session_end(ts, gap)` and `sluice_window_end(start, size)`: both
/// `time + interval`, computed as one vectorised addition when the interval
/// is a fixed length (no months), where DataFusion's `+` goes through the
/// calendar row by row.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SessionEnd {
    name: &'static str,
    signature: Signature,
}

impl SessionEnd {
    /// `sluice_session_end`, to register in a session.
    pub fn udf() -> ScalarUDF {
        Self::named(SESSION_END)
    }

    /// `sluice_window_end`, to register in a session.
    pub fn window_end_udf() -> ScalarUDF {
        Self::named(WINDOW_END_FN)
    }

    fn named(name: &'static str) -> ScalarUDF {
        ScalarUDF::new_from_impl(SessionEnd {
            name,
            signature: Signature::any(2, Volatility::Immutable),
        })
    }
}

impl ScalarUDFImpl for SessionEnd {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        let [time, interval] = args.args.as_slice() else {
            return datafusion::common::internal_err!("{} takes two arguments", self.name);
        };
        let time = time.to_array(args.number_rows)?;
        if let Some(fixed) = fixed_duration(time.data_type(), interval) {
            let sum = datafusion::arrow::compute::kernels::numeric::add(
                &time,
                &datafusion::arrow::array::Scalar::new(fixed),
            )?;
            return Ok(ColumnarValue::Array(sum));
        }
        let interval = interval.to_array(args.number_rows)?;
        Ok(ColumnarValue::Array(
            datafusion::arrow::compute::kernels::numeric::add(&time, &interval)?,
        ))
    }
}

/// A constant interval without months, as a one-element duration array in
/// the unit of `time` (a timestamp without time zone, where a day is always
/// 86,400 seconds); `None` where the calendar matters or units do not divide.
fn fixed_duration(
    time: &DataType,
    interval: &ColumnarValue,
) -> Option<datafusion::arrow::array::ArrayRef> {
    use datafusion::arrow::array::{
        DurationMicrosecondArray, DurationMillisecondArray, DurationNanosecondArray,
        DurationSecondArray,
    };
    use datafusion::arrow::datatypes::TimeUnit;
    use datafusion::common::ScalarValue;
    use std::sync::Arc;
    let DataType::Timestamp(unit, None) = time else {
        return None;
    };
    let ColumnarValue::Scalar(ScalarValue::IntervalMonthDayNano(Some(iv))) = interval else {
        return None;
    };
    if iv.months != 0 {
        return None;
    }
    let nanos = i128::from(iv.days) * 86_400_000_000_000 + i128::from(iv.nanoseconds);
    let per_unit: i128 = match unit {
        TimeUnit::Second => 1_000_000_000,
        TimeUnit::Millisecond => 1_000_000,
        TimeUnit::Microsecond => 1_000,
        TimeUnit::Nanosecond => 1,
    };
    if nanos % per_unit != 0 {
        return None;
    }
    let d = i64::try_from(nanos / per_unit).ok()?;
    Some(match unit {
        TimeUnit::Second => Arc::new(DurationSecondArray::from(vec![d])),
        TimeUnit::Millisecond => Arc::new(DurationMillisecondArray::from(vec![d])),
        TimeUnit::Microsecond => Arc::new(DurationMicrosecondArray::from(vec![d])),
        TimeUnit::Nanosecond => Arc::new(DurationNanosecondArray::from(vec![d])),
    })
}

/// The origin windows are aligned to.
const EPOCH: &str = "TIMESTAMP '1970-01-01T00:00:00'";

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::ast::Statement;

    fn rewritten(sql: &str) -> Result<String> {
        let mut stmt = Parser::parse_sql(&GenericDialect {}, sql)
            .unwrap()
            .remove(0);
        let Statement::Query(q) = &mut stmt else {
            panic!()
        };
        rewrite_windows(q)?;
        Ok(stmt.to_string())
    }

    #[test]
    fn tumble_becomes_a_subquery_with_window_columns() {
        let s = rewritten(
            "SELECT window_start, count(*) FROM TUMBLE(bids, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end",
        )
        .unwrap();
        assert!(s.contains("date_bin(INTERVAL '10' SECOND, ts"), "{s}");
        assert!(s.contains(") AS window_end, "), "{s}");
        assert!(
            s.contains("sluice_window_time(sluice_window_end(")
                && s.contains("AS window_time FROM bids) AS bids"),
            "{s}"
        );
        let s = rewritten(
            "SELECT * FROM TUMBLE(bids, ts, INTERVAL '1' MINUTE) AS b JOIN t ON b.x = t.x",
        )
        .unwrap();
        assert!(s.contains(") AS b JOIN t"), "{s}");
    }

    #[test]
    fn other_windows_and_bad_arguments_are_refused() {
        let e = rewritten("SELECT * FROM SESSION(b, ts)").unwrap_err();
        assert!(e.to_string().contains("SESSION takes"), "{e}");
        let e = rewritten("SELECT * FROM HOP(b, ts, INTERVAL '1' SECOND)").unwrap_err();
        assert!(e.to_string().contains("HOP takes"), "{e}");
        assert!(
            rewritten("SELECT * FROM TUMBLE(b, ts)")
                .unwrap_err()
                .to_string()
                .contains("TUMBLE takes")
        );
        assert!(rewritten("SELECT * FROM generate_series(1, 3)").is_ok());
    }
}

/// Window assignment as a property: the rewritten SQL, run by DataFusion,
/// puts a row in exactly the windows a direct model says.
#[cfg(test)]
mod properties {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use datafusion::arrow::array::{AsArray, RecordBatch, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{
        DataType, Field, Schema, TimeUnit, TimestampMillisecondType,
    };
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;
    use datafusion::sql::sqlparser::ast::Statement;
    use proptest::prelude::*;

    use super::*;

    /// (ts, window_start, window_end) in ms for every row the query yields.
    fn assign(window: &str, ts: &[i64]) -> BTreeSet<(i64, i64, i64)> {
        let mut stmt = Parser::parse_sql(
            &GenericDialect {},
            &format!("SELECT ts, window_start, window_end FROM {window}"),
        )
        .unwrap()
        .remove(0);
        let Statement::Query(q) = &mut stmt else {
            panic!()
        };
        rewrite_windows(q).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        )]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(TimestampMillisecondArray::from(ts.to_vec()))],
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let ctx = SessionContext::new();
            for udf in window_udfs() {
                ctx.register_udf(udf);
            }
            ctx.register_table(
                "t",
                Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
            )
            .unwrap();
            let out = ctx
                .sql(&stmt.to_string())
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let mut got = BTreeSet::new();
            for b in out {
                let col = |i: usize| {
                    datafusion::arrow::compute::cast(
                        b.column(i),
                        &DataType::Timestamp(TimeUnit::Millisecond, None),
                    )
                    .unwrap()
                };
                let (t, s, e) = (col(0), col(1), col(2));
                let (t, s, e) = (
                    t.as_primitive::<TimestampMillisecondType>(),
                    s.as_primitive::<TimestampMillisecondType>(),
                    e.as_primitive::<TimestampMillisecondType>(),
                );
                for i in 0..t.len() {
                    got.insert((t.value(i), s.value(i), e.value(i)));
                }
            }
            got
        })
    }

    /// The windows [s, s + size) with s a multiple of `slide` that hold `ts`.
    fn model(ts: &[i64], slide: i64, size: i64) -> BTreeSet<(i64, i64, i64)> {
        let mut out = BTreeSet::new();
        for &t in ts {
            let mut s = t.div_euclid(slide) * slide;
            while s + size > t {
                out.insert((t, s, s + size));
                s -= slide;
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn tumble_puts_each_row_in_the_one_epoch_aligned_window_that_holds_it(
            ts in proptest::collection::vec(-100_000i64..100_000, 1..20),
            size_s in 1i64..40,
        ) {
            let got = assign(&format!("TUMBLE(t, ts, INTERVAL '{size_s}' SECOND)"), &ts);
            let mut distinct = ts.clone();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(got, model(&distinct, size_s * 1000, size_s * 1000));
        }

        #[test]
        fn hop_puts_each_row_in_every_window_that_holds_it(
            ts in proptest::collection::vec(-100_000i64..100_000, 1..20),
            slide_s in 1i64..15,
            size_s in 1i64..40,
        ) {
            let got = assign(
                &format!("HOP(t, ts, INTERVAL '{slide_s}' SECOND, INTERVAL '{size_s}' SECOND)"),
                &ts,
            );
            let mut distinct = ts.clone();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(got, model(&distinct, slide_s * 1000, size_s * 1000));
        }
    }
}

/// `sluice_within_watermark(time, delay_ms)`: `time`, unchanged. It marks
/// the order of a keep-first `ROW_NUMBER()` built by the DataFrame's
/// `drop_duplicates_within_watermark`: the node keeps a key until the
/// watermark reaches its first row's `time` plus `delay_ms`.
pub const WITHIN_WATERMARK_FN: &str = "sluice_within_watermark";

/// `sluice_within_watermark`, to call from a DataFrame.
pub fn within_watermark_udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(WithinWatermark {
        signature: Signature::any(2, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct WithinWatermark {
    signature: Signature,
}

impl ScalarUDFImpl for WithinWatermark {
    fn name(&self) -> &str {
        WITHIN_WATERMARK_FN
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        match (&arg_types[0], &arg_types[1]) {
            (t @ DataType::Timestamp(_, _), DataType::Int64) => Ok(t.clone()),
            (t, d) => datafusion::common::plan_err!(
                "{WITHIN_WATERMARK_FN} takes an event time (a timestamp) and a delay in ms (BIGINT), got {t} and {d}"
            ),
        }
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        match args.args.into_iter().next() {
            Some(time) => Ok(time),
            None => datafusion::common::internal_err!("{WITHIN_WATERMARK_FN} takes two arguments"),
        }
    }
}
