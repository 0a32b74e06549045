//! The checkpoint directory of one streaming query.
//!
//! ```text
//! <dir>/lock              held (flock) while a query runs; holds its pid
//! <dir>/metadata          query id, format version, plan fingerprint, sources
//! <dir>/log/<N>.log       the batch log: a `plan` record says what batch N
//!                         reads (written before it runs), a `commit` record
//!                         that it finished and its output is in the sink
//! <dir>/sources/<name>/   a source's own durable metadata (e.g. files taken)
//! <dir>/progress.jsonl    one progress record per committed batch
//! ```
//!
//! Every file but `lock`, `progress.jsonl` and the log is written atomically
//! and framed with a checksum (see [`sluice_common::durable`]); the log is
//! appended to, one checksummed record at a time (see [`crate::log`]).
//!
//! Checkpoints of format version 1, which kept one file per entry in
//! `offsets/` and `commits/`, are converted when a query opens them.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_common::durable::{self, Durability};
use sluice_common::{BatchId, Error, Progress, Result};

use crate::log::{BatchLog, LOG_DIR, numbered_files, read_log};
use crate::recovery::{self, Resume};

/// The version of the checkpoint format this build writes and reads.
/// Version 1 (an `offsets/` and a `commits/` directory of one file per
/// entry) is converted to it when a query opens the checkpoint. Version 2
/// is read as it is (version 3 only added what older builds would misread:
/// log segments and state deltas ending in zeros, and state deltas that
/// record evictions by bound), and marked 3 when a query opens it.
pub const FORMAT_VERSION: u32 = 3;

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

/// The `plan` record of batch N: everything it needs to be re-run
/// identically (`offsets/<N>` in format version 1).
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

/// The `commit` record of batch N: batch N is complete (`commits/<N>` in
/// format version 1).
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
    /// How many batches' plan and commit records stay in the batch log (at
    /// least: whole segments go).
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
    log: std::sync::Arc<BatchLog>,
    // Held for the life of the checkpoint: the OS drops the lock when the
    // process dies, so a crash never leaves a stale lock behind.
    _lock: File,
}

