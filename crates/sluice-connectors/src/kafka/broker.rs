//! A local Kafka-protocol broker for tests and examples, and small helpers
//! to make topics, produce records and read a topic back.
//!
//! The broker is [tansu](https://crates.io/crates/tansu) with its in-memory
//! storage, listening on 127.0.0.1 only. `scripts/kafka-broker.sh install`
//! installs it into `~/.cache/sluice/tools` (the README's test command does
//! that itself); `SLUICE_TANSU` names another binary.

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_common::{Error, Result};

use super::{Connection, Range, Record, fetch, kafka_error};
use crate::local_server::LocalServer;

/// A tansu broker on a free port of 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct LocalBroker {
    server: LocalServer,
}

impl LocalBroker {
    /// Where the tansu binary is: `$SLUICE_TANSU`, else
    /// `~/.cache/sluice/tools/bin/tansu`, else `tansu` on the `PATH`.
    pub fn binary() -> Result<PathBuf> {
        if let Some(p) = std::env::var_os("SLUICE_TANSU") {
            return Ok(PathBuf::from(p));
        }
        if let Some(home) = std::env::var_os("HOME") {
            let p = PathBuf::from(home).join(".cache/sluice/tools/bin/tansu");
            if p.is_file() {
                return Ok(p);
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let p = dir.join("tansu");
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(Error::plan(
            "no Kafka broker to start: tansu is not installed. Run `scripts/kafka-broker.sh \
             install` (the README's test command does it), or set SLUICE_TANSU to its path",
        ))
    }

    /// Starts a broker and waits (at most 20 s) until it accepts connections.
    pub fn start() -> Result<LocalBroker> {
        let bin = Self::binary()?;
        let args = |port: u16| {
            let url = format!("tcp://127.0.0.1:{port}");
            [
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ]
            .into_iter()
            .chain(["--storage-engine", "memory://tansu/"])
            .map(str::to_string)
            .collect()
        };
        let ready = |port: u16| TcpStream::connect(("127.0.0.1", port)).is_ok();
        let server = LocalServer::start("tansu", &bin, args, ready, Duration::from_secs(20))?;
        Ok(LocalBroker { server })
    }

    /// `bootstrap.servers` for this broker.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.server.port())
    }
}

fn admin(servers: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("log_level", "3")
        .create()
        .map_err(|e| kafka_error("making a Kafka admin client".into(), e))
}

/// Makes `topic` with `partitions` partitions.
pub async fn create_topic(servers: &str, topic: &str, partitions: i32) -> Result<()> {
    let results = admin(servers)?
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| kafka_error(format!("creating topic '{topic}'"), e))?;
    for r in results {
        r.map_err(|(t, code)| {
            kafka_error(
                format!("creating topic '{t}'"),
                rdkafka::error::KafkaError::AdminOp(code),
            )
        })?;
    }
    Ok(())
}

/// One record to produce: partition (`None`: by key, or the client's
/// choice), key and value.
pub type ProduceRecord<'a> = (Option<i32>, Option<&'a [u8]>, &'a [u8]);

/// Produces `records` to `topic`, in order, and waits until all are stored.
pub async fn produce(servers: &str, topic: &str, records: &[ProduceRecord<'_>]) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("log_level", "3")
        .set("linger.ms", "0")
        .set("max.in.flight.requests.per.connection", "1")
        // One record per batch: tansu 0.6 mis-reports the end of a topic
        // whose last batch holds several (see the crate's Kafka docs).
        .set("batch.num.messages", "1")
        .create()
        .map_err(|e| kafka_error("making a Kafka producer".into(), e))?;
    for (partition, key, value) in records {
        let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(value);
        if let Some(p) = partition {
            r = r.partition(*p);
        }
        if let Some(k) = key {
            r = r.key(k);
        }
        producer
            .send(r, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| kafka_error(format!("producing to topic '{topic}'"), e))?;
    }
    Ok(())
}

/// How many partitions `topic` has (an error if it does not exist).
pub fn partition_count(servers: &str, topic: &str, timeout: Duration) -> Result<i32> {
    let conn = Connection::plain(servers, timeout);
    let consumer = conn.consumer("reading a topic's metadata", false)?;
    let parts = conn
        .partitions(&consumer, topic)?
        .ok_or_else(|| Error::plan(format!("topic '{topic}' does not exist on {servers}")))?;
    Ok(parts.len() as i32)
}

/// Every record of every partition of `topic`, by partition then offset.
/// Blocking; `timeout` bounds each request.
pub fn consume_all(servers: &str, topic: &str, timeout: Duration) -> Result<Vec<Record>> {
    let conn = Connection::plain(servers, timeout);
    let consumer = conn.consumer("reading a topic", false)?;
    let parts = conn
        .partitions(&consumer, topic)?
        .ok_or_else(|| Error::plan(format!("topic '{topic}' does not exist on {servers}")))?;
    let parts: Vec<(String, i32)> = parts.into_iter().map(|p| (topic.to_string(), p)).collect();
    let marks = conn.watermarks_all(&consumer, &parts)?;
    let ranges: Vec<Range> = parts
        .into_iter()
        .map(|key| {
            let (from, to) = marks[&key];
            Range {
                topic: key.0,
                partition: key.1,
                from,
                to,
            }
        })
        .collect();
    Ok(fetch(&conn, &consumer, &ranges, true, "reading a topic")?
        .into_iter()
        .flatten()
        .collect())
}
