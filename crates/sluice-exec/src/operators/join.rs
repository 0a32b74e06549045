//! Stream–stream joins: a node that remembers both sides' rows until the
//! watermark makes a match impossible.
//!
//! DataFusion plans `a JOIN b ON a.k = b.k AND <time bound>` as a hash join;
//! when both inputs read streams, the streaming planner puts a
//! [`StreamJoinExec`] in its place. Each batch, the node:
//!
//! 1. drops (and counts) each side's late rows: an event time at or below
//!    the watermark at the start of the batch (Spark's rule for joins);
//! 2. joins the new rows of each side with the other side's stored rows and
//!    with each other, by the equality keys (a hash index per side finds a
//!    key's rows without scanning the state), then checks the rest of the
//!    condition (the time bound, and any other condition) on those pairs;
//! 3. stores the new rows, each with a flag saying whether it matched;
//! 4. evicts, in event-time order, the rows the watermark at the end of the
//!    batch has put out of reach: a left row once `left.t + hi <= wm`, a
//!    right row once `right.t - lo <= wm`, where the bound is
//!    `lo <= right.t - left.t <= hi`. An outer join emits an evicted row
//!    that never matched with NULLs for the other side — exactly when no
//!    match is possible any more, and never for a row that matched
//!    (SPARK-26154). A row that fails a condition on its own side alone can
//!    never match: it is not stored, and an outer join emits it at once.
//!
//! The time bound comes from the condition: a range between the two event
//! times (`b.ts BETWEEN a.ts AND a.ts + INTERVAL '1' HOUR`, or any
//! `<`/`<=`/`>`/`>=` pair of such comparisons), or equal windows
//! (`a.window_end = b.window_end`). A join without one is refused unless
//! `state_ttl` is set: then rows are kept for `state_ttl` of trigger time and
//! only inner and semi joins run (their rows never change).
//!
//! Semi joins (`WHERE EXISTS`/`IN` over a stream) emit a row of the kept side
//! on its first match, and forget it then. Anti joins (`WHERE NOT EXISTS`)
//! forget a row of the kept side on its first match, and emit the rows that
//! never matched when they are evicted (or at once, if a condition on their
//! own side fails), as an outer join emits its NULL rows. `NOT IN` (a
//! null-aware anti join) is refused.
//!
//! The rows the node emits never change (append). It passes on a watermark
//! delayed by its bound (`max(hi, -lo)`): a row it emits can carry an event
//! time that far below the watermark (see [`super::watermark_delays`]).
//!
//! State: one row per stored input row, keyed by (side, time, row id) — the
//! time is the event time (or, with `state_ttl`, when the row was stored) so
//! that eviction goes in time order — with the matched flag, when it was
//! stored, and the row's columns (the left side's, then the right side's,
//! NULL for the other side). An in-memory index per side, rebuilt from the
//! state after a restart or a failed batch, finds a key's rows.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int8Array, Int64Array, RecordBatch, UInt64Array,
    new_null_array,
};
use datafusion::arrow::compute::{
    cast, concat_batches, filter_record_batch, interleave_record_batch,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Int8Type, Int64Type, Schema, SchemaRef, TimeUnit, UInt64Type,
};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{JoinSide, JoinType, NullEquality, ScalarValue};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, Literal};
use datafusion::physical_expr::utils::split_conjunction;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::joins::utils::JoinFilter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, collect,
};
use sluice_common::{BatchId, Error, OutputMode, Result};
use sluice_state::store::StateStore;

use super::changelog::with_change_fields;
use super::{
    BatchContext, OperatorReport, OperatorRuntime, StatefulExec, as_inserts, node_properties,
    run_once,
};

/// Key columns of a stored row: which side, its time, its id.
const SIDE: &str = "__side";
const TIME: &str = "__time_ms";
const ROW: &str = "__row";
/// Value columns before the row's own: whether it matched, when stored.
const MATCHED: &str = "__matched";
const STORED: &str = "__stored_ms";

/// A stream–stream join (see the module docs).
#[derive(Debug, Clone)]
pub struct StreamJoinExec {
    id: String,
    left: Arc<dyn ExecutionPlan>,
    right: Arc<dyn ExecutionPlan>,
    core: Arc<JoinCore>,
    emit: OutputMode,
    properties: Arc<PlanProperties>,
}

/// When a stored row can no longer match.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Eviction {
    /// `lo <= right.t - left.t <= hi` (ms), the times being the columns
    /// `time` of each side.
    Bound { lo: i64, hi: i64 },
    /// No time bound: rows are kept for this long (ms of trigger clock).
    Ttl(i64),
}

#[derive(Debug)]
struct JoinCore {
    join_type: JoinType,
    on: Vec<(Arc<dyn PhysicalExpr>, Arc<dyn PhysicalExpr>)>,
    filter: Option<JoinFilter>,
    /// Conjuncts of the filter that read one side only, per side: a row
    /// failing one can never match.
    side_only: [Vec<Arc<dyn PhysicalExpr>>; 2],
    null_equals_null: bool,
    /// The hash join's own projection of its output, if it had one.
    projection: Option<Vec<usize>>,
    /// The joined rows before that projection.
    join_schema: SchemaRef,
    out_schema: SchemaRef,
    sides: [SchemaRef; 2],
    /// Each side's event-time column (index, name), with a bound.
    time: [Option<(usize, String)>; 2],
    eviction: Eviction,
    /// The key types both sides' keys are compared as.
    key_types: Vec<DataType>,
    key_schema: SchemaRef,
    value_schema: SchemaRef,
    /// The in-memory index over the state (see [`Index`]).
    index: Mutex<Index>,
    /// What the node was made with, to make it again elsewhere (a cluster
    /// sends the hash join and these): the streams' watermark columns and
    /// the query's `state_ttl`.
    event_time_columns: Vec<String>,
    ttl: Option<std::time::Duration>,
}

/// A side's stored rows, indexed by join key and by time.
#[derive(Debug, Default)]
struct SideRows {
    /// Rows as they were stored, in chunks (one per batch, or one from a
    /// reload), with how many of each are still live.
    chunks: HashMap<u32, (RecordBatch, usize)>,
    next_chunk: u32,
    rows: HashMap<u64, Stored>,
    by_key: HashMap<Box<[u8]>, Vec<u64>>,
    by_time: BTreeSet<(i64, u64)>,
}

