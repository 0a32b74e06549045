//! The batch log: one append-only file of checksummed records that says what
//! each batch reads (`plan`) and that it is done (`commit`).
//!
//! ```text
//! <checkpoint>/log/00000000000000000000.log
//!     plan len=<bytes> crc32=<hex> {"batch_id":0,...}
//!     commit len=<bytes> crc32=<hex> {"batch_id":0,...}
//!     plan len=<bytes> crc32=<hex> {"batch_id":1,...}
//!     ...
//! <checkpoint>/log/00000000000000000412.log   the next segment, from batch 412
//! ```
//!
//! A batch costs two appends to a file that already exists, each synced with
//! `fdatasync`: no file is created, renamed or deleted and no directory is
//! synced on a batch's path, which is most of what a durable batch cost when
//! each entry was a file of its own. With fsync on, a segment is created
//! filled with zeros and records are written over them, so an append does
//! not change the file's size and its sync flushes data only; the records
//! end where the zeros to the end of the file begin. A segment is closed once it holds
//! [`SEGMENT_BYTES`]; the next plan starts a new one (a new file, its directory
//! synced), and segments whose batches have all fallen out of retention are
//! deleted then.
//!
//! A crash in the middle of an append leaves a torn last record. Reading
//! tells it apart from damage: a bad record is *torn* only when it is in the
//! last segment, no valid record follows it, and it looks like an append cut
//! short — the bytes end before the record does, or hold NUL bytes (never
//! in a record; what a file system fills unwritten blocks with after a power
//! loss, and what a record written part-way over the zeros leaves). A
//! complete last record with a wrong checksum is damage, and so is a valid
//! record after zeros (a hole). A writer opening the log cuts
//! the torn bytes off (the batch whose record it was is then re-planned or
//! re-run, exactly as if the crash had come before the append); a bad record
//! anywhere else is a checkpoint error naming the segment and the byte where
//! the record starts.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sluice_common::durable::{self, BadRecord, Durability, io_step, read_record, record};
use sluice_common::{BatchId, Error, Result};

use crate::checkpoint::{CommitEntry, OffsetEntry};

/// The log's directory in a checkpoint.
pub const LOG_DIR: &str = "log";

/// A segment is closed once it holds this many bytes (about 700 one-source
/// batches).
pub const SEGMENT_BYTES: u64 = 256 * 1024;

/// A durable segment is created holding this many zeros: room for the
/// records up to [`SEGMENT_BYTES`] and the few after it before it rolls.
const PREPARED_BYTES: usize = SEGMENT_BYTES as usize + 64 * 1024;

/// What a log holds, read from its segments.
#[derive(Debug, Default, Clone)]
pub struct LogContents {
    /// The segments, oldest first: the first batch id each was started for,
    /// and its path.
    pub segments: Vec<(BatchId, PathBuf)>,
    /// The plan records (offset entries) of the retained segments.
    pub plans: BTreeMap<BatchId, OffsetEntry>,
    /// The commit records of the retained segments.
    pub commits: BTreeMap<BatchId, CommitEntry>,
    /// A torn last record: its segment, the byte where it starts (where the
    /// good bytes end), and what is wrong with it.
    pub torn: Option<(PathBuf, u64, String)>,
    /// Bytes of good records in the last segment.
    pub last_len: u64,
}

impl LogContents {
    /// The newest planned batch.
    pub fn last_plan(&self) -> Option<BatchId> {
        self.plans.keys().next_back().copied()
    }

    /// The newest committed batch.
    pub fn last_commit(&self) -> Option<BatchId> {
        self.commits.keys().next_back().copied()
    }

    /// Whether a plan of batch `id` may come next: plans are numbered one
    /// after another, each committed before the next is planned.
    fn check_plan(&self, id: BatchId) -> std::result::Result<(), String> {
        let Some(last) = self.last_plan() else {
            return Ok(());
        };
        if id != last + 1 {
            return Err(format!(
                "plans batch {id} after batch {last}: plans must be numbered one after another"
            ));
        }
        if self.last_commit() != Some(last) {
            return Err(format!("plans batch {id} before batch {last} committed"));
        }
        Ok(())
    }

