//! The versioned state store of stateful operators.
//!
//! One [`StateStore`] holds one operator's state: rows of *key* columns
//! (group key, window) and *value* columns (aggregate accumulator states),
//! held in memory as Arrow record batches in P hash shards, with a hash
//! index over the keys and a time index for eviction (see `table.rs`:
//! nothing is converted to a row format but the keys). It is versioned by batch
//! id: [`StateStore::commit`] makes the changes since the last commit version
//! N and writes one delta of upserted and removed keys — and every K versions
//! a full snapshot — as checksummed Arrow IPC files:
//!
//! ```text
//! state/<operator>/<N>.delta
//! state/<operator>/<N>.snapshot
//! ```
//!
//! (Checkpoints written before kept a directory per partition,
//! `state/<operator>/<partition>/<N>.delta`; they still load, and the query
//! that owns one converts it to a snapshot of its version the first time it
//! loads it.)
//!
//! [`StateStore::load`] rebuilds any retained version from the newest snapshot
//! at or before it plus the deltas after it. A batch re-run after a crash
//! loads version N-1 and commits N again, so a crash between the state commit
//! and the commit-log entry never applies a batch twice.
//!
//! The decisions (which files make up a version, which files retention may
//! delete) are pure functions in [`plan`], tested without a disk.
//!
//! The stateful operators (`sluice-exec`) are its users; `<dir>/meta` records
//! the shard count and row schema, so a state directory can be read on
//! its own ([`read_state`]) and a mismatched query is refused.

pub mod plan;
mod table;

use std::fs;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_common::datafusion::arrow::array::{
    ArrayRef, BooleanArray, RecordBatch, UInt32Array, new_null_array,
};
use sluice_common::datafusion::arrow::compute::{
    concat_batches, filter_record_batch, take_record_batch,
};
use sluice_common::datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use sluice_common::datafusion::arrow::ipc::reader::StreamReader;
use sluice_common::datafusion::arrow::ipc::writer::StreamWriter;
use sluice_common::datafusion::arrow::row::{RowConverter, Rows, SortField};
use sluice_common::durable::{self, Durability};
use sluice_common::{BatchId, Error, Result};

use plan::{FileKind, StateFile};
use table::{Removed, Shard};

/// How a state store writes and keeps its files.
#[derive(Debug, Clone, Copy)]
pub struct StateStoreOptions {
    /// Number of hash partitions (fixed for the life of a checkpoint).
    pub partitions: usize,
    /// A snapshot every this many versions.
    pub snapshot_interval: u64,
    /// How many versions stay loadable.
    pub retain_versions: u64,
    /// Whether files are fsynced.
    pub durability: Durability,
    /// When a snapshot is unreadable, rebuild its version from an older
    /// snapshot and the deltas after it (every version writes a delta, so
    /// nothing is lost while they are retained) instead of failing.
    pub snapshot_fallback: bool,
    /// After a commit, prepare the next version's delta file ahead (with
    /// fsync: zeros to be written over in place). Off where several
    /// processes may write one version (a cluster's retried tasks): every
    /// delta is then written whole to a temporary file and renamed, so any
    /// attempt's file is a complete one.
    pub prepare_next: bool,
}

impl Default for StateStoreOptions {
    fn default() -> Self {
        StateStoreOptions {
            partitions: 4,
            snapshot_interval: 10,
            retain_versions: 20,
            durability: Durability::Fsync,
            snapshot_fallback: false,
            prepare_next: true,
        }
    }
}

/// What a commit changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Keys live after the commit.
    pub rows: u64,
    /// Keys inserted or updated by this version.
    pub updated: u64,
    /// Keys removed by this version.
    pub removed: u64,
    /// Bytes written to disk by this commit.
    pub bytes_written: u64,
}

type Hasher = foldhash::fast::RandomState;

/// One operator's keyed, versioned state.
#[derive(Debug)]
pub struct StateStore {
    dir: Option<PathBuf>,
    options: StateStoreOptions,
    key_schema: SchemaRef,
    value_schema: SchemaRef,
    /// Keys then values, as the store hands rows out.
    row_schema: SchemaRef,
    /// The same columns, all nullable: how rows are held (a delta's
    /// removed keys carry null values).
    chunk_schema: SchemaRef,
    /// Key columns to row bytes, which the index hashes and compares.
    keys: RowConverter,
    hasher: Hasher,
    shards: Vec<Shard>,
    /// Keys removed since the last commit (may repeat, and may have been
    /// put again since).
    removed: Removed,
    /// Evictions since the last commit: per key column, the largest bound
    /// rows were removed up to ([`StateStore::remove_keys_until`]), and the
    /// rows they removed. A delta records the bounds, not the keys.
    evicted: Vec<(usize, i64)>,
    evicted_rows: u64,
    version: Option<BatchId>,
    /// The background work after a commit, if running: removing files past
    /// retention and preparing the next version's delta file (created and,
    /// when fsynced, filled with zeros and synced with its directory); it
    /// returns that version when the file is ready.
    cleanup: Background,
    /// The version whose delta file is prepared (see [`durable::prepare_zeroed`]):
    /// its commit writes the delta in place, with no new directory entry
    /// on the batch's path (and, when fsynced, one `fdatasync`).
    prepared: Option<BatchId>,
    /// See [`StateStore::fallbacks`].
    fallbacks: Vec<String>,
    /// Whether loading a directory of the older layout (a directory per
    /// partition) converts it: only the query that owns the checkpoint
    /// does, never a reader.
    convert_partitioned: bool,
}