#[derive(Debug, Clone)]
struct Stored {
    chunk: u32,
    at: usize,
    time: i64,
    stored_ms: i64,
    matched: bool,
    /// The join key, row-encoded; `None` when a key is NULL (it matches
    /// nothing).
    key: Option<Box<[u8]>>,
}

impl SideRows {
    /// Adds `rows` (already chosen to be stored) as a new chunk.
    fn add(&mut self, rows: RecordBatch, meta: Vec<(u64, Stored)>) {
        if meta.is_empty() {
            return;
        }
        let chunk = self.next_chunk;
        self.next_chunk += 1;
        self.chunks.insert(chunk, (rows, meta.len()));
        for (id, mut s) in meta {
            s.chunk = chunk;
            if let Some(k) = &s.key {
                self.by_key.entry(k.clone()).or_default().push(id);
            }
            self.by_time.insert((s.time, id));
            self.rows.insert(id, s);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Stored> {
        let s = self.rows.remove(&id)?;
        if let Some(k) = &s.key
            && let Some(ids) = self.by_key.get_mut(k)
        {
            if let Some(p) = ids.iter().position(|i| *i == id) {
                ids.swap_remove(p);
            }
            if ids.is_empty() {
                self.by_key.remove(k);
            }
        }
        self.by_time.remove(&(s.time, id));
        if let Some((_, live)) = self.chunks.get_mut(&s.chunk) {
            *live -= 1;
            if *live == 0 {
                self.chunks.remove(&s.chunk);
            }
        }
        Some(s)
    }

    /// The stored rows `ids`, in that order.
    fn gather(&self, ids: &[u64], schema: &SchemaRef) -> Result<RecordBatch> {
        let mut at: HashMap<u32, usize> = HashMap::new();
        let mut batches: Vec<&RecordBatch> = Vec::new();
        let mut indices = Vec::with_capacity(ids.len());
        for id in ids {
            let s = self
                .rows
                .get(id)
                .ok_or_else(|| Error::internal(format!("join row {id} is not stored")))?;
            let b = *at.entry(s.chunk).or_insert_with(|| {
                batches.push(&self.chunks[&s.chunk].0);
                batches.len() - 1
            });
            indices.push((b, s.at));
        }
        if batches.is_empty() {
            return Ok(RecordBatch::new_empty(Arc::clone(schema)));
        }
        Ok(interleave_record_batch(&batches, &indices)?)
    }
}

/// The index of both sides' stored rows, valid for one version of the
/// operator's state.
#[derive(Debug, Default)]
struct Index {
    /// The state version the index reflects; `None` while a run changes it
    /// (a run that fails leaves it invalid, so the next one rebuilds it).
    valid_for: Option<Option<BatchId>>,
    sides: [SideRows; 2],
}

/// A join's in-memory index over its stored rows, kept beside its store
/// by whoever runs it with [`StreamJoinExec::run_with`] (a cluster's
/// executor, per state partition).
#[derive(Debug, Default)]
pub struct JoinIndex(Index);

/// A row of a pair: a new row of the batch, or a stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ref {
    New(usize),
    Old(u64),
}

/// One side's rows of the batch, on time.
struct NewRows {
    rows: RecordBatch,
    times: Vec<i64>,
    keys: Vec<Option<Box<[u8]>>>,
    /// Whether the row passes the conditions on its own side (it can match).
    can_match: Vec<bool>,
}

impl StreamJoinExec {
    /// The node replacing `join` (whose both inputs read streams).
    /// `event_time_columns` are the streams' watermark columns; `ttl` is the
    /// query's `state_ttl`.
    pub fn from_hash_join(
        id: String,
        join: &HashJoinExec,
        event_time_columns: &[String],
        ttl: Option<std::time::Duration>,
    ) -> Result<Self> {
        let join_type = join.join_type;
        if !sluice_planner::validate::stream_join_runs(join_type) {
            return Err(Error::not_supported(format!(
                "a {join_type} join of two streams (a mark join, from EXISTS under OR): not built yet; inner, left, right, full outer, semi (EXISTS) and anti (NOT EXISTS) joins are"
            )));
        }
        if join.null_aware {
            return Err(Error::not_supported(
                "NOT IN over a stream (a null-aware anti join: one NULL on the other side empties the result, for ever): not built yet; write NOT EXISTS (... WHERE a.k = b.k ...) instead",
            ));
        }
        let left = strip(Arc::clone(join.left()));
        let right = strip(Arc::clone(join.right()));
        let sides = [left.schema(), right.schema()];
        let on: Vec<_> = join
            .on()
            .iter()
            .map(|(l, r)| (Arc::clone(l), Arc::clone(r)))
            .collect();
        let key_types = on
            .iter()
            .map(|(l, _)| l.data_type(&sides[0]))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let filter = join.filter().cloned();
        let (time, bound) = time_bound(&on, filter.as_ref(), &sides, event_time_columns);
        let eviction = match (bound, ttl) {
            (Some((lo, hi)), _) => Eviction::Bound { lo, hi },
            (None, Some(ttl)) => {
                if !matches!(
                    join_type,
                    JoinType::Inner | JoinType::LeftSemi | JoinType::RightSemi
                ) {
                    return Err(Error::not_supported(format!(
                        "a {join_type} join of two streams without a time bound: with state_ttl only inner and semi joins run (an outer join's NULL rows would have to be retracted later); bound the event times of the two sides against each other, or join equal windows"
                    )));
                }
                Eviction::Ttl(ttl.as_millis() as i64)
            }
            (None, None) => {
                return Err(Error::not_supported(
                    "a join of two streams without a time bound keeps every row of both streams for ever; \
                     bound one side's event time by the other's (b.ts BETWEEN a.ts AND a.ts + INTERVAL '1' HOUR) \
                     or join equal windows (a.window_end = b.window_end), with a WATERMARK on both streams; \
                     or set state_ttl to keep rows for a while (an inner or semi join)",
                ));
            }
        };
        let side_only = match &filter {
            Some(f) => [
                side_conjuncts(f, JoinSide::Left),
                side_conjuncts(f, JoinSide::Right),
            ],
            None => [vec![], vec![]],
        };
        let keys = vec![
            Field::new(SIDE, DataType::Int8, false),
            Field::new(TIME, DataType::Int64, false),
            Field::new(ROW, DataType::UInt64, false),
        ];
        let mut values = vec![
            Field::new(MATCHED, DataType::Boolean, false),
            Field::new(STORED, DataType::Int64, false),
        ];
        for (prefix, s) in [("left.", &sides[0]), ("right.", &sides[1])] {
            for f in s.fields() {
                values.push(Field::new(
                    format!("{prefix}{}", f.name()),
                    f.data_type().clone(),
                    true,
                ));
            }
        }
        let core = JoinCore {
            join_type,
            on,
            filter,
            side_only,
            null_equals_null: join.null_equality() == NullEquality::NullEqualsNull,
            projection: join.projection.as_ref().map(|p| p.to_vec()),
            join_schema: Arc::clone(join.join_schema()),
            out_schema: join.schema(),
            sides,
            time,
            eviction,
            key_types,
            key_schema: Arc::new(Schema::new(keys)),
            value_schema: Arc::new(Schema::new(values)),
            index: Mutex::new(Index::default()),
            event_time_columns: event_time_columns.to_vec(),
            ttl,
        };
        Ok(Self::build(
            id,
            left,
            right,
            Arc::new(core),
            OutputMode::Append,
        ))
    }

