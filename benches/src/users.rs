//! Measured where users feel it: the `sluice` CLI running a file → file
//! pipeline, and DuckDB in one shot over the same Parquet files as the
//! throughput figures.
//!
//! DuckDB runs through its Python package, installed (pinned) into
//! `~/.cache/sluice/tools/python` the first time; when that cannot be done
//! (no Python, no package registry), the report says so and why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice::Result;

/// The DuckDB release the comparison installs.
const DUCKDB: &str = "duckdb==2.0.1";

/// DuckDB's one-shot runs of the windowed aggregate.
pub(crate) struct DuckDb {
    pub(crate) version: String,
    pub(crate) times: Vec<Duration>,
    pub(crate) rows: usize,
}

fn tools_python() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/sluice/tools/python")
}

/// Runs `python3` with the tools directory on its path.
fn python(args: &[&str]) -> std::result::Result<String, String> {
    let out = Command::new("python3")
        .args(args)
        .env("PYTHONPATH", tools_python())
        .output()
        .map_err(|e| format!("python3 could not be started: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "python3 {}: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes `import duckdb` work, installing the package if it is missing.
fn ensure_duckdb() -> std::result::Result<(), String> {
    if python(&["-c", "import duckdb"]).is_ok() {
        return Ok(());
    }
    eprintln!(
        "bench: installing {DUCKDB} into {}",
        tools_python().display()
    );
    let target = tools_python();
    let target = target.to_string_lossy();
    python(&[
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--target",
        &target,
        DUCKDB,
    ])
    .map_err(|e| format!("installing {DUCKDB} failed: {e}"))?;
    python(&["-c", "import duckdb"]).map(|_| ())
}

/// The same aggregate as the throughput figures, in DuckDB's SQL. The
/// result is kept in a DuckDB table (as DataFusion's one-shot run keeps its
/// result as Arrow batches), not converted to Python objects.
const DUCKDB_SCRIPT: &str = r#"
import json, sys, time, duckdb
path, runs = sys.argv[1], int(sys.argv[2])
con = duckdb.connect()
query = ("CREATE OR REPLACE TEMP TABLE result AS "
         "SELECT time_bucket(INTERVAL '1 minute', ts::TIMESTAMP) AS window_start, k, "
         "count(*) AS n, sum(v) AS total, max(v) AS top "
         f"FROM read_parquet('{path}/*.parquet') GROUP BY ALL")
times = []
for _ in range(runs):
    t = time.perf_counter()
    con.execute(query)
    times.append(time.perf_counter() - t)
rows = con.execute("SELECT count(*) FROM result").fetchone()[0]
threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
print(json.dumps({"version": duckdb.__version__, "threads": threads, "times": times, "rows": rows}))
"#;

/// DuckDB over the Parquet files in `input`, `runs` times in one process.
pub(crate) fn duckdb_one_shot(input: &Path, runs: usize) -> std::result::Result<DuckDb, String> {
    ensure_duckdb()?;
    let out = python(&[
        "-c",
        DUCKDB_SCRIPT,
        &input.to_string_lossy(),
        &runs.to_string(),
    ])?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).map_err(|e| format!("DuckDB's output: {e}: {out}"))?;
    let times = v["times"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(serde_json::Value::as_f64)
                .map(Duration::from_secs_f64)
                .collect::<Vec<_>>()
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("DuckDB gave no times: {out}"))?;
    Ok(DuckDb {
        version: format!(
            "{} ({} threads)",
            v["version"].as_str().unwrap_or("?"),
            v["threads"]
        ),
        times,
        rows: v["rows"].as_u64().unwrap_or(0) as usize,
    })
}

/// What a CLI run of the file → file pipeline measured.
pub(crate) struct CliRun {
    pub(crate) batches: usize,
    /// Each batch's `durations_ms.total` from its progress record.
    pub(crate) batch_ms: Vec<f64>,
    /// Mean ms per batch of each phase of `durations_ms`, by name.
    pub(crate) phases: std::collections::BTreeMap<String, f64>,
    /// The whole `sluice run`, from starting the process to its exit.
    pub(crate) wall: Duration,
}

/// The `sluice` binary beside this benchmark's, built first (release).
fn cli_binary() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--release", "-p", "sluice-cli"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .map_err(|e| sluice::Error::io("building the sluice CLI", e))?;
    if !status.success() {
        return Err(sluice::Error::internal("building the sluice CLI failed"));
    }
    let exe = std::env::current_exe().map_err(|e| sluice::Error::io("this benchmark's path", e))?;
    let bin = exe.with_file_name("sluice");
    if !bin.exists() {
        return Err(sluice::Error::internal(format!(
            "the sluice CLI is not at {}",
            bin.display()
        )));
    }
    Ok(bin)
}

/// `sluice run` of a windowed count from JSON files to a JSON file sink,
/// one small file (`rows_per_file` rows) a batch, `files` batches, with a
/// durable checkpoint: what a user of the CLI pays per batch.
pub(crate) fn cli_file_to_file(dir: &Path, files: usize, rows_per_file: usize) -> Result<CliRun> {
    let bin = cli_binary()?;
    let input = dir.join("cli-input");
    std::fs::create_dir_all(&input).map_err(|e| sluice::Error::io("the CLI input", e))?;
    for f in 0..files {
        let mut text = String::new();
        for r in 0..rows_per_file {
            let i = f * rows_per_file + r;
            // A second of event time per file, so windows close as it runs.
            text.push_str(&format!(
                "{{\"k\": {}, \"v\": {}, \"ts\": \"2026-01-01T00:{:02}:{:02}\"}}\n",
                i % 10,
                i % 100,
                (f / 60) % 60,
                f % 60
            ));
        }
        std::fs::write(input.join(format!("part-{f:06}.json")), text)
            .map_err(|e| sluice::Error::io("writing the CLI input", e))?;
    }
    let script = dir.join("pipeline.sql");
    let sql = format!(
        "SET trigger = 'available-now';
CREATE SOURCE ev (k BIGINT, v BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
  WITH (connector = 'file', path = '{}', format = 'json', max_files_per_trigger = 1);
CREATE SINK out WITH (connector = 'file', path = '{}', format = 'json', output_mode = 'append') AS
SELECT window_start, k, count(*) AS n, sum(v) AS total
FROM TUMBLE(ev, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k;
",
        input.display(),
        dir.join("cli-output").display()
    );
    std::fs::write(&script, sql).map_err(|e| sluice::Error::io("writing the pipeline", e))?;
    let checkpoint = dir.join("cli-checkpoint");
    let t = Instant::now();
    let out = Command::new(&bin)
        .arg("run")
        .arg(&script)
        .arg("--checkpoint")
        .arg(&checkpoint)
        .output()
        .map_err(|e| sluice::Error::io("running the sluice CLI", e))?;
    let wall = t.elapsed();
    if !out.status.success() {
        return Err(sluice::Error::internal(format!(
            "sluice run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let progress = find(&checkpoint, "progress.jsonl")
        .ok_or_else(|| sluice::Error::internal("the CLI run wrote no progress.jsonl"))?;
    let text = std::fs::read_to_string(&progress)
        .map_err(|e| sluice::Error::io("reading the CLI run's progress", e))?;
    let batch_ms: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|p| p["durations_ms"]["total"].as_f64())
        .collect();
    let mut phases = std::collections::BTreeMap::<String, f64>::new();
    for l in text.lines() {
        let Ok(p) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if let Some(d) = p["durations_ms"].as_object() {
            for (k, v) in d {
                *phases.entry(k.clone()).or_default() += v.as_f64().unwrap_or(0.0);
            }
        }
    }
    for v in phases.values_mut() {
        *v /= batch_ms.len().max(1) as f64;
    }
    if batch_ms.len() != files {
        return Err(sluice::Error::internal(format!(
            "the CLI run committed {} batches for {files} files",
            batch_ms.len()
        )));
    }
    Ok(CliRun {
        batches: batch_ms.len(),
        batch_ms,
        phases,
        wall,
    })
}

fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(found) = find(&p, name) {
                return Some(found);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}
