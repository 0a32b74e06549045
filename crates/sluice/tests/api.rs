//! The DataFrame API: triggers on a manual clock, stop, retries of transient
//! failures, fatal data errors, exactly-once delivery to a foreach-batch sink
//! across an injected crash.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde_json::Value;
use sluice::deps::sluice_common::connector::{ReadBatch, SourceContext, SourceReader};
use sluice::prelude::*;
use sluice::{Durability, Fault, FaultPoint, ManualClock, OutputMode, Source, StreamingDataFrame};
use tokio::sync::mpsc;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]))
}

fn rows(v: &[i64]) -> RecordBatch {
    RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(v.to_vec()))]).unwrap()
}

fn values(batches: &[RecordBatch]) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect()
}

/// A sink that reports each batch on a channel: tests wait for batches by
/// receiving, never by sleeping.
fn channel_sink() -> (ForeachBatchSink, mpsc::UnboundedReceiver<(u64, Vec<i64>)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = ForeachBatchSink::new("chan", move |id, batches| {
        let _ = tx.send((id, values(batches)));
        Ok(())
    });
    (sink, rx)
}

/// Starts `df` on a manual trigger into a fresh memory table.
async fn start_into_table(
    df: datafusion::dataframe::DataFrame,
    mode: OutputMode,
) -> (sluice::StreamingQuery, Arc<MemoryTable>) {
    let table = MemoryTable::new();
    let q = df
        .write_stream()
        .output_mode(mode)
        .trigger(Trigger::Manual)
        .start(MemorySink::new("out", Arc::clone(&table)))
        .await
        .unwrap();
    (q, table)
}

/// A memory table's rows as a printed table.
fn table_text(table: &MemoryTable) -> String {
    let rows = table.to_batch().unwrap().unwrap();
    datafusion::arrow::util::pretty::pretty_format_batches(&[rows])
        .unwrap()
        .to_string()
}

/// A batch id and the values delivered with it.
type Delivery = (u64, Vec<i64>);

fn manual() -> (StreamContext, ManualClock) {
    let clock = ManualClock::new(1_000_000);
    (StreamContext::with_clock(Arc::new(clock.clone())), clock)
}

#[tokio::test]
async fn processing_time_trigger_runs_on_the_manual_clock() {
    let (ctx, clock) = manual();
    let src = MemorySource::new("nums", schema());
    src.append(rows(&[1, 2, 3])).unwrap();
    let df = ctx.read_stream(src.clone()).await.unwrap();
    let doubled = df.select(vec![(col("x") * lit(2)).alias("x")]).unwrap();
    let (sink, mut rx) = channel_sink();
    let dir = tempfile::tempdir().unwrap();
    let q = doubled
        .write_stream()
        .trigger(Trigger::ProcessingTime(Duration::from_secs(5)))
        .checkpoint(dir.path())
        .durability(Durability::NoSync)
        .max_batches(2)
        .start(sink)
        .await
        .unwrap();
    assert_eq!(rx.recv().await, Some((0, vec![2, 4, 6])));
    src.append(rows(&[10])).unwrap();
    clock.advance(Duration::from_secs(5));
    assert_eq!(rx.recv().await, Some((1, vec![20])));
    q.await_termination().await.unwrap();
    let progress = q.recent_progress();
    assert_eq!(progress.len(), 2);
    assert_eq!(progress[1].timestamp_ms, 1_005_000);
    assert!(!q.is_active());
}