    /// Whether a commit of batch `id` may come next: only the last batch
    /// planned, once.
    fn check_commit(&self, id: BatchId) -> std::result::Result<(), String> {
        if self.last_plan() != Some(id) || self.last_commit() == Some(id) {
            return Err(format!(
                "commits batch {id}, which is not the last batch planned ({})",
                self.last_plan()
                    .map_or_else(|| "none".to_string(), |b| b.to_string())
            ));
        }
        Ok(())
    }
}

fn segment_name(first: BatchId) -> String {
    format!("{first:020}.log")
}

/// Lists the segments of the log in `dir`, oldest first (none if the
/// directory does not exist).
fn segments(dir: &Path) -> Result<Vec<(BatchId, PathBuf)>> {
    numbered_files(
        dir,
        ".log",
        "unexpected file in the batch log (segments are named <first batch id>.log)",
    )
}

/// The files of `dir` named `<batch id><suffix>`, in id order (none if the
/// directory does not exist); names starting with `.` (temporary files of
/// interrupted writes) are skipped, and any other name is the checkpoint
/// error `unexpected`.
pub(crate) fn numbered_files(
    dir: &Path,
    suffix: &str,
    unexpected: &str,
) -> Result<Vec<(BatchId, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue; // a temporary file of an interrupted write
        }
        let id = name
            .strip_suffix(suffix)
            .and_then(|n| n.parse::<BatchId>().ok())
            .ok_or_else(|| Error::checkpoint(e.path(), unexpected))?;
        out.push((id, e.path()));
    }
    out.sort();
    Ok(out)
}

/// Whether a valid record starts anywhere in `bytes` after `from` (at the
/// start of a line, or after a zero byte: a hole in the records): then a
/// bad record at `from` is damage, not a torn end.
fn valid_record_after(bytes: &[u8], from: usize) -> bool {
    (from + 1..bytes.len()).any(|i| {
        (bytes[i - 1] == b'\n' || bytes[i - 1] == 0)
            && (bytes[i..].starts_with(b"plan ") || bytes[i..].starts_with(b"commit "))
            && read_record(&bytes[i..]).is_ok()
    })
}

/// The bytes of the bad record at `pos`: as far as its header says when it
/// does, else to the end (where the zeros a segment is created with are
/// not the record's own).
fn record_bytes<'a>(bytes: &'a [u8], pos: usize, bad: &BadRecord) -> &'a [u8] {
    let end = bad
        .extent
        .map_or(bytes.len(), |n| (pos + n).min(bytes.len()));
    &bytes[pos..end]
}

/// Reads the log in `dir`: every record of every segment, checked. A torn
/// last record is reported in [`LogContents::torn`], not as an error (a
/// reader that does not hold the checkpoint's lock may also see the record
/// a running query is appending as torn); any other bad record, or records
/// out of order, is a checkpoint error naming the segment and the byte.
pub fn read_log(dir: &Path) -> Result<LogContents> {
    let mut out = LogContents {
        segments: segments(dir)?,
        ..LogContents::default()
    };
    let count = out.segments.len();
    for (i, (_, path)) in out.segments.clone().iter().enumerate() {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            // A reader without the lock can list a segment that the running
            // query's retention deletes before it is read: its batches are
            // older than any kept, so nothing is missed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && i + 1 < count => continue,
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        read_segment(&mut out, path, &bytes, i + 1 == count)?;
    }
    Ok(out)
}

/// Adds the records of one segment (`bytes`, read from `path`) to `out`;
/// `last` when it is the log's last segment, the only one whose end may be
/// torn. Public for the checkpoint readers' fuzz target.
pub fn read_segment(out: &mut LogContents, path: &Path, bytes: &[u8], last: bool) -> Result<()> {
    let mut pos = 0;
    while pos < bytes.len() {
        // A segment is created filled with zeros (see
        // `BatchLog::start_segment`): its records end where they start.
        if bytes[pos..].iter().all(|b| *b == 0) {
            break;
        }
        let at =
            |reason: String| Error::checkpoint(path, format!("record at byte {pos}: {reason}"));
        match read_record(&bytes[pos..]) {
            Ok(r) => {
                apply(out, r.kind, r.body).map_err(at)?;
                pos += r.len;
            }
            Err(bad)
                if last
                    && (bad.cut_short || record_bytes(bytes, pos, &bad).contains(&0))
                    && !valid_record_after(bytes, pos) =>
            {
                out.torn = Some((path.to_path_buf(), pos as u64, bad.reason));
                break;
            }
            Err(bad) => return Err(at(bad.reason)),
        }
    }
    out.last_len = pos as u64;
    Ok(())
}

