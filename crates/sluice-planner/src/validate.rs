//! Checks that a query over streams can run incrementally, naming the
//! operator and the fix when it cannot.
//!
//! Today every streaming query is stateless: each micro-batch's output
//! depends only on that micro-batch's rows (and static tables). Operators
//! that would need state carried across batches are refused at planning with
//! a "not supported yet" error, never run with a wrong answer.

use datafusion::logical_expr::{JoinType, LogicalPlan};
pub use sluice_common::OutputMode;
use sluice_common::{Error, Result};

use crate::stream_table::as_stream_table;

/// Checks that `plan` reads at least one stream, keeps no state, and suits
/// `mode`. `name` is the query's name, for messages.
pub fn check_streaming_plan(name: &str, plan: &LogicalPlan, mode: OutputMode) -> Result<()> {
    if !reads_stream(plan)? {
        return Err(Error::plan(format!(
            "query '{name}' reads no stream (only static tables): run it as a batch query, or read a source created with CREATE SOURCE"
        )));
    }
    match mode {
        OutputMode::Append | OutputMode::Update => Ok(()),
        OutputMode::Complete => Err(Error::plan(format!(
            "query '{name}': output mode complete re-emits the whole result table and needs an aggregate; this query is stateless (projection/filter/join), so use output_mode = 'append' or 'update'"
        ))),
        OutputMode::Changelog => Err(Error::not_supported(format!(
            "query '{name}': output mode changelog arrives with stateful queries; a stateless query's rows are all inserts, so use output_mode = 'append'"
        ))),
    }
}

/// Whether `plan` reads a stream; fails on an operator that would need state.
fn reads_stream(plan: &LogicalPlan) -> Result<bool> {
    if let LogicalPlan::TableScan(scan) = plan {
        return Ok(as_stream_table(scan).is_some());
    }
    let mut flags = Vec::new();
    for input in plan.inputs() {
        flags.push(reads_stream(input)?);
    }
    let any = flags.iter().any(|f| *f);
    if !any {
        return Ok(false);
    }
    let stateful = |what: String, fix: &str| {
        Err(Error::not_supported(format!(
            "{what} keeps state across micro-batches, and stateful streaming operators are not built yet; {fix}"
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
            let what = if aggs.is_empty() {
                format!(
                    "SELECT DISTINCT / GROUP BY {} over a stream",
                    keys.join(", ")
                )
            } else if keys.is_empty() {
                format!("aggregate {} over a stream", aggs.join(", "))
            } else {
                format!(
                    "aggregate {} GROUP BY {} over a stream",
                    aggs.join(", "),
                    keys.join(", ")
                )
            };
            stateful(what, "aggregate the sink's output as a batch query instead")
        }
        LogicalPlan::Distinct(_) => stateful(
            "DISTINCT over a stream".into(),
            "deduplicate the sink's output as a batch query instead",
        ),
        LogicalPlan::Window(w) => stateful(
            format!(
                "window function {} over a stream",
                w.window_expr
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "compute it over the sink's output as a batch query instead",
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
                    "join a stream with a static table (CREATE EXTERNAL TABLE) instead",
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
