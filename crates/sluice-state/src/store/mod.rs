//! The versioned state store of stateful operators.
//!
//! One [`StateStore`] holds one operator's state: rows of *key* columns
//! (group key, window) and *value* columns (aggregate accumulator states),
//! hash-partitioned into P partitions in memory. It is versioned by batch
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
//! The stateful aggregate (`sluice-exec`) is its user; `<dir>/meta` records
//! the partition count and row schema, so a state directory can be read on
//! its own ([`read_state`]) and a mismatched query is refused.

pub mod plan;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_common::datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch};
use sluice_common::datafusion::arrow::compute::filter_record_batch;
use sluice_common::datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use sluice_common::datafusion::arrow::ipc::reader::StreamReader;
use sluice_common::datafusion::arrow::ipc::writer::StreamWriter;
use sluice_common::datafusion::arrow::row::{RowConverter, SortField};
use sluice_common::durable::{self, Durability};
use sluice_common::{BatchId, Error, Result};

use plan::{FileKind, StateFile};

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
}

impl Default for StateStoreOptions {
    fn default() -> Self {
        StateStoreOptions {
            partitions: 4,
            snapshot_interval: 10,
            retain_versions: 20,
            durability: Durability::Fsync,
            snapshot_fallback: false,
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

/// A row-encoded key or value (arrow's row format): compared, hashed and
/// looked up as plain bytes, with no allocation to find a key.
type Bytes = Box<[u8]>;
type Hasher = foldhash::fast::RandomState;
type Map = std::collections::HashMap<Bytes, Bytes, Hasher>;
type Set = std::collections::HashSet<Bytes, Hasher>;

#[derive(Debug, Default)]
struct Partition {
    rows: Map,
    upserted: Set,
    removed: Set,
    /// Bytes of the live keys and values in `rows`, kept as they change.
    bytes: usize,
}

impl Partition {
    /// Sets `k`'s value, keeping `bytes`; an equal-length value (a
    /// fixed-width state) is overwritten in place.
    fn set(&mut self, k: &[u8], v: &[u8]) {
        match self.rows.get_mut(k) {
            Some(old) if old.len() == v.len() => old.copy_from_slice(v),
            Some(old) => {
                self.bytes = self.bytes - old.len() + v.len();
                *old = v.into();
            }
            None => {
                self.bytes += k.len() + v.len();
                self.rows.insert(k.into(), v.into());
            }
        }
    }

    /// Takes `k` out of the live rows, keeping `bytes`.
    fn take(&mut self, k: &[u8]) -> Option<(Bytes, Bytes)> {
        let (key, value) = self.rows.remove_entry(k)?;
        self.bytes -= key.len() + value.len();
        Some((key, value))
    }

    /// Removes `k` as a change of this version (its delta marks it deleted),
    /// returning its value.
    fn remove(&mut self, k: &[u8]) -> Option<Bytes> {
        let (key, value) = self.take(k)?;
        self.upserted.remove(k);
        self.removed.insert(key);
        Some(value)
    }
}

/// One operator's keyed, versioned state.
#[derive(Debug)]
pub struct StateStore {
    dir: Option<PathBuf>,
    options: StateStoreOptions,
    key_schema: SchemaRef,
    value_schema: SchemaRef,
    keys: RowConverter,
    values: RowConverter,
    partitions: Vec<Partition>,
    version: Option<BatchId>,
    /// The background removal of files past retention, if running.
    cleanup: Option<std::thread::JoinHandle<()>>,
    /// See [`StateStore::fallbacks`].
    fallbacks: Vec<String>,
    /// Whether loading a directory of the older layout (a directory per
    /// partition) converts it: only the query that owns the checkpoint
    /// does, never a reader.
    convert_partitioned: bool,
}

/// From how many rows a commit without fsync writes its files in parallel.
const PARALLEL_WRITE_ROWS: usize = 8192;

/// The column a delta file uses to mark removed keys.
const DELETED: &str = "_deleted";

impl StateStore {
    /// A store for rows of `key_schema` + `value_schema`, kept under `dir`
    /// (`None`: in memory only, for tests and for queries without a checkpoint).
    pub fn new(
        dir: Option<PathBuf>,
        key_schema: SchemaRef,
        value_schema: SchemaRef,
        options: StateStoreOptions,
    ) -> Result<Self> {
        let conv = |s: &SchemaRef| {
            RowConverter::new(
                s.fields()
                    .iter()
                    .map(|f| SortField::new(f.data_type().clone()))
                    .collect(),
            )
            .map_err(|e| Error::plan(format!("state of type {s} cannot be stored: {e}")))
        };
        if options.partitions == 0 {
            return Err(Error::plan("a state store needs at least one partition"));
        }
        if let Some(dir) = &dir {
            check_or_write_meta(dir, &key_schema, &value_schema, options)?;
        }
        Ok(StateStore {
            keys: conv(&key_schema)?,
            values: conv(&value_schema)?,
            dir,
            partitions: (0..options.partitions)
                .map(|_| Partition::default())
                .collect(),
            options,
            key_schema,
            value_schema,
            version: None,
            cleanup: None,
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
        self.partitions.iter().map(|p| p.rows.len()).sum()
    }

    /// Whether no key is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate bytes held in memory by the live rows: their row-encoded
    /// keys and values, counted as they change (no walk over the state).
    pub fn memory_bytes(&self) -> usize {
        self.partitions.iter().map(|p| p.bytes).sum()
    }

    fn partition_of(&self, key: &[u8]) -> usize {
        // FNV-1a over the row-encoded key: stable within a process, and
        // keys are re-hashed on load, so the on-disk split never has to match.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in key {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % self.partitions.len() as u64) as usize
    }

    fn check(&self, batch: &RecordBatch, what: &str) -> Result<()> {
        let expected = self.key_schema.fields().len()
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

    /// Inserts or replaces rows: key columns first, then value columns.
    pub fn put(&mut self, batch: &RecordBatch) -> Result<()> {
        self.check(batch, "put")?;
        let nk = self.key_schema.fields().len();
        let keys = self.keys.convert_columns(&batch.columns()[..nk])?;
        let values = self.values.convert_columns(&batch.columns()[nk..])?;
        for i in 0..batch.num_rows() {
            let k = keys.row(i);
            let k: &[u8] = k.as_ref();
            let v = values.row(i);
            let v: &[u8] = v.as_ref();
            let p = self.partition_of(k);
            let part = &mut self.partitions[p];
            if !part.removed.is_empty() {
                part.removed.remove(k);
            }
            if !part.upserted.contains(k) {
                part.upserted.insert(k.into());
            }
            part.set(k, v);
        }
        Ok(())
    }

    /// The stored rows (keys, then values) of the given keys that exist.
    pub fn get(&self, keys: &[ArrayRef]) -> Result<RecordBatch> {
        let rows = self.keys.convert_columns(keys)?;
        let mut found: Vec<(&[u8], &[u8])> = Vec::new();
        let mut seen: std::collections::HashSet<&[u8], Hasher> = Default::default();
        for i in 0..rows.num_rows() {
            let k = rows.row(i).data();
            if !seen.insert(k) {
                continue;
            }
            let p = self.partition_of(k);
            if let Some(v) = self.partitions[p].rows.get(k) {
                found.push((k, v));
            }
        }
        self.to_batch(found.into_iter())
    }

    /// Removes the given keys (those that exist), touching nothing else:
    /// O(keys given), however large the state. Returns how many existed.
    pub fn remove(&mut self, keys: &[ArrayRef]) -> Result<usize> {
        if keys.first().is_none_or(|k| k.is_empty()) {
            return Ok(0);
        }
        let rows = self.keys.convert_columns(keys)?;
        let mut removed = 0;
        for i in 0..rows.num_rows() {
            let k = rows.row(i).data();
            let p = self.partition_of(k);
            removed += usize::from(self.partitions[p].remove(k).is_some());
        }
        Ok(removed)
    }

    /// Removes the rows for which `predicate` (over a batch of live rows:
    /// key columns, then value columns) is true, returning them.
    pub fn remove_where(
        &mut self,
        predicate: impl Fn(&RecordBatch) -> Result<BooleanArray>,
    ) -> Result<RecordBatch> {
        let all = self.scan()?;
        let nk = self.key_schema.fields().len();
        let mask = predicate(&all)?;
        let gone = filter_record_batch(&all, &mask)?;
        let rows = self.keys.convert_columns(&gone.columns()[..nk])?;
        for i in 0..rows.num_rows() {
            let k = rows.row(i).data();
            let p = self.partition_of(k);
            self.partitions[p].remove(k);
        }
        Ok(gone)
    }

    /// Removes the rows whose keys `predicate` (over a batch of the live
    /// keys alone) marks, returning them (keys, then values): the same as
    /// [`Self::remove_where`] for a predicate that reads only keys, without
    /// decoding every live row's values.
    pub fn remove_keys_where(
        &mut self,
        predicate: impl Fn(&RecordBatch) -> Result<BooleanArray>,
    ) -> Result<RecordBatch> {
        if self.is_empty() {
            return Ok(RecordBatch::new_empty(self.row_schema()));
        }
        let gone: Vec<Bytes> = {
            let live: Vec<&[u8]> = self
                .partitions
                .iter()
                .flat_map(|p| p.rows.keys())
                .map(|k| &k[..])
                .collect();
            let kp = self.keys.parser();
            let cols = self.keys.convert_rows(live.iter().map(|k| kp.parse(k)))?;
            let keys = RecordBatch::try_new(Arc::clone(&self.key_schema), cols)?;
            let mask = predicate(&keys)?;
            live.iter()
                .zip(mask.iter())
                .filter(|(_, m)| *m == Some(true))
                .map(|(k, _)| Bytes::from(*k))
                .collect()
        };
        let mut taken = Vec::with_capacity(gone.len());
        for k in gone {
            let p = self.partition_of(&k);
            if let Some(v) = self.partitions[p].remove(&k) {
                taken.push((k, v));
            }
        }
        self.to_batch(taken.iter().map(|(k, v)| (&k[..], &v[..])))
    }

    /// Every live row (keys, then values).
    pub fn scan(&self) -> Result<RecordBatch> {
        // Straight from the maps, no row copied.
        self.to_batch(
            self.partitions
                .iter()
                .flat_map(|p| p.rows.iter())
                .map(|(k, v)| (&k[..], &v[..])),
        )
    }

    /// The schema of [`StateStore::scan`]: key columns, then value columns.
    pub fn row_schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .key_schema
            .fields()
            .iter()
            .chain(self.value_schema.fields().iter())
            .map(|f| f.as_ref().clone())
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// Columns (keys, then values) of row-encoded `(key, value)` pairs.
    fn to_columns<'a>(
        &self,
        rows: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    ) -> Result<Vec<ArrayRef>> {
        let (kp, vp) = (self.keys.parser(), self.values.parser());
        let mut cols = self
            .keys
            .convert_rows(rows.clone().map(|(k, _)| kp.parse(k)))?;
        cols.extend(self.values.convert_rows(rows.map(|(_, v)| vp.parse(v)))?);
        Ok(cols)
    }

    fn to_batch<'a>(
        &self,
        rows: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    ) -> Result<RecordBatch> {
        let cols = self.to_columns(rows)?;
        if cols.is_empty() {
            return Ok(RecordBatch::new_empty(self.row_schema()));
        }
        Ok(RecordBatch::try_new(self.row_schema(), cols)?)
    }

    /// Makes the changes since the last commit version `version`, writing a
    /// delta of every partition's changes (and a snapshot every K versions).
    pub fn commit(&mut self, version: BatchId) -> Result<CommitStats> {
        if let Some(v) = self.version
            && version <= v
        {
            return Err(Error::internal(format!(
                "state version {version} committed after {v}"
            )));
        }
        let mut stats = CommitStats::default();
        let snapshot = plan::is_snapshot_version(version, self.options.snapshot_interval);
        // One delta per version for the whole operator (every partition's
        // changes), and a snapshot every K versions: one or two files, not
        // one or two per partition.
        let mut deltas = Vec::new();
        for p in 0..self.partitions.len() {
            let (upserted, removed) = {
                let part = &mut self.partitions[p];
                (
                    std::mem::take(&mut part.upserted),
                    std::mem::take(&mut part.removed),
                )
            };
            stats.updated += upserted.len() as u64;
            stats.removed += removed.len() as u64;
            if self.dir.is_some() {
                deltas.push(self.delta_batch(p, &upserted, &removed)?);
            }
        }
        let mut files: Vec<(PathBuf, RecordBatch)> = Vec::new();
        if let Some(dir) = self.dir.clone() {
            let name = |kind| StateFile { version, kind }.name();
            // A delta is written even when empty, so that every version has
            // its file and loading can tell a gap from an idle version.
            let schema = deltas[0].schema();
            files.push((
                dir.join(name(FileKind::Delta)),
                sluice_common::datafusion::arrow::compute::concat_batches(&schema, &deltas)?,
            ));
            if snapshot {
                files.push((dir.join(name(FileKind::Snapshot)), self.scan()?));
            }
        }
        // A delta and a snapshot are written in parallel, so their fsyncs
        // and their encoding overlap; a small commit without fsync is
        // written in turn, as a thread would cost more than its write.
        let durability = self.options.durability;
        let rows: usize = files.iter().map(|(_, b)| b.num_rows()).sum();
        let written: Vec<Result<u64>> = if files.len() < 2
            || (durability == Durability::NoSync && rows < PARALLEL_WRITE_ROWS)
        {
            files
                .iter()
                .map(|(path, batch)| write_ipc(path, batch, durability))
                .collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = files
                    .iter()
                    .map(|(path, batch)| scope.spawn(move || write_ipc(path, batch, durability)))
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
        for w in written {
            stats.bytes_written += w?;
        }
        stats.rows = self.len() as u64;
        self.version = Some(version);
        if let Some(dir) = &self.dir {
            self.start_cleanup(dir.clone(), version);
        }
        Ok(stats)
    }

    /// Removes, off the batch's path, the files no retained version needs;
    /// the previous cleanup is waited for first, so at most one runs.
    fn start_cleanup(&mut self, dir: PathBuf, version: BatchId) {
        self.wait_cleanup();
        let oldest = version.saturating_sub(self.options.retain_versions.saturating_sub(1));
        self.cleanup = Some(std::thread::spawn(move || cleanup(&dir, oldest)));
    }

    /// Waits for the background cleanup, if one is running.
    pub fn wait_cleanup(&mut self) {
        if let Some(h) = self.cleanup.take() {
            let _ = h.join();
        }
    }

    fn delta_batch(&self, p: usize, upserted: &Set, removed: &Set) -> Result<RecordBatch> {
        let part = &self.partitions[p];
        let mut rows: Vec<(&[u8], &[u8])> = Vec::with_capacity(upserted.len() + removed.len());
        let mut deleted = Vec::with_capacity(rows.capacity());
        for k in upserted {
            if let Some(v) = part.rows.get(k) {
                rows.push((k, v));
                deleted.push(false);
            }
        }
        // A removed key carries null values: only its key and the mark are
        // read back.
        let filler = self.null_values()?;
        for k in removed {
            rows.push((k, &filler));
            deleted.push(true);
        }
        // Value columns are nullable here: a removed key's values are nulls.
        let mut cols = self.to_columns(rows.into_iter())?;
        let mut fields: Vec<Field> = self
            .row_schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        fields.push(Field::new(DELETED, DataType::Boolean, false));
        cols.push(Arc::new(BooleanArray::from(deleted)));
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }

    fn null_values(&self) -> Result<Bytes> {
        let cols: Vec<ArrayRef> = self
            .value_schema
            .fields()
            .iter()
            .map(|f| sluice_common::datafusion::arrow::array::new_null_array(f.data_type(), 1))
            .collect();
        Ok(self.values.convert_columns(&cols)?.row(0).data().into())
    }

    /// Loads version `version` from disk (`None`: empty), replacing what the
    /// store holds and dropping uncommitted changes.
    pub fn load(&mut self, version: Option<BatchId>) -> Result<()> {
        for p in &mut self.partitions {
            *p = Partition::default();
        }
        self.version = version;
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
            write_ipc(&dir.join(name), &self.scan()?, self.options.durability)?;
            remove_converted(&pdirs)?;
        }
        Ok(())
    }

    /// Adds the rows of version `version` as the files in `dir` hold it (the
    /// newest snapshot at or before it, then the deltas after), re-hashing
    /// every key into its partition.
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
            let keys = self
                .keys
                .convert_columns(&batch.columns()[..nk])
                .map_err(|e| Error::checkpoint(&path, e.to_string()))?;
            let values = self
                .values
                .convert_columns(&batch.columns()[nk..nk + nv])
                .map_err(|e| Error::checkpoint(&path, e.to_string()))?;
            let deleted = match f.kind {
                FileKind::Delta => Some(
                    batch
                        .column(nk + nv)
                        .as_any()
                        .downcast_ref::<BooleanArray>()
                        .cloned()
                        .ok_or_else(|| {
                            Error::checkpoint(&path, "the _deleted column is not boolean")
                        })?,
                ),
                FileKind::Snapshot => None,
            };
            for i in 0..batch.num_rows() {
                let k = keys.row(i).data();
                let p = self.partition_of(k);
                let part = &mut self.partitions[p];
                if deleted.as_ref().is_some_and(|d| d.value(i)) {
                    part.take(k);
                } else {
                    part.set(k, values.row(i).data());
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
        let _ = fs::remove_file(dir.join(f.name()));
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

fn check_or_write_meta(
    dir: &Path,
    key_schema: &SchemaRef,
    value_schema: &SchemaRef,
    options: StateStoreOptions,
) -> Result<()> {
    let fields: Vec<Field> = key_schema
        .fields()
        .iter()
        .chain(value_schema.fields().iter())
        .map(|f| f.as_ref().clone())
        .collect();
    let schema = Schema::new(fields);
    let mut schema_ipc = Vec::new();
    {
        let mut w = StreamWriter::try_new(&mut schema_ipc, &schema)?;
        w.finish()?;
    }
    let meta = Meta {
        partitions: options.partitions,
        key_columns: key_schema.fields().len(),
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
    if found.key_columns != meta.key_columns || read_schema(&path, &found.schema_ipc)? != schema {
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

fn write_ipc(path: &Path, batch: &RecordBatch, durability: Durability) -> Result<u64> {
    let mut buf = Vec::new();
    {
        let mut w = StreamWriter::try_new(&mut buf, &batch.schema())?;
        w.write(batch)?;
        w.finish()?;
    }
    let len = buf.len() as u64;
    durable::write_framed(path, &buf, durability)?;
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