/// Adds one record to `log`, checking that it follows the protocol: plans
/// numbered one after another, each committed before the next is planned.
fn apply(log: &mut LogContents, kind: &str, body: &[u8]) -> std::result::Result<(), String> {
    let parse_err =
        |e: serde_json::Error| format!("checksum is right but the content does not parse: {e}");
    match kind {
        "plan" => {
            let e: OffsetEntry = serde_json::from_slice(body).map_err(parse_err)?;
            log.check_plan(e.batch_id)?;
            log.plans.insert(e.batch_id, e);
        }
        "commit" => {
            let e: CommitEntry = serde_json::from_slice(body).map_err(parse_err)?;
            log.check_commit(e.batch_id)?;
            log.commits.insert(e.batch_id, e);
        }
        other => return Err(format!("unknown record kind '{}'", other.escape_debug())),
    }
    Ok(())
}

/// The open segment a writer appends to.
#[derive(Debug)]
struct Open {
    file: File,
    path: PathBuf,
    len: u64,
}

#[derive(Debug)]
struct Writer {
    log: LogContents,
    open: Option<Open>,
    /// Set when a failed append could not be undone: the segment may end in
    /// a partial record, so no more records go after it until a restart
    /// (whose read cuts the partial record off).
    broken: Option<String>,
}

/// The writer of a checkpoint's batch log (one per checkpoint, under its
/// lock). Appends are serialized: a plan may be appended on a thread of its
/// own while the batch runs.
#[derive(Debug)]
pub struct BatchLog {
    dir: PathBuf,
    durability: Durability,
    retain: u64,
    writer: Mutex<Writer>,
    repaired: Mutex<Option<String>>,
}

