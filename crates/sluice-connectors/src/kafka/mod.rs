//! Kafka in and out (`connector = 'kafka'`), on librdkafka through `rdkafka`.
//!
//! The [`KafkaSource`] keeps its own per-partition positions in the query's
//! offset log, as `{"<topic>": {"<partition>": <next offset>, ...}, ...}`:
//! its consumer is assigned partitions and positions explicitly and commits
//! nothing to the broker, so a re-run batch reads exactly the records it read
//! before. Where each partition's reading began is kept in the source's own
//! file in the checkpoint (`sources/<name>/partitions`), written before the
//! plan record that first names the partition.
//!
//! The [`KafkaSink`] is exactly-once without broker transactions: every
//! record carries headers naming the sink, the batch and the record's place
//! in the batch; before it writes a batch that may have been written before
//! (the first batch after a start, or one whose write failed), the sink reads
//! the tail of each partition of its topic and writes only the records of the
//! batch that are not there yet. `docs/architecture.md` gives the protocol.
//!
//! [`LocalBroker`] starts a local Kafka-protocol broker (tansu) for tests
//! and examples, with helpers to make topics, produce and read them back.

mod broker;
mod murmur;
mod sink;
pub(crate) mod source;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sluice_common::{Error, Options, Result};

pub use broker::{LocalBroker, ProduceRecord, consume_all, create_topic, partition_count, produce};
pub use murmur::{murmur2, partition_for_key};
pub use sink::{KafkaSink, KeyValue, record_ids};
pub use source::KafkaSource;

/// The names of the metadata columns a Kafka source can fill.
pub const METADATA_COLUMNS: &[&str] = &["_key", "_topic", "_partition", "_offset", "_timestamp"];

/// How a record's value is written or read.
#[derive(Debug, Clone, PartialEq)]
pub enum KafkaFormat {
    /// One JSON object per record.
    Json,
    /// One CSV line (no header) per record.
    Csv {
        /// The field separator.
        delimiter: u8,
    },
    /// The value's bytes as they are, in a `value` column.
    Raw,
}

impl KafkaFormat {
    fn from_options(options: &Options) -> Result<Self> {
        match options
            .get_choice("format", &["json", "csv", "raw"])?
            .as_deref()
        {
            Some("json") => Ok(KafkaFormat::Json),
            Some("raw") => Ok(KafkaFormat::Raw),
            Some(_) => Ok(KafkaFormat::Csv {
                delimiter: crate::decode::delimiter_option(options)?,
            }),
            None => Err(Error::plan(format!(
                "{} needs format = 'json' | 'csv' | 'raw'",
                options.owner()
            ))),
        }
    }
}

/// Where the brokers are and how to talk to them.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    /// `bootstrap.servers`.
    pub servers: String,
    /// Further librdkafka properties, from options named `kafka.<property>`.
    pub properties: Vec<(String, String)>,
    /// How long a metadata request, a read or a write may take.
    pub timeout: Duration,
}

