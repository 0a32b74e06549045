//! The Kafka source: topics (named, or a pattern) as a stream, with offsets
//! of Sluice's own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BinaryArray, Int32Array, Int64Array, StringArray, TimestampMillisecondArray,
    new_empty_array,
};
use datafusion::arrow::compute::{can_cast_types, cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use rdkafka::consumer::BaseConsumer;
use serde_json::Value;
use sluice_common::connector::{
    DeadLetter, OnError, ReadBatch, RemoteRead, Source, SourceContext, SourceReader,
};
use sluice_common::durable::{self, Durability};
use sluice_common::{Error, Options, Result};

use super::{
    Connection, KafkaFormat, METADATA_COLUMNS, Range, Record, blocking, bytes_as, fetch,
    is_bytes_or_text, is_text,
};
use crate::decode::{self, Format};

/// Next offset to read, per topic and partition.
type Positions = BTreeMap<String, BTreeMap<i32, i64>>;

/// Which topics a source reads.
#[derive(Debug, Clone)]
enum Topics {
    Names(Vec<String>),
    Pattern(regex::Regex),
}

/// Where a partition's reading begins the first time the query runs.
#[derive(Debug, Clone, PartialEq)]
enum Starting {
    Earliest,
    Latest,
    /// Per topic and partition: an offset, or -2 (earliest) / -1 (latest);
    /// partitions not listed start at the earliest.
    Given(Positions),
}

/// Records of Kafka topics as a stream.
#[derive(Debug, Clone)]
pub struct KafkaSource {
    name: String,
    schema: SchemaRef,
    conn: Connection,
    topics: Topics,
    format: KafkaFormat,
    starting: Starting,
    max_rows_per_trigger: Option<u64>,
    fail_on_data_loss: bool,
    on_error: OnError,
    /// The options it was made from, to make it again elsewhere (a
    /// cluster's executor reading a range).
    options: Options,
}

impl KafkaSource {
    /// Builds the source from `CREATE SOURCE ... WITH (connector = 'kafka', ...)`.
    pub fn from_options(name: &str, schema: Option<SchemaRef>, options: &Options) -> Result<Self> {
        Connection::check_known(
            options,
            &[
                "topic",
                "topic_pattern",
                "format",
                "delimiter",
                "starting_offsets",
                "max_rows_per_trigger",
                "fail_on_data_loss",
                "on_error",
                "dead_letter",
            ],
        )?;
        let owner = options.owner();
        let conn = Connection::from_options(options)?;
        let topics = match (options.get("topic"), options.get("topic_pattern")) {
            (Some(t), None) => {
                let names: Vec<String> = t
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if names.is_empty() {
                    return Err(Error::plan(format!("{owner}: topic names no topic")));
                }
                Topics::Names(names)
            }
            (None, Some(p)) => Topics::Pattern(
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| Error::plan(format!("{owner}: topic_pattern: {e}")))?,
            ),
            _ => {
                return Err(Error::plan(format!(
                    "{owner} needs one of topic = '<name>[,<name>...]' or topic_pattern = '<regex>'"
                )));
            }
        };
        let format = KafkaFormat::from_options(options)?;
        let starting = match options.get("starting_offsets") {
            None | Some("earliest") => Starting::Earliest,
            Some("latest") => Starting::Latest,
            Some(json) => Starting::Given(serde_json::from_str(json).map_err(|e| {
                Error::plan(format!(
                    "{owner}: starting_offsets is 'earliest', 'latest' or JSON like \
                     {{\"topic\": {{\"0\": 42, \"1\": -2}}}} (-2: earliest, -1: latest): {e}"
                ))
            })?),
        };
        let schema = Self::check_schema(owner, &format, schema)?;
        Ok(KafkaSource {
            name: name.to_string(),
            schema,
            conn,
            topics,
            format,
            starting,
            max_rows_per_trigger: options
                .get_usize("max_rows_per_trigger")?
                .map(|n| n.max(1) as u64),
            fail_on_data_loss: options.get_bool("fail_on_data_loss")?.unwrap_or(true),
            on_error: OnError::from_options(options)?,
            options: options.clone(),
        })
    }

    /// The declared columns, checked against the format; for `raw` without
    /// declared columns, `value` and `_key` as bytes plus the metadata.
    fn check_schema(
        owner: &str,
        format: &KafkaFormat,
        schema: Option<SchemaRef>,
    ) -> Result<SchemaRef> {
        let schema = match (schema, format) {
            (Some(s), _) => s,
            (None, KafkaFormat::Raw) => Arc::new(Schema::new(vec![
                Field::new("value", DataType::Binary, true),
                Field::new("_key", DataType::Binary, true),
                Field::new("_topic", DataType::Utf8, false),
                Field::new("_partition", DataType::Int32, false),
                Field::new("_offset", DataType::Int64, false),
                Field::new(
                    "_timestamp",
                    DataType::Timestamp(TimeUnit::Millisecond, None),
                    true,
                ),
            ])),
            (None, _) => {
                return Err(Error::plan(format!(
                    "{owner} needs its columns declared: CREATE SOURCE name (col TYPE, ...)"
                )));
            }
        };
        let bytes = is_bytes_or_text;
        let mut value_columns = 0;
        for f in schema.fields() {
            let natural = match f.name().as_str() {
                "_key" => {
                    if !bytes(f.data_type()) {
                        return Err(Error::plan(format!(
                            "{owner}: column _key must be BYTEA or VARCHAR, not {}",
                            f.data_type()
                        )));
                    }
                    continue;
                }
                "_topic" => DataType::Utf8,
                "_partition" => DataType::Int32,
                "_offset" => DataType::Int64,
                "_timestamp" => DataType::Timestamp(TimeUnit::Millisecond, None),
                "value" if *format == KafkaFormat::Raw => {
                    if !bytes(f.data_type()) {
                        return Err(Error::plan(format!(
                            "{owner}: with format = 'raw', column value must be BYTEA or VARCHAR, not {}",
                            f.data_type()
                        )));
                    }
                    value_columns += 1;
                    continue;
                }
                other if *format == KafkaFormat::Raw => {
                    return Err(Error::plan(format!(
                        "{owner}: with format = 'raw' the columns are value and the metadata \
                         columns {}; '{other}' is neither",
                        METADATA_COLUMNS.join(", ")
                    )));
                }
                _ => {
                    value_columns += 1;
                    continue;
                }
            };
            if !can_cast_types(&natural, f.data_type()) {
                return Err(Error::plan(format!(
                    "{owner}: column {} holds {natural} and cannot be declared {}",
                    f.name(),
                    f.data_type()
                )));
            }
        }
        if value_columns == 0 && *format != KafkaFormat::Raw {
            return Err(Error::plan(format!(
                "{owner}: no column is read from the record's value (only metadata columns are declared)"
            )));
        }
        Ok(schema)
    }

    /// The columns decoded from the value (not metadata).
    fn value_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.schema
                .fields()
                .iter()
                .filter(|f| !METADATA_COLUMNS.contains(&f.name().as_str()))
                .cloned()
                .collect::<Vec<_>>(),
        ))
    }
}

