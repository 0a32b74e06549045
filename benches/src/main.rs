//! Sluice's benchmarks, run with one command:
//!
//! ```text
//! cargo run --release -p sluice-benches -- [--quick] [--out docs/benchmarks.md]
//! ```
//!
//! Each comparison runs both sides in the same process run, so their ratio
//! holds on a noisy machine; timings are medians of several runs with the
//! minimum and maximum beside them. The results are printed and written as
//! Markdown with the machine, the date and the commit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::deps::datafusion::arrow::array::{Int64Array, RecordBatch, TimestampMillisecondArray};
use sluice::deps::datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use sluice::deps::datafusion::parquet::arrow::ArrowWriter;
use sluice::deps::datafusion::prelude::{ParquetReadOptions, SessionContext};
use sluice::deps::sluice_common::durable::{self, Durability};
use sluice::deps::sluice_state::store::{StateStore, StateStoreOptions};
use sluice::prelude::*;
use sluice::{Outcome, Result};

/// Summary of repeated timings.
#[derive(Debug, Clone, Copy)]
struct Stats {
    median: Duration,
    p99: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    fn of(mut d: Vec<Duration>) -> Stats {
        assert!(!d.is_empty(), "no samples");
        d.sort();
        let at = |q: f64| d[((d.len() - 1) as f64 * q).round() as usize];
        Stats {
            median: at(0.5),
            p99: at(0.99),
            min: d[0],
            max: d[d.len() - 1],
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// Rows of (k, v, ts) for rows `from..to`: `keys` keys, 100,000 rows a
/// minute of event time, so a one-minute window holds every key.
fn rows(schema: &SchemaRef, from: usize, to: usize, keys: usize) -> RecordBatch {
    let k: Int64Array = (from..to).map(|i| (i % keys) as i64).collect();
    let v: Int64Array = (from..to).map(|i| ((i * 7919) % 1000) as i64).collect();
    let ts = TimestampMillisecondArray::from_iter_values(
        (from..to).map(|i| (i as i64) * 60_000 / 100_000),
    );
    RecordBatch::try_new(
        Arc::clone(schema),
        vec![Arc::new(k), Arc::new(v), Arc::new(ts)],
    )
    .expect("rows")
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
    ]))
}

// ---------------------------------------------------------------- overhead

/// The cost of one small durable write (write + fsync + rename + directory
/// fsync): the floor of any durable batch.
fn fsync_floor(dir: &Path, n: usize) -> Stats {
    let body = vec![b'x'; 200];
    let samples = (0..n)
        .map(|i| {
            let t = Instant::now();
            durable::write_atomic(&dir.join(format!("f{}", i % 8)), &body, Durability::Fsync)
                .expect("write");
            t.elapsed()
        })
        .collect();
    Stats::of(samples)
}

/// Trigger → commit of one-row batches and of polls that find nothing, for
/// a stateless query and a windowed aggregate.
async fn overhead(
    dir: &Path,
    durability: Durability,
    stateful: bool,
    n: usize,
) -> Result<(Stats, Stats)> {
    let ctx = StreamContext::new();
    let src = MemorySource::new("s", schema());
    let df = ctx.read_stream(src.clone()).await?;
    let df = if stateful {
        df.with_watermark("ts", Duration::from_secs(5))?
            .tumble("ts", Duration::from_secs(60))?
            .aggregate(
                vec![col("window_start"), col("window_end"), col("k")],
                vec![
                    sluice::deps::datafusion::functions_aggregate::expr_fn::count(lit(1))
                        .alias("n"),
                ],
            )?
    } else {
        df
    };
    let q = df
        .write_stream()
        .output_mode(OutputMode::Append)
        .trigger(Trigger::Manual)
        .durability(durability)
        .checkpoint(dir.join(format!("overhead-{stateful}-{durability:?}")))
        .start(MemorySink::new("out", MemoryTable::new()))
        .await?;
    let one = schema();
    let mut row = 0;
    let mut batch = || {
        row += 1;
        rows(&one, row, row + 1, 10_000)
    };
    for _ in 0..20 {
        src.append(batch())?;
        q.run_batch().await?;
    }
    let mut one_row = Vec::with_capacity(n);
    for _ in 0..n {
        src.append(batch())?;
        let t = Instant::now();
        let p = q.run_batch().await?;
        one_row.push(t.elapsed());
        assert!(p.is_some(), "a batch ran");
    }
    let mut empty = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let p = q.run_batch().await?;
        empty.push(t.elapsed());
        assert!(p.is_none(), "nothing to do");
    }
    q.stop().await?;
    Ok((Stats::of(one_row), Stats::of(empty)))
}