    fn build(
        id: String,
        left: Arc<dyn ExecutionPlan>,
        right: Arc<dyn ExecutionPlan>,
        core: Arc<JoinCore>,
        emit: OutputMode,
    ) -> Self {
        let schema = match emit {
            OutputMode::Changelog => with_change_fields(&core.out_schema),
            _ => Arc::clone(&core.out_schema),
        };
        StreamJoinExec {
            id,
            left,
            right,
            core,
            emit,
            properties: node_properties(schema),
        }
    }

    /// This node emitting in `mode`: its rows are inserts in any mode.
    pub fn with_emit(&self, mode: OutputMode) -> Self {
        Self::build(
            self.id.clone(),
            Arc::clone(&self.left),
            Arc::clone(&self.right),
            Arc::clone(&self.core),
            mode,
        )
    }

    /// Whether rows are kept for `state_ttl` (no time bound) rather than
    /// evicted by watermark.
    pub fn kept_by_ttl(&self) -> bool {
        matches!(self.core.eviction, Eviction::Ttl(_))
    }

    /// How far below its input watermark the event times of the rows it
    /// emits can be (ms): the width of its bound.
    pub fn output_delay_ms(&self) -> i64 {
        match self.core.eviction {
            Eviction::Bound { lo, hi } => hi.max(-lo).max(0),
            Eviction::Ttl(_) => 0,
        }
    }

    /// The hash join this node was made from, over `left` and `right`
    /// (what a cluster sends to make the node again on an executor).
    pub fn hash_join_over(
        &self,
        left: Arc<dyn ExecutionPlan>,
        right: Arc<dyn ExecutionPlan>,
    ) -> Result<HashJoinExec> {
        let core = &self.core;
        let null_equality = if core.null_equals_null {
            NullEquality::NullEqualsNull
        } else {
            NullEquality::NullEqualsNothing
        };
        Ok(HashJoinExec::try_new(
            left,
            right,
            core.on.clone(),
            core.filter.clone(),
            &core.join_type,
            core.projection.clone(),
            datafusion::physical_plan::joins::PartitionMode::CollectLeft,
            null_equality,
            false,
        )?)
    }

    /// The streams' watermark columns the node was made with.
    pub fn event_time_columns(&self) -> &[String] {
        &self.core.event_time_columns
    }

    /// The query's `state_ttl` the node was made with.
    pub fn ttl(&self) -> Option<std::time::Duration> {
        self.core.ttl
    }

    /// The output mode it emits in.
    pub fn emit_mode(&self) -> OutputMode {
        self.emit
    }

    /// The equality keys over each side's rows: what a cluster partitions
    /// each side by, so that rows that can match meet in one partition.
    pub fn key_exprs(&self) -> [Vec<Arc<dyn PhysicalExpr>>; 2] {
        [
            self.core.on.iter().map(|(l, _)| Arc::clone(l)).collect(),
            self.core.on.iter().map(|(_, r)| Arc::clone(r)).collect(),
        ]
    }

    /// Runs the join over one batch with `store` as its state (the state
    /// before the batch) and `index` as its index over it, outside a
    /// query's operator runtime: both children's rows in, the rows to emit
    /// and what the run did out. The store is not committed. An index that
    /// is not of the store's version is rebuilt from the store.
    pub async fn run_with(
        &self,
        store: &mut StateStore,
        index: &mut JoinIndex,
        batch: BatchContext,
        ctx: &Arc<TaskContext>,
    ) -> Result<(Vec<RecordBatch>, OperatorReport)> {
        let input = self.inputs(ctx).await?;
        let mut report = OperatorReport::default();
        let started = std::time::Instant::now();
        let rows = self.run_on(store, &mut index.0, batch, input, &mut report)?;
        report
            .steps
            .push(("run", started.elapsed().as_secs_f64() * 1000.0));
        Ok((rows, report))
    }

    async fn inputs(&self, ctx: &Arc<TaskContext>) -> Result<[Vec<RecordBatch>; 2]> {
        let left = collect(Arc::clone(&self.left), Arc::clone(ctx))
            .await
            .map_err(Error::from)?;
        let right = collect(Arc::clone(&self.right), Arc::clone(ctx))
            .await
            .map_err(Error::from)?;
        Ok([left, right])
    }

    async fn run(self, ctx: Arc<TaskContext>) -> Result<Vec<RecordBatch>> {
        let (batch, state) = OperatorRuntime::of(&ctx, &self.id)?;
        let input = self.inputs(&ctx).await?;
        let mut guard = state.lock().await;
        let st = &mut *guard;
        st.begin();
        let mut report = OperatorReport::default();
        let started = std::time::Instant::now();
        let out = {
            let mut index = self.core.index.lock().unwrap_or_else(|p| p.into_inner());
            self.run_on(&mut st.store, &mut index, batch, input, &mut report)
        };
        report
            .steps
            .push(("run", started.elapsed().as_secs_f64() * 1000.0));
        st.report = report;
        out
    }

