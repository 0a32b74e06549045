//! Sluice's benchmarks, run with one command:
//!
//! ```text
//! cargo run --release -p sluice-benches -- [--quick] [--out docs/benchmarks.md]
//! cargo run --release -p sluice-benches -- --state     # the state store alone, printed
//! cargo run --release -p sluice-benches -- --users     # the CLI and DuckDB figures alone
//! cargo run --release -p sluice-benches -- --soak 60   # a 60-minute soak, to docs/benchmarks-soak.md
//! cargo run --release -p sluice-benches -- --cluster   # the loopback Ballista cluster alone, printed
//! ```
//!
//! Each comparison runs both sides in the same process run, so their ratio
//! holds on a noisy machine; timings are medians of several runs with the
//! minimum and maximum beside them. The results are printed and written as
//! Markdown with the machine, the date and the commit.

mod cluster;
mod nexmark;
mod overhead;
mod single;
mod soak;
mod state;
mod throughput;
mod users;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice::Result;
use sluice::deps::datafusion::arrow::array::{Int64Array, RecordBatch, TimestampMillisecondArray};
use sluice::deps::datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use sluice::deps::sluice_common::durable::Durability;

use overhead::{fsync_floor, overhead};
use state::state_store;
use throughput::{one_shot, rss_kib, streamed, write_parquet};

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
    // `--nexmark q4,q6`: only those Nexmark queries, full size, printed
    // (docs/benchmarks.md is left as it is).
    if let Some(list) = args.windows(2).find(|w| w[0] == "--nexmark") {
        let only: Vec<String> = list[1].split(',').map(str::to_string).collect();
        let mut md = String::from(
            "| query | what | batches | output rows | events/s | events/s incl. generation |\n|---|---|---:|---:|---:|---:|\n",
        );
        nexmark_rows(&mut md, 2_000_000, 100_000, 3, Some(&only)).await?;
        println!("{md}");
        return Ok(());
    }
    // `--single-aggregate`: the single-aggregate figures alone, repeated
    // (before/after comparisons of two builds); docs/benchmarks.md is left
    // as it is.
    // `--soak MINUTES`: the soak alone, written to docs/benchmarks-soak.md.
    if let Some(w) = args.windows(2).find(|w| w[0] == "--soak") {
        let minutes: f64 = w[1]
            .parse()
            .map_err(|_| sluice::Error::plan(format!("--soak takes minutes, not '{}'", w[1])))?;
        let work =
            tempfile::tempdir_in(".").map_err(|e| sluice::Error::io("a work directory", e))?;
        let report = soak::soak(work.path(), minutes).await?;
        let text = format!(
            "# Soak\n\nWritten by `cargo run --release -p sluice-benches -- --soak {minutes}` on {}, commit `{}`.\n\nMachine: {}.\n\n{report}",
            command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            command("git", &["rev-parse", "--short", "HEAD"]),
            machine()
        );
        print!("{text}");
        let path = out.with_file_name("benchmarks-soak.md");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| sluice::Error::io("the report's directory", e))?;
        }
        std::fs::write(&path, text).map_err(|e| sluice::Error::io("writing the soak report", e))?;
        eprintln!("soak: written to {}", path.display());
        return Ok(());
    }
    // `--users`: the CLI and DuckDB figures alone, printed; `--cli`: the
    // CLI's alone.
    let cli_only = args.iter().any(|a| a == "--cli");
    if cli_only || args.iter().any(|a| a == "--users") {
        let work =
            tempfile::tempdir_in(".").map_err(|e| sluice::Error::io("a work directory", e))?;
        let floor = fsync_floor(work.path(), 200);
        print!(
            "{}",
            cli_section(&users::cli_file_to_file(work.path(), 200, 10)?, floor)
        );
        if cli_only {
            return Ok(());
        }
        let input = work.path().join("input");
        write_parquet(&input, 10_000_000, 10_000, 10_000)?;
        let s = throughput::streamed(&input, 100, None).await?;
        let one = Stats::of(vec![s.time]);
        print!(
            "{}",
            duckdb_section(users::duckdb_one_shot(&input, 3), Some(one), 10_000_000)
        );
        return Ok(());
    }
    // `--state`: the state store's figures alone, printed.
    if args.iter().any(|a| a == "--state") {
        let work =
            tempfile::tempdir_in(".").map_err(|e| sluice::Error::io("a work directory", e))?;
        let sf = state_store(work.path(), 1_000_000, 5)?;
        print!("{}", state_section(&sf, false));
        return Ok(());
    }
    // `--overhead`: the one-row batch figures alone, printed.
    if args.iter().any(|a| a == "--overhead") {
        let work =
            tempfile::tempdir_in(".").map_err(|e| sluice::Error::io("a work directory", e))?;
        let floor = fsync_floor(work.path(), 1000);
        println!("floor: median {} ms", ms(floor.median));
        for stateful in [false, true] {
            for durability in [Durability::NoSync, Durability::Fsync] {
                let (one, _, phases) = overhead(work.path(), durability, stateful, 1000).await?;
                println!(
                    "stateful {stateful}, {durability:?}: median {} ms, p99 {} ms ({:.2}× the floor); {phases}",
                    ms(one.median),
                    ms(one.p99),
                    one.median.as_secs_f64() / floor.median.as_secs_f64()
                );
            }
        }
        return Ok(());
    }
    if args.iter().any(|a| a == "--cluster") {
        let work =
            tempfile::tempdir_in(".").map_err(|e| sluice::Error::io("a work directory", e))?;
        print!("{}", cluster::cluster_section(work.path(), 200).await?);
        return Ok(());
    }
    if args.iter().any(|a| a == "--single-aggregate") {
        let work =
            tempfile::tempdir_in(".").map_err(|e| sluice::Error::io("a work directory", e))?;
        print!("{}", single::single_aggregate(work.path(), 5).await?);
        return Ok(());
    }
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
    let mut overhead_phases = Vec::new();
    for stateful in [false, true] {
        for durability in [Durability::NoSync, Durability::Fsync] {
            let (one, empty, phases) = overhead(dir, durability, stateful, n).await?;
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
            overhead_phases.push(format!("- {q}, {c}: {phases}"));
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
                "{:.2}× the fsync floor (target ≤ 2×): {}",
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

    let _ = writeln!(
        md,
        "\nWhere a one-row batch's time goes (mean ms per batch, from the `durations_ms` of its progress; `offset_log` runs beside `execute` when durable, and `total` is the whole):\n\n{}",
        overhead_phases.join("\n")
    );

    // 1b. The CLI, file to file.
    let files = if quick { 50 } else { 200 };
    eprintln!("bench: the CLI, file → file, {files} batches");
    md.push_str(&cli_section(
        &users::cli_file_to_file(dir, files, 10)?,
        floor,
    ));

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
    let mut last_rss = (Vec::new(), Vec::new(), 0);
    let mut million: Option<Stats> = None;
    let mut phases = String::new();
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
            if batch_rows == 100_000 {
                phases = s.phases_text();
            }
            if batch_rows == 10_000 {
                // The run with the most batches shows whether memory grows.
                last_rss = (s.rss_mib, s.state_rows, s.output_rows);
            }
        }
        let (s, d) = (Stats::of(sluice_t), Stats::of(df_t));
        if batch_rows == 1_000_000 {
            million = Some(s);
        }
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
            match batch_rows {
                100_000 if ratio >= 0.8 => "≥ 0.8: met",
                100_000 => "≥ 0.8: NOT met",
                1_000_000 if ratio >= 1.0 => "≥ 1.0: met",
                1_000_000 => "≥ 1.0: NOT met",
                _ => "",
            }
        );
    }
    let _ = writeln!(
        md,
        "\nWhere the time of the last 100,000-row-batch run went, in ms summed over its batches (`durations_ms` of its progress records; `execute` holds the plan, the aggregate and the state store's in-memory work; `total` is the whole): {}.",
        phases
    );
    let _ = writeln!(
        md,
        "\nMemory in the last 10,000-row-batch run (the one with the most batches), after each quarter of its batches: resident {:?} MiB, with live state rows {:?} (evicted as the watermark closes windows), while the memory sink it writes to keeps every one of its {} output rows; peak of the whole benchmark process: {} MiB.",
        last_rss.0,
        last_rss.1,
        last_rss.2,
        rss_kib("VmHWM") / 1024
    );

    // 2b. DuckDB in one shot over the same files.
    eprintln!("bench: DuckDB one-shot");
    md.push_str(&duckdb_section(
        users::duckdb_one_shot(&input, runs),
        million,
        total,
    ));

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
    md.push_str(&state_section(&sf, quick));

    // 5. Nexmark.
    let events: u64 = if quick { 200_000 } else { 2_000_000 };
    let per_batch: u64 = 100_000;
    let _ = writeln!(
        md,
        "\n## Nexmark\n\nThe queries of `benches/nexmark/` over the `person`, `auction` and `bid` tables of the `nexmark` source: {events} events of the Nexmark stream (2 % people, 6 % auctions, 92 % bids; a query reads only its tables, but every event counts), {per_batch} events a micro-batch, pre-generated in memory before the clock starts, a 4-second watermark delay, to a memory sink in append mode, no fsync. Events of the stream per second; median of {runs} runs (min–max); and the same with each batch generating its events on the clock (the source's `pregenerate = false`), as Flink's and RisingWave's published Nexmark figures count them (one core each there; Sluice's figures use both of this machine's cores).\n\n| query | what | batches | output rows | events/s | events/s incl. generation |\n|---|---|---:|---:|---:|---:|"
    );
    nexmark_rows(&mut md, events, per_batch, runs, None).await?;
    let _ = writeln!(
        md,
        "\nq4's, q6's and q9's sinks are changelogs (their rows change); their output rows count the changes. q12 does not run yet (processing-time windows); `benches/nexmark/README.md` says what it needs.\n"
    );
    // 6. A loopback Ballista cluster against one process.
    eprintln!("bench: loopback cluster");
    md.push_str(&cluster::cluster_section(dir, if quick { 50 } else { 200 }).await?);
    // The hand-written record of what was optimized, and what is left.
    md.push('\n');
    md.push_str(include_str!("../optimizations.md"));
    println!("{md}");
    std::fs::write(&out, &md)
        .map_err(|e| sluice::Error::io(format!("writing {}", out.display()), e))?;
    eprintln!("bench: wrote {}", out.display());
    Ok(())
}

