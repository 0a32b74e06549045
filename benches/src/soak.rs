//! The soak mode (`-- --soak MINUTES`): a windowed aggregate over the rate
//! source, fed at 80 % of the peak this machine measured for it a moment
//! before, batch after batch on the real clock for MINUTES minutes, to see
//! whether memory, batch duration or backlog grow.
//!
//! The peak comes from the same query run back to back over a far faster
//! rate source, its batches capped to about a second's worth of rows. The soak then runs
//! a batch every second of the system clock; a batch that overruns its
//! second makes the next one start late, and how late it starts (times the
//! rate: the rows waiting) is the backlog.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice::Result;
use sluice::prelude::*;

use crate::throughput::{rss_kib, start_last_query};

/// The soaked query, over a rate source of `rate` rows a second, a batch
/// taking at most `cap` rows.
fn script(rate: u64, cap: u64, out: &Path) -> String {
    format!(
        "CREATE SOURCE r (timestamp TIMESTAMP, value BIGINT,
           WATERMARK FOR timestamp AS timestamp - INTERVAL '2' SECOND)
           WITH (connector = 'rate', rows_per_second = {rate}, max_rows_per_trigger = {cap});
         CREATE SINK out WITH (connector = 'file', path = '{}', format = 'parquet', output_mode = 'append') AS
         SELECT window_start, value % 1000 AS k, count(*) AS n, sum(value) AS total
         FROM TUMBLE(r, timestamp, INTERVAL '10' SECOND) GROUP BY window_start, window_end, value % 1000;",
        out.display()
    )
}

/// One batch of the soak.
struct Sample {
    at: Duration,
    batch: Duration,
    rows: u64,
    /// How late the batch started against its one-second schedule.
    behind: Duration,
    rss_mib: u64,
    state_rows: u64,
}

/// Rows a second this machine runs the soaked query at, on the real
/// clock: batches back to back over a rate source far faster than the
/// query, each capped at `max_rows_per_trigger` rows; the cap starts at a
/// guess and is set, round by round, to the rows a second the round before
/// ran, so the last round's batches take about a second, as the soak's do.
async fn peak(dir: &Path) -> Result<u64> {
    let mut cap: u64 = 2_000_000;
    let mut peak = 0;
    for round in 0..3 {
        let ctx = StreamContext::new();
        let run = dir.join(format!("peak-{round}"));
        ctx.update_settings(|s| s.checkpoint_root = Some(run.join("checkpoint")));
        let sql = script(1_000_000_000, cap, &run.join("out"));
        let q = start_last_query(&ctx, &sql).await?;
        let mut times = Vec::new();
        let mut rows = Vec::new();
        for i in 0..7 {
            let t = Instant::now();
            let p = q.run_batch().await?;
            // The first batches warm up.
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64());
                rows.push(p.map_or(0, |p| p.input_rows));
            }
        }
        q.stop().await?;
        let rate = rows.iter().sum::<u64>() as f64 / times.iter().sum::<f64>();
        eprintln!(
            "soak: batches of up to {cap} rows ran at {rate:.0} rows/s ({:.0} ms a batch)",
            times.iter().sum::<f64>() * 1e3 / times.len() as f64
        );
        peak = rate as u64;
        cap = peak.max(1);
    }
    Ok(peak)
}

