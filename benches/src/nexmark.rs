//! Nexmark: the queries under `benches/nexmark/` over the `nexmark` source,
//! in micro-batches, events per second.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice::Result;
use sluice::deps::sluice_common::durable::Durability;
use sluice::prelude::*;

/// One query's figures.
pub(crate) struct NexmarkRun {
    pub(crate) query: String,
    pub(crate) what: String,
    pub(crate) time: Vec<Duration>,
    pub(crate) batches: u64,
    pub(crate) output_rows: u64,
}

/// The query files, in name order.
pub(crate) fn queries() -> Result<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("nexmark");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| sluice::Error::io(format!("reading {}", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort_by_key(|p| {
        let stem = p.file_stem().unwrap_or_default().to_string_lossy();
        let n: u32 = stem
            .trim_start_matches('q')
            .split('_')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(u32::MAX);
        (n, stem.into_owned())
    });
    Ok(files)
}

/// Runs `file` over `events` Nexmark events, `per_batch` events a batch,
/// `runs` times. With `pregenerate` the events are generated before the
/// clock starts; without it each batch generates its own, on the clock (the
/// figure Flink's and RisingWave's published Nexmark numbers measure).
pub(crate) async fn nexmark(
    file: &Path,
    events: u64,
    per_batch: u64,
    runs: usize,
    pregenerate: bool,
) -> Result<NexmarkRun> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| sluice::Error::io(format!("reading {}", file.display()), e))?;
    // Leading `--` lines describe the query; a `-- sink: <options>` line
    // among them adds options to the sink (q3's `state_ttl`, q4's
    // `output_mode`).
    let header: Vec<&str> = text
        .lines()
        .take_while(|l| l.starts_with("--"))
        .map(|l| l.trim_start_matches("--").trim())
        .collect();
    let sink_options: String = header
        .iter()
        .filter_map(|l| l.strip_prefix("sink:"))
        .map(|o| format!(", {}", o.trim()))
        .collect();
    // Append mode unless the file's sink line says otherwise (q4's changes).
    let mode = if sink_options.contains("output_mode") {
        ""
    } else {
        ", output_mode = 'append'"
    };
    let what = header
        .iter()
        .filter(|l| !l.starts_with("sink:"))
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let select: String = text
        .lines()
        .filter(|l| !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = NexmarkRun {
        query: file
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
        what,
        time: Vec::new(),
        batches: 0,
        output_rows: 0,
    };
    for _ in 0..runs {
        let ckpt = tempfile::tempdir().map_err(|e| sluice::Error::io("a temp dir", e))?;
        let ctx = StreamContext::new();
        ctx.update_settings(|s| {
            s.checkpoint_root = Some(ckpt.path().to_path_buf());
            s.durability = Durability::NoSync;
        });
        // The three tables of one stream, each with the same watermark
        // delay; a query opens (and pre-generates) only those it reads.
        let script = format!(
            "CREATE SOURCE bid (auction BIGINT, bidder BIGINT, price BIGINT, channel VARCHAR, url VARCHAR,
                                date_time TIMESTAMP, extra VARCHAR,
                                WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND)
               WITH (connector = 'nexmark', table = 'bid', events = {events},
                     max_events_per_trigger = {per_batch}, pregenerate = {pregenerate});
             CREATE SOURCE person (id BIGINT, name VARCHAR, email_address VARCHAR, credit_card VARCHAR,
                                   city VARCHAR, state VARCHAR, date_time TIMESTAMP, extra VARCHAR,
                                   WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND)
               WITH (connector = 'nexmark', table = 'person', events = {events},
                     max_events_per_trigger = {per_batch}, pregenerate = {pregenerate});
             CREATE SOURCE auction (id BIGINT, item_name VARCHAR, description VARCHAR, initial_bid BIGINT,
                                    reserve BIGINT, date_time TIMESTAMP, expires TIMESTAMP, seller BIGINT,
                                    category BIGINT, extra VARCHAR,
                                    WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND)
               WITH (connector = 'nexmark', table = 'auction', events = {events},
                     max_events_per_trigger = {per_batch}, pregenerate = {pregenerate});
             CREATE SINK out WITH (connector = 'memory'{mode}{sink_options}) AS {select};"
        );
        // With pregenerate, opening the source generates its events:
        // before the clock.
        let q = crate::throughput::start_last_query(&ctx, &script).await?;
        let (mut batches, mut rows) = (0, 0);
        let t = Instant::now();
        while let Some(p) = q.run_batch().await? {
            batches += 1;
            rows += p.output_rows;
        }
        out.time.push(t.elapsed());
        q.stop().await?;
        out.batches = batches;
        out.output_rows = rows;
    }
    Ok(out)
}
