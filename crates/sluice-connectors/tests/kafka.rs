//! The Kafka source and sink against a real Kafka-protocol broker (tansu on
//! 127.0.0.1, started by each test; `scripts/kafka-broker.sh install` puts
//! it in place, and the README's test command runs that first). A missing
//! broker fails these tests: none is skipped.

#![cfg(feature = "kafka")]

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, AsArray, Int32Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use serde_json::Value;
use sluice_common::durable::Durability;
use sluice_common::{ManualClock, Options, OutputMode};
use sluice_connectors::kafka::{
    LocalBroker, ProduceRecord, Record, consume_all, create_topic, partition_for_key, produce,
    record_ids,
};
use sluice_connectors::{
    KafkaSink, KafkaSource, OnError, Sink, Source, SourceContext, SourceReader,
};

const T: Duration = Duration::from_secs(20);

/// tansu 0.6 answers ListOffsets(latest) with the base offset of the last
/// record batch + 1, and a fetch from an offset inside a batch skips that
/// batch: both are right only when every batch holds one record. Writers in
/// these tests therefore send one record per batch (a librdkafka property,
/// passed through as `kafka.<property>`); Sluice itself assumes a broker that
/// follows the protocol.
const ONE_RECORD_BATCHES: (&str, &str) = ("kafka.batch.num.messages", "1");

fn opts(owner: &str, pairs: &[(&str, &str)]) -> Options {
    Options::from_pairs(owner, pairs.iter().copied())
}

fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("k", DataType::Utf8, true),
        Field::new("_key", DataType::Utf8, true),
        Field::new("_topic", DataType::Utf8, true),
        Field::new("_partition", DataType::Int32, true),
        Field::new("_offset", DataType::Int64, true),
    ]))
}

fn reader(src: &KafkaSource, dir: &std::path::Path) -> Box<dyn SourceReader> {
    src.open(SourceContext {
        dir: dir.to_path_buf(),
        durability: Durability::NoSync,
        clock: Arc::new(ManualClock::new(0)),
    })
    .unwrap()
}

/// `(id, k, _key, _topic, _partition, _offset)` of every row, sorted.
fn rows(batches: &[RecordBatch]) -> Vec<(i64, String, String, String, i32, i64)> {
    let mut out = Vec::new();
    for b in batches {
        let id = b.column(0).as_primitive::<Int64Type>();
        let k = b.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        let key = b.column(2).as_any().downcast_ref::<StringArray>().unwrap();
        let t = b.column(3).as_any().downcast_ref::<StringArray>().unwrap();
        let p = b.column(4).as_any().downcast_ref::<Int32Array>().unwrap();
        let o = b.column(5).as_any().downcast_ref::<Int64Array>().unwrap();
        for i in 0..b.num_rows() {
            out.push((
                id.value(i),
                k.value(i).to_string(),
                if key.is_null(i) {
                    String::new()
                } else {
                    key.value(i).to_string()
                },
                t.value(i).to_string(),
                p.value(i),
                o.value(i),
            ));
        }
    }
    out.sort();
    out
}