impl Drop for StateStore {
    /// Waits for the background work, so that a store dropped and reopened
    /// in the same process never races its predecessor's thread.
    fn drop(&mut self) {
        self.wait_cleanup();
        self.cleanup.stop();
    }
}

/// A job of the background thread: it returns the version whose delta
/// file it prepared, if it did.
type Job = Box<dyn FnOnce() -> Option<BatchId> + Send>;

/// A store's background thread, started with its first job and kept for
/// the next ones (a thread per commit cost a spawn and an exit on every
/// batch). One job runs at a time.
#[derive(Debug, Default)]
struct Background {
    worker: Option<Worker>,
    /// Whether a job was sent whose result is not taken yet.
    running: bool,
}

#[derive(Debug)]
struct Worker {
    jobs: std::sync::mpsc::Sender<Job>,
    done: std::sync::mpsc::Receiver<Option<BatchId>>,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    fn spawn() -> Worker {
        let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
        let (report, done) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            for job in inbox {
                if report.send(job()).is_err() {
                    break;
                }
            }
        });
        Worker { jobs, done, thread }
    }
}

impl Background {
    /// Runs `job` on the thread, started if need be (again, if a job
    /// panicked and took it down). The previous job's result must have been
    /// taken.
    fn start(&mut self, mut job: Job) {
        for _ in 0..2 {
            let worker = self.worker.get_or_insert_with(Worker::spawn);
            match worker.jobs.send(job) {
                Ok(()) => {
                    self.running = true;
                    return;
                }
                Err(std::sync::mpsc::SendError(back)) => {
                    self.worker = None;
                    job = back;
                }
            }
        }
        // A new thread always takes a job; were it not to, the cleanup is
        // skipped (best effort) and no delta file is prepared.
    }

    /// The running job's result, once it is done: `None` if no job runs,
    /// `Some(None)` if it prepared nothing or panicked.
    fn wait(&mut self) -> Option<Option<BatchId>> {
        if !std::mem::take(&mut self.running) {
            return None;
        }
        let worker = self.worker.as_ref()?;
        match worker.done.recv() {
            Ok(result) => Some(result),
            Err(_) => {
                self.worker = None;
                Some(None)
            }
        }
    }

    /// Ends the thread (after its job).
    fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            drop(w.jobs);
            let _ = w.thread.join();
        }
    }
}

/// From how many rows a commit without fsync writes its files in parallel,
/// and a put spreads its shards over threads.
const PARALLEL_WRITE_ROWS: usize = 8192;

/// Deltas up to this size are written over zeros prepared ahead (see
/// [`durable::prepare_zeroed`]); larger ones into an empty prepared file,
/// where writing the zeros first would cost more disk than it saves.
const MAX_PREPARED_ZEROS: u64 = 256 * 1024;

/// How many zeros to prepare the next delta with, after one of `last` bytes:
/// room for half as much again, in 4 KiB blocks.
fn prepared_zeros(last: u64) -> usize {
    if last > MAX_PREPARED_ZEROS {
        return 0;
    }
    ((last + last / 2).max(1)).div_ceil(4096) as usize * 4096
}

/// The key of a delta's schema metadata that lists its evictions: a JSON
/// array of `[key column, bound]` pairs, each removing (before the delta's
/// rows are applied) every row whose key column, in milliseconds, is at
/// most the bound.
const EVICTED: &str = "sluice.evicted_until";

/// The column a delta file uses to mark removed keys.
const DELETED: &str = "_deleted";

/// Row bytes and hashes of a batch's keys.
struct Keys {
    rows: Rows,
    hashes: Vec<u64>,
}

impl Keys {
    fn get(&self, i: usize) -> (&[u8], u64) {
        (self.rows.row(i).data(), self.hashes[i])
    }
}

impl StateStore {
    /// A store for rows of `key_schema` + `value_schema`, kept under `dir`
    /// (`None`: in memory only, for tests and for queries without a checkpoint).
    pub fn new(
        dir: Option<PathBuf>,
        key_schema: SchemaRef,
        value_schema: SchemaRef,
        options: StateStoreOptions,
    ) -> Result<Self> {
        let keys = RowConverter::new(
            key_schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )
        .map_err(|e| {
            Error::plan(format!(
                "state keys of type {key_schema} cannot be stored: {e}"
            ))
        })?;
        if options.partitions == 0 {
            return Err(Error::plan("a state store needs at least one partition"));
        }
        let row_schema = row_schema_of(&key_schema, &value_schema);
        if let Some(dir) = &dir {
            check_or_write_meta(dir, &row_schema, key_schema.fields().len(), options)?;
        }
        let fields: Vec<Field> = row_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let nullable: Vec<Field> = fields
            .iter()
            .map(|f| f.clone().with_nullable(true))
            .collect();
        Ok(StateStore {
            keys,
            hasher: Hasher::default(),
            dir,
            shards: (0..options.partitions).map(|_| Shard::default()).collect(),
            removed: Removed::default(),
            evicted: Vec::new(),
            evicted_rows: 0,
            options,
            key_schema,
            value_schema,
            row_schema,
            chunk_schema: Arc::new(Schema::new(nullable)),
            version: None,
            cleanup: Background::default(),
            prepared: None,
            fallbacks: Vec::new(),
            convert_partitioned: true,
        })
    }