// -------------------------------------------------------------- throughput

const WINDOW_SQL: &str = "SELECT window_start, k, count(*) AS n, sum(v) AS total, max(v) AS top \
     FROM TUMBLE(ev, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, k";

const ONE_SHOT_SQL: &str = "SELECT date_bin(INTERVAL '1' MINUTE, ts, TIMESTAMP '1970-01-01T00:00:00') AS window_start, \
     k, count(*) AS n, sum(v) AS total, max(v) AS top FROM ev GROUP BY 1, k";

/// Writes `total` rows as Parquet files of `per_file` rows each.
fn write_parquet(dir: &Path, total: usize, per_file: usize, keys: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| sluice::Error::io("creating the input", e))?;
    let schema = schema();
    for (i, from) in (0..total).step_by(per_file).enumerate() {
        let path = dir.join(format!("part-{i:06}.parquet"));
        let file =
            std::fs::File::create(&path).map_err(|e| sluice::Error::io("writing input", e))?;
        let mut w = ArrowWriter::try_new(file, Arc::clone(&schema), None)
            .map_err(|e| sluice::Error::internal(e.to_string()))?;
        w.write(&rows(&schema, from, (from + per_file).min(total), keys))
            .map_err(|e| sluice::Error::internal(e.to_string()))?;
        w.close()
            .map_err(|e| sluice::Error::internal(e.to_string()))?;
    }
    Ok(())
}

/// DataFusion alone, the same aggregate over the same files in one shot:
/// (seconds, result rows).
async fn one_shot(input: &Path) -> Result<(Duration, usize)> {
    let ctx = SessionContext::new();
    let t = Instant::now();
    ctx.register_parquet(
        "ev",
        input.to_str().unwrap_or_default(),
        ParquetReadOptions::default(),
    )
    .await?;
    let rows: usize = ctx
        .sql(ONE_SHOT_SQL)
        .await?
        .collect()
        .await?
        .iter()
        .map(RecordBatch::num_rows)
        .sum();
    Ok((t.elapsed(), rows))
}

/// What one micro-batch run measured.
struct Streamed {
    time: Duration,
    batches: u64,
    output_rows: u64,
    /// Resident memory (MiB) after each quarter of the batches.
    rss_mib: Vec<u64>,
}

/// Sluice over the same files, `files_per_batch` files a micro-batch, to a
/// memory sink in append mode (windows close as the watermark passes them).
async fn streamed(
    input: &Path,
    files_per_batch: usize,
    checkpoint: Option<&Path>,
) -> Result<Streamed> {
    let ctx = StreamContext::new();
    let durable = checkpoint.is_some();
    let tmp = tempfile::tempdir().map_err(|e| sluice::Error::io("a temp dir", e))?;
    let ckpt: PathBuf = checkpoint
        .map(Path::to_path_buf)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    ctx.update_settings(|s| {
        s.checkpoint_root = Some(ckpt.clone());
        s.durability = if durable {
            Durability::Fsync
        } else {
            Durability::NoSync
        };
    });
    let script = format!(
        "CREATE SOURCE ev (k BIGINT, v BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '10' SECOND)
           WITH (connector = 'file', path = '{}', format = 'parquet', max_files_per_trigger = {files_per_batch});
         CREATE SINK out WITH (connector = 'memory', output_mode = 'append') AS {WINDOW_SQL};",
        input.display()
    );
    let mut queries = Vec::new();
    for o in ctx.sql(&script).await? {
        if let Outcome::Query(q) = o {
            queries.push(q.with_trigger(Trigger::Manual).start().await?);
        }
    }
    let q = queries
        .pop()
        .ok_or_else(|| sluice::Error::internal("no query"))?;
    let total_files = std::fs::read_dir(input).map(|d| d.count()).unwrap_or(0);
    let expected_batches = total_files.div_ceil(files_per_batch) as u64;
    let quarter = expected_batches.div_ceil(4).max(1);
    let mut rss_mib = Vec::new();
    let t = Instant::now();
    let mut batches = 0;
    let mut output_rows = 0;
    while let Some(p) = q.run_batch().await? {
        batches += 1;
        output_rows += p.output_rows;
        if batches % quarter == 0 {
            rss_mib.push(rss_kib("VmRSS") / 1024);
        }
    }
    let time = t.elapsed();
    q.stop().await?;
    Ok(Streamed {
        time,
        batches,
        output_rows,
        rss_mib,
    })
}