impl Connection {
    /// The options every Kafka source and sink takes besides its own;
    /// options named `kafka.<property>` pass `<property>` to librdkafka.
    pub const OPTIONS: &'static [&'static str] = &["connector", "bootstrap.servers", "timeout"];

    /// librdkafka properties Sluice sets itself: its offsets, the sink's
    /// scan and the idempotent producer rely on them.
    const RESERVED: &'static [&'static str] = &[
        "bootstrap.servers",
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "enable.partition.eof",
        "isolation.level",
        "enable.idempotence",
    ];

    /// A connection to `servers` with no further properties.
    pub fn plain(servers: &str, timeout: Duration) -> Self {
        Connection {
            servers: servers.to_string(),
            properties: vec![],
            timeout,
        }
    }

    pub fn from_options(options: &Options) -> Result<Self> {
        let servers = options.require("bootstrap.servers")?.to_string();
        if let Some((k, _)) = options.iter().find(|(k, _)| {
            k.strip_prefix("kafka.")
                .is_some_and(|p| Self::RESERVED.contains(&p))
        }) {
            return Err(Error::plan(format!(
                "{}: option '{k}' cannot be set: Sluice sets it itself (its offsets, its \
                 exactly-once sink and the options bootstrap.servers and idempotent cover it)",
                options.owner()
            )));
        }
        let properties = options
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("kafka.")
                    .map(|p| (p.to_string(), v.to_string()))
            })
            .collect();
        let timeout = options
            .get_duration("timeout")?
            .unwrap_or(Duration::from_secs(30));
        Ok(Connection {
            servers,
            properties,
            timeout,
        })
    }

    /// Checks that every option is known: the connection's, `own`, or a
    /// `kafka.<property>`.
    pub fn check_known(options: &Options, own: &[&str]) -> Result<()> {
        let mut known: Vec<&str> = Connection::OPTIONS.to_vec();
        known.extend_from_slice(own);
        known.extend(
            options
                .iter()
                .map(|(k, _)| k)
                .filter(|k| k.starts_with("kafka.")),
        );
        options.check_known(&known)
    }

    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.servers)
            .set("log_level", "3")
            .set(
                "socket.timeout.ms",
                self.timeout.as_millis().clamp(10, 300_000).to_string(),
            );
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// A consumer that is only ever assigned partitions and positions: it
    /// joins no group and commits nothing. `uncommitted`: it also sees
    /// records of open transactions (the sink's scan must see everything).
    pub fn consumer(&self, what: &str, uncommitted: bool) -> Result<BaseConsumer> {
        let mut c = self.config();
        c.set(
            "isolation.level",
            if uncommitted {
                "read_uncommitted"
            } else {
                "read_committed"
            },
        )
        .set("group.id", "sluice")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "true")
        // It reads ranges it knows are there: a broker that holds a
        // fetch for more data only delays it.
        .set("fetch.wait.max.ms", "10");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c.create()
            .map_err(|e| kafka_error(format!("{what}: making a Kafka consumer"), e))
    }

    /// The partitions of `topic`, ascending; `None` when the broker does
    /// not know the topic.
    pub fn partitions(&self, consumer: &BaseConsumer, topic: &str) -> Result<Option<Vec<i32>>> {
        let md = consumer
            .fetch_metadata(Some(topic), self.timeout)
            .map_err(|e| {
                kafka_error(
                    format!("fetching metadata of topic '{topic}' from {}", self.servers),
                    e,
                )
            })?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match t.error() {
            None => {}
            Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                return Ok(None);
            }
            // Not "no such topic": say what the broker said (transient).
            Some(e) => {
                return Err(Error::io(
                    format!("fetching metadata of topic '{topic}' from {}", self.servers),
                    std::io::Error::other(format!("{e:?}")),
                ));
            }
        }
        if t.partitions().is_empty() {
            return Ok(None);
        }
        let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ps.sort_unstable();
        Ok(Some(ps))
    }

    /// Every topic the broker lists, but internal ones (`__...`).
    pub fn topics(&self, consumer: &BaseConsumer) -> Result<Vec<(String, Vec<i32>)>> {
        let md = consumer
            .fetch_metadata(None, self.timeout)
            .map_err(|e| kafka_error(format!("fetching the topics of {}", self.servers), e))?;
        let mut out: Vec<(String, Vec<i32>)> = md
            .topics()
            .iter()
            .filter(|t| !t.name().starts_with("__") && t.error().is_none())
            .map(|t| {
                let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                ps.sort_unstable();
                (t.name().to_string(), ps)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The low and high watermarks of a partition: the first offset still
    /// held and the offset the next record will get.
    pub fn watermarks(
        &self,
        consumer: &BaseConsumer,
        topic: &str,
        partition: i32,
    ) -> Result<(i64, i64)> {
        consumer
            .fetch_watermarks(topic, partition, self.timeout)
            .map_err(|e| {
                kafka_error(
                    format!("fetching the offsets of topic '{topic}' partition {partition}"),
                    e,
                )
            })
    }
}

impl Connection {
    /// The low and high watermarks of many partitions, in two requests per
    /// broker (ListOffsets for "earliest" and "latest" of all of them)
    /// rather than two per partition. A partition the batched answer leaves
    /// out or marks in error is asked on its own.
    pub fn watermarks_all(
        &self,
        consumer: &BaseConsumer,
        parts: &[(String, i32)],
    ) -> Result<HashMap<(String, i32), (i64, i64)>> {
        let mut out: HashMap<(String, i32), (i64, i64)> = HashMap::new();
        if parts.is_empty() {
            return Ok(out);
        }
        let ask = |at: Offset| -> Option<TopicPartitionList> {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in parts {
                tpl.add_partition_offset(t, *p, at).ok()?;
            }
            consumer.offsets_for_times(tpl, self.timeout).ok()
        };
        let read = |tpl: Option<TopicPartitionList>| -> HashMap<(String, i32), i64> {
            tpl.map(|tpl| {
                tpl.elements()
                    .iter()
                    .filter(|e| e.error().is_ok())
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) if o >= 0 => {
                            Some(((e.topic().to_string(), e.partition()), o))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
        };
        // A timestamp of -2 asks for the earliest offset, -1 for the latest.
        let lows = read(ask(Offset::Beginning));
        let highs = read(ask(Offset::End));
        for (t, p) in parts {
            let key = (t.clone(), *p);
            let marks = match (lows.get(&key), highs.get(&key)) {
                (Some(l), Some(h)) if l <= h => (*l, *h),
                _ => self.watermarks(consumer, t, *p)?,
            };
            out.insert(key, marks);
        }
        Ok(out)
    }
}

/// Whether a column of this type holds text (`VARCHAR` is `Utf8View`).
pub(crate) fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// Whether a column of this type can hold a record's key or value as is.
pub(crate) fn is_bytes_or_text(t: &DataType) -> bool {
    is_text(t)
        || matches!(
            t,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView
        )
}

/// Bytes as a column of type `to` (text types check UTF-8).
pub(crate) fn bytes_as(
    bytes: &ArrayRef,
    to: &DataType,
) -> std::result::Result<ArrayRef, datafusion::arrow::error::ArrowError> {
    if is_text(to) && *to != DataType::Utf8 {
        let text = cast(bytes, &DataType::Utf8)?;
        return cast(&text, to);
    }
    cast(bytes, to)
}

/// Runs a blocking librdkafka call on Tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("a Kafka client task failed: {e}")))?
}

/// A broker error while doing `what`: transient, so the batch may be retried.
pub(crate) fn kafka_error(what: String, e: KafkaError) -> Error {
    Error::io(what, std::io::Error::other(e.to_string()))
}

/// One record as read from a partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The record's offset in its partition.
    pub offset: i64,
    /// The key, if any.
    pub key: Option<Vec<u8>>,
    /// The value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
    /// The record's timestamp in milliseconds since the epoch, if any.
    pub timestamp_ms: Option<i64>,
    /// The record's headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// The value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Offsets `[from, to)` of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Range {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

/// Reads the records of each range (in offset order), with their headers
/// when `headers` is set. A range whose records are gone (deleted by
/// retention after the caller checked) is a data error; a broker that
/// delivers nothing for the connection's timeout is an I/O error naming the
/// range (the timeout counts from the last record received, so a big range
/// takes as long as it takes).
pub(crate) fn fetch(
    conn: &Connection,
    consumer: &BaseConsumer,
    ranges: &[Range],
    headers: bool,
    what: &str,
) -> Result<Vec<Vec<Record>>> {
    let mut out: Vec<Vec<Record>> = vec![Vec::new(); ranges.len()];
    let mut tpl = TopicPartitionList::new();
    let mut index: HashMap<(&str, i32), usize> = HashMap::new();
    let mut next: Vec<i64> = ranges.iter().map(|r| r.from).collect();
    let mut open = 0;
    for (i, r) in ranges.iter().enumerate() {
        if r.from < r.to {
            tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.from))
                .map_err(|e| kafka_error(format!("{what}: assigning a partition"), e))?;
            index.insert((r.topic.as_str(), r.partition), i);
            open += 1;
        }
    }
    if open == 0 {
        return Ok(out);
    }
    consumer
        .assign(&tpl)
        .map_err(|e| kafka_error(format!("{what}: assigning partitions"), e))?;
    let mut deadline = Instant::now() + conn.timeout;
    let mut last_error: Option<KafkaError> = None;
    let result = loop {
        if open == 0 {
            break Ok(());
        }
        if Instant::now() >= deadline {
            let (i, r) = ranges
                .iter()
                .enumerate()
                .find(|(i, r)| next[*i] < r.to)
                .expect("an open range");
            let why = last_error
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            break Err(Error::io(
                format!(
                    "{what}: reading topic '{}' partition {} offsets [{}, {}) from {}",
                    r.topic, r.partition, r.from, r.to, conn.servers
                ),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no record at offset {} within {:?}{why}",
                        next[i], conn.timeout
                    ),
                ),
            ));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let Some(&i) = index.get(&(m.topic(), m.partition())) else {
                    continue;
                };
                let r = &ranges[i];
                if m.offset() < next[i] || next[i] >= r.to {
                    continue;
                }
                deadline = Instant::now() + conn.timeout;
                if m.offset() < r.to {
                    out[i].push(Record {
                        topic: r.topic.clone(),
                        partition: r.partition,
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        timestamp_ms: m.timestamp().to_millis(),
                        headers: if headers {
                            m.headers()
                                .map(|h| {
                                    h.iter()
                                        .map(|h| {
                                            (h.key.to_string(), h.value.unwrap_or(b"").to_vec())
                                        })
                                        .collect()
                                })
                                .unwrap_or_default()
                        } else {
                            Vec::new()
                        },
                    });
                }
                next[i] = m.offset() + 1;
                if next[i] >= r.to {
                    open -= 1;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // The end of some partition: a range whose last offsets hold
                // no record (compacted away, or transaction markers) is done
                // when the consumer's position has passed it.
                if let Ok(pos) = consumer.position() {
                    for e in pos.elements() {
                        if let (Some(&i), Offset::Offset(o)) =
                            (index.get(&(e.topic(), e.partition())), e.offset())
                            && next[i] < ranges[i].to
                            && o >= ranges[i].to
                        {
                            next[i] = ranges[i].to;
                            open -= 1;
                        }
                    }
                }
            }
            Some(Err(KafkaError::MessageConsumption(
                code @ (RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset),
            ))) => {
                let open: Vec<String> = ranges
                    .iter()
                    .enumerate()
                    .filter(|(i, r)| next[*i] < r.to)
                    .map(|(i, r)| {
                        format!(
                            "topic '{}' partition {} offsets [{}, {})",
                            r.topic, r.partition, next[i], r.to
                        )
                    })
                    .collect();
                break Err(Error::data(format!(
                    "{what}: the broker no longer holds records the batch needs ({code}) in \
                     one of: {}; deleted (retention) after the batch was planned, or the \
                     partition was truncated",
                    open.join(", ")
                )));
            }
            Some(Err(e)) => last_error = Some(e),
        }
    };
    let _ = consumer.unassign();
    result.map(|()| out)
}