/// A plan record being appended (see [`Checkpoint::start_write_offsets`]).
#[derive(Debug)]
#[must_use = "the batch must wait for its plan record before its output is visible"]
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
        // A checkpoint in a bucket (`root` its mount's cache): the bucket,
        // not the cache, is the checkpoint. Synced under the lock, so a
        // second start in this process, which the lock refuses, cannot
        // remove files the running query has not put yet.
        sluice_common::remote::sync(root)?;
        // Holding the lock, no other process writes here: temporary files
        // of writes that a crash cut short can go.
        durable::remove_stale_temp_files(root);
        let mut sources: Vec<String> = sources.to_vec();
        sources.sort();
        let meta_path = root.join("metadata");
        let metadata = if meta_path.exists() {
            let mut m: Metadata = durable::read_json(&meta_path)?;
            if m.format_version == 1 {
                m = convert_version_1(root, m, options.durability)?;
            }
            if m.format_version == 2 {
                // From here on files of version 3 may be written: a build
                // that reads version 2 only must refuse the checkpoint.
                m.format_version = FORMAT_VERSION;
                durable::write_json(&meta_path, &m, options.durability)?;
            }
            if m.format_version != FORMAT_VERSION {
                return Err(Error::checkpoint(
                    &meta_path,
                    format!(
                        "format version {} is not supported by this build (it reads version {FORMAT_VERSION}, and converts versions 1 and 2)",
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
        let log = BatchLog::open(
            &root.join(LOG_DIR),
            options.durability,
            options.retain_batches,
        )?;
        Ok(Checkpoint {
            root: root.to_path_buf(),
            options,
            metadata,
            log: std::sync::Arc::new(log),
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

    /// The newest planned batch (the last `plan` record).
    pub fn last_offset_id(&self) -> Result<Option<BatchId>> {
        Ok(self.log.last_plan())
    }

    /// The newest committed batch (the last `commit` record).
    pub fn last_commit_id(&self) -> Result<Option<BatchId>> {
        Ok(self.log.last_commit())
    }

    /// What opening the checkpoint had to repair (a torn last log record,
    /// left by a crash while it was appended), for the progress warnings;
    /// told once.
    pub fn take_repaired(&self) -> Option<String> {
        self.log.take_repaired()
    }

    /// Batch `id`'s plan record.
    pub fn read_offsets(&self, id: BatchId) -> Result<OffsetEntry> {
        self.log.plan(id).ok_or_else(|| self.not_logged("plan", id))
    }

    /// Appends batch `entry.batch_id`'s plan record (before the batch runs).
    pub fn write_offsets(&self, entry: &OffsetEntry) -> Result<()> {
        self.log.append_plan(entry)
    }

    /// Starts appending batch `entry.batch_id`'s plan record and returns at
    /// once; the batch may run while the record is synced, as long as
    /// [`OffsetWrite::wait`] returns before anything of the batch is made
    /// visible outside the state store (its sink write, its commit record).
    /// With [`Durability::NoSync`] the append is done before this returns
    /// (a thread would cost more than it).
    pub fn start_write_offsets(&self, entry: &OffsetEntry) -> Result<OffsetWrite> {
        let t = std::time::Instant::now();
        if self.options.durability == Durability::NoSync {
            self.write_offsets(entry)?;
            return Ok(OffsetWrite::Done(t.elapsed()));
        }
        let log = std::sync::Arc::clone(&self.log);
        let entry = entry.clone();
        Ok(OffsetWrite::Running(std::thread::spawn(move || {
            log.append_plan(&entry).map(|()| t.elapsed())
        })))
    }

    /// Batch `id`'s commit record.
    pub fn read_commit(&self, id: BatchId) -> Result<CommitEntry> {
        self.log
            .commit(id)
            .ok_or_else(|| self.not_logged("commit", id))
    }

    /// Appends batch `entry.batch_id`'s commit record: from its return on,
    /// batch `id` is done. A failed append leaves no record behind.
    pub fn write_commit(&self, entry: &CommitEntry) -> Result<()> {
        self.log.append_commit(entry)
    }

    fn not_logged(&self, kind: &str, id: BatchId) -> Error {
        Error::checkpoint(
            self.root.join(LOG_DIR),
            format!("the batch log holds no {kind} record for batch {id}"),
        )
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
        roll_progress(&self.root, &path, progress.batch_id)?;
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
            .map_err(|e| Error::io(format!("appending to {}", path.display()), e))?;
        // In a checkpoint kept in a bucket, the file goes to it whole (at
        // most [`PROGRESS_ROLL_BYTES`] and a record).
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        sluice_common::remote::put_file(&path, len)
            .map_err(|e| Error::io(format!("putting {}", path.display()), e))
    }
}

/// `progress.jsonl` is rolled into `progress/` once it holds this much.
pub const PROGRESS_ROLL_BYTES: u64 = 256 * 1024;

/// How many rolled progress files are kept (the newest).
pub const PROGRESS_ROLLED_KEPT: usize = 4;

/// Before batch `batch`'s record is appended: a `progress.jsonl` of
/// [`PROGRESS_ROLL_BYTES`] or more is renamed to
/// `progress/<first batch id it holds>.jsonl` (20 digits; `batch` when its
/// first line does not parse), and rolled files past the newest
/// [`PROGRESS_ROLLED_KEPT`] go.
fn roll_progress(root: &Path, path: &Path, batch: BatchId) -> Result<()> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(_) => return Ok(()),
    };
    if len < PROGRESS_ROLL_BYTES {
        return Ok(());
    }
    let ctx = |e| Error::io(format!("rolling {}", path.display()), e);
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(File::open(path).map_err(ctx)?),
        &mut first,
    )
    .map_err(ctx)?;
    let first = serde_json::from_str::<Progress>(&first).map_or(batch, |p| p.batch_id);
    let dir = root.join(PROGRESS_DIR);
    fs::create_dir_all(&dir).map_err(ctx)?;
    let rolled = dir.join(format!("{first:020}.jsonl"));
    fs::rename(path, &rolled).map_err(ctx)?;
    sluice_common::remote::put_file(&rolled, len).map_err(ctx)?;
    sluice_common::remote::remove(path);
    let mut old = rolled_progress(root);
    let excess = old.len().saturating_sub(PROGRESS_ROLLED_KEPT);
    for p in old.drain(..excess) {
        let _ = fs::remove_file(&p);
        sluice_common::remote::remove(&p);
    }
    Ok(())
}

/// The directory of rolled progress files.
const PROGRESS_DIR: &str = "progress";

/// The rolled progress files, oldest first.
fn rolled_progress(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(root.join(PROGRESS_DIR))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| !n.starts_with('.') && n.ends_with(".jsonl"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The newest committed batch of the checkpoint at `root`, read without
/// taking its lock (for reading a running query's state).
pub fn last_committed(root: &Path) -> Result<Option<BatchId>> {
    Ok(read_last_commit(root)?.map(|c| c.batch_id))
}

/// The newest commit record of the checkpoint at `root` (with the watermark
/// at the end of that batch), read without taking its lock.
pub fn read_last_commit(root: &Path) -> Result<Option<CommitEntry>> {
    if !root.join(LOG_DIR).exists() && root.join("commits").exists() {
        // Format version 1, not opened by a query of this build yet.
        return match last_id(&root.join("commits"))? {
            Some(id) => Ok(Some(durable::read_json(
                &root.join("commits").join(id.to_string()),
            )?)),
            None => Ok(None),
        };
    }
    let log = read_log(&root.join(LOG_DIR))?;
    Ok(log.commits.into_values().next_back())
}

/// Converts a checkpoint of format version 1 (one file per entry in
/// `offsets/` and `commits/`) to this build's batch log, under the lock:
/// the last committed batch's plan and commit, and the plan of a batch that
/// did not commit, are written as the log's first segment in one atomic
/// write; then `metadata` is rewritten with the new version; then the old
/// directories go. A crash before `metadata` is rewritten leaves a version 1
/// checkpoint, converted again on the next open.
fn convert_version_1(root: &Path, mut m: Metadata, durability: Durability) -> Result<Metadata> {
    let offsets = root.join("offsets");
    let commits = root.join("commits");
    let (last_plan, last_commit) = (last_id(&offsets)?, last_id(&commits)?);
    let resume = recovery::decide(last_plan, last_commit)
        .map_err(|e| Error::checkpoint(root, e.to_string()))?;
    // Each entry must hold its own batch id, as version 1's reader checked.
    let own_id = |path: PathBuf, found: BatchId, id: BatchId| {
        if found == id {
            Ok(())
        } else {
            Err(Error::checkpoint(
                path,
                format!("holds batch {found} instead of {id}"),
            ))
        }
    };
    let read_plan = |id: BatchId| -> Result<OffsetEntry> {
        let path = offsets.join(id.to_string());
        let e: OffsetEntry = durable::read_json(&path)?;
        own_id(path, e.batch_id, id)?;
        Ok(e)
    };
    let mut segment = Vec::new();
    let mut push = |kind: &str, body: Vec<u8>| segment.extend(durable::record(kind, &body));
    let json = |v: serde_json::Result<Vec<u8>>| {
        v.map_err(|e| Error::internal(format!("serializing a log record: {e}")))
    };
    let mut first = None;
    if let Some(c) = last_commit {
        let path = commits.join(c.to_string());
        let commit: CommitEntry = durable::read_json(&path)?;
        own_id(path, commit.batch_id, c)?;
        push("plan", json(serde_json::to_vec(&read_plan(c)?))?);
        push("commit", json(serde_json::to_vec(&commit))?);
        first = Some(c);
    }
    if let Resume::Rerun { batch_id } = resume {
        push("plan", json(serde_json::to_vec(&read_plan(batch_id)?))?);
        first = first.or(Some(batch_id));
    }
    let log_dir = root.join(LOG_DIR);
    // What an interrupted conversion left.
    let _ = fs::remove_dir_all(&log_dir);
    if let Some(first) = first {
        durable::write_atomic(
            &log_dir.join(format!("{first:020}.log")),
            &segment,
            durability,
        )?;
    }
    m.format_version = FORMAT_VERSION;
    durable::write_json(&root.join("metadata"), &m, durability)?;
    let _ = fs::remove_dir_all(&offsets);
    let _ = fs::remove_dir_all(&commits);
    Ok(m)
}

/// Reads the progress records of the checkpoint at `root`, oldest first,
/// skipping a torn last line.
pub fn read_progress(root: &Path) -> Result<Vec<Progress>> {
    let mut out = Vec::new();
    let mut files = rolled_progress(root);
    files.push(root.join("progress.jsonl"));
    for path in files {
        // Bytes, not text: a damaged log may hold anything, and only the
        // lines that parse count.
        let text = match fs::read(&path) {
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        out.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Progress>(l).ok()),
        );
    }
    Ok(out)
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

/// The newest id in a version 1 log directory (`offsets/`, `commits/`).
fn last_id(dir: &Path) -> Result<Option<BatchId>> {
    let files = numbered_files(
        dir,
        "",
        "unexpected file in a log directory (names are batch ids)",
    )?;
    Ok(files.last().map(|(id, _)| *id))
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
    fn progress_rolls_into_a_few_files_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ck = open(dir.path()).unwrap();
        let name = "x".repeat(4000);
        let n = 400;
        for id in 0..n {
            let p = Progress {
                name: name.clone(),
                batch_id: id,
                ..Progress::default()
            };
            ck.append_progress(&p).unwrap();
        }
        let rolled = rolled_progress(dir.path());
        assert_eq!(rolled.len(), PROGRESS_ROLLED_KEPT, "{rolled:?}");
        assert!(
            fs::metadata(dir.path().join("progress.jsonl"))
                .unwrap()
                .len()
                < PROGRESS_ROLL_BYTES + 5000
        );
        let ids: Vec<BatchId> = read_progress(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.batch_id)
            .collect();
        // The newest records, in order, none twice, up to the last.
        assert_eq!(*ids.last().unwrap(), n - 1);
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        assert!(
            ids.len() as u64 > 4 * PROGRESS_ROLL_BYTES / 4100,
            "{}",
            ids.len()
        );
        // Each rolled file is named after its first record.
        let first = ids[0];
        assert_eq!(
            rolled[0].file_name().unwrap().to_str().unwrap(),
            format!("{first:020}.jsonl")
        );
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

    fn commit(id: BatchId) -> CommitEntry {
        CommitEntry {
            batch_id: id,
            committed_ms: 0,
            output_rows: 0,
            watermark_ms: Some(5),
            event_time_max_ms: BTreeMap::new(),
            last_data_ms: BTreeMap::new(),
        }
    }

    #[test]
    fn a_version_1_checkpoint_is_converted_and_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        // As version 1 left it: batches 0 to 2 committed, 3 planned.
        let meta = dir.path().join("metadata");
        let mut m: Metadata = durable::read_json(&meta).unwrap();
        m.format_version = 1;
        durable::write_json(&meta, &m, Durability::NoSync).unwrap();
        assert!(!dir.path().join(LOG_DIR).exists(), "nothing logged yet");
        for id in 0..4 {
            let at = |log: &str| dir.path().join(log).join(id.to_string());
            durable::write_json(&at("offsets"), &offsets(id), Durability::NoSync).unwrap();
            if id < 3 {
                durable::write_json(&at("commits"), &commit(id), Durability::NoSync).unwrap();
            }
        }
        assert_eq!(last_committed(dir.path()).unwrap(), Some(2));
        let cp = open(dir.path()).unwrap();
        assert_eq!(cp.metadata().format_version, FORMAT_VERSION);
        assert_eq!(cp.resume().unwrap(), Resume::Rerun { batch_id: 3 });
        assert_eq!(cp.read_offsets(3).unwrap(), offsets(3));
        assert_eq!(cp.read_offsets(2).unwrap(), offsets(2));
        assert_eq!(cp.read_commit(2).unwrap(), commit(2));
        assert!(!dir.path().join("offsets").exists() && !dir.path().join("commits").exists());
        cp.write_commit(&commit(3)).unwrap();
        drop(cp);
        assert_eq!(read_last_commit(dir.path()).unwrap(), Some(commit(3)));
        let cp = open(dir.path()).unwrap();
        assert_eq!(cp.resume().unwrap(), Resume::Next { next: 4 });
        // A version 2 checkpoint is read as it is, and marked version 3.
        drop(cp);
        let mut m: Metadata = durable::read_json(&meta).unwrap();
        m.format_version = 2;
        durable::write_json(&meta, &m, Durability::NoSync).unwrap();
        let cp = open(dir.path()).unwrap();
        assert_eq!(cp.resume().unwrap(), Resume::Next { next: 4 });
        drop(cp);
        let m: Metadata = durable::read_json(&meta).unwrap();
        assert_eq!(m.format_version, 3);
        // Another version is refused by name.
        let mut m: Metadata = durable::read_json(&meta).unwrap();
        m.format_version = 9;
        durable::write_json(&meta, &m, Durability::NoSync).unwrap();
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("format version 9 is not supported"), "{e}");
    }
}
