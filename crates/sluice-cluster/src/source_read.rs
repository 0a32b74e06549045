//! Sources read where the plan runs, not in the driver.
//!
//! A runner that says so ([`sluice_exec::PlanRunner::reads_sources`], a cluster)
//! has each batch's ranges read where its plan runs. For a source whose
//! reader can describe a range to another process
//! ([`SourceReader::remote_read`](sluice_common::connector::SourceReader::remote_read):
//! the files of a file source), the driver reads nothing: it sends the
//! range's parts, and a [`SourceReadExec`] reads them, one partition per
//! part, with `sluice_connectors::read_part`. Each batch takes two jobs:
//!
//! 1. the *counting* job reads the parts and gives, per part, the rows, the
//!    largest event time, the records dropped or sent to the dead letters
//!    (with those records) and when the oldest became available: what the
//!    driver needs for the watermark, the progress record and the
//!    dead-letter sinks before the batch's plan runs;
//! 2. the batch's plan, with each such source's scan replaced by a
//!    [`SourceReadExec`] over the same parts, reads them again.
//!
//! A range reads the same rows every time (the offsets promise it), so the
//! two reads agree.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt64Type};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use serde_json::Value;
use sluice_common::connector::{DeadLetter, RemoteRead};
use sluice_common::{Error, Result};
use sluice_exec::SourceStats;

/// What a [`SourceReadExec`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// The rows.
    Rows,
    /// One row of counts per part ([`stats_schema`]).
    Stats,
}

/// Reads the parts of a source's range (see the module docs): its child
/// holds the parts, one per partition, as JSON text ([`parts_scan`]).
#[derive(Debug, Clone)]
pub struct SourceReadExec {
    source: String,
    config: Value,
    schema: SchemaRef,
    watermark: Option<String>,
    mode: ReadMode,
    parts: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

/// The one column of [`parts_scan`].
const PART: &str = "part";

/// The parts of a range as a scan: part k alone in partition k, as the
/// JSON text `[k, part]` (one empty partition when there is none). A
/// cluster's scheduler gives each task its own partitions of a scan like
/// this one.
pub fn parts_scan(parts: &[Value]) -> Result<Arc<dyn ExecutionPlan>> {
    let schema = Arc::new(Schema::new(vec![Field::new(PART, DataType::Utf8, false)]));
    let mut partitions = Vec::with_capacity(parts.len().max(1));
    for (k, p) in parts.iter().enumerate() {
        let text = StringArray::from(vec![
            Value::from(vec![Value::from(k), p.clone()]).to_string(),
        ]);
        partitions.push(vec![RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(text)],
        )?]);
    }
    if partitions.is_empty() {
        partitions.push(vec![]);
    }
    Ok(MemorySourceConfig::try_new_exec(&partitions, schema, None)?)
}

/// The schema of a [`ReadMode::Stats`] read: per part, the source, the
/// part's index, its rows, largest event time (ms), records dropped, the
/// dead letters (JSON) and when its oldest record became available (ms).
pub fn stats_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("part", DataType::UInt64, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("max_event_ms", DataType::Int64, true),
        Field::new("dropped", DataType::UInt64, false),
        Field::new("dead_letters", DataType::Utf8, false),
        Field::new("available_ms", DataType::Int64, true),
    ]))
}

impl SourceReadExec {
    /// Reads source `source` (rows of `schema`, event time in column
    /// `watermark`, if it has one) as `config` says, the parts in `parts`
    /// ([`parts_scan`]).
    pub fn new(
        source: String,
        config: Value,
        schema: SchemaRef,
        watermark: Option<String>,
        mode: ReadMode,
        parts: Arc<dyn ExecutionPlan>,
    ) -> Self {
        let out = match mode {
            ReadMode::Rows => Arc::clone(&schema),
            ReadMode::Stats => stats_schema(),
        };
        let n = parts.output_partitioning().partition_count();
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(out),
            Partitioning::UnknownPartitioning(n),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        SourceReadExec {
            source,
            config,
            schema,
            watermark,
            mode,
            parts,
            properties,
        }
    }