impl BatchLog {
    /// Opens the log in `dir` for appending, cutting a torn last record off.
    /// `retain` batches' records stay readable.
    pub fn open(dir: &Path, durability: Durability, retain: u64) -> Result<BatchLog> {
        let log = read_log(dir)?;
        let mut repaired = None;
        if let Some((path, at, reason)) = &log.torn {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            f.set_len(*at)
                .and_then(|()| {
                    if durability == Durability::Fsync {
                        f.sync_data()
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| {
                    Error::io(format!("cutting the torn end off {}", path.display()), e)
                })?;
            repaired = Some(format!(
                "{} ended in a torn record at byte {at} ({reason}), left by a crash while it was appended; it was cut off and its batch runs again",
                path.display()
            ));
        }
        let open = match log.segments.last() {
            Some((_, path)) => Some(Open {
                file: OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?,
                path: path.clone(),
                len: log.last_len,
            }),
            None => None,
        };
        Ok(BatchLog {
            dir: dir.to_path_buf(),
            durability,
            retain,
            writer: Mutex::new(Writer {
                log,
                open,
                broken: None,
            }),
            repaired: Mutex::new(repaired),
        })
    }

    /// What opening the log had to repair (a torn last record), if anything;
    /// told once.
    pub fn take_repaired(&self) -> Option<String> {
        self.repaired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest planned batch.
    pub fn last_plan(&self) -> Option<BatchId> {
        self.writer().log.last_plan()
    }

    /// The newest committed batch.
    pub fn last_commit(&self) -> Option<BatchId> {
        self.writer().log.last_commit()
    }

    /// Batch `id`'s plan, if the log still holds it.
    pub fn plan(&self, id: BatchId) -> Option<OffsetEntry> {
        self.writer().log.plans.get(&id).cloned()
    }

    /// Batch `id`'s commit, if the log still holds it.
    pub fn commit(&self, id: BatchId) -> Option<CommitEntry> {
        self.writer().log.commits.get(&id).cloned()
    }

    /// Appends batch `entry.batch_id`'s plan: durable when this returns.
    pub fn append_plan(&self, entry: &OffsetEntry) -> Result<()> {
        let body = serde_json::to_vec(entry)
            .map_err(|e| Error::internal(format!("serializing a plan record: {e}")))?;
        let mut w = self.writer();
        // Checked against the protocol before it is written, as a reader
        // would check it.
        w.log.check_plan(entry.batch_id).map_err(Error::internal)?;
        let roll = w.open.as_ref().is_none_or(|o| o.len >= SEGMENT_BYTES);
        if roll {
            self.start_segment(&mut w, entry.batch_id)?;
        }
        self.append(&mut w, "plan", &body)?;
        w.log.plans.insert(entry.batch_id, entry.clone());
        Ok(())
    }

    /// Appends batch `entry.batch_id`'s commit: from its return on, the
    /// batch is done.
    pub fn append_commit(&self, entry: &CommitEntry) -> Result<()> {
        let body = serde_json::to_vec(entry)
            .map_err(|e| Error::internal(format!("serializing a commit record: {e}")))?;
        let mut w = self.writer();
        w.log
            .check_commit(entry.batch_id)
            .map_err(Error::internal)?;
        if w.open.is_none() {
            self.start_segment(&mut w, entry.batch_id)?;
        }
        self.append(&mut w, "commit", &body)?;
        w.log.commits.insert(entry.batch_id, entry.clone());
        Ok(())
    }

    /// Starts the segment of batch `first` (a new file, its directory
    /// synced), then deletes the segments and forgets the records that
    /// retention no longer needs.
    fn start_segment(&self, w: &mut Writer, first: BatchId) -> Result<()> {
        let path = self.dir.join(segment_name(first));
        let ctx = || format!("starting {}", path.display());
        let new_dir = !self.dir.exists();
        fs::create_dir_all(&self.dir).map_err(|e| Error::io(ctx(), e))?;
        io_step("creating", &path).map_err(|e| Error::io(ctx(), e))?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(ctx(), e))?;
        // A segment of that name can only be one a crash left empty, zeros
        // or torn after the last good record (cut off at open): appending
        // goes after its records, which end with the last byte that is not
        // a zero.
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| Error::io(ctx(), e))?;
        let len = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1) as u64;
        if self.durability == Durability::Fsync {
            if bytes.is_empty() {
                // Filled with zeros, synced: an append then overwrites
                // blocks the file already has, and its `fdatasync` has no
                // size to record (`docs/checkpoint-format.md`).
                file.write_all(&vec![0; PREPARED_BYTES])
                    .and_then(|()| file.sync_data())
                    .map_err(|e| Error::io(ctx(), e))?;
            }
            durable::sync_dir(&self.dir).map_err(|e| Error::io(ctx(), e))?;
            if new_dir && let Some(parent) = self.dir.parent() {
                durable::sync_dir(parent).map_err(|e| Error::io(ctx(), e))?;
            }
        }
        w.open = Some(Open { file, path, len });
        if !w.log.segments.iter().any(|(id, _)| *id == first) {
            w.log
                .segments
                .push((first, self.dir.join(segment_name(first))));
        }
        // A segment can go once the next one starts at or before the
        // oldest batch kept: every record it holds is older.
        let keep_from = first.saturating_sub(self.retain);
        while w.log.segments.len() > 1 && w.log.segments[1].0 <= keep_from {
            let (_, old) = w.log.segments.remove(0);
            let _ = fs::remove_file(&old);
            sluice_common::remote::remove(&old);
        }
        let oldest = w.log.segments[0].0;
        w.log.plans.retain(|id, _| *id >= oldest);
        w.log.commits.retain(|id, _| *id >= oldest);
        Ok(())
    }

