//! Throughput: a windowed aggregate in micro-batches against DataFusion
//! running it in one shot over the same Parquet files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::deps::datafusion::arrow::array::RecordBatch;
use sluice::deps::datafusion::parquet::arrow::ArrowWriter;
use sluice::deps::datafusion::prelude::{ParquetReadOptions, SessionContext};
use sluice::deps::sluice_common::durable::Durability;
use sluice::prelude::*;
use sluice::{Outcome, Result, StreamingQuery};

use crate::{rows, schema};

const WINDOW_SQL: &str = "SELECT window_start, k, count(*) AS n, sum(v) AS total, max(v) AS top \
     FROM TUMBLE(ev, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, k";

const ONE_SHOT_SQL: &str = "SELECT date_bin(INTERVAL '1' MINUTE, ts, TIMESTAMP '1970-01-01T00:00:00') AS window_start, \
     k, count(*) AS n, sum(v) AS total, max(v) AS top FROM ev GROUP BY 1, k";

/// Writes `total` rows as Parquet files of `per_file` rows each.
pub(crate) fn write_parquet(dir: &Path, total: usize, per_file: usize, keys: usize) -> Result<()> {
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
pub(crate) async fn one_shot(input: &Path) -> Result<(Duration, usize)> {
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
pub(crate) struct Streamed {
    pub(crate) time: Duration,
    pub(crate) batches: u64,
    pub(crate) output_rows: u64,
    /// Resident memory (MiB) after each quarter of the batches.
    pub(crate) rss_mib: Vec<u64>,
    /// Live state rows after each quarter of the batches.
    pub(crate) state_rows: Vec<u64>,
    /// Milliseconds spent in each phase of the batches (from their progress).
    pub(crate) phases: std::collections::BTreeMap<String, f64>,
}

impl Streamed {
    /// The phases' milliseconds as text: `name ms, name ms, ...`.
    pub(crate) fn phases_text(&self) -> String {
        self.phases
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Sluice over the same files, `files_per_batch` files a micro-batch, to a
/// memory sink in append mode (windows close as the watermark passes them).
pub(crate) async fn streamed(
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
    let q = start_last_query(&ctx, &script).await?;
    let total_files = std::fs::read_dir(input).map(|d| d.count()).unwrap_or(0);
    let expected_batches = total_files.div_ceil(files_per_batch) as u64;
    let quarter = expected_batches.div_ceil(4).max(1);
    let mut rss_mib = Vec::new();
    let mut state_rows = Vec::new();
    let t = Instant::now();
    let mut batches = 0;
    let mut output_rows = 0;
    let mut phases = std::collections::BTreeMap::new();
    while let Some(p) = q.run_batch().await? {
        batches += 1;
        output_rows += p.output_rows;
        for (k, v) in &p.durations_ms {
            *phases.entry(k.clone()).or_insert(0.0) += v;
        }
        if batches % quarter == 0 {
            rss_mib.push(rss_kib("VmRSS") / 1024);
            state_rows.push(p.operators.iter().map(|s| s.rows).sum::<u64>());
        }
    }
    let time = t.elapsed();
    q.stop().await?;
    Ok(Streamed {
        time,
        batches,
        output_rows,
        rss_mib,
        state_rows,
        phases,
    })
}

/// Runs `script` in `ctx` and starts its last query on a manual trigger
/// (starting opens the query's sources).
pub(crate) async fn start_last_query(ctx: &StreamContext, script: &str) -> Result<StreamingQuery> {
    let mut last = None;
    for o in ctx.sql(script).await? {
        if let Outcome::Query(q) = o {
            last = Some(q);
        }
    }
    last.ok_or_else(|| sluice::Error::internal("the script starts no query"))?
        .with_trigger(Trigger::Manual)
        .start()
        .await
}

/// A `/proc/self/status` figure in KiB (0 where there is none).
pub(crate) fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}