    fn run_on(
        &self,
        store: &mut StateStore,
        index: &mut Index,
        batch: BatchContext,
        input: [Vec<RecordBatch>; 2],
        report: &mut OperatorReport,
    ) -> Result<Vec<RecordBatch>> {
        let core = &self.core;
        if index.valid_for != Some(store.version()) {
            *index = Index::default();
            core.rebuild(store, index)?;
        }
        index.valid_for = None;

        // 1. Each side's on-time rows.
        let [l_in, r_in] = input;
        let mut new = Vec::with_capacity(2);
        for (s, batches) in [l_in, r_in].into_iter().enumerate() {
            new.push(core.new_rows(s, batches, batch, report)?);
        }
        let new: [NewRows; 2] = new.try_into().map_err(|_| Error::internal("two sides"))?;
        report.input_rows = (new[0].rows.num_rows() + new[1].rows.num_rows()) as u64;

        // 2. Candidate pairs by key: new left with stored and new right,
        //    stored left with new right; then the rest of the condition.
        let mut new_right_by_key: HashMap<&[u8], Vec<usize>> = HashMap::new();
        for (j, k) in new[1].keys.iter().enumerate() {
            if let (Some(k), true) = (k, new[1].can_match[j]) {
                new_right_by_key.entry(&k[..]).or_default().push(j);
            }
        }
        let mut pairs: Vec<(Ref, Ref)> = Vec::new();
        for (i, k) in new[0].keys.iter().enumerate() {
            let (Some(k), true) = (k, new[0].can_match[i]) else {
                continue;
            };
            if let Some(ids) = index.sides[1].by_key.get(&k[..]) {
                pairs.extend(ids.iter().map(|id| (Ref::New(i), Ref::Old(*id))));
            }
            if let Some(js) = new_right_by_key.get(&k[..]) {
                pairs.extend(js.iter().map(|j| (Ref::New(i), Ref::New(*j))));
            }
        }
        for (j, k) in new[1].keys.iter().enumerate() {
            let (Some(k), true) = (k, new[1].can_match[j]) else {
                continue;
            };
            if let Some(ids) = index.sides[0].by_key.get(&k[..]) {
                pairs.extend(ids.iter().map(|id| (Ref::Old(*id), Ref::New(j))));
            }
        }
        let lrows = core.gather_refs(&index.sides[0], &new[0], pairs.iter().map(|p| p.0), 0)?;
        let rrows = core.gather_refs(&index.sides[1], &new[1], pairs.iter().map(|p| p.1), 1)?;
        let pass = core.check_pairs(&lrows, &rrows)?;
        let kept: Vec<usize> = (0..pairs.len()).filter(|i| pass.value(*i)).collect();

        // Which rows matched, on each side.
        let mut matched: [std::collections::HashSet<Ref>; 2] = Default::default();
        for &p in &kept {
            matched[0].insert(pairs[p].0);
            matched[1].insert(pairs[p].1);
        }

        let mut out: Vec<RecordBatch> = Vec::new();
        let mask: BooleanArray = pass.iter().map(|v| Some(v == Some(true))).collect();
        match core.join_type {
            // A match only rules a row out; unmatched rows come at eviction.
            JoinType::LeftAnti | JoinType::RightAnti => {}
            JoinType::LeftSemi | JoinType::RightSemi => {
                let s = if core.join_type == JoinType::LeftSemi {
                    0
                } else {
                    1
                };
                // Each kept-side row once, in pair order.
                let mut seen = std::collections::HashSet::new();
                let firsts: Vec<Ref> = kept
                    .iter()
                    .map(|p| if s == 0 { pairs[*p].0 } else { pairs[*p].1 })
                    .filter(|r| seen.insert(*r))
                    .collect();
                let rows = core.gather_refs(&index.sides[s], &new[s], firsts.into_iter(), s)?;
                if rows.num_rows() > 0 {
                    out.push(RecordBatch::try_new(
                        Arc::clone(&core.join_schema),
                        rows.columns().to_vec(),
                    )?);
                }
            }
            _ => {
                let l = filter_record_batch(&lrows, &mask)?;
                let r = filter_record_batch(&rrows, &mask)?;
                if l.num_rows() > 0 {
                    let mut cols = l.columns().to_vec();
                    cols.extend(r.columns().iter().cloned());
                    out.push(RecordBatch::try_new(Arc::clone(&core.join_schema), cols)?);
                }
            }
        }

        // 3. Store the new rows; flag stored rows that matched now.
        let now_ms = batch.now_ms;
        for s in 0..2 {
            let anti_side = core.anti_side() == Some(s);
            // An anti join's kept side drops a row once it matched, as a
            // semi join's emits it then: either way the row is done.
            let semi_side = core.semi_side() == Some(s) || anti_side;
            let outer = core.preserves(s);
            // Stored rows of a semi join's kept side that matched are done.
            if semi_side {
                let gone: Vec<u64> = matched[s]
                    .iter()
                    .filter_map(|r| match r {
                        Ref::Old(id) => Some(*id),
                        Ref::New(_) => None,
                    })
                    .collect();
                let removed: Vec<(u64, Stored)> = gone
                    .into_iter()
                    .filter_map(|id| index.sides[s].remove(id).map(|st| (id, st)))
                    .collect();
                store.remove(&core.state_keys(s, &removed))?;
            } else if outer {
                let newly: Vec<u64> = matched[s]
                    .iter()
                    .filter_map(|r| match r {
                        Ref::Old(id) if !index.sides[s].rows[id].matched => Some(*id),
                        _ => None,
                    })
                    .collect();
                if !newly.is_empty() {
                    for id in &newly {
                        if let Some(st) = index.sides[s].rows.get_mut(id) {
                            st.matched = true;
                        }
                    }
                    let rows = index.sides[s].gather(&newly, &core.sides[s])?;
                    let meta: Vec<(u64, Stored)> = newly
                        .iter()
                        .map(|id| (*id, index.sides[s].rows[id].clone()))
                        .collect();
                    store.put(&core.state_rows(s, &rows, &meta)?)?;
                }
            }
            // New rows: stored when they can still match something later.
            let n = &new[s];
            let mut keep_idx = Vec::new();
            let mut meta = Vec::new();
            let mut at_once = Vec::new();
            for i in 0..n.rows.num_rows() {
                let m = matched[s].contains(&Ref::New(i));
                if !n.can_match[i] {
                    // Fails a condition on its own side: an outer or an
                    // anti join emits it now; nothing else will.
                    if outer || anti_side {
                        at_once.push(i as u32);
                    }
                    continue;
                }
                if semi_side && m {
                    continue;
                }
                keep_idx.push(i as u32);
                meta.push((
                    (batch.batch_id << 32) | i as u64,
                    Stored {
                        chunk: 0,
                        at: meta.len(),
                        time: match core.eviction {
                            Eviction::Bound { .. } => n.times[i],
                            Eviction::Ttl(_) => now_ms,
                        },
                        stored_ms: now_ms,
                        matched: m,
                        key: n.keys[i].clone(),
                    },
                ));
            }
            if !at_once.is_empty() {
                let rows = datafusion::arrow::compute::take_record_batch(
                    &n.rows,
                    &datafusion::arrow::array::UInt32Array::from(at_once),
                )?;
                out.push(core.unmatched(s, &rows)?);
            }
            if !keep_idx.is_empty() {
                let rows = datafusion::arrow::compute::take_record_batch(
                    &n.rows,
                    &datafusion::arrow::array::UInt32Array::from(keep_idx),
                )?;
                store.put(&core.state_rows(s, &rows, &meta)?)?;
                index.sides[s].add(rows, meta);
            }
        }

        // 4. Evict what can no longer match, in time order; an outer join
        //    emits its evicted rows that never matched.
        for s in 0..2 {
            let limit = match (core.eviction, batch.watermark_end) {
                (Eviction::Bound { lo, hi }, Some(wm)) => {
                    // left: t + hi <= wm; right: t - lo <= wm.
                    if s == 0 {
                        wm.saturating_sub(hi)
                    } else {
                        wm.saturating_add(lo)
                    }
                }
                (Eviction::Bound { .. }, None) => continue,
                (Eviction::Ttl(ttl), _) => now_ms - ttl - 1,
            };
            let due: Vec<u64> = index.sides[s]
                .by_time
                .iter()
                .take_while(|(t, _)| *t <= limit)
                .map(|(_, id)| *id)
                .collect();
            if due.is_empty() {
                continue;
            }
            if core.preserves(s) || core.anti_side() == Some(s) {
                let unmatched: Vec<u64> = due
                    .iter()
                    .copied()
                    .filter(|id| !index.sides[s].rows[id].matched)
                    .collect();
                if !unmatched.is_empty() {
                    let rows = index.sides[s].gather(&unmatched, &core.sides[s])?;
                    out.push(core.unmatched(s, &rows)?);
                }
            }
            let removed: Vec<(u64, Stored)> = due
                .into_iter()
                .filter_map(|id| index.sides[s].remove(id).map(|st| (id, st)))
                .collect();
            store.remove(&core.state_keys(s, &removed))?;
        }
        index.valid_for = Some(Some(batch.batch_id));

        let mut emitted = Vec::with_capacity(out.len());
        for b in out {
            let b = match &core.projection {
                Some(p) => b.project(p)?,
                None => b,
            };
            let b = RecordBatch::try_new(Arc::clone(&core.out_schema), b.columns().to_vec())?;
            emitted.push(match self.emit {
                OutputMode::Changelog => as_inserts(&core.out_schema, b, batch.batch_id)?,
                _ => b,
            });
        }
        Ok(emitted)
    }
}

impl JoinCore {
    /// The side whose rows a semi join emits.
    fn semi_side(&self) -> Option<usize> {
        match self.join_type {
            JoinType::LeftSemi => Some(0),
            JoinType::RightSemi => Some(1),
            _ => None,
        }
    }

