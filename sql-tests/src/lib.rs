//! The streaming `.slt` runner of Sluice.
//!
//! The entry point of this crate is [`SluiceDb`], a `sqllogictest` database
//! whose statements are Sluice SQL plus directives that drive a streaming
//! test step by step, in the spirit of Spark's `StreamTest`:
//!
//! | directive | what it does |
//! |---|---|
//! | `INSERT INTO <memory source> VALUES ...` | adds rows to a source (plain SQL) |
//! | `WRITE FILE '<path>'` + lines | writes a file (the lines after the first) |
//! | `RUN ALL` | every query runs batches until no source has new data |
//! | `RUN BATCH` | every query runs one batch |
//! | `ADVANCE CLOCK <duration>` | moves the manual trigger clock |
//! | `RESTART` | drops every query and the context, as a crash would, and starts them again from their checkpoints in a fresh context |
//! | `INJECT FAULT <after-offsets\|after-state\|after-sink\|after-commit> AT BATCH <n>` | the next run of batch n fails at that step |
//! | `SHOW PROGRESS <query>` | per committed batch: id, input rows, output rows, dropped, dead-lettered, re-run? |
//! | `CHECK <sink> AGAINST BATCH` [+ lines of SQL] | the sink's final result equals its query (or the SQL given, for what plain SQL says differently, such as session windows) run by DataFusion as one batch query over all on-time input |
//! | `CHECK ALL AGAINST BATCH [EXCEPT s ...]` | drains every query, then checks every sink but those named |
//! | `SHOW STATE PROGRESS <query>` | per committed batch: id, input rows, late rows, state keys, keys updated, keys removed |
//! | `KAFKA TOPIC <name> [PARTITIONS <n>]` | makes a topic on the file's Kafka broker |
//! | `KAFKA PRODUCE <topic> [PARTITION <p>] [KEYED]` + lines | produces one record per line (line *i* to partition *i* mod the partition count unless one is given; `KEYED`: `key\|value` lines) |
//! | `KAFKA CONSUME <topic>` | every record's value, by partition then offset: what a consumer reading the topic from the start sees |
//!
//! A file that uses `$KAFKA` or a `KAFKA` directive gets a Kafka-protocol
//! broker of its own (tansu on 127.0.0.1, see
//! `sluice_connectors::kafka::LocalBroker`), started on first use and kept
//! across `RESTART`s, as the outside world is; `$KAFKA` is its
//! `bootstrap.servers`. Kafka sources are read whole for the batch check, and
//! a JSON Kafka sink's records (those with its sink id) are decoded back to
//! rows for it.
//!
//! Every file runs as written, as a *restart variant* ([`Variant::Restarts`])
//! and with random micro-batch splits ([`Variant::Splits`]); each run ends
//! with `CHECK ALL AGAINST BATCH`, the differential check of
//! [`batch_check`]: append sinks must hold exactly the
//! batch rows of the windows the final watermark closed, update sinks the
//! last row per group key, complete sinks the last result, changelog sinks
//! the changes applied; rows the stream counted late (read back from the
//! source's `late_rows` table) are taken out of the batch query's aggregate
//! input. A file opts out per sink with `# no-batch-check <sink>: <reason>`
//! (the reason is required), out of variants with `# variant: no-restarts`
//! or `# variant: no-random-splits`. In the split variant only the file's
//! statements run, unless it says `# variant: random-splits`: then its query
//! results must hold under any split too. A few files say
//! `# variant: cluster`: they also run as written with each batch's plan on
//! a Ballista cluster ([`Variant::Cluster`]: a scheduler and two executors
//! the runner starts in its process on 127.0.0.1, and a
//! `sluice_cluster::ClusterRunner`), and their results and final check must
//! hold there too.
//!
//! `$TMP` in any statement is replaced by the test file's own temporary
//! directory; queries checkpoint to `$TMP/checkpoints/<query>`. Every
//! streaming query is started with a manual trigger: batches run only when a
//! directive says so, and the clock moves only by `ADVANCE CLOCK`, so every
//! test is deterministic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod batch_check;

