//! In-memory sources and sinks, for tests and for Rust programs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;
use sluice_common::{BatchId, Error, OutputMode, Result};

use sluice_common::connector::{ReadBatch, Sink, Source, SourceContext, SourceReader};

use crate::source::offset_u64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere never leaves these vectors half-updated (each update
    // is one push or insert), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A source fed from Rust ([`MemorySource::append`]) or from SQL
/// (`INSERT INTO source VALUES ...`). Its offset is the number of rows
/// appended so far; the rows live as long as the process.
#[derive(Debug, Clone)]
pub struct MemorySource {
    name: String,
    schema: SchemaRef,
    max_rows_per_trigger: Option<usize>,
    rows: Arc<Mutex<Vec<RecordBatch>>>,
}

impl MemorySource {
    /// An empty memory source.
    pub fn new(name: impl Into<String>, schema: SchemaRef) -> Self {
        MemorySource {
            name: name.into(),
            schema,
            max_rows_per_trigger: None,
            rows: Arc::default(),
        }
    }

    /// Caps how many rows one micro-batch takes.
    pub fn with_max_rows_per_trigger(mut self, n: usize) -> Self {
        self.max_rows_per_trigger = Some(n.max(1));
        self
    }

    /// Appends rows; they must have the source's schema (columns are cast by
    /// position when only the types differ).
    pub fn append(&self, batch: RecordBatch) -> Result<()> {
        let batch = conform(&self.name, &self.schema, batch)?;
        if batch.num_rows() > 0 {
            lock(&self.rows).push(batch);
        }
        Ok(())
    }

    /// Rows appended so far.
    pub fn len(&self) -> u64 {
        lock(&self.rows).iter().map(|b| b.num_rows() as u64).sum()
    }

    /// Whether no row was appended yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every row appended so far.
    pub fn all_rows(&self) -> Vec<RecordBatch> {
        lock(&self.rows).clone()
    }

    fn slice(&self, start: u64, end: u64) -> Vec<RecordBatch> {
        let rows = lock(&self.rows);
        let mut out = Vec::new();
        let mut pos = 0u64;
        for b in rows.iter() {
            let n = b.num_rows() as u64;
            let (lo, hi) = (start.max(pos), end.min(pos + n));
            if lo < hi {
                out.push(b.slice((lo - pos) as usize, (hi - lo) as usize));
            }
            pos += n;
            if pos >= end {
                break;
            }
        }
        out
    }
}

/// Casting that fails on a value that does not convert, instead of making it NULL.
const STRICT: datafusion::arrow::compute::CastOptions<'static> =
    datafusion::arrow::compute::CastOptions {
        safe: false,
        format_options: datafusion::arrow::util::display::FormatOptions::new(),
    };

/// Casts `batch` to `schema` by position, naming the source on a mismatch.
fn conform(source: &str, schema: &SchemaRef, batch: RecordBatch) -> Result<RecordBatch> {
    if batch.schema().fields().len() != schema.fields().len() {
        return Err(Error::plan(format!(
            "source '{source}' has {} columns but {} values were given per row",
            schema.fields().len(),
            batch.num_columns()
        )));
    }
    let mut cols = Vec::with_capacity(batch.num_columns());
    for (col, field) in batch.columns().iter().zip(schema.fields()) {
        let c = if col.data_type() == field.data_type() {
            Arc::clone(col)
        } else {
            datafusion::arrow::compute::cast_with_options(col, field.data_type(), &STRICT).map_err(
                |e| {
                    Error::plan(format!(
                        "source '{source}': column '{}' expects {}: {e}",
                        field.name(),
                        field.data_type()
                    ))
                },
            )?
        };
        if !field.is_nullable() && c.null_count() > 0 {
            return Err(Error::plan(format!(
                "source '{source}': column '{}' is NOT NULL but a NULL was given",
                field.name()
            )));
        }
        cols.push(c);
    }
    Ok(RecordBatch::try_new(Arc::clone(schema), cols)?)
}

impl Source for MemorySource {
    fn name(&self) -> &str {
        &self.name
    }
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    fn connector(&self) -> &str {
        "memory"
    }
    fn open(&self, _ctx: SourceContext) -> Result<Box<dyn SourceReader>> {
        Ok(Box::new(MemoryReader {
            source: self.clone(),
        }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[derive(Debug)]
struct MemoryReader {
    source: MemorySource,
}

#[async_trait]
impl SourceReader for MemoryReader {
    fn initial_offset(&self) -> Value {
        Value::from(0u64)
    }

    async fn latest_offset(&mut self, start: &Value) -> Result<Value> {
        let start = offset_u64(&self.source.name, start)?;
        let len = self.source.len();
        let end = match self.source.max_rows_per_trigger {
            Some(cap) => len.min(start + cap as u64),
            None => len,
        };
        Ok(Value::from(end.max(start)))
    }

    async fn read(&mut self, start: &Value, end: &Value) -> Result<ReadBatch> {
        let (s, e) = (
            offset_u64(&self.source.name, start)?,
            offset_u64(&self.source.name, end)?,
        );
        if e > self.source.len() {
            return Err(Error::data(format!(
                "memory source '{}' holds {} rows but the batch needs rows up to {e}: memory sources do not survive a process restart",
                self.source.name,
                self.source.len()
            )));
        }
        Ok(ReadBatch {
            batches: self.source.slice(s, e),
            ..ReadBatch::default()
        })
    }
}

/// The rows written to a memory sink, per batch id; queryable as a table.
///
/// A re-run batch replaces its own rows, so the table holds each batch once.
#[derive(Debug)]
pub struct MemoryTable {
    mode: Mutex<OutputMode>,
    schema: Mutex<Option<SchemaRef>>,
    /// Rows per (writer's scope, batch id): one query writes the empty
    /// scope; queries sharing a late-rows table write their own names.
    batches: Mutex<BTreeMap<(String, BatchId), Vec<RecordBatch>>>,
}

impl MemoryTable {
    /// An empty table whose schema is set by the first query that writes it.
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryTable {
            mode: Mutex::new(OutputMode::Append),
            schema: Mutex::new(None),
            batches: Mutex::new(BTreeMap::new()),
        })
    }

    /// The schema, once a query has been bound to the table.
    pub fn schema(&self) -> Option<SchemaRef> {
        lock(&self.schema).clone()
    }

    /// Binds the table to a query's output schema (the same schema again is fine).
    pub fn bind_schema(&self, name: &str, schema: &SchemaRef) -> Result<()> {
        let mut s = lock(&self.schema);
        match &*s {
            Some(existing) if existing.fields() != schema.fields() => Err(Error::plan(format!(
                "memory sink '{name}' already holds rows of another shape ({existing}); the new query produces ({schema})"
            ))),
            _ => {
                *s = Some(Arc::clone(schema));
                Ok(())
            }
        }
    }

    /// How the table takes batches: in complete mode each batch is the whole
    /// result and replaces what the table held; otherwise batches accumulate.
    pub fn set_mode(&self, mode: OutputMode) {
        *lock(&self.mode) = mode;
    }

    /// Replaces the rows of batch `id` (all rows, in complete mode).
    pub fn put(&self, id: BatchId, batches: Vec<RecordBatch>) {
        self.put_scoped("", id, batches)
    }

    /// Replaces the rows of batch `id` of writer `scope`.
    pub fn put_scoped(&self, scope: &str, id: BatchId, batches: Vec<RecordBatch>) {
        let mut all = lock(&self.batches);
        if *lock(&self.mode) == OutputMode::Complete {
            all.clear();
        }
        all.insert((scope.to_string(), id), batches);
    }

    /// Every row, in batch order.
    pub fn rows(&self) -> Vec<RecordBatch> {
        lock(&self.batches).values().flatten().cloned().collect()
    }

    /// Every row as one batch.
    pub fn to_batch(&self) -> Result<Option<RecordBatch>> {
        let Some(schema) = self.schema() else {
            return Ok(None);
        };
        Ok(Some(concat_batches(&schema, &self.rows())?))
    }

    /// The batch ids written so far.
    pub fn batch_ids(&self) -> Vec<BatchId> {
        lock(&self.batches).keys().map(|(_, id)| *id).collect()
    }
}

/// A sink that keeps its rows in a [`MemoryTable`].
#[derive(Debug, Clone)]
pub struct MemorySink {
    name: String,
    table: Arc<MemoryTable>,
    scope: String,
}

impl MemorySink {
    /// A memory sink writing to `table`.
    pub fn new(name: impl Into<String>, table: Arc<MemoryTable>) -> Self {
        MemorySink {
            name: name.into(),
            table,
            scope: String::new(),
        }
    }

    /// The table the sink writes.
    pub fn table(&self) -> &Arc<MemoryTable> {
        &self.table
    }
}

#[async_trait]
impl Sink for MemorySink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, schema: &SchemaRef, mode: OutputMode) -> Result<()> {
        self.table.bind_schema(&self.name, schema)?;
        self.table.set_mode(mode);
        Ok(())
    }

    async fn write(
        &self,
        id: BatchId,
        _schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<()> {
        self.table.put_scoped(&self.scope, id, batches);
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn for_query(&self, query: &str) -> Option<Arc<dyn Sink>> {
        Some(Arc::new(MemorySink {
            scope: query.to_string(),
            ..self.clone()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn batch(schema: &SchemaRef, v: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::clone(schema),
            vec![Arc::new(Int64Array::from(v.to_vec()))],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn ranges_span_appends_and_respect_the_cap() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        let src = MemorySource::new("m", Arc::clone(&schema)).with_max_rows_per_trigger(3);
        src.append(batch(&schema, &[1, 2])).unwrap();
        src.append(batch(&schema, &[3, 4, 5])).unwrap();
        let ctx = SourceContext {
            dir: "/nonexistent".into(),
            durability: Default::default(),
            clock: Arc::new(sluice_common::ManualClock::new(0)),
        };
        let mut r = src.open(ctx).unwrap();
        let end = r.latest_offset(&Value::from(0)).await.unwrap();
        assert_eq!(end, Value::from(3));
        let got = r.read(&Value::from(1), &Value::from(4)).await.unwrap();
        let vals: Vec<i64> = got
            .batches
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(vals, vec![2, 3, 4]);
        assert!(r.read(&Value::from(4), &Value::from(9)).await.is_err());
    }
}
