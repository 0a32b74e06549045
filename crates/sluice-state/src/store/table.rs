//! One shard of a state store's rows, held as Arrow arrays.
//!
//! Rows live in record batches ("chunks") appended as they are put; a row is
//! addressed by its *slot*, its position counted across the chunks. Putting
//! a key that exists gives it a new slot in the chunk of the put and marks
//! the old slot dead, so no array is changed in place and values are never
//! converted to another format: an aggregate's merged states go in as the
//! arrays DataFusion's accumulators produced. Only keys are also kept as
//! arrow row bytes, which the hash index compares.
//!
//! - **Dirty tracking** is one number: the chunks appended since the last
//!   commit hold exactly the version's upserts (their live rows).
//! - **Compaction** happens at commits, when every row is clean: dead slots
//!   go once they outnumber the live ones, and the chunks after the first are
//!   merged once there are many, so both stay amortised O(rows changed).
//! - **The time index** (built the first time a store evicts by a key
//!   column's time, then kept as rows arrive) maps each time to its slots,
//!   so evicting everything up to a watermark touches only the rows evicted.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashbrown::HashTable;
use sluice_common::datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch,
};
use sluice_common::datafusion::arrow::compute::{cast, filter_record_batch, interleave};
use sluice_common::datafusion::arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
use sluice_common::{Error, Result};

/// Chunks past which the chunks after the first are merged at a commit
/// (a handful in unit tests, so that their small stores compact often).
const MAX_CHUNKS: usize = if cfg!(test) { 3 } else { 32 };

/// Dead slots below which a shard is not compacted for them.
const MIN_DEAD: usize = if cfg!(test) { 2 } else { 1024 };

/// A slot's place: its chunk and its row in the chunk.
pub(super) type Place = (usize, usize);

/// Chunks and places in them, for [`gather`].
pub(super) type Part<'a> = (&'a [RecordBatch], &'a [Place]);

/// Keys removed since the last commit, in the order removed: their key
/// columns (for the delta), and their row bytes and hashes (to tell at the
/// commit which are live again, without converting them again).
#[derive(Debug, Default)]
pub(super) struct Removed {
    keys: Vec<RecordBatch>,
    bytes: Vec<u8>,
    ends: Vec<usize>,
    hashes: Vec<u64>,
}

impl Removed {
    /// Notes one removed key (its columns follow through [`Self::keys`]).
    pub(super) fn note(&mut self, key: &[u8], hash: u64) {
        self.bytes.extend_from_slice(key);
        self.ends.push(self.bytes.len());
        self.hashes.push(hash);
    }