    /// The version the store holds (`None`: empty, before version 0).
    pub fn version(&self) -> Option<BatchId> {
        self.version
    }

    /// Live keys.
    pub fn len(&self) -> usize {
        self.shards.iter().map(Shard::len).sum()
    }

    /// Whether no key is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate bytes held in memory: the rows' arrays (replaced rows
    /// count until compacted), the keys' row bytes and the index, counted as
    /// they change (no walk over the state).
    pub fn memory_bytes(&self) -> usize {
        self.shards.iter().map(Shard::memory_bytes).sum()
    }

    fn key_count(&self) -> usize {
        self.key_schema.fields().len()
    }

    fn shard_of(&self, hash: u64) -> usize {
        // Bits the index's own use of the hash leaves alone (hashbrown
        // takes the lowest for the bucket and the top seven as a tag).
        ((hash >> 32) & 0xffff) as usize % self.shards.len()
    }

    fn check(&self, batch: &RecordBatch, what: &str) -> Result<()> {
        let expected = self.key_count()
            + if what == "put" {
                self.value_schema.fields().len()
            } else {
                0
            };
        if batch.num_columns() != expected {
            return Err(Error::internal(format!(
                "state {what}: {} columns given, {expected} expected",
                batch.num_columns()
            )));
        }
        Ok(())
    }

    fn key_rows(&self, keys: &[ArrayRef]) -> Result<Keys> {
        let rows = self.keys.convert_columns(keys)?;
        let hashes = (0..rows.num_rows())
            .map(|i| self.hasher.hash_one(rows.row(i).data()))
            .collect();
        Ok(Keys { rows, hashes })
    }