/// The Nexmark table's rows, one per query file (those in `only`, if given).
async fn nexmark_rows(
    md: &mut String,
    events: u64,
    per_batch: u64,
    runs: usize,
    only: Option<&[String]>,
) -> Result<()> {
    for file in nexmark::queries()? {
        let stem = file.file_stem().unwrap_or_default().to_string_lossy();
        if only.is_some_and(|o| !o.iter().any(|q| *q == stem)) {
            continue;
        }
        eprintln!("bench: nexmark {}", file.display());
        let r = nexmark::nexmark(&file, events, per_batch, runs, true).await?;
        let g = nexmark::nexmark(&file, events, per_batch, runs, false).await?;
        if (r.batches, r.output_rows) != (g.batches, g.output_rows) {
            return Err(sluice::Error::internal(format!(
                "nexmark {}: generating the events per batch changed the result ({} batches, {} rows against {}, {})",
                r.query, g.batches, g.output_rows, r.batches, r.output_rows
            )));
        }
        let (s, sg) = (Stats::of(r.time.clone()), Stats::of(g.time.clone()));
        let rate = |t: Duration| events as f64 / t.as_secs_f64();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} ({:.0}–{:.0}) | {:.0} |",
            r.query,
            r.what,
            r.batches,
            r.output_rows,
            rate(s.median),
            rate(s.max),
            rate(s.min),
            rate(sg.median)
        );
    }
    Ok(())
}

