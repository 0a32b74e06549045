//! Checksummed files: how Sluice writes anything that a restart reads back
//! (checkpoint metadata, state, source logs), atomically unless the file
//! belongs to a batch whose commit record is still to come.
//!
//! A framed file is a one-line header followed by the body:
//!
//! ```text
//! sluice/1 len=57 crc32=1c291ca3
//! {"batch_id":3,"sources":{...}}
//! ```
//!
//! so it can still be read with `cat`. A write goes to a temporary file in the
//! same directory, is synced, then renamed over the target (and the directory
//! synced), so a reader sees the old file or the new one, never half of one.
//! A reader checks the length and the CRC-32 and names the file when either
//! is wrong. A few writes skip the temporary file, for files nothing reads
//! until a later record says they are complete: [`write_framed_in_place`]
//! (into a file [`prepare_zeroed`] made ahead) and [`write_unlinked`].

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

const MAGIC: &str = "sluice/1";

/// Whether writes are synced to disk before they count as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// fsync the file and its directory: survives a power loss.
    #[default]
    Fsync,
    /// Rename only: survives a process crash, not a power loss (faster).
    NoSync,
}

/// Frames `body` with its length and checksum.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let header = frame_header(body);
    let mut out = Vec::with_capacity(header.len() + body.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out
}

/// The header line of a framed file holding `body`.
fn frame_header(body: &[u8]) -> String {
    format!(
        "{MAGIC} len={} crc32={:08x}\n",
        body.len(),
        crc32fast::hash(body)
    )
}

/// One record of an append-only log: `<kind> len=<n> crc32=<hex> <body>\n`,
/// one line when the body is one line (compact JSON), so a log can be read
/// with `cat`. The checksum covers the kind, a space and the body, so a
/// damaged kind is caught as well as a damaged body.
pub fn record(kind: &str, body: &[u8]) -> Vec<u8> {
    let header = format!(
        "{kind} len={} crc32={:08x} ",
        body.len(),
        record_crc(kind.as_bytes(), body)
    );
    let mut out = Vec::with_capacity(header.len() + body.len() + 1);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out.push(b'\n');
    out
}

fn record_crc(kind: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(b" ");
    h.update(body);
    h.finalize()
}

/// A record read back by [`read_record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its kind (the first word).
    pub kind: &'a str,
    /// Its checked body.
    pub body: &'a [u8],
    /// Bytes the record takes, its newline included.
    pub len: usize,
}

/// Why [`read_record`] refused a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// The bytes end before the record does (its header, or the body its
    /// length announces): what an append cut short by a crash leaves.
    pub cut_short: bool,
    /// The bytes the record takes, its newline included, when its header
    /// says and they are all there (`None`: unknown).
    pub extent: Option<usize>,
    /// What is wrong, for an error message.
    pub reason: String,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Reads the record at the start of `bytes`, checking its length, its
/// checksum and its closing newline; `Err` says what is wrong (the caller
/// names the file and the position). The longest header is bounded, so a
/// damaged one is refused without reading far.
pub fn read_record(bytes: &[u8]) -> std::result::Result<Record<'_>, BadRecord> {
    let bad = |reason: String| BadRecord {
        cut_short: false,
        extent: None,
        reason,
    };
    let short = |reason: String| BadRecord {
        cut_short: true,
        extent: None,
        reason,
    };
    // "<kind> len=<20 digits> crc32=<8> ": kinds are short words.
    let head_end = bytes
        .iter()
        .take(80)
        .enumerate()
        .filter(|(_, b)| **b == b' ')
        .nth(2)
        .map(|(i, _)| i)
        .ok_or_else(|| {
            if bytes.len() < 80 {
                short("the record ends inside its header".to_string())
            } else {
                bad("not a record header".to_string())
            }
        })?;
    let header = std::str::from_utf8(&bytes[..head_end])
        .map_err(|_| bad("the record header is not UTF-8".to_string()))?;
    let mut parts = header.split(' ');
    let kind = parts.next().unwrap_or_default();
    let len = parts
        .next()
        .and_then(|p| p.strip_prefix("len="))
        .and_then(|v| v.parse::<usize>().ok());
    let crc = parts
        .next()
        .and_then(|p| p.strip_prefix("crc32="))
        .and_then(|v| u32::from_str_radix(v, 16).ok());
    let (Some(len), Some(crc)) = (len, crc) else {
        return Err(bad(format!(
            "corrupt record header '{}'",
            header.escape_debug()
        )));
    };
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(bad(format!(
            "corrupt record header '{}'",
            header.escape_debug()
        )));
    }
    let start = head_end + 1;
    let end = start
        .checked_add(len)
        .filter(|e| *e < bytes.len())
        .ok_or_else(|| {
            short(format!(
                "the record is cut short: its header says {len} bytes, {} follow",
                bytes.len() - start.min(bytes.len())
            ))
        })?;
    let complete = |reason: String| BadRecord {
        cut_short: false,
        extent: Some(end + 1),
        reason,
    };
    if bytes[end] != b'\n' {
        return Err(complete(
            "the record does not end where its length says".to_string(),
        ));
    }
    let body = &bytes[start..end];
    let actual = record_crc(kind.as_bytes(), body);
    if actual != crc {
        return Err(complete(format!(
            "checksum mismatch (expected {crc:08x}, found {actual:08x}): the record is corrupt"
        )));
    }
    Ok(Record {
        kind,
        body,
        len: end + 1,
    })
}

