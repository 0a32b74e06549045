//! The checkpoint directory of one streaming query.
//!
//! ```text
//! <dir>/lock              held (flock) while a query runs; holds its pid
//! <dir>/metadata          query id, format version, plan fingerprint, sources
//! <dir>/offsets/<N>       what batch N reads, written before it runs
//! <dir>/commits/<N>       batch N finished and its output is in the sink
//! <dir>/sources/<name>/   a source's own durable metadata (e.g. files taken)
//! <dir>/progress.jsonl    one progress record per committed batch
//! ```
//!
//! Every file but `lock` and `progress.jsonl` is written atomically and framed
//! with a checksum (see [`sluice_common::durable`]).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_common::durable::{self, Durability};
use sluice_common::{BatchId, Error, Progress, Result};

use crate::recovery::{self, Resume};

/// The version of the checkpoint format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The `metadata` file: fixed for the life of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Always [`FORMAT_VERSION`] for checkpoints this build can read.
    pub format_version: u32,
    /// A random id given to the query when the checkpoint was created.
    pub query_id: String,
    /// The query's name (its sink).
    pub name: String,
    /// A fingerprint of the plan that created the checkpoint.
    pub plan_fingerprint: String,
    /// The names of the sources the query reads, sorted.
    pub sources: Vec<String>,
    /// When the checkpoint was created (ms since the epoch).
    pub created_ms: i64,
}

/// The range of one source that a batch reads: `[start, end)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRange {
    /// Where the batch starts (the previous batch's end).
    pub start: serde_json::Value,
    /// Where the batch ends.
    pub end: serde_json::Value,
}

/// `offsets/<N>`: everything batch N needs to be re-run identically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffsetEntry {
    /// The batch id N.
    pub batch_id: BatchId,
    /// The trigger clock when the batch was planned (ms since the epoch).
    pub timestamp_ms: i64,
    /// Per source, the range the batch reads.
    pub sources: BTreeMap<String, SourceRange>,
    /// The event-time watermark in force for the batch (ms), if any.
    pub watermark_ms: Option<i64>,
    /// Settings that affect results, fixed for a re-run.
    pub config: BTreeMap<String, String>,
}

/// `commits/<N>`: batch N is complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitEntry {
    /// The batch id N.
    pub batch_id: BatchId,
    /// When the batch committed (ms since the epoch, trigger clock).
    pub committed_ms: i64,
    /// Rows the batch wrote to the sink.
    pub output_rows: u64,
    /// The query's watermark after the batch (ms), if any source has one.
    #[serde(default)]
    pub watermark_ms: Option<i64>,
    /// Per source with a watermark, the largest event time seen so far (ms).
    #[serde(default)]
    pub event_time_max_ms: BTreeMap<String, i64>,
    /// Per source, the trigger-clock time of the last batch that read rows
    /// from it (ms), for `idle_timeout`.
    #[serde(default)]
    pub last_data_ms: BTreeMap<String, i64>,
}

/// How a checkpoint writes.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointOptions {
    /// Sync writes to disk (default) or only rename them into place.
    pub durability: Durability,
    /// How many committed batches' offset and commit entries to keep.
    pub retain_batches: u64,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        CheckpointOptions {
            durability: Durability::Fsync,
            retain_batches: 100,
        }
    }
}

/// An open, locked checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    options: CheckpointOptions,
    metadata: Metadata,
    /// Every log entry below this id is known to be gone (`None`: the logs
    /// have not been listed yet), so a purge deletes just the new ones.
    purged_below: std::sync::Mutex<Option<BatchId>>,
    // Held for the life of the checkpoint: the OS drops the lock when the
    // process dies, so a crash never leaves a stale lock behind.
    _lock: File,
}

/// An offset entry being written (see [`Checkpoint::start_write_offsets`]).
#[derive(Debug)]
#[must_use = "the batch must wait for its offset entry before its output is visible"]
pub enum OffsetWrite {
    /// Written already, in this long.
    Done(std::time::Duration),
    /// Being written on a thread of its own.
    Running(std::thread::JoinHandle<Result<std::time::Duration>>),
}