    /// The side whose unmatched rows an anti join emits.
    fn anti_side(&self) -> Option<usize> {
        match self.join_type {
            JoinType::LeftAnti => Some(0),
            JoinType::RightAnti => Some(1),
            _ => None,
        }
    }

    /// Side `s`'s rows that never matched, as the join emits them: with
    /// NULLs for the other side (an outer join), or alone (an anti join).
    fn unmatched(&self, s: usize, rows: &RecordBatch) -> Result<RecordBatch> {
        if self.anti_side() == Some(s) {
            return Ok(RecordBatch::try_new(
                Arc::clone(&self.join_schema),
                rows.columns().to_vec(),
            )?);
        }
        self.null_padded(s, rows)
    }

    /// Whether an outer join keeps side `s`'s unmatched rows.
    fn preserves(&self, s: usize) -> bool {
        matches!(
            (self.join_type, s),
            (JoinType::Left, 0) | (JoinType::Right, 1) | (JoinType::Full, _)
        )
    }

    /// Side `s`'s rows of the batch: late ones counted and left out, the
    /// rest with their time, key and whether they can match at all.
    fn new_rows(
        &self,
        s: usize,
        batches: Vec<RecordBatch>,
        batch: BatchContext,
        report: &mut OperatorReport,
    ) -> Result<NewRows> {
        let mut rows = concat_batches(&self.sides[s], &batches)?;
        let mut times = vec![0; rows.num_rows()];
        if let (Eviction::Bound { .. }, Some((t, _))) = (self.eviction, &self.time[s]) {
            let ms = to_ms(rows.column(*t))?;
            if let Some(wm) = batch.watermark_start {
                // Late: at or below the watermark; a NULL time can never
                // be bounded, so it is late too.
                let on_time: BooleanArray = (0..ms.len())
                    .map(|i| Some(ms.is_valid(i) && ms.value(i) > wm))
                    .collect();
                let late = rows.num_rows() - on_time.true_count();
                if late > 0 {
                    report.late_rows += late as u64;
                    let gone = datafusion::arrow::compute::not(&on_time)?;
                    report.late.push((s, filter_record_batch(&rows, &gone)?));
                    rows = filter_record_batch(&rows, &on_time)?;
                }
            }
            let ms = to_ms(rows.column(*t))?;
            times = (0..ms.len())
                .map(|i| {
                    if ms.is_valid(i) {
                        ms.value(i)
                    } else {
                        i64::MIN
                    }
                })
                .collect();
        }
        let keys = self.keys_of(s, &rows)?;
        let mut can_match = vec![true; rows.num_rows()];
        for c in &self.side_only[s] {
            let probe = self.one_side_batch(s, &rows)?;
            let v = c.evaluate(&probe)?.into_array(rows.num_rows())?;
            let v = v.as_boolean();
            for (i, m) in can_match.iter_mut().enumerate() {
                *m &= v.is_valid(i) && v.value(i);
            }
        }
        Ok(NewRows {
            rows,
            times,
            keys,
            can_match,
        })
    }