    /// Appends one record to the open segment, synced. A failed append is
    /// undone (the segment cut back to its last good record) so the next
    /// record does not follow a partial one.
    fn append(&self, w: &mut Writer, kind: &str, body: &[u8]) -> Result<()> {
        if let Some(why) = &w.broken {
            return Err(Error::internal(format!(
                "the batch log cannot be appended to after a failed write that could not be undone ({why}); restart the query"
            )));
        }
        let bytes = record(kind, body);
        let durability = self.durability;
        let open = w
            .open
            .as_mut()
            .ok_or_else(|| Error::internal("no open log segment"))?;
        let path = open.path.clone();
        let result = (|| {
            use std::os::unix::fs::FileExt;
            io_step("appending a record to", &path)?;
            let half = bytes.len() / 2;
            open.file.write_all_at(&bytes[..half], open.len)?;
            io_step("half-way through appending a record to", &path)?;
            open.file
                .write_all_at(&bytes[half..], open.len + half as u64)?;
            if durability == Durability::Fsync {
                io_step("syncing", &path)?;
                open.file.sync_data()?;
            }
            // In a mounted checkpoint, the segment as it now is goes to the
            // bucket in one put: the record counts once the bucket has it.
            sluice_common::remote::put_file(&path, open.len + bytes.len() as u64)
        })();
        match result {
            Ok(()) => {
                open.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(undo) = open.file.set_len(open.len) {
                    w.broken = Some(format!("{}: {undo}", path.display()));
                }
                Err(Error::io(
                    format!("appending a {kind} record to {}", path.display()),
                    e,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(id: BatchId) -> OffsetEntry {
        OffsetEntry {
            batch_id: id,
            timestamp_ms: 7,
            sources: BTreeMap::new(),
            watermark_ms: None,
            config: BTreeMap::new(),
        }
    }

    fn commit(id: BatchId) -> CommitEntry {
        CommitEntry {
            batch_id: id,
            committed_ms: 9,
            output_rows: 1,
            watermark_ms: Some(3),
            event_time_max_ms: BTreeMap::new(),
            last_data_ms: BTreeMap::new(),
        }
    }

    fn run(log: &BatchLog, ids: std::ops::Range<BatchId>) {
        for id in ids {
            log.append_plan(&plan(id)).unwrap();
            log.append_commit(&commit(id)).unwrap();
        }
    }

    #[test]
    fn records_round_trip_and_reopen_where_they_left_off() {
        let dir = tempfile::tempdir().unwrap();
        let log = BatchLog::open(dir.path(), Durability::NoSync, 100).unwrap();
        assert_eq!((log.last_plan(), log.last_commit()), (None, None));
        run(&log, 0..3);
        log.append_plan(&plan(3)).unwrap();
        drop(log);
        let log = BatchLog::open(dir.path(), Durability::NoSync, 100).unwrap();
        assert_eq!((log.last_plan(), log.last_commit()), (Some(3), Some(2)));
        assert_eq!(log.plan(3), Some(plan(3)));
        assert_eq!(log.commit(1), Some(commit(1)));
        assert!(log.take_repaired().is_none());
        log.append_commit(&commit(3)).unwrap();
        let text = fs::read_to_string(dir.path().join(segment_name(0))).unwrap();
        assert_eq!(text.lines().count(), 8, "{text}");
        assert!(text.starts_with("plan len="), "{text}");
    }

    #[test]
    fn records_out_of_protocol_are_refused_before_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = BatchLog::open(dir.path(), Durability::NoSync, 100).unwrap();
        assert!(log.append_commit(&commit(0)).is_err());
        log.append_plan(&plan(0)).unwrap();
        assert!(log.append_plan(&plan(1)).is_err(), "0 is not committed");
        log.append_commit(&commit(0)).unwrap();
        assert!(log.append_commit(&commit(0)).is_err(), "committed twice");
        assert!(log.append_plan(&plan(2)).is_err(), "1 skipped");
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_damage_elsewhere_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let log = BatchLog::open(dir.path(), Durability::NoSync, 100).unwrap();
        run(&log, 0..2);
        drop(log);
        let path = dir.path().join(segment_name(0));
        let good = fs::read(&path).unwrap();
        // Every cut inside the last record is a torn record: batch 1 is
        // planned but not committed.
        let last_start = good[..good.len() - 1]
            .iter()
            .rposition(|b| *b == b'\n')
            .unwrap()
            + 1;
        for cut in last_start + 1..good.len() {
            fs::write(&path, &good[..cut]).unwrap();
            let log = BatchLog::open(dir.path(), Durability::NoSync, 100).unwrap();
            assert!(log.take_repaired().unwrap().contains("torn"), "cut {cut}");
            assert_eq!((log.last_plan(), log.last_commit()), (Some(1), Some(0)));
            log.append_commit(&commit(1)).unwrap();
            drop(log);
            assert_eq!(fs::read(&path).unwrap(), good, "cut {cut}");
        }
        // A damaged byte in the last record, complete: damage, not a tear.
        let mut bad = good.clone();
        bad[good.len() - 3] ^= 0x20;
        fs::write(&path, &bad).unwrap();
        let e = BatchLog::open(dir.path(), Durability::NoSync, 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        // NUL bytes where the last record should be: a power loss.
        let mut zeros = good[..last_start].to_vec();
        zeros.extend([0u8; 300]);
        fs::write(&path, &zeros).unwrap();
        let log = BatchLog::open(dir.path(), Durability::NoSync, 100).unwrap();
        assert_eq!((log.last_plan(), log.last_commit()), (Some(1), Some(0)));
        drop(log);
        // A damaged byte in an earlier record, with good records after it.
        let mut bad = good.clone();
        let in_body = good.iter().position(|b| *b == b'{').unwrap() + 2;
        bad[in_body] ^= 0x20;
        fs::write(&path, &bad).unwrap();
        let e = BatchLog::open(dir.path(), Durability::NoSync, 100)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("record at byte 0"),
            "{e}"
        );
    }

    #[test]
    fn a_durable_segment_is_zeros_written_over_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        let log = BatchLog::open(dir.path(), Durability::Fsync, 100).unwrap();
        run(&log, 0..2);
        let size = fs::metadata(&path).unwrap().len();
        assert_eq!(size, PREPARED_BYTES as u64, "created as zeros");
        log.append_plan(&plan(2)).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), size, "no growth");
        drop(log);
        // Reopened, it reads its records, sees no tear in the zeros, and
        // appends right after the last record.
        let log = BatchLog::open(dir.path(), Durability::Fsync, 100).unwrap();
        assert!(log.take_repaired().is_none());
        assert_eq!((log.last_plan(), log.last_commit()), (Some(2), Some(1)));
        log.append_commit(&commit(2)).unwrap();
        drop(log);
        let bytes = fs::read(&path).unwrap();
        let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
        let text = std::str::from_utf8(&bytes[..end]).unwrap();
        assert_eq!(text.lines().count(), 6, "{text}");
        // A record torn inside the zeros (its end never written) is cut off
        // at open, and the batch's record is written again in its place.
        let torn_at = end;
        let mut torn = bytes.clone();
        let rec = record("plan", &serde_json::to_vec(&plan(3)).unwrap());
        torn[torn_at..torn_at + rec.len() / 2].copy_from_slice(&rec[..rec.len() / 2]);
        fs::write(&path, &torn).unwrap();
        let log = BatchLog::open(dir.path(), Durability::Fsync, 100).unwrap();
        assert!(log.take_repaired().unwrap().contains("torn"));
        assert_eq!(log.last_plan(), Some(2));
        log.append_plan(&plan(3)).unwrap();
        drop(log);
        let log = BatchLog::open(dir.path(), Durability::Fsync, 100).unwrap();
        assert_eq!((log.last_plan(), log.last_commit()), (Some(3), Some(2)));
        drop(log);
        // A good record after zeros is damage, not an end.
        let mut gap = bytes[..end].to_vec();
        gap.extend([0u8; 100]);
        gap.extend(record("plan", &serde_json::to_vec(&plan(3)).unwrap()));
        fs::write(&path, &gap).unwrap();
        let e = BatchLog::open(dir.path(), Durability::Fsync, 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("record at byte {end}")), "{e}");
    }

    #[test]
    fn segments_roll_and_old_ones_go_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let log = BatchLog::open(dir.path(), Durability::NoSync, 10).unwrap();
        // Big plans fill a segment quickly: about 12 batches a segment.
        let mut starts = std::collections::BTreeSet::new();
        let id = 60;
        for id in 0..id {
            let mut p = plan(id);
            p.config.insert("pad".into(), "x".repeat(20_000));
            log.append_plan(&p).unwrap();
            log.append_commit(&commit(id)).unwrap();
            starts.extend(segments(dir.path()).unwrap().into_iter().map(|s| s.0));
        }
        assert!(starts.len() >= 4, "segments started: {starts:?}");
        let segs = segments(dir.path()).unwrap();
        assert!(segs[0].0 > 0, "the first segment went: {segs:?}");
        // What is kept reaches back at least `retain` batches.
        assert!(segs[0].0 <= id - 10, "{segs:?}");
        // Every retained batch reads back, after a reopen too.
        drop(log);
        let log = BatchLog::open(dir.path(), Durability::NoSync, 10).unwrap();
        assert_eq!(log.last_commit(), Some(id - 1));
        assert!(log.plan(id - 10).is_some());
    }
}