    /// Adds the key columns of keys noted, in the same order.
    pub(super) fn keys(&mut self, columns: RecordBatch) {
        if columns.num_rows() > 0 {
            self.keys.push(columns);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.hashes.len()
    }

    /// The `i`th removed key's row bytes and hash.
    pub(super) fn get(&self, i: usize) -> (&[u8], u64) {
        (key_of(&self.ends, &self.bytes, i as u32), self.hashes[i])
    }

    /// The key columns of every key noted, in order.
    pub(super) fn columns(&self) -> &[RecordBatch] {
        &self.keys
    }

    pub(super) fn clear(&mut self) {
        *self = Removed::default();
    }

    #[cfg(test)]
    pub(super) fn check(&self) {
        let rows: usize = self.keys.iter().map(|k| k.num_rows()).sum();
        assert_eq!(rows, self.len(), "removed key columns and row bytes");
    }
}

/// One shard: its chunks, the per-slot bookkeeping, and the index.
#[derive(Debug, Default)]
pub(super) struct Shard {
    chunks: Vec<RecordBatch>,
    /// The first slot of each chunk.
    starts: Vec<u32>,
    /// Per slot: whether the row is live (dead: replaced or removed).
    live: Vec<bool>,
    /// Per slot: the hash of its key.
    hashes: Vec<u64>,
    /// Per slot: where its key's row bytes end in `key_bytes`.
    key_ends: Vec<usize>,
    key_bytes: Vec<u8>,
    /// Live keys, as their slots, found by key hash.
    index: HashTable<u32>,
    live_rows: usize,
    /// Chunks from this one on were appended since the last commit.
    dirty_from: usize,
    time: Option<TimeIndex>,
    /// Bytes of the chunks' arrays.
    chunk_bytes: usize,
}

/// Slots by the time (ms) in one key column.
#[derive(Debug)]
struct TimeIndex {
    column: usize,
    slots: BTreeMap<i64, Vec<u32>>,
}

/// A column's values as milliseconds, the way watermarks compare them.
fn millis(column: &ArrayRef) -> Result<ArrayRef> {
    Ok(cast(
        column,
        &DataType::Timestamp(TimeUnit::Millisecond, None),
    )?)
}

impl TimeIndex {
    /// Adds the rows of `chunk` from slot `first`, those for which `live`.
    fn add(&mut self, chunk: &RecordBatch, first: u32, live: &[bool]) -> Result<()> {
        let ms = millis(chunk.column(self.column))?;
        let ms = ms.as_primitive::<TimestampMillisecondType>();
        for (i, is_live) in live.iter().enumerate().take(chunk.num_rows()) {
            if *is_live && ms.is_valid(i) {
                self.slots
                    .entry(ms.value(i))
                    .or_default()
                    .push(first + i as u32);
            }
        }
        Ok(())
    }
}

impl Shard {
    /// Live rows.
    pub(super) fn len(&self) -> usize {
        self.live_rows
    }

    /// Approximate bytes held: arrays, key bytes, per-slot bookkeeping and
    /// the index (dead rows count until compacted).
    pub(super) fn memory_bytes(&self) -> usize {
        self.chunk_bytes
            + self.key_bytes.capacity()
            + self.live.capacity()
            + (self.hashes.capacity() + self.key_ends.capacity()) * 8
            + self.index.allocation_size()
    }

    fn slots(&self) -> usize {
        self.live.len()
    }

    fn key(&self, slot: u32) -> &[u8] {
        key_of(&self.key_ends, &self.key_bytes, slot)
    }

    /// Where a slot's row is, for [`gather`].
    pub(super) fn place(&self, slot: u32) -> Place {
        let c = self.starts.partition_point(|&s| s <= slot) - 1;
        (c, (slot - self.starts[c]) as usize)
    }

    /// The slot of a live key.
    pub(super) fn find(&self, key: &[u8], hash: u64) -> Option<u32> {
        self.index.find(hash, |&s| same(self.key(s), key)).copied()
    }

    /// Appends `chunk` (the store's row layout), whose keys are `keys`
    /// (row bytes and hash, in row order): each key's row becomes its live
    /// row, and a row it had before goes dead. A key twice in the chunk
    /// keeps its last row.
    pub(super) fn upsert<'a>(
        &mut self,
        chunk: RecordBatch,
        keys: impl Iterator<Item = (&'a [u8], u64)>,
    ) -> Result<()> {
        let n = chunk.num_rows();
        if n == 0 {
            return Ok(());
        }
        let first = u32::try_from(self.slots())
            .ok()
            .filter(|f| f.checked_add(n as u32).is_some() && n <= u32::MAX as usize)
            .ok_or_else(|| Error::internal("a state shard holds more than 2^32 rows"))?;
        let Shard {
            live,
            hashes,
            key_ends,
            key_bytes,
            index,
            live_rows,
            ..
        } = self;
        live.reserve(n);
        hashes.reserve(n);
        key_ends.reserve(n);
        // Room for every key to be new: the table grows once, not by doubling.
        index.reserve(n, |&s| hashes[s as usize]);
        for (i, (key, hash)) in keys.enumerate() {
            let slot = first + i as u32;
            key_bytes.extend_from_slice(key);
            key_ends.push(key_bytes.len());
            hashes.push(hash);
            live.push(true);
            let entry = index.entry(
                hash,
                |&s| same(key_of(key_ends, key_bytes, s), key),
                |&s| hashes[s as usize],
            );
            match entry {
                hashbrown::hash_table::Entry::Occupied(mut e) => {
                    live[*e.get() as usize] = false;
                    *e.get_mut() = slot;
                }
                hashbrown::hash_table::Entry::Vacant(e) => {
                    e.insert(slot);
                    *live_rows += 1;
                }
            }
        }
        if live.len() != first as usize + n {
            return Err(Error::internal(format!(
                "a state chunk of {n} rows came with {} keys",
                live.len() - first as usize
            )));
        }
        if let Some(t) = &mut self.time {
            t.add(&chunk, first, &self.live[first as usize..])?;
        }
        self.chunk_bytes += chunk.get_array_memory_size();
        self.chunks.push(chunk);
        self.starts.push(first);
        Ok(())
    }