/// A `/proc/self/status` figure in KiB (0 where there is none).
fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

// ------------------------------------------------------------ state store

struct StateFigures {
    keys: usize,
    first_commit: Duration,
    commit_1pct: Stats,
    commit_10pct: Stats,
    snapshot: Duration,
    recovery: Stats,
    memory_bytes_per_key: f64,
    disk_bytes_per_key: f64,
}

fn state_store(dir: &Path, keys: usize, runs: usize) -> Result<StateFigures> {
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
    for chunk in (0..keys).step_by(100_000) {
        store.put(&batch(&mut (chunk..(chunk + 100_000).min(keys)), 1))?;
    }
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
    let snapshot = with_snapshot.saturating_sub(first_commit);
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
    Ok(StateFigures {
        keys,
        first_commit,
        commit_1pct: Stats::of(one),
        commit_10pct: Stats::of(ten),
        snapshot,
        recovery: Stats::of(recovery),
        memory_bytes_per_key,
        // The first commit holds every key once (as a delta).
        disk_bytes_per_key: first_delta_bytes(&dir.join("state"), deltas) / keys as f64,
    })
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

/// The bytes of version 0's deltas (every key once), or all if unknown.
fn first_delta_bytes(dir: &Path, all: u64) -> f64 {
    let mut sum = 0;
    for p in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(m) = std::fs::metadata(p.path().join("0.delta")) {
            sum += m.len();
        }
    }
    if sum == 0 { all as f64 } else { sum as f64 }
}

// ----------------------------------------------------------------- report

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
            })
        })
        .map_or("unknown".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0)
        });
    let disk = command("df", &["-h", "--output=source,fstype,size", "."])
        .lines()
        .nth(1)
        .unwrap_or("unknown")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    format!("{cores} cores ({cpu}), {mem} memory, disk {disk}")
}

