//! The sink trait, the console and foreach-batch sinks, and the factory.

use std::fmt::Debug;
use std::io::Write;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use sluice_common::{BatchId, Error, Options, OutputMode, Result};

use sluice_common::connector::Sink;

use crate::{FileSink, MemorySink, MemoryTable};

/// Where the console sink prints.
pub type SharedWriter = Arc<Mutex<dyn Write + Send>>;

/// Prints each batch as a table headed by its batch id.
///
/// Console output is for people: a batch re-run after a crash is printed
/// again.
#[derive(Clone)]
pub struct ConsoleSink {
    name: String,
    out: SharedWriter,
    max_rows: usize,
}

impl Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("name", &self.name)
            .finish()
    }
}

impl ConsoleSink {
    /// A console sink printing to standard output.
    pub fn stdout(name: impl Into<String>) -> Self {
        Self::new(name, Arc::new(Mutex::new(std::io::stdout())))
    }

    /// A console sink printing to `out`.
    pub fn new(name: impl Into<String>, out: SharedWriter) -> Self {
        ConsoleSink {
            name: name.into(),
            out,
            max_rows: 20,
        }
    }

    /// Prints at most `n` rows per batch.
    pub fn with_max_rows(mut self, n: usize) -> Self {
        self.max_rows = n;
        self
    }
}

#[async_trait]
impl Sink for ConsoleSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, _schema: &SchemaRef, _mode: OutputMode) -> Result<()> {
        Ok(())
    }

    async fn write(
        &self,
        id: BatchId,
        _schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<()> {
        let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let mut shown = Vec::new();
        let mut left = self.max_rows;
        for b in &batches {
            if left == 0 {
                break;
            }
            let n = b.num_rows().min(left);
            shown.push(b.slice(0, n));
            left -= n;
        }
        let table = if total == 0 {
            "(no rows)".to_string()
        } else {
            pretty_format_batches(&shown)?.to_string()
        };
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let rule = "-".repeat(43);
        let more = if total > self.max_rows {
            format!("only showing the first {} of {total} rows\n", self.max_rows)
        } else {
            String::new()
        };
        write!(
            out,
            "{rule}\nBatch: {id} ({}, {total} rows)\n{rule}\n{table}\n{more}",
            self.name
        )
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("printing to the console", e))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The callback of a [`ForeachBatchSink`].
pub type ForeachBatchFn = dyn Fn(BatchId, &[RecordBatch]) -> Result<()> + Send + Sync;

/// Hands each batch's rows to a Rust callback. The callback sees a re-run
/// batch again with the same id, so it should be idempotent per id.
#[derive(Clone)]
pub struct ForeachBatchSink {
    name: String,
    f: Arc<ForeachBatchFn>,
}

impl Debug for ForeachBatchSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeachBatchSink")
            .field("name", &self.name)
            .finish()
    }
}

impl ForeachBatchSink {
    /// A sink calling `f(batch_id, rows)` for each batch.
    pub fn new(
        name: impl Into<String>,
        f: impl Fn(BatchId, &[RecordBatch]) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        ForeachBatchSink {
            name: name.into(),
            f: Arc::new(f),
        }
    }
}

#[async_trait]
impl Sink for ForeachBatchSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, _schema: &SchemaRef, _mode: OutputMode) -> Result<()> {
        Ok(())
    }

    async fn write(
        &self,
        id: BatchId,
        _schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<()> {
        (self.f)(id, &batches)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The options every sink accepts besides its connector's own.
pub const COMMON_SINK_OPTIONS: &[&str] = &[
    "connector",
    "output_mode",
    "checkpoint",
    "trigger",
    "state_ttl",
];

/// Builds a sink from a `CREATE SINK` statement's options. `memory_table`
/// gives the table a memory sink named `name` writes to.
pub fn sink_from_options(
    name: &str,
    options: &Options,
    memory_table: impl FnOnce() -> Arc<MemoryTable>,
) -> Result<Arc<dyn Sink>> {
    let connector = options.get("connector").ok_or_else(|| {
        Error::plan(format!(
            "sink '{name}' needs WITH (connector = 'console' | 'memory' | 'file' | 'kafka', ...)"
        ))
    })?;
    let known = |extra: &[&str]| {
        let mut k = COMMON_SINK_OPTIONS.to_vec();
        k.extend_from_slice(extra);
        options.check_known(&k)
    };
    match connector.to_ascii_lowercase().as_str() {
        "console" => {
            known(&["num_rows"])?;
            let mut s = ConsoleSink::stdout(name);
            if let Some(n) = options.get_usize("num_rows")? {
                s = s.with_max_rows(n);
            }
            Ok(Arc::new(s))
        }
        "memory" => {
            known(&[])?;
            Ok(Arc::new(MemorySink::new(name, memory_table())))
        }
        "file" => {
            known(&["path", "format", "sync"])?;
            Ok(Arc::new(FileSink::from_options(name, options)?))
        }
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(crate::KafkaSink::from_options(
            name,
            options,
            COMMON_SINK_OPTIONS,
        )?)),
        "foreach_batch" => Err(Error::plan(format!(
            "sink '{name}': foreach_batch sinks take a Rust callback; create them with the DataFrame API (ForeachBatchSink)"
        ))),
        other => Err(Error::plan(format!(
            "sink '{name}': unknown connector '{other}' (known: console, memory, file, kafka)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    #[derive(Default)]
    struct Buf(Vec<u8>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn console_prints_a_table_headed_by_the_batch_id_and_caps_rows() {
        let buf = Arc::new(Mutex::new(Buf::default()));
        let sink = ConsoleSink::new("c", buf.clone()).with_max_rows(2);
        let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![7, 8, 9]))],
        )
        .unwrap();
        sink.write(4, &schema, vec![b]).await.unwrap();
        let text = String::from_utf8(buf.lock().unwrap().0.clone()).unwrap();
        assert!(text.contains("Batch: 4 (c, 3 rows)"), "{text}");
        assert!(
            text.contains("| 7 |") && text.contains("| 8 |") && !text.contains("| 9 |"),
            "{text}"
        );
        assert!(
            text.contains("only showing the first 2 of 3 rows"),
            "{text}"
        );
    }

    #[test]
    fn the_factory_names_unknown_connectors_and_options() {
        let o = Options::from_pairs("sink 'k'", [("connector", "pigeon")]);
        let e = sink_from_options("k", &o, MemoryTable::new)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown connector 'pigeon'"), "{e}");
        let o = Options::from_pairs("sink 'k'", [("connector", "memory"), ("path", "x")]);
        let e = sink_from_options("k", &o, MemoryTable::new)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown option 'path'"), "{e}");
        let o = Options::from_pairs("sink 'k'", [("connector", "file"), ("format", "json")]);
        let e = sink_from_options("k", &o, MemoryTable::new)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs the option 'path'"), "{e}");
    }
}