impl Source for KafkaSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    fn connector(&self) -> &str {
        "kafka"
    }
    fn open(&self, ctx: SourceContext) -> Result<Box<dyn SourceReader>> {
        let consumer = self
            .conn
            .consumer(&format!("source '{}'", self.name), false)?;
        let log = PartitionLog::load(ctx.dir.join("partitions"), ctx.durability)?;
        Ok(Box::new(KafkaReader {
            inner: Arc::new(Inner {
                source: self.clone(),
                value_schema: self.value_schema(),
                consumer,
                log: Mutex::new(log),
                highs: Mutex::default(),
            }),
        }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn dead_letter_target(&self) -> Option<&str> {
        match &self.on_error {
            OnError::DeadLetter(t) => Some(t),
            _ => None,
        }
    }
}

/// Where each partition's reading began for this query: the offset before
/// which it reads nothing. Written before the plan record that first names
/// the partition, so a re-run batch starts each partition where it did.
#[derive(Debug)]
struct PartitionLog {
    path: PathBuf,
    durability: Durability,
    starts: Positions,
    /// Whether the file exists: the query has planned a batch at least once
    /// (written then even if no partition was found).
    written: bool,
}

impl PartitionLog {
    fn load(path: PathBuf, durability: Durability) -> Result<Self> {
        let written = path.exists();
        let starts = if written {
            durable::read_json(&path)?
        } else {
            Positions::new()
        };
        Ok(PartitionLog {
            path,
            durability,
            starts,
            written,
        })
    }

    fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.starts.get(topic)?.get(&partition).copied()
    }

    fn add(&mut self, new: Vec<(String, i32, i64)>) -> Result<()> {
        if new.is_empty() && self.written {
            return Ok(());
        }
        let mut starts = self.starts.clone();
        for (t, p, s) in new {
            starts.entry(t).or_default().insert(p, s);
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        durable::write_json(&self.path, &starts, self.durability)?;
        self.starts = starts;
        self.written = true;
        Ok(())
    }
}

struct Inner {
    source: KafkaSource,
    value_schema: SchemaRef,
    consumer: BaseConsumer,
    log: Mutex<PartitionLog>,
    /// Each partition's high watermark at the last `latest_offset`.
    highs: Mutex<BTreeMap<(String, i32), i64>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReader")
            .field("source", &self.source.name)
            .finish()
    }
}

#[derive(Debug)]
struct KafkaReader {
    inner: Arc<Inner>,
}

fn positions(source: &str, v: &Value) -> Result<Positions> {
    serde_json::from_value(v.clone()).map_err(|e| {
        Error::internal(format!(
            "source '{source}': offset {v} is not a map of topic to partition to offset: {e}"
        ))
    })
}

fn to_value(p: &Positions) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

impl Inner {
    fn name(&self) -> &str {
        &self.source.name
    }

    /// The partitions to read now, by topic, ascending.
    fn partitions(&self) -> Result<Vec<(String, i32)>> {
        let conn = &self.source.conn;
        let mut out = Vec::new();
        match &self.source.topics {
            Topics::Names(names) => {
                for t in names {
                    let ps = conn.partitions(&self.consumer, t)?.ok_or_else(|| {
                        Error::plan(format!(
                            "source '{}': topic '{t}' does not exist on {} (create it first, \
                             or read topics that appear later with topic_pattern)",
                            self.name(),
                            conn.servers
                        ))
                    })?;
                    out.extend(ps.into_iter().map(|p| (t.clone(), p)));
                }
            }
            Topics::Pattern(re) => {
                for (t, ps) in conn.topics(&self.consumer)? {
                    if re.is_match(&t) {
                        out.extend(ps.into_iter().map(|p| (t.clone(), p)));
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Where a partition first seen now starts.
    fn first_position(
        &self,
        first_run: bool,
        topic: &str,
        partition: i32,
        low: i64,
        high: i64,
    ) -> i64 {
        if !first_run {
            // A partition (or topic) that appeared while the query ran: all
            // of it is new data.
            return low;
        }
        match &self.source.starting {
            Starting::Earliest => low,
            Starting::Latest => high,
            Starting::Given(map) => match map.get(topic).and_then(|m| m.get(&partition)) {
                Some(-1) => high,
                Some(o) if *o >= 0 => *o,
                _ => low,
            },
        }
    }

    fn latest(&self, start: &Value) -> Result<Value> {
        let conn = &self.source.conn;
        let start_pos = positions(self.name(), start)?;
        let parts = self.partitions()?;
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        // Until the query has planned once, `starting_offsets` decides where
        // partitions start; after, a partition or topic that appears is new
        // data, read from its start.
        let first_run = start_pos.is_empty() && !log.written;
        let mut new_starts = Vec::new();
        // (topic, partition, where the batch starts, first offset held, end)
        let mut spans: Vec<(String, i32, i64, i64, i64)> = Vec::new();
        let marks = conn.watermarks_all(&self.consumer, &parts)?;
        for (t, p) in &parts {
            let (low, high) = marks[&(t.clone(), *p)];
            let s = match start_pos.get(t).and_then(|m| m.get(p)) {
                Some(s) => *s,
                None => match log.get(t, *p) {
                    Some(s) => s,
                    None => {
                        let s = self.first_position(first_run, t, *p, low, high);
                        new_starts.push((t.clone(), *p, s));
                        s
                    }
                },
            };
            if s > high {
                return Err(Error::data(format!(
                    "source '{}': topic '{t}' partition {p} ends at offset {high} but this query \
                     has read up to {s}: was the topic deleted and made again? Start the query \
                     on a new checkpoint",
                    self.name()
                )));
            }
            let (from, _) = after_retention(
                self.name(),
                t,
                *p,
                (s, high),
                low,
                self.source.fail_on_data_loss,
            )?;
            spans.push((t.clone(), *p, s, from, high));
        }
        *self.highs.lock().unwrap_or_else(|p| p.into_inner()) = spans
            .iter()
            .map(|(t, p, _, _, high)| ((t.clone(), *p), *high))
            .collect();
        // A partition the offsets name but the metadata does not: gone, or
        // missing from one stale answer. Its position is carried forward,
        // so that if it comes back it goes on where it was.
        let mut carried = Vec::new();
        for (t, ps) in &start_pos {
            for (p, s) in ps {
                if parts.iter().any(|(pt, pp)| pt == t && pp == p) {
                    continue;
                }
                if self.source.fail_on_data_loss {
                    return Err(Error::data(format!(
                        "source '{}': topic '{t}' partition {p} is gone from {} (deleted?); \
                         set fail_on_data_loss = false to go on without it",
                        self.name(),
                        conn.servers
                    )));
                }
                carried.push((t.clone(), *p, *s));
            }
        }
        log.add(new_starts)?;
        let takes = share(
            &spans.iter().map(|s| (s.4 - s.3) as u64).collect::<Vec<_>>(),
            self.source.max_rows_per_trigger,
        );
        let mut end = Positions::new();
        let mut moved = false;
        for ((t, p, s, from, _), take) in spans.into_iter().zip(takes) {
            let e = from + take as i64;
            moved |= e != s;
            end.entry(t).or_default().insert(p, e);
        }
        for (t, p, s) in carried {
            end.entry(t).or_default().insert(p, s);
        }
        if !moved {
            // Nothing new anywhere: the offset stays as it was, so no batch runs.
            return Ok(start.clone());
        }
        Ok(to_value(&end))
    }

    fn read(&self, start: &Value, end: &Value) -> Result<ReadBatch> {
        let ranges = self.ranges(start, end)?;
        self.read_ranges(ranges)
    }

    /// The partitions' offset ranges of `[start, end)`, empty ones left out.
    fn ranges(&self, start: &Value, end: &Value) -> Result<Vec<Range>> {
        let start_pos = positions(self.name(), start)?;
        let end_pos = positions(self.name(), end)?;
        let mut ranges = Vec::new();
        {
            let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            for (t, ps) in &end_pos {
                for (p, e) in ps {
                    let s = match start_pos.get(t).and_then(|m| m.get(p)) {
                        Some(s) => *s,
                        None => log.get(t, *p).ok_or_else(|| {
                            Error::checkpoint(
                                &log.path,
                                format!(
                                    "the batch reads topic '{t}' partition {p} but the source's \
                                     partition log does not say where that partition starts"
                                ),
                            )
                        })?,
                    };
                    if *e > s {
                        ranges.push(Range {
                            topic: t.clone(),
                            partition: *p,
                            from: s,
                            to: *e,
                        });
                    }
                }
            }
        }
        Ok(ranges)
    }

    /// The records of `ranges`, decoded.
    fn read_ranges(&self, mut ranges: Vec<Range>) -> Result<ReadBatch> {
        let conn = &self.source.conn;
        let mut lost = 0u64;
        // Records deleted by retention since the batch was planned (or,
        // with fail_on_data_loss = false, before).
        let marks = conn.watermarks_all(
            &self.consumer,
            &ranges
                .iter()
                .map(|r| (r.topic.clone(), r.partition))
                .collect::<Vec<_>>(),
        )?;
        for r in &mut ranges {
            let (low, _) = marks[&(r.topic.clone(), r.partition)];
            let (from, skipped) = after_retention(
                self.name(),
                &r.topic,
                r.partition,
                (r.from, r.to),
                low,
                self.source.fail_on_data_loss,
            )?;
            r.from = from;
            lost += skipped;
        }
        let fetched = fetch(
            conn,
            &self.consumer,
            &ranges,
            false,
            &format!("source '{}'", self.name()),
        )?;
        let records: Vec<Record> = fetched.into_iter().flatten().collect();
        let mut out = self.decode(records)?;
        out.dropped += lost;
        Ok(out)
    }

    fn decode(&self, records: Vec<Record>) -> Result<ReadBatch> {
        let mut out = ReadBatch::default();
        let mut bad: Vec<(usize, String)> = Vec::new();
        // A key declared as text must be UTF-8: a record whose key is not is
        // bad like one whose value does not decode.
        let key_text = self
            .source
            .schema
            .field_with_name("_key")
            .is_ok_and(|f| is_text(f.data_type()));
        let mut excluded = vec![false; records.len()];
        if key_text {
            for (i, r) in records.iter().enumerate() {
                if r.key
                    .as_deref()
                    .is_some_and(|k| std::str::from_utf8(k).is_err())
                {
                    excluded[i] = true;
                    bad.push((i, "the key is not UTF-8 text (declare _key BYTEA)".into()));
                }
            }
        }
        let (values, kept): (Option<RecordBatch>, Vec<usize>) = match &self.source.format {
            KafkaFormat::Raw => {
                let mut kept = Vec::new();
                let text = self
                    .value_schema
                    .fields()
                    .first()
                    .is_some_and(|f| is_text(f.data_type()));
                for (i, r) in records.iter().enumerate() {
                    if excluded[i] {
                        continue;
                    }
                    match &r.value {
                        Some(v) if text && std::str::from_utf8(v).is_err() => bad.push((
                            i,
                            "the value is not UTF-8 text (declare value BYTEA)".into(),
                        )),
                        _ => kept.push(i),
                    }
                }
                let cols: Vec<ArrayRef> = self
                    .value_schema
                    .fields()
                    .iter()
                    .map(|f| {
                        let a: ArrayRef = Arc::new(BinaryArray::from_iter(
                            kept.iter().map(|&i| records[i].value.as_deref()),
                        ));
                        bytes_as(&a, f.data_type()).map_err(Error::from)
                    })
                    .collect::<Result<_>>()?;
                let b = RecordBatch::try_new_with_options(
                    Arc::clone(&self.value_schema),
                    cols,
                    &datafusion::arrow::record_batch::RecordBatchOptions::new()
                        .with_row_count(Some(kept.len())),
                )?;
                (Some(b), kept)
            }
            format => {
                let format = match format {
                    KafkaFormat::Json => Format::Json,
                    KafkaFormat::Csv { delimiter } => Format::Csv {
                        header: false,
                        delimiter: *delimiter,
                    },
                    KafkaFormat::Raw => unreachable!("handled above"),
                };
                let mut index = Vec::with_capacity(records.len());
                let mut values: Vec<&[u8]> = Vec::with_capacity(records.len());
                for (i, r) in records.iter().enumerate() {
                    if excluded[i] {
                        continue;
                    }
                    match &r.value {
                        Some(v) => {
                            index.push(i);
                            values.push(v);
                        }
                        None => bad.push((i, "the record has no value (a tombstone)".into())),
                    }
                }
                let d = decode::decode_records(&format, &self.value_schema, &values);
                bad.extend(d.bad.into_iter().map(|(j, e)| (index[j], e)));
                let b = if d.batches.is_empty() {
                    None
                } else {
                    Some(concat_batches(&self.value_schema, &d.batches)?)
                };
                (b, d.kept.into_iter().map(|j| index[j]).collect())
            }
        };
        bad.sort_by_key(|(i, _)| *i);
        for (i, error) in bad {
            let r = &records[i];
            let at = format!(
                "topic '{}' partition {} offset {}",
                r.topic, r.partition, r.offset
            );
            match &self.source.on_error {
                OnError::Fail => {
                    return Err(Error::data(format!(
                        "source '{}': {at}: {error}",
                        self.name()
                    )));
                }
                OnError::Drop => out.dropped += 1,
                OnError::DeadLetter(_) => out.dead_letters.push(DeadLetter {
                    source: self.name().to_string(),
                    location: at,
                    error,
                    raw: r
                        .value
                        .as_deref()
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default(),
                }),
            }
        }
        if kept.is_empty() {
            return Ok(out);
        }
        let kept: Vec<&Record> = kept.iter().map(|&i| &records[i]).collect();
        out.available_ms = kept.iter().filter_map(|r| r.timestamp_ms).min();
        let mut cols = Vec::with_capacity(self.source.schema.fields().len());
        let mut value_col = 0;
        for f in self.source.schema.fields() {
            let natural: ArrayRef = match f.name().as_str() {
                "_key" => Arc::new(BinaryArray::from_iter(
                    kept.iter().map(|r| r.key.as_deref()),
                )),
                "_topic" => Arc::new(StringArray::from_iter_values(
                    kept.iter().map(|r| r.topic.as_str()),
                )),
                "_partition" => Arc::new(Int32Array::from_iter_values(
                    kept.iter().map(|r| r.partition),
                )),
                "_offset" => Arc::new(Int64Array::from_iter_values(kept.iter().map(|r| r.offset))),
                "_timestamp" => Arc::new(TimestampMillisecondArray::from_iter(
                    kept.iter().map(|r| r.timestamp_ms),
                )),
                _ => {
                    let c = values
                        .as_ref()
                        .map(|b| Arc::clone(b.column(value_col)))
                        .unwrap_or_else(|| new_empty_array(f.data_type()));
                    value_col += 1;
                    cols.push(c);
                    continue;
                }
            };
            let col = if natural.data_type() == f.data_type() {
                natural
            } else if f.name() == "_key" {
                bytes_as(&natural, f.data_type())?
            } else {
                cast(&natural, f.data_type())?
            };
            cols.push(col);
        }
        out.batches
            .push(RecordBatch::try_new(Arc::clone(&self.source.schema), cols)?);
        Ok(out)
    }
}

/// Where reading `[from, to)` of a partition can start when the broker holds
/// records from `low` on, and how many records of the range are gone:
/// records deleted (by retention) before the query read them are an error,
/// or with `fail_on_data_loss = false` are skipped and counted.
fn after_retention(
    source: &str,
    topic: &str,
    partition: i32,
    (from, to): (i64, i64),
    low: i64,
    fail_on_data_loss: bool,
) -> Result<(i64, u64)> {
    if low <= from {
        return Ok((from, 0));
    }
    if fail_on_data_loss {
        return Err(Error::data(format!(
            "source '{source}': topic '{topic}' partition {partition} offsets [{from}, {low}) \
             were deleted (retention) before this query read them; set fail_on_data_loss = \
             false to skip them (they are counted as dropped rows)"
        )));
    }
    let start = low.min(to);
    Ok((start, (start - from) as u64))
}

/// Spreads a per-trigger row budget over partitions in proportion to what
/// each has waiting; without a budget every partition takes all it has. The
/// split is deterministic, and takes at least one row when any is waiting.
fn share(available: &[u64], budget: Option<u64>) -> Vec<u64> {
    let total: u64 = available.iter().sum();
    let Some(budget) = budget.filter(|b| *b < total) else {
        return available.to_vec();
    };
    let mut take: Vec<u64> = available
        .iter()
        .map(|a| ((u128::from(*a) * u128::from(budget)) / u128::from(total)) as u64)
        .collect();
    let mut left = budget - take.iter().sum::<u64>();
    while left > 0 {
        for (t, a) in take.iter_mut().zip(available) {
            if left > 0 && *t < *a {
                *t += 1;
                left -= 1;
            }
        }
    }
    take
}

#[async_trait]
impl SourceReader for KafkaReader {
    fn initial_offset(&self) -> Value {
        Value::Object(Default::default())
    }

    async fn latest_offset(&mut self, start: &Value) -> Result<Value> {
        let inner = Arc::clone(&self.inner);
        let start = start.clone();
        blocking(move || inner.latest(&start)).await
    }

    fn split_offset(&self, start: &Value, end: &Value, draw: u64) -> Value {
        let (Ok(start_pos), Ok(mut end_pos)) = (
            positions(self.inner.name(), start),
            positions(self.inner.name(), end),
        ) else {
            return end.clone();
        };
        let log = self.inner.log.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = draw;
        for (t, ps) in end_pos.iter_mut() {
            for (p, e) in ps.iter_mut() {
                let s = start_pos
                    .get(t)
                    .and_then(|m| m.get(p))
                    .copied()
                    .or_else(|| log.get(t, *p))
                    .unwrap_or(*e);
                // Each partition's range is cut on its own draw.
                h = h.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (*p as u64);
                if *e > s + 1 {
                    *e = s + 1 + (h % (*e - s) as u64) as i64;
                }
            }
        }
        to_value(&end_pos)
    }

    async fn backlog(&mut self, end: &Value) -> Result<Option<u64>> {
        let end = positions(self.inner.name(), end)?;
        let highs = self.inner.highs.lock().unwrap_or_else(|p| p.into_inner());
        let mut left = 0u64;
        for ((t, p), high) in highs.iter() {
            let Some(e) = end.get(t).and_then(|m| m.get(p)) else {
                continue;
            };
            left += (high - e).max(0) as u64;
        }
        Ok(Some(left))
    }

    async fn read(&mut self, start: &Value, end: &Value) -> Result<ReadBatch> {
        let inner = Arc::clone(&self.inner);
        let (start, end) = (start.clone(), end.clone());
        blocking(move || inner.read(&start, &end)).await
    }

    /// Each partition's offset range is a part.
    fn remote_read(&self, start: &Value, end: &Value) -> Result<Option<RemoteRead>> {
        let source = &self.inner.source;
        let options: serde_json::Map<String, Value> = source
            .options
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(v)))
            .collect();
        let parts = self
            .inner
            .ranges(start, end)?
            .into_iter()
            .map(|r| serde_json::json!([r.topic, r.partition, r.from, r.to]))
            .collect();
        Ok(Some(RemoteRead {
            config: serde_json::json!({
                "connector": "kafka",
                "name": source.name,
                "options": options,
            }),
            parts,
        }))
    }
}

/// Reads part `part` (one partition's offset range) of a range described
/// by `config` ([`SourceReader::remote_read`]), as the source's reader
/// would: with a consumer of its own.
pub(crate) async fn read_part(
    config: &Value,
    schema: SchemaRef,
    part: &Value,
) -> Result<ReadBatch> {
    let name = config
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::internal("a Kafka remote read without a source name"))?
        .to_string();
    let pairs: Vec<(String, String)> = config
        .get("options")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let (topic, partition, from, to): (String, i32, i64, i64) =
        serde_json::from_value(part.clone())
            .map_err(|e| Error::internal(format!("a Kafka part {part}: {e}")))?;
    let options = Options::from_pairs(format!("source '{name}'"), pairs);
    let source = KafkaSource::from_options(&name, Some(schema), &options)?;
    blocking(move || {
        let consumer = source
            .conn
            .consumer(&format!("source '{}'", source.name), false)?;
        let inner = Inner {
            value_schema: source.value_schema(),
            consumer,
            log: Mutex::new(PartitionLog {
                path: PathBuf::new(),
                durability: Durability::NoSync,
                starts: Positions::new(),
                written: false,
            }),
            highs: Mutex::default(),
            source,
        };
        inner.read_ranges(vec![Range {
            topic,
            partition,
            from,
            to,
        }])
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_shared_by_what_waits() {
        assert_eq!(share(&[10, 0, 30], None), vec![10, 0, 30]);
        assert_eq!(share(&[10, 0, 30], Some(100)), vec![10, 0, 30]);
        assert_eq!(share(&[10, 0, 30], Some(20)), vec![5, 0, 15]);
        assert_eq!(share(&[1, 1, 1], Some(2)), vec![1, 1, 0]);
        assert_eq!(share(&[1000, 1], Some(1)), vec![1, 0]);
        let s = share(&[7, 3, 9, 1], Some(11));
        assert_eq!(s.iter().sum::<u64>(), 11);
        assert!(s.iter().zip([7, 3, 9, 1]).all(|(t, a)| *t <= a));
    }

    #[test]
    fn records_gone_before_they_were_read_are_an_error_or_skipped_and_counted() {
        assert_eq!(
            after_retention("s", "t", 0, (5, 9), 5, true).unwrap(),
            (5, 0)
        );
        assert_eq!(
            after_retention("s", "t", 0, (5, 9), 2, true).unwrap(),
            (5, 0)
        );
        let err = after_retention("s", "t", 3, (5, 9), 7, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("source 's': topic 't' partition 3 offsets [5, 7)")
                && err.contains("fail_on_data_loss = false"),
            "{err}"
        );
        assert_eq!(
            after_retention("s", "t", 0, (5, 9), 7, false).unwrap(),
            (7, 2)
        );
        // The whole range gone: nothing to read, all of it counted.
        assert_eq!(
            after_retention("s", "t", 0, (5, 9), 20, false).unwrap(),
            (9, 4)
        );
    }

    #[test]
    fn options_are_checked_by_name() {
        let opts =
            |pairs: &[(&str, &str)]| Options::from_pairs("source 'k'", pairs.iter().copied());
        let err = KafkaSource::from_options(
            "k",
            None,
            &opts(&[
                ("bootstrap.servers", "h:1"),
                ("topic", "t"),
                ("format", "json"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("columns declared"), "{err}");
        let err = KafkaSource::from_options(
            "k",
            None,
            &opts(&[("bootstrap.servers", "h:1"), ("format", "raw")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("topic_pattern"), "{err}");
        let err = KafkaSource::from_options(
            "k",
            None,
            &opts(&[
                ("bootstrap.servers", "h:1"),
                ("topic", "t"),
                ("format", "raw"),
                ("startng_offsets", "latest"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("startng_offsets"), "{err}");
        let err = KafkaSource::from_options(
            "k",
            None,
            &opts(&[
                ("bootstrap.servers", "h:1"),
                ("topic", "t"),
                ("format", "raw"),
                ("starting_offsets", "{\"t\": 3}"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("starting_offsets"), "{err}");
        let ok = KafkaSource::from_options(
            "k",
            None,
            &opts(&[
                ("bootstrap.servers", "h:1"),
                ("topic_pattern", "events-.*"),
                ("format", "raw"),
                ("kafka.client.id", "me"),
                ("starting_offsets", "{\"events-1\": {\"0\": 3, \"1\": -1}}"),
            ]),
        )
        .unwrap();
        assert_eq!(ok.schema().fields().len(), 6);
        let err = KafkaSource::from_options(
            "k",
            None,
            &opts(&[
                ("bootstrap.servers", "h:1"),
                ("topic", "t"),
                ("format", "raw"),
                ("kafka.auto.offset.reset", "earliest"),
            ]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("option 'kafka.auto.offset.reset' cannot be set"),
            "{err}"
        );
        assert_eq!(ok.conn.properties, vec![("client.id".into(), "me".into())]);
    }
}