    /// Inserts or replaces rows: key columns first, then value columns.
    pub fn put(&mut self, batch: &RecordBatch) -> Result<()> {
        self.check(batch, "put")?;
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let batch = RecordBatch::try_new(Arc::clone(&self.chunk_schema), batch.columns().to_vec())
            .map_err(|e| Error::internal(format!("state put: {e}")))?;
        let keys = self.key_rows(&batch.columns()[..self.key_count()])?;
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.shards.len()];
        for (i, h) in keys.hashes.iter().enumerate() {
            rows[self.shard_of(*h)].push(i as u32);
        }
        let put = |shard: &mut Shard, rows: &[u32]| -> Result<()> {
            if rows.is_empty() {
                return Ok(());
            }
            // Always a copy, even of every row: the batch put may be a
            // slice of a much larger one, which a chunk must not keep alive.
            let chunk = take_record_batch(&batch, &UInt32Array::from(rows.to_vec()))?;
            shard.upsert(chunk, rows.iter().map(|&i| keys.get(i as usize)))
        };
        let threads = sluice_common::cores().min(self.shards.len());
        if n < PARALLEL_WRITE_ROWS || threads < 2 {
            for (shard, rows) in self.shards.iter_mut().zip(&rows) {
                put(shard, rows)?;
            }
            return Ok(());
        }
        // Large puts: the shards split over the cores.
        let per = self.shards.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .shards
                .chunks_mut(per)
                .zip(rows.chunks(per))
                .map(|(shards, rows)| {
                    scope
                        .spawn(move || shards.iter_mut().zip(rows).try_for_each(|(s, r)| put(s, r)))
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::internal("a state put thread panicked")))
            })
        })
    }

    /// The stored rows (keys, then values) of the given keys that exist, in
    /// the order given, each once.
    pub fn get(&self, keys: &[ArrayRef]) -> Result<RecordBatch> {
        let k = self.key_rows(keys)?;
        let mut places: Vec<Vec<table::Place>> = vec![Vec::new(); self.shards.len()];
        let mut order: Vec<(usize, usize)> = Vec::new();
        let mut seen: std::collections::HashSet<(usize, u32), Hasher> = Default::default();
        for i in 0..k.hashes.len() {
            let (key, hash) = k.get(i);
            let s = self.shard_of(hash);
            if let Some(slot) = self.shards[s].find(key, hash)
                && seen.insert((s, slot))
            {
                order.push((s, places[s].len()));
                places[s].push(self.shards[s].place(slot));
            }
        }
        // Gathered shard by shard, then put back in the order asked for.
        let parts: Vec<table::Part<'_>> = self
            .shards
            .iter()
            .zip(&places)
            .map(|(s, p)| (s.chunks(), p.as_slice()))
            .collect();
        let Some(rows) = table::gather(&parts)? else {
            return Ok(RecordBatch::new_empty(self.row_schema()));
        };
        let mut base = vec![0; self.shards.len()];
        for s in 1..self.shards.len() {
            base[s] = base[s - 1] + places[s - 1].len();
        }
        let ordered: UInt32Array = order.iter().map(|(s, i)| (base[*s] + i) as u32).collect();
        let rows = take_record_batch(&rows, &ordered)?;
        self.out(rows)
    }

    /// Rows held (all-nullable columns) as the store hands them out.
    fn out(&self, rows: RecordBatch) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            self.row_schema(),
            rows.columns().to_vec(),
        )?)
    }

    fn out_all(&self, parts: Vec<RecordBatch>) -> Result<RecordBatch> {
        let all = concat_batches(&self.chunk_schema, &parts)?;
        self.out(all)
    }

    /// Removes the given keys (those that exist), touching nothing else:
    /// O(keys given), however large the state. Returns how many existed.
    pub fn remove(&mut self, keys: &[ArrayRef]) -> Result<usize> {
        if keys.first().is_none_or(|k| k.is_empty()) {
            return Ok(0);
        }
        let k = self.key_rows(keys)?;
        let mut hit = Vec::with_capacity(k.hashes.len());
        for i in 0..k.hashes.len() {
            let (key, hash) = k.get(i);
            let s = self.shard_of(hash);
            let slot = self.shards[s].find(key, hash);
            if let Some(slot) = slot {
                self.shards[s].kill(slot);
                self.removed.note(key, hash);
            }
            hit.push(slot.is_some());
        }
        let removed = hit.iter().filter(|h| **h).count();
        if removed > 0 {
            let nk = self.key_count();
            let key_schema = Arc::new(Schema::new(self.chunk_schema.fields()[..nk].to_vec()));
            let batch = RecordBatch::try_new(key_schema, keys.to_vec())
                .map_err(|e| Error::internal(format!("state remove: {e}")))?;
            self.removed
                .keys(filter_record_batch(&batch, &BooleanArray::from(hit))?);
        }
        Ok(removed)
    }

    /// Removes the rows for which `predicate` (over a batch of live rows:
    /// key columns, then value columns) is true, returning them. The
    /// predicate may be called on several batches (it must judge each row
    /// by itself).
    pub fn remove_where(
        &mut self,
        predicate: impl Fn(&RecordBatch) -> Result<BooleanArray>,
    ) -> Result<RecordBatch> {
        self.remove_matching(&predicate, false)
    }

    /// Removes the rows whose keys `predicate` (over a batch of live keys
    /// alone) marks, returning them (keys, then values).
    pub fn remove_keys_where(
        &mut self,
        predicate: impl Fn(&RecordBatch) -> Result<BooleanArray>,
    ) -> Result<RecordBatch> {
        self.remove_matching(&predicate, true)
    }

    fn remove_matching(
        &mut self,
        predicate: &dyn Fn(&RecordBatch) -> Result<BooleanArray>,
        keys_only: bool,
    ) -> Result<RecordBatch> {
        let nk = self.key_count();
        let mut gone = Vec::new();
        for shard in &mut self.shards {
            gone.extend(shard.remove_where(predicate, nk, keys_only, &mut self.removed)?);
        }
        self.out_all(gone)
    }

    /// Removes the rows whose key column `column` (a time: a timestamp or
    /// milliseconds) is at most `bound` ms, returning them: the rows of the
    /// windows a watermark closes. Through a time index kept as rows
    /// arrive, so it costs the rows removed, not the rows held.
    pub fn remove_keys_until(&mut self, column: usize, bound: i64) -> Result<RecordBatch> {
        if column >= self.key_count() {
            return Err(Error::internal(format!(
                "state eviction by key column {column} of {}",
                self.key_count()
            )));
        }
        let gone = self.evict(column, bound)?;
        self.evicted_rows += gone.iter().map(|b| b.num_rows() as u64).sum::<u64>();
        match self.evicted.iter_mut().find(|(c, _)| *c == column) {
            Some((_, b)) => *b = (*b).max(bound),
            None => self.evicted.push((column, bound)),
        }
        self.out_all(gone)
    }

    /// The rows of every shard that [`Self::remove_keys_until`] removes, gone.
    fn evict(&mut self, column: usize, bound: i64) -> Result<Vec<RecordBatch>> {
        let mut gone = Vec::new();
        for shard in &mut self.shards {
            gone.extend(shard.remove_until(column, bound)?);
        }
        Ok(gone)
    }

    /// Every live row (keys, then values).
    pub fn scan(&self) -> Result<RecordBatch> {
        let mut parts = Vec::new();
        for s in &self.shards {
            parts.extend(s.scan()?);
        }
        self.out_all(parts)
    }

    /// The schema of [`StateStore::scan`]: key columns, then value columns.
    pub fn row_schema(&self) -> SchemaRef {
        Arc::clone(&self.row_schema)
    }

    /// The keys removed since the last commit that are not live again,
    /// each once.
    fn removed_keys(&self) -> Result<Option<RecordBatch>> {
        let removed = &self.removed;
        if removed.len() == 0 {
            return Ok(None);
        }
        let mut seen: hashbrown::HashTable<usize> = hashbrown::HashTable::new();
        let keep: BooleanArray = (0..removed.len())
            .map(|i| {
                let (key, hash) = removed.get(i);
                if self.shards[self.shard_of(hash)].find(key, hash).is_some() {
                    return Some(false);
                }
                let first =
                    match seen.entry(hash, |&j| removed.get(j).0 == key, |&j| removed.get(j).1) {
                        hashbrown::hash_table::Entry::Occupied(_) => false,
                        hashbrown::hash_table::Entry::Vacant(e) => {
                            e.insert(i);
                            true
                        }
                    };
                Some(first)
            })
            .collect();
        if keep.true_count() == 0 {
            return Ok(None);
        }
        let columns = removed.columns();
        let all = concat_batches(&columns[0].schema(), columns)?;
        Ok(Some(filter_record_batch(&all, &keep)?))
    }

    /// A delta: the rows put since the last commit, then the keys removed
    /// (null values), with the `_deleted` mark.
    fn delta(
        &self,
        upserts: Vec<RecordBatch>,
        removed: Option<RecordBatch>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let mut fields: Vec<Field> = self
            .chunk_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(DELETED, DataType::Boolean, false));
        let mut schema = Schema::new(fields);
        if !self.evicted.is_empty() {
            let bounds = serde_json::to_string(&self.evicted)
                .map_err(|e| Error::internal(format!("state evictions: {e}")))?;
            schema = schema.with_metadata([(EVICTED.to_string(), bounds)].into());
        }
        let schema = Arc::new(schema);
        let mark = |b: &RecordBatch, deleted: bool| {
            let mut cols = b.columns().to_vec();
            cols.push(Arc::new(BooleanArray::from(vec![deleted; b.num_rows()])) as ArrayRef);
            RecordBatch::try_new(Arc::clone(&schema), cols)
        };
        let mut parts = upserts
            .iter()
            .map(|b| mark(b, false))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if let Some(keys) = removed {
            let n = keys.num_rows();
            let mut cols = keys.columns().to_vec();
            cols.extend(
                self.value_schema
                    .fields()
                    .iter()
                    .map(|f| new_null_array(f.data_type(), n)),
            );
            cols.push(Arc::new(BooleanArray::from(vec![true; n])));
            parts.push(RecordBatch::try_new(Arc::clone(&schema), cols)?);
        }
        Ok((schema, parts))
    }

    /// Makes the changes since the last commit version `version`, writing
    /// one delta of every shard's changes (and a snapshot every K versions).
    pub fn commit(&mut self, version: BatchId) -> Result<CommitStats> {
        if let Some(v) = self.version
            && version <= v
        {
            return Err(Error::internal(format!(
                "state version {version} committed after {v}"
            )));
        }
        let mut stats = CommitStats::default();
        self.wait_cleanup();
        let in_place = self.prepared.take() == Some(version);
        let snapshot = plan::is_snapshot_version(version, self.options.snapshot_interval);
        let removed = self.removed_keys()?;
        stats.removed = removed.as_ref().map_or(0, |r| r.num_rows() as u64) + self.evicted_rows;
        // (path, schema, rows, whether written in place into a prepared file)
        let mut files: Vec<(PathBuf, SchemaRef, Vec<RecordBatch>, bool)> = Vec::new();
        if let Some(dir) = self.dir.clone() {
            let mut upserts = Vec::new();
            for s in &self.shards {
                upserts.extend(s.dirty()?);
            }
            stats.updated = upserts.iter().map(|b| b.num_rows() as u64).sum();
            let name = |kind| StateFile { version, kind }.name();
            // A delta is written even when empty, so that every version has
            // its file and loading can tell a gap from an idle version.
            let (schema, delta) = self.delta(upserts, removed)?;
            files.push((dir.join(name(FileKind::Delta)), schema, delta, in_place));
            if snapshot {
                let mut all = Vec::new();
                for s in &self.shards {
                    all.extend(s.scan()?);
                }
                let path = dir.join(name(FileKind::Snapshot));
                files.push((path, Arc::clone(&self.chunk_schema), all, false));
            }
        } else {
            stats.updated = self.shards.iter().map(|s| s.dirty_rows() as u64).sum();
        }
        // A delta and a snapshot are written in parallel, so their fsyncs
        // and their encoding overlap; a small commit without fsync is
        // written in turn, as a thread would cost more than its write.
        let durability = self.options.durability;
        let rows: usize = files
            .iter()
            .flat_map(|(_, _, b, _)| b.iter().map(RecordBatch::num_rows))
            .sum();
        let written: Vec<Result<u64>> = if files.len() < 2
            || (durability == Durability::NoSync && rows < PARALLEL_WRITE_ROWS)
        {
            files
                .iter()
                .map(|(path, schema, batches, in_place)| {
                    write_ipc(path, schema, batches, durability, *in_place)
                })
                .collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = files
                    .iter()
                    .map(|(path, schema, batches, in_place)| {
                        scope.spawn(move || write_ipc(path, schema, batches, durability, *in_place))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(Error::internal("a state writer thread panicked"))
                        })
                    })
                    .collect()
            })
        };
        // The delta is the first file written.
        let mut delta_bytes = 0;
        for (i, w) in written.into_iter().enumerate() {
            let n = w?;
            if i == 0 {
                delta_bytes = n;
            }
            stats.bytes_written += n;
        }
        for s in &mut self.shards {
            s.committed()?;
        }
        self.removed.clear();
        self.evicted.clear();
        self.evicted_rows = 0;
        stats.rows = self.len() as u64;
        self.version = Some(version);
        if let Some(dir) = &self.dir {
            self.start_cleanup(dir.clone(), version, delta_bytes);
        }
        Ok(stats)
    }

    /// Removes, off the batch's path, the files no retained version needs,
    /// and prepares the delta file of the next version; the previous
    /// cleanup is waited for first, so at most one runs.
    /// The next delta is prepared with room for one half larger than
    /// `delta_bytes`, this version's.
    fn start_cleanup(&mut self, dir: PathBuf, version: BatchId, delta_bytes: u64) {
        self.wait_cleanup();
        let oldest = version.saturating_sub(self.options.retain_versions.saturating_sub(1));
        let durability = self.options.durability;
        let next = version + 1;
        let zeros = prepared_zeros(delta_bytes);
        let prepare = self.options.prepare_next;
        self.cleanup.start(Box::new(move || {
            if !prepare {
                cleanup(&dir, oldest);
                return None;
            }
            // A failed preparation only means the next delta is written
            // the usual way (temporary file, rename, directory sync).
            let name = StateFile {
                version: next,
                kind: FileKind::Delta,
            }
            .name();
            let ready = durable::prepare_zeroed(&dir.join(name), zeros, durability)
                .is_ok()
                .then_some(next);
            cleanup(&dir, oldest);
            ready
        }));
    }

    /// Waits for the background cleanup, if one is running.
    pub fn wait_cleanup(&mut self) {
        if let Some(prepared) = self.cleanup.wait() {
            self.prepared = prepared;
        }
    }

    /// Loads version `version` from disk (`None`: empty), replacing what the
    /// store holds and dropping uncommitted changes.
    pub fn load(&mut self, version: Option<BatchId>) -> Result<()> {
        for s in &mut self.shards {
            *s = Shard::default();
        }
        self.removed.clear();
        self.evicted.clear();
        self.evicted_rows = 0;
        self.version = version;
        let loaded = self.load_rows(version);
        // What a load put and removed is the version, not changes to it.
        self.removed.clear();
        for s in &mut self.shards {
            s.committed()?;
        }
        loaded
    }

    fn load_rows(&mut self, version: Option<BatchId>) -> Result<()> {
        let (Some(version), Some(dir)) = (version, self.dir.clone()) else {
            return Ok(());
        };
        let pdirs = partition_dirs(&dir)?;
        if pdirs.is_empty() || !plan::list(&dir)?.is_empty() {
            self.load_files(&dir, version)?;
            // Partition directories beside files of one per version: a
            // conversion that stopped before removing them (see below).
            if self.convert_partitioned {
                remove_converted(&pdirs)?;
            }
            return Ok(());
        }
        // Written before state files became one per version: one directory
        // per partition. Every commit wrote a file in every partition, so a
        // committed version with fewer partition directories has lost state.
        if pdirs.len() != self.options.partitions {
            return Err(Error::checkpoint(
                &dir,
                format!(
                    "state version {version} needs {} partition directories, found {}",
                    self.options.partitions,
                    pdirs.len()
                ),
            ));
        }
        for pdir in &pdirs {
            self.load_files(pdir, version)?;
        }
        // The query that owns the directory converts it: the version as one
        // snapshot of the new layout, then the partition directories go. A
        // crash in between leaves both, and the snapshot is what counts.
        if self.convert_partitioned {
            let name = StateFile {
                version,
                kind: FileKind::Snapshot,
            }
            .name();
            let all = self.scan()?;
            write_ipc(
                &dir.join(name),
                &all.schema(),
                &[all],
                self.options.durability,
                false,
            )?;
            remove_converted(&pdirs)?;
        }
        Ok(())
    }

    /// Adds the rows of version `version` as the files in `dir` hold it (the
    /// newest snapshot at or before it, then the deltas after), hashing
    /// every key into its shard.
    fn load_files(&mut self, dir: &Path, version: BatchId) -> Result<()> {
        let nk = self.key_schema.fields().len();
        let nv = self.value_schema.fields().len();
        let files = plan::list(dir)?;
        let mut bad = Vec::new();
        let read = loop {
            let needed = plan::files_for_version_without(&files, version, &bad)
                .map_err(|e| Error::checkpoint(dir, e))?;
            match read_all(dir, &needed, nk + nv) {
                Ok(read) => break read,
                Err((f, e)) if f.kind == FileKind::Snapshot && self.options.snapshot_fallback => {
                    self.fallbacks.push(format!(
                        "{} is unreadable ({e}); version {version} was rebuilt without it",
                        dir.join(f.name()).display()
                    ));
                    bad.push(f.version);
                }
                Err((f, e)) if f.kind == FileKind::Snapshot => {
                    return Err(e.context(
                        "a damaged snapshot (SET state_snapshot_fallback = true rebuilds its version from an older snapshot and the deltas after it)",
                    ));
                }
                Err((_, e)) => return Err(e),
            }
        };
        for (f, path, batch) in read {
            let bad = |e: Error| Error::checkpoint(&path, e.to_string());
            let rows = batch.project(&(0..nk + nv).collect::<Vec<_>>())?;
            match f.kind {
                FileKind::Snapshot => self.put(&rows).map_err(bad)?,
                FileKind::Delta => {
                    // Its evictions first: the rows it upserts are those
                    // live at its commit, so any it holds below a bound
                    // was put after that eviction.
                    if let Some(bounds) = batch.schema().metadata().get(EVICTED) {
                        let bounds: Vec<(usize, i64)> = serde_json::from_str(bounds)
                            .map_err(|e| bad(Error::internal(format!("its {EVICTED}: {e}"))))?;
                        for (column, bound) in bounds {
                            if column >= nk {
                                return Err(bad(Error::internal(format!(
                                    "its {EVICTED} names key column {column} of {nk}"
                                ))));
                            }
                            self.evict(column, bound).map_err(bad)?;
                        }
                    }
                    // A delta's upserted and removed keys are distinct, so
                    // the order they are applied in does not matter.
                    let deleted = batch
                        .column(nk + nv)
                        .as_any()
                        .downcast_ref::<BooleanArray>()
                        .ok_or_else(|| {
                            Error::checkpoint(&path, "the _deleted column is not boolean")
                        })?;
                    let deleted: BooleanArray =
                        deleted.iter().map(|d| Some(d == Some(true))).collect();
                    let kept = sluice_common::datafusion::arrow::compute::not(&deleted)?;
                    self.put(&filter_record_batch(&rows, &kept)?).map_err(bad)?;
                    let gone = filter_record_batch(&rows, &deleted)?;
                    self.remove(&gone.columns()[..nk]).map_err(bad)?;
                }
            }
        }
        Ok(())
    }

    /// What loads had to do without (unreadable snapshots passed over, with
    /// `snapshot_fallback`), oldest first.
    pub fn fallbacks(&self) -> &[String] {
        &self.fallbacks
    }

    /// [`Self::fallbacks`], emptied: each is reported once.
    pub fn take_fallbacks(&mut self) -> Vec<String> {
        std::mem::take(&mut self.fallbacks)
    }
}

