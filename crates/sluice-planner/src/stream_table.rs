//! A stream as a DataFusion table whose scan yields the current micro-batch.

use std::any::Any;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::datasource::{TableType, provider_as_source, source_as_provider};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, TableScan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use sluice_common::connector::{Sink, Source};
use sluice_common::{Clock, Error, Result};

use crate::WatermarkDef;

/// A streaming source registered as a table.
///
/// Planning sees an ordinary table; at run time each query gets its own copy
/// ([`StreamTable::fork`]) whose *slot* the executor fills with the rows of
/// the micro-batch before it re-executes the physical plan.
#[derive(Debug, Clone)]
pub struct StreamTable {
    source: Arc<dyn Source>,
    watermark: Arc<Mutex<Option<WatermarkDef>>>,
    dead_letter: Option<Arc<dyn Sink>>,
    late_rows: Arc<Mutex<Option<Arc<dyn Sink>>>>,
    clock: Arc<dyn Clock>,
    slot: Arc<BatchSlot>,
}

/// Rows that an executor puts in place before it runs a plan whose scan
/// ([`BatchSlot::scan`]) reads them: how a re-executed physical plan sees
/// each micro-batch's rows.
#[derive(Debug, Default)]
pub struct BatchSlot {
    batches: Mutex<Vec<RecordBatch>>,
    /// The partitions of the scans made of this slot: a weak pointer keeps
    /// each one's address unique while it is listed, so a physical plan's
    /// scan can be traced back to its stream ([`BatchSlot::is_scanned_by`]).
    made: Mutex<Vec<std::sync::Weak<SlotPartition>>>,
}

impl BatchSlot {
    /// An empty slot.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Replaces the slot's rows.
    pub fn set(&self, batches: Vec<RecordBatch>) {
        *self.batches.lock().unwrap_or_else(|p| p.into_inner()) = batches;
    }

    /// Whether `plan` is a scan of this slot.
    pub fn is_scanned_by(&self, plan: &dyn ExecutionPlan) -> bool {
        let any: &dyn Any = plan;
        let Some(scan) = any.downcast_ref::<StreamingTableExec>() else {
            return false;
        };
        let list = self.made.lock().unwrap_or_else(|p| p.into_inner());
        scan.partitions().iter().any(|p| {
            let at = Arc::as_ptr(p) as *const ();
            list.iter().any(|w| w.as_ptr() as *const () == at)
        })
    }

    /// A one-partition scan of `schema` reading whatever the slot holds at
    /// execution time.
    pub fn scan(
        self: &Arc<Self>,
        schema: SchemaRef,
        projection: Option<&Vec<usize>>,
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.scan_parts(schema, 1, projection, limit)
    }

    /// A scan of `schema` in `parts` partitions, each reading an equal
    /// share of the slot's rows, so a plan above it can run them in parallel.
    pub fn scan_partitioned(
        self: &Arc<Self>,
        schema: SchemaRef,
        parts: usize,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.scan_parts(schema, parts.max(1), None, None)
    }

    fn scan_parts(
        self: &Arc<Self>,
        schema: SchemaRef,
        parts: usize,
        projection: Option<&Vec<usize>>,
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let made: Vec<Arc<SlotPartition>> = (0..parts)
            .map(|index| {
                Arc::new(SlotPartition {
                    schema: Arc::clone(&schema),
                    slot: Arc::clone(self),
                    index,
                    parts,
                })
            })
            .collect();
        {
            let mut list = self.made.lock().unwrap_or_else(|p| p.into_inner());
            list.retain(|w| w.strong_count() > 0);
            list.extend(made.iter().map(Arc::downgrade));
        }
        let partitions: Vec<Arc<dyn PartitionStream>> = made
            .into_iter()
            .map(|p| p as Arc<dyn PartitionStream>)
            .collect();
        // Bounded: each execution reads the slot once and ends.
        Ok(Arc::new(StreamingTableExec::try_new(
            schema,
            partitions,
            projection,
            [],
            false,
            limit,
        )?))
    }
}

impl StreamTable {
    /// A stream table over `source`.
    pub fn new(source: Arc<dyn Source>, clock: Arc<dyn Clock>) -> Self {
        StreamTable {
            source,
            watermark: Arc::default(),
            dead_letter: None,
            late_rows: Arc::default(),
            clock,
            slot: Arc::default(),
        }
    }

    /// The trigger clock of the context the stream was registered in.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Sets where the source's undecodable records go (`on_error = 'dead_letter'`).
    pub fn with_dead_letter(mut self, sink: Arc<dyn Sink>) -> Self {
        self.dead_letter = Some(sink);
        self
    }

    /// The source.
    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    /// The dead-letter sink, if any.
    pub fn dead_letter(&self) -> Option<&Arc<dyn Sink>> {
        self.dead_letter.as_ref()
    }