/// Checks the frame of `bytes` (read from `path`) and returns the body.
pub fn unframe<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8]> {
    let bad = |reason: String| Error::checkpoint(path, reason);
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| bad("truncated or not a Sluice file: no header line".into()))?;
    let header =
        std::str::from_utf8(&bytes[..nl]).map_err(|_| bad("corrupt header: not UTF-8".into()))?;
    let mut parts = header.split(' ');
    if parts.next() != Some(MAGIC) {
        return Err(bad(format!(
            "not a Sluice file (header '{}')",
            header.escape_debug()
        )));
    }
    let mut len = None;
    let mut crc = None;
    for p in parts {
        if let Some(v) = p.strip_prefix("len=") {
            len = v.parse::<usize>().ok();
        } else if let Some(v) = p.strip_prefix("crc32=") {
            crc = u32::from_str_radix(v, 16).ok();
        }
    }
    let (Some(len), Some(crc)) = (len, crc) else {
        return Err(bad(format!("corrupt header '{}'", header.escape_debug())));
    };
    let rest = &bytes[nl + 1..];
    // A file prepared ahead (see [`prepare_zeroed`]) keeps the zeros after
    // a shorter body: only zeros may follow the body.
    let padded = rest.len() > len && rest[len..].iter().any(|b| *b != 0);
    if rest.len() < len || padded {
        return Err(bad(format!(
            "truncated or padded: header says {len} bytes, file has {}",
            rest.len()
        )));
    }
    let body = &rest[..len];
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(bad(format!(
            "checksum mismatch (expected {crc:08x}, found {actual:08x}): the file is corrupt"
        )));
    }
    Ok(body)
}

/// Writes `bytes` to `path` atomically (temp file + rename), creating the
/// parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8], durability: Durability) -> Result<()> {
    write_atomic_parts(path, &[bytes], durability)
}

/// [`write_atomic`] of the bytes of `parts`, one after the other.
fn write_atomic_parts(path: &Path, parts: &[&[u8]], durability: Durability) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal(format!("{} has no parent directory", path.display())))?;
    fs::create_dir_all(dir).map_err(|e| Error::io(ctx(), e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Named per call as well as per process: two writers of one file in one
    // process (two attempts of a cluster task, an abandoned job's and its
    // retry's) must not write into each other's temporary file.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}-{call}.{}.tmp", std::process::id()));
    let result = (|| {
        io_step("creating a temporary file for", path)?;
        let mut f = File::create(&tmp)?;
        write_in_halves(&mut f, parts, path)?;
        if durability == Durability::Fsync {
            f.sync_all()?;
        }
        drop(f);
        io_step("renaming into place", path)?;
        fs::rename(&tmp, path)?;
        io_step("syncing the directory of", path)?;
        if durability == Durability::Fsync {
            sync_dir(dir)?;
        }
        // In a mounted checkpoint, the write counts once the bucket has it.
        crate::remote::put(path, parts)
    })();
    result.map_err(|e: std::io::Error| {
        let _ = fs::remove_file(&tmp);
        Error::io(ctx(), e)
    })
}

/// Writes the bytes of `parts` to `f`: half of them, the counted step
/// `half-way through writing <path>` (a crash point), then the rest.
fn write_in_halves(f: &mut File, parts: &[&[u8]], path: &Path) -> std::io::Result<()> {
    let mut left = parts.iter().map(|p| p.len()).sum::<usize>() / 2;
    let mut rest: Vec<&[u8]> = Vec::with_capacity(parts.len());
    for part in parts {
        let now = left.min(part.len());
        f.write_all(&part[..now])?;
        left -= now;
        rest.push(&part[now..]);
    }
    io_step("half-way through writing", path)?;
    for part in rest {
        f.write_all(part)?;
    }
    Ok(())
}

/// Removes, in `dir` and below, the temporary files (`.<name>-<n>.<pid>.tmp`)
/// that [`write_atomic`] calls of processes no longer running left behind,
/// as a crash mid-write does; a live process's are kept. Returns how many
/// went. Only where `/proc` tells which processes run (Linux); elsewhere
/// nothing is removed.
pub fn remove_stale_temp_files(dir: &Path) -> usize {
    if !Path::new("/proc/self").exists() {
        return 0;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => removed += remove_stale_temp_files(&path),
            Ok(_) => {
                let pid = e.file_name().to_str().and_then(temp_file_pid);
                if let Some(pid) = pid
                    && !Path::new("/proc").join(pid.to_string()).exists()
                    && fs::remove_file(&path).is_ok()
                {
                    removed += 1;
                }
            }
            Err(_) => {}
        }
    }
    removed
}

