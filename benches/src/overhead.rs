//! Per-batch overhead: trigger → commit of tiny batches, and the fsync floor.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice::Result;
use sluice::deps::sluice_common::durable::{self, Durability};
use sluice::prelude::*;

use crate::{Stats, rows, schema};

/// The cost of one small durable write (write + fsync + rename + directory
/// fsync): the floor of any durable batch.
pub(crate) fn fsync_floor(dir: &Path, n: usize) -> Stats {
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
pub(crate) async fn overhead(
    dir: &Path,
    durability: Durability,
    stateful: bool,
    n: usize,
) -> Result<(Stats, Stats, String)> {
    overhead_on(dir, durability, stateful, n, None).await
}

/// [`overhead`], with each batch's plan run by `runner` (a cluster's).
pub(crate) async fn overhead_on(
    dir: &Path,
    durability: Durability,
    stateful: bool,
    n: usize,
    runner: Option<std::sync::Arc<dyn sluice::PlanRunner>>,
) -> Result<(Stats, Stats, String)> {
    let on_cluster = runner.is_some();
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
    let mut writer = df
        .write_stream()
        .output_mode(OutputMode::Append)
        .trigger(Trigger::Manual)
        .durability(durability)
        .checkpoint(dir.join(format!("overhead-{stateful}-{durability:?}-{on_cluster}")));
    if let Some(r) = runner {
        writer = writer.runner(r);
    }
    let q = writer
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
    let mut phases = std::collections::BTreeMap::<String, f64>::new();
    for _ in 0..n {
        src.append(batch())?;
        let t = Instant::now();
        let p = q.run_batch().await?;
        one_row.push(t.elapsed());
        let p = p.ok_or_else(|| sluice::Error::internal("no batch ran"))?;
        for (k, v) in &p.durations_ms {
            *phases.entry(k.clone()).or_insert(0.0) += v;
        }
    }
    // Mean milliseconds per batch in each phase.
    let phases = phases
        .iter()
        .map(|(k, v)| format!("{k} {:.3}", v / n as f64))
        .collect::<Vec<_>>()
        .join(", ");
    let mut empty = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let p = q.run_batch().await?;
        empty.push(t.elapsed());
        assert!(p.is_none(), "nothing to do");
    }
    q.stop().await?;
    Ok((Stats::of(one_row), Stats::of(empty), phases))
}
