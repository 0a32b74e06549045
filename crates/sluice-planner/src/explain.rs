//! `EXPLAIN` of a streaming query: what runs per micro-batch, which
//! operators keep state, the output mode and the watermark.

use std::fmt::Write;
use std::sync::Arc;

use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::{ExecutionPlan, displayable};

use crate::stream_table::stream_tables;
use crate::{OutputMode, PlanShape};

/// The text of `EXPLAIN` for query `name`.
pub fn explain_streaming(
    name: &str,
    plan: &LogicalPlan,
    physical: &Arc<dyn ExecutionPlan>,
    shape: &PlanShape,
    mode: OutputMode,
    sink: &str,
    trigger: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "streaming query '{name}'");
    let _ = writeln!(s, "  sink: {sink}");
    let _ = writeln!(s, "  output mode: {mode}");
    let _ = writeln!(s, "  trigger: {trigger}");
    let _ = writeln!(s, "  sources:");
    let mut watermarks = Vec::new();
    for t in stream_tables(plan) {
        let src = t.source();
        let wm = match t.watermark() {
            Some(w) => {
                watermarks.push(format!("{}.{} - {:?}", src.name(), w.column, w.delay));
                format!("watermark {} - {:?}", w.column, w.delay)
            }
            None => "no watermark".to_string(),
        };
        let _ = writeln!(s, "    {} ({}, {wm})", src.name(), src.connector());
    }
    let _ = writeln!(
        s,
        "  watermark: {}",
        if watermarks.is_empty() {
            "none".to_string()
        } else {
            format!("min({})", watermarks.join(", "))
        }
    );
    if !shape.is_stateful() {
        let _ = writeln!(
            s,
            "  state: none (stateless: each micro-batch is computed from its own rows and static tables)"
        );
    }
    let event_columns: Vec<String> = stream_tables(plan)
        .iter()
        .filter_map(|t| t.watermark().map(|w| w.column))
        .collect();
    let physical_text = displayable(physical.as_ref()).indent(true).to_string();
    for a in &shape.aggregates {
        if let Some(kind) = &a.join {
            explain_join(&mut s, a, kind, &physical_text);
            continue;
        }
        if a.dedup {
            explain_dedup(&mut s, a, &event_columns);
            continue;
        }
        if let Some(n) = a.topn {
            explain_topn(&mut s, a, n, &physical_text);
            continue;
        }
        // The topmost operator emits in the sink's mode; the ones below it
        // feed it append-only rows.
        let emit = if a.feeds { OutputMode::Append } else { mode };
        let _ = writeln!(
            s,
            "  state: aggregate {} keyed by [{}] (operator '{}': state/{}/<batch>.delta|.snapshot)",
            a.aggregates.join(", "),
            a.keys.join(", "),
            a.id,
            a.id
        );
        let _ = writeln!(
            s,
            "    per batch: Partial(on-time rows) -> PartialReduce(+ stored states of the same keys) -> store -> Final(keys to emit)"
        );
        if a.undoes {
            let _ = writeln!(
                s,
                "    reads changes: each old value with sign -1, each new one with +1; count, sum and avg are kept as signed sums, and a key whose rows are all taken back leaves the result"
            );
        }
        if a.feeds_signed {
            let _ = writeln!(
                s,
                "    emits: every change as signed rows (old value -1, new value +1) into the next operator, which takes the old value back"
            );
        } else if a.feeds {
            let _ = writeln!(
                s,
                "    emits: append (each window once, when it closes) into the next aggregate"
            );
        }
        let _ = writeln!(
            s,
            "    watermark: the query watermark at the start of the batch (late rows) and at its end (eviction)"
        );
        let (evict, late) = match (a.windowed && a.watermarked, emit) {
            (true, OutputMode::Append) => (
                "emit a window once window_end <= watermark (end of batch), then remove it",
                "rows whose window_end <= watermark at the start of the batch are late: counted, not aggregated",
            ),
            (true, OutputMode::Update | OutputMode::Changelog) => (
                "remove a window once window_end <= watermark (end of batch)",
                "rows whose window_end <= watermark at the start of the batch are late: counted, not aggregated",
            ),
            (true, _) => (
                "none: complete mode keeps every window",
                "none: no window ever closes",
            ),
            (false, _) if a.windowed => (
                "none: without a watermark no window ever closes, and its state is kept",
                "none: without a watermark no row is late",
            ),
            (false, _) => (
                "none: unwindowed state is kept for every key",
                "none: there is no window to close",
            ),
        };
        let _ = writeln!(s, "    eviction: {evict}");
        let _ = writeln!(s, "    late rows: {late}");
    }
    let _ = writeln!(s, "  per micro-batch logical plan:");
    for line in plan.display_indent().to_string().lines() {
        let _ = writeln!(s, "    {line}");
    }
    let _ = writeln!(
        s,
        "  per micro-batch physical plan (built once, re-executed each batch):"
    );
    for line in displayable(physical.as_ref())
        .indent(true)
        .to_string()
        .lines()
    {
        let _ = writeln!(s, "    {line}");
    }
    s
}