/// The writer's process id in a temporary file's name `.<name>-<n>.<pid>.tmp`.
fn temp_file_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    rest.rsplit_once('.')?.1.parse().ok()
}

/// Writes `body` framed with its checksum, atomically.
pub fn write_framed(path: &Path, body: &[u8], durability: Durability) -> Result<()> {
    // The header and the body go out as they are: a large body (a state
    // snapshot) is not copied behind its header first.
    let header = frame_header(body);
    write_atomic_parts(path, &[header.as_bytes(), body], durability)
}

/// Creates `path` holding `zeros` zero bytes, synced, and syncs its
/// directory, so that a later [`write_framed_in_place`] of it needs no new
/// directory entry and, when what it writes fits in the zeros, does not
/// change the file's size either: its `fdatasync` then has data to flush
/// but no metadata, about half the cost of a write that grows a file on
/// this machine's disk (`docs/checkpoint-format.md`). The costly parts of a
/// durable new file, done ahead of time and off a batch's path. Passes no
/// counted [`io_step`]: a file prepared this way holds nothing until it is
/// written, and a crash here leaves a file of zeros that no reader counts
/// (its version is not committed).
///
/// With [`Durability::NoSync`] the file is only created, empty: the write
/// into it then still saves the batch's path a new file and a rename.
///
/// A file that already holds bytes is left as it is and refused: it may be
/// a file that a later commit wrote (a store dropped and reopened in one
/// process), which must never be cut.
pub fn prepare_zeroed(path: &Path, zeros: usize, durability: Durability) -> Result<()> {
    let ctx = || format!("preparing {}", path.display());
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal(format!("{} has no parent directory", path.display())))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(ctx(), e))?;
    let len = f.metadata().map_err(|e| Error::io(ctx(), e))?.len();
    if len > 0 {
        return Err(Error::internal(format!(
            "{} holds {len} bytes: not prepared",
            path.display()
        )));
    }
    if durability == Durability::NoSync {
        return Ok(());
    }
    if zeros > 0 {
        // Written, not allocated (`fallocate` leaves extents marked
        // unwritten, whose first write is a metadata change again).
        f.write_all(&vec![0; zeros])
            .and_then(|()| f.sync_data())
            .map_err(|e| Error::io(ctx(), e))?;
    }
    // Unlike `sync_dir`, a failure here is an error: the file's directory
    // entry is what the in-place write relies on.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(ctx(), e))
}

/// Writes `body` framed into `path`, which must exist (made by
/// [`prepare_zeroed`], its directory entry already durable), over the
/// zeros it holds (those past the frame stay, and [`unframe`] allows
/// them); with [`Durability::Fsync`], `fdatasync`s it. Not atomic: a
/// crash part-way leaves a torn file, which its frame's length and checksum
/// expose. So it is only for a file nothing reads until a later record says
/// it is complete (a state delta of a version not yet committed). Passes
/// three counted steps: before the first byte, half-way, and before the
/// sync.
pub fn write_framed_in_place(path: &Path, body: &[u8], durability: Durability) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let header = frame_header(body);
    let framed = (header.len() + body.len()) as u64;
    let result = (|| {
        io_step("writing in place", path)?;
        let mut f = OpenOptions::new().read(true).write(true).open(path)?;
        // What lies past the frame must be zeros: a file that is not as it
        // was prepared (written over since) is cut to the frame instead.
        let len = f.metadata()?.len();
        let mut tail = vec![0; len.saturating_sub(framed) as usize];
        f.read_exact_at(&mut tail, framed)?;
        write_in_halves(&mut f, &[header.as_bytes(), body], path)?;
        if tail.iter().any(|b| *b != 0) {
            f.set_len(framed)?;
        }
        io_step("syncing", path)?;
        if durability == Durability::Fsync {
            f.sync_data()?;
        }
        crate::remote::put(path, &[header.as_bytes(), body])
    })();
    result.map_err(|e: std::io::Error| Error::io(format!("writing {}", path.display()), e))
}

