//! Which state files make up a version, and which retention may delete:
//! pure decisions over file names, testable without a disk.

use std::path::Path;

use sluice_common::{BatchId, Error, Result};

/// A delta (changes of one version) or a snapshot (all rows at a version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    /// `<N>.delta`
    Delta,
    /// `<N>.snapshot`
    Snapshot,
}

/// One state file of an operator (or, in the older layout, of a partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StateFile {
    /// The version it belongs to.
    pub version: BatchId,
    /// Delta or snapshot.
    pub kind: FileKind,
}

impl StateFile {
    /// The file name, e.g. `12.delta`.
    pub fn name(&self) -> String {
        match self.kind {
            FileKind::Delta => format!("{}.delta", self.version),
            FileKind::Snapshot => format!("{}.snapshot", self.version),
        }
    }

    /// Parses a file name; `None` for anything else (e.g. a temporary file).
    pub fn parse(name: &str) -> Option<StateFile> {
        let (v, ext) = name.split_once('.')?;
        let version = v.parse().ok()?;
        let kind = match ext {
            "delta" => FileKind::Delta,
            "snapshot" => FileKind::Snapshot,
            _ => return None,
        };
        Some(StateFile { version, kind })
    }
}

/// Whether version `v` writes a snapshot.
pub fn is_snapshot_version(v: BatchId, interval: u64) -> bool {
    interval > 0 && (v + 1).is_multiple_of(interval)
}

/// The state files of a directory (an operator's, or a partition's in the older layout), sorted.
pub fn list(dir: &Path) -> Result<Vec<StateFile>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut out: Vec<StateFile> = entries
        .flatten()
        .filter_map(|e| StateFile::parse(e.file_name().to_str()?))
        .collect();
    out.sort();
    Ok(out)
}

/// The files to read, in order, to rebuild version `v`: the newest snapshot
/// at or before `v`, then every delta after it up to `v`. Fails when a
/// needed delta is missing.
pub fn files_for_version(
    files: &[StateFile],
    v: BatchId,
) -> std::result::Result<Vec<StateFile>, String> {
    files_for_version_without(files, v, &[])
}

/// As [`files_for_version`], but never from the snapshots of versions in
/// `bad` (found unreadable): from an older snapshot, or from the first delta.
pub fn files_for_version_without(
    files: &[StateFile],
    v: BatchId,
    bad: &[BatchId],
) -> std::result::Result<Vec<StateFile>, String> {
    let snapshot = files
        .iter()
        .filter(|f| f.kind == FileKind::Snapshot && f.version <= v && !bad.contains(&f.version))
        .max_by_key(|f| f.version)
        .copied();
    let from = snapshot.map_or(0, |s| s.version + 1);
    let mut out: Vec<StateFile> = snapshot.into_iter().collect();
    for version in from..=v {
        let delta = StateFile {
            version,
            kind: FileKind::Delta,
        };
        if !files.contains(&delta) {
            return Err(format!(
                "state version {v} cannot be rebuilt: {} is missing (retained versions start later, or the file was lost)",
                delta.name()
            ));
        }
        out.push(delta);
    }
    Ok(out)
}

/// Files that no version at or after `oldest` needs.
pub fn removable(files: &[StateFile], oldest: BatchId) -> Vec<StateFile> {
    // The base of the oldest retained version: its newest snapshot at or
    // before it. Everything older than that base can go.
    let base = files
        .iter()
        .filter(|f| f.kind == FileKind::Snapshot && f.version <= oldest)
        .map(|f| f.version)
        .max();
    match base {
        None => vec![],
        Some(b) => files.iter().filter(|f| f.version < b).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(v: u64) -> StateFile {
        StateFile {
            version: v,
            kind: FileKind::Delta,
        }
    }
    fn s(v: u64) -> StateFile {
        StateFile {
            version: v,
            kind: FileKind::Snapshot,
        }
    }

    #[test]
    fn a_bad_snapshot_is_passed_over_for_an_older_one_and_its_deltas() {
        let mut files: Vec<StateFile> = (9..=21).map(d).collect();
        files.extend([s(10), s(20)]);
        files.sort();
        let from = |bad: &[u64]| files_for_version_without(&files, 21, bad);
        assert_eq!(from(&[]).unwrap(), vec![s(20), d(21)]);
        assert_eq!(
            from(&[20]).unwrap()[..3],
            [s(10), d(11), d(12)],
            "snapshot 10, then every delta from 11"
        );
        assert_eq!(from(&[20]).unwrap().len(), 1 + 11);
        // Without a good snapshot the deltas must reach back to version 0.
        assert!(from(&[10, 20]).unwrap_err().contains("0.delta"));
    }

    #[test]
    fn names_round_trip_and_temporaries_are_ignored() {
        assert_eq!(StateFile::parse(&d(7).name()), Some(d(7)));
        assert_eq!(StateFile::parse(&s(9).name()), Some(s(9)));
        assert_eq!(StateFile::parse(".7.delta.123.tmp"), None);
        assert_eq!(StateFile::parse("7.parquet"), None);
    }

    #[test]
    fn a_version_is_its_last_snapshot_plus_later_deltas() {
        let files = vec![d(0), d(1), d(2), s(2), d(3), d(4)];
        assert_eq!(files_for_version(&files, 1).unwrap(), vec![d(0), d(1)]);
        assert_eq!(files_for_version(&files, 2).unwrap(), vec![s(2)]);
        assert_eq!(
            files_for_version(&files, 4).unwrap(),
            vec![s(2), d(3), d(4)]
        );
        assert!(
            files_for_version(&files, 5)
                .unwrap_err()
                .contains("5.delta is missing")
        );
        assert!(files_for_version(&[d(0), d(2)], 2).is_err());
    }

    #[test]
    fn retention_keeps_every_file_a_retained_version_needs() {
        let files = vec![d(0), d(1), s(1), d(2), d(3), s(3), d(4)];
        // Oldest retained 2: needs s(1) + d(2).
        assert_eq!(removable(&files, 2), vec![d(0)]);
        // Oldest retained 3: needs s(3).
        assert_eq!(removable(&files, 3), vec![d(0), d(1), s(1), d(2)]);
        for oldest in 0..5 {
            let left: Vec<StateFile> = files
                .iter()
                .filter(|f| !removable(&files, oldest).contains(f))
                .copied()
                .collect();
            for v in oldest..5 {
                assert!(
                    files_for_version(&left, v).is_ok(),
                    "version {v} after cleanup for {oldest}"
                );
            }
        }
        assert!(is_snapshot_version(9, 10) && !is_snapshot_version(10, 10));
    }
}