use async_trait::async_trait;
use sluice::deps::datafusion::arrow::record_batch::RecordBatch;
use sluice::deps::datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use sluice::deps::datafusion::sql::parser::Statement as DFStatement;
use sluice::deps::datafusion::sql::sqlparser::ast;
use sluice::deps::sluice_common::options::parse_duration;
use sluice::deps::sluice_connectors::kafka::{self, LocalBroker};
use sluice::deps::sluice_planner::{Statement, parse_script};
use sluice::deps::sluice_state::checkpoint::read_progress;
use sluice::{
    Error, Fault, ManualClock, Outcome, PlanRunner, StreamContext, StreamingQuery, Trigger,
};
use sqllogictest::{DBOutput, DefaultColumnType};

/// The error a test statement reports (its one-line message).
#[derive(Debug)]
pub struct TestError(pub String);

impl std::fmt::Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TestError {}

impl From<Error> for TestError {
    fn from(e: Error) -> Self {
        TestError(e.to_string())
    }
}

/// The manual clock's start: 2026-01-01T00:00:00Z.
pub const CLOCK_START_MS: i64 = 1_767_225_600_000;

/// A streaming test database: one per `.slt` file.
pub struct SluiceDb {
    dir: PathBuf,
    clock: ManualClock,
    ctx: StreamContext,
    queries: Vec<StreamingQuery>,
    definitions: Vec<Statement>,
    kafka: Option<LocalBroker>,
    runner: Option<Arc<dyn PlanRunner>>,
}

impl SluiceDb {
    /// A fresh database working in `dir`.
    pub fn new(dir: &Path) -> Self {
        let clock = ManualClock::new(CLOCK_START_MS);
        let ctx = Self::context(dir, &clock);
        SluiceDb {
            dir: dir.to_path_buf(),
            clock,
            ctx,
            queries: Vec::new(),
            definitions: Vec::new(),
            kafka: None,
            runner: None,
        }
    }

    /// A fresh database whose queries run each batch's plan with `runner`
    /// (the cluster variant's `ClusterRunner`).
    pub fn with_runner(dir: &Path, runner: Arc<dyn PlanRunner>) -> Self {
        SluiceDb {
            runner: Some(runner),
            ..Self::new(dir)
        }
    }

    fn context(dir: &Path, clock: &ManualClock) -> StreamContext {
        let ctx = StreamContext::with_clock(Arc::new(clock.clone()));
        ctx.update_settings(|s| {
            s.checkpoint_root = Some(dir.join("checkpoints"));
            s.trigger = Trigger::Manual;
            s.durability = sluice::Durability::NoSync;
            // Retries wait on the trigger clock, which only ADVANCE CLOCK moves.
            s.retry_backoff = std::time::Duration::ZERO;
        });
        ctx
    }

    async fn start(&mut self, outcome: Outcome) -> Result<Option<Vec<RecordBatch>>, TestError> {
        match outcome {
            Outcome::Query(q) => {
                let q = match &self.runner {
                    Some(r) => Box::new(q.map_writer(|w| w.runner(Arc::clone(r)))),
                    None => q,
                };
                let q = q.with_trigger(Trigger::Manual).start().await?;
                self.queries.push(q);
                Ok(None)
            }
            Outcome::Rows(r) => Ok(Some(r)),
            Outcome::Explain(text) => Ok(Some(vec![text_batch(&text)?])),
            Outcome::Done => Ok(None),
        }
    }

    /// Whether `stmt` defines something a restarted context needs again.
    fn is_definition(&self, stmt: &Statement) -> bool {
        match stmt {
            Statement::CreateSource(_) | Statement::CreateSink(_) | Statement::Set { .. } => true,
            Statement::InsertInto { target, .. } => self.ctx.has_sink(target),
            Statement::DataFusion(s) => {
                matches!(s.as_ref(), DFStatement::CreateExternalTable(_))
                    || matches!(s.as_ref(), DFStatement::Statement(st) if matches!(st.as_ref(), ast::Statement::CreateView { .. }))
            }
            Statement::Explain(_) => false,
        }
    }