async fn produce_events(servers: &str, topic: &str, ids: std::ops::Range<i64>, partitions: i32) {
    let bodies: Vec<(i32, String, String)> = ids
        .map(|i| {
            (
                (i % i64::from(partitions)) as i32,
                format!("key{i}"),
                format!("{{\"id\": {i}, \"k\": \"k{}\"}}", i % 3),
            )
        })
        .collect();
    let records: Vec<_> = bodies
        .iter()
        .map(|(p, k, v)| (Some(*p), Some(k.as_bytes()), v.as_bytes()))
        .collect();
    produce(servers, topic, &records).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_offsets_reads_the_same_records_every_time() {
    let broker = LocalBroker::start().unwrap();
    let servers = broker.bootstrap();
    create_topic(&servers, "events", 3).await.unwrap();
    produce_events(&servers, "events", 0..30, 3).await;

    let src = KafkaSource::from_options(
        "events",
        Some(events_schema()),
        &opts(
            "source 'events'",
            &[
                ("bootstrap.servers", &servers),
                ("topic", "events"),
                ("format", "json"),
                ("max_rows_per_trigger", "12"),
            ],
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = reader(&src, dir.path());
    let mut start = r.initial_offset();
    let mut all = Vec::new();
    let mut batches = 0;
    loop {
        let end = r.latest_offset(&start).await.unwrap();
        if end == start {
            break;
        }
        let first = r.read(&start, &end).await.unwrap();
        let again = r.read(&start, &end).await.unwrap();
        assert_eq!(
            rows(&first.batches),
            rows(&again.batches),
            "[{start}, {end})"
        );
        let n = rows(&first.batches).len();
        assert!(n <= 12, "max_rows_per_trigger caps a batch: {n}");
        all.extend(rows(&first.batches));
        start = end;
        batches += 1;
        assert!(batches < 10, "the source keeps offering data");
    }
    assert_eq!(batches, 3);
    all.sort();
    assert_eq!(all.len(), 30);
    for (i, row) in all.iter().enumerate() {
        let i = i as i64;
        assert_eq!(row.0, i);
        assert_eq!(row.1, format!("k{}", i % 3));
        assert_eq!(row.2, format!("key{i}"));
        assert_eq!(row.3, "events");
        assert_eq!(row.4, (i % 3) as i32);
        assert_eq!(row.5, i / 3, "offset in its partition");
    }
    let final_offset: Value = start;
    assert_eq!(
        final_offset,
        serde_json::json!({"events": {"0": 10, "1": 10, "2": 10}})
    );

    // A reader opened again on the same checkpoint directory (a restart)
    // reads the same ranges the same way.
    let mut r2 = reader(&src, dir.path());
    let again = r2
        .read(
            &serde_json::json!({"events": {"0": 2, "1": 2, "2": 2}}),
            &serde_json::json!({"events": {"0": 4, "1": 3, "2": 2}}),
        )
        .await
        .unwrap();
    let ids: Vec<i64> = rows(&again.batches).iter().map(|r| r.0).collect();
    assert_eq!(ids, vec![6, 7, 9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_named_by_topic_partition_and_offset() {
    let broker = LocalBroker::start().unwrap();
    let servers = broker.bootstrap();
    create_topic(&servers, "mixed", 1).await.unwrap();
    let records: Vec<ProduceRecord<'_>> = vec![
        (Some(0), None, b"{\"id\": 1, \"k\": \"a\"}"),
        (Some(0), None, b"{\"id\": \"one\"}"),
        (Some(0), None, b""),
        (Some(0), None, b"{\"id\": 4, \"k\": \"d\"}"),
    ];
    produce(&servers, "mixed", &records).await.unwrap();
    let base = [
        ("bootstrap.servers", servers.as_str()),
        ("topic", "mixed"),
        ("format", "json"),
    ];
    let dir = tempfile::tempdir().unwrap();

    let src = KafkaSource::from_options(
        "mixed",
        Some(events_schema()),
        &opts("source 'mixed'", &base),
    )
    .unwrap();
    let mut r = reader(&src, dir.path());
    let end = r.latest_offset(&r.initial_offset()).await.unwrap();
    let err = r
        .read(&r.initial_offset(), &end)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("topic 'mixed' partition 0 offset 1") && err.contains("source 'mixed'"),
        "{err}"
    );

    let mut with = base.to_vec();
    with.extend([("on_error", "dead_letter"), ("dead_letter", "bad")]);
    let src = KafkaSource::from_options(
        "mixed",
        Some(events_schema()),
        &opts("source 'mixed'", &with),
    )
    .unwrap();
    assert_eq!(src.dead_letter_target(), Some("bad"));
    let mut r = reader(&src, dir.path());
    let read = r.read(&r.initial_offset(), &end).await.unwrap();
    let ids: Vec<i64> = rows(&read.batches).iter().map(|r| r.0).collect();
    assert_eq!(ids, vec![1, 4], "the good neighbours are kept");
    let letters: Vec<(&str, &str)> = read
        .dead_letters
        .iter()
        .map(|d| (d.location.as_str(), d.raw.as_str()))
        .collect();
    assert_eq!(
        letters,
        vec![
            ("topic 'mixed' partition 0 offset 1", "{\"id\": \"one\"}"),
            ("topic 'mixed' partition 0 offset 2", ""),
        ]
    );
    assert!(
        read.dead_letters[1].error.contains("empty"),
        "{:?}",
        read.dead_letters[1]
    );
    let _ = OnError::Drop;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_starts_at_the_end_and_topics_that_appear_later_are_read_whole() {
    let broker = LocalBroker::start().unwrap();
    let servers = broker.bootstrap();
    create_topic(&servers, "logs-a", 2).await.unwrap();
    produce_events(&servers, "logs-a", 0..4, 2).await;
    let src = KafkaSource::from_options(
        "logs",
        Some(events_schema()),
        &opts(
            "source 'logs'",
            &[
                ("bootstrap.servers", &servers),
                ("topic_pattern", "logs-.*"),
                ("format", "json"),
                ("starting_offsets", "latest"),
            ],
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = reader(&src, dir.path());
    let start = r.initial_offset();
    assert_eq!(
        r.latest_offset(&start).await.unwrap(),
        start,
        "latest: what was there before the query is not read, and no batch runs"
    );
    produce_events(&servers, "logs-a", 4..6, 2).await;
    let end = r.latest_offset(&start).await.unwrap();
    let got = r.read(&start, &end).await.unwrap();
    assert_eq!(
        rows(&got.batches).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![4, 5]
    );

    // A restart before the next batch: positions come from the offsets and
    // the source's partition log, never from the broker's "latest" again.
    drop(r);
    let mut r = reader(&src, dir.path());
    assert_eq!(r.latest_offset(&end).await.unwrap(), end);

    // A new matching topic while the query runs is read from its start.
    create_topic(&servers, "logs-b", 1).await.unwrap();
    produce_events(&servers, "logs-b", 100..103, 1).await;
    create_topic(&servers, "other", 1).await.unwrap();
    produce_events(&servers, "other", 200..201, 1).await;
    let end2 = r.latest_offset(&end).await.unwrap();
    let got = r.read(&end, &end2).await.unwrap();
    let ids: Vec<i64> = rows(&got.batches).iter().map(|r| r.0).collect();
    assert_eq!(ids, vec![100, 101, 102]);
    assert_eq!(end2["logs-b"]["0"], 3);
    assert!(end2.get("other").is_none());

    // `latest` on a pattern no topic matches yet: the first topic to appear
    // after the query's first planning is new data, read from its start.
    let src = KafkaSource::from_options(
        "late",
        Some(events_schema()),
        &opts(
            "source 'late'",
            &[
                ("bootstrap.servers", &servers),
                ("topic_pattern", "late-.*"),
                ("format", "json"),
                ("starting_offsets", "latest"),
            ],
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = reader(&src, dir.path());
    let start = r.initial_offset();
    assert_eq!(r.latest_offset(&start).await.unwrap(), start);
    create_topic(&servers, "late-1", 1).await.unwrap();
    produce_events(&servers, "late-1", 300..302, 1).await;
    let end = r.latest_offset(&start).await.unwrap();
    let ids: Vec<i64> = rows(&r.read(&start, &end).await.unwrap().batches)
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(ids, vec![300, 301]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_and_a_bad_broker_are_named() {
    let broker = LocalBroker::start().unwrap();
    let servers = broker.bootstrap();
    let src = KafkaSource::from_options(
        "nope",
        Some(events_schema()),
        &opts(
            "source 'nope'",
            &[
                ("bootstrap.servers", &servers),
                ("topic", "nope"),
                ("format", "json"),
            ],
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = reader(&src, dir.path());
    let err = r
        .latest_offset(&r.initial_offset())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("topic 'nope' does not exist"), "{err}");

    let sink = KafkaSink::from_options(
        "out",
        &opts(
            "sink 'out'",
            &[
                ("bootstrap.servers", &servers),
                ("topic", "nowhere"),
                ("format", "json"),
            ],
        ),
        &[],
    )
    .unwrap();
    let err = sink
        .open(&events_schema(), OutputMode::Append)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("topic 'nowhere' does not exist"), "{err}");
}

fn out_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Utf8, false),
        Field::new("n", DataType::Int64, false),
    ]))
}

fn out_batch(rows: &[(&str, i64)]) -> RecordBatch {
    RecordBatch::try_new(
        out_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
        ],
    )
    .unwrap()
}

fn sink(servers: &str, topic: &str) -> KafkaSink {
    KafkaSink::from_options(
        "counts",
        &opts(
            "sink 'counts'",
            &[
                ("bootstrap.servers", servers),
                ("topic", topic),
                ("format", "json"),
                ("key", "k"),
                ONE_RECORD_BATCHES,
            ],
        ),
        &[],
    )
    .unwrap()
}

fn values(records: &[Record]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap()).unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_batch_leaves_each_record_in_the_topic_once() {
    let broker = LocalBroker::start().unwrap();
    let servers = broker.bootstrap();
    create_topic(&servers, "counts", 3).await.unwrap();
    let batch0 = [("a", 1), ("b", 2), ("c", 3), ("d", 4)];
    let batch1 = [("a", 5), ("e", 6), ("f", 7)];

    let s = sink(&servers, "counts");
    s.open(&out_schema(), OutputMode::Append).await.unwrap();
    s.write(0, &out_schema(), vec![out_batch(&batch0)])
        .await
        .unwrap();
    s.write(1, &out_schema(), vec![out_batch(&batch1)])
        .await
        .unwrap();
    // The same batch again in the same process (as after a failed commit).
    s.write(1, &out_schema(), vec![out_batch(&batch1)])
        .await
        .unwrap();
    // And in a new process (a restart re-runs the uncommitted batch).
    let s2 = sink(&servers, "counts");
    s2.open(&out_schema(), OutputMode::Append).await.unwrap();
    s2.write(1, &out_schema(), vec![out_batch(&batch1)])
        .await
        .unwrap();

    let got = consume_all(&servers, "counts", T).unwrap();
    assert_eq!(
        values(&got),
        vec![
            "{\"k\":\"a\",\"n\":1}",
            "{\"k\":\"a\",\"n\":5}",
            "{\"k\":\"b\",\"n\":2}",
            "{\"k\":\"c\",\"n\":3}",
            "{\"k\":\"d\",\"n\":4}",
            "{\"k\":\"e\",\"n\":6}",
            "{\"k\":\"f\",\"n\":7}",
        ]
    );
    for r in &got {
        let key = r.key.clone().unwrap();
        assert_eq!(
            r.partition,
            partition_for_key(&key, 3),
            "keyed as Kafka's partitioner"
        );
        assert_eq!(r.header("sluice.sink"), Some("counts"));
        assert!(r.header("sluice.batch").is_some() && r.header("sluice.record").is_some());
    }

    // A crash part-way through batch 2: some of its records are there (as
    // the dead process left them), and the re-run emits the batch's rows in
    // another order (as a re-run may: state lives in hash maps); it writes
    // only the rest.
    let batch2 = [("g", 8), ("h", 9), ("i", 10), ("j", 11)];
    let partial: Vec<(i32, Vec<u8>, Vec<u8>)> = [("h", 9), ("j", 11)]
        .iter()
        .map(|(k, n)| {
            (
                partition_for_key(k.as_bytes(), 3),
                k.as_bytes().to_vec(),
                format!("{{\"k\":\"{k}\",\"n\":{n}}}").into_bytes(),
            )
        })
        .collect();
    write_as_sink(&servers, "counts", "counts", 2, &partial).await;
    let s3 = sink(&servers, "counts");
    s3.open(&out_schema(), OutputMode::Append).await.unwrap();
    let mut reordered = batch2;
    reordered.reverse();
    s3.write(2, &out_schema(), vec![out_batch(&reordered)])
        .await
        .unwrap();
    let got = consume_all(&servers, "counts", T).unwrap();
    assert_eq!(got.len(), 11, "{:?}", values(&got));
    let mut distinct = values(&got);
    distinct.dedup();
    assert_eq!(distinct.len(), 11);

    // A fresh run of the same sink id (its checkpoint deleted) must not
    // mistake the old run's output for its own: it stops, naming why.
    let s4 = sink(&servers, "counts");
    s4.open(&out_schema(), OutputMode::Append).await.unwrap();
    let err = s4
        .write(0, &out_schema(), vec![out_batch(&batch0)])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("another run of this sink"), "{err}");
    // The same when the engine says it planned the batch just now (then
    // only the topic's tail is read, to refuse another run's output).
    let s5 = sink(&servers, "counts");
    s5.open(&out_schema(), OutputMode::Append).await.unwrap();
    s5.planned(2);
    let err = s5
        .write(2, &out_schema(), vec![out_batch(&batch2)])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("another run of this sink"), "{err}");
    assert_eq!(consume_all(&servers, "counts", T).unwrap().len(), 11);

    // A new sink id on the same topic: a planned batch is written whole,
    // after a look at the tail only.
    let s6 = KafkaSink::from_options(
        "other",
        &opts(
            "sink 'other'",
            &[
                ("bootstrap.servers", &servers),
                ("topic", "counts"),
                ("format", "json"),
                ("key", "k"),
                ONE_RECORD_BATCHES,
            ],
        ),
        &[],
    )
    .unwrap();
    s6.open(&out_schema(), OutputMode::Append).await.unwrap();
    s6.planned(0);
    s6.write(0, &out_schema(), vec![out_batch(&batch2)])
        .await
        .unwrap();
    s6.planned(1);
    s6.write(1, &out_schema(), vec![out_batch(&batch0)])
        .await
        .unwrap();
    assert_eq!(consume_all(&servers, "counts", T).unwrap().len(), 19);
}

/// Produces records with the sink's headers, as a sink that died part-way
/// through a batch would have left them.
async fn write_as_sink(
    servers: &str,
    topic: &str,
    sink_id: &str,
    batch: u64,
    records: &[(i32, Vec<u8>, Vec<u8>)],
) {
    use rdkafka::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    for (part, k, v) in records {
        let id = record_ids(&[(Some(k.as_slice()), Some(v.as_slice()))]).remove(0);
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "sluice.sink",
                value: Some(sink_id.as_bytes()),
            })
            .insert(Header {
                key: "sluice.batch",
                value: Some(batch.to_string().as_bytes()),
            })
            .insert(Header {
                key: "sluice.record",
                value: Some(id.as_bytes()),
            });
        let r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .partition(*part)
            .key(k.as_slice())
            .payload(v.as_slice())
            .headers(h);
        p.send(r, T).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_csv_sinks_write_one_record_a_row() {
    let broker = LocalBroker::start().unwrap();
    let servers = broker.bootstrap();
    create_topic(&servers, "lines", 1).await.unwrap();
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("value", DataType::Utf8, true),
        Field::new("n", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from(vec![
                Some("x,1"),
                None,
                Some("two\nlines"),
            ])),
            Arc::new(Int64Array::from(vec![1, 2, 3])),
        ],
    )
    .unwrap();
    let raw = KafkaSink::from_options(
        "raw",
        &opts(
            "sink 'raw'",
            &[
                ("bootstrap.servers", &servers),
                ("topic", "lines"),
                ("format", "raw"),
                ONE_RECORD_BATCHES,
            ],
        ),
        &[],
    )
    .unwrap();
    raw.open(&schema, OutputMode::Append).await.unwrap();
    raw.write(0, &schema, vec![batch.clone()]).await.unwrap();
    let csv = KafkaSink::from_options(
        "csv",
        &opts(
            "sink 'csv'",
            &[
                ("bootstrap.servers", &servers),
                ("topic", "lines"),
                ("format", "csv"),
                ONE_RECORD_BATCHES,
            ],
        ),
        &[],
    )
    .unwrap();
    csv.open(&schema, OutputMode::Append).await.unwrap();
    csv.write(0, &schema, vec![batch]).await.unwrap();
    let got = consume_all(&servers, "lines", T).unwrap();
    let shown: Vec<(Option<&str>, Option<String>)> = got
        .iter()
        .map(|r| {
            (
                r.header("sluice.sink"),
                r.value
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            (Some("raw"), Some("x,1".into())),
            (Some("raw"), None),
            (Some("raw"), Some("two\nlines".into())),
            (Some("csv"), Some("\"x,1\",1".into())),
            (Some("csv"), Some(",2".into())),
            (Some("csv"), Some("\"two\nlines\",3".into())),
        ]
    );

    let bad = KafkaSink::from_options(
        "bad",
        &opts(
            "sink 'bad'",
            &[
                ("bootstrap.servers", &servers),
                ("topic", "lines"),
                ("format", "raw"),
                ONE_RECORD_BATCHES,
            ],
        ),
        &[],
    )
    .unwrap();
    let err = bad
        .open(&out_schema(), OutputMode::Append)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("column named value"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varchar_keys_and_values_are_text_and_a_key_that_is_not_is_a_bad_record() {
    let broker = LocalBroker::start().unwrap();
    let servers = broker.bootstrap();
    create_topic(&servers, "raw", 1).await.unwrap();
    let records: Vec<ProduceRecord<'_>> = vec![
        (Some(0), Some(b"k1"), b"one"),
        (Some(0), Some(b"\xff"), b"two"),
        (Some(0), None, b"three"),
        (Some(0), None, b"\xfe"),
    ];
    produce(&servers, "raw", &records).await.unwrap();
    // VARCHAR columns are Utf8View in DataFusion's SQL.
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("value", DataType::Utf8View, true),
        Field::new("_key", DataType::Utf8View, true),
    ]));
    let src = KafkaSource::from_options(
        "raw",
        Some(schema),
        &opts(
            "source 'raw'",
            &[
                ("bootstrap.servers", &servers),
                ("topic", "raw"),
                ("format", "raw"),
                ("on_error", "drop"),
            ],
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = reader(&src, dir.path());
    let start = r.initial_offset();
    let end = r.latest_offset(&start).await.unwrap();
    let read = r.read(&start, &end).await.unwrap();
    assert_eq!(
        read.dropped, 2,
        "the key, and the value, that are not UTF-8"
    );
    let b = &read.batches[0];
    let text = |c: usize| -> Vec<Option<String>> {
        let a = datafusion::arrow::compute::cast(b.column(c), &DataType::Utf8).unwrap();
        let a = a.as_any().downcast_ref::<StringArray>().unwrap();
        (0..a.len())
            .map(|i| (!a.is_null(i)).then(|| a.value(i).to_string()))
            .collect()
    };
    assert_eq!(text(0), vec![Some("one".into()), Some("three".into())]);
    assert_eq!(text(1), vec![Some("k1".into()), None]);
}
