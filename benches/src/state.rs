//! The state store on its own: commits, snapshots, recovery, bytes per key.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::Result;
use sluice::deps::datafusion::arrow::array::{Int64Array, RecordBatch};
use sluice::deps::datafusion::arrow::datatypes::{DataType, Field, Schema};
use sluice::deps::sluice_common::durable::Durability;
use sluice::deps::sluice_state::store::{StateStore, StateStoreOptions};

use crate::Stats;

pub(crate) struct StateFigures {
    pub(crate) keys: usize,
    /// Putting every key, in 100,000-row batches (in memory).
    pub(crate) first_put: Duration,
    pub(crate) first_commit: Duration,
    pub(crate) commit_1pct: Stats,
    pub(crate) commit_10pct: Stats,
    /// The first commit of a store that snapshots every version: its delta
    /// and a snapshot of every key, written in parallel.
    pub(crate) with_snapshot: Duration,
    pub(crate) recovery: Stats,
    pub(crate) memory_bytes_per_key: f64,
    pub(crate) disk_bytes_per_key: f64,
    /// MB/s of the first commit (every key's delta, fsynced).
    pub(crate) commit_mb_per_s: f64,
    /// MB/s of one plain write + fsync of as many bytes to the same disk.
    pub(crate) raw_mb_per_s: f64,
}

pub(crate) fn state_store(dir: &Path, keys: usize, runs: usize) -> Result<StateFigures> {
    let key_schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("window_start", DataType::Int64, false),
    ]));
    let value_schema = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, true),
        Field::new("total", DataType::Int64, true),
    ]));
    let row_schema = Arc::new(Schema::new(
        key_schema
            .fields()
            .iter()
            .chain(value_schema.fields().iter())
            .cloned()
            .collect::<Vec<_>>(),
    ));
    let batch = |ids: &mut dyn Iterator<Item = usize>, salt: i64| {
        let ids: Vec<i64> = ids.map(|i| i as i64).collect();
        let n = ids.len();
        RecordBatch::try_new(
            Arc::clone(&row_schema),
            vec![
                Arc::new(Int64Array::from(ids.clone())),
                Arc::new(Int64Array::from(vec![0; n])),
                Arc::new(Int64Array::from(
                    ids.iter().map(|i| i + salt).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(vec![salt; n])),
            ],
        )
        .expect("state rows")
    };
    let options = StateStoreOptions {
        durability: Durability::Fsync,
        // Snapshots measured on their own below.
        snapshot_interval: 1_000_000,
        retain_versions: 1_000_000,
        ..StateStoreOptions::default()
    };
    let sdir = dir.join("state");
    let mut store = StateStore::new(
        Some(sdir.clone()),
        Arc::clone(&key_schema),
        Arc::clone(&value_schema),
        options,
    )?;
    let puts: Vec<RecordBatch> = (0..keys)
        .step_by(100_000)
        .map(|chunk| batch(&mut (chunk..(chunk + 100_000).min(keys)), 1))
        .collect();
    let t = Instant::now();
    for rows in &puts {
        store.put(rows)?;
    }
    let first_put = t.elapsed();
    let t = Instant::now();
    store.commit(0)?;
    let first_commit = t.elapsed();
    let memory_bytes_per_key = store.memory_bytes() as f64 / keys as f64;
    let mut version = 0;
    let mut commit = |share: usize, store: &mut StateStore| -> Result<Vec<Duration>> {
        let mut out = Vec::new();
        for r in 0..runs {
            let step = 100 / share;
            store.put(&batch(&mut (r..keys).step_by(step), version as i64 + 2))?;
            version += 1;
            let t = Instant::now();
            store.commit(version)?;
            out.push(t.elapsed());
        }
        Ok(out)
    };
    let one = commit(1, &mut store)?;
    let ten = commit(10, &mut store)?;
    store.wait_cleanup();
    let deltas: u64 = walk_bytes(&sdir);
    // A snapshot on its own: a store whose every commit snapshots.
    let snap_dir = dir.join("snap");
    let mut snap = StateStore::new(
        Some(snap_dir),
        Arc::clone(&key_schema),
        Arc::clone(&value_schema),
        StateStoreOptions {
            snapshot_interval: 1,
            ..options
        },
    )?;
    for chunk in (0..keys).step_by(100_000) {
        snap.put(&batch(&mut (chunk..(chunk + 100_000).min(keys)), 1))?;
    }
    let t = Instant::now();
    snap.commit(0)?;
    let with_snapshot = t.elapsed();
    let last = version;
    let mut recovery = Vec::new();
    for _ in 0..runs.min(5) {
        let mut fresh = StateStore::new(
            Some(sdir.clone()),
            Arc::clone(&key_schema),
            Arc::clone(&value_schema),
            options,
        )?;
        let t = Instant::now();
        fresh.load(Some(last))?;
        recovery.push(t.elapsed());
        assert_eq!(fresh.len(), keys, "every key recovered");
    }
    let first_bytes = first_delta_bytes(&dir.join("state"), deltas);
    let raw = raw_write(dir, first_bytes as usize, runs)?;
    let mb = |bytes: f64, t: Duration| bytes / 1e6 / t.as_secs_f64();
    Ok(StateFigures {
        commit_mb_per_s: mb(first_bytes, first_commit),
        raw_mb_per_s: mb(first_bytes, raw.median),
        keys,
        first_put,
        first_commit,
        commit_1pct: Stats::of(one),
        commit_10pct: Stats::of(ten),
        with_snapshot,
        recovery: Stats::of(recovery),
        memory_bytes_per_key,
        // The first commit holds every key once (as a delta).
        disk_bytes_per_key: first_bytes / keys as f64,
    })
}

/// One sequential write of `bytes` bytes and an fsync, `runs` times.
fn raw_write(dir: &Path, bytes: usize, runs: usize) -> Result<Stats> {
    use std::io::Write as _;
    let body = vec![0x5au8; bytes];
    let mut times = Vec::new();
    // A new file each run, and the earlier ones kept until the end, as a
    // commit writes: a file removed just before would hand its freshly
    // freed page-cache pages to the next write, which then runs several
    // times faster than any state file's first write can.
    let paths: Vec<_> = (0..runs)
        .map(|i| dir.join(format!("raw-write-{i}")))
        .collect();
    for path in &paths {
        let t = Instant::now();
        let mut f = std::fs::File::create(path)
            .map_err(|e| sluice::Error::io("creating the raw-write file", e))?;
        f.write_all(&body)
            .and_then(|_| f.sync_all())
            .map_err(|e| sluice::Error::io("the raw write", e))?;
        times.push(t.elapsed());
    }
    for path in &paths {
        let _ = std::fs::remove_file(path);
    }
    Ok(Stats::of(times))
}

fn walk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => walk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The bytes of version 0's delta (every key once): `0.delta` in the
/// operator's directory (or, in the older layout, in each partition's).
fn first_delta_bytes(dir: &Path, all: u64) -> f64 {
    if let Ok(m) = std::fs::metadata(dir.join("0.delta")) {
        return m.len() as f64;
    }
    let mut sum = 0;
    for p in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(m) = std::fs::metadata(p.path().join("0.delta")) {
            sum += m.len();
        }
    }
    if sum == 0 { all as f64 } else { sum as f64 }
}
