//! Sources and sinks of Sluice.
//!
//! The entry points of this crate are the [`Source`] and [`Sink`] traits and
//! the factories [`source_from_options`] / [`sink_from_options`] that build
//! them from a `CREATE SOURCE` / `CREATE SINK` statement's `WITH (...)`.
//!
//! A [`Source`] is a definition shared by queries; each query opens its own
//! [`SourceReader`], which maps offsets to rows: `latest_offset` says how far
//! the data reaches now, `read(start, end)` returns exactly the rows of that
//! range, again and again, so a batch re-run after a crash reads the same
//! rows. A [`Sink`] writes a batch's rows idempotently, keyed by batch id.
//!
//! Sources: `memory`, `file`, `rate`, `nexmark` and (with the default
//! feature `kafka`) [`kafka`]; sinks: `console`, `memory`, `file`, `kafka`
//! and `foreach_batch`.
//!
//! ```
//! use std::sync::Arc;
//! use sluice_connectors::{MemorySource, Source};
//! use datafusion::arrow::datatypes::{DataType, Field, Schema};
//! let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
//! let src = MemorySource::new("numbers", schema);
//! assert_eq!(src.name(), "numbers");
//! ```

pub mod decode;
pub mod file_sink;
pub mod file_source;
#[cfg(feature = "kafka")]
pub mod kafka;
mod local_server;
pub mod memory;
pub mod nexmark;
pub mod rate;
pub mod s3_server;
pub mod sink;
pub mod source;

pub use file_sink::FileSink;
pub use file_source::FileSource;
#[cfg(feature = "kafka")]
pub use kafka::{KafkaSink, KafkaSource};
pub use memory::{MemorySink, MemorySource, MemoryTable};
pub use nexmark::{NexmarkSource, NexmarkTable};
pub use rate::RateSource;
pub use sink::{ConsoleSink, ForeachBatchSink, sink_from_options};
pub use sluice_common::connector::{
    DeadLetter, OnError, ReadBatch, RemoteRead, Sink, Source, SourceContext, SourceReader,
};
pub use source::{read_part, source_from_options};

pub use datafusion;