/// A state file read: which, where, and its rows.
type ReadFile = (StateFile, PathBuf, RecordBatch);

/// Reads `files` of one state directory, checking each has the state's columns
/// (`values` + the `_deleted` flag for deltas); on failure, the file and why.
fn read_all(
    pdir: &Path,
    files: &[StateFile],
    columns: usize,
) -> std::result::Result<Vec<ReadFile>, (StateFile, Error)> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let path = pdir.join(f.name());
        let batch = read_ipc(&path).map_err(|e| (*f, e))?;
        let expected = columns + usize::from(f.kind == FileKind::Delta);
        if batch.num_columns() != expected {
            let e = Error::checkpoint(
                &path,
                format!(
                    "has {} columns, this operator's state has {expected}",
                    batch.num_columns()
                ),
            );
            return Err((*f, e));
        }
        out.push((*f, path, batch));
    }
    Ok(out)
}

/// Removes files no version at or after `oldest` needs (best effort: a
/// failure leaves extra files, never missing ones).
fn cleanup(dir: &Path, oldest: BatchId) {
    let Ok(files) = plan::list(dir) else {
        return;
    };
    for f in plan::removable(&files, oldest) {
        let path = dir.join(f.name());
        let _ = fs::remove_file(&path);
        sluice_common::remote::remove(&path);
    }
}

