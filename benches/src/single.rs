//! The single-aggregate figures alone (`-- --single-aggregate`): the
//! windowed one-row batch without fsync and the 100,000-row-batch ratio
//! against DataFusion in one shot, repeated so two builds can be compared
//! on the same machine on the same day. The file is self-contained so it
//! can be dropped into an older checkout to measure "before".

use std::path::Path;

use sluice::Result;
use sluice::deps::sluice_common::durable::Durability;

use crate::Stats;
use crate::overhead::overhead;
use crate::throughput::{one_shot, streamed, write_parquet};

/// Runs the two figures `runs` times each and returns them as text.
///
/// `SLUICE_BENCH_ONLY=overhead` or `=ratio` runs one of the two;
/// `=streamed` runs only the micro-batches of the ratio (no one-shot), for
/// a profiler; `SLUICE_BENCH_RUNS` sets `runs`.
pub(crate) async fn single_aggregate(dir: &Path, runs: usize) -> Result<String> {
    let runs = std::env::var("SLUICE_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(runs);
    let only = std::env::var("SLUICE_BENCH_ONLY").unwrap_or_default();
    let mut out = String::new();
    let mut one_row = Vec::new();
    for i in 0..if only == "ratio" || only == "streamed" {
        0
    } else {
        runs
    } {
        // A checkpoint of its own per run (a reused one would resume).
        let run = dir.join(format!("overhead-run-{i}"));
        std::fs::create_dir_all(&run).map_err(|e| sluice::Error::io("a run directory", e))?;
        let (one, _, _) = overhead(&run, Durability::NoSync, true, 1000).await?;
        one_row.push(one.median);
    }
    let mut ratios = Vec::new();
    if only != "overhead" {
        write_parquet(&dir.join("input"), 10_000_000, 10_000, 10_000)?;
    }
    let input = dir.join("input");
    if only == "streamed" {
        for _ in 0..runs {
            let s = streamed(&input, 10, None).await?;
            out.push_str(&format!(
                "micro-batches {:.0} ms: {}\n",
                s.time.as_secs_f64() * 1e3,
                s.phases_text()
            ));
        }
        return Ok(out);
    }
    let mut last_phases = String::new();
    for _ in 0..if only == "overhead" { 0 } else { runs } {
        let (d, _) = one_shot(&input).await?;
        let s = streamed(&input, 10, None).await?;
        ratios.push(d.as_secs_f64() / s.time.as_secs_f64());
        last_phases = format!(
            "one-shot {:.0} ms, micro-batches {:.0} ms: {}",
            d.as_secs_f64() * 1e3,
            s.time.as_secs_f64() * 1e3,
            s.phases_text()
        );
    }
    if !one_row.is_empty() {
        let o = Stats::of(one_row.clone());
        out.push_str(&format!(
            "windowed one-row batch, no fsync, medians of {runs} runs of 1000 batches: {:?} ms; median {:.3} ms\n",
            one_row
                .iter()
                .map(|d| format!("{:.3}", d.as_secs_f64() * 1e3))
                .collect::<Vec<_>>(),
            o.median.as_secs_f64() * 1e3
        ));
    }
    if !ratios.is_empty() {
        ratios.sort_by(f64::total_cmp);
        out.push_str(&format!(
            "100,000-row batches against DataFusion one-shot, {runs} runs: ratios {:?}; median {:.3}\n",
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>(),
            ratios[ratios.len() / 2]
        ));
        out.push_str(&format!(
            "the last run, ms summed over its batches: {last_phases}\n"
        ));
    }
    Ok(out)
}