    async fn run_sql(&mut self, sql: &str) -> Result<Option<Vec<RecordBatch>>, TestError> {
        let mut last = None;
        for stmt in parse_script(sql)? {
            let define = self.is_definition(&stmt);
            let outcome = self.ctx.execute(stmt.clone()).await?;
            last = self.start(outcome).await?;
            // Only what took effect is replayed by RESTART.
            if define {
                self.definitions.push(stmt);
            }
        }
        Ok(last)
    }

    async fn restart(&mut self) -> Result<(), TestError> {
        // Dropping the queries releases their checkpoints, as a dead process would.
        self.queries.clear();
        let old = std::mem::replace(&mut self.ctx, Self::context(&self.dir, &self.clock));
        // Sources and memory tables stand for the outside world (a directory,
        // a broker, a table another system reads), which outlives the engine.
        for (name, table) in old.memory_tables() {
            self.ctx.adopt_memory_table(&name, table)?;
        }
        for stmt in self.definitions.clone() {
            match &stmt {
                Statement::CreateSource(cs) => {
                    let src = old
                        .source(&cs.name)
                        .ok_or_else(|| TestError(format!("source {} vanished", cs.name)))?;
                    let table = self.ctx.register_source(src)?;
                    self.ctx.apply_source_clauses(&table, cs)?;
                }
                _ => {
                    let outcome = self.ctx.execute(stmt).await?;
                    self.start(outcome).await?;
                }
            }
        }
        Ok(())
    }

    /// The file's broker's `bootstrap.servers`, starting it on first use.
    pub(crate) fn kafka(&mut self) -> Result<String, TestError> {
        if self.kafka.is_none() {
            self.kafka = Some(LocalBroker::start()?);
        }
        Ok(self
            .kafka
            .as_ref()
            .map(LocalBroker::bootstrap)
            .unwrap_or_default())
    }

