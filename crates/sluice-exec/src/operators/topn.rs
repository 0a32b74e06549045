//! Top-N and first-row deduplication: `ROW_NUMBER() OVER (PARTITION BY p
//! ORDER BY o) <= N` over a stream, as a node of the physical plan.
//!
//! Two forms run today (Flink's window top-N and keep-first deduplication):
//! - **per window**, when `window_end` is among the partition keys: the node
//!   keeps the best N rows of each open window (by `o`) and emits them, with
//!   their row numbers, in the batch whose watermark closes the window; then
//!   it forgets the window. A row whose window had closed at the start of
//!   the batch is late. Its rows never change (append).
//! - **keep first**, `= 1` without a window: the first row of each key —
//!   the lowest by `o` among a batch's rows, the first to arrive among
//!   equals — is emitted once, and the key is remembered for ever; later
//!   rows of the key are dropped (append).
//!
//! Top-N without a window, and keep-last (`ORDER BY ... DESC) = 1`), emit
//! updates and are refused at planning (not built yet).
//!
//! The state row of a kept row is keyed by the partition key and its rank
//! slot (`__slot`, 0 to N−1); its value is the whole input row.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, RecordBatch, UInt32Array, UInt64Array};
use datafusion::arrow::compute::{
    SortColumn, cast, concat_batches, filter_record_batch, lexsort_to_indices, take,
    take_record_batch,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt32Type};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{PhysicalExpr, PhysicalSortExpr};
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

/// The key column holding a kept row's rank slot (0-based).
const SLOT: &str = "__slot";

/// `ROW_NUMBER() ... <= N` over a stream (see the module docs).
#[derive(Debug, Clone)]
pub struct TopNExec {
    id: String,
    input: Arc<dyn ExecutionPlan>,
    core: Arc<TopNCore>,
    emit: OutputMode,
    properties: Arc<PlanProperties>,
}

#[derive(Debug)]
struct TopNCore {
    partition: Vec<(Arc<dyn PhysicalExpr>, String)>,
    order: Vec<PhysicalSortExpr>,
    limit: usize,
    /// Where `window_end` is among the partition keys: a top-N per window.
    window_end: Option<usize>,
    in_schema: SchemaRef,
    /// The input's columns, then the row number (the window node's schema).
    out_schema: SchemaRef,
    key_schema: SchemaRef,
    value_schema: SchemaRef,
}