    /// Marks a live slot dead, noting its key as removed.
    fn remove_slot(&mut self, slot: u32, removed: &mut Removed) {
        if self.live[slot as usize] {
            removed.note(self.key(slot), self.hashes[slot as usize]);
            self.kill(slot);
        }
    }

    /// Marks a live slot dead, out of the index.
    pub(super) fn kill(&mut self, slot: u32) {
        let hash = self.hashes[slot as usize];
        if let Ok(e) = self.index.find_entry(hash, |&s| s == slot) {
            e.remove();
            self.live[slot as usize] = false;
            self.live_rows -= 1;
        }
    }

    /// The places of `slots`, for [`gather`].
    pub(super) fn places(&self, slots: &[u32]) -> Vec<Place> {
        slots.iter().map(|&s| self.place(s)).collect()
    }

    /// The chunks, for [`gather`] over [`Self::places`].
    pub(super) fn chunks(&self) -> &[RecordBatch] {
        &self.chunks
    }

    fn live_of(&self, c: usize) -> &[bool] {
        let start = self.starts[c] as usize;
        &self.live[start..start + self.chunks[c].num_rows()]
    }

    /// The live rows of chunk `c` (`None`: none is).
    fn live_chunk(&self, c: usize) -> Result<Option<RecordBatch>> {
        let live = self.live_of(c);
        let n = live.iter().filter(|l| **l).count();
        if n == 0 {
            return Ok(None);
        }
        if n == live.len() {
            return Ok(Some(self.chunks[c].clone()));
        }
        let mask = BooleanArray::from(live.to_vec());
        Ok(Some(filter_record_batch(&self.chunks[c], &mask)?))
    }

    /// Every live row, a batch per chunk that has any.
    pub(super) fn scan(&self) -> Result<Vec<RecordBatch>> {
        (0..self.chunks.len())
            .filter_map(|c| self.live_chunk(c).transpose())
            .collect()
    }

    /// The live rows put since the last commit, and how many.
    pub(super) fn dirty(&self) -> Result<Vec<RecordBatch>> {
        (self.dirty_from..self.chunks.len())
            .filter_map(|c| self.live_chunk(c).transpose())
            .collect()
    }

    /// How many live rows were put since the last commit.
    pub(super) fn dirty_rows(&self) -> usize {
        (self.dirty_from..self.chunks.len())
            .map(|c| self.live_of(c).iter().filter(|l| **l).count())
            .sum()
    }

    /// Removes the live rows for which `predicate` holds, returning them
    /// and noting their keys (the first `nk` columns) in `removed`. The
    /// predicate sees the live rows of one chunk at a time: all their
    /// columns, or with `keys_only` the keys alone.
    pub(super) fn remove_where(
        &mut self,
        predicate: &dyn Fn(&RecordBatch) -> Result<BooleanArray>,
        nk: usize,
        keys_only: bool,
        removed: &mut Removed,
    ) -> Result<Vec<RecordBatch>> {
        let key_columns: Vec<usize> = (0..nk).collect();
        let mut gone = Vec::new();
        for c in 0..self.chunks.len() {
            let Some(rows) = self.live_chunk(c)? else {
                continue;
            };
            let mask = if keys_only {
                predicate(&rows.project(&key_columns)?)?
            } else {
                predicate(&rows)?
            };
            if mask.len() != rows.num_rows() {
                return Err(Error::internal(format!(
                    "a state predicate gave {} values for {} rows",
                    mask.len(),
                    rows.num_rows()
                )));
            }
            if mask.true_count() == 0 {
                continue;
            }
            let start = self.starts[c];
            let live_slots: Vec<u32> = self
                .live_of(c)
                .iter()
                .enumerate()
                .filter(|(_, l)| **l)
                .map(|(i, _)| start + i as u32)
                .collect();
            for (slot, m) in live_slots.into_iter().zip(mask.iter()) {
                if m == Some(true) {
                    self.remove_slot(slot, removed);
                }
            }
            let rows = filter_record_batch(&rows, &mask)?;
            removed.keys(rows.project(&key_columns)?);
            gone.push(rows);
        }
        Ok(gone)
    }