    async fn kafka_directive(
        &mut self,
        sql: &str,
        words: &[&str],
        upper: &[&str],
    ) -> Result<Option<Vec<RecordBatch>>, TestError> {
        let servers = self.kafka()?;
        let bad = || TestError(format!("bad KAFKA directive: {}", words.join(" ")));
        let timeout = std::time::Duration::from_secs(20);
        match upper {
            ["KAFKA", "TOPIC", _, rest @ ..] => {
                let partitions = match rest {
                    [] => 1,
                    ["PARTITIONS", _] => words[4].parse().map_err(|_| bad())?,
                    _ => return Err(bad()),
                };
                kafka::create_topic(&servers, words[2], partitions).await?;
                Ok(None)
            }
            ["KAFKA", "PRODUCE", _, rest @ ..] => {
                let topic = words[2];
                let mut partition = None;
                let mut keyed = false;
                let mut i = 0;
                while i < rest.len() {
                    match rest[i] {
                        "PARTITION" => {
                            partition = Some(
                                words
                                    .get(4 + i)
                                    .and_then(|w| w.parse::<i32>().ok())
                                    .ok_or_else(bad)?,
                            );
                            i += 2;
                        }
                        "KEYED" => {
                            keyed = true;
                            i += 1;
                        }
                        _ => return Err(bad()),
                    }
                }
                let count = if partition.is_none() {
                    kafka::partition_count(&servers, topic, timeout)?
                } else {
                    1
                };
                let lines: Vec<&str> = sql.lines().skip(1).collect();
                let records: Vec<kafka::ProduceRecord<'_>> = lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let (key, value) = match (keyed, l.split_once('|')) {
                            (true, Some((k, v))) => (Some(k.as_bytes()), v.as_bytes()),
                            _ => (None, l.as_bytes()),
                        };
                        (Some(partition.unwrap_or((i as i32) % count)), key, value)
                    })
                    .collect();
                kafka::produce(&servers, topic, &records).await?;
                Ok(None)
            }
            ["KAFKA", "CONSUME", _] => {
                let records = kafka::consume_all(&servers, words[2], timeout)?;
                let text: String = records
                    .iter()
                    .map(|r| {
                        let v = r
                            .value
                            .as_deref()
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_else(|| "NULL".into());
                        format!("{v}\n")
                    })
                    .collect();
                Ok(Some(vec![text_batch(&text)?]))
            }
            _ => Err(bad()),
        }
    }

    async fn directive(
        &mut self,
        sql: &str,
    ) -> Result<Option<Option<Vec<RecordBatch>>>, TestError> {
        let first_line = sql
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .trim_end_matches(';');
        let words: Vec<&str> = first_line.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let u: Vec<&str> = upper.iter().map(String::as_str).collect();
        match u.as_slice() {
            // Queries are independent: each runs even if another failed,
            // and the first error is reported.
            ["RUN", mode @ ("ALL" | "BATCH")] => {
                let mut first = None;
                for q in &self.queries {
                    let ran = if *mode == "ALL" {
                        q.process_all_available().await
                    } else {
                        q.run_batch().await.map(drop)
                    };
                    if let Err(e) = ran {
                        first.get_or_insert(e);
                    }
                }
                if let Some(e) = first {
                    return Err(e.into());
                }
            }
            ["ADVANCE", "CLOCK", ..] => {
                let d = parse_duration(&words[2..].join(" "))?;
                self.clock.advance(d);
            }
            ["RESTART"] => self.restart().await?,
            ["KAFKA", ..] => return Ok(Some(self.kafka_directive(sql, &words, &u).await?)),
            ["INJECT", "FAULT", _, "AT", "BATCH", _] => {
                let (point, n) = (words[2], words[5]);
                let fault = Fault::error_at(
                    point.parse()?,
                    n.parse()
                        .map_err(|_| TestError(format!("bad batch id {n}")))?,
                );
                for q in &self.queries {
                    q.inject_fault(Some(fault)).await;
                }
            }
            ["WRITE", "FILE", ..] => {
                let rel = words[2..].join(" ");
                let rel = rel.trim_matches('\'');
                let path = self.dir.join(rel);
                let body: String = sql.lines().skip(1).map(|l| format!("{l}\n")).collect();
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| TestError(e.to_string()))?;
                }
                // Write then rename, as a well-behaved producer would, so a
                // listing never sees half a file.
                let tmp = path.with_file_name(format!(
                    ".{}.tmp",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ));
                std::fs::write(&tmp, body)
                    .and_then(|_| std::fs::rename(&tmp, &path))
                    .map_err(|e| TestError(e.to_string()))?;
            }
            ["CHECK", "ALL", "AGAINST", "BATCH", rest @ ..] => {
                let except: Vec<&str> = match rest {
                    [] => vec![],
                    ["EXCEPT", ..] => words[5..].to_vec(),
                    _ => return Err(TestError(format!("bad CHECK ALL: {first_line}"))),
                };
                self.check_all(&except).await?
            }
            ["CHECK", _, "AGAINST", "BATCH"] => {
                // Lines after the first, if any, are a hand-written batch query.
                let reference: String = sql.lines().skip(1).map(|l| format!("{l}\n")).collect();
                let reference = Some(reference.as_str()).filter(|r| !r.trim().is_empty());
                self.check_against_batch(words[1], reference).await?
            }
            ["SHOW", "STATE", "PROGRESS", _] => {
                let records = read_progress(&self.dir.join("checkpoints").join(words[3]))?;
                let text: String = records
                    .iter()
                    .map(|p| {
                        let s = p.operators.first().cloned().unwrap_or_default();
                        format!(
                            "{} {} {} {} {} {}\n",
                            p.batch_id, p.input_rows, p.late_rows, s.rows, s.updated, s.removed
                        )
                    })
                    .collect();
                return Ok(Some(Some(vec![text_batch(&text)?])));
            }
            ["SHOW", "PROGRESS", _] => {
                let records = read_progress(&self.dir.join("checkpoints").join(words[2]))?;
                let text: String = records
                    .iter()
                    .map(|p| {
                        let dropped: u64 = p.sources.iter().map(|s| s.dropped_rows).sum();
                        let dead: u64 = p.sources.iter().map(|s| s.dead_letter_rows).sum();
                        format!(
                            "{} {} {} {} {} {}\n",
                            p.batch_id, p.input_rows, p.output_rows, dropped, dead, p.recovered
                        )
                    })
                    .collect();
                return Ok(Some(Some(vec![text_batch(&text)?])));
            }
            _ => return Ok(None),
        }
        Ok(Some(None))
    }
}

