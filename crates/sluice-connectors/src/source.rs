//! The source traits and the `WITH (connector = ...)` factory.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;
use sluice_common::durable::Durability;
use sluice_common::{Clock, Error, Options, Result};

use crate::{FileSource, MemorySource, RateSource};

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

/// Builds a source from a `CREATE SOURCE` statement's columns and options.
///
/// `schema` is `None` when the statement declared no columns.
pub fn source_from_options(
    name: &str,
    schema: Option<SchemaRef>,
    options: &Options,
) -> Result<Arc<dyn Source>> {
    let connector = options.get("connector").ok_or_else(|| {
        Error::plan(format!(
            "source '{name}' needs WITH (connector = 'memory' | 'file' | 'rate', ...)"
        ))
    })?;
    let need_schema = || {
        schema.clone().ok_or_else(|| {
            Error::plan(format!(
                "source '{name}' ({connector}) needs its columns declared: CREATE SOURCE {name} (col TYPE, ...)"
            ))
        })
    };
    match connector.to_ascii_lowercase().as_str() {
        "memory" => {
            options.check_known(&["connector", "max_rows_per_trigger"])?;
            let mut s = MemorySource::new(name, need_schema()?);
            if let Some(n) = options.get_usize("max_rows_per_trigger")? {
                s = s.with_max_rows_per_trigger(n);
            }
            Ok(Arc::new(s))
        }
        "file" => Ok(Arc::new(FileSource::from_options(name, need_schema()?, options)?)),
        "rate" => Ok(Arc::new(RateSource::from_options(name, schema, options)?)),
        other => Err(Error::plan(format!(
            "source '{name}': unknown connector '{other}' (known: memory, file, rate)"
        ))),
    }
}

/// Reads a `u64` offset, naming the source when it is not one.
pub(crate) fn offset_u64(source: &str, v: &Value) -> Result<u64> {
    v.as_u64().ok_or_else(|| {
        Error::internal(format!("source '{source}': offset {v} is not a row or file count"))
    })
}