#[tokio::test]
async fn available_now_runs_capped_batches_then_stops_and_once_runs_one() {
    let (ctx, _clock) = manual();
    let src = MemorySource::new("nums", schema()).with_max_rows_per_trigger(2);
    src.append(rows(&[1, 2, 3, 4, 5])).unwrap();
    let df = ctx.read_stream(src.clone()).await.unwrap();
    let (sink, mut rx) = channel_sink();
    let q = df
        .clone()
        .write_stream()
        .trigger(Trigger::AvailableNow)
        .start(sink)
        .await
        .unwrap();
    q.await_termination().await.unwrap();
    let mut got = Vec::new();
    while let Ok(b) = rx.try_recv() {
        got.push(b);
    }
    assert_eq!(got, vec![(0, vec![1, 2]), (1, vec![3, 4]), (2, vec![5])]);

    let (sink, mut rx) = channel_sink();
    let q = df
        .write_stream()
        .trigger(Trigger::Once)
        .start(sink)
        .await
        .unwrap();
    q.await_termination().await.unwrap();
    assert_eq!(rx.try_recv().ok(), Some((0, vec![1, 2])));
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn stop_ends_a_waiting_trigger_loop() {
    let (ctx, _clock) = manual();
    let src = MemorySource::new("nums", schema());
    src.append(rows(&[7])).unwrap();
    let df = ctx.read_stream(src).await.unwrap();
    let (sink, mut rx) = channel_sink();
    let q = df
        .write_stream()
        .trigger(Trigger::ProcessingTime(Duration::from_secs(3600)))
        .start(sink)
        .await
        .unwrap();
    assert_eq!(rx.recv().await, Some((0, vec![7])));
    // The loop now waits an hour of a clock that never moves; stop wakes it.
    q.stop().await.unwrap();
    assert!(!q.is_active());
}

/// A source whose reads fail with an I/O error a given number of times.
#[derive(Debug, Clone)]
struct Flaky {
    inner: MemorySource,
    failures_left: Arc<Mutex<u32>>,
}

impl Source for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn schema(&self) -> SchemaRef {
        schema()
    }
    fn connector(&self) -> &str {
        "test"
    }
    fn open(&self, ctx: SourceContext) -> sluice::Result<Box<dyn SourceReader>> {
        Ok(Box::new(FlakyReader {
            inner: self.inner.open(ctx)?,
            failures_left: Arc::clone(&self.failures_left),
        }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[derive(Debug)]
struct FlakyReader {
    inner: Box<dyn SourceReader>,
    failures_left: Arc<Mutex<u32>>,
}

#[async_trait]
impl SourceReader for FlakyReader {
    fn initial_offset(&self) -> Value {
        self.inner.initial_offset()
    }
    async fn latest_offset(&mut self, start: &Value) -> sluice::Result<Value> {
        self.inner.latest_offset(start).await
    }
    async fn read(&mut self, start: &Value, end: &Value) -> sluice::Result<ReadBatch> {
        {
            let mut left = self.failures_left.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err(sluice::Error::io(
                    "reading flaky storage",
                    std::io::Error::other("connection reset"),
                ));
            }
        }
        self.inner.read(start, end).await
    }
}

#[tokio::test]
async fn transient_failures_are_retried_with_the_same_offsets() {
    let (ctx, _clock) = manual();
    let mem = MemorySource::new("inner", schema());
    mem.append(rows(&[1, 2])).unwrap();
    let flaky = Flaky {
        inner: mem,
        failures_left: Arc::new(Mutex::new(2)),
    };
    let df = ctx.read_stream(flaky.clone()).await.unwrap();
    let (sink, mut rx) = channel_sink();
    let q = df
        .write_stream()
        .trigger(Trigger::Manual)
        .retry_backoff(Duration::ZERO)
        .start(sink)
        .await
        .unwrap();
    let p = q.run_batch().await.unwrap().unwrap();
    assert_eq!((p.batch_id, p.retries, p.input_rows), (0, 2, 2));
    assert_eq!(rx.try_recv().ok(), Some((0, vec![1, 2])));

    // More failures than retries: the batch fails, and stays planned.
    *flaky.failures_left.lock().unwrap() = 5;
    flaky.inner.append(rows(&[3])).unwrap();
    let e = q.run_batch().await.unwrap_err().to_string();
    assert!(
        e.contains("batch 1") && e.contains("connection reset"),
        "{e}"
    );
    *flaky.failures_left.lock().unwrap() = 0;
    flaky.inner.append(rows(&[4])).unwrap();
    // The re-run reads exactly batch 1's logged range: row 3, not row 4.
    let p = q.run_batch().await.unwrap().unwrap();
    assert_eq!((p.batch_id, p.input_rows, p.recovered), (1, 1, true));
    assert_eq!(rx.try_recv().ok(), Some((1, vec![3])));
}

#[tokio::test]
async fn a_crash_after_the_sink_redelivers_the_same_batch_once_more() {
    let (ctx, _clock) = manual();
    let src = MemorySource::new("nums", schema());
    src.append(rows(&[1])).unwrap();
    src.append(rows(&[2])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let make_sink = || {
        let seen = Arc::clone(&seen);
        ForeachBatchSink::new("log", move |id, b| {
            seen.lock().unwrap().push((id, values(b)));
            Ok(())
        })
    };
    let df = ctx.read_stream(src.clone()).await.unwrap();
    let q = df
        .clone()
        .write_stream()
        .trigger(Trigger::Manual)
        .checkpoint(dir.path())
        .inject_fault(Fault::error_at(FaultPoint::AfterSink, 0))
        .start(make_sink())
        .await
        .unwrap();
    assert!(q.process_all_available().await.is_err());
    drop(q);
    src.append(rows(&[3])).unwrap();
    let q = df
        .write_stream()
        .trigger(Trigger::Manual)
        .checkpoint(dir.path())
        .start(make_sink())
        .await
        .unwrap();
    q.process_all_available().await.unwrap();
    // Batch 0 is delivered again with the same id and rows (a foreach-batch
    // callback dedups by id); row 3 arrived after batch 0 was planned, so it
    // is batch 1's.
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(0, vec![1, 2]), (0, vec![1, 2]), (1, vec![3])]
    );
}

#[tokio::test]
async fn a_bad_record_stops_the_query_and_await_termination_reports_it() {
    let (ctx, _clock) = manual();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.json"), "{\"x\": 1}\n{\"x\": [}\n").unwrap();
    let df = ctx
        .read_stream(FileSource::json(dir.path()).name("files").schema(schema()))
        .await
        .unwrap();
    let (sink, _rx) = channel_sink();
    let q = df
        .write_stream()
        .trigger(Trigger::AvailableNow)
        .start(sink)
        .await
        .unwrap();
    let e = q.await_termination().await.unwrap_err().to_string();
    assert!(
        e.contains("source 'files'") && e.contains("a.json, line 2"),
        "{e}"
    );
}

#[tokio::test]
async fn with_watermark_is_recorded_per_frame_and_progress_reports_it() {
    let (ctx, _clock) = manual();
    ctx.sql(
        "CREATE SOURCE ev (id BIGINT, ts TIMESTAMP) WITH (connector = 'memory');
             INSERT INTO ev VALUES (1, '2026-01-01T00:00:10'), (2, '2026-01-01T00:00:30');",
    )
    .await
    .unwrap();
    let df = ctx.session().table("ev").await.unwrap();
    assert!(
        df.clone()
            .with_watermark("nope", Duration::from_secs(1))
            .is_err()
    );
    let df = df.with_watermark("ts", Duration::from_secs(5)).unwrap();
    let (sink, _rx) = channel_sink();
    let q = df
        .write_stream()
        .trigger(Trigger::Manual)
        .start(sink)
        .await
        .unwrap();
    let p0 = q.run_batch().await.unwrap().unwrap();
    assert_eq!(p0.watermark_ms, None, "no watermark before the first batch");
    ctx.sql("INSERT INTO ev VALUES (3, '2026-01-01T00:00:20')")
        .await
        .unwrap();
    let p1 = q.run_batch().await.unwrap().unwrap();
    // max event time 00:00:30 minus 5 s
    assert_eq!(p1.watermark_ms, Some(1_767_225_625_000));
}

#[tokio::test]
async fn a_windowed_aggregate_from_the_dataframe_api_emits_closed_windows() {
    use datafusion::functions_aggregate::expr_fn::count;
    let (ctx, _clock) = manual();
    ctx.sql("CREATE SOURCE clicks (usr VARCHAR, ts TIMESTAMP) WITH (connector = 'memory');
             INSERT INTO clicks VALUES ('a', '1970-01-01T00:00:01'), ('a', '1970-01-01T00:00:04'), ('b', '1970-01-01T00:00:07'), ('a', '1970-01-01T00:00:12');")
        .await
        .unwrap();
    let counts = ctx
        .session()
        .table("clicks")
        .await
        .unwrap()
        .with_watermark("ts", Duration::from_secs(5))
        .unwrap()
        .tumble("ts", Duration::from_secs(10))
        .unwrap()
        .aggregate(
            vec![col("window_start"), col("window_end"), col("usr")],
            vec![count(lit(1)).alias("n")],
        )
        .unwrap();
    let (q, table) = start_into_table(counts, OutputMode::Append).await;
    q.process_all_available().await.unwrap();
    assert_eq!(
        table.rows().iter().map(|b| b.num_rows()).sum::<usize>(),
        0,
        "no window closed yet"
    );
    ctx.sql("INSERT INTO clicks VALUES ('b', '1970-01-01T00:00:09'), ('a', '1970-01-01T00:00:16'), ('b', '1970-01-01T00:00:21')")
        .await
        .unwrap();
    q.process_all_available().await.unwrap();
    let text = table_text(&table);
    assert!(
        text.contains("| 1970-01-01T00:00:00 | 1970-01-01T00:00:10 | a   | 2 |"),
        "{text}"
    );
    assert!(
        text.contains("| 1970-01-01T00:00:00 | 1970-01-01T00:00:10 | b   | 2 |"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 6, "{text}");
    let p = q.last_progress().unwrap();
    assert_eq!(p.operators.first().map(|s| s.rows), Some(2));

    // A non-positive size is refused.
    let df = ctx.session().table("clicks").await.unwrap();
    assert!(df.tumble("ts", Duration::ZERO).is_err());
}

#[tokio::test]
async fn random_splits_run_more_batches_with_the_same_result() {
    let (ctx, _clock) = manual();
    let src = MemorySource::new("nums", schema());
    src.append(rows(&(1..=40).collect::<Vec<_>>())).unwrap();
    let df = ctx.read_stream(src).await.unwrap();
    let (sink, mut rx) = channel_sink();
    let q = df
        .write_stream()
        .trigger(Trigger::Manual)
        .random_splits(Some(7))
        .start(sink)
        .await
        .unwrap();
    q.process_all_available().await.unwrap();
    let mut got = Vec::new();
    let mut batches = 0;
    while let Ok((_, v)) = rx.try_recv() {
        got.extend(v);
        batches += 1;
    }
    assert!(batches > 2, "{batches} batches");
    assert_eq!(got, (1..=40).collect::<Vec<_>>());
}

#[tokio::test]
async fn progress_says_when_batches_cannot_keep_up_with_the_trigger() {
    let (ctx, _clock) = manual();
    let src = MemorySource::new("nums", schema());
    src.append(rows(&[1])).unwrap();
    let df = ctx.read_stream(src).await.unwrap();
    for (interval, behind) in [
        (Duration::from_nanos(1), true),
        (Duration::from_secs(3600), false),
    ] {
        let (sink, _rx) = channel_sink();
        let q = df
            .clone()
            .write_stream()
            .trigger(Trigger::ProcessingTime(interval))
            .max_batches(1)
            .start(sink)
            .await
            .unwrap();
        q.await_termination().await.unwrap();
        assert_eq!(
            q.last_progress().unwrap().falling_behind,
            behind,
            "{interval:?}"
        );
    }
}

#[tokio::test]
async fn session_windows_from_the_dataframe_api_merge_across_batches() {
    use datafusion::functions_aggregate::expr_fn::count;
    let (ctx, _clock) = manual();
    ctx.sql(
        "CREATE SOURCE clicks (usr VARCHAR, ts TIMESTAMP) WITH (connector = 'memory');
             INSERT INTO clicks VALUES ('a', '1970-01-01T00:00:01'), ('a', '1970-01-01T00:00:20');",
    )
    .await
    .unwrap();
    let sessions = ctx
        .session()
        .table("clicks")
        .await
        .unwrap()
        .session("ts", Duration::from_secs(10))
        .unwrap()
        .aggregate(
            vec![col("usr"), col("window_start"), col("window_end")],
            vec![count(lit(1)).alias("n")],
        )
        .unwrap();
    let (q, table) = start_into_table(sessions, OutputMode::Complete).await;
    q.process_all_available().await.unwrap();
    assert_eq!(
        table.to_batch().unwrap().unwrap().num_rows(),
        2,
        "two sessions"
    );
    // 10.5 s is within the gap of both sessions [1 s, 11 s) and [20 s, 30 s).
    ctx.sql("INSERT INTO clicks VALUES ('a', '1970-01-01T00:00:10.500')")
        .await
        .unwrap();
    q.process_all_available().await.unwrap();
    let text = table_text(&table);
    assert!(
        text.contains("| a   | 1970-01-01T00:00:01 | 1970-01-01T00:00:30 | 3 |"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 5, "{text}");
}

#[tokio::test]
async fn hop_windows_from_the_dataframe_api_count_a_row_in_each_window() {
    use datafusion::functions_aggregate::expr_fn::count;
    let (ctx, _clock) = manual();
    ctx.sql(
        "CREATE SOURCE t (k VARCHAR, ts TIMESTAMP) WITH (connector = 'memory');
             INSERT INTO t VALUES ('a', '1970-01-01T00:00:12');",
    )
    .await
    .unwrap();
    let counts = ctx
        .session()
        .table("t")
        .await
        .unwrap()
        .hop("ts", Duration::from_secs(10), Duration::from_secs(15))
        .unwrap()
        .aggregate(
            vec![col("window_start"), col("window_end")],
            vec![count(lit(1)).alias("n")],
        )
        .unwrap();
    let (q, table) = start_into_table(counts, OutputMode::Complete).await;
    q.process_all_available().await.unwrap();
    let text = table_text(&table);
    // 12 s is in [0 s, 15 s) and [10 s, 25 s).
    assert!(
        text.contains("| 1970-01-01T00:00:00 | 1970-01-01T00:00:15 | 1 |"),
        "{text}"
    );
    assert!(
        text.contains("| 1970-01-01T00:00:10 | 1970-01-01T00:00:25 | 1 |"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 6, "{text}");
}

#[tokio::test]
async fn drop_duplicates_keeps_the_first_row_of_each_key_across_batches() {
    let (ctx, _clock) = manual();
    ctx.sql("CREATE SOURCE clicks (usr VARCHAR, page VARCHAR, ts TIMESTAMP) WITH (connector = 'memory');
             INSERT INTO clicks VALUES ('a', 'p1', '1970-01-01T00:00:01'), ('a', 'p2', '1970-01-01T00:00:02'), ('b', 'p3', '1970-01-01T00:00:03');")
        .await
        .unwrap();
    let firsts = ctx
        .session()
        .table("clicks")
        .await
        .unwrap()
        .drop_duplicates(&["usr"])
        .unwrap();
    let (q, table) = start_into_table(firsts, OutputMode::Append).await;
    q.process_all_available().await.unwrap();
    ctx.sql("INSERT INTO clicks VALUES ('a', 'p4', '1970-01-01T00:00:04'), ('c', 'p5', '1970-01-01T00:00:05')")
        .await
        .unwrap();
    q.process_all_available().await.unwrap();
    let text = table_text(&table);
    for row in ["| a   | p1   |", "| b   | p3   |", "| c   | p5   |"] {
        assert!(text.contains(row), "{row} missing:\n{text}");
    }
    // Three keys, three rows: the header, its rules and the frame are 4 lines.
    assert_eq!(text.lines().count(), 7, "{text}");
    let p = q.last_progress().unwrap();
    assert_eq!(p.operators.first().map(|s| s.rows), Some(3));
    assert_eq!(p.operators.first().map(|s| s.id.as_str()), Some("topn"));

    let df = ctx.session().table("clicks").await.unwrap();
    assert!(df.clone().drop_duplicates(&["nope"]).is_err());
    assert!(df.drop_duplicates(&[]).is_err());
}

#[tokio::test]
async fn distinct_on_from_the_dataframe_api_keeps_each_keys_last_row_as_a_changelog() {
    let (ctx, _clock) = manual();
    ctx.sql("CREATE SOURCE clicks (usr VARCHAR, page VARCHAR, ts TIMESTAMP) WITH (connector = 'memory');
             INSERT INTO clicks VALUES ('a', 'p1', '1970-01-01T00:00:01'), ('a', 'p2', '1970-01-01T00:00:02'), ('b', 'p3', '1970-01-01T00:00:03');")
        .await
        .unwrap();
    let last = ctx
        .session()
        .table("clicks")
        .await
        .unwrap()
        .distinct_on(
            vec![col("usr")],
            vec![col("usr"), col("page")],
            Some(vec![
                col("usr").sort(true, false),
                col("ts").sort(false, false),
            ]),
        )
        .unwrap();
    let (q, table) = start_into_table(last, OutputMode::Changelog).await;
    q.process_all_available().await.unwrap();
    ctx.sql("INSERT INTO clicks VALUES ('a', 'p4', '1970-01-01T00:00:04'), ('b', 'p0', '1970-01-01T00:00:00')")
        .await
        .unwrap();
    q.process_all_available().await.unwrap();
    let text = table_text(&table);
    // a: p2, then p4 replaces it; b: p3 stays (p0 is older).
    for row in [
        "| +I  | a   | p2   |",
        "| +I  | b   | p3   |",
        "| -U  | a   | p2   |",
        "| +U  | a   | p4   |",
    ] {
        assert!(text.contains(row), "{row} missing:\n{text}");
    }
    assert_eq!(text.lines().count(), 8, "{text}");
}

#[tokio::test]
async fn a_query_reports_when_it_ends_and_how() {
    let (ctx, _clock) = manual();
    let src = MemorySource::new("nums", schema());
    src.append(rows(&[1, 2, 3])).unwrap();
    let df = ctx.read_stream(src).await.unwrap();
    let (sink, _rx) = channel_sink();
    let q = df
        .write_stream()
        .trigger(Trigger::AvailableNow)
        .start(sink)
        .await
        .unwrap();
    let info = q.info();
    assert_eq!(info.sources, vec!["nums".to_string()]);
    assert_eq!(info.sink, "chan");
    // `finished` returns once the trigger loop ended (the bound only keeps a
    // broken build from hanging).
    tokio::time::timeout(Duration::from_secs(60), q.finished())
        .await
        .expect("an available-now query ends");
    assert_eq!(info.status(), sluice::QueryStatus::Stopped);
    assert_eq!(info.last_progress().unwrap().input_rows, 3);
    assert_eq!(info.recent_progress(5).len(), 1);

    // A query whose sink fails ends Failed, with the error's text.
    let src = MemorySource::new("more", schema());
    src.append(rows(&[1])).unwrap();
    let df = ctx.read_stream(src).await.unwrap();
    let q = df
        .write_stream()
        .trigger(Trigger::AvailableNow)
        .start(ForeachBatchSink::new("broken", |_, _| {
            Err(sluice::Error::data("the sink refuses"))
        }))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), q.finished())
        .await
        .expect("a failing query ends");
    match q.info().status() {
        sluice::QueryStatus::Failed(e) => assert!(e.contains("the sink refuses"), "{e}"),
        other => panic!("not failed: {other:?}"),
    }
    assert!(q.await_termination().await.is_err());
}

#[tokio::test]
async fn a_backlog_that_grows_batch_after_batch_is_falling_behind() {
    let (ctx, _clock) = manual();
    // Two rows a batch while three arrive before each: the backlog grows.
    let src = MemorySource::new("nums", schema()).with_max_rows_per_trigger(2);
    let df = ctx.read_stream(src.clone()).await.unwrap();
    let (sink, _rx) = channel_sink();
    let q = df
        .write_stream()
        .trigger(Trigger::Manual)
        .start(sink)
        .await
        .unwrap();
    let mut seen = Vec::new();
    for i in 0..4 {
        src.append(rows(&[i * 3, i * 3 + 1, i * 3 + 2])).unwrap();
        let p = q.run_batch().await.unwrap().unwrap();
        assert_eq!(p.sources[0].backlog_unit.as_deref(), Some("rows"));
        seen.push((p.sources[0].backlog, p.falling_behind));
    }
    // Behind once it grew over three batches in a row (four records).
    assert_eq!(
        seen,
        vec![
            (Some(1), false),
            (Some(2), false),
            (Some(3), false),
            (Some(4), true)
        ]
    );
    // Nothing more arrives: it shrinks, and the query is not behind.
    let p = q.run_batch().await.unwrap().unwrap();
    assert_eq!((p.sources[0].backlog, p.falling_behind), (Some(2), false));
}

#[tokio::test]
async fn latency_runs_from_when_the_oldest_row_was_due_to_the_commit() {
    let (ctx, clock) = manual();
    let outcomes = ctx
        .sql(
            "CREATE SOURCE r WITH (connector = 'rate', rows_per_second = 10);
             CREATE SINK out WITH (connector = 'memory') AS SELECT value FROM r;",
        )
        .await
        .unwrap();
    let q = outcomes
        .into_iter()
        .find_map(|o| match o {
            sluice::Outcome::Query(q) => Some(q),
            _ => None,
        })
        .unwrap()
        .with_trigger(Trigger::Manual)
        .start()
        .await
        .unwrap();
    // A second of rows: the first was due 0.1 s after the start, and the
    // batch commits at 1 s on the manual clock.
    clock.advance(Duration::from_secs(1));
    let p = q.run_batch().await.unwrap().unwrap();
    assert_eq!(p.input_rows, 10);
    assert_eq!(p.latency_ms, Some(900.0));
    assert_eq!(p.sources[0].backlog, Some(0));
    // Half a second later the next five rows: the oldest was due 0.4 s ago.
    clock.advance(Duration::from_millis(500));
    let p = q.run_batch().await.unwrap().unwrap();
    assert_eq!(p.input_rows, 5);
    assert_eq!(p.latency_ms, Some(400.0));
}
