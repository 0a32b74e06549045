//! `drop_duplicates_within_watermark` (Spark's
//! `dropDuplicatesWithinWatermark`), checked against the golden cases of
//! Spark's `StreamingDeduplicationWithinWatermarkSuite` (written out in
//! `sql-tests/peer-cases.md`, S4): their inputs step by step, the rows each
//! step emits, the watermark after it, and the keys left in state.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type, TimeUnit};
use sluice::prelude::*;
use sluice::{ManualClock, OutputMode, StreamingDataFrame};

fn manual() -> StreamContext {
    StreamContext::with_clock(Arc::new(ManualClock::new(1_000_000)))
}

/// The rows of `table` as `k@seconds`, in emission order.
fn emitted(table: &MemoryTable, key: &str) -> Vec<String> {
    let Some(b) = table.to_batch().unwrap() else {
        return vec![];
    };
    let k = cast(b.column_by_name(key).unwrap(), &DataType::Utf8).unwrap();
    let k = k.as_string::<i32>();
    let ts = cast(
        b.column_by_name("ts").unwrap(),
        &DataType::Timestamp(TimeUnit::Second, None),
    )
    .unwrap();
    let ts = cast(&ts, &DataType::Int64).unwrap();
    let ts = ts.as_primitive::<Int64Type>();
    (0..b.num_rows())
        .map(|i| format!("{}@{}", k.value(i), ts.value(i)))
        .collect()
}

struct Run {
    ctx: StreamContext,
    q: sluice::StreamingQuery,
    table: Arc<MemoryTable>,
    key: &'static str,
    seen: usize,
}

impl Run {
    /// Adds `values` (SQL tuples) and runs one batch: the rows it emitted,
    /// the watermark in force during it (s: the one after the previous
    /// batch, Spark's "wm after" of the previous step; keys are evicted
    /// against the one after it, as Spark's no-data batch does), the keys
    /// in state after it, the late rows.
    async fn step(&mut self, values: &str) -> (Vec<String>, Option<i64>, u64, u64) {
        self.ctx
            .sql(&format!("INSERT INTO s VALUES {values}"))
            .await
            .unwrap();
        let p = self.q.run_batch().await.unwrap().expect("a batch ran");
        let all = emitted(&self.table, self.key);
        let new = all[self.seen..].to_vec();
        self.seen = all.len();
        let state = p.operators.first().map_or(0, |o| o.rows);
        (new, p.watermark_ms.map(|w| w / 1000), state, p.late_rows)
    }
}

async fn start(columns: &str, key: &'static str, dedup: &[&str], delay_s: u64) -> Run {
    let ctx = manual();
    ctx.sql(&format!(
        "CREATE SOURCE s ({columns}) WITH (connector = 'memory');"
    ))
    .await
    .unwrap();
    let df = ctx
        .session()
        .table("s")
        .await
        .unwrap()
        .with_watermark("ts", Duration::from_secs(delay_s))
        .unwrap()
        .drop_duplicates_within_watermark(dedup)
        .unwrap();
    let table = MemoryTable::new();
    let q = df
        .write_stream()
        .output_mode(OutputMode::Append)
        .trigger(Trigger::Manual)
        .start(MemorySink::new("out", Arc::clone(&table)))
        .await
        .unwrap();
    Run {
        ctx,
        q,
        table,
        key,
        seen: 0,
    }
}

fn ts(s: i64) -> String {
    format!("TIMESTAMP '1970-01-01T00:00:00' + INTERVAL '{s}' SECOND")
}

/// S4b, "deduplicate with subset of columns which event time column is
/// not in subset": delay 2 s, deduplicated on the key alone.
#[tokio::test]
async fn spark_subset_of_columns_without_the_event_time() {
    let mut r = start("k VARCHAR, ts TIMESTAMP", "k", &["k"], 2).await;
    let row = |k: &str, s: i64| format!("('{k}', {})", ts(s));
    // a@17 is new; it is kept until the watermark reaches 19.
    assert_eq!(
        r.step(&row("a", 17)).await,
        (vec!["a@17".into()], None, 1, 0)
    );
    // The watermark is 15. a@16: a duplicate.
    assert_eq!(r.step(&row("a", 16)).await, (vec![], Some(15), 1, 0));
    // a@13: late (at or below the watermark, 15).
    assert_eq!(r.step(&row("a", 13)).await, (vec![], Some(15), 1, 1));
    // b and c are new; the watermark reaches 20, so a (19) is forgotten.
    let (new, wm, state, _) = r.step(&format!("{}, {}", row("b", 22), row("c", 21))).await;
    assert_eq!((wm, state), (Some(15), 2));
    assert_eq!(new, vec!["b@22".to_string(), "c@21".to_string()]);
    // a is new again, until 23.
    assert_eq!(
        r.step(&row("a", 21)).await,
        (vec!["a@21".into()], Some(20), 3, 0)
    );
    // d is new; the watermark reaches 23: a and c (23) go, b and d stay.
    assert_eq!(
        r.step(&row("d", 25)).await,
        (vec!["d@25".into()], Some(20), 2, 0)
    );
    // The next batch runs under that watermark.
    assert_eq!(r.step(&row("b", 24)).await, (vec![], Some(23), 2, 0));
}

/// S4a, "deduplicate with all columns with event time column in
/// DataFrame": delay 10 s, deduplicated on every column.
#[tokio::test]
async fn spark_all_columns_with_the_event_time() {
    let mut r = start("v BIGINT, ts TIMESTAMP", "v", &["v", "ts"], 10).await;
    let rows = |vs: &[i64]| {
        vs.iter()
            .map(|v| format!("({v}, {})", ts(*v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let five_times: Vec<i64> = (0..5).flat_map(|_| 10..=15).collect();
    let (mut new, wm, state, _) = r.step(&rows(&five_times)).await;
    new.sort();
    let want: Vec<String> = (10..=15).map(|v| format!("{v}@{v}")).collect();
    assert_eq!((new, wm, state), (want, None, 6));
    // The watermark is 5.
    let (mut new, wm, state, _) = r.step(&rows(&[13, 14, 15, 16, 17])).await;
    new.sort();
    assert_eq!(
        (new, wm, state),
        (vec!["16@16".to_string(), "17@17".to_string()], Some(5), 8)
    );
    // It is 7: 5 is late.
    assert_eq!(r.step(&rows(&[5])).await, (vec![], Some(7), 8, 1));
    // It reaches 25 after 35: 10..15 (kept until 20..25) go.
    assert_eq!(
        r.step(&rows(&[35])).await,
        (vec!["35@35".into()], Some(7), 3, 0)
    );
    // It reaches 45 after 55: 16, 17 (26, 27) and 35 (45) go.
    assert_eq!(
        r.step(&rows(&[55])).await,
        (vec!["55@55".into()], Some(25), 1, 0)
    );
}

/// A frame without a watermark is refused, as in Spark.
#[tokio::test]
async fn needs_a_watermark() {
    let ctx = manual();
    ctx.sql("CREATE SOURCE s (k VARCHAR, ts TIMESTAMP) WITH (connector = 'memory');")
        .await
        .unwrap();
    let df = ctx.session().table("s").await.unwrap();
    let e = df
        .clone()
        .drop_duplicates_within_watermark(&["k"])
        .unwrap_err();
    assert!(e.to_string().contains("needs a watermark"), "{e}");
    assert!(df.drop_duplicates_within_watermark(&["nope"]).is_err());
}
