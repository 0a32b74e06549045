//! Streaming deduplication: a node that emits a row the first time its key
//! is seen, and remembers the keys it has seen.
//!
//! `SELECT DISTINCT cols FROM stream` (which DataFusion plans as an
//! aggregate without aggregate functions) becomes a [`DedupExec`] keyed by
//! the distinct columns. As in Spark, when an event-time column is among the
//! keys (the stream's watermark column, or a window's `window_end`), a row
//! whose event time is at or below the watermark at the start of the batch
//! is late (dropped and counted), and a key is forgotten once its event time
//! is at or below the watermark at the end of the batch: no later row could
//! repeat it without being late. Otherwise the keys are kept for ever, or
//! for `state_ttl` of trigger time since they were seen. The output is
//! append-only: a row is emitted once and never changes.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch, take};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, collect,
};
use sluice_common::{Error, OutputMode, Result};
use sluice_planner::WINDOW_END;
use sluice_state::store::StateStore;

use super::changelog::with_change_fields;
use super::{
    BatchContext, OperatorReport, OperatorRuntime, StatefulExec, after_watermark, as_inserts,
    node_properties, run_once,
};

/// The value column: the event time (ms) after which the key is forgotten;
/// NULL when no watermark forgets it.
const FORGET: &str = "__forget_after_ms";
/// The value column of when a key was seen (trigger clock), with a TTL.
const SEEN: &str = "__seen_ms";

/// The deduplication of a streaming query (see the module docs).
#[derive(Debug, Clone)]
pub struct DedupExec {
    id: String,
    input: Arc<dyn ExecutionPlan>,
    core: Arc<DedupCore>,
    emit: OutputMode,
    properties: Arc<PlanProperties>,
}

#[derive(Debug)]
struct DedupCore {
    /// The key expressions over the input, with their output names.
    keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
    /// The schema of the emitted rows (the keys).
    out_schema: SchemaRef,
    key_schema: SchemaRef,
    value_schema: SchemaRef,
    /// Which key is the event time that watermarks forget keys by.
    event_time: Option<usize>,
    /// Keys not seen again for this long (ms of trigger clock) are dropped.
    ttl: Option<i64>,
    /// The streams' watermark columns the node was made with (a cluster
    /// sends them to make the node again on an executor).
    event_time_columns: Vec<String>,
}

