//! The Kafka sink: exactly-once on any broker, without transactions.
//!
//! Each record of batch N carries three headers: `sluice.sink` (the sink's
//! id), `sluice.batch` (N) and `sluice.record`, the record's identity in the
//! batch: a hash of its key and value, and which occurrence of that content
//! it is. A batch re-run after a crash produces the same rows — not always
//! in the same order (state is kept in hash maps, and big batches are
//! aggregated in parallel) — so the identity depends on content alone.
//! Before writing a batch that may have been written before — one the engine
//! re-runs after a restart, or retries after a failed write — the sink reads
//! each partition of its topic backwards from the end until it meets a record
//! of its own from an earlier batch (or the partition's start), collects the
//! identities of batch N already there, and produces only the others. A
//! batch the engine has just planned ([`Sink::planned`]) cannot have been
//! written before; its first write after `open` only reads the tail of each
//! partition, to refuse a topic that holds another run's output of the same
//! sink id. Records are produced with the idempotent
//! producer (unless `idempotent = false`), so the client's own retries add
//! nothing either.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use sluice_common::connector::Sink;
use sluice_common::{BatchId, Error, Options, OutputMode, Result};

use super::{
    Connection, KafkaFormat, Range, blocking, fetch, is_bytes_or_text, kafka_error,
    partition_for_key,
};

/// Header naming the sink that wrote a record.
pub const SINK_HEADER: &str = "sluice.sink";
/// Header naming the batch that wrote a record.
pub const BATCH_HEADER: &str = "sluice.batch";
/// Header giving a record's identity in its batch (see [`record_ids`]).
pub const RECORD_HEADER: &str = "sluice.record";

