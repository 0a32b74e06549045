//! The `sluice` command: runs and explains streaming SQL pipelines.
//!
//! ```text
//! sluice run pipeline.sql [--checkpoint DIR] [--trigger 5s|once|available-now]
//!                         [--max-batches N] [--http 127.0.0.1:PORT]
//! sluice explain pipeline.sql
//! sluice state DIR [--query NAME] [--version N] [--raw]
//! sluice progress DIR [--query NAME] [--last N]
//! sluice run pipeline.sql --cluster HOST:PORT [--job-timeout SECS]   (each batch as a Ballista job)
//! sluice cluster scheduler [--bind 127.0.0.1:50050] [--executor-timeout SECS] [--scheduling push|pull]
//! sluice cluster executor --scheduler HOST:PORT [--host 127.0.0.1]
//!                         [--flight-port 50051] [--grpc-port 50052]
//!                         [--slots N] [--work-dir DIR] [--scheduling push|pull]
//!                         [--kept-state-mb MIB]
//! ```
//!
//! `DIR` is the directory given to `run --checkpoint`, or one query's
//! directory in it; either may be an `s3://bucket/prefix` URL.
//!
//! Errors are one line on standard error and a non-zero exit code.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice::deps::datafusion::arrow::record_batch::RecordBatch;
use sluice::deps::datafusion::arrow::util::pretty::pretty_format_batches;
use sluice::deps::datafusion::physical_plan::collect;
use sluice::deps::sluice_common::durable::read_json;
use sluice::deps::sluice_planner::{Statement, parse_script};
use sluice::deps::sluice_state::checkpoint::{Metadata, last_committed};
use sluice::{Outcome, Progress, QueryInfo, QueryStatus, StreamContext, StreamingQuery, Trigger};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: streaming SQL on micro-batches, exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every CREATE SINK ... AS / INSERT INTO query of a SQL file.
    Run {
        /// The SQL file.
        file: PathBuf,
        /// Checkpoint root: each query checkpoints to `DIR/<sink name>`; run
        /// again with the same DIR to resume. DIR may be an `s3://bucket/prefix`
        /// URL (the S3 client reads `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
        /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`). Default: a
        /// temporary directory.
        #[arg(long, value_name = "DIR")]
        checkpoint: Option<PathBuf>,
        /// When batches run: an interval such as 5s, `once`, or `available-now`.
        #[arg(long, value_name = "TRIGGER")]
        trigger: Option<String>,
        /// Stop each query after N batches.
        #[arg(long, value_name = "N")]
        max_batches: Option<u64>,
        /// Serve the queries' progress, Prometheus metrics and a live page
        /// over HTTP on this address (e.g. 127.0.0.1:8080).
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
        /// Run each micro-batch's plan as a job on the Ballista cluster
        /// whose scheduler is at this address (`sluice cluster scheduler`).
        /// Every stateful operator's state is kept in partitions of the
        /// checkpoint, which every executor must reach at the same path
        /// (or in a bucket, with `--checkpoint s3://...`); the executors
        /// read file and Kafka sources (a local directory must be at the
        /// same path on each).
        #[arg(long, value_name = "HOST:PORT")]
        cluster: Option<String>,
        /// With --cluster: give up on a batch's job after this many seconds
        /// and retry the batch (as any transient failure).
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        job_timeout: u64,
    },
    /// Start a part of a Ballista cluster that runs Sluice's micro-batches.
    Cluster {
        #[command(subcommand)]
        part: ClusterPart,
    },
    /// Show the incremental plan of every streaming query of a SQL file.
    Explain {
        /// The SQL file.
        file: PathBuf,
    },
    /// Print the state of a checkpoint's queries (their group keys and
    /// aggregate values), as of the last committed batch or `--version`.
    State {
        /// The directory given to `run --checkpoint`, or one query's
        /// directory in it (e.g. `ckpt/<sink name>`).
        dir: PathBuf,
        /// Only this query.
        #[arg(long, value_name = "NAME")]
        query: Option<String>,
        /// The batch id to read the state as of.
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        /// Show the stored partial aggregate states instead of values.
        #[arg(long)]
        raw: bool,
    },
    /// Print the recent progress records of a checkpoint's queries as a
    /// table.
    Progress {
        /// The directory given to `run --checkpoint`, or one query's
        /// directory in it.
        dir: PathBuf,
        /// Only this query.
        #[arg(long, value_name = "NAME")]
        query: Option<String>,
        /// How many of the last batches to show.
        #[arg(long, value_name = "N", default_value_t = 20)]
        last: usize,
    },
}