/// The state store's section of the report.
fn state_section(sf: &state::StateFigures, quick: bool) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## State store\n\n{} keys (two Int64 key columns, two Int64 values), 4 shards, fsync on. Milliseconds; median (min–max).\n\n| what | time |\n|---|---:|\n| putting every key (in memory, 100,000-row batches) | {} |\n| first commit (every key new: one delta) | {} |\n| commit with 1 % of keys updated | {} ({}–{}) |\n| commit with 10 % of keys updated | {} ({}–{}) |\n| first commit with a snapshot of every key beside its delta (the two written in parallel) | {} |\n| recovery: load the last version (version 0's delta + {} deltas) | {} ({}–{}) |\n\nMemory: {:.0} bytes per key in the store; disk: {:.0} bytes per key in a delta holding every key.\n\nCheckpoint write speed: the first commit writes its delta at {:.0} MB/s; one plain sequential write + fsync of as many bytes to the same disk runs at {:.0} MB/s: {:.0} % of the disk's raw speed (the commit also encodes Arrow IPC and checksums).",
        sf.keys,
        ms(sf.first_put),
        ms(sf.first_commit),
        ms(sf.commit_1pct.median),
        ms(sf.commit_1pct.min),
        ms(sf.commit_1pct.max),
        ms(sf.commit_10pct.median),
        ms(sf.commit_10pct.min),
        ms(sf.commit_10pct.max),
        ms(sf.with_snapshot),
        if quick { 6 } else { 10 },
        ms(sf.recovery.median),
        ms(sf.recovery.min),
        ms(sf.recovery.max),
        sf.memory_bytes_per_key,
        sf.disk_bytes_per_key,
        sf.commit_mb_per_s,
        sf.raw_mb_per_s,
        100.0 * sf.commit_mb_per_s / sf.raw_mb_per_s,
    );
    md
}

