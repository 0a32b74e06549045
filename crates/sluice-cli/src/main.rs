//! The `sluice` command: runs and explains streaming SQL pipelines.
//!
//! ```text
//! sluice run pipeline.sql [--checkpoint DIR] [--trigger 5s|once|available-now] [--max-batches N]
//! sluice explain pipeline.sql
//! sluice state CHECKPOINT_DIR [--version N]
//! ```
//!
//! Errors are one line on standard error and a non-zero exit code.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice::deps::datafusion::arrow::util::pretty::pretty_format_batches;
use sluice::{Outcome, StreamContext, StreamingQuery, Trigger};

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
        /// again with the same DIR to resume. Default: a temporary directory.
        #[arg(long, value_name = "DIR")]
        checkpoint: Option<PathBuf>,
        /// When batches run: an interval such as 5s, `once`, or `available-now`.
        #[arg(long, value_name = "TRIGGER")]
        trigger: Option<String>,
        /// Stop each query after N batches.
        #[arg(long, value_name = "N")]
        max_batches: Option<u64>,
    },
    /// Show the incremental plan of every streaming query of a SQL file.
    Explain {
        /// The SQL file.
        file: PathBuf,
    },
    /// Print a query's state (group keys and aggregate states) from its
    /// checkpoint directory, as of the last committed batch or `--version`.
    State {
        /// The query's checkpoint directory (e.g. `ckpt/<sink name>`).
        dir: PathBuf,
        /// The batch id to read the state as of.
        #[arg(long, value_name = "N")]
        version: Option<u64>,
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
            } => run(file, checkpoint, trigger, max_batches).await,
            Command::Explain { file } => explain(file).await,
            Command::State { dir, version } => state(dir, version),
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
) -> sluice::Result<()> {
    let sql = read_sql(&file)?;
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
        queries.push(q.start().await?);
    }
    supervise(&queries, interrupt).await
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
/// first error.
async fn supervise(queries: &[StreamingQuery], mut interrupt: Interrupt) -> sluice::Result<()> {
    let live = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut warned = std::collections::BTreeSet::new();
    loop {
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
                for q in queries {
                    for w in q.recent_progress().into_iter().flat_map(|p| p.warnings) {
                        if warned.insert(w.clone()) {
                            if live {
                                eprintln!();
                            }
                            eprintln!("sluice: warning: query '{}': {w}", q.name());
                        }
                    }
                    if q.last_progress().is_some_and(|p| p.falling_behind) && warned.insert(q.name().to_string()) {
                        if live {
                            eprintln!();
                        }
                        eprintln!(
                            "sluice: warning: query '{}' takes longer per batch than its trigger interval; its backlog grows",
                            q.name()
                        );
                    }
                }
                if live {
                    let line: Vec<String> = queries.iter().map(status).collect();
                    eprint!("\r\x1b[2K{}", line.join(" | "));
                    let _ = std::io::stderr().flush();
                }
                // A query that failed stops the run: its error is the
                // run's, and the others stop after their current batch.
                for q in queries.iter().filter(|q| !q.is_active()) {
                    if let Err(e) = q.await_termination().await {
                        if live {
                            eprintln!();
                        }
                        for other in queries {
                            let _ = other.stop().await;
                        }
                        return Err(e);
                    }
                }
                if queries.iter().all(|q| !q.is_active()) {
                    break;
                }
            }
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
                "sluice: query '{}' stopped after batch {} ({} rows in, {} rows out in the last batch)",
                q.name(),
                p.batch_id,
                p.input_rows,
                p.output_rows
            );
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
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
                " | FALLING BEHIND the trigger"
            } else {
                ""
            }
        ),
    }
}

fn state(dir: PathBuf, version: Option<u64>) -> sluice::Result<()> {
    use sluice::deps::sluice_common::durable::read_json;
    use sluice::deps::sluice_state::checkpoint::{Metadata, last_committed};
    use sluice::deps::sluice_state::store::read_state;
    let meta: Metadata = read_json(&dir.join("metadata"))?;
    let state_dir = dir.join("state").join("aggregate");
    if !state_dir.join("meta").exists() {
        let others = sluice::other_operators(&dir);
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
    let last = last_committed(&dir)?.ok_or_else(|| {
        sluice::Error::plan(format!(
            "query '{}' has not committed a batch yet",
            meta.name
        ))
    })?;
    let v = version.unwrap_or(last);
    if v > last {
        return Err(sluice::Error::plan(format!(
            "batch {v} has not committed (the last committed batch of '{}' is {last})",
            meta.name
        )));
    }
    let (batch, keys) = read_state(&state_dir, v)?;
    println!(
        "query '{}', state as of batch {v}: {} keys (the first {keys} columns are the key; the rest are aggregate states)",
        meta.name,
        batch.num_rows()
    );
    println!("{}", pretty_format_batches(&[batch])?);
    Ok(())
}

async fn explain(file: PathBuf) -> sluice::Result<()> {
    use sluice::deps::sluice_planner::{Statement, parse_script};
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