#[derive(Subcommand)]
enum ClusterPart {
    /// The scheduler: drivers submit batches to it and it hands their
    /// tasks to executors. Runs until stopped.
    Scheduler {
        /// Where to listen.
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:50050")]
        bind: std::net::SocketAddr,
        /// Seconds without a heartbeat after which an executor is taken
        /// for lost and its tasks run elsewhere (executors send one every 2 s).
        #[arg(long, value_name = "SECS", default_value_t = 20)]
        executor_timeout: u64,
        /// How tasks reach executors: `push` (fast) or `pull` (executors
        /// poll; slower, but recovers from an executor lost mid-task).
        /// Executors must be started with the same.
        #[arg(long, default_value = "push")]
        scheduling: sluice_cluster::Scheduling,
    },
    /// An executor: registers with the scheduler and runs tasks. Runs
    /// until stopped (Ctrl-C or SIGTERM).
    Executor {
        /// The scheduler's address.
        #[arg(long, value_name = "HOST:PORT")]
        scheduler: std::net::SocketAddr,
        /// The host to bind and to advertise to the scheduler and the
        /// other executors.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The Arrow Flight port others fetch this executor's rows from.
        #[arg(long, default_value_t = 50051)]
        flight_port: u16,
        /// The port the scheduler pushes tasks to.
        #[arg(long, default_value_t = 50052)]
        grpc_port: u16,
        /// Tasks run at once (default: the machine's cores).
        #[arg(long)]
        slots: Option<usize>,
        /// Where shuffle and result files are written (default: a
        /// directory under the system's temporary directory).
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// `push` or `pull`: as the scheduler was started with.
        #[arg(long, default_value = "push")]
        scheduling: sluice_cluster::Scheduling,
        /// Memory, in MiB, for the state partitions kept between tasks
        /// (a partition's next task on this executor then needs no load).
        /// Past it, the least recently kept are dropped.
        #[arg(long, value_name = "MIB", default_value_t = 1024)]
        kept_state_mb: u64,
    },
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("sluice: internal error (a bug in Sluice, please report it): {info}");
    }));
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                file,
                checkpoint,
                trigger,
                max_batches,
                http,
                cluster,
                job_timeout,
            } => {
                let cluster = cluster.map(|addr| (addr, Duration::from_secs(job_timeout)));
                run(file, checkpoint, trigger, max_batches, http, cluster).await
            }
            Command::Cluster { part } => cluster_part(part).await,
            Command::Explain { file } => explain(file).await,
            Command::State {
                dir,
                query,
                version,
                raw,
            } => state(dir, query, version, raw).await,
            Command::Progress { dir, query, last } => progress(dir, query, last),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_sql(file: &PathBuf) -> sluice::Result<String> {
    std::fs::read_to_string(file)
        .map_err(|e| sluice::Error::io(format!("reading {}", file.display()), e))
}

fn print_rows(
    rows: &[sluice::deps::datafusion::arrow::record_batch::RecordBatch],
) -> sluice::Result<()> {
    if rows.iter().any(|b| b.num_rows() > 0) {
        println!("{}", pretty_format_batches(rows)?);
    }
    Ok(())
}