/// The CLI's file → file figures beside the fsync floor.
fn cli_section(run: &users::CliRun, floor: Stats) -> String {
    let mut sorted = run.batch_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let floor_ms = floor.median.as_secs_f64() * 1e3;
    let per_batch_wall = run.wall.as_secs_f64() * 1e3 / run.batches as f64;
    format!(
        "\n## The CLI, file → file\n\n`sluice run` (release build) of a 10-second tumbling window (`count`, `sum` by 10 keys) from JSON files to a JSON file sink in append mode, `available-now`, one file of 10 rows a batch ({} batches), durable checkpoint (fsync). Per batch, from its progress record (`durations_ms.total`, trigger → commit): median {:.3} ms, p99 {:.3} ms: {:.2}× the fsync floor ({floor_ms:.3} ms; target ≤ 3×: {}). The whole process run (start, planning, every batch, exit) divided by the batches: {per_batch_wall:.3} ms a batch. Where a batch's time goes (mean ms; `offset_log` runs beside `read` and `execute`, `state_commit` beside `sink`): {}.\n",
        run.batches,
        at(0.5),
        at(0.99),
        at(0.5) / floor_ms,
        if at(0.5) <= 3.0 * floor_ms {
            "met"
        } else {
            "NOT met"
        },
        run.phases
            .iter()
            .map(|(k, v)| format!("{k} {v:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// DuckDB's one-shot time beside Sluice's 1,000,000-row micro-batches.
fn duckdb_section(
    duck: std::result::Result<users::DuckDb, String>,
    sluice_1m: Option<Stats>,
    total: usize,
) -> String {
    let head = "\n## Against DuckDB in one shot\n\n";
    match (duck, sluice_1m) {
        (Err(e), _) => format!("{head}DuckDB could not be run, so there is no comparison: {e}\n"),
        (Ok(_), None) => format!(
            "{head}No 1,000,000-row-batch run to compare with (the quick run has too few rows).\n"
        ),
        (Ok(d), Some(s)) => {
            let dt = Stats::of(d.times.clone());
            let ratio = dt.median.as_secs_f64() / s.median.as_secs_f64();
            format!(
                "{head}The same windowed aggregate over the same {total} rows of Parquet, end to end: DuckDB {} (its Python package, installed by the benchmark into `~/.cache/sluice/tools/python`) in one shot, its result kept in a DuckDB table ({} rows), median {} ms ({}–{}) of {} runs; Sluice in 1,000,000-row micro-batches from the throughput table above, median {} ms. Ratio (DuckDB's time / Sluice's): {ratio:.2} (target ≥ 1.0: {}).\n",
                d.version,
                d.rows,
                ms(dt.median),
                ms(dt.min),
                ms(dt.max),
                d.times.len(),
                ms(s.median),
                if ratio >= 1.0 { "met" } else { "NOT met" }
            )
        }
    }
}