/// Plans and runs one statement in a plain DataFusion context.
pub(crate) async fn run_batch(
    ctx: &sluice::deps::datafusion::prelude::SessionContext,
    stmt: DFStatement,
) -> Result<Vec<RecordBatch>, String> {
    let plan = ctx
        .state()
        .statement_to_plan(stmt)
        .await
        .map_err(|e| e.to_string())?;
    let df = ctx
        .execute_logical_plan(plan)
        .await
        .map_err(|e| e.to_string())?;
    df.collect().await.map_err(|e| e.to_string())
}

/// Rows as formatted strings, for comparison.
pub(crate) fn rows_of(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>, TestError> {
    match to_output(batches.to_vec())? {
        DBOutput::Rows { rows, .. } => Ok(rows),
        _ => Ok(vec![]),
    }
}

/// One Utf8 column, one row per line of `text`.
fn text_batch(text: &str) -> Result<RecordBatch, TestError> {
    use sluice::deps::datafusion::arrow::array::StringArray;
    let lines: Vec<&str> = text.lines().collect();
    RecordBatch::try_from_iter([("line", Arc::new(StringArray::from(lines)) as _)])
        .map_err(|e| TestError(e.to_string()))
}

fn to_output(batches: Vec<RecordBatch>) -> Result<DBOutput<DefaultColumnType>, TestError> {
    let Some(first) = batches.first() else {
        return Ok(DBOutput::Rows {
            types: vec![],
            rows: vec![],
        });
    };
    let types = vec![DefaultColumnType::Any; first.num_columns()];
    let opts = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for b in &batches {
        let fmts: Vec<ArrayFormatter<'_>> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<_, _>>()
            .map_err(|e| TestError(e.to_string()))?;
        for r in 0..b.num_rows() {
            rows.push(
                fmts.iter()
                    .map(|f| {
                        let s = f.value(r).to_string();
                        if s.is_empty() {
                            "(empty)".to_string()
                        } else {
                            s
                        }
                    })
                    .collect(),
            );
        }
    }
    Ok(DBOutput::Rows { types, rows })
}

#[async_trait]
impl sqllogictest::AsyncDB for SluiceDb {
    type Error = TestError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, TestError> {
        let mut sql = sql.replace("$TMP", &self.dir.display().to_string());
        if sql.contains("$KAFKA") {
            sql = sql.replace("$KAFKA", &self.kafka()?);
        }
        let result = match self.directive(&sql).await? {
            Some(r) => r,
            None => self.run_sql(&sql).await?,
        };
        match result {
            Some(rows) => to_output(rows),
            None => Ok(DBOutput::StatementComplete(0)),
        }
    }

    async fn shutdown(&mut self) {
        self.queries.clear();
    }

    fn engine_name(&self) -> &str {
        "sluice"
    }
}

/// How a test file is run.
#[derive(Debug, Clone, Copy)]
pub enum Variant {
    /// The file as written.
    Plain,
    /// A `RESTART` after every successful `RUN ALL` / `RUN BATCH`.
    Restarts,
    /// Input split into random smaller batches with this seed. With
    /// `strict`, every assertion of the file must hold; otherwise only its
    /// statements run and the final batch check decides.
    Splits {
        /// The seed of the split sizes (`SLT_SEED` replays one).
        seed: u64,
        /// Whether the file's own query results must hold too.
        strict: bool,
    },
    /// The file as written, each batch's plan run on a Ballista cluster
    /// (a scheduler and two executors on 127.0.0.1): for files marked
    /// `# variant: cluster`, a few, to keep the suite's time.
    Cluster,
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Plain => Ok(()),
            Variant::Restarts => f.write_str(" [restart after every batch]"),
            Variant::Cluster => f.write_str(" [on a Ballista cluster]"),
            Variant::Splits { seed, strict: true } => {
                write!(f, " [random splits, SLT_SEED={seed}]")
            }
            Variant::Splits {
                seed,
                strict: false,
            } => {
                write!(f, " [random splits, final check only, SLT_SEED={seed}]")
            }
        }
    }
}

/// A `# <marker>: <reason>` line's reason, if the file has the marker.
fn marked<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .find_map(|l| l.trim().strip_prefix(marker))
        .map(|rest| rest.trim_start_matches(':').trim())
}