async fn run(
    file: PathBuf,
    checkpoint: Option<PathBuf>,
    trigger: Option<String>,
    max_batches: Option<u64>,
    http: Option<String>,
    cluster: Option<(String, Duration)>,
) -> sluice::Result<()> {
    let sql = read_sql(&file)?;
    if cluster.is_some() {
        // The cluster's client and runner log what they recover from.
        sluice_cluster::logging::init_from_env();
    }
    let runner: Option<Arc<dyn sluice::PlanRunner>> = cluster.map(|(addr, timeout)| {
        Arc::new(sluice_cluster::ClusterRunner::new(&addr).with_job_timeout(timeout))
            as Arc<dyn sluice::PlanRunner>
    });
    let trigger: Option<Trigger> = trigger.map(|t| t.parse()).transpose()?;
    if trigger == Some(Trigger::Manual) {
        return Err(sluice::Error::plan(
            "--trigger manual runs nothing by itself; use an interval such as 5s, once, or available-now",
        ));
    }
    // Listen for Ctrl-C before any query starts, so an early one still stops
    // the queries cleanly instead of killing the process mid-batch.
    let interrupt = Interrupt::listen()?;
    let ctx = StreamContext::new();
    let root = match checkpoint {
        Some(c) => c,
        None => {
            let dir = std::env::temp_dir().join(format!("sluice-run-{}", std::process::id()));
            eprintln!(
                "sluice: no --checkpoint given: checkpointing to {} (pass --checkpoint DIR to resume later)",
                dir.display()
            );
            dir
        }
    };
    ctx.update_settings(|s| s.checkpoint_root = Some(root));
    // Started before the queries, so a bad address fails before any batch.
    let _server = match http {
        Some(addr) => {
            let server = ctx.serve_http(&addr).await?;
            eprintln!(
                "sluice: serving http://{0}/ (progress at /api/queries, Prometheus metrics at /metrics)",
                server.local_addr()
            );
            Some(server)
        }
        None => None,
    };
    let mut pending = Vec::new();
    for outcome in ctx
        .sql(&sql)
        .await
        .map_err(|e| e.context(file.display().to_string()))?
    {
        match outcome {
            Outcome::Done => {}
            Outcome::Rows(rows) => print_rows(&rows)?,
            Outcome::Explain(text) => println!("{text}"),
            Outcome::Query(q) => pending.push(q),
        }
    }
    if pending.is_empty() {
        return Err(sluice::Error::plan(format!(
            "{} defines no streaming query (CREATE SINK ... AS SELECT or INSERT INTO <sink> SELECT)",
            file.display()
        )));
    }
    let mut queries = Vec::new();
    for q in pending {
        let mut q = *q;
        if let Some(t) = trigger {
            q = q.with_trigger(t);
        }
        if let Some(n) = max_batches {
            q = q.with_max_batches(n);
        }
        if let Some(r) = &runner {
            let r = Arc::clone(r);
            q = q.map_writer(|w| w.runner(r));
        }
        let q = q.start().await?;
        // Kept beside the checkpoint so that `sluice state` can show the
        // query's own columns with final values.
        write_pipeline_sql(q.checkpoint_dir(), &sql)?;
        queries.push(q);
    }
    supervise(&queries, interrupt).await
}

/// `sluice cluster scheduler|executor`: runs the part until it stops.
async fn cluster_part(part: ClusterPart) -> sluice::Result<()> {
    sluice_cluster::logging::init_from_env();
    match part {
        ClusterPart::Scheduler {
            bind,
            executor_timeout,
            scheduling,
        } => {
            let scheduler = sluice_cluster::start_scheduler_with(
                bind,
                Duration::from_secs(executor_timeout),
                scheduling,
            )
            .await?;
            // Tests and scripts read the address (port 0 picks one).
            println!("sluice: scheduler listening on {}", scheduler.addr());
            let _ = std::io::stdout().flush();
            scheduler.wait().await
        }
        ClusterPart::Executor {
            scheduler,
            host,
            flight_port,
            grpc_port,
            slots,
            work_dir,
            scheduling,
            kept_state_mb,
        } => {
            let work_dir = work_dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("sluice-executor-{}", std::process::id()))
            });
            sluice_cluster::run_executor(sluice_cluster::ExecutorOptions {
                scheduler,
                host,
                flight_port,
                grpc_port,
                slots: slots.unwrap_or_else(sluice::deps::sluice_common::cores),
                work_dir,
                scheduling,
                kept_state_bytes: kept_state_mb.saturating_mul(1 << 20),
            })
            .await
        }
    }
}