/// `<dir>/meta`: what a state directory holds, so that it can be read
/// without the query that wrote it and a mismatch is caught.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Meta {
    partitions: usize,
    key_columns: usize,
    /// The row schema (keys, then values) as an Arrow IPC stream with no rows.
    schema_ipc: Vec<u8>,
}

/// Key columns, then value columns.
fn row_schema_of(key_schema: &SchemaRef, value_schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = key_schema
        .fields()
        .iter()
        .chain(value_schema.fields().iter())
        .map(|f| f.as_ref().clone())
        .collect();
    Arc::new(Schema::new(fields))
}

fn check_or_write_meta(
    dir: &Path,
    schema: &SchemaRef,
    key_columns: usize,
    options: StateStoreOptions,
) -> Result<()> {
    let schema = schema.as_ref();
    let mut schema_ipc = Vec::new();
    {
        let mut w = StreamWriter::try_new(&mut schema_ipc, schema)?;
        w.finish()?;
    }
    let meta = Meta {
        partitions: options.partitions,
        key_columns,
        schema_ipc,
    };
    let path = dir.join("meta");
    if !path.exists() {
        return durable::write_json(&path, &meta, options.durability);
    }
    let found: Meta = durable::read_json(&path)?;
    if found.partitions != meta.partitions {
        return Err(Error::checkpoint(
            &path,
            format!(
                "the state was written with {} partitions but this query uses {}; the partition count is fixed for the life of a checkpoint",
                found.partitions, meta.partitions
            ),
        ));
    }
    if found.key_columns != meta.key_columns || read_schema(&path, &found.schema_ipc)? != *schema {
        return Err(Error::checkpoint(
            &path,
            "the state was written by a query with other group keys or aggregates; use a new checkpoint directory for the changed query",
        ));
    }
    Ok(())
}