/// A record's key and value (`None`: absent).
pub type KeyValue<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// The identity of each record of a batch, from its content alone:
/// `<first 16 bytes of the BLAKE3 hash of key and value, in hex>-<k>`, where
/// `k` counts earlier records of the batch with the same content. The same
/// rows in another order get the same identities (identical records are
/// interchangeable), so a re-run batch finds what an earlier attempt stored.
pub fn record_ids(records: &[KeyValue<'_>]) -> Vec<String> {
    let mut seen: HashMap<[u8; 16], u64> = HashMap::new();
    records
        .iter()
        .map(|(key, value)| {
            let mut h = blake3::Hasher::new();
            for part in [key, value] {
                match part {
                    // A length prefix keeps (key, value) pairs apart whose
                    // concatenations are equal; u64::MAX marks "absent".
                    Some(b) => {
                        h.update(&(b.len() as u64).to_le_bytes());
                        h.update(b);
                    }
                    None => {
                        h.update(&u64::MAX.to_le_bytes());
                    }
                }
            }
            let mut digest = [0u8; 16];
            digest.copy_from_slice(&h.finalize().as_bytes()[..16]);
            let k = seen.entry(digest).or_insert(0);
            let id = format!("{}-{k}", hex(&digest));
            *k += 1;
            id
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How many records the tail scan reads per step backwards.
const SCAN_STEP: i64 = 10_000;

/// Writes each batch's rows to a Kafka topic, exactly once.
#[derive(Debug)]
pub struct KafkaSink {
    name: String,
    topic: String,
    conn: Connection,
    format: KafkaFormat,
    key: Option<String>,
    sink_id: String,
    idempotent: bool,
    state: Mutex<SinkState>,
}

#[derive(Default)]
struct SinkState {
    producer: Option<FutureProducer>,
    consumer: Option<Arc<BaseConsumer>>,
    /// The batch this process last wrote completely; a write of the next
    /// one needs no scan.
    written: Option<BatchId>,
    /// A batch the engine says it planned just now ([`Sink::planned`]): its
    /// first write needs no scan.
    planned: Option<BatchId>,
    /// Whether a write since `open` has read the topic (the first write
    /// checks the topic's tail for another run's output even when it needs
    /// no scan).
    wrote: bool,
}

/// What a write reads of its topic first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scan {
    /// Nothing: the batch cannot have been written before, and the topic
    /// was checked since `open`.
    None,
    /// The last records of each partition, only to refuse another run's
    /// output (the first write of a batch that cannot have been written).
    Tail,
    /// Back to this sink's previous batch: an earlier attempt may have
    /// written part of this one.
    Full,
}

impl std::fmt::Debug for SinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkState")
            .field("open", &self.producer.is_some())
            .field("written", &self.written)
            .finish()
    }
}

/// One output record: key and value.
type OutRecord = (Option<Vec<u8>>, Option<Vec<u8>>);

impl KafkaSink {
    /// Builds the sink from `CREATE SINK ... WITH (connector = 'kafka', ...)`.
    pub fn from_options(name: &str, options: &Options, common: &[&str]) -> Result<Self> {
        let mut own = vec![
            "topic",
            "format",
            "delimiter",
            "key",
            "sink_id",
            "idempotent",
        ];
        own.extend_from_slice(common);
        Connection::check_known(options, &own)?;
        Ok(KafkaSink {
            name: name.to_string(),
            topic: options.require("topic")?.to_string(),
            conn: Connection::from_options(options)?,
            format: KafkaFormat::from_options(options)?,
            key: options.get("key").map(str::to_string),
            sink_id: options.get("sink_id").unwrap_or(name).to_string(),
            idempotent: options.get_bool("idempotent")?.unwrap_or(true),
            state: Mutex::new(SinkState::default()),
        })
    }

    /// The sink's id, written in every record's `sluice.sink` header.
    pub fn sink_id(&self) -> &str {
        &self.sink_id
    }

    fn check_schema(&self, schema: &SchemaRef) -> Result<()> {
        let owner = format!("sink '{}'", self.name);
        if let Some(k) = &self.key {
            let f = schema.field_with_name(k).map_err(|_| {
                Error::plan(format!(
                    "{owner}: key = '{k}' names no column of the query's output ({})",
                    column_names(schema)
                ))
            })?;
            if !is_bytes_or_text(f.data_type())
                && !datafusion::arrow::compute::can_cast_types(f.data_type(), &DataType::Utf8)
            {
                return Err(Error::plan(format!(
                    "{owner}: key column '{k}' of type {} cannot be written as a key",
                    f.data_type()
                )));
            }
        }
        if self.format == KafkaFormat::Raw {
            let f = schema.field_with_name("value").map_err(|_| {
                Error::plan(format!(
                    "{owner}: format = 'raw' writes the column named value, and the query's \
                     output has none ({})",
                    column_names(schema)
                ))
            })?;
            if !is_bytes_or_text(f.data_type()) {
                return Err(Error::plan(format!(
                    "{owner}: with format = 'raw', column value must be BYTEA or VARCHAR, not {}",
                    f.data_type()
                )));
            }
        }
        Ok(())
    }

    /// The batch's rows as records, in row order.
    fn encode(&self, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<OutRecord>> {
        let mut out = Vec::new();
        for b in batches {
            if b.num_rows() == 0 {
                continue;
            }
            let values = encode_values(&self.format, schema, b)?;
            let keys: Vec<Option<Vec<u8>>> = match &self.key {
                Some(k) => column_bytes(b.column(schema.index_of(k)?))?,
                None => vec![None; b.num_rows()],
            };
            out.extend(keys.into_iter().zip(values));
        }
        Ok(out)
    }

    fn open_clients(&self) -> Result<(FutureProducer, Arc<BaseConsumer>)> {
        let what = format!("sink '{}'", self.name);
        let mut c = self.conn.config();
        c.set("acks", "all")
            .set("enable.idempotence", self.idempotent.to_string())
            .set(
                "message.timeout.ms",
                self.conn
                    .timeout
                    .as_millis()
                    .clamp(1000, 3_600_000)
                    .to_string(),
            )
            .set("linger.ms", "1");
        if !self.idempotent {
            // Without idempotence, one request in flight keeps a
            // partition's records in order when the client retries.
            c.set("max.in.flight.requests.per.connection", "1");
        }
        let producer: FutureProducer = c
            .create()
            .map_err(|e| kafka_error(format!("{what}: making a Kafka producer"), e))?;
        let consumer = Arc::new(self.conn.consumer(&what, true)?);
        Ok((producer, consumer))
    }
}

fn column_names(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A column's values as bytes: binary and text as they are, anything else
/// as its text.
fn column_bytes(col: &dyn Array) -> Result<Vec<Option<Vec<u8>>>> {
    let col = datafusion::arrow::array::make_array(col.to_data());
    let col = if is_bytes_or_text(col.data_type()) {
        col
    } else {
        cast(&col, &DataType::Utf8)?
    };
    let col = match cast(&col, &DataType::Binary) {
        Ok(c) => c,
        // Text types without a direct cast to bytes go through Utf8.
        Err(_) => cast(&cast(&col, &DataType::Utf8)?, &DataType::Binary)?,
    };
    Ok(col
        .as_binary::<i32>()
        .iter()
        .map(|v| v.map(<[u8]>::to_vec))
        .collect())
}

/// One value per row of `batch`, in `format`.
fn encode_values(
    format: &KafkaFormat,
    schema: &SchemaRef,
    batch: &RecordBatch,
) -> Result<Vec<Option<Vec<u8>>>> {
    let rows = batch.num_rows();
    match format {
        KafkaFormat::Raw => column_bytes(batch.column(schema.index_of("value")?)),
        KafkaFormat::Json => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut buf);
                w.write(batch)?;
                w.finish()?;
            }
            // JSON text has no raw line breaks inside values: one line a row.
            let lines: Vec<Option<Vec<u8>>> = buf
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| Some(l.to_vec()))
                .collect();
            if lines.len() != rows {
                return Err(Error::internal(format!(
                    "JSON encoding gave {} lines for {rows} rows",
                    lines.len()
                )));
            }
            Ok(lines)
        }
        KafkaFormat::Csv { delimiter } => {
            let csv = |b: &RecordBatch| -> Result<Vec<u8>> {
                let mut buf = Vec::new();
                {
                    let mut w = datafusion::arrow::csv::WriterBuilder::new()
                        .with_header(false)
                        .with_delimiter(*delimiter)
                        .build(&mut buf);
                    w.write(b)?;
                }
                Ok(buf)
            };
            let trim = |mut l: Vec<u8>| {
                while l.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
                    l.pop();
                }
                l
            };
            let all = csv(batch)?;
            let lines: Vec<&[u8]> = all
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            if lines.len() == rows {
                return Ok(lines.into_iter().map(|l| Some(trim(l.to_vec()))).collect());
            }
            // A quoted value holds a line break: one row at a time.
            (0..rows)
                .map(|i| csv(&batch.slice(i, 1)).map(|l| Some(trim(l))))
                .collect()
        }
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, schema: &SchemaRef, _mode: OutputMode) -> Result<()> {
        self.check_schema(schema)?;
        let (producer, consumer) = self.open_clients()?;
        let (conn, topic, name) = (self.conn.clone(), self.topic.clone(), self.name.clone());
        let c = Arc::clone(&consumer);
        let parts = blocking(move || conn.partitions(&c, &topic)).await?;
        if parts.is_none() {
            return Err(Error::plan(format!(
                "sink '{name}': topic '{}' does not exist on {} (create it first)",
                self.topic, self.conn.servers
            )));
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.producer = Some(producer);
        st.consumer = Some(consumer);
        st.written = None;
        st.planned = None;
        st.wrote = false;
        Ok(())
    }

    async fn write(
        &self,
        id: BatchId,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<()> {
        let what = format!("sink '{}'", self.name);
        let (producer, consumer, scan) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (Some(p), Some(c)) = (st.producer.clone(), st.consumer.clone()) else {
                return Err(Error::internal(format!(
                    "{what}: written before it was opened"
                )));
            };
            // A batch the engine planned just now, or the one after a batch
            // this process wrote completely, cannot have been written before.
            let fresh = st.planned == Some(id) || (id > 0 && st.written == Some(id - 1));
            let scan = match (fresh, st.wrote) {
                (true, true) => Scan::None,
                (true, false) => Scan::Tail,
                (false, _) => Scan::Full,
            };
            st.planned = None;
            st.written = None;
            (p, c, scan)
        };
        let records = self.encode(schema, &batches)?;
        let (conn, topic) = (self.conn.clone(), self.topic.clone());
        let parts = {
            let c = Arc::clone(&consumer);
            blocking(move || conn.partitions(&c, &topic))
                .await?
                .ok_or_else(|| {
                    Error::data(format!(
                        "{what}: topic '{}' no longer exists on {}",
                        self.topic, self.conn.servers
                    ))
                })?
        };
        // Whether this write reads the topic (then the tail has been checked
        // for another run's output since `open`).
        let checks = scan != Scan::None && !records.is_empty();
        let present = if !checks {
            HashSet::new()
        } else {
            let (conn, topic, sink_id, what, parts) = (
                self.conn.clone(),
                self.topic.clone(),
                self.sink_id.clone(),
                what.clone(),
                parts.clone(),
            );
            let c = Arc::clone(&consumer);
            let whole = scan == Scan::Full;
            blocking(move || written_before(&conn, &c, &topic, &sink_id, &what, &parts, id, whole))
                .await?
        };
        let n = parts.len() as i32;
        let ids = record_ids(
            &records
                .iter()
                .map(|(k, v)| (k.as_deref(), v.as_deref()))
                .collect::<Vec<_>>(),
        );
        let headers = |record: &str| {
            OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: SINK_HEADER,
                    value: Some(self.sink_id.as_bytes()),
                })
                .insert(Header {
                    key: BATCH_HEADER,
                    value: Some(id.to_string().as_bytes()),
                })
                .insert(Header {
                    key: RECORD_HEADER,
                    value: Some(record.as_bytes()),
                })
        };
        let mut pending: Vec<DeliveryFuture> = Vec::new();
        for (seq, ((key, value), record)) in records
            .iter()
            .zip(&ids)
            .enumerate()
            .filter(|(_, (_, record))| !present.contains(*record))
        {
            let seq = seq as u64;
            let partition = parts[match key {
                Some(k) => partition_for_key(k, n),
                None => ((id + seq) % n as u64) as i32,
            } as usize];
            loop {
                let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
                    .partition(partition)
                    .headers(headers(record));
                if let Some(k) = key {
                    rec = rec.key(k.as_slice());
                }
                if let Some(v) = value {
                    rec = rec.payload(v.as_slice());
                }
                match producer.send_result(rec) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // The client's queue is full: wait for what is in flight.
                        await_all(&what, &self.topic, id, std::mem::take(&mut pending)).await?;
                    }
                    Err((e, _)) => {
                        return Err(kafka_error(
                            format!("{what}: writing batch {id} to topic '{}'", self.topic),
                            e,
                        ));
                    }
                }
            }
        }
        await_all(&what, &self.topic, id, pending).await?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.written = Some(id);
        st.wrote |= checks;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn planned(&self, id: BatchId) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).planned = Some(id);
    }

    /// As the late-row or dead-letter target of several queries, each query
    /// writes as a sink of its own: its sink id gets `/<query>`, so their
    /// batch ids, scans and clients stay apart.
    fn for_query(&self, query: &str) -> Option<Arc<dyn Sink>> {
        Some(Arc::new(KafkaSink {
            name: self.name.clone(),
            topic: self.topic.clone(),
            conn: self.conn.clone(),
            format: self.format.clone(),
            key: self.key.clone(),
            sink_id: format!("{}/{query}", self.sink_id),
            idempotent: self.idempotent,
            state: Mutex::new(SinkState::default()),
        }))
    }
}