/// The `state:` block of a join of two streams; its bound and eviction
/// rule come from its node in the physical plan (`physical`, as text).
fn explain_join(s: &mut String, a: &crate::AggregateShape, kind: &str, physical: &str) {
    let _ = writeln!(
        s,
        "  state: {} join of two streams on [{}] (operator '{}': state/{}/<batch>.delta|.snapshot; both sides' rows, indexed by join key)",
        kind.to_lowercase(),
        readable_intervals(&a.keys.join(" AND ")),
        a.id,
        a.id
    );
    let _ = writeln!(
        s,
        "    per batch: join each side's on-time rows with the other side's stored and new rows, store them, then evict"
    );
    let node = physical
        .lines()
        .find(|l| l.contains(&format!("StreamJoinExec: operator={},", a.id)));
    let eviction = node
        .and_then(|l| l.split_once("eviction="))
        .map_or("see the physical plan", |(_, e)| e);
    let _ = writeln!(s, "    eviction: {eviction}");
    let late = if eviction.starts_with("rows stored more than state_ttl") {
        "none: with no time bound, a row of any event time is joined"
    } else {
        "a row whose event time <= watermark at the start of the batch: counted, not joined"
    };
    let _ = writeln!(s, "    late rows: {late}");
    if a.feeds {
        let _ = writeln!(
            s,
            "    emits: append (joined rows, and NULL-padded ones once no match is possible) into the next operator, whose watermark is delayed by the join's bound"
        );
    }
}

/// `text` with DataFusion's debug form of an interval literal,
/// `IntervalMonthDayNano("IntervalMonthDayNano { months: 0, days: 0,
/// nanoseconds: 60000000000 }")`, written as SQL (`INTERVAL '60' SECOND`).
fn readable_intervals(text: &str) -> String {
    const OPEN: &str = "IntervalMonthDayNano(\"IntervalMonthDayNano { ";
    const CLOSE: &str = " }\")";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        out.push_str(&rest[..at]);
        let body = &rest[at + OPEN.len()..];
        let Some(end) = body.find(CLOSE) else {
            out.push_str(&rest[at..]);
            return out;
        };
        let field = |name: &str| {
            body[..end]
                .split(", ")
                .find_map(|f| {
                    f.strip_prefix(name)?
                        .strip_prefix(": ")?
                        .parse::<i128>()
                        .ok()
                })
                .unwrap_or(0)
        };
        let (months, days, nanos) = (field("months"), field("days"), field("nanoseconds"));
        let mut parts = Vec::new();
        if months != 0 {
            parts.push(format!("INTERVAL '{months}' MONTH"));
        }
        if days != 0 {
            parts.push(format!("INTERVAL '{days}' DAY"));
        }
        if nanos != 0 || parts.is_empty() {
            let secs = nanos as f64 / 1e9;
            parts.push(format!("INTERVAL '{secs}' SECOND"));
        }
        out.push_str(&parts.join(" + "));
        rest = &body[end + CLOSE.len()..];
    }
    out.push_str(rest);
    out
}