fn read_schema(path: &Path, ipc: &[u8]) -> Result<Schema> {
    let reader = StreamReader::try_new(std::io::Cursor::new(ipc), None)
        .map_err(|e| Error::checkpoint(path, format!("the stored schema does not read: {e}")))?;
    Ok(reader.schema().as_ref().clone())
}

/// Reads version `version` of the state directory `dir` without the query
/// that wrote it: every live row, key columns first, then the aggregate
/// states; and how many leading columns are keys.
pub fn read_state(dir: &Path, version: BatchId) -> Result<(RecordBatch, usize)> {
    let path = dir.join("meta");
    let meta: Meta = durable::read_json(&path)?;
    let schema = read_schema(&path, &meta.schema_ipc)?;
    let fields = schema.fields();
    let key_schema = Arc::new(Schema::new(fields[..meta.key_columns].to_vec()));
    let value_schema = Arc::new(Schema::new(fields[meta.key_columns..].to_vec()));
    let options = StateStoreOptions {
        partitions: meta.partitions,
        ..StateStoreOptions::default()
    };
    let mut store = StateStore::new(None, key_schema, value_schema, options)?;
    store.dir = Some(dir.to_path_buf());
    store.convert_partitioned = false;
    store.load(Some(version))?;
    Ok((store.scan()?, meta.key_columns))
}