    /// The row-encoded join keys of side `s`'s rows (`None` where one is
    /// NULL and NULL matches nothing).
    fn keys_of(&self, s: usize, rows: &RecordBatch) -> Result<Vec<Option<Box<[u8]>>>> {
        let n = rows.num_rows();
        let mut cols = Vec::with_capacity(self.on.len());
        for ((l, r), ty) in self.on.iter().zip(&self.key_types) {
            let e = if s == 0 { l } else { r };
            let a = e.evaluate(rows)?.into_array(n)?;
            cols.push(if a.data_type() == ty {
                a
            } else {
                cast(&a, ty)?
            });
        }
        let conv = RowConverter::new(
            self.key_types
                .iter()
                .map(|t| SortField::new(t.clone()))
                .collect(),
        )?;
        let encoded = conv.convert_columns(&cols)?;
        Ok((0..n)
            .map(|i| {
                let null = cols.iter().any(|c| c.is_null(i));
                (self.null_equals_null || !null).then(|| Box::from(encoded.row(i).data()))
            })
            .collect())
    }

    /// The rows `refs` of side `s`, new or stored, in that order.
    fn gather_refs(
        &self,
        stored: &SideRows,
        new: &NewRows,
        refs: impl Iterator<Item = Ref>,
        s: usize,
    ) -> Result<RecordBatch> {
        let refs: Vec<Ref> = refs.collect();
        let old: Vec<u64> = refs
            .iter()
            .filter_map(|r| match r {
                Ref::Old(id) => Some(*id),
                Ref::New(_) => None,
            })
            .collect();
        let old_rows = stored.gather(&old, &self.sides[s])?;
        let mut o = 0;
        let indices: Vec<(usize, usize)> = refs
            .iter()
            .map(|r| match r {
                Ref::New(i) => (0, *i),
                Ref::Old(_) => {
                    o += 1;
                    (1, o - 1)
                }
            })
            .collect();
        if indices.is_empty() {
            return Ok(RecordBatch::new_empty(Arc::clone(&self.sides[s])));
        }
        Ok(interleave_record_batch(&[&new.rows, &old_rows], &indices)?)
    }

    /// For each pair (`left[i]`, `right[i]`), whether it passes the join's
    /// condition beyond the keys.
    fn check_pairs(&self, left: &RecordBatch, right: &RecordBatch) -> Result<BooleanArray> {
        let n = left.num_rows();
        let Some(f) = &self.filter else {
            return Ok(BooleanArray::from(vec![true; n]));
        };
        let cols: Vec<ArrayRef> = f
            .column_indices()
            .iter()
            .map(|c| match c.side {
                JoinSide::Left => Arc::clone(left.column(c.index)),
                _ => Arc::clone(right.column(c.index)),
            })
            .collect();
        let probe = RecordBatch::try_new_with_options(
            Arc::clone(f.schema()),
            cols,
            &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
        )?;
        let v = f.expression().evaluate(&probe)?.into_array(n)?;
        Ok(v.as_boolean()
            .iter()
            .map(|b| Some(b == Some(true)))
            .collect())
    }

