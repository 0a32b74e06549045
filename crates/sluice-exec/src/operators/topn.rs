//! Top-N and first-row deduplication: `ROW_NUMBER() OVER (PARTITION BY p
//! ORDER BY o) <= N` over a stream, as a node of the physical plan.
//!
//! Three forms (Flink's window top-N, keep-first deduplication, and rank):
//! - **per window**, when `window_end` is among the partition keys: the node
//!   keeps the best N rows of each open window (by `o`) and emits them, with
//!   their row numbers, in the batch whose watermark closes the window; then
//!   it forgets the window. A row whose window had closed at the start of
//!   the batch is late. Its rows never change (append).
//! - **keep first**, `= 1` without a window, ascending by a time column
//!   (rows are taken to arrive in time order, as Flink's deduplication
//!   does): the first row of each key — the lowest by `o` among a batch's
//!   rows, the first to arrive among equals — is emitted once, and the key
//!   is remembered for ever; later rows of the key are dropped (append).
//! - **without a window**, every other `<= N` (keep-last, `ORDER BY ...
//!   DESC) = 1`; `= 1` by a column that is not a time; `<= N` for N > 1):
//!   the node keeps the best N rows of each partition for ever, and per
//!   batch emits what changed in each partition it touched: `-U` / `+U`
//!   (old and new row number) for a kept row whose rank moved, `-U` old
//!   row / `+U` new row where a row that entered took the rank of a row
//!   pushed out (a top-1's update), `+I` for another row that entered the
//!   best N and `-D` for another pushed out. Its rows
//!   change, so the sink's mode is `changelog` (or `update` for a top-1,
//!   whose partition key identifies its row).
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
    /// No window, and not keep-first: the kept rows change (see the module
    /// docs).
    updating: bool,
    /// For `drop_duplicates_within_watermark` (a keep-first ordered by
    /// `sluice_within_watermark(time, delay)`): the event time, and the
    /// delay (ms) after it until which a key is kept.
    within: Option<(Arc<dyn PhysicalExpr>, i64)>,
    /// Where the input's sign column is, when the input is another
    /// operator's changes: then every row of a partition is kept.
    signed: Option<usize>,
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
        let mut keys = Vec::new();
        for (e, name) in &partition {
            keys.push(Field::new(name, e.data_type(&in_schema)?, true));
        }
        keys.push(Field::new(SLOT, DataType::UInt32, false));
        // As the planner decides: ascending by a time column (see
        // `sluice_planner::validate`).
        let keep_first = limit == 1
            && order.first().is_none_or(|o| {
                !o.options.descending
                    && matches!(o.expr.data_type(&in_schema), Ok(DataType::Timestamp(_, _)))
            });
        let updating = window_end.is_none() && !keep_first;
        let within = order.first().and_then(|o| {
            let any: &dyn std::any::Any = o.expr.as_ref();
            let f = any.downcast_ref::<datafusion::physical_expr::ScalarFunctionExpr>()?;
            if f.name() != sluice_planner::WITHIN_WATERMARK_FN {
                return None;
            }
            let [time, delay] = f.args() else {
                return None;
            };
            let any: &dyn std::any::Any = delay.as_ref();
            match any
                .downcast_ref::<datafusion::physical_plan::expressions::Literal>()?
                .value()
            {
                datafusion::common::ScalarValue::Int64(Some(d)) => Some((Arc::clone(time), *d)),
                _ => None,
            }
        });
        let signed = in_schema.index_of(sluice_planner::SIGN).ok();
        if signed.is_some() && !updating {
            return Err(Error::internal(
                "a top-N per window or keep-first over another operator's changes",
            ));
        }
        let core = TopNCore {
            within,
            updating,
            signed,
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

    /// For a top-1 without a window (its update-mode rows are upserts):
    /// the partition keys, which identify a row of the result.
    pub fn upsert_keys(&self) -> Option<Vec<String>> {
        (self.core.updating && self.core.limit == 1).then(|| {
            self.core
                .partition_names()
                .into_iter()
                .map(str::to_string)
                .collect()
        })
    }

    /// What the node was made of, to make it again elsewhere (a cluster
    /// sends these): its partition keys with their names, its order, its
    /// limit and the window node's schema it replaces.
    #[allow(clippy::type_complexity)]
    pub fn parts(
        &self,
    ) -> (
        &[(Arc<dyn PhysicalExpr>, String)],
        &[PhysicalSortExpr],
        usize,
        &SchemaRef,
    ) {
        let c = &self.core;
        (&c.partition, &c.order, c.limit, &c.out_schema)
    }

    /// The output mode it emits in.
    pub fn emit_mode(&self) -> OutputMode {
        self.emit
    }

    /// Its partition keys over its input: what a cluster partitions its
    /// input by (none: one partition).
    pub fn key_exprs(&self) -> Vec<Arc<dyn PhysicalExpr>> {
        self.core
            .partition
            .iter()
            .map(|(e, _)| Arc::clone(e))
            .collect()
    }

    /// Runs the top-N over one batch with `store` as its state (the state
    /// before the batch), outside a query's operator runtime: its child's
    /// rows in, the rows to emit and what the run did out. The store is not
    /// committed.
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
        if let (Some((time, _)), Some(wm)) = (&core.within, batch.watermark_start) {
            let t = time.evaluate(&rows)?.into_array(rows.num_rows())?;
            let keep = after_watermark(&t, wm)?;
            let late = rows.num_rows() - keep.true_count();
            if late > 0 {
                report.late_rows += late as u64;
                let gone = datafusion::arrow::compute::not(&keep)?;
                report.late.push((0, filter_record_batch(&rows, &gone)?));
                rows = filter_record_batch(&rows, &keep)?;
            }
        }
        report.input_rows = rows.num_rows() as u64;
        if core.updating {
            let out = self.update(store, rows, batch.batch_id)?;
            report
                .steps
                .push(("run", started.elapsed().as_secs_f64() * 1000.0));
            return Ok(out.into_iter().collect());
        }
        let mut emit: Vec<RecordBatch> = Vec::new();
        if rows.num_rows() > 0
            && let Some(first) = self.merge(store, rows)?
        {
            emit.push(first);
        }
        if let (Some((time, delay)), Some(wm)) = (&core.within, batch.watermark_end) {
            // A key goes once the watermark reaches its first row's time
            // plus the delay.
            let np = core.partition.len();
            store.remove_where(|live| {
                let kept = RecordBatch::try_new(
                    Arc::clone(&core.in_schema),
                    cast_all(&live.columns()[np + 1..], &core.in_schema)?,
                )?;
                let t = time.evaluate(&kept)?.into_array(kept.num_rows())?;
                let open = after_watermark(&t, wm.saturating_sub(*delay))?;
                Ok(datafusion::arrow::compute::not(&open)?)
            })?;
        }
        if let (Some(we), Some(wm)) = (core.window_end, batch.watermark_end) {
            let closed = store.remove_keys_until(we, wm)?;
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
        let conv = self.partition_converter()?;
        let new_parts = core.partition_values(&rows)?;
        let new_keys = conv.convert_columns(&new_parts)?;
        let uniq = first_of_each(&new_keys, rows.num_rows());
        let stored = self.slots_of(store, &new_parts, &uniq, 0, core.limit as u32)?;
        let stored_rows = self.as_input_rows(&stored)?;
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
        let (best, ranks) = self.best_ranked(&all, &conv, core.limit)?;
        self.store_ranked(store, &best, &ranks)?;
        Ok(None)
    }

    /// Merges the batch's `rows` into the kept rows of their partitions
    /// (a top-N without a window) and returns the changes: in changelog
    /// mode `-U` old / `+U` new row number for a kept row whose rank
    /// moved, `-U` old / `+U` new row where a row that entered took the
    /// rank of one pushed out, `+I` for another row that entered the best
    /// N, `-D` for another pushed out; in update mode the new rows (a
    /// top-1: each changed partition's new row).
    fn update(
        &self,
        store: &mut StateStore,
        rows: RecordBatch,
        batch_id: u64,
    ) -> Result<Option<RecordBatch>> {
        let core = &self.core;
        if rows.num_rows() == 0 {
            return Ok(None);
        }
        if let Some(sign) = core.signed {
            return self.update_pool(store, rows, sign, batch_id);
        }
        let np = core.partition.len();
        let conv = self.partition_converter()?;
        let (stored, stored_rows) = self.kept_of(store, &rows, &conv)?;
        let all = concat_batches(&core.in_schema, [&stored_rows, &rows])?;
        let (best, ranks) = self.best_ranked(&all, &conv, core.limit)?;
        let old_ranks: Vec<u32> = stored
            .column(np)
            .as_primitive::<UInt32Type>()
            .values()
            .to_vec();
        let (out, moved) =
            self.changes(&stored_rows, &old_ranks, &best, &ranks, &conv, batch_id)?;
        // The input only adds rows, so every rank held before is held after
        // (by the same row or another): overwriting the moved ones is all.
        let moved = UInt32Array::from(moved);
        let keep = take_record_batch(&best, &moved)?;
        let keep_ranks: Vec<u32> = moved.values().iter().map(|j| ranks[*j as usize]).collect();
        self.store_ranked(store, &keep, &keep_ranks)?;
        Ok(out)
    }

    /// A top-N over changes (its input's rows carry a sign in column
    /// `sign`): every row of a partition is kept, ranked, so that when a
    /// kept row is taken back (−1) the next one moves up. Merges the
    /// batch's rows into their partitions' rows and returns the changes of
    /// the best N, as [`Self::update`] does.
    fn update_pool(
        &self,
        store: &mut StateStore,
        rows: RecordBatch,
        sign: usize,
        batch_id: u64,
    ) -> Result<Option<RecordBatch>> {
        use datafusion::arrow::array::{Array, BooleanArray, Int64Array};
        use datafusion::arrow::datatypes::Int64Type;
        let core = &self.core;
        let np = core.partition.len();
        let conv = self.partition_converter()?;
        let (stored, stored_rows) = self.pool_of(store, &rows, &conv)?;
        let old_slots: Vec<u32> = stored
            .column(np)
            .as_primitive::<UInt32Type>()
            .values()
            .to_vec();
        let signs = rows.column(sign).as_primitive::<Int64Type>();
        let adds: BooleanArray = (0..rows.num_rows())
            .map(|i| Some(signs.is_null(i) || signs.value(i) > 0))
            .collect();
        let takes = datafusion::arrow::compute::not(&adds)?;
        // Rows are kept with sign 1, so a row and its retraction compare
        // equal once the retraction's sign is set to 1 too.
        let positive = |b: RecordBatch| -> Result<RecordBatch> {
            let mut cols = b.columns().to_vec();
            cols[sign] = Arc::new(Int64Array::from(vec![1i64; b.num_rows()]));
            Ok(RecordBatch::try_new(Arc::clone(&core.in_schema), cols)?)
        };
        let added = positive(filter_record_batch(&rows, &adds)?)?;
        let taken = positive(filter_record_batch(&rows, &takes)?)?;
        let all = concat_batches(&core.in_schema, [&stored_rows, &added])?;
        let row_conv = self.row_converter()?;
        let all_rows = row_conv.convert_columns(all.columns())?;
        let mut at: HashMap<&[u8], Vec<usize>> = HashMap::new();
        for i in (0..all.num_rows()).rev() {
            at.entry(all_rows.row(i).data()).or_default().push(i);
        }
        let mut keep = vec![true; all.num_rows()];
        let taken_rows = row_conv.convert_columns(taken.columns())?;
        for t in 0..taken.num_rows() {
            match at.get_mut(taken_rows.row(t).data()).and_then(Vec::pop) {
                Some(i) => keep[i] = false,
                None => {
                    return Err(Error::internal(format!(
                        "operator '{}': a retraction of a row the top-N does not hold",
                        self.id
                    )));
                }
            }
        }
        let keep: BooleanArray = keep.into_iter().map(Some).collect();
        let pool = filter_record_batch(&all, &keep)?;
        let (ranked, ranks) = self.best_ranked(&pool, &conv, usize::MAX)?;
        let top = |rows: &RecordBatch, ranks: &[u32]| -> Result<(RecordBatch, Vec<u32>)> {
            let idx: Vec<u32> = (0..ranks.len() as u32)
                .filter(|i| (ranks[*i as usize] as usize) < core.limit)
                .collect();
            let r: Vec<u32> = idx.iter().map(|i| ranks[*i as usize]).collect();
            Ok((take_record_batch(rows, &UInt32Array::from(idx))?, r))
        };
        let (old_top, old_top_ranks) = top(&stored_rows, &old_slots)?;
        let (new_top, new_top_ranks) = top(&ranked, &ranks)?;
        let (out, _) = self.changes(
            &old_top,
            &old_top_ranks,
            &new_top,
            &new_top_ranks,
            &conv,
            batch_id,
        )?;
        // The partitions' rows at their new ranks; slots past a
        // partition's new size go.
        self.store_ranked(store, &ranked, &ranks)?;
        let sizes = |parts: &[ArrayRef], n: usize| -> Result<HashMap<Vec<u8>, (u32, usize)>> {
            let keys = conv.convert_columns(parts)?;
            let mut out: HashMap<Vec<u8>, (u32, usize)> = HashMap::new();
            for i in 0..n {
                out.entry(keys.row(i).data().to_vec()).or_insert((0, i)).0 += 1;
            }
            Ok(out)
        };
        let old_parts = stored.columns()[..np].to_vec();
        let before = sizes(&old_parts, stored.num_rows())?;
        let after = sizes(&core.partition_values(&ranked)?, ranked.num_rows())?;
        let (mut rows_at, mut slots) = (Vec::new(), Vec::new());
        for (key, (old_n, i)) in &before {
            let new_n = after.get(key).map_or(0, |(n, _)| *n);
            for slot in new_n..*old_n {
                rows_at.push(*i as u32);
                slots.push(slot);
            }
        }
        if !slots.is_empty() {
            let at = UInt32Array::from(rows_at);
            let mut keys: Vec<ArrayRef> = old_parts
                .iter()
                .map(|c| take(c.as_ref(), &at, None))
                .collect::<std::result::Result<_, _>>()?;
            keys.push(Arc::new(UInt32Array::from(slots)));
            store.remove(&keys)?;
        }
        Ok(out)
    }

    /// The changes from the best rows `old` (ranks `old_ranks`) of some
    /// partitions to their best rows `new` (ranks `new_ranks`), as the
    /// node emits them (see [`Self::update`]); and which of `new` entered
    /// or moved.
    fn changes(
        &self,
        old: &RecordBatch,
        old_ranks: &[u32],
        new: &RecordBatch,
        new_ranks: &[u32],
        conv: &RowConverter,
        batch_id: u64,
    ) -> Result<(Option<RecordBatch>, Vec<u32>)> {
        use datafusion::arrow::array::StringArray;
        use datafusion::arrow::compute::interleave_record_batch;
        let core = &self.core;
        let (stored_rows, best, ranks) = (old, new, new_ranks);
        // Rows are matched by their whole content (which holds the
        // partition key): a kept row that stays is the same row at the same
        // or another rank.
        let row_conv = self.row_converter()?;
        let old_rows = row_conv.convert_columns(stored_rows.columns())?;
        let new_rows = row_conv.convert_columns(best.columns())?;
        let mut old_of: HashMap<&[u8], Vec<usize>> = HashMap::new();
        for i in (0..stored_rows.num_rows()).rev() {
            old_of.entry(old_rows.row(i).data()).or_default().push(i);
        }
        let numbered = |rows: &RecordBatch, ranks: &[u32]| -> Result<RecordBatch> {
            let mut cols = rows.columns().to_vec();
            cols.push(Arc::new(UInt64Array::from_iter_values(
                ranks.iter().map(|r| u64::from(*r) + 1),
            )));
            Ok(RecordBatch::try_new(Arc::clone(&core.out_schema), cols)?)
        };
        let old_out = numbered(stored_rows, old_ranks)?;
        let new_out = numbered(best, ranks)?;
        let (mut picks, mut ops, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        // New rows, and rows whose rank changed, go to the store.
        let mut moved: Vec<u32> = Vec::new();
        let mut stayed = vec![false; stored_rows.num_rows()];
        let mut entered: Vec<usize> = Vec::new();
        for (j, &rank) in ranks.iter().enumerate() {
            let seq = (batch_id << 32) | j as u64;
            match old_of.get_mut(new_rows.row(j).data()).and_then(Vec::pop) {
                Some(i) => {
                    stayed[i] = true;
                    if old_ranks[i] == rank {
                        continue;
                    }
                    picks.extend([(0, i), (1, j)]);
                    ops.extend(["-U", "+U"]);
                    seqs.extend([seq, seq]);
                }
                None => entered.push(j),
            }
            moved.push(j as u32);
        }
        // A row that entered at the rank a pushed-out row held replaces it
        // (-U old / +U new: for a top-1, each key's row is updated); the
        // other rows that entered are +I, the other pushed-out rows -D.
        let parts_of = |rows: &RecordBatch| -> Result<datafusion::arrow::row::Rows> {
            Ok(conv.convert_columns(&core.partition_values(rows)?)?)
        };
        let (old_parts, new_parts) = (parts_of(stored_rows)?, parts_of(best)?);
        let at = |parts: &datafusion::arrow::row::Rows, i: usize, rank: u32| -> Vec<u8> {
            let mut k = parts.row(i).data().to_vec();
            k.extend_from_slice(&rank.to_be_bytes());
            k
        };
        let mut entrants: HashMap<Vec<u8>, usize> = entered
            .iter()
            .map(|&j| (at(&new_parts, j, ranks[j]), j))
            .collect();
        let base = best.num_rows() as u64;
        for (i, stays) in stayed.iter().enumerate() {
            if *stays {
                continue;
            }
            match entrants.remove(&at(&old_parts, i, old_ranks[i])) {
                Some(j) => {
                    let seq = (batch_id << 32) | j as u64;
                    picks.extend([(0, i), (1, j)]);
                    ops.extend(["-U", "+U"]);
                    seqs.extend([seq, seq]);
                }
                None => {
                    picks.push((0, i));
                    ops.push("-D");
                    seqs.push((batch_id << 32) | (base + i as u64));
                }
            }
        }
        for j in entered {
            if entrants.contains_key(&at(&new_parts, j, ranks[j])) {
                picks.push((1, j));
                ops.push("+I");
                seqs.push((batch_id << 32) | j as u64);
            }
        }
        if picks.is_empty() {
            return Ok((None, moved));
        }
        let out = interleave_record_batch(&[&old_out, &new_out], &picks)?;
        if self.emit != OutputMode::Changelog {
            // Update mode (a top-1): the new row of each partition.
            let new: datafusion::arrow::array::BooleanArray = ops
                .iter()
                .map(|op| Some(*op != "-U" && *op != "-D"))
                .collect();
            return Ok((Some(filter_record_batch(&out, &new)?), moved));
        }
        let mut cols = out.columns().to_vec();
        cols.push(Arc::new(StringArray::from(ops)));
        cols.push(Arc::new(UInt64Array::from(seqs)));
        Ok((
            Some(RecordBatch::try_new(
                with_change_fields(&core.out_schema),
                cols,
            )?),
            moved,
        ))
    }

    /// Compares partition keys.
    fn partition_converter(&self) -> Result<RowConverter> {
        let np = self.core.partition.len();
        Ok(RowConverter::new(
            self.core.key_schema.fields()[..np]
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?)
    }

    /// Compares whole input rows.
    fn row_converter(&self) -> Result<RowConverter> {
        Ok(RowConverter::new(
            self.core
                .in_schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?)
    }

    /// Every kept row of the partitions of `rows` (a top-N over changes
    /// keeps them all, at slots 0, 1, ...): as stored, and as input rows.
    /// Slots are looked up in growing ranges until a partition's run ends.
    fn pool_of(
        &self,
        store: &StateStore,
        rows: &RecordBatch,
        conv: &RowConverter,
    ) -> Result<(RecordBatch, RecordBatch)> {
        let core = &self.core;
        let np = core.partition.len();
        let parts = core.partition_values(rows)?;
        let keys = conv.convert_columns(&parts)?;
        let mut open = first_of_each(&keys, rows.num_rows());
        let mut found: Vec<RecordBatch> = Vec::new();
        let (mut from, mut width) = (0u32, core.limit.max(16) as u32);
        // Each round doubles the range; a partition holds fewer than
        // 2^32 rows, so the loop ends.
        while !open.is_empty() {
            let got = self.slots_of(store, &parts, &open, from, width)?;
            // The partitions whose every slot of the range is held may
            // hold more.
            let got_keys = conv.convert_columns(&got.columns()[..np])?;
            let mut held: HashMap<&[u8], u32> = HashMap::new();
            for r in 0..got.num_rows() {
                *held.entry(got_keys.row(r).data()).or_default() += 1;
            }
            open.retain(|i| held.get(keys.row(*i as usize).data()) == Some(&width));
            found.push(got);
            from = from.saturating_add(width);
            width = width.saturating_mul(2);
            if from == u32::MAX {
                break;
            }
        }
        let stored = match found.first() {
            Some(first) => concat_batches(&first.schema(), &found)?,
            None => return Err(Error::internal("a top-N batch without rows")),
        };
        let stored_rows = self.as_input_rows(&stored)?;
        Ok((stored, stored_rows))
    }

    /// The kept rows of the partitions of `rows` (slots 0 to N−1): as
    /// stored (keys, slot, values), and as input rows.
    fn kept_of(
        &self,
        store: &StateStore,
        rows: &RecordBatch,
        conv: &RowConverter,
    ) -> Result<(RecordBatch, RecordBatch)> {
        let parts = self.core.partition_values(rows)?;
        let keys = conv.convert_columns(&parts)?;
        let uniq = first_of_each(&keys, rows.num_rows());
        let stored = self.slots_of(store, &parts, &uniq, 0, self.core.limit as u32)?;
        let stored_rows = self.as_input_rows(&stored)?;
        Ok((stored, stored_rows))
    }

    /// The stored rows at slots `from .. from + width` of the partitions of
    /// rows `which` (partition values `parts`), as the store holds them.
    fn slots_of(
        &self,
        store: &StateStore,
        parts: &[ArrayRef],
        which: &[u32],
        from: u32,
        width: u32,
    ) -> Result<RecordBatch> {
        let at: UInt32Array = which
            .iter()
            .flat_map(|i| std::iter::repeat_n(*i, width as usize))
            .collect();
        let slots: UInt32Array = which.iter().flat_map(|_| from..from + width).collect();
        let mut lookup: Vec<ArrayRef> = parts
            .iter()
            .map(|c| take(c.as_ref(), &at, None))
            .collect::<std::result::Result<_, _>>()?;
        lookup.push(Arc::new(slots));
        store.get(&lookup)
    }

    /// Stored rows (keys, slot, values) as input rows.
    fn as_input_rows(&self, stored: &RecordBatch) -> Result<RecordBatch> {
        let core = &self.core;
        Ok(RecordBatch::try_new(
            Arc::clone(&core.in_schema),
            cast_all(
                &stored.columns()[core.partition.len() + 1..],
                &core.in_schema,
            )?,
        )?)
    }

    /// The first row (by the order) of each partition of `rows`.
    fn best(&self, rows: &RecordBatch, conv: &RowConverter) -> Result<RecordBatch> {
        let (best, ranks) = self.best_ranked(rows, conv, self.core.limit)?;
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
        limit: usize,
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
            if (rank as usize) < limit {
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

/// The first row of each distinct partition key among `n` rows, in row
/// order: one lookup per partition.
fn first_of_each(keys: &datafusion::arrow::row::Rows, n: usize) -> Vec<u32> {
    let mut firsts: HashMap<&[u8], u32> = HashMap::new();
    for i in 0..n {
        firsts.entry(keys.row(i).data()).or_insert(i as u32);
    }
    let mut uniq: Vec<u32> = firsts.into_values().collect();
    uniq.sort_unstable();
    uniq
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
            } else if self.core.updating {
                "none (the best N rows of every partition are kept for ever)"
            } else if self.core.within.is_some() {
                "a key once the watermark reaches its first row's event time plus the watermark delay (drop_duplicates_within_watermark)"
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
        self.core.window_end.is_some() || self.core.within.is_some()
    }

    fn input_schema(&self) -> SchemaRef {
        self.input.schema()
    }
}
