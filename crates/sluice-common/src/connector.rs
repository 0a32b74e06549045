//! The traits every source and sink implements: a [`Source`] maps offsets
//! to rows, a [`Sink`] writes a batch's rows idempotently by batch id.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use crate::durable::Durability;
use crate::{BatchId, Clock, Error, Options, OutputMode, Result};
use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;

/// A stream source definition, shared by every query that reads it.
pub trait Source: Send + Sync + Debug {
    /// The source's name (its table name in SQL).
    fn name(&self) -> &str;
    /// The schema of its rows.
    fn schema(&self) -> SchemaRef;
    /// The connector kind, e.g. `file`.
    fn connector(&self) -> &str;
    /// Opens a reader for one query; `ctx.dir` is that query's durable
    /// directory for this source.
    fn open(&self, ctx: SourceContext) -> Result<Box<dyn SourceReader>>;
    /// The source as `Any`, for downcasting (e.g. to append to a memory source).
    fn as_any(&self) -> &dyn std::any::Any;
    /// Where undecodable records go, when `on_error = 'dead_letter'`.
    fn dead_letter_target(&self) -> Option<&str> {
        None
    }
}

/// What a query gives a source when it opens it.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// A directory in the query's checkpoint reserved for this source.
    pub dir: PathBuf,
    /// How the source syncs its own durable metadata.
    pub durability: Durability,
    /// The trigger clock.
    pub clock: Arc<dyn Clock>,
}

/// One query's reader of a source: maps offsets to rows.
#[async_trait]
pub trait SourceReader: Send + Sync + Debug {
    /// The offset before any data.
    fn initial_offset(&self) -> Value;
    /// How far data reaches now, starting at `start`, capped by the source's
    /// per-trigger limit. Equal to `start` when nothing new arrived.
    async fn latest_offset(&mut self, start: &Value) -> Result<Value>;
    /// Exactly the rows of `[start, end)`; the same rows every time.
    async fn read(&mut self, start: &Value, end: &Value) -> Result<ReadBatch>;
    /// How much data was available after `end` and not taken, as of the
    /// last [`SourceReader::latest_offset`]: rows, or files for a file
    /// source (see [`SourceReader::backlog_unit`]). `None` when the source
    /// cannot tell. Called once per new batch, after `latest_offset`; it
    /// should not read or list anything that call did not.
    async fn backlog(&mut self, _end: &Value) -> Result<Option<u64>> {
        Ok(None)
    }
    /// What [`SourceReader::backlog`] counts: `rows` or `files`.
    fn backlog_unit(&self) -> &'static str {
        "rows"
    }
    /// The range `[start, end)` as other processes read it (a cluster's
    /// executors): what to read with and the range's parts, or `None`
    /// when this source's rows can only be read here. Reading every part
    /// in order must give exactly what [`SourceReader::read`] gives.
    fn remote_read(&self, _start: &Value, _end: &Value) -> Result<Option<RemoteRead>> {
        Ok(None)
    }
    /// An offset after `start` and at most `end`, chosen by `draw` (any
    /// number): the end of a smaller batch, for tests that split the input
    /// into random micro-batches (`SET split_seed`). Offsets that count rows
    /// or files are split here; a source with other offsets overrides this
    /// (returning `end` keeps the batch whole).
    fn split_offset(&self, start: &Value, end: &Value, draw: u64) -> Value {
        match (start.as_u64(), end.as_u64()) {
            (Some(s), Some(e)) if e > s + 1 => Value::from(s + 1 + draw % (e - s)),
            _ => end.clone(),
        }
    }
}

/// A range of a source as another process reads it: `config` says what
/// to read with (the connector, where the data is, its format), each of
/// `parts` is a piece of the range read on its own
/// (`sluice_connectors::read_part`).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteRead {
    /// The connector and its settings.
    pub config: Value,
    /// The range's pieces, in order.
    pub parts: Vec<Value>,
}

/// The rows of one range, and what could not be decoded.
#[derive(Debug, Default)]
pub struct ReadBatch {
    /// The decoded rows.
    pub batches: Vec<RecordBatch>,
    /// Bad records dropped (`on_error = 'drop'`).
    pub dropped: u64,
    /// Bad records to send to the dead-letter table (`on_error = 'dead_letter'`).
    pub dead_letters: Vec<DeadLetter>,
    /// When the oldest record of the range became available, in ms since
    /// the Unix epoch, if the source knows: a file's modification time, a
    /// Kafka record's timestamp, a rate row's time. Without it the engine
    /// counts from when it planned the batch. For end-to-end latency.
    pub available_ms: Option<i64>,
}

/// A record that could not be decoded, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The source name.
    pub source: String,
    /// File and line (or row) of the record.
    pub location: String,
    /// Why it could not be decoded.
    pub error: String,
    /// The raw record (empty for an unreadable binary file).
    pub raw: String,
}

/// What a source does with a record it cannot decode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the batch with an error naming the record (default).
    #[default]
    Fail,
    /// Drop it and count it in progress.
    Drop,
    /// Send it to the named dead-letter table.
    DeadLetter(String),
}

impl OnError {
    /// Reads `on_error` and `dead_letter` from `options`.
    pub fn from_options(options: &Options) -> Result<OnError> {
        match options
            .get_choice("on_error", &["fail", "drop", "dead_letter"])?
            .as_deref()
        {
            None | Some("fail") => Ok(OnError::Fail),
            Some("drop") => Ok(OnError::Drop),
            _ => {
                let table = options.get("dead_letter").ok_or_else(|| {
                    Error::plan(format!(
                        "{}: on_error = 'dead_letter' needs the option dead_letter = '<table name>'",
                        options.owner()
                    ))
                })?;
                Ok(OnError::DeadLetter(table.to_string()))
            }
        }
    }
}

/// Where a query's output goes. `write` must be idempotent per batch id: a
/// batch re-run after a crash calls it again with the same id and rows, and
/// the sink must end up holding them once.
#[async_trait]
pub trait Sink: Send + Sync + Debug {
    /// The sink's name.
    fn name(&self) -> &str;
    /// Called once when a query starts, with the query's output schema and
    /// output mode; a sink cleans up after an interrupted run here, and
    /// refuses a mode it cannot honour.
    async fn open(&self, schema: &SchemaRef, mode: OutputMode) -> Result<()>;
    /// Writes the rows of batch `id`.
    async fn write(&self, id: BatchId, schema: &SchemaRef, batches: Vec<RecordBatch>)
    -> Result<()>;
    /// The sink as `Any`, for downcasting.
    fn as_any(&self) -> &dyn std::any::Any;
    /// Batch `id` was planned by this process just now, so no earlier attempt
    /// of it has written anything: a batch reaches its sinks only after its
    /// plan record is durable, and a batch whose plan is logged is re-run,
    /// never planned again. A sink that looks for an earlier attempt's output
    /// before it writes may skip that for the batch's first write. (A batch
    /// re-run after a restart, or retried after a failed write, is not
    /// announced.)
    fn planned(&self, _id: BatchId) {}
    /// The sink as one of several queries writing it sees it (late rows of
    /// every query reading a source go to that source's one `late_rows`
    /// target): its own batch-id space, so the queries' batches do not
    /// replace each other's. `None`: the sink needs no such scope.
    fn for_query(&self, _query: &str) -> Option<Arc<dyn Sink>> {
        None
    }
}