    /// The filter's columns for side `s`'s rows alone (the other side's
    /// columns NULL): what a one-side conjunct is evaluated on.
    fn one_side_batch(&self, s: usize, rows: &RecordBatch) -> Result<RecordBatch> {
        let f = self
            .filter
            .as_ref()
            .ok_or_else(|| Error::internal("no filter"))?;
        let n = rows.num_rows();
        let side = if s == 0 {
            JoinSide::Left
        } else {
            JoinSide::Right
        };
        let cols: Vec<ArrayRef> = f
            .column_indices()
            .iter()
            .zip(f.schema().fields())
            .map(|(c, field)| {
                if c.side == side {
                    Arc::clone(rows.column(c.index))
                } else {
                    new_null_array(field.data_type(), n)
                }
            })
            .collect();
        let nullable = Arc::new(Schema::new(
            f.schema()
                .fields()
                .iter()
                .map(|x| x.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        Ok(RecordBatch::try_new_with_options(
            nullable,
            cols,
            &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }

    /// Side `s`'s `rows` with NULLs for the other side, as joined rows.
    fn null_padded(&self, s: usize, rows: &RecordBatch) -> Result<RecordBatch> {
        let n = rows.num_rows();
        let nl = self.sides[0].fields().len();
        let cols: Vec<ArrayRef> = self
            .join_schema
            .fields()
            .iter()
            .enumerate()
            .map(|(c, f)| match (s, c < nl) {
                (0, true) => Arc::clone(rows.column(c)),
                (1, false) => Arc::clone(rows.column(c - nl)),
                _ => new_null_array(f.data_type(), n),
            })
            .collect();
        Ok(RecordBatch::try_new(Arc::clone(&self.join_schema), cols)?)
    }

    /// State rows for side `s`'s `rows` with their `meta`.
    fn state_rows(
        &self,
        s: usize,
        rows: &RecordBatch,
        meta: &[(u64, Stored)],
    ) -> Result<RecordBatch> {
        let n = rows.num_rows();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Int8Array::from(vec![s as i8; n])),
            Arc::new(Int64Array::from_iter_values(meta.iter().map(|m| m.1.time))),
            Arc::new(UInt64Array::from_iter_values(meta.iter().map(|m| m.0))),
            Arc::new(BooleanArray::from(
                meta.iter().map(|m| m.1.matched).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from_iter_values(
                meta.iter().map(|m| m.1.stored_ms),
            )),
        ];
        for side in 0..2 {
            for (c, f) in self.sides[side].fields().iter().enumerate() {
                cols.push(if side == s {
                    Arc::clone(rows.column(c))
                } else {
                    new_null_array(f.data_type(), n)
                });
            }
        }
        let fields: Vec<Field> = self
            .key_schema
            .fields()
            .iter()
            .chain(self.value_schema.fields().iter())
            .map(|f| f.as_ref().clone())
            .collect();
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }

    /// The state keys of side `s`'s rows `removed`.
    fn state_keys(&self, s: usize, removed: &[(u64, Stored)]) -> Vec<ArrayRef> {
        vec![
            Arc::new(Int8Array::from(vec![s as i8; removed.len()])),
            Arc::new(Int64Array::from_iter_values(
                removed.iter().map(|r| r.1.time),
            )),
            Arc::new(UInt64Array::from_iter_values(removed.iter().map(|r| r.0))),
        ]
    }

    /// Rebuilds the index from the state (after a restart, or a batch that
    /// failed after changing it).
    fn rebuild(&self, store: &StateStore, index: &mut Index) -> Result<()> {
        let all = store.scan()?;
        let sides = all.column(0).as_primitive::<Int8Type>();
        let times = all.column(1).as_primitive::<Int64Type>();
        let ids = all.column(2).as_primitive::<UInt64Type>();
        let matched = all.column(3).as_boolean();
        let stored = all.column(4).as_primitive::<Int64Type>();
        let nl = self.sides[0].fields().len();
        for s in 0..2 {
            let mine: BooleanArray = sides.iter().map(|v| Some(v == Some(s as i8))).collect();
            let idx: Vec<usize> = (0..all.num_rows()).filter(|i| mine.value(*i)).collect();
            if idx.is_empty() {
                continue;
            }
            let part = filter_record_batch(&all, &mine)?;
            let range = if s == 0 {
                5..5 + nl
            } else {
                5 + nl..part.num_columns()
            };
            let rows =
                RecordBatch::try_new(Arc::clone(&self.sides[s]), part.columns()[range].to_vec())?;
            let keys = self.keys_of(s, &rows)?;
            let meta: Vec<(u64, Stored)> = idx
                .iter()
                .zip(keys)
                .enumerate()
                .map(|(at, (&i, key))| {
                    (
                        ids.value(i),
                        Stored {
                            chunk: 0,
                            at,
                            time: times.value(i),
                            stored_ms: stored.value(i),
                            matched: matched.value(i),
                            key,
                        },
                    )
                })
                .collect();
            index.sides[s].add(rows, meta);
        }
        Ok(())
    }

    /// The eviction rule, for EXPLAIN.
    fn eviction_text(&self) -> String {
        let offset = |ms: i64| match ms {
            0 => String::new(),
            ..0 => format!(" - {} ms", -ms),
            _ => format!(" + {ms} ms"),
        };
        let name = |s: usize| {
            self.time[s]
                .as_ref()
                .map_or_else(|| "?".to_string(), |(_, n)| n.clone())
        };
        match self.eviction {
            Eviction::Bound { lo, hi } => format!(
                "left row once left.{}{} <= watermark, right row once right.{}{} <= watermark (at the end of the batch){}",
                name(0),
                offset(hi),
                name(1),
                offset(-lo),
                match self.join_type {
                    JoinType::Left => "; unmatched left rows are emitted with NULLs then",
                    JoinType::Right => "; unmatched right rows are emitted with NULLs then",
                    JoinType::Full => "; unmatched rows are emitted with NULLs then",
                    JoinType::LeftAnti => "; left rows that never matched are emitted then",
                    JoinType::RightAnti => "; right rows that never matched are emitted then",
                    _ => "",
                }
            ),
            Eviction::Ttl(ms) => format!("rows stored more than state_ttl ({ms} ms) ago"),
        }
    }
}

/// A timestamp column in ms.
fn to_ms(col: &ArrayRef) -> Result<datafusion::arrow::array::Int64Array> {
    let ms = cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    let ms = cast(&ms, &DataType::Int64)?;
    Ok(ms.as_primitive::<Int64Type>().clone())
}

/// `plan` without the repartitions and coalescing DataFusion put under a
/// hash join for its build and probe: the node reads each side whole.
fn strip(mut plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::physical_plan::repartition::RepartitionExec;
    loop {
        let any: &dyn std::any::Any = plan.as_ref();
        if let Some(r) = any.downcast_ref::<RepartitionExec>() {
            plan = Arc::clone(r.input());
        } else if let Some(c) = any.downcast_ref::<CoalescePartitionsExec>() {
            plan = Arc::clone(c.input());
        } else {
            return plan;
        }
    }
}

/// The conjuncts of `filter` that read only `side`'s columns.
fn side_conjuncts(filter: &JoinFilter, side: JoinSide) -> Vec<Arc<dyn PhysicalExpr>> {
    split_conjunction(filter.expression())
        .into_iter()
        .filter(|c| {
            let cols = datafusion::physical_expr::utils::collect_columns(c);
            !cols.is_empty()
                && cols
                    .iter()
                    .all(|col| filter.column_indices()[col.index()].side == side)
        })
        .map(Arc::clone)
        .collect()
}

/// A time expression of one side: `column (+|-) constant`, the column an
/// index into the side's input and the constant in ms.
fn linear(
    e: &Arc<dyn PhysicalExpr>,
    column: &dyn Fn(&Column) -> Option<(usize, usize)>,
) -> Option<((usize, usize), i64)> {
    let any: &dyn std::any::Any = e.as_ref();
    if let Some(c) = any.downcast_ref::<Column>() {
        return column(c).map(|c| (c, 0));
    }
    if let Some(c) = any.downcast_ref::<CastExpr>() {
        return linear(c.expr(), column);
    }
    let b = any.downcast_ref::<BinaryExpr>()?;
    let sign = match b.op() {
        Operator::Plus => 1,
        Operator::Minus => -1,
        _ => return None,
    };
    let (col, off) = linear(b.left(), column)?;
    let lit: &dyn std::any::Any = b.right().as_ref();
    let ms = interval_ms(lit.downcast_ref::<Literal>()?.value())?;
    Some((col, off + sign * ms))
}

/// A constant duration in ms (`INTERVAL '1' HOUR`), if it has no months.
fn interval_ms(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::IntervalDayTime(Some(d)) => {
            Some(d.days as i64 * 86_400_000 + d.milliseconds as i64)
        }
        ScalarValue::IntervalMonthDayNano(Some(m)) if m.months == 0 => {
            Some(m.days as i64 * 86_400_000 + m.nanoseconds / 1_000_000)
        }
        ScalarValue::DurationSecond(Some(s)) => Some(s * 1000),
        ScalarValue::DurationMillisecond(Some(ms)) => Some(*ms),
        ScalarValue::DurationMicrosecond(Some(us)) => Some(us / 1000),
        ScalarValue::DurationNanosecond(Some(ns)) => Some(ns / 1_000_000),
        _ => None,
    }
}

/// Whether a column can carry a side's event time: a stream's watermark
/// column, or the end or last instant of a window, of a timestamp type.
fn is_event_time(schema: &SchemaRef, index: usize, event_time_columns: &[String]) -> bool {
    let f = schema.field(index);
    matches!(f.data_type(), DataType::Timestamp(_, _))
        && (event_time_columns.iter().any(|c| c == f.name())
            || f.name() == sluice_planner::WINDOW_END
            || f.name() == "window_time")
}

/// The time bound of a join: each side's event-time column, and
/// `lo <= right.t - left.t <= hi` (ms), from equal event-time keys (equal
/// windows) or from range conditions between the two sides' event times.
#[allow(clippy::type_complexity)]
fn time_bound(
    on: &[(Arc<dyn PhysicalExpr>, Arc<dyn PhysicalExpr>)],
    filter: Option<&JoinFilter>,
    sides: &[SchemaRef; 2],
    event_time_columns: &[String],
) -> ([Option<(usize, String)>; 2], Option<(i64, i64)>) {
    // (left column, right column) -> (lo, hi), each end open as None.
    let mut bounds: HashMap<(usize, usize), (Option<i64>, Option<i64>)> = HashMap::new();
    let direct = |s: usize| move |c: &Column| -> Option<(usize, usize)> { Some((s, c.index())) };
    for (l, r) in on {
        if let (Some(((0, li), 0)), Some(((1, ri), 0))) =
            (linear(l, &direct(0)), linear(r, &direct(1)))
            && is_event_time(&sides[0], li, event_time_columns)
            && is_event_time(&sides[1], ri, event_time_columns)
        {
            bounds.insert((li, ri), (Some(0), Some(0)));
        }
    }
    if let Some(f) = filter {
        let col = |c: &Column| -> Option<(usize, usize)> {
            let ci = f.column_indices().get(c.index())?;
            Some((if ci.side == JoinSide::Left { 0 } else { 1 }, ci.index))
        };
        for c in split_conjunction(f.expression()) {
            let any: &dyn std::any::Any = c.as_ref();
            let Some(b) = any.downcast_ref::<BinaryExpr>() else {
                continue;
            };
            let (Some(((sa, a), ca)), Some(((sb, b_), cb))) =
                (linear(b.left(), &col), linear(b.right(), &col))
            else {
                continue;
            };
            if sa == sb {
                continue;
            }
            // Normalise to `right.t - left.t  op  k`.
            // a + ca  op  b + cb   <=>   b - a  op'  ca - cb  (op mirrored)
            let (li, ri, k, op) = if sa == 0 {
                (a, b_, ca - cb, mirror(b.op()))
            } else {
                // right.a + ca op left.b + cb  <=>  a - b op cb - ca
                (b_, a, cb - ca, Some(*b.op()))
            };
            let Some(op) = op else { continue };
            if !(is_event_time(&sides[0], li, event_time_columns)
                && is_event_time(&sides[1], ri, event_time_columns))
            {
                continue;
            }
            let e = bounds.entry((li, ri)).or_default();
            match op {
                Operator::Lt | Operator::LtEq => e.1 = Some(e.1.map_or(k, |h| h.min(k))),
                Operator::Gt | Operator::GtEq => e.0 = Some(e.0.map_or(k, |l| l.max(k))),
                Operator::Eq => {
                    e.0 = Some(k);
                    e.1 = Some(k);
                }
                _ => {}
            }
        }
    }
    // The narrowest bound on which both ends are closed.
    let best = bounds
        .into_iter()
        .filter_map(|(cols, (lo, hi))| Some((cols, lo?, hi?)))
        .min_by_key(|(cols, lo, hi)| (hi - lo, *cols));
    match best {
        Some(((li, ri), lo, hi)) => (
            [
                Some((li, sides[0].field(li).name().clone())),
                Some((ri, sides[1].field(ri).name().clone())),
            ],
            Some((lo, hi)),
        ),
        None => ([None, None], None),
    }
}

/// For `x op y` rewritten as `y - x  op'  k`: `op'`.
fn mirror(op: &Operator) -> Option<Operator> {
    Some(match op {
        Operator::Lt => Operator::Gt,
        Operator::LtEq => Operator::GtEq,
        Operator::Gt => Operator::Lt,
        Operator::GtEq => Operator::LtEq,
        Operator::Eq => Operator::Eq,
        _ => return None,
    })
}

impl DisplayAs for StreamJoinExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "StreamJoinExec: operator={}, type={}, emit={}, keys=[{}], condition={}, state=state/{}/, watermark=query watermark, eviction={}",
            self.id,
            self.core.join_type,
            self.emit,
            self.key_text(),
            self.core
                .filter
                .as_ref()
                .map_or_else(|| "none".to_string(), |f| f.to_string()),
            self.id,
            self.core.eviction_text()
        )
    }
}

impl StreamJoinExec {
    fn key_text(&self) -> String {
        self.core
            .on
            .iter()
            .map(|(l, r)| format!("{l} = {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl ExecutionPlan for StreamJoinExec {
    fn name(&self) -> &str {
        "StreamJoinExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.left, &self.right]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::common::Result<TreeNodeRecursion>,
    ) -> datafusion::common::Result<TreeNodeRecursion> {
        let filter = self.core.filter.as_ref().map(|f| f.expression());
        for e in self.core.on.iter().flat_map(|(l, r)| [l, r]).chain(filter) {
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
        if children.len() != 2 {
            return Err(datafusion::error::DataFusionError::Internal(
                "StreamJoinExec takes two children".into(),
            ));
        }
        let right = children.pop().expect("two");
        let left = children.pop().expect("two");
        Ok(Arc::new(Self::build(
            self.id.clone(),
            left,
            right,
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
        run_once(
            "StreamJoinExec",
            partition,
            self.schema(),
            this.run(context),
        )
    }
}

impl StatefulExec for StreamJoinExec {
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
        format!("{} join [{}]", self.core.join_type, self.key_text())
    }

    fn has_late_rows(&self) -> bool {
        matches!(self.core.eviction, Eviction::Bound { .. })
    }

    fn input_schema(&self) -> SchemaRef {
        self.left.schema()
    }

    fn late_inputs(&self) -> Vec<Arc<dyn ExecutionPlan>> {
        vec![Arc::clone(&self.left), Arc::clone(&self.right)]
    }

    fn output_delay_ms(&self) -> i64 {
        StreamJoinExec::output_delay_ms(self)
    }
}