/// Runs the soak and returns its report (Markdown).
pub(crate) async fn soak(dir: &Path, minutes: f64) -> Result<String> {
    eprintln!("soak: measuring the peak");
    let peak = peak(dir).await?;
    let rate = peak * 8 / 10;
    eprintln!("soak: peak {peak} rows/s; soaking at {rate} rows/s for {minutes} minutes");
    let ctx = StreamContext::new();
    ctx.update_settings(|s| s.checkpoint_root = Some(dir.join("soak-checkpoint")));
    // A batch after a stall takes at most a second and a half of rows, as a
    // user would cap it: an uncapped catch-up batch costs more per row than
    // a normal one (more memory to fault in), which at 80 % load can keep a
    // query from ever catching up.
    let cap = rate * 3 / 2;
    let q = start_last_query(&ctx, &script(rate, cap, &dir.join("soak-out"))).await?;
    let length = Duration::from_secs_f64(minutes * 60.0);
    let start = Instant::now();
    let mut next = start;
    let mut samples = Vec::new();
    while start.elapsed() < length {
        let now = Instant::now();
        if now < next {
            tokio::time::sleep(next - now).await;
        }
        let behind = Instant::now().saturating_duration_since(next);
        if behind > Duration::from_secs(60) {
            eprintln!("soak: a minute behind schedule; stopping");
            break;
        }
        let t = Instant::now();
        let p = q.run_batch().await?;
        let batch = t.elapsed();
        next += Duration::from_secs(1);
        let Some(p) = p else { continue };
        samples.push(Sample {
            at: start.elapsed(),
            batch,
            rows: p.input_rows,
            behind,
            rss_mib: rss_kib("VmRSS") / 1024,
            state_rows: p.operators.iter().map(|s| s.rows).sum(),
        });
        // A line a minute, so a soak cut short still shows its course.
        if samples.len() % 60 == 0
            && let Some(last) = samples.last()
        {
            let recent: Vec<f64> = samples[samples.len() - 60..]
                .iter()
                .map(|s| s.batch.as_secs_f64() * 1e3)
                .collect();
            eprintln!(
                "soak: {:.0} s: median batch {:.0} ms, behind {:.2} s, {} MiB, {} state rows",
                last.at.as_secs_f64(),
                median(recent),
                last.behind.as_secs_f64(),
                last.rss_mib,
                last.state_rows
            );
        }
    }
    q.stop().await?;
    Ok(report(&samples, peak, rate, minutes))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(samples: &[Sample], peak: u64, rate: u64, minutes: f64) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "A one-second batch of a 10-second tumbling window (`count`, `sum` by 1,000 keys) over the rate source (`max_rows_per_trigger` at 1.5 seconds of rows), to a Parquet file sink, durable checkpoint (fsync). Peak on this machine (batches of about a second's rows, back to back): {peak} rows/s; soaked at 80 %: {rate} rows/s for {minutes} minutes. Per minute: batches, median and worst batch duration, rows per batch, how late the last batch of the minute started against its one-second schedule (the backlog, in time; times the rate, in rows), resident memory and state rows at the minute's end.\n\n| minute | batches | median batch ms | max batch ms | rows/batch | behind schedule s | backlog rows | resident MiB | state rows |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let total_minutes = samples.last().map_or(0, |s| s.at.as_secs() / 60 + 1);
    for m in 0..total_minutes {
        let in_minute: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at.as_secs() / 60 == m)
            .collect();
        let Some(last) = in_minute.last() else {
            continue;
        };
        let batch_ms: Vec<f64> = in_minute
            .iter()
            .map(|s| s.batch.as_secs_f64() * 1e3)
            .collect();
        let max = batch_ms.iter().cloned().fold(0.0, f64::max);
        let rows = in_minute.iter().map(|s| s.rows).sum::<u64>() / in_minute.len() as u64;
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {} | {:.2} | {:.0} | {} | {} |",
            m + 1,
            in_minute.len(),
            median(batch_ms),
            max,
            rows,
            last.behind.as_secs_f64(),
            last.behind.as_secs_f64() * rate as f64,
            last.rss_mib,
            last.state_rows
        );
    }
    // The first and last stretch after a minute of warm-up: ten minutes
    // each in a soak of 30 minutes or more, a third of the rest otherwise.
    let warm = Duration::from_secs(60);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= warm).collect();
    if after.len() >= 2 {
        let span = after[after.len() - 1].at - warm;
        let part = if minutes >= 30.0 {
            Duration::from_secs(600)
        } else {
            span / 3
        };
        let first: Vec<&&Sample> = after.iter().filter(|s| s.at < warm + part).collect();
        let last: Vec<&&Sample> = after
            .iter()
            .filter(|s| s.at > after[after.len() - 1].at.saturating_sub(part))
            .collect();
        let med =
            |v: &[&&Sample], f: &dyn Fn(&Sample) -> f64| median(v.iter().map(|s| f(s)).collect());
        let batch = |s: &Sample| s.batch.as_secs_f64() * 1e3;
        let rss = |s: &Sample| s.rss_mib as f64;
        let (b0, b1) = (med(&first, &batch), med(&last, &batch));
        let (r0, r1) = (med(&first, &rss), med(&last, &rss));
        let behind_end = after[after.len() - 1].behind.as_secs_f64();
        let change = |a: f64, b: f64| if a > 0.0 { (b - a) / a * 100.0 } else { 0.0 };
        let verdict = |pct: f64| {
            if pct.abs() <= 10.0 {
                "within 10 %: met"
            } else {
                "more than 10 %: NOT met"
            }
        };
        let _ = writeln!(
            md,
            "\nFirst {:.0} minutes after a minute of warm-up against the last {:.0}: median batch {b0:.1} → {b1:.1} ms ({:+.1} %, {}); median resident memory {r0:.0} → {r1:.0} MiB ({:+.1} %, {}); behind schedule at the end {behind_end:.2} s ({}).",
            part.as_secs_f64() / 60.0,
            part.as_secs_f64() / 60.0,
            change(b0, b1),
            verdict(change(b0, b1)),
            change(r0, r1),
            verdict(change(r0, r1)),
            if behind_end < 1.0 {
                "the backlog does not grow"
            } else {
                "the backlog grows"
            }
        );
    }
    md
}