impl OffsetWrite {
    /// Waits until the entry is durable; how long its write took.
    pub fn wait(self) -> Result<std::time::Duration> {
        match self {
            OffsetWrite::Done(d) => Ok(d),
            OffsetWrite::Running(h) => h
                .join()
                .unwrap_or_else(|_| Err(Error::internal("the offset log writer panicked"))),
        }
    }
}

impl Checkpoint {
    /// Opens (or creates) the checkpoint at `root` for the query `name`,
    /// refusing it if another process holds it or if it was written for other
    /// sources.
    pub fn open(
        root: &Path,
        name: &str,
        plan_fingerprint: &str,
        sources: &[String],
        now_ms: i64,
        options: CheckpointOptions,
    ) -> Result<Checkpoint> {
        fs::create_dir_all(root)
            .map_err(|e| Error::io(format!("creating checkpoint {}", root.display()), e))?;
        let lock = acquire_lock(root)?;
        // Holding the lock, no other process writes here: temporary files
        // of writes that a crash cut short can go.
        durable::remove_stale_temp_files(root);
        let mut sources: Vec<String> = sources.to_vec();
        sources.sort();
        let meta_path = root.join("metadata");
        let metadata = if meta_path.exists() {
            let m: Metadata = durable::read_json(&meta_path)?;
            if m.format_version != FORMAT_VERSION {
                return Err(Error::checkpoint(
                    &meta_path,
                    format!(
                        "format version {} is not supported by this build (it reads version {FORMAT_VERSION})",
                        m.format_version
                    ),
                ));
            }
            if m.sources != sources {
                return Err(Error::checkpoint(
                    root,
                    format!(
                        "it was written for a query reading [{}] but this query reads [{}]; use a new checkpoint directory",
                        m.sources.join(", "),
                        sources.join(", ")
                    ),
                ));
            }
            m
        } else {
            let m = Metadata {
                format_version: FORMAT_VERSION,
                query_id: uuid::Uuid::new_v4().to_string(),
                name: name.to_string(),
                plan_fingerprint: plan_fingerprint.to_string(),
                sources,
                created_ms: now_ms,
            };
            durable::write_json(&meta_path, &m, options.durability)?;
            m
        };
        Ok(Checkpoint {
            root: root.to_path_buf(),
            options,
            metadata,
            purged_below: std::sync::Mutex::new(None),
            _lock: lock,
        })
    }

    /// The checkpoint directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// How writes are synced.
    pub fn durability(&self) -> Durability {
        self.options.durability
    }

    /// Where the query resumes, from the two logs.
    pub fn resume(&self) -> Result<Resume> {
        recovery::decide(self.last_offset_id()?, self.last_commit_id()?)
            .map_err(|e| Error::checkpoint(&self.root, e.to_string()))
    }

    /// The newest batch id in `offsets/`.
    pub fn last_offset_id(&self) -> Result<Option<BatchId>> {
        last_id(&self.root.join("offsets"))
    }

    /// The newest batch id in `commits/`.
    pub fn last_commit_id(&self) -> Result<Option<BatchId>> {
        last_id(&self.root.join("commits"))
    }

    /// Reads `offsets/<id>`, checking that it is the entry for `id`.
    pub fn read_offsets(&self, id: BatchId) -> Result<OffsetEntry> {
        self.read_entry("offsets", id, |e: &OffsetEntry| e.batch_id)
    }

    /// Writes `offsets/<id>` (atomically, before the batch runs).
    pub fn write_offsets(&self, entry: &OffsetEntry) -> Result<()> {
        self.write_entry("offsets", entry.batch_id, entry)
    }

    /// Starts writing `offsets/<id>` and returns at once; the batch may run
    /// while the entry is synced, as long as [`OffsetWrite::wait`] returns
    /// before anything of the batch is made visible outside the state store
    /// (its sink write, its commit entry). With [`Durability::NoSync`] the
    /// write is done before this returns (a thread would cost more than it).
    pub fn start_write_offsets(&self, entry: &OffsetEntry) -> Result<OffsetWrite> {
        let t = std::time::Instant::now();
        let durability = self.options.durability;
        if durability == Durability::NoSync {
            self.write_offsets(entry)?;
            return Ok(OffsetWrite::Done(t.elapsed()));
        }
        let path = self.entry_path("offsets", entry.batch_id);
        let entry = entry.clone();
        Ok(OffsetWrite::Running(std::thread::spawn(move || {
            durable::write_json(&path, &entry, durability).map(|()| t.elapsed())
        })))
    }