/// The variants a file runs as (see the crate docs).
pub fn variants(name: &str, text: &str) -> Vec<Variant> {
    let mut v = vec![Variant::Plain];
    if marked(text, "variant: no-restarts").is_none() {
        v.push(Variant::Restarts);
    }
    if marked(text, "variant: no-random-splits").is_none() {
        let seed = std::env::var("SLT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
                })
            });
        let strict = marked(text, "variant: random-splits").is_some();
        v.push(Variant::Splits { seed, strict });
    }
    if marked(text, "variant: cluster").is_some() {
        v.push(Variant::Cluster);
    }
    v
}

/// The sinks a file exempts from the final batch check, each with
/// `# no-batch-check <sink>: <reason>`; a missing reason is an error.
pub fn batch_check_exemptions(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for l in text.lines() {
        let Some(rest) = l.trim().strip_prefix("# no-batch-check ") else {
            continue;
        };
        match rest.split_once(':') {
            Some((sink, reason)) if !reason.trim().is_empty() && !sink.trim().is_empty() => {
                out.push(sink.trim().to_string())
            }
            _ => {
                return Err(format!(
                    "`{l}` needs a sink and a reason: `# no-batch-check <sink>: <why>`"
                ));
            }
        }
    }
    Ok(out)
}

/// The file's text as the variant runs it: the variant's changes, then a
/// final `CHECK ALL AGAINST BATCH` of every sink not exempted.
pub fn transform(text: &str, variant: Variant) -> Result<String, String> {
    let body = match variant {
        Variant::Plain | Variant::Cluster => text.to_string(),
        Variant::Splits { seed, strict } => {
            let body = if strict {
                text.to_string()
            } else {
                // Results of single steps, expected errors and the faults
                // they expect depend on where batches end; what is left to
                // hold is the final result.
                let mut kept = Vec::new();
                let mut skipping = false;
                for l in text.lines() {
                    let t = l.trim();
                    if t.is_empty() {
                        skipping = false;
                    } else if t.starts_with("query ")
                        || t.starts_with("statement error")
                        || t.to_ascii_uppercase().starts_with("INJECT FAULT")
                    {
                        skipping = true;
                        // The directive's `statement ok` header goes too.
                        if t.starts_with("INJECT") && kept.last() == Some(&"statement ok") {
                            kept.pop();
                        }
                    }
                    if !skipping {
                        kept.push(l);
                    }
                }
                kept.join("\n")
            };
            format!("statement ok\nSET split_seed = {seed}\n\n{body}")
        }
        Variant::Restarts => {
            let lines: Vec<&str> = text.lines().collect();
            let mut out = String::new();
            let mut i = 0;
            while i < lines.len() {
                out.push_str(lines[i]);
                out.push('\n');
                let runs = lines[i].trim() == "statement ok"
                    && lines.get(i + 1).is_some_and(|l| {
                        let u = l.trim().to_ascii_uppercase();
                        u == "RUN ALL" || u == "RUN BATCH"
                    })
                    && lines.get(i + 2).is_none_or(|l| l.trim().is_empty());
                if runs {
                    out.push_str(lines[i + 1]);
                    out.push_str("\n\nstatement ok\nRESTART\n");
                    i += 2;
                    continue;
                }
                i += 1;
            }
            out
        }
    };
    let except = batch_check_exemptions(text)?;
    let except = if except.is_empty() {
        String::new()
    } else {
        format!(" EXCEPT {}", except.join(" "))
    };
    Ok(format!(
        "{}\n\nstatement ok\nCHECK ALL AGAINST BATCH{except}\n",
        body.trim_end()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restart_variant_restarts_after_each_successful_run_only() {
        let text =
            "statement ok\nRUN ALL\n\nstatement error boom\nRUN ALL\n\nstatement ok\nRUN BATCH";
        let t = transform(text, Variant::Restarts).unwrap();
        assert_eq!(t.matches("RESTART").count(), 2, "{t}");
        assert!(
            t.contains(
                "statement error boom\nRUN ALL\n\nstatement ok\nRUN BATCH\n\nstatement ok\nRESTART"
            ),
            "{t}"
        );
    }
}