    /// Removes the live rows whose key column `column`, as milliseconds, is
    /// at most `bound` (null never is), returning them: through the time
    /// index, so the work is that of the rows removed. Their keys are not
    /// noted as removed: the store records the bound instead, which a load
    /// applies the same way.
    pub(super) fn remove_until(
        &mut self,
        column: usize,
        bound: i64,
    ) -> Result<Option<RecordBatch>> {
        if self.time.as_ref().is_none_or(|t| t.column != column) {
            self.build_time_index(column)?;
        }
        let Some(t) = &mut self.time else {
            return Ok(None);
        };
        let due = match bound.checked_add(1) {
            Some(after) => {
                let later = t.slots.split_off(&after);
                std::mem::replace(&mut t.slots, later)
            }
            None => std::mem::take(&mut t.slots),
        };
        let mut slots: Vec<u32> = due
            .into_values()
            .flatten()
            .filter(|&s| self.live[s as usize])
            .collect();
        if slots.is_empty() {
            return Ok(None);
        }
        slots.sort_unstable();
        slots.dedup();
        let places = self.places(&slots);
        let rows = gather(&[(&self.chunks, &places)])?;
        for s in slots {
            self.kill(s);
        }
        Ok(rows)
    }

    fn build_time_index(&mut self, column: usize) -> Result<()> {
        let mut t = TimeIndex {
            column,
            slots: BTreeMap::new(),
        };
        for c in 0..self.chunks.len() {
            t.add(&self.chunks[c], self.starts[c], self.live_of(c))?;
        }
        self.time = Some(t);
        Ok(())
    }

    /// Everything put so far is committed (or loaded): called after a
    /// commit or a load, when a shard may also compact.
    pub(super) fn committed(&mut self) -> Result<()> {
        let dead = self.slots() - self.live_rows;
        if dead >= MIN_DEAD.max(self.live_rows) {
            self.compact_from(0)?;
        } else if self.chunks.len() > MAX_CHUNKS {
            self.compact_from(1)?;
        }
        self.dirty_from = self.chunks.len();
        Ok(())
    }