    /// Reads `commits/<id>`, checking that it is the entry for `id`.
    pub fn read_commit(&self, id: BatchId) -> Result<CommitEntry> {
        self.read_entry("commits", id, |e: &CommitEntry| e.batch_id)
    }

    /// Writes `commits/<id>`: from here on, batch `id` is done.
    pub fn write_commit(&self, entry: &CommitEntry) -> Result<()> {
        self.write_entry("commits", entry.batch_id, entry)?;
        self.purge_before(entry.batch_id.saturating_sub(self.options.retain_batches));
        Ok(())
    }

    fn read_entry<T: serde::de::DeserializeOwned>(
        &self,
        log: &str,
        id: BatchId,
        batch_id: impl FnOnce(&T) -> BatchId,
    ) -> Result<T> {
        let path = self.entry_path(log, id);
        let e: T = durable::read_json(&path)?;
        let found = batch_id(&e);
        if found != id {
            return Err(Error::checkpoint(
                &path,
                format!("holds batch {found} instead of {id}"),
            ));
        }
        Ok(e)
    }

    fn write_entry<T: Serialize>(&self, log: &str, id: BatchId, entry: &T) -> Result<()> {
        durable::write_json(&self.entry_path(log, id), entry, self.options.durability)
    }

    /// `<root>/<log>/<id>`: where batch `id`'s entry of a log lives.
    fn entry_path(&self, log: &str, id: BatchId) -> PathBuf {
        self.root.join(log).join(id.to_string())
    }

    /// The directory where source `name` keeps its own durable metadata.
    pub fn source_dir(&self, name: &str) -> PathBuf {
        self.root.join("sources").join(sanitize(name))
    }

    /// Appends a progress record to `progress.jsonl`.
    ///
    /// Progress is informational: a torn last line after a crash is skipped
    /// by [`read_progress`], and losing it never affects results.
    pub fn append_progress(&self, progress: &Progress) -> Result<()> {
        let path = self.root.join("progress.jsonl");
        let mut line = serde_json::to_vec(progress)
            .map_err(|e| Error::internal(format!("serializing progress: {e}")))?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // After a torn last line (a crash mid-append), start a new line, so
        // only the torn record is lost, not this one too.
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8; 1];
            let torn = f.seek(SeekFrom::Start(len - 1)).is_ok()
                && f.read_exact(&mut last).is_ok()
                && last[0] != b'\n';
            if torn {
                line.insert(0, b'\n');
            }
        }
        f.write_all(&line)
            .map_err(|e| Error::io(format!("appending to {}", path.display()), e))
    }

    /// Removes offset and commit entries older than `keep_from` (best effort).
    fn purge_before(&self, keep_from: BatchId) {
        let mut purged = self.purged_below.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(below) = *purged {
            // Only the entries that fell out of retention since the last
            // purge: no directory listing on the batch's path.
            for id in below..keep_from {
                for log in ["offsets", "commits"] {
                    let _ = fs::remove_file(self.entry_path(log, id));
                }
            }
            *purged = Some(below.max(keep_from));
            return;
        }
        *purged = Some(keep_from);
        for log in ["offsets", "commits"] {
            let dir = self.root.join(log);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if let Some(id) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<BatchId>().ok())
                    && id < keep_from
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// The newest committed batch of the checkpoint at `root`, read without
/// taking its lock (for reading a running query's state).
pub fn last_committed(root: &Path) -> Result<Option<BatchId>> {
    last_id(&root.join("commits"))
}

/// The newest commit entry of the checkpoint at `root` (with the watermark
/// at the end of that batch), read without taking its lock.
pub fn read_last_commit(root: &Path) -> Result<Option<CommitEntry>> {
    match last_committed(root)? {
        Some(id) => Ok(Some(durable::read_json(
            &root.join("commits").join(id.to_string()),
        )?)),
        None => Ok(None),
    }
}

/// Reads the progress records of the checkpoint at `root`, oldest first,
/// skipping a torn last line.
pub fn read_progress(root: &Path) -> Result<Vec<Progress>> {
    let path = root.join("progress.jsonl");
    // Bytes, not text: a damaged log may hold anything, and only the lines
    // that parse count.
    let text = match fs::read(&path) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn acquire_lock(root: &Path) -> Result<File> {
    let path = root.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another query".to_string()
            } else {
                format!("another query (pid {holder})")
            };
            return Err(Error::checkpoint(
                root,
                format!(
                    "it is in use by {who}; stop that query first or use another checkpoint directory"
                ),
            ));
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(Error::io(format!("locking {}", path.display()), e));
        }
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

fn last_id(dir: &Path) -> Result<Option<BatchId>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut max = None;
    for e in entries {
        let e = e.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue; // a temporary file of an interrupted write
        }
        let id: BatchId = name.parse().map_err(|_| {
            Error::checkpoint(
                e.path(),
                "unexpected file in a log directory (names are batch ids)",
            )
        })?;
        max = max.max(Some(id));
    }
    Ok(max)
}