/// Ctrl-C (SIGINT), listened for from the moment it is created.
struct Interrupt {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn listen() -> sluice::Result<Self> {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| sluice::Error::io("listening for Ctrl-C", e))?;
            Ok(Interrupt { signal })
        }
        #[cfg(not(unix))]
        Ok(Interrupt {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        self.signal.recv().await;
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Shows a status line, stops every query cleanly on Ctrl-C, and returns the
/// first error. Returns as soon as every query has ended.
async fn supervise(queries: &[StreamingQuery], mut interrupt: Interrupt) -> sluice::Result<()> {
    let live = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut warned = std::collections::BTreeSet::new();
    let infos: Vec<QueryInfo> = queries.iter().map(StreamingQuery::info).collect();
    loop {
        // Any query's end is seen at once: a failure stops the others, and
        // the last one's end ends the run.
        let ended = any_ended(&infos);
        tokio::select! {
            _ = interrupt.recv() => {
                if live {
                    eprintln!();
                }
                eprintln!("sluice: stopping after the current batch commits...");
                for q in queries {
                    let _ = q.stop().await;
                }
                break;
            }
            _ = tick.tick() => {
                if live {
                    let line: Vec<String> = queries.iter().map(status).collect();
                    eprint!("\r\x1b[2K{}", line.join(" | "));
                    let _ = std::io::stderr().flush();
                }
            }
            _ = ended => {}
        }
        // Warnings are shown on every tick and when a query ends, so that
        // one of a run's last batches is not missed.
        for q in queries {
            for w in q.recent_progress().into_iter().flat_map(|p| p.warnings) {
                if warned.insert(w.clone()) {
                    if live {
                        eprintln!();
                    }
                    eprintln!("sluice: warning: query '{}': {w}", q.name());
                }
            }
            if q.last_progress().is_some_and(|p| p.falling_behind)
                && warned.insert(q.name().to_string())
            {
                if live {
                    eprintln!();
                }
                eprintln!(
                    "sluice: warning: query '{}' is falling behind: its batches take longer than its trigger interval, or its backlog grows batch after batch",
                    q.name()
                );
            }
        }
        // A query that failed stops the run: its error is the run's, and
        // the others stop after their current batch.
        if let Some(failed) = infos
            .iter()
            .position(|i| matches!(i.status(), QueryStatus::Failed(_)))
        {
            if live {
                eprintln!();
            }
            let outcome = queries[failed].await_termination().await;
            for other in queries {
                let _ = other.stop().await;
            }
            return outcome;
        }
        if infos.iter().all(|i| i.status() != QueryStatus::Active) {
            break;
        }
    }
    if live {
        eprintln!();
    }
    let mut first_err = None;
    for q in queries {
        if let Err(e) = q.await_termination().await {
            first_err.get_or_insert(e);
        }
        if let Some(p) = q.last_progress() {
            eprintln!(
                "sluice: query '{}' stopped after batch {} ({} in, {} out in the last batch)",
                q.name(),
                p.batch_id,
                count(p.input_rows, "row"),
                count(p.output_rows, "row"),
            );
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Ready once any of the active queries of `infos` has ended (at once if
/// none is active).
async fn any_ended(infos: &[QueryInfo]) {
    let mut ends: Vec<_> = infos
        .iter()
        .filter(|i| i.status() == QueryStatus::Active)
        .map(|i| Box::pin(i.finished()))
        .collect();
    if ends.is_empty() {
        return;
    }
    std::future::poll_fn(|cx| {
        if ends.iter_mut().any(|f| f.as_mut().poll(cx).is_ready()) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// `1 row`, `2 rows`.
fn count(n: u64, what: &str) -> String {
    match (n, what) {
        (1, _) => format!("1 {what}"),
        (_, "batch") => format!("{n} batches"),
        _ => format!("{n} {what}s"),
    }
}

fn status(q: &StreamingQuery) -> String {
    match q.last_progress() {
        None => format!("{}: waiting for data", q.name()),
        Some(p) => format!(
            "{}: batch {} | {:.0} rows/s | {:.1} ms{}",
            q.name(),
            p.batch_id,
            p.processed_rows_per_second,
            p.durations_ms.get("total").copied().unwrap_or(0.0),
            if p.falling_behind {
                " | FALLING BEHIND"
            } else {
                ""
            }
        ),
    }
}

/// The name of the copy of the SQL file kept in each query's checkpoint
/// directory by `sluice run`.
const PIPELINE_SQL: &str = "pipeline.sql";

fn write_pipeline_sql(dir: &Path, sql: &str) -> sluice::Result<()> {
    // Informational, so not synced; atomic, and written through to the
    // bucket of a checkpoint kept in one.
    use sluice::deps::sluice_common::durable;
    durable::write_atomic(
        &dir.join(PIPELINE_SQL),
        sql.as_bytes(),
        durable::Durability::NoSync,
    )
}

/// The query checkpoints `dir` names: itself when it is one query's
/// directory, otherwise the query directories in it (the directory given
/// to `run --checkpoint`); only `query`'s when given.
fn query_dirs(dir: &Path, query: Option<&str>) -> sluice::Result<Vec<(PathBuf, Metadata)>> {
    // A checkpoint (root) in a bucket is read from a local copy of it.
    let dir = &sluice::deps::sluice_common::remote::local_dir(dir)?;
    if dir.join("metadata").exists() {
        let meta: Metadata = read_json(&dir.join("metadata"))?;
        if let Some(q) = query
            && q != meta.name
        {
            return Err(sluice::Error::plan(format!(
                "{} is the checkpoint of query '{}', not '{q}'",
                dir.display(),
                meta.name
            )));
        }
        return Ok(vec![(dir.to_path_buf(), meta)]);
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| sluice::Error::io(format!("reading {}", dir.display()), e))?;
    let mut found = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.join("metadata").exists() {
            let meta: Metadata = read_json(&path.join("metadata"))?;
            found.push((path, meta));
        }
    }
    found.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    if found.is_empty() {
        return Err(sluice::Error::plan(format!(
            "{} holds no query checkpoint: give the directory passed to `sluice run --checkpoint`, or one query's directory in it",
            dir.display()
        )));
    }
    match query {
        None => Ok(found),
        Some(q) => {
            let names: Vec<String> = found.iter().map(|(_, m)| m.name.clone()).collect();
            found.retain(|(_, m)| m.name == q);
            if found.is_empty() {
                return Err(sluice::Error::plan(format!(
                    "{} holds no query '{q}' (it holds: {})",
                    dir.display(),
                    names.join(", ")
                )));
            }
            Ok(found)
        }
    }
}

async fn state(
    dir: PathBuf,
    query: Option<String>,
    version: Option<u64>,
    raw: bool,
) -> sluice::Result<()> {
    let dirs = query_dirs(&dir, query.as_deref())?;
    let many = dirs.len() > 1;
    for (i, (dir, meta)) in dirs.into_iter().enumerate() {
        if i > 0 {
            println!();
        }
        match query_state(&dir, &meta, version, raw).await {
            Ok(()) => {}
            // With several queries, one without a committed batch (or
            // without the version asked for) does not hide the others.
            Err(e @ sluice::Error::Plan(_)) if many => println!("{e}"),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn query_state(
    dir: &Path,
    meta: &Metadata,
    version: Option<u64>,
    raw: bool,
) -> sluice::Result<()> {
    let state_dir = dir.join("state").join("aggregate");
    let partitioned = state_dir
        .join(sluice::deps::sluice_exec::execution::CLUSTER_STATE_MARK)
        .exists();
    if !state_dir.join("meta").exists() && !partitioned {
        let others = sluice::other_operators(dir);
        if others.is_empty() {
            println!("query '{}' keeps no state (it is stateless)", meta.name);
        } else {
            println!(
                "query '{}' keeps its state in {} (under state/); `sluice state` shows only a first aggregate's (state/aggregate) for now",
                meta.name,
                others.join(", ")
            );
        }
        return Ok(());
    }
    let last = last_committed(dir)?.ok_or_else(|| {
        sluice::Error::plan(format!(
            "query '{}' has not committed a batch yet",
            meta.name
        ))
    })?;
    let v = version.unwrap_or(last);
    if v > last {
        return Err(sluice::Error::plan(format!(
            "batch {v} of query '{}' has not committed (its last committed batch is {last})",
            meta.name
        )));
    }
    let Some((batch, keys)) = sluice::read_aggregate_state(dir, v)? else {
        println!(
            "query '{}' keeps its first aggregate's state in partitions, none written yet",
            meta.name
        );
        return Ok(());
    };
    let rows = batch.num_rows() as u64;
    let values = if raw {
        Err("as asked with --raw".to_string())
    } else {
        final_values(dir, meta, batch.clone()).await
    };
    match values {
        Ok(values) => {
            println!(
                "query '{}', state as of batch {v}: {} (the query's columns, with the aggregates' values so far; --raw shows the stored partial states)",
                meta.name,
                count(rows, "key")
            );
            println!("{}", pretty_format_batches(&values)?);
        }
        Err(why) => {
            println!(
                "query '{}', state as of batch {v}: {} (the first {keys} columns are the key; the rest are partial aggregate states, {why})",
                meta.name,
                count(rows, "key")
            );
            println!("{}", pretty_format_batches(&[batch])?);
        }
    }
    Ok(())
}

/// The query's own columns with final values, from the SQL kept beside its
/// checkpoint by `sluice run`; or why they cannot be shown.
async fn final_values(
    dir: &Path,
    meta: &Metadata,
    stored: RecordBatch,
) -> std::result::Result<Vec<RecordBatch>, String> {
    let Ok(sql) = std::fs::read_to_string(dir.join(PIPELINE_SQL)) else {
        return Err(format!(
            "as the checkpoint holds no {PIPELINE_SQL} (`sluice run` writes it)"
        ));
    };
    let not_planned = |e: sluice::Error| format!("as its {PIPELINE_SQL} could not be planned: {e}");
    let ctx = StreamContext::new();
    let mut pending = None;
    for stmt in parse_script(&sql).map_err(not_planned)? {
        let define = match &stmt {
            Statement::InsertInto { target, .. } => ctx.has_sink(target),
            other => is_definition(other),
        };
        if !define {
            continue;
        }
        if let Outcome::Query(q) = ctx.execute(stmt).await.map_err(not_planned)?
            && q.name == meta.name
        {
            pending = Some(q);
        }
    }
    let Some(pending) = pending else {
        return Err(format!(
            "as its {PIPELINE_SQL} defines no query '{}'",
            meta.name
        ));
    };
    let planned = pending.plan_finalizer().await.map_err(not_planned)?;
    let (finalizer, fingerprint, renamed) =
        (planned.finalizer, planned.fingerprint, planned.renamed);
    if fingerprint != meta.plan_fingerprint {
        return Err(format!(
            "as the query in its {PIPELINE_SQL} is not the one that wrote this checkpoint"
        ));
    }
    let Some(finalizer) = finalizer else {
        return Err(format!(
            "as the query in its {PIPELINE_SQL} has no aggregate"
        ));
    };
    let plan = finalizer
        .plan(stored)
        .map_err(|e| format!("as they could not be finalized: {e}"))?;
    let values = collect(plan, ctx.session().task_ctx())
        .await
        .map_err(|e| format!("as they could not be finalized: {e}"))?;
    // Under the query's own names where its projection renames a column.
    values
        .into_iter()
        .map(|b| rename_columns(b, &renamed))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("as they could not be renamed: {e}"))
}

/// Whether `stmt` defines something that planning a query needs (a
/// source, a sink with its query, a setting, a table or a view) rather
/// than doing something again (a plain query, `COPY`, `EXPLAIN`). An
/// `INSERT INTO` is decided by its caller: into a sink it defines a
/// query, into a memory source it would add rows.
fn is_definition(stmt: &Statement) -> bool {
    use sluice::deps::datafusion::sql::parser::Statement as DFStatement;
    use sluice::deps::datafusion::sql::sqlparser::ast;
    match stmt {
        Statement::CreateSource(_) | Statement::CreateSink(_) | Statement::Set { .. } => true,
        Statement::InsertInto { .. } | Statement::Explain(_) => false,
        Statement::DataFusion(df) => match df.as_ref() {
            DFStatement::CreateExternalTable(_) => true,
            DFStatement::Statement(s) => matches!(
                s.as_ref(),
                ast::Statement::CreateView { .. } | ast::Statement::CreateTable(_)
            ),
            _ => false,
        },
    }
}

/// `batch` with each column named `from` in `renamed` named `to`.
fn rename_columns(
    batch: RecordBatch,
    renamed: &[(String, String)],
) -> std::result::Result<RecordBatch, sluice::deps::datafusion::arrow::error::ArrowError> {
    use sluice::deps::datafusion::arrow::datatypes::{Field, Schema};
    let fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(
            |f| match renamed.iter().find(|(from, _)| from == f.name()) {
                Some((_, to)) => f.as_ref().clone().with_name(to),
                None => f.as_ref().clone(),
            },
        )
        .collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), batch.columns().to_vec())
}

fn progress(dir: PathBuf, query: Option<String>, last: usize) -> sluice::Result<()> {
    use sluice::deps::datafusion::arrow::array::{
        ArrayRef, BooleanArray, Float64Array, TimestampMillisecondArray, UInt64Array,
    };
    use sluice::deps::sluice_state::checkpoint::read_progress;
    for (i, (dir, meta)) in query_dirs(&dir, query.as_deref())?.into_iter().enumerate() {
        if i > 0 {
            println!();
        }
        let all = read_progress(&dir)?;
        let shown = &all[all.len().saturating_sub(last)..];
        if shown.is_empty() {
            println!("query '{}': no batch has committed yet", meta.name);
            continue;
        }
        println!(
            "query '{}': the last {} of {} recorded",
            meta.name,
            count(shown.len() as u64, "batch"),
            all.len()
        );
        let u = |f: &dyn Fn(&Progress) -> u64| -> ArrayRef {
            Arc::new(UInt64Array::from_iter_values(shown.iter().map(f)))
        };
        let f = |f: &dyn Fn(&Progress) -> Option<f64>| -> ArrayRef {
            Arc::new(Float64Array::from_iter(
                shown
                    .iter()
                    .map(|p| f(p).map(|v| (v * 10.0).round() / 10.0)),
            ))
        };
        let ts = |f: &dyn Fn(&Progress) -> Option<i64>| -> ArrayRef {
            Arc::new(TimestampMillisecondArray::from_iter(shown.iter().map(f)))
        };
        let backlog: ArrayRef =
            Arc::new(UInt64Array::from_iter(shown.iter().map(|p| {
                p.sources.iter().map(|s| s.backlog).sum::<Option<u64>>()
            })));
        let behind: ArrayRef = Arc::new(BooleanArray::from_iter(
            shown.iter().map(|p| Some(p.falling_behind)),
        ));
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("batch", u(&|p| p.batch_id)),
            ("started", ts(&|p| Some(p.timestamp_ms))),
            ("rows in", u(&|p| p.input_rows)),
            ("rows out", u(&|p| p.output_rows)),
            ("rows/s", f(&|p| Some(p.processed_rows_per_second))),
            ("ms", f(&|p| p.durations_ms.get("total").copied())),
            ("latency ms", f(&|p| p.latency_ms)),
            ("backlog", backlog),
            ("watermark", ts(&|p| p.watermark_ms)),
            ("late", u(&|p| p.late_rows)),
            (
                "bad",
                u(&|p| {
                    p.sources
                        .iter()
                        .map(|s| s.dropped_rows + s.dead_letter_rows)
                        .sum()
                }),
            ),
            (
                "state rows",
                u(&|p| p.operators.iter().map(|o| o.rows).sum()),
            ),
            ("behind", behind),
        ];
        let table = RecordBatch::try_from_iter(columns)?;
        println!("{}", pretty_format_batches(&[table])?);
    }
    Ok(())
}

async fn explain(file: PathBuf) -> sluice::Result<()> {
    let sql = read_sql(&file)?;
    let ctx = StreamContext::new();
    let mut shown = 0;
    for stmt in parse_script(&sql)? {
        let (explain, define) = match stmt {
            Statement::CreateSink(cs) if cs.query.is_some() => {
                let mut bare = cs.clone();
                bare.query = None;
                (
                    Some(Statement::CreateSink(cs)),
                    Some(Statement::CreateSink(bare)),
                )
            }
            Statement::InsertInto { target, query } if ctx.has_sink(&target) => {
                (Some(Statement::InsertInto { target, query }), None)
            }
            other => (None, Some(other)),
        };
        if let Some(stmt) = define {
            match ctx.execute(stmt).await? {
                Outcome::Explain(text) => println!("{text}"),
                Outcome::Rows(rows) => print_rows(&rows)?,
                _ => {}
            }
        }
        if let Some(stmt) = explain
            && let Outcome::Explain(text) = ctx.execute(Statement::Explain(Box::new(stmt))).await?
        {
            println!("{text}");
            shown += 1;
        }
    }
    if shown == 0 {
        return Err(sluice::Error::plan(format!(
            "{} defines no streaming query",
            file.display()
        )));
    }
    Ok(())
}