/// Writes `bytes` to `path`, created or truncated, with no temporary file
/// and no rename, and with [`Durability::Fsync`] `fdatasync`s it; its
/// directory is not synced. For a file that is renamed into place later
/// (whose rename and directory sync make it durable where it lands), or
/// that nothing reads after a crash (a file sink's staged file: staging is
/// emptied when a sink opens). Passes three counted steps, like
/// [`write_framed_in_place`].
pub fn write_unlinked(path: &Path, bytes: &[u8], durability: Durability) -> Result<()> {
    let mut open = OpenOptions::new();
    open.write(true).create(true).truncate(true);
    write_direct(path, &[bytes], durability, &open)
}

/// The bytes of `parts` written to `path` as `open` opens it, then synced
/// (data only) with [`Durability::Fsync`].
fn write_direct(
    path: &Path,
    parts: &[&[u8]],
    durability: Durability,
    open: &OpenOptions,
) -> Result<()> {
    let result = (|| {
        io_step("writing in place", path)?;
        let mut f = open.open(path)?;
        write_in_halves(&mut f, parts, path)?;
        io_step("syncing", path)?;
        if durability == Durability::Fsync {
            f.sync_data()?;
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| Error::io(format!("writing {}", path.display()), e))
}

/// Reads a framed file and returns its checked body.
pub fn read_framed(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    unframe(path, &bytes).map(<[u8]>::to_vec)
}

/// Writes `value` as framed JSON.
pub fn write_json<T: serde::Serialize>(
    path: &Path,
    value: &T,
    durability: Durability,
) -> Result<()> {
    let body = serde_json::to_vec(value)
        .map_err(|e| Error::internal(format!("serializing {}: {e}", path.display())))?;
    write_framed(path, &body, durability)
}

/// Reads framed JSON, naming the file when it does not parse.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let body = read_framed(path)?;
    serde_json::from_slice(&body).map_err(|e| {
        Error::checkpoint(
            path,
            format!("checksum is right but the content does not parse: {e}"),
        )
    })
}

/// The exit code of a crash injected by [`io_step`] (as `SLUICE_CRASH_AT`'s).
pub const CRASH_EXIT_CODE: i32 = 86;

/// What `SLUICE_IO_FAULT` asks of the process's durable-write steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoFault {
    /// Exit at once at step `n`, as a `kill -9` there would.
    Crash(u64),
    /// Fail every step from `n` on with "no space left on device".
    FullFrom(u64),
}

fn io_fault() -> Option<IoFault> {
    static FAULT: std::sync::OnceLock<Option<IoFault>> = std::sync::OnceLock::new();
    *FAULT.get_or_init(|| {
        let v = std::env::var("SLUICE_IO_FAULT").ok()?;
        let (kind, n) = v.split_once(':')?;
        let n = n.trim().parse().ok()?;
        match kind.trim() {
            "crash" => Some(IoFault::Crash(n)),
            "full" => Some(IoFault::FullFrom(n)),
            _ => None,
        }
    })
}

/// One step of a durable write (every file Sluice writes goes through these
/// steps: temp file created, half written, renamed into place, directory
/// synced; a file sink's move of its staged files into place).
///
/// A test hook: steps are counted over the whole process, and
/// `SLUICE_IO_FAULT=crash:N` exits the process at step N with exit code
/// [`CRASH_EXIT_CODE`] (nothing flushed or cleaned up, as after a `kill -9`
/// there, half-written temporary files included), while
/// `SLUICE_IO_FAULT=full:N` fails step N and every later one as a full disk
/// would. Unset, a step costs one read of an initialised `OnceLock`.
pub fn io_step(what: &str, path: &Path) -> std::io::Result<()> {
    static STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(fault) = io_fault() else {
        return Ok(());
    };
    let n = STEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    match fault {
        IoFault::Crash(at) if n == at => {
            eprintln!(
                "sluice: injected crash at I/O step {n}: {what} {}",
                path.display()
            );
            std::process::exit(CRASH_EXIT_CODE);
        }
        IoFault::FullFrom(at) if n >= at => Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device (injected by SLUICE_IO_FAULT)",
        )),
        _ => Ok(()),
    }
}