/// Removes the partition directories of a converted state directory.
fn remove_converted(pdirs: &[PathBuf]) -> Result<()> {
    for pdir in pdirs {
        fs::remove_dir_all(pdir)
            .map_err(|e| Error::io(format!("removing {} (converted)", pdir.display()), e))?;
    }
    Ok(())
}

fn partition_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<usize>().is_ok())
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Writes `batches` (of `schema`) as one framed Arrow IPC stream, into the
/// prepared file at `path` when `in_place`, atomically otherwise; returns
/// its length.
fn write_ipc(
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    durability: Durability,
    in_place: bool,
) -> Result<u64> {
    let size: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
    let mut buf = Vec::with_capacity(size + 4096);
    {
        let mut w = StreamWriter::try_new(&mut buf, schema)?;
        for b in batches {
            w.write(b)?;
        }
        w.finish()?;
    }
    let len = buf.len() as u64;
    if in_place {
        durable::write_framed_in_place(path, &buf, durability)?;
    } else {
        durable::write_framed(path, &buf, durability)?;
    }
    Ok(len)
}

fn read_ipc(path: &Path) -> Result<RecordBatch> {
    let bytes = fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    decode_state_file(path, &bytes)
}

/// The rows of a state file's bytes (a delta or snapshot read from `path`):
/// checks the frame, then reads the Arrow IPC stream in it. Damage is an
/// error naming `path`, never a panic.
pub fn decode_state_file(path: &Path, bytes: &[u8]) -> Result<RecordBatch> {
    let body = durable::unframe(path, bytes)?;
    let bad = |e: String| {
        Error::checkpoint(
            path,
            format!("checksum is right but the Arrow data does not read: {e}"),
        )
    };
    // Arrow's reader sizes its buffers from the lengths the stream declares;
    // check them against the bytes there are before it allocates any.
    check_ipc_lengths(body).map_err(bad)?;
    let reader =
        StreamReader::try_new(std::io::Cursor::new(body), None).map_err(|e| bad(e.to_string()))?;
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    Ok(sluice_common::datafusion::arrow::compute::concat_batches(
        &schema, &batches,
    )?)
}

/// Walks the messages of an Arrow IPC stream, checking that each declared
/// metadata and body length fits in the bytes that follow.
fn check_ipc_lengths(body: &[u8]) -> std::result::Result<(), String> {
    use sluice_common::datafusion::arrow::ipc::root_as_message;
    let word = |at: usize| -> std::result::Result<i32, String> {
        body.get(at..at + 4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("truncated at byte {at} of {}", body.len()))
    };
    let mut pos = 0;
    while pos < body.len() {
        let mut len = word(pos)?;
        pos += 4;
        // A continuation marker, then the length (the legacy format omits it).
        if len == -1 {
            len = word(pos)?;
            pos += 4;
        }
        if len == 0 {
            return Ok(()); // end of stream
        }
        let len = usize::try_from(len).map_err(|_| format!("negative length at byte {pos}"))?;
        let meta = body
            .get(pos..pos + len)
            .ok_or_else(|| format!("a {len}-byte message at byte {pos} runs past the end"))?;
        pos += len;
        let message = root_as_message(meta).map_err(|e| format!("bad message header: {e}"))?;
        let body_len = usize::try_from(message.bodyLength())
            .map_err(|_| format!("negative body length at byte {pos}"))?;
        if body.len() - pos < body_len {
            return Err(format!(
                "a {body_len}-byte message body at byte {pos} runs past the end"
            ));
        }
        pos += body_len;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