/// The `state:` block of a `ROW_NUMBER() <= N`.
fn explain_topn(s: &mut String, a: &crate::AggregateShape, n: usize, physical_text: &str) {
    let _ = writeln!(
        s,
        "  state: top {n} per [{}] by ROW_NUMBER() (operator '{}': state/{}/<batch>.delta|.snapshot)",
        a.keys.join(", "),
        a.id,
        a.id
    );
    if a.windowed {
        let _ = writeln!(
            s,
            "    per batch: keep each open window's best {n} rows; emit them with their row numbers when the window closes"
        );
        let _ = writeln!(
            s,
            "    eviction: a window's rows once window_end <= watermark (end of batch), when they are emitted"
        );
        let _ = writeln!(
            s,
            "    late rows: rows whose window_end <= watermark at the start of the batch are late: counted, not ranked"
        );
    } else if a.updates {
        let _ = writeln!(
            s,
            "    per batch: merge the batch's rows into each partition's {}; a kept row whose rank moved is -U/+U (old and new row number), a row that took a pushed-out row's rank replaces it (-U/+U), other rows that entered are +I, other rows pushed out -D (update mode: the new rows)",
            if a.undoes {
                "rows (the input changes: +1 rows are added, -1 rows take an equal kept row back, and every row is kept so the next one can move up)".to_string()
            } else {
                format!("best {n}")
            }
        );
        let _ = writeln!(
            s,
            "    eviction: none: {}",
            if a.undoes {
                "every row of every partition is kept for ever".to_string()
            } else {
                format!("every partition's best {n} rows are kept for ever")
            }
        );
        if a.feeds_signed {
            let _ = writeln!(
                s,
                "    emits: its changes as signed rows (-1 for -U/-D, +1 for +U/+I) into the next aggregate, which takes them back"
            );
        }
        let _ = writeln!(s, "    late rows: none");
    } else if physical_text.lines().any(|l| {
        l.contains(&format!("operator={},", a.id)) && l.contains("drop_duplicates_within_watermark")
    }) {
        let _ = writeln!(
            s,
            "    per batch: emit the first row of each key not held (the lowest by event time among the batch's rows)"
        );
        let _ = writeln!(
            s,
            "    eviction: a key once the watermark (end of batch) reaches its first row's event time plus the watermark delay"
        );
        let _ = writeln!(
            s,
            "    late rows: rows whose event time <= watermark at the start of the batch are late: counted, not kept"
        );
    } else {
        let _ = writeln!(
            s,
            "    per batch: emit the first row of each key never seen before (the lowest by the order among the batch's rows)"
        );
        let _ = writeln!(s, "    eviction: none: every key is kept for ever");
        let _ = writeln!(s, "    late rows: none");
    }
}

/// The `state:` block of a deduplication.
fn explain_dedup(s: &mut String, a: &crate::AggregateShape, event_columns: &[String]) {
    let _ = writeln!(
        s,
        "  state: dedup keyed by [{}] (operator '{}': state/{}/<batch>.delta|.snapshot)",
        a.keys.join(", "),
        a.id,
        a.id
    );
    let _ = writeln!(
        s,
        "    per batch: emit the rows whose key is not stored (the first of each key), then store their keys"
    );
    let bare = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
    let event = a.keys.iter().find(|k| {
        let k = bare(k);
        k == crate::WINDOW_END || event_columns.contains(&k)
    });
    match event {
        Some(k) if a.watermarked => {
            let _ = writeln!(
                s,
                "    eviction: forget a key once {k} <= watermark (end of batch)"
            );
            let _ = writeln!(
                s,
                "    late rows: rows whose {k} <= watermark at the start of the batch: counted, not emitted"
            );
        }
        _ => {
            let _ = writeln!(
                s,
                "    eviction: none: no event-time column among the keys, so every key is kept for ever (set state_ttl to bound it)"
            );
            let _ = writeln!(s, "    late rows: none");
        }
    }
}

/// A short, stable fingerprint of a logical plan, recorded in the checkpoint.
pub fn fingerprint(plan: &LogicalPlan) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in plan.display_indent().to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::readable_intervals;

    #[test]
    fn interval_literals_read_as_sql() {
        let dbg = |m: i32, d: i32, n: i64| {
            format!(
                "IntervalMonthDayNano(\"IntervalMonthDayNano {{ months: {m}, days: {d}, nanoseconds: {n} }}\")"
            )
        };
        assert_eq!(
            readable_intervals(&format!("b.ts <= a.ts + {}", dbg(0, 0, 60_000_000_000))),
            "b.ts <= a.ts + INTERVAL '60' SECOND"
        );
        assert_eq!(
            readable_intervals(&format!(
                "x - {} < y AND z > {}",
                dbg(1, 2, 500_000_000),
                dbg(0, 0, 0)
            )),
            "x - INTERVAL '1' MONTH + INTERVAL '2' DAY + INTERVAL '0.5' SECOND < y AND z > INTERVAL '0' SECOND"
        );
        // Text that only starts like one is kept as it is.
        let cut = "a + IntervalMonthDayNano(\"IntervalMonthDayNano { months: 0";
        assert_eq!(readable_intervals(cut), cut);
    }
}