impl DedupExec {
    /// The node for `SELECT DISTINCT`: the aggregate without aggregate
    /// functions `top` (Final or Single) whose raw-row stage is `src`.
    /// `event_time_columns` are the streams' watermark columns.
    pub fn from_distinct(
        id: String,
        top: &Arc<dyn ExecutionPlan>,
        src: &AggregateExec,
        event_time_columns: &[String],
        ttl: Option<std::time::Duration>,
    ) -> Result<Self> {
        if src.group_expr().has_grouping_set() {
            return Err(Error::not_supported("GROUPING SETS over a stream"));
        }
        let input = Arc::clone(src.input());
        let keys: Vec<(Arc<dyn PhysicalExpr>, String)> = src
            .group_expr()
            .expr()
            .iter()
            .map(|(e, n)| (Arc::clone(e), n.clone()))
            .collect();
        let out_schema = top.schema();
        let in_schema = input.schema();
        let event_time = keys.iter().position(|(e, name)| {
            let is_time = matches!(e.data_type(&in_schema), Ok(DataType::Timestamp(_, _)));
            is_time && (name == WINDOW_END || event_time_columns.iter().any(|c| c == name))
        });
        let key_schema = Arc::new(Schema::new(
            out_schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let mut values = vec![Field::new(FORGET, DataType::Int64, true)];
        if ttl.is_some() {
            values.push(Field::new(SEEN, DataType::Int64, false));
        }
        let core = DedupCore {
            keys,
            out_schema,
            key_schema,
            value_schema: Arc::new(Schema::new(values)),
            event_time,
            ttl: ttl.map(|d| d.as_millis() as i64),
            event_time_columns: event_time_columns.to_vec(),
        };
        Ok(Self::build(id, input, Arc::new(core), OutputMode::Append))
    }

    fn build(
        id: String,
        input: Arc<dyn ExecutionPlan>,
        core: Arc<DedupCore>,
        emit: OutputMode,
    ) -> Self {
        let schema = match emit {
            OutputMode::Changelog => with_change_fields(&core.out_schema),
            _ => Arc::clone(&core.out_schema),
        };
        let properties = node_properties(schema);
        DedupExec {
            id,
            input,
            core,
            emit,
            properties,
        }
    }

    /// This node emitting in `mode`: its rows are inserts in any mode.
    pub fn with_emit(&self, mode: OutputMode) -> Self {
        Self::build(
            self.id.clone(),
            Arc::clone(&self.input),
            Arc::clone(&self.core),
            mode,
        )
    }

    /// The aggregate without aggregate functions it does, over `input`:
    /// what a cluster sends to make the node again on an executor, with
    /// [`Self::from_distinct`] as both its top and its raw-row stage.
    pub fn distinct_over(&self, input: Arc<dyn ExecutionPlan>) -> Result<Arc<AggregateExec>> {
        use datafusion::physical_plan::aggregates::{AggregateMode, PhysicalGroupBy};
        let schema = input.schema();
        let group = PhysicalGroupBy::new_single(self.core.keys.clone());
        Ok(Arc::new(AggregateExec::try_new(
            AggregateMode::Single,
            group,
            vec![],
            vec![],
            input,
            schema,
        )?))
    }

    /// The streams' watermark columns the node was made with.
    pub fn event_time_columns(&self) -> &[String] {
        &self.core.event_time_columns
    }

    /// Its TTL (the query's `state_ttl`), if it has one.
    pub fn ttl(&self) -> Option<std::time::Duration> {
        self.core
            .ttl
            .map(|ms| std::time::Duration::from_millis(ms.max(0) as u64))
    }

    /// The output mode it emits in.
    pub fn emit_mode(&self) -> OutputMode {
        self.emit
    }

    /// Its key expressions over its input: what a cluster partitions its
    /// input by.
    pub fn key_exprs(&self) -> Vec<Arc<dyn PhysicalExpr>> {
        self.core.keys.iter().map(|(e, _)| Arc::clone(e)).collect()
    }

    /// Runs the deduplication over one batch with `store` as its state
    /// (the state before the batch), outside a query's operator runtime:
    /// its child's rows in, the rows to emit and what the run did out. The
    /// store is not committed.
    pub async fn run_with(
        &self,
        store: &mut StateStore,
        batch: BatchContext,
        ctx: &Arc<TaskContext>,
    ) -> Result<(Vec<RecordBatch>, OperatorReport)> {
        let mut report = OperatorReport::default();
        let rows = self.run_on(store, batch, ctx, &mut report).await?;
        Ok((rows, report))
    }

    async fn run(self, ctx: Arc<TaskContext>) -> Result<Vec<RecordBatch>> {
        let (batch, state) = OperatorRuntime::of(&ctx, &self.id)?;
        let mut guard = state.lock().await;
        let st = &mut *guard;
        st.begin();
        let mut report = OperatorReport::default();
        let out = self.run_on(&mut st.store, batch, &ctx, &mut report).await;
        st.report = report;
        out
    }

    async fn run_on(
        &self,
        store: &mut StateStore,
        batch: BatchContext,
        ctx: &Arc<TaskContext>,
        report: &mut OperatorReport,
    ) -> Result<Vec<RecordBatch>> {
        let core = &self.core;
        let started = std::time::Instant::now();
        let raw = collect(Arc::clone(&self.input), Arc::clone(ctx))
            .await
            .map_err(Error::from)?;
        // The keys of the on-time rows, in arrival order.
        let mut keys: Vec<RecordBatch> = Vec::with_capacity(raw.len());
        for rows in raw {
            let cols = core
                .keys
                .iter()
                .map(|(e, _)| e.evaluate(&rows)?.into_array(rows.num_rows()))
                .collect::<datafusion::common::Result<Vec<ArrayRef>>>()?;
            let k = RecordBatch::try_new(Arc::clone(&core.key_schema), cols)?;
            match (core.event_time, batch.watermark_start) {
                (Some(i), Some(wm)) => {
                    let keep = after_watermark(k.column(i), wm)?;
                    let late = k.num_rows() - keep.true_count();
                    if late > 0 {
                        report.late_rows += late as u64;
                        let gone = datafusion::arrow::compute::not(&keep)?;
                        report.late.push((0, filter_record_batch(&rows, &gone)?));
                    }
                    keys.push(filter_record_batch(&k, &keep)?);
                }
                _ => keys.push(k),
            }
        }
        let keys = concat_batches(&core.key_schema, &keys)?;
        report.input_rows = keys.num_rows() as u64;

        // First occurrences: not stored, and not earlier in this batch.
        let conv = RowConverter::new(
            core.key_schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        let stored = store.get(keys.columns())?;
        let stored_rows = conv.convert_columns(&stored.columns()[..keys.num_columns()])?;
        let mut seen: HashSet<&[u8]> = stored_rows.iter().map(|r| r.data()).collect();
        let rows = conv.convert_columns(keys.columns())?;
        let firsts: UInt32Array = (0..keys.num_rows())
            .filter(|i| seen.insert(rows.row(*i).data()))
            .map(|i| i as u32)
            .collect();
        let new_keys: Vec<ArrayRef> = keys
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &firsts, None))
            .collect::<std::result::Result<_, _>>()?;
        let new = RecordBatch::try_new(Arc::clone(&core.key_schema), new_keys)?;

        // Remember them, with when a watermark may forget each.
        let mut cols = new.columns().to_vec();
        cols.push(match core.event_time {
            Some(i) => cast(
                &cast(
                    new.column(i),
                    &DataType::Timestamp(TimeUnit::Millisecond, None),
                )?,
                &DataType::Int64,
            )?,
            None => Arc::new(Int64Array::new_null(new.num_rows())),
        });
        if core.ttl.is_some() {
            cols.push(Arc::new(Int64Array::from(vec![
                batch.now_ms;
                new.num_rows()
            ])));
        }
        store.put(&RecordBatch::try_new(store.row_schema(), cols)?)?;
        let n_keys = core.keys.len();
        if let (Some(_), Some(wm)) = (core.event_time, batch.watermark_end) {
            store.remove_where(|live| {
                let forget = live.column(n_keys).as_primitive::<Int64Type>();
                Ok((0..live.num_rows())
                    .map(|i| Some(forget.is_valid(i) && forget.value(i) <= wm))
                    .collect())
            })?;
        }
        if let Some(ttl) = core.ttl {
            let now_ms = batch.now_ms;
            store.remove_where(|live| {
                let seen = live
                    .column(live.num_columns() - 1)
                    .as_primitive::<Int64Type>();
                Ok((0..live.num_rows())
                    .map(|i| Some(seen.value(i) < now_ms - ttl))
                    .collect())
            })?;
        }
        report
            .steps
            .push(("run", started.elapsed().as_secs_f64() * 1000.0));
        if new.num_rows() == 0 {
            return Ok(vec![]);
        }
        let out = RecordBatch::try_new(Arc::clone(&core.out_schema), new.columns().to_vec())?;
        if self.emit != OutputMode::Changelog {
            return Ok(vec![out]);
        }
        Ok(vec![as_inserts(&core.out_schema, out, batch.batch_id)?])
    }
}

impl DisplayAs for DedupExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let keys = self.core.key_names();
        write!(
            f,
            "DedupExec: operator={}, emit={}, keys=[{}], keep=first, state=state/{}/, watermark=query watermark, eviction={}",
            self.id,
            self.emit,
            keys.join(", "),
            self.id,
            self.eviction()
        )
    }
}