/// Syncs a directory so that a rename in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    // Directories can be opened read-only and fsynced on Unix; elsewhere this
    // is a best effort.
    match OpenOptions::new().read(true).open(dir) {
        Ok(d) => d.sync_all().or(Ok(())),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preparing_never_cuts_a_file_that_holds_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("3.delta");
        prepare_zeroed(&p, 0, Durability::Fsync).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 0);
        write_framed_in_place(&p, b"{}", Durability::Fsync).unwrap();
        assert_eq!(read_framed(&p).unwrap(), b"{}");
        let e = prepare_zeroed(&p, 4096, Durability::Fsync)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not prepared"), "{e}");
        assert_eq!(read_framed(&p).unwrap(), b"{}");
    }

    #[test]
    fn a_frame_written_over_prepared_zeros_reads_back_and_may_outgrow_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("4.delta");
        prepare_zeroed(&p, 4096, Durability::Fsync).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 4096);
        write_framed_in_place(&p, b"{\"a\":1}", Durability::Fsync).unwrap();
        // The zeros past the frame stay: the size never changed.
        assert_eq!(fs::metadata(&p).unwrap().len(), 4096);
        assert_eq!(read_framed(&p).unwrap(), b"{\"a\":1}");
        // A torn write over the zeros (the body's end never written) is
        // caught by the checksum, zeros and all.
        let mut torn = fs::read(&p).unwrap();
        let end = torn.iter().rposition(|b| *b != 0).unwrap();
        torn[end] = 0;
        fs::write(&p, &torn).unwrap();
        assert!(
            read_framed(&p)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        // Anything but zeros after the body is damage.
        let mut padded = frame(b"{}");
        padded.extend_from_slice(b"\0\0x");
        fs::write(&p, &padded).unwrap();
        assert!(read_framed(&p).unwrap_err().to_string().contains("padded"));
        // A body larger than the zeros grows the file.
        let q = dir.path().join("5.delta");
        prepare_zeroed(&q, 16, Durability::Fsync).unwrap();
        let big = vec![b'x'; 100];
        write_framed_in_place(&q, &big, Durability::Fsync).unwrap();
        assert_eq!(read_framed(&q).unwrap(), big);
    }

    #[test]
    fn stale_temp_files_of_dead_processes_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state/0");
        fs::create_dir_all(&sub).unwrap();
        // Above any Linux pid_max: no such process.
        let dead = sub.join(".3.delta.4294967.tmp");
        let live = dir.path().join(format!(".7.{}.tmp", std::process::id()));
        let kept = [
            dir.path().join("7"),
            dir.path().join(".hidden"),
            sub.join("x.tmp"),
        ];
        for f in kept.iter().chain([&dead, &live]) {
            fs::write(f, b"x").unwrap();
        }
        assert_eq!(remove_stale_temp_files(dir.path()), 1);
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(kept.iter().all(|f| f.exists()));
        assert_eq!(temp_file_pid(".offsets.12.tmp"), Some(12));
        assert_eq!(temp_file_pid("12.tmp"), None);
    }

    #[test]
    fn framed_round_trip_and_every_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("offsets").join("3");
        write_framed(&p, b"{\"a\":1}", Durability::Fsync).unwrap();
        assert_eq!(read_framed(&p).unwrap(), b"{\"a\":1}");

        let good = fs::read(&p).unwrap();
        // truncated
        fs::write(&p, &good[..good.len() - 2]).unwrap();
        let e = read_framed(&p).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("offsets/3"), "{e}");
        // bit flip in the body
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        fs::write(&p, &flipped).unwrap();
        assert!(
            read_framed(&p)
                .unwrap_err()
                .to_string()
                .contains("checksum mismatch")
        );
        // zeroed
        fs::write(&p, vec![0u8; good.len()]).unwrap();
        assert!(read_framed(&p).is_err());
        // empty
        fs::write(&p, b"").unwrap();
        assert!(read_framed(&p).is_err());
    }

    #[test]
    fn unframe_never_panics_on_arbitrary_bytes() {
        let p = Path::new("x");
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for n in 0..2000usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = n % 64;
            let mut bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8).collect();
            if n % 3 == 0 {
                let mut f = frame(&bytes);
                let i = (seed as usize) % f.len();
                f[i] = f[i].wrapping_add(1);
                bytes = f;
            }
            let _ = unframe(p, &bytes);
        }
    }
}