    /// Replaces chunks `c..` by one chunk of their live rows, renumbering
    /// their slots (the ones before stay).
    fn compact_from(&mut self, c: usize) -> Result<()> {
        if c >= self.chunks.len() {
            return Ok(());
        }
        let first = self.starts[c];
        let moved: Vec<u32> = (first..self.slots() as u32)
            .filter(|&s| self.live[s as usize])
            .collect();
        let places: Vec<Place> = moved
            .iter()
            .map(|&s| {
                let (chunk, row) = self.place(s);
                (chunk - c, row)
            })
            .collect();
        let merged = gather(&[(&self.chunks[c..], &places)])?;
        // Per-slot bookkeeping: the region's live slots, packed.
        let key_start = if first == 0 {
            0
        } else {
            self.key_ends[first as usize - 1]
        };
        let key_bytes = self.key_bytes[key_start..].to_vec();
        let region_ends: Vec<usize> = self.key_ends[first as usize..]
            .iter()
            .map(|e| e - key_start)
            .collect();
        let hashes: Vec<u64> = moved.iter().map(|&s| self.hashes[s as usize]).collect();
        self.key_bytes.truncate(key_start);
        self.key_ends.truncate(first as usize);
        self.hashes.truncate(first as usize);
        self.live.truncate(first as usize);
        for (i, &old) in moved.iter().enumerate() {
            let rel = (old - first) as usize;
            let begin = if rel == 0 { 0 } else { region_ends[rel - 1] };
            self.key_bytes
                .extend_from_slice(&key_bytes[begin..region_ends[rel]]);
            self.key_ends.push(self.key_bytes.len());
            self.hashes.push(hashes[i]);
            self.live.push(true);
            // Slots move down in increasing order, so no entry already
            // renumbered can hold an old slot still to be found.
            let new = first + i as u32;
            if let Some(s) = self.index.find_mut(hashes[i], |&s| s == old) {
                *s = new;
            }
        }
        self.key_bytes.shrink_to_fit();
        self.chunks.truncate(c);
        self.starts.truncate(c);
        if let Some(m) = merged {
            self.chunks.push(m);
            self.starts.push(first);
        }
        self.chunk_bytes = self.chunks.iter().map(|b| b.get_array_memory_size()).sum();
        self.live.shrink_to_fit();
        self.hashes.shrink_to_fit();
        self.key_ends.shrink_to_fit();
        if let Some(t) = &self.time {
            let column = t.column;
            self.build_time_index(column)?;
        }
        Ok(())
    }

    /// Checks the bookkeeping against the chunks (for tests).
    #[cfg(test)]
    pub(super) fn check(&self) {
        assert_eq!(self.live.len(), self.hashes.len());
        assert_eq!(self.live.len(), self.key_ends.len());
        let rows: usize = self.chunks.iter().map(|c| c.num_rows()).sum();
        assert_eq!(rows, self.live.len(), "slots and chunk rows");
        assert_eq!(self.index.len(), self.live_rows, "index and live rows");
        assert_eq!(
            self.live.iter().filter(|l| **l).count(),
            self.live_rows,
            "live flags and live rows"
        );
        for &s in self.index.iter() {
            assert!(self.live[s as usize], "the index holds a dead slot");
        }
    }
}

/// Whether two keys' row bytes are equal: word by word, as keys are short
/// and a call to `memcmp` costs more than comparing them.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut a8, mut b8) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in a8.by_ref().zip(b8.by_ref()) {
        if u64::from_ne_bytes(x.try_into().unwrap_or_default())
            != u64::from_ne_bytes(y.try_into().unwrap_or_default())
        {
            return false;
        }
    }
    a8.remainder() == b8.remainder()
}

fn key_of<'a>(ends: &[usize], bytes: &'a [u8], slot: u32) -> &'a [u8] {
    let s = slot as usize;
    let begin = if s == 0 { 0 } else { ends[s - 1] };
    &bytes[begin..ends[s]]
}

/// The rows at `places` of each `(chunks, places)` pair, in order, as one
/// batch (`None` when there are none).
pub(super) fn gather(parts: &[Part<'_>]) -> Result<Option<RecordBatch>> {
    let total: usize = parts.iter().map(|(_, p)| p.len()).sum();
    let Some(schema) = parts
        .iter()
        .find_map(|(c, _)| c.first())
        .map(|b| b.schema())
    else {
        return Ok(None);
    };
    if total == 0 {
        return Ok(None);
    }
    // One list of chunks across the parts, places renumbered into it.
    let mut all: Vec<&RecordBatch> = Vec::new();
    let mut indices: Vec<(usize, usize)> = Vec::with_capacity(total);
    for (chunks, places) in parts {
        let base = all.len();
        all.extend(chunks.iter());
        indices.extend(places.iter().map(|(c, r)| (base + c, *r)));
    }
    let columns = (0..schema.fields().len())
        .map(|i| {
            let arrays: Vec<&dyn Array> = all.iter().map(|b| b.column(i).as_ref()).collect();
            Ok(interleave(&arrays, &indices)?)
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    Ok(Some(RecordBatch::try_new(Arc::clone(&schema), columns)?))
}