    /// Where this stream's late rows go, if anywhere.
    pub fn late_rows(&self) -> Option<Arc<dyn Sink>> {
        self.late_rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends this stream's late rows to `sink`.
    pub fn set_late_rows(&self, sink: Arc<dyn Sink>) {
        *self.late_rows.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// The watermark declaration, if any.
    pub fn watermark(&self) -> Option<WatermarkDef> {
        self.watermark
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Declares the event-time watermark of this stream.
    pub fn set_watermark(&self, wm: WatermarkDef) -> Result<()> {
        let schema = self.source.schema();
        let field = schema
            .fields()
            .iter()
            .find(|f| f.name() == &wm.column)
            .ok_or_else(|| {
                Error::plan(format!(
                    "watermark on '{}': stream '{}' has no such column",
                    wm.column,
                    self.source.name()
                ))
            })?;
        if !matches!(
            field.data_type(),
            datafusion::arrow::datatypes::DataType::Timestamp(_, _)
        ) {
            return Err(Error::plan(format!(
                "watermark on '{}' of stream '{}': the column is {}, it must be a TIMESTAMP",
                wm.column,
                self.source.name(),
                field.data_type()
            )));
        }
        *self.watermark.lock().unwrap_or_else(|p| p.into_inner()) = Some(wm);
        Ok(())
    }

    /// A copy with its own slot, for one query.
    pub fn fork(&self) -> StreamTable {
        StreamTable {
            source: Arc::clone(&self.source),
            watermark: Arc::new(Mutex::new(self.watermark())),
            dead_letter: self.dead_letter.clone(),
            late_rows: Arc::new(Mutex::new(self.late_rows())),
            clock: Arc::clone(&self.clock),
            slot: Arc::default(),
        }
    }

    /// Whether `plan` is a scan of this table (of its slot).
    pub fn is_scan_of(&self, plan: &dyn ExecutionPlan) -> bool {
        self.slot.is_scanned_by(plan)
    }

    /// Puts the rows of the current micro-batch in the slot.
    pub fn set_batch(&self, batches: Vec<RecordBatch>) {
        self.slot.set(batches);
    }

    /// Empties the slot.
    pub fn clear_batch(&self) {
        self.set_batch(Vec::new());
    }
}

#[async_trait]
impl TableProvider for StreamTable {
    fn schema(&self) -> SchemaRef {
        self.source.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.slot.scan(self.source.schema(), projection, limit)
    }
}

#[derive(Debug)]
struct SlotPartition {
    schema: SchemaRef,
    slot: Arc<BatchSlot>,
    /// This partition takes part `index` of `parts` of the rows.
    index: usize,
    parts: usize,
}

impl PartitionStream for SlotPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self
            .slot
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let batches = if self.parts > 1 {
            rows_part(&batches, self.index, self.parts)
        } else {
            batches
        };
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::iter(batches.into_iter().map(Ok)),
        ))
    }
}

/// Part `index` of `parts` of the rows of `batches`, as zero-copy slices:
/// rows `[index × R / parts, (index + 1) × R / parts)` of the R in all.
fn rows_part(batches: &[RecordBatch], index: usize, parts: usize) -> Vec<RecordBatch> {
    let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let (from, to) = (index * total / parts, (index + 1) * total / parts);
    let mut out = Vec::new();
    let mut at = 0;
    for b in batches {
        let (start, end) = (at.max(from), (at + b.num_rows()).min(to));
        if start < end {
            out.push(b.slice(start - at, end - start));
        }
        at += b.num_rows();
    }
    out
}

/// Whether a node of a query's physical plan scans a stream. A stream
/// table's scan is the only `StreamingTableExec` in a query's plan (static
/// tables are scanned by DataFusion's data sources), so the streaming
/// planner finds what reads a stream by this test alone.
pub fn is_stream_scan(plan: &dyn ExecutionPlan) -> bool {
    let any: &dyn Any = plan;
    any.is::<StreamingTableExec>()
}

/// The stream table a scan reads, if it reads one.
pub fn as_stream_table(scan: &TableScan) -> Option<StreamTable> {
    let provider = source_as_provider(&scan.source).ok()?;
    let any: &dyn Any = provider.as_ref();
    any.downcast_ref::<StreamTable>().cloned()
}

/// The stream tables a plan scans, in plan order, each once.
pub fn stream_tables(plan: &LogicalPlan) -> Vec<StreamTable> {
    let mut out: Vec<StreamTable> = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Some(t) = as_stream_table(scan)
            && !out.iter().any(|o| Arc::ptr_eq(&o.slot, &t.slot))
        {
            out.push(t);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// Gives the query its own copy of every stream table it scans, so that two
/// queries over one source never share a micro-batch slot. Returns the new
/// plan and the copies (one per source; scans of the same source share it).
pub fn fork_streams(plan: LogicalPlan) -> Result<(LogicalPlan, Vec<StreamTable>)> {
    let mut forks: Vec<(StreamTable, StreamTable)> = Vec::new();
    let plan = plan
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(scan) = &node else {
                return Ok(Transformed::no(node));
            };
            let Some(t) = as_stream_table(scan) else {
                return Ok(Transformed::no(node));
            };
            let fork = match forks
                .iter()
                .find(|(orig, _)| Arc::ptr_eq(&orig.slot, &t.slot))
            {
                Some((_, f)) => f.clone(),
                None => {
                    let f = t.fork();
                    forks.push((t, f.clone()));
                    f
                }
            };
            let mut scan = scan.clone();
            scan.source = provider_as_source(Arc::new(fork));
            Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
        })
        .map_err(Error::from)?
        .data;
    Ok((plan, forks.into_iter().map(|(_, f)| f).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{AsArray, Int64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};

    #[test]
    fn parts_of_a_slot_hold_every_row_once_in_order() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = |r: std::ops::Range<i64>| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from_iter_values(r))],
            )
            .unwrap()
        };
        let batches = vec![batch(0..7), batch(7..8), batch(8..8), batch(8..23)];
        for parts in 1..6 {
            let mut all = Vec::new();
            for i in 0..parts {
                let got = rows_part(&batches, i, parts);
                let n: usize = got.iter().map(RecordBatch::num_rows).sum();
                assert!(n.abs_diff(23 / parts) <= 1, "part {i} of {parts}: {n} rows");
                for b in got {
                    all.extend(
                        b.column(0)
                            .as_primitive::<Int64Type>()
                            .values()
                            .iter()
                            .copied(),
                    );
                }
            }
            assert_eq!(all, (0..23).collect::<Vec<_>>(), "{parts} parts");
        }
    }
}