/// The record identities of batch `id` that the topic already holds. With
/// `whole` unset, only the last [`SCAN_STEP`] records of each partition are
/// read, and any record of this sink from batch `id` on is another run's.
#[allow(clippy::too_many_arguments)]
fn written_before(
    conn: &Connection,
    consumer: &BaseConsumer,
    topic: &str,
    sink_id: &str,
    what: &str,
    partitions: &[i32],
    id: BatchId,
    whole: bool,
) -> Result<HashSet<String>> {
    let mut present = HashSet::new();
    let keys: Vec<(String, i32)> = partitions.iter().map(|p| (topic.to_string(), *p)).collect();
    let marks = conn.watermarks_all(consumer, &keys)?;
    for &p in partitions {
        let (low, high) = marks[&(topic.to_string(), p)];
        let mut to = high;
        while to > low {
            let from = (to - SCAN_STEP).max(low);
            let range = Range {
                topic: topic.to_string(),
                partition: p,
                from,
                to,
            };
            let records = fetch(conn, consumer, &[range], true, what)?;
            let mut earlier = false;
            for r in records.iter().flatten() {
                if r.header(SINK_HEADER) != Some(sink_id) {
                    continue;
                }
                let (Some(b), Some(record)) = (
                    r.header(BATCH_HEADER).and_then(|v| v.parse::<u64>().ok()),
                    r.header(RECORD_HEADER),
                ) else {
                    continue;
                };
                if b > id || (b == id && !whole) {
                    return Err(Error::data(format!(
                        "{what}: topic '{}' partition {p} offset {} holds batch {b} of sink id \
                         '{}', not before batch {id} being written: the topic holds the output \
                         of another run of this sink (a deleted or different checkpoint?). \
                         Give the sink a new sink_id or write to a new topic",
                        topic, r.offset, sink_id
                    )));
                }
                if b == id {
                    present.insert(record.to_string());
                } else {
                    earlier = true;
                }
            }
            if earlier || !whole {
                break;
            }
            to = from;
        }
    }
    Ok(present)
}