/// `schema` with every field nullable: state columns may hold what the
/// input's declared nullability would refuse after a schema change.
fn nullable(fields: impl IntoIterator<Item = Field>) -> SchemaRef {
    Arc::new(Schema::new(
        fields
            .into_iter()
            .map(|f| f.with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

impl TopNExec {
    /// The node computing `row_number` over `input` (its partition keys
    /// `partition`, its order `order`), keeping rows numbered up to `limit`;
    /// `out_schema` is the window node's schema it replaces.
    pub fn try_new(
        id: String,
        input: Arc<dyn ExecutionPlan>,
        partition: Vec<(Arc<dyn PhysicalExpr>, String)>,
        order: Vec<PhysicalSortExpr>,
        limit: usize,
        out_schema: SchemaRef,
    ) -> Result<Self> {
        let in_schema = input.schema();
        let window_end = partition.iter().position(|(e, name)| {
            name == WINDOW_END && matches!(e.data_type(&in_schema), Ok(DataType::Timestamp(_, _)))
        });
        if window_end.is_none() && limit != 1 {
            return Err(Error::not_supported(
                "ROW_NUMBER() <= N without a window over a stream (a top-N that emits updates); partition by window_start, window_end of TUMBLE(...) for a top-N per window",
            ));
        }
        let mut keys = Vec::new();
        for (e, name) in &partition {
            keys.push(Field::new(name, e.data_type(&in_schema)?, true));
        }
        keys.push(Field::new(SLOT, DataType::UInt32, false));
        let core = TopNCore {
            key_schema: nullable(keys),
            value_schema: nullable(in_schema.fields().iter().map(|f| f.as_ref().clone())),
            partition,
            order,
            limit,
            window_end,
            in_schema,
            out_schema,
        };
        Ok(Self::build(id, input, Arc::new(core), OutputMode::Append))
    }

    fn build(
        id: String,
        input: Arc<dyn ExecutionPlan>,
        core: Arc<TopNCore>,
        emit: OutputMode,
    ) -> Self {
        let schema = match emit {
            OutputMode::Changelog => with_change_fields(&core.out_schema),
            _ => Arc::clone(&core.out_schema),
        };
        let properties = node_properties(schema);
        TopNExec {
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
        let mut rows = concat_batches(&core.in_schema, &raw)?;
        if let (Some(we), Some(wm)) = (core.window_end, batch.watermark_start) {
            let end = core.partition[we]
                .0
                .evaluate(&rows)?
                .into_array(rows.num_rows())?;
            let keep = after_watermark(&end, wm)?;
            let late = rows.num_rows() - keep.true_count();
            if late > 0 {
                report.late_rows += late as u64;
                let gone = datafusion::arrow::compute::not(&keep)?;
                report.late.push((0, filter_record_batch(&rows, &gone)?));
                rows = filter_record_batch(&rows, &keep)?;
            }
        }
        report.input_rows = rows.num_rows() as u64;
        let mut emit: Vec<RecordBatch> = Vec::new();
        if rows.num_rows() > 0
            && let Some(first) = self.merge(store, rows)?
        {
            emit.push(first);
        }
        if let (Some(we), Some(wm)) = (core.window_end, batch.watermark_end) {
            let closed = store.remove_keys_where(|keys| {
                let open = after_watermark(keys.column(we), wm)?;
                Ok(datafusion::arrow::compute::not(&open)?)
            })?;
            if closed.num_rows() > 0 {
                emit.push(self.ranked(&closed)?);
            }
        }
        report
            .steps
            .push(("run", started.elapsed().as_secs_f64() * 1000.0));
        let out = concat_batches(&core.out_schema, &emit)?;
        if out.num_rows() == 0 {
            return Ok(vec![]);
        }
        if self.emit != OutputMode::Changelog {
            return Ok(vec![out]);
        }
        Ok(vec![as_inserts(&core.out_schema, out, batch.batch_id)?])
    }

    /// Merges the batch's on-time `rows` into the kept rows of their
    /// partitions. Per window, the best N of the stored and new rows are
    /// stored; keep-first stores (and returns, to emit) the first row of
    /// each key not seen before.
    fn merge(&self, store: &mut StateStore, rows: RecordBatch) -> Result<Option<RecordBatch>> {
        let core = &self.core;
        let np = core.partition.len();
        let conv = RowConverter::new(
            core.key_schema.fields()[..np]
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        let new_parts = core.partition_values(&rows)?;
        let new_keys = conv.convert_columns(&new_parts)?;
        // One lookup key per (distinct partition, slot).
        let mut firsts: HashMap<&[u8], usize> = HashMap::new();
        for i in 0..rows.num_rows() {
            firsts.entry(new_keys.row(i).data()).or_insert(i);
        }
        let mut uniq: Vec<u32> = firsts.values().map(|i| *i as u32).collect();
        uniq.sort_unstable();
        let limit = core.limit as u32;
        let at: UInt32Array = uniq
            .iter()
            .flat_map(|i| std::iter::repeat_n(*i, core.limit))
            .collect();
        let slots: UInt32Array = uniq.iter().flat_map(|_| 0..limit).collect();
        let mut lookup: Vec<ArrayRef> = new_parts
            .iter()
            .map(|c| take(c.as_ref(), &at, None))
            .collect::<std::result::Result<_, _>>()?;
        lookup.push(Arc::new(slots));
        let stored = store.get(&lookup)?;
        let stored_rows = RecordBatch::try_new(
            Arc::clone(&core.in_schema),
            cast_all(&stored.columns()[np + 1..], &core.in_schema)?,
        )?;
        if core.window_end.is_none() {
            // Keep first: only keys never seen before, their lowest row.
            let seen_keys = conv.convert_columns(&stored.columns()[..np])?;
            let seen: HashSet<&[u8]> = seen_keys.iter().map(|r| r.data()).collect();
            let fresh: datafusion::arrow::array::BooleanArray = (0..rows.num_rows())
                .map(|i| Some(!seen.contains(new_keys.row(i).data())))
                .collect();
            let fresh = filter_record_batch(&rows, &fresh)?;
            let best = self.best(&fresh, &conv)?;
            if best.num_rows() == 0 {
                return Ok(None);
            }
            let ranks = vec![0; best.num_rows()];
            self.store_ranked(store, &best, &ranks)?;
            let rn: ArrayRef = Arc::new(UInt64Array::from(vec![1u64; best.num_rows()]));
            let mut cols = best.columns().to_vec();
            cols.push(rn);
            return Ok(Some(RecordBatch::try_new(
                Arc::clone(&core.out_schema),
                cols,
            )?));
        }
        let all = concat_batches(&core.in_schema, [&stored_rows, &rows])?;
        let (best, ranks) = self.best_ranked(&all, &conv)?;
        self.store_ranked(store, &best, &ranks)?;
        Ok(None)
    }

    /// The first row (by the order) of each partition of `rows`.
    fn best(&self, rows: &RecordBatch, conv: &RowConverter) -> Result<RecordBatch> {
        let (best, ranks) = self.best_ranked(rows, conv)?;
        let first: datafusion::arrow::array::BooleanArray =
            ranks.iter().map(|r| Some(*r == 0)).collect();
        Ok(filter_record_batch(&best, &first)?)
    }

    /// The best `limit` rows of each partition of `rows`, with their ranks
    /// (0-based), sorted by partition and rank.
    fn best_ranked(
        &self,
        rows: &RecordBatch,
        conv: &RowConverter,
    ) -> Result<(RecordBatch, Vec<u32>)> {
        let core = &self.core;
        if rows.num_rows() == 0 {
            return Ok((rows.clone(), vec![]));
        }
        let parts = core.partition_values(rows)?;
        let mut sort: Vec<SortColumn> = parts
            .iter()
            .map(|c| SortColumn {
                values: Arc::clone(c),
                options: None,
            })
            .collect();
        for o in &core.order {
            sort.push(o.evaluate_to_sort_column(rows)?);
        }
        // Ties go to the row that came first (stored rows before the batch's).
        sort.push(SortColumn {
            values: Arc::new(UInt32Array::from_iter_values(0..rows.num_rows() as u32)),
            options: None,
        });
        let order = lexsort_to_indices(&sort, None)?;
        let keys = conv.convert_columns(&parts)?;
        let mut picked: Vec<u32> = Vec::new();
        let mut ranks: Vec<u32> = Vec::new();
        let mut prev: Option<&[u8]> = None;
        let mut rank = 0u32;
        for i in order.values().iter().copied() {
            let k = keys.row(i as usize).data();
            rank = if prev == Some(k) { rank + 1 } else { 0 };
            prev = Some(k);
            if (rank as usize) < core.limit {
                picked.push(i);
                ranks.push(rank);
            }
        }
        let best = take_record_batch(rows, &UInt32Array::from(picked))?;
        Ok((best, ranks))
    }

    /// Stores `rows` under their partition keys and rank slots.
    fn store_ranked(
        &self,
        store: &mut StateStore,
        rows: &RecordBatch,
        ranks: &[u32],
    ) -> Result<()> {
        let mut cols = self.core.partition_values(rows)?;
        cols.push(Arc::new(UInt32Array::from(ranks.to_vec())));
        cols.extend(rows.columns().iter().cloned());
        store.put(&RecordBatch::try_new(store.row_schema(), cols)?)
    }

    /// Closed windows' kept rows (keys, slot, values) as output rows: the
    /// input row and its row number, by partition and rank.
    fn ranked(&self, closed: &RecordBatch) -> Result<RecordBatch> {
        let np = self.core.partition.len();
        let mut sort: Vec<SortColumn> = closed.columns()[..=np]
            .iter()
            .map(|c| SortColumn {
                values: Arc::clone(c),
                options: None,
            })
            .collect();
        sort.truncate(np + 1);
        let order = lexsort_to_indices(&sort, None)?;
        let closed = take_record_batch(closed, &order)?;
        let mut cols = cast_all(&closed.columns()[np + 1..], &self.core.in_schema)?;
        let slot = closed.column(np).as_primitive::<UInt32Type>();
        cols.push(Arc::new(UInt64Array::from_iter_values(
            slot.values().iter().map(|s| u64::from(*s) + 1),
        )));
        Ok(RecordBatch::try_new(
            Arc::clone(&self.core.out_schema),
            cols,
        )?)
    }
}

impl TopNCore {
    /// The partition key columns of `rows`.
    fn partition_values(&self, rows: &RecordBatch) -> Result<Vec<ArrayRef>> {
        self.partition
            .iter()
            .map(|(e, _)| Ok(e.evaluate(rows)?.into_array(rows.num_rows())?))
            .collect()
    }

    /// The partition keys' names, for EXPLAIN and progress.
    fn partition_names(&self) -> Vec<&str> {
        self.partition.iter().map(|(_, n)| n.as_str()).collect()
    }
}

/// `cols` cast to the types of `schema`'s fields (they match; nullability
/// is the schema's).
fn cast_all(cols: &[ArrayRef], schema: &SchemaRef) -> Result<Vec<ArrayRef>> {
    cols.iter()
        .zip(schema.fields())
        .map(|(c, f)| Ok(cast(c, f.data_type())?))
        .collect()
}

impl DisplayAs for TopNExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let keys = self.core.partition_names();
        let order: Vec<String> = self.core.order.iter().map(|o| o.to_string()).collect();
        write!(
            f,
            "TopNExec: operator={}, emit={}, partition=[{}], order=[{}], n={}, state=state/{}/, watermark=query watermark, eviction={}",
            self.id,
            self.emit,
            keys.join(", "),
            order.join(", "),
            self.core.limit,
            self.id,
            if self.core.window_end.is_some() {
                "emit a window's rows once window_end <= watermark at the end of the batch, then remove them (never without a watermark)"
            } else {
                "none (keep first: every key is kept for ever)"
            }
        )
    }
}

impl ExecutionPlan for TopNExec {
    fn name(&self) -> &str {
        "TopNExec"
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
        for e in self
            .core
            .partition
            .iter()
            .map(|(e, _)| e)
            .chain(self.core.order.iter().map(|o| &o.expr))
        {
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
                "TopNExec takes one child".into(),
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
        run_once("TopNExec", partition, self.schema(), this.run(context))
    }
}

impl StatefulExec for TopNExec {
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
        let keys = self.core.partition_names();
        format!("top {} per [{}]", self.core.limit, keys.join(", "))
    }

    fn has_late_rows(&self) -> bool {
        self.core.window_end.is_some()
    }

    fn input_schema(&self) -> SchemaRef {
        self.input.schema()
    }
}