fn command(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .windows(2)
        .find(|w| w[0] == "--out")
        .map(|w| PathBuf::from(&w[1]))
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../docs/benchmarks.md"
            ))
        });
    let work = tempfile::tempdir_in(".").map_err(|e| sluice::Error::io("a work directory", e))?;
    let dir = work.path();
    let mut md = String::new();
    let date = command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = command("git", &["rev-parse", "--short", "HEAD"]);
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo run --release -p sluice-benches{}` on {date}, commit `{commit}`.\n\nMachine: {}.\n",
        if quick { " -- --quick" } else { "" },
        machine()
    );

    // 1. Per-batch overhead.
    let n = if quick { 200 } else { 1000 };
    eprintln!("bench: per-batch overhead ({n} batches per row)");
    let floor = fsync_floor(dir, n);
    let _ = writeln!(
        md,
        "## Per-batch overhead\n\nTrigger → commit of one micro-batch (`run_batch` on a manual trigger), {n} batches each, after 20 warm-up batches; a memory source and a memory sink, so what is measured is the engine: offsets, planning the batch, running the plan, state, sink, logs. \"Empty\" is a trigger that finds no new data (no batch is logged). Milliseconds.\n\n| query | checkpoint | batch | median | p99 | min | max |\n|---|---|---|---:|---:|---:|---:|"
    );
    let mut overhead_rows = Vec::new();
    for stateful in [false, true] {
        for durability in [Durability::NoSync, Durability::Fsync] {
            let (one, empty) = overhead(dir, durability, stateful, n).await?;
            let q = if stateful {
                "windowed count (state store)"
            } else {
                "stateless"
            };
            let c = match durability {
                Durability::Fsync => "durable (fsync)",
                Durability::NoSync => "no fsync",
            };
            for (what, s) in [("one row", one), ("empty", empty)] {
                let _ = writeln!(
                    md,
                    "| {q} | {c} | {what} | {} | {} | {} | {} |",
                    ms(s.median),
                    ms(s.p99),
                    ms(s.min),
                    ms(s.max)
                );
            }
            overhead_rows.push((stateful, durability, one));
        }
    }
    let _ = writeln!(
        md,
        "| floor: one write + fsync + rename + directory fsync | — | — | {} | {} | {} | {} |\n",
        ms(floor.median),
        ms(floor.p99),
        ms(floor.min),
        ms(floor.max)
    );
    for (stateful, d, one) in &overhead_rows {
        let target = match d {
            Durability::NoSync => format!(
                "target < 1 ms median: {}",
                if one.median < Duration::from_millis(1) {
                    "met"
                } else {
                    "NOT met"
                }
            ),
            Durability::Fsync => format!(
                "{:.1}× the fsync floor (target ≤ 2×): {}",
                one.median.as_secs_f64() / floor.median.as_secs_f64(),
                if one.median.as_secs_f64() <= 2.0 * floor.median.as_secs_f64() {
                    "met"
                } else {
                    "NOT met"
                }
            ),
        };
        let _ = writeln!(
            md,
            "- {} one-row batch, {}: {target}",
            if *stateful { "windowed" } else { "stateless" },
            if matches!(d, Durability::Fsync) {
                "durable"
            } else {
                "no fsync"
            }
        );
    }

    // 2. Throughput against DataFusion in one shot.
    let total = if quick { 1_000_000 } else { 10_000_000 };
    let per_file = 10_000;
    let keys = 10_000;
    eprintln!("bench: writing {total} rows of Parquet");
    let input = dir.join("input");
    write_parquet(&input, total, per_file, keys)?;
    let _ = writeln!(
        md,
        "\n## Throughput: micro-batches against DataFusion in one shot\n\nA one-minute tumbling window with `count(*)`, `sum(v)` and `max(v)` by key ({keys} keys) over {total} rows in Parquet files of {per_file} rows (100,000 rows per minute of event time), in append mode with a 10-second watermark delay, to a memory sink; checkpoint without fsync. Beside it, in the same process run, DataFusion runs the same aggregate over the same files in one shot. Median of {} runs (min–max).\n\n| micro-batch rows | batches | Sluice rows/s | DataFusion one-shot rows/s | ratio | target |\n|---:|---:|---:|---:|---:|---|",
        if quick { 1 } else { 3 }
    );
    let runs = if quick { 1 } else { 3 };
    let mut last_rss = Vec::new();
    for batch_rows in [10_000usize, 100_000, 1_000_000] {
        if batch_rows > total {
            continue;
        }
        let mut sluice_t = Vec::new();
        let mut df_t = Vec::new();
        let mut batches = 0;
        for _ in 0..runs {
            let (t, rows_out) = one_shot(&input).await?;
            df_t.push(t);
            let s = streamed(&input, batch_rows / per_file, None).await?;
            // Append mode emits every window but the last, still open.
            assert!(
                s.output_rows as usize <= rows_out,
                "{} > {rows_out}",
                s.output_rows
            );
            batches = s.batches;
            sluice_t.push(s.time);
            last_rss = s.rss_mib;
        }
        let (s, d) = (Stats::of(sluice_t), Stats::of(df_t));
        let rate = |t: Duration| total as f64 / t.as_secs_f64();
        let ratio = d.median.as_secs_f64() / s.median.as_secs_f64();
        let _ = writeln!(
            md,
            "| {batch_rows} | {batches} | {:.0} ({:.0}–{:.0}) | {:.0} ({:.0}–{:.0}) | {ratio:.2} | {} |",
            rate(s.median),
            rate(s.max),
            rate(s.min),
            rate(d.median),
            rate(d.max),
            rate(d.min),
            if batch_rows == 100_000 {
                if ratio >= 0.8 {
                    "≥ 0.8: met"
                } else {
                    "≥ 0.8: NOT met"
                }
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        md,
        "\nResident memory after each quarter of the last 1M-row-batch run (MiB): {:?}; peak of the whole process: {} MiB.",
        last_rss,
        rss_kib("VmHWM") / 1024
    );

    // 3. Checkpoint tax: the 100k-row run with a durable checkpoint.
    if total >= 100_000 {
        let mut durable_t = Vec::new();
        let mut nosync_t = Vec::new();
        for i in 0..runs {
            let ck = dir.join(format!("durable-{i}"));
            durable_t.push(streamed(&input, 100_000 / per_file, Some(&ck)).await?.time);
            nosync_t.push(streamed(&input, 100_000 / per_file, None).await?.time);
        }
        let (d, n) = (Stats::of(durable_t), Stats::of(nosync_t));
        let _ = writeln!(
            md,
            "\n## Checkpoint tax\n\nThe 100,000-row-batch run with every checkpoint, state and sink write fsynced, against the same run without fsync: {:.0} vs {:.0} rows/s, ratio {:.2} (target ≥ 0.8: {}).",
            total as f64 / d.median.as_secs_f64(),
            total as f64 / n.median.as_secs_f64(),
            n.median.as_secs_f64() / d.median.as_secs_f64(),
            if n.median.as_secs_f64() / d.median.as_secs_f64() >= 0.8 {
                "met"
            } else {
                "NOT met"
            }
        );
    }

    // 4. State store.
    let keys = if quick { 100_000 } else { 1_000_000 };
    eprintln!("bench: state store, {keys} keys");
    let sf = state_store(&dir.join("store"), keys, if quick { 3 } else { 5 })?;
    let _ = writeln!(
        md,
        "\n## State store\n\n{} keys (two Int64 key columns, two Int64 values), 4 partitions, fsync on. Milliseconds; median (min–max).\n\n| what | time |\n|---|---:|\n| first commit (every key new, one delta per partition) | {} |\n| commit with 1 % of keys updated | {} ({}–{}) |\n| commit with 10 % of keys updated | {} ({}–{}) |\n| a snapshot of every key (beside its delta) | {} |\n| recovery: load the last version (version 0's delta + {} deltas) | {} ({}–{}) |\n\nMemory: {:.0} bytes per key in the store; disk: {:.0} bytes per key in a delta holding every key.",
        sf.keys,
        ms(sf.first_commit),
        ms(sf.commit_1pct.median),
        ms(sf.commit_1pct.min),
        ms(sf.commit_1pct.max),
        ms(sf.commit_10pct.median),
        ms(sf.commit_10pct.min),
        ms(sf.commit_10pct.max),
        ms(sf.snapshot),
        if quick { 6 } else { 10 },
        ms(sf.recovery.median),
        ms(sf.recovery.min),
        ms(sf.recovery.max),
        sf.memory_bytes_per_key,
        sf.disk_bytes_per_key,
    );

    let _ = writeln!(
        md,
        "\n## Not measured yet\n\n- Nexmark: no `nexmark` source exists yet, so none of q0–q8 runs.\n- Checkpoint write speed as a fraction of the disk's raw sequential write speed.\n"
    );
    println!("{md}");
    std::fs::write(&out, &md)
        .map_err(|e| sluice::Error::io(format!("writing {}", out.display()), e))?;
    eprintln!("bench: wrote {}", out.display());
    Ok(())
}
