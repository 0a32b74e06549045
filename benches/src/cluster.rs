//! Micro-batches on a loopback Ballista cluster (a scheduler and two
//! executors in this process, on 127.0.0.1) against the same queries in one
//! process: per-batch latency of one-row batches, and the throughput of the
//! 100,000-row windowed aggregate; and both again with the checkpoint in a
//! bucket of a local S3 server (moto, `scripts/s3-server.sh install`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::Result;
use sluice::deps::sluice_common::durable::Durability;
use sluice::deps::sluice_connectors::s3_server::LocalS3;
use sluice::prelude::*;
use sluice_cluster::{ClusterRunner, Scheduler};

use crate::overhead::overhead_on;
use crate::{ms, rows, schema};

/// The executors of the loopback cluster, and the tasks each runs at once.
const EXECUTORS: usize = 2;
const SLOTS: usize = 2;

/// A scheduler and its executors on 127.0.0.1, in this process.
async fn loopback(work: &Path) -> Result<Scheduler> {
    sluice_cluster::start_local(EXECUTORS, SLOTS, work).await
}

/// The benchmarks' windowed aggregate (one-minute windows, count and sum
/// per key) over `src`, started with a manual trigger, fsync and its
/// checkpoint at `checkpoint`, on `runner` if there is one.
async fn windowed_query(
    src: impl sluice::Source + 'static,
    checkpoint: std::path::PathBuf,
    runner: Option<Arc<dyn sluice::PlanRunner>>,
) -> Result<sluice::StreamingQuery> {
    let ctx = StreamContext::new();
    let df = ctx
        .read_stream(src)
        .await?
        .with_watermark("ts", Duration::from_secs(5))?
        .tumble("ts", Duration::from_secs(60))?
        .aggregate(
            vec![col("window_start"), col("window_end"), col("k")],
            vec![
                sluice::deps::datafusion::functions_aggregate::expr_fn::count(lit(1)).alias("n"),
                sluice::deps::datafusion::functions_aggregate::expr_fn::sum(col("v")).alias("s"),
            ],
        )?;
    let mut writer = df
        .write_stream()
        .output_mode(OutputMode::Append)
        .trigger(Trigger::Manual)
        .durability(Durability::Fsync)
        .checkpoint(checkpoint);
    if let Some(r) = runner {
        writer = writer.runner(r);
    }
    writer
        .start(MemorySink::new("out", MemoryTable::new()))
        .await
}

/// Rows per second of `batches` batches of `size` rows through a windowed
/// aggregate (one-minute windows, 10,000 keys), after two warm-up batches.
async fn windowed_throughput(
    dir: &Path,
    name: &str,
    size: usize,
    batches: usize,
    runner: Option<Arc<dyn sluice::PlanRunner>>,
) -> Result<f64> {
    let src = MemorySource::new("s", schema());
    let q = windowed_query(src.clone(), dir.join(format!("throughput-{name}")), runner).await?;
    let one = schema();
    let mut at = 0;
    let mut took = Duration::ZERO;
    for i in 0..batches + 2 {
        src.append(rows(&one, at, at + size, 10_000))?;
        at += size;
        let t = Instant::now();
        q.run_batch().await?;
        if i >= 2 {
            took += t.elapsed();
        }
    }
    q.stop().await?;
    Ok((size * batches) as f64 / took.as_secs_f64())
}

/// Rows per second of `batches` Parquet files of `size` rows each (one a
/// batch) through the same windowed aggregate, after two warm-up files:
/// read by the driver (one process, or a cluster runner told to), or by
/// the cluster's executors.
async fn file_throughput(
    dir: &Path,
    name: &str,
    size: usize,
    batches: usize,
    runner: Option<Arc<dyn sluice::PlanRunner>>,
) -> Result<f64> {
    let files = dir.join(format!("files-{name}"));
    crate::throughput::write_parquet(&files, size * (batches + 2), size, 10_000)?;
    let src = FileSource::parquet(&files)
        .schema(schema())
        .name("s")
        .max_files_per_trigger(1);
    let q = windowed_query(src, dir.join(format!("files-throughput-{name}")), runner).await?;
    let mut took = Duration::ZERO;
    for i in 0..batches + 2 {
        let t = Instant::now();
        q.run_batch().await?;
        if i >= 2 {
            took += t.elapsed();
        }
    }
    q.stop().await?;
    Ok((size * batches) as f64 / took.as_secs_f64())
}

/// A latency row's query, as `overhead_on` runs it.
fn query_label(stateful: bool) -> &'static str {
    if stateful {
        "windowed aggregate"
    } else {
        "stateless"
    }
}

