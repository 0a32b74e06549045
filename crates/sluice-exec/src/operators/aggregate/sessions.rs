//! Session windows: a batch's sessions merge with the stored sessions of
//! the same key that they overlap or touch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};
use sluice_common::Result;
use sluice_state::store::StateStore;

use super::AggregateCore;

impl AggregateCore {
    /// Session windows: gives the batch's sessions and the stored sessions
    /// of the same keys the bounds of the merged sessions they fall in (two
    /// sessions merge when one starts at or before the other's end: touching sessions merge, as in Spark and Flink), and takes
    /// those stored sessions out of the store — they come back merged.
    /// Also gives those stored sessions as they were (their old bounds):
    /// a changelog retracts them.
    pub(super) fn merge_sessions(
        &self,
        store: &mut StateStore,
        partial: RecordBatch,
        ws: usize,
        we: usize,
    ) -> Result<(RecordBatch, RecordBatch, RecordBatch)> {
        let others: Vec<usize> = (0..self.n_keys).filter(|i| *i != ws && *i != we).collect();
        // No other keys: every session shares one (constant) key.
        let fields: Vec<SortField> = if others.is_empty() {
            vec![SortField::new(DataType::Boolean)]
        } else {
            others
                .iter()
                .map(|i| SortField::new(self.partial_schema.field(*i).data_type().clone()))
                .collect()
        };
        let conv = RowConverter::new(fields)?;
        let key_rows = |b: &RecordBatch| {
            let cols: Vec<ArrayRef> = if others.is_empty() {
                vec![Arc::new(BooleanArray::from(vec![true; b.num_rows()]))]
            } else {
                others.iter().map(|i| Arc::clone(b.column(*i))).collect()
            };
            conv.convert_columns(&cols)
        };
        let p_keys = key_rows(&partial)?;
        let wanted: HashSet<_> = (0..partial.num_rows())
            .map(|i| p_keys.row(i).owned())
            .collect();
        let all = self.state_rows(&store.scan()?)?;
        let a_keys = key_rows(&all)?;
        let take: BooleanArray = (0..all.num_rows())
            .map(|i| Some(wanted.contains(&a_keys.row(i).owned())))
            .collect();
        let stored = filter_record_batch(&all, &take)?;
        let s_keys = key_rows(&stored)?;

        let bounds = |b: &RecordBatch, i: usize| -> Result<Int64Array> {
            Ok(cast(b.column(i), &DataType::Int64)?
                .as_primitive::<Int64Type>()
                .clone())
        };
        let (ss, se, ps, pe) = (
            bounds(&stored, ws)?,
            bounds(&stored, we)?,
            bounds(&partial, ws)?,
            bounds(&partial, we)?,
        );
        // Per key, every session (from the store: side 0, from the batch: side 1).
        let mut groups: HashMap<OwnedRow, Vec<(i64, i64, usize, usize)>> = HashMap::new();
        for (side, keys, s, e) in [(0, &s_keys, &ss, &se), (1, &p_keys, &ps, &pe)] {
            for i in 0..s.len() {
                if s.is_valid(i) && e.is_valid(i) {
                    groups.entry(keys.row(i).owned()).or_default().push((
                        s.value(i),
                        e.value(i),
                        side,
                        i,
                    ));
                }
            }
        }
        let mut new_bounds: [Vec<Option<(i64, i64)>>; 2] =
            [vec![None; ss.len()], vec![None; ps.len()]];
        for sessions in groups.values_mut() {
            sessions.sort();
            // Only a run of sessions that the batch touches changes: a
            // stored session no batch session reaches stays as it is.
            let mut run: Vec<(usize, usize)> = Vec::new();
            let (mut lo, mut hi) = (sessions[0].0, sessions[0].1);
            for &(s, e, side, i) in sessions.iter() {
                if s > hi && !run.is_empty() {
                    close_run(&mut run, (lo, hi), &mut new_bounds);
                    lo = s;
                    hi = e;
                }
                hi = hi.max(e);
                run.push((side, i));
            }
            close_run(&mut run, (lo, hi), &mut new_bounds);
        }
        let rebuild = |b: &RecordBatch,
                       nb: &[Option<(i64, i64)>],
                       s: &Int64Array,
                       e: &Int64Array|
         -> Result<RecordBatch> {
            let starts: Int64Array = (0..b.num_rows())
                .map(|i| nb[i].map(|x| x.0).or(s.is_valid(i).then(|| s.value(i))))
                .collect();
            let ends: Int64Array = (0..b.num_rows())
                .map(|i| nb[i].map(|x| x.1).or(e.is_valid(i).then(|| e.value(i))))
                .collect();
            let mut cols = b.columns().to_vec();
            cols[ws] = cast(&starts, b.column(ws).data_type())?;
            cols[we] = cast(&ends, b.column(we).data_type())?;
            Ok(RecordBatch::try_new(
                Arc::clone(&self.partial_schema),
                cols,
            )?)
        };
        // The stored sessions that take part: those in a run with the batch's.
        let involved: BooleanArray = new_bounds[0].iter().map(|b| Some(b.is_some())).collect();
        let stored = filter_record_batch(&stored, &involved)?;
        let (ss, se) = (bounds(&stored, ws)?, bounds(&stored, we)?);
        let kept: Vec<Option<(i64, i64)>> = new_bounds[0]
            .iter()
            .filter(|b| b.is_some())
            .copied()
            .collect();
        new_bounds[0] = kept;
        let stored_new = rebuild(&stored, &new_bounds[0], &ss, &se)?;
        let partial_new = rebuild(&partial, &new_bounds[1], &ps, &pe)?;
        // The stored sessions that took part leave the store; merged, they return.
        let full = RowConverter::new(
            (0..self.n_keys)
                .map(|i| SortField::new(self.partial_schema.field(i).data_type().clone()))
                .collect(),
        )?;
        let gone_rows = full.convert_columns(&stored.columns()[..self.n_keys])?;
        let gone: HashSet<OwnedRow> = (0..stored.num_rows())
            .map(|i| gone_rows.row(i).owned())
            .collect();
        if !gone.is_empty() {
            let n_keys = self.n_keys;
            store.remove_where(|live| {
                let keys = full.convert_columns(&live.columns()[..n_keys])?;
                Ok((0..live.num_rows())
                    .map(|i| Some(gone.contains(&keys.row(i).owned())))
                    .collect())
            })?;
        }
        Ok((stored_new, partial_new, stored))
    }
}

/// Gives every session of a finished run the run's bounds, if a session of
/// the batch (side 1) is among them; a run of stored sessions alone is left
/// untouched.
fn close_run(
    run: &mut Vec<(usize, usize)>,
    bounds: (i64, i64),
    new_bounds: &mut [Vec<Option<(i64, i64)>>; 2],
) {
    if run.iter().any(|(side, _)| *side == 1) {
        for &(side, i) in run.iter() {
            new_bounds[side][i] = Some(bounds);
        }
    }
    run.clear();
}