impl DedupCore {
    /// The keys' names, for EXPLAIN and progress.
    fn key_names(&self) -> Vec<&str> {
        self.keys.iter().map(|(_, n)| n.as_str()).collect()
    }
}

impl DedupExec {
    fn eviction(&self) -> String {
        match (self.core.event_time, self.core.ttl) {
            (Some(i), _) => format!(
                "forget a key once {} <= watermark at the end of the batch (never without a watermark)",
                self.core.keys[i].1
            ),
            (None, Some(_)) => "keys not seen for state_ttl".to_string(),
            (None, None) => {
                "none (no event time among the keys: every key is kept for ever; set state_ttl to bound it)"
                    .to_string()
            }
        }
    }
}

impl ExecutionPlan for DedupExec {
    fn name(&self) -> &str {
        "DedupExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::common::Result<TreeNodeRecursion>,
    ) -> datafusion::common::Result<TreeNodeRecursion> {
        for (e, _) in &self.core.keys {
            if f(e)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(datafusion::error::DataFusionError::Internal(
                "DedupExec takes one child".into(),
            ));
        }
        Ok(Arc::new(Self::build(
            self.id.clone(),
            children.swap_remove(0),
            Arc::clone(&self.core),
            self.emit,
        )))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        let this = self.clone();
        run_once("DedupExec", partition, self.schema(), this.run(context))
    }
}

impl StatefulExec for DedupExec {
    fn operator_id(&self) -> &str {
        &self.id
    }

    fn state_schemas(&self) -> (SchemaRef, SchemaRef) {
        (
            Arc::clone(&self.core.key_schema),
            Arc::clone(&self.core.value_schema),
        )
    }

    fn description(&self) -> String {
        let keys = self.core.key_names();
        format!("dedup [{}]", keys.join(", "))
    }

    fn has_late_rows(&self) -> bool {
        self.core.event_time.is_some()
    }

    fn input_schema(&self) -> SchemaRef {
        self.input.schema()
    }
}