async fn await_all(
    what: &str,
    topic: &str,
    id: BatchId,
    pending: Vec<DeliveryFuture>,
) -> Result<()> {
    let shown = std::path::PathBuf::from(format!("kafka topic '{topic}'"));
    for f in futures::future::join_all(pending).await {
        match f {
            Ok(Ok(_)) => {
                // Each record stored is a step of the crash harness, as a
                // file written is: a crash here leaves part of the batch.
                sluice_common::durable::io_step("stored a record in", &shown).map_err(|e| {
                    Error::io(format!("{what}: writing batch {id} to topic '{topic}'"), e)
                })?;
            }
            Ok(Err((e, _))) => {
                return Err(kafka_error(
                    format!("{what}: writing batch {id} to topic '{topic}'"),
                    e,
                ));
            }
            Err(_) => {
                return Err(Error::io(
                    format!("{what}: writing batch {id} to topic '{topic}'"),
                    std::io::Error::other("the Kafka producer went away before delivery"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{BinaryArray, Int64Array, StringViewArray};

    #[test]
    fn record_ids_depend_on_content_and_occurrence_not_order() {
        let a: KeyValue<'_> = (Some(b"k"), Some(b"v1"));
        let b: KeyValue<'_> = (None, Some(b"v2"));
        let one = record_ids(&[a, b, a]);
        let other = record_ids(&[b, a, a]);
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(sorted(one.clone()), sorted(other.clone()));
        assert_eq!(one[1], other[0]);
        assert!(one[0].ends_with("-0") && one[2].ends_with("-1"));
        assert_eq!(one[0].split('-').next(), one[2].split('-').next());
        // Key and value are kept apart: ("ab", "c") is not ("a", "bc"), and
        // an absent value is not an empty one.
        let x = record_ids(&[(Some(b"ab"), Some(b"c")), (Some(b"a"), Some(b"bc"))]);
        assert_ne!(x[0].split('-').next(), x[1].split('-').next());
        let y = record_ids(&[(None, None), (None, Some(b""))]);
        assert_ne!(y[0], y[1]);
    }

    #[test]
    fn keys_are_bytes_as_they_are_or_the_text_of_other_types() {
        let ints = Int64Array::from(vec![Some(1), None, Some(42)]);
        assert_eq!(
            column_bytes(&ints).unwrap(),
            vec![Some(b"1".to_vec()), None, Some(b"42".to_vec())]
        );
        let text = StringViewArray::from(vec![Some("home"), None]);
        assert_eq!(
            column_bytes(&text).unwrap(),
            vec![Some(b"home".to_vec()), None]
        );
        let bin = BinaryArray::from(vec![Some(&b"\xff\x00"[..])]);
        assert_eq!(column_bytes(&bin).unwrap(), vec![Some(vec![0xff, 0])]);
    }
}