    /// A read of `read` (a range of source `source`).
    pub fn of_range(
        source: &str,
        read: &RemoteRead,
        schema: SchemaRef,
        watermark: Option<String>,
        mode: ReadMode,
    ) -> Result<Self> {
        Ok(Self::new(
            source.to_string(),
            read.config.clone(),
            schema,
            watermark,
            mode,
            parts_scan(&read.parts)?,
        ))
    }

    /// The source's name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// What to read with.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// The source's schema.
    pub fn source_schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The event-time column, if the source has a watermark.
    pub fn watermark(&self) -> Option<&str> {
        self.watermark.as_deref()
    }

    /// Whether it gives rows or counts.
    pub fn mode(&self) -> ReadMode {
        self.mode
    }
}

impl DisplayAs for SourceReadExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "SourceReadExec: source={}, parts={}, mode={}",
            self.source,
            self.properties.output_partitioning().partition_count(),
            match self.mode {
                ReadMode::Rows => "rows",
                ReadMode::Stats => "counts",
            }
        )
    }
}

impl ExecutionPlan for SourceReadExec {
    fn name(&self) -> &str {
        "SourceReadExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.parts]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::common::Result<TreeNodeRecursion>,
    ) -> datafusion::common::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(datafusion::error::DataFusionError::Internal(
                "SourceReadExec takes one child".into(),
            ));
        }
        Ok(Arc::new(Self::new(
            self.source.clone(),
            self.config.clone(),
            Arc::clone(&self.schema),
            self.watermark.clone(),
            self.mode,
            children.swap_remove(0),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        ctx: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        use futures::{StreamExt, TryStreamExt};
        let parts = self.parts.execute(partition, ctx)?;
        let this = self.clone();
        let out = self.schema();
        let rows = async move {
            let parts: Vec<RecordBatch> = parts.try_collect().await?;
            let mut batches = Vec::new();
            for b in &parts {
                let texts = b.column(0).as_string::<i32>();
                for i in 0..b.num_rows() {
                    let (k, part): (u64, Value) = serde_json::from_str(texts.value(i))
                        .map_err(|e| Error::internal(format!("a source part: {e}")))?;
                    let read =
                        sluice_connectors::read_part(&this.config, Arc::clone(&this.schema), &part)
                            .await
                            .map_err(crate::failure::task_error)?;
                    match this.mode {
                        ReadMode::Rows => batches.extend(read.batches),
                        ReadMode::Stats => batches.push(this.stats_row(k, read)?),
                    }
                }
            }
            Ok::<_, datafusion::error::DataFusionError>(batches)
        };
        let stream = futures::stream::once(rows)
            .map_ok(|rows| futures::stream::iter(rows.into_iter().map(Ok)))
            .try_flatten()
            .boxed();
        Ok(Box::pin(RecordBatchStreamAdapter::new(out, stream)))
    }
}

impl SourceReadExec {
    /// The counts of one part's read, as a row of [`stats_schema`].
    fn stats_row(&self, k: u64, read: sluice_common::connector::ReadBatch) -> Result<RecordBatch> {
        let rows: u64 = read.batches.iter().map(|b| b.num_rows() as u64).sum();
        let max_event = match &self.watermark {
            Some(column) => sluice_exec::execution::max_event_time(&read.batches, column)?,
            None => None,
        };
        let letters: Vec<Value> = read
            .dead_letters
            .iter()
            .map(|d| {
                serde_json::json!({
                    "location": d.location,
                    "error": d.error,
                    "raw": d.raw,
                })
            })
            .collect();
        Ok(RecordBatch::try_new(
            stats_schema(),
            vec![
                Arc::new(StringArray::from(vec![self.source.as_str()])),
                Arc::new(UInt64Array::from(vec![k])),
                Arc::new(UInt64Array::from(vec![rows])),
                Arc::new(Int64Array::from(vec![max_event])),
                Arc::new(UInt64Array::from(vec![read.dropped])),
                Arc::new(StringArray::from(vec![Value::from(letters).to_string()])),
                Arc::new(Int64Array::from(vec![read.available_ms])),
            ],
        )?)
    }
}

/// The counting job's rows, per source: counts summed, the largest event
/// time, the earliest availability, dead letters in the order the rows
/// give them.
pub fn read_stats(rows: &[RecordBatch]) -> Result<BTreeMap<String, SourceStats>> {
    let mut out: BTreeMap<String, SourceStats> = BTreeMap::new();
    // In (source, part) order, whatever order the job gave them in.
    let mut at: Vec<(String, u64, usize, usize)> = Vec::new();
    for (j, b) in rows.iter().enumerate() {
        if b.num_columns() != 7 {
            return Err(Error::internal(format!(
                "a source count with {} columns",
                b.num_columns()
            )));
        }
        let bad =
            || Error::internal("a source count of another layout (executors of another Sluice?)");
        let source = b.column(0).as_string_opt::<i32>().ok_or_else(bad)?;
        let part = b
            .column(1)
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(bad)?;
        for i in 0..b.num_rows() {
            at.push((source.value(i).to_string(), part.value(i), j, i));
        }
    }
    at.sort();
    // One row per part: a part's count listed twice by the scheduler (a
    // task it ran again after taking a live executor for lost, both
    // results kept) is the same count, taken once.
    at.dedup_by(|b, a| (&a.0, a.1) == (&b.0, b.1));
    for (name, _, j, i) in at {
        let b = &rows[j];
        let bad =
            || Error::internal("a source count of another layout (executors of another Sluice?)");
        let n = b
            .column(2)
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(bad)?;
        let max_ms = b
            .column(3)
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(bad)?;
        let dropped = b
            .column(4)
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(bad)?;
        let letters = b.column(5).as_string_opt::<i32>().ok_or_else(bad)?;
        let available = b
            .column(6)
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(bad)?;
        {
            let s = out.entry(name.clone()).or_default();
            s.rows += n.value(i);
            if max_ms.is_valid(i) {
                let m = max_ms.value(i);
                s.max_event_ms = Some(s.max_event_ms.map_or(m, |o| o.max(m)));
            }
            s.dropped += dropped.value(i);
            // The oldest of the range, as one process takes it (the driver
            // counts it only for a range with rows).
            if available.is_valid(i) {
                let a = available.value(i);
                s.available_ms = Some(s.available_ms.map_or(a, |o| o.min(a)));
            }
            let list: Vec<Value> = serde_json::from_str(letters.value(i))
                .map_err(|e| Error::internal(format!("a source count's dead letters: {e}")))?;
            for l in list {
                let text = |k: &str| l.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                s.dead_letters.push(DeadLetter {
                    source: name.clone(),
                    location: text("location"),
                    error: text("error"),
                    raw: text("raw"),
                });
            }
        }
    }
    Ok(out)
}

/// `plan` as `Any`.
pub fn as_source_read(plan: &dyn ExecutionPlan) -> Option<&SourceReadExec> {
    let any: &dyn Any = plan;
    any.downcast_ref::<SourceReadExec>()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray, UInt64Array};

    use super::{read_stats, stats_schema};

    /// Counting rows: (source, part, rows, largest event time, a dead
    /// letter's raw text).
    fn counts(rows: &[(&str, u64, u64, i64, &str)]) -> RecordBatch {
        let letters: Vec<String> = rows
            .iter()
            .map(|r| match r.4 {
                "" => "[]".to_string(),
                raw => format!(r#"[{{"location": "f", "error": "e", "raw": "{raw}"}}]"#),
            })
            .collect();
        RecordBatch::try_new(
            stats_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.2))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.3))),
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|_| 0))),
                Arc::new(StringArray::from_iter_values(letters)),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|_| 7))),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_part_counted_twice_is_taken_once() {
        // Part 1 of `a` comes back twice (a task run again after its
        // executor was taken for lost): its rows and dead letter count once.
        let stats = read_stats(&[
            counts(&[("a", 1, 5, 30, "x"), ("b", 0, 2, 10, "")]),
            counts(&[("a", 0, 3, 20, ""), ("a", 1, 5, 30, "x")]),
        ])
        .unwrap();
        let a = &stats["a"];
        assert_eq!((a.rows, a.max_event_ms), (8, Some(30)));
        assert_eq!(a.dead_letters.len(), 1);
        assert_eq!(stats["b"].rows, 2);
    }
}