/// The cluster section of the benchmarks page, as Markdown.
pub(crate) async fn cluster_section(dir: &Path, n: usize) -> Result<String> {
    let scheduler = loopback(&dir.join("cluster-work")).await?;
    let addr = scheduler.addr().to_string();
    let runner = |p: usize| -> Arc<dyn sluice::PlanRunner> {
        Arc::new(ClusterRunner::new(&addr).with_state_partitions(p))
    };
    let mut md = String::new();
    md.push_str("## On a loopback Ballista cluster\n\n");
    md.push_str(&format!(
        "A scheduler and {EXECUTORS} executors ({SLOTS} task slots each) in the benchmark's \
process on 127.0.0.1 (`sluice-cluster`, Ballista 55, push scheduling), against the same \
query in one process, side by side in one run. The machine's cores are shared by the \
driver, the scheduler and the executors. State on the cluster is in 4 partitions.\n\n"
    ));
    md.push_str(&format!(
        "### Per-batch latency: one-row batches, trigger → commit, {n} batches each\n\n"
    ));
    md.push_str("| query | durability | one process median / p99 (ms) | cluster median / p99 (ms) | ratio of medians |\n|---|---|---:|---:|---:|\n");
    let mut durable_local = Vec::new();
    for stateful in [false, true] {
        for durability in [Durability::NoSync, Durability::Fsync] {
            let (local, _, _) = overhead_on(dir, durability, stateful, n, None).await?;
            if durability == Durability::Fsync {
                durable_local.push(local);
            }
            let (remote, _, _) = overhead_on(dir, durability, stateful, n, Some(runner(4))).await?;
            md.push_str(&format!(
                "| {} | {durability:?} | {} / {} | {} / {} | {:.1}× |\n",
                query_label(stateful),
                ms(local.median),
                ms(local.p99),
                ms(remote.median),
                ms(remote.p99),
                remote.median.as_secs_f64() / local.median.as_secs_f64()
            ));
        }
    }
    md.push_str(
        "\n### Throughput: windowed aggregate, 100,000-row batches (10 batches, fsync)\n\n",
    );
    let local = windowed_throughput(dir, "local", 100_000, 10, None).await?;
    let remote = windowed_throughput(dir, "cluster", 100_000, 10, Some(runner(4))).await?;
    md.push_str("| run | rows/s | against one process |\n|---|---:|---:|\n");
    // A row of the table: rows/s, and against one process from memory.
    let row = |md: &mut String, run: &str, rps: f64| {
        md.push_str(&format!("| {run} | {rps:.0} | {:.2} |\n", rps / local));
    };
    row(&mut md, "one process", local);
    row(&mut md, "loopback cluster", remote);
    // From Parquet files: read by the driver, or by the executors.
    let files_local = file_throughput(dir, "local", 100_000, 10, None).await?;
    let by_driver: Arc<dyn sluice::PlanRunner> = Arc::new(
        ClusterRunner::new(&addr)
            .with_state_partitions(4)
            .with_sources_read_by_driver(),
    );
    let files_driver = file_throughput(dir, "driver", 100_000, 10, Some(by_driver)).await?;
    let files_executors = file_throughput(dir, "executors", 100_000, 10, Some(runner(4))).await?;
    row(
        &mut md,
        "from Parquet files (one of 100,000 rows a batch), one process",
        files_local,
    );
    row(
        &mut md,
        "from Parquet files, loopback cluster, files read by the driver",
        files_driver,
    );
    row(
        &mut md,
        "from Parquet files, loopback cluster, files read by the executors",
        files_executors,
    );
    // The same with the checkpoint in a bucket of a local S3 server.
    let s3 = LocalS3::start()?;
    s3.register_bucket("sluice-bench")?;
    let bucket = Path::new("s3://sluice-bench");
    let in_bucket = windowed_throughput(bucket, "bucket", 100_000, 10, None).await?;
    let cluster_bucket =
        windowed_throughput(bucket, "cluster-bucket", 100_000, 10, Some(runner(4))).await?;
    row(&mut md, "one process, checkpoint in a bucket", in_bucket);
    row(
        &mut md,
        "loopback cluster, checkpoint in a bucket",
        cluster_bucket,
    );
    md.push('\n');
    md.push_str(&format!(
        "### With the checkpoint in a bucket: one-row batches, fsync, {n} batches each\n\n\
The checkpoint in a bucket of moto's S3 server (5.2.6, a Python process) on 127.0.0.1, \
mounted on a local cache: every file the batch writes is also put to the bucket, in one \
`PUT` each, before the write returns (`docs/checkpoint-format.md`, \"A checkpoint in a \
bucket\"). On this in-process cluster the executors share the driver's mount (one \
process); separate executor processes would each keep a cache of their own.\n\n"
    ));
    md.push_str("| query | one process, local directory median / p99 (ms) | one process, bucket | cluster, bucket |\n|---|---:|---:|---:|\n");
    for (stateful, local) in [false, true].into_iter().zip(durable_local) {
        let (one, _, _) = overhead_on(bucket, Durability::Fsync, stateful, n, None).await?;
        let (cl, _, _) =
            overhead_on(bucket, Durability::Fsync, stateful, n, Some(runner(4))).await?;
        md.push_str(&format!(
            "| {} | {} / {} | {} / {} | {} / {} |\n",
            query_label(stateful),
            ms(local.median),
            ms(local.p99),
            ms(one.median),
            ms(one.p99),
            ms(cl.median),
            ms(cl.p99),
        ));
    }
    md.push('\n');
    Ok(md)
}
