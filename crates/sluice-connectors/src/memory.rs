//! In-memory sources and sinks, for tests and for Rust programs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use datafusion::arrow::array::new_null_array;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
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
            len: 0,
        }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[derive(Debug)]
struct MemoryReader {
    source: MemorySource,
    /// Rows the source held at the last `latest_offset`.
    len: u64,
}

#[async_trait]
impl SourceReader for MemoryReader {
    fn initial_offset(&self) -> Value {
        Value::from(0u64)
    }

    async fn latest_offset(&mut self, start: &Value) -> Result<Value> {
        let start = offset_u64(&self.source.name, start)?;
        let len = self.source.len();
        self.len = len;
        let end = match self.source.max_rows_per_trigger {
            Some(cap) => len.min(start + cap as u64),
            None => len,
        };
        Ok(Value::from(end.max(start)))
    }

    async fn backlog(&mut self, end: &Value) -> Result<Option<u64>> {
        let end = offset_u64(&self.source.name, end)?;
        Ok(Some(self.len.saturating_sub(end)))
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

    /// Binds the table to one more writer's schema where several queries
    /// write their own rows (a source's late rows: each query's are rows of
    /// its operator's input, whose columns depend on the query). The table
    /// holds the union of their columns, every one nullable: the columns
    /// all writers end with in the same order stay last (the late rows'
    /// `_source`, `_query`, `_batch_id`, `_offsets`), the others come in the
    /// order first seen. A column two writers give different types is an
    /// error naming it.
    pub fn widen_schema(&self, name: &str, schema: &SchemaRef) -> Result<()> {
        let mut s = lock(&self.schema);
        let Some(existing) = s.clone() else {
            *s = Some(Arc::clone(schema));
            return Ok(());
        };
        if existing.fields() == schema.fields() {
            return Ok(());
        }
        for f in schema.fields() {
            if let Ok(e) = existing.field_with_name(f.name())
                && e.data_type() != f.data_type()
            {
                return Err(Error::plan(format!(
                    "sink '{name}' holds rows of several queries, and they disagree on column '{}': {} in one, {} in the new query",
                    f.name(),
                    e.data_type(),
                    f.data_type()
                )));
            }
        }
        let names = |sc: &SchemaRef| {
            sc.fields()
                .iter()
                .map(|f| f.name().clone())
                .collect::<Vec<_>>()
        };
        let (a, b) = (names(&existing), names(schema));
        let common_tail = a
            .iter()
            .rev()
            .zip(b.iter().rev())
            .take_while(|(x, y)| x == y)
            .count();
        let mut fields: Vec<Field> = Vec::new();
        let heads = existing.fields()[..a.len() - common_tail]
            .iter()
            .chain(&schema.fields()[..b.len() - common_tail]);
        for f in heads.chain(&existing.fields()[a.len() - common_tail..]) {
            if !fields.iter().any(|g| g.name() == f.name()) {
                fields.push(f.as_ref().clone().with_nullable(true));
            }
        }
        *s = Some(Arc::new(Schema::new(fields)));
        Ok(())
    }

    /// Every row, in batch order, in the table's schema (a batch written
    /// before the table widened gets NULL in the columns it lacks).
    pub fn rows(&self) -> Vec<RecordBatch> {
        let schema = self.schema();
        let all = lock(&self.batches);
        let mut out = Vec::with_capacity(all.len());
        for b in all.values().flatten() {
            match &schema {
                Some(sc) if sc.fields() != b.schema().fields() => out.push(widened(b, sc)),
                _ => out.push(b.clone()),
            }
        }
        out
    }

    /// The rows one writer wrote (its scope: a query's name for late
    /// rows), in batch order, in that writer's own schema.
    pub fn rows_of(&self, scope: &str) -> Vec<RecordBatch> {
        lock(&self.batches)
            .iter()
            .filter(|((s, _), _)| s == scope)
            .flat_map(|(_, b)| b.iter().cloned())
            .collect()
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

/// `b` in `schema`, a widening of its own: its columns by name, NULL for
/// the others.
fn widened(b: &RecordBatch, schema: &SchemaRef) -> RecordBatch {
    let columns = schema
        .fields()
        .iter()
        .map(|f| match b.column_by_name(f.name()) {
            Some(c) => Arc::clone(c),
            None => new_null_array(f.data_type(), b.num_rows()),
        })
        .collect();
    // Every table column is nullable and typed as the batch's own.
    RecordBatch::try_new(Arc::clone(schema), columns).unwrap_or_else(|_| b.clone())
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
        if self.scope.is_empty() {
            self.table.bind_schema(&self.name, schema)?;
        } else {
            // Several queries' rows (late rows): the union of their columns.
            self.table.widen_schema(&self.name, schema)?;
        }
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
    use datafusion::arrow::datatypes::DataType;

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

    #[tokio::test]
    async fn queries_sharing_a_late_rows_table_widen_it_to_the_union_of_their_columns() {
        let int = |n: &str| Field::new(n, DataType::Int64, false);
        let one: SchemaRef = Arc::new(Schema::new(vec![int("a"), int("b"), int("_query")]));
        let two: SchemaRef = Arc::new(Schema::new(vec![int("c"), int("a"), int("_query")]));
        let table = MemoryTable::new();
        let sink = MemorySink::new("late", Arc::clone(&table));
        let (s1, s2) = (sink.for_query("q1").unwrap(), sink.for_query("q2").unwrap());
        s1.open(&one, OutputMode::Append).await.unwrap();
        let rows = |sc: &SchemaRef, cols: &[&[i64]]| {
            let columns = cols
                .iter()
                .map(|c| Arc::new(Int64Array::from(c.to_vec())) as _)
                .collect();
            RecordBatch::try_new(Arc::clone(sc), columns).unwrap()
        };
        s1.write(1, &one, vec![rows(&one, &[&[1], &[2], &[0]])])
            .await
            .unwrap();
        s2.open(&two, OutputMode::Append).await.unwrap();
        s2.write(1, &two, vec![rows(&two, &[&[7], &[8], &[9]])])
            .await
            .unwrap();
        let schema = table.schema().unwrap();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "_query"]);
        assert!(schema.fields().iter().all(|f| f.is_nullable()));
        let all = table.to_batch().unwrap().unwrap();
        let col = |n: &str| {
            all.column_by_name(n)
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(col("a"), [Some(1), Some(8)]);
        assert_eq!(col("b"), [Some(2), None]);
        assert_eq!(col("c"), [None, Some(7)]);
        // Each query's rows come back in its own shape.
        assert_eq!(table.rows_of("q2")[0].schema(), two);
        // A column of another type is refused, naming it.
        let three: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Utf8, true),
            int("_query"),
        ]));
        let s3 = sink.for_query("q3").unwrap();
        let err = s3.open(&three, OutputMode::Append).await.unwrap_err();
        assert!(err.to_string().contains("column 'a'"), "{err}");
        // A sink of one query still refuses another shape.
        let solo = MemorySink::new("solo", MemoryTable::new());
        solo.open(&one, OutputMode::Append).await.unwrap();
        assert!(solo.open(&two, OutputMode::Append).await.is_err());
    }
}