/// Makes a name safe as one path component.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Result<Checkpoint> {
        Checkpoint::open(
            dir,
            "q",
            "fp",
            &["src".into()],
            0,
            CheckpointOptions::default(),
        )
    }

    fn offsets(id: BatchId) -> OffsetEntry {
        OffsetEntry {
            batch_id: id,
            timestamp_ms: 7,
            sources: BTreeMap::from([(
                "src".to_string(),
                SourceRange {
                    start: id.into(),
                    end: (id + 1).into(),
                },
            )]),
            watermark_ms: None,
            config: BTreeMap::new(),
        }
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path()).unwrap();
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("in use by another query (pid"), "{e}");
        drop(first);
        open(dir.path()).unwrap();
    }

    #[test]
    fn logs_round_trip_and_resume_reruns_the_uncommitted_batch() {
        let dir = tempfile::tempdir().unwrap();
        let cp = open(dir.path()).unwrap();
        assert_eq!(cp.resume().unwrap(), Resume::Fresh);
        cp.write_offsets(&offsets(0)).unwrap();
        cp.write_commit(&CommitEntry {
            batch_id: 0,
            committed_ms: 1,
            output_rows: 2,
            watermark_ms: None,
            event_time_max_ms: BTreeMap::new(),
            last_data_ms: BTreeMap::new(),
        })
        .unwrap();
        cp.write_offsets(&offsets(1)).unwrap();
        let id = cp.metadata().query_id.clone();
        drop(cp);
        let cp = open(dir.path()).unwrap();
        assert_eq!(cp.metadata().query_id, id);
        assert_eq!(cp.resume().unwrap(), Resume::Rerun { batch_id: 1 });
        assert_eq!(cp.read_offsets(1).unwrap(), offsets(1));
    }

    #[test]
    fn other_sources_and_corrupt_metadata_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        let e = Checkpoint::open(
            dir.path(),
            "q",
            "fp",
            &["other".into()],
            0,
            CheckpointOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[src]") && e.contains("[other]"), "{e}");
        fs::write(
            dir.path().join("metadata"),
            b"sluice/1 len=3 crc32=00000000\nabc",
        )
        .unwrap();
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metadata") && e.contains("checksum"), "{e}");
    }

    #[test]
    fn old_entries_are_purged_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CheckpointOptions {
            durability: Durability::NoSync,
            retain_batches: 2,
        };
        let cp = Checkpoint::open(dir.path(), "q", "fp", &["src".into()], 0, opts).unwrap();
        for id in 0..5 {
            cp.write_offsets(&offsets(id)).unwrap();
            cp.write_commit(&CommitEntry {
                batch_id: id,
                committed_ms: 0,
                output_rows: 0,
                watermark_ms: None,
                event_time_max_ms: BTreeMap::new(),
                last_data_ms: BTreeMap::new(),
            })
            .unwrap();
        }
        assert!(!dir.path().join("offsets/1").exists());
        assert!(dir.path().join("offsets/2").exists());
        assert_eq!(cp.resume().unwrap(), Resume::Next { next: 5 });
    }
}
