//! [`StreamContext`]: sources, sinks, settings and streaming SQL on top of a
//! DataFusion `SessionContext`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::dataframe::DataFrame;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{self, Query};
use sluice_common::connector::{Sink, Source};
use sluice_common::durable::Durability;
use sluice_common::{Clock, Error, Options, Result, SystemClock};
use sluice_connectors::{MemorySource, MemoryTable, sink_from_options, source_from_options};
use sluice_exec::{StreamingQuery, Trigger, dead_letter_schema};
use sluice_planner::{
    CreateSource, OutputMode, Statement, StreamTable, check_streaming_plan, explain_streaming,
    fork_streams, parse_script, stream_tables,
};

use crate::dataframe::{DataStreamWriter, PlannedState, StreamingDataFrame};
use crate::memory_table::MemorySinkTable;
use crate::state_table::{QueryState, StateFunction};

/// Settings that `SET` changes and that queries started afterwards use.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Each query checkpoints to `<checkpoint_root>/<query name>` (unless its
    /// sink sets `checkpoint`). Without a root, queries use temporary
    /// directories and cannot be resumed.
    pub checkpoint_root: Option<PathBuf>,
    /// The default trigger.
    pub trigger: Trigger,
    /// Whether checkpoint writes are fsynced.
    pub durability: Durability,
    /// Retries of a batch failing on a transient error.
    pub max_batch_retries: u32,
    /// The delay before the first retry (doubling after), on the trigger clock.
    pub retry_backoff: std::time::Duration,
    /// Tests: split the available input into random smaller batches with
    /// this seed (`SET split_seed = n`).
    pub split_seed: Option<u64>,
    /// Rebuild state past an unreadable snapshot from an older snapshot and
    /// the deltas after it (`SET state_snapshot_fallback = true`).
    pub state_snapshot_fallback: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            checkpoint_root: None,
            trigger: Trigger::default(),
            durability: Durability::Fsync,
            max_batch_retries: 3,
            retry_backoff: std::time::Duration::from_millis(100),
            split_seed: None,
            state_snapshot_fallback: false,
        }
    }
}

/// The settings `SET` knows besides `datafusion.*`.
pub const SETTINGS: &[&str] = &[
    "checkpoint_root",
    "trigger",
    "checkpoint_sync",
    "max_batch_retries",
    "split_seed",
    "state_snapshot_fallback",
];

/// What executing one statement produced.
#[derive(Debug)]
pub enum Outcome {
    /// A definition or setting took effect.
    Done,
    /// A batch query's rows.
    Rows(Vec<RecordBatch>),
    /// The text of `EXPLAIN`.
    Explain(String),
    /// A streaming query, planned and ready to start.
    Query(Box<PendingQuery>),
}

/// A streaming query defined by `CREATE SINK ... AS` or `INSERT INTO sink`.
#[derive(Debug)]
pub struct PendingQuery {
    /// The query's name.
    pub name: String,
    writer: DataStreamWriter,
    sink: Arc<dyn Sink>,
    started: Arc<Mutex<BTreeMap<String, QueryState>>>,
    registry: Arc<Mutex<Registry>>,
}

impl PendingQuery {
    /// Changes the trigger (e.g. from the command line).
    pub fn with_trigger(mut self, trigger: Trigger) -> Self {
        self.writer = self.writer.trigger(trigger);
        self
    }

    /// Stops after `n` batches.
    pub fn with_max_batches(mut self, n: u64) -> Self {
        self.writer = self.writer.max_batches(n);
        self
    }

    /// Applies any other writer option.
    pub fn map_writer(mut self, f: impl FnOnce(DataStreamWriter) -> DataStreamWriter) -> Self {
        self.writer = f(self.writer);
        self
    }

    /// Plans the query without starting it (see
    /// [`DataStreamWriter::plan_finalizer`]).
    pub async fn plan_finalizer(self) -> Result<PlannedState> {
        let name = self.name.clone();
        self.writer.plan_finalizer(&name).await
    }

    /// Starts the query.
    pub async fn start(self) -> Result<StreamingQuery> {
        let q = match self.writer.start_with(self.sink).await {
            Ok(q) => q,
            Err(e) => {
                // A query that did not start leaves its sink free for another.
                self.registry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .query_names
                    .remove(&self.name);
                return Err(e.context(format!("starting query '{}'", self.name)));
            }
        };
        // `state('<name>')` reads this query's state from now on.
        self.started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                self.name,
                QueryState {
                    checkpoint: q.checkpoint_dir().to_path_buf(),
                    finalizer: q.state_finalizer().cloned(),
                },
            );
        Ok(q)
    }
}

#[derive(Debug, Default)]
struct Registry {
    sources: BTreeMap<String, Arc<dyn Source>>,
    sinks: BTreeMap<String, (Options, Arc<dyn Sink>)>,
    memory_tables: BTreeMap<String, Arc<MemoryTable>>,
    query_names: BTreeMap<String, usize>,
    settings: Settings,
}

/// The entry point of Sluice: streams, sinks and streaming SQL over a
/// DataFusion [`SessionContext`].
#[derive(Clone)]
pub struct StreamContext {
    session: SessionContext,
    /// The queries started from this context, for the HTTP endpoint.
    watched: Arc<crate::http::Watched>,
    clock: Arc<dyn Clock>,
    registry: Arc<Mutex<Registry>>,
    /// Queries started from this context, for `state('<name>')`.
    started: Arc<Mutex<BTreeMap<String, QueryState>>>,
    /// The checkpoint root as `state()` sees it.
    checkpoint_root: Arc<Mutex<Option<PathBuf>>>,
}

impl std::fmt::Debug for StreamContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamContext")
            .field("session_id", &self.session.session_id())
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Default for StreamContext {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamContext {
    /// A context on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// A context whose triggers and processing time follow `clock` (a
    /// [`ManualClock`](sluice_common::ManualClock) in tests).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        // Static tables and sink directories change while queries run: a
        // listing must see new files, so DataFusion's file-list cache (which
        // by default never expires) is off.
        let runtime = RuntimeEnvBuilder::new()
            .with_object_list_cache_limit(0)
            .build_arc()
            .unwrap_or_default();
        // The physical plan is re-executed every batch; a filter derived at
        // run time from one batch's rows (DataFusion's dynamic filters) must
        // never prune the next batch, so they are off.
        let watched = Arc::new(crate::http::Watched::default());
        let config = SessionConfig::new()
            .set_bool("datafusion.optimizer.enable_dynamic_filter_pushdown", false)
            .with_extension(Arc::clone(&watched));
        let session = SessionContext::new_with_config_rt(config, runtime);
        for udf in sluice_planner::window_udfs() {
            session.register_udf(udf);
        }
        let started: Arc<Mutex<BTreeMap<String, QueryState>>> = Arc::default();
        let checkpoint_root: Arc<Mutex<Option<PathBuf>>> = Arc::default();
        session.register_udtf(
            "state",
            Arc::new(StateFunction {
                queries: Arc::clone(&started),
                checkpoint_root: Arc::clone(&checkpoint_root),
            }),
        );
        StreamContext {
            session,
            watched,
            clock,
            registry: Arc::default(),
            started,
            checkpoint_root,
        }
    }

    /// Serves this context's queries over HTTP on `addr` (e.g.
    /// `127.0.0.1:8080`; port 0 picks a free one): the JSON API, Prometheus
    /// metrics and the live page (see [`crate::http`]). Every query started
    /// from this context, before or after, is served. The server stops when
    /// the returned handle is dropped.
    pub async fn serve_http(&self, addr: &str) -> Result<crate::http::HttpServer> {
        crate::http::HttpServer::start(addr, Arc::clone(&self.watched)).await
    }

    /// The DataFusion session: register static tables and functions here.
    pub fn session(&self) -> &SessionContext {
        &self.session
    }

    /// The trigger clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The current settings.
    pub fn settings(&self) -> Settings {
        self.reg().settings.clone()
    }

    /// Changes the settings.
    pub fn update_settings(&self, f: impl FnOnce(&mut Settings)) {
        let root = {
            let mut reg = self.reg();
            f(&mut reg.settings);
            reg.settings.checkpoint_root.clone()
        };
        *self
            .checkpoint_root
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = root;
    }

    fn reg(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a stream under its name.
    pub fn register_source(&self, source: Arc<dyn Source>) -> Result<StreamTable> {
        let name = source.name().to_string();
        if self
            .session
            .table_exist(name.as_str())
            .map_err(Error::from)?
        {
            return Err(Error::plan(format!(
                "a table or source named '{name}' already exists"
            )));
        }
        let mut table = StreamTable::new(Arc::clone(&source), Arc::clone(&self.clock));
        if let Some(target) = source.dead_letter_target() {
            table = table.with_dead_letter(self.dead_letter_sink(target)?);
        }
        self.session
            .register_table(name.as_str(), Arc::new(table.clone()))
            .map_err(Error::from)?;
        self.reg().sources.insert(name, source);
        Ok(table)
    }

    /// A stream as a DataFusion `DataFrame` whose scan yields the current
    /// micro-batch.
    pub async fn read_stream(&self, source: impl Source + 'static) -> Result<DataFrame> {
        let name = source.name().to_string();
        self.register_source(Arc::new(source))?;
        self.session.table(name.as_str()).await.map_err(Error::from)
    }

    /// Whether a sink named `name` was declared.
    pub fn has_sink(&self, name: &str) -> bool {
        self.reg().sinks.contains_key(name)
    }

    /// A registered source by name.
    pub fn source(&self, name: &str) -> Option<Arc<dyn Source>> {
        self.reg().sources.get(name).cloned()
    }

    /// The memory table named `name`, created (and registered as a table)
    /// on first use.
    pub fn memory_table(&self, name: &str) -> Result<Arc<MemoryTable>> {
        if let Some(t) = self.reg().memory_tables.get(name) {
            return Ok(Arc::clone(t));
        }
        if self.session.table_exist(name).map_err(Error::from)? {
            return Err(Error::plan(format!(
                "a table or source named '{name}' already exists"
            )));
        }
        let t = MemoryTable::new();
        self.session
            .register_table(name, Arc::new(MemorySinkTable::new(Arc::clone(&t))))
            .map_err(Error::from)?;
        self.reg()
            .memory_tables
            .insert(name.to_string(), Arc::clone(&t));
        Ok(t)
    }

    /// Every memory table (memory sinks and dead-letter tables) by name.
    pub fn memory_tables(&self) -> Vec<(String, Arc<MemoryTable>)> {
        self.reg()
            .memory_tables
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }

    /// Registers an existing memory table under `name`, e.g. to keep a memory
    /// sink's rows across a restart of its query in a new context.
    pub fn adopt_memory_table(&self, name: &str, table: Arc<MemoryTable>) -> Result<()> {
        if self.session.table_exist(name).map_err(Error::from)? {
            return Err(Error::plan(format!(
                "a table or source named '{name}' already exists"
            )));
        }
        self.session
            .register_table(name, Arc::new(MemorySinkTable::new(Arc::clone(&table))))
            .map_err(Error::from)?;
        self.reg().memory_tables.insert(name.to_string(), table);
        Ok(())
    }

    /// Applies a `CREATE SOURCE`'s watermark and `late_rows` to a registered
    /// stream (also when a source is registered again, as after a restart).
    pub fn apply_source_clauses(&self, table: &StreamTable, cs: &CreateSource) -> Result<()> {
        if let Some(wm) = cs.watermark.clone() {
            table.set_watermark(wm)?;
        }
        if let Some(target) = &cs.late_rows {
            let sink = match self.reg().sinks.get(target) {
                Some((_, s)) => Some(Arc::clone(s)),
                None => None,
            };
            let sink = match sink {
                Some(s) => s,
                None => Arc::new(sluice_connectors::MemorySink::new(
                    target,
                    self.memory_table(target)?,
                )),
            };
            table.set_late_rows(sink);
        }
        Ok(())
    }

    fn dead_letter_sink(&self, target: &str) -> Result<Arc<dyn Sink>> {
        if let Some((_, sink)) = self.reg().sinks.get(target) {
            return Ok(Arc::clone(sink));
        }
        let table = self.memory_table(target)?;
        table.bind_schema(target, &dead_letter_schema())?;
        Ok(Arc::new(sluice_connectors::MemorySink::new(target, table)))
    }

    /// Executes every statement of a script, in order, stopping at the first
    /// error (whose message names the statement).
    pub async fn sql(&self, script: &str) -> Result<Vec<Outcome>> {
        let mut out = Vec::new();
        for stmt in parse_script(script)? {
            out.push(self.execute(stmt).await?);
        }
        Ok(out)
    }

    /// Executes one parsed statement.
    pub async fn execute(&self, stmt: Statement) -> Result<Outcome> {
        match stmt {
            Statement::CreateSource(cs) => {
                let source = source_from_options(&cs.name, cs.schema.clone(), &cs.options)?;
                let table = self.register_source(source)?;
                if let Err(e) = self.apply_source_clauses(&table, &cs) {
                    // A source whose clauses failed is not left half-defined.
                    self.reg().sources.remove(&cs.name);
                    let _ = self.session.deregister_table(cs.name.as_str());
                    return Err(e);
                }
                Ok(Outcome::Done)
            }
            Statement::CreateSink(cs) => {
                if self.reg().sinks.contains_key(&cs.name) {
                    return Err(Error::plan(format!(
                        "a sink named '{}' already exists",
                        cs.name
                    )));
                }
                cs.options.get_choice(
                    "output_mode",
                    &["append", "update", "complete", "changelog"],
                )?;
                let is_memory = cs
                    .options
                    .get("connector")
                    .is_some_and(|c| c.eq_ignore_ascii_case("memory"));
                let existing = self.reg().memory_tables.get(&cs.name).cloned();
                let existed = existing.is_some();
                let mut table = None;
                let sink = sink_from_options(&cs.name, &cs.options, || {
                    // A table adopted from an earlier context keeps its rows.
                    existing.unwrap_or_else(|| {
                        let t = MemoryTable::new();
                        table = Some(Arc::clone(&t));
                        t
                    })
                })?;
                // A memory sink is queryable by its name; a sink whose query
                // fails to plan leaves nothing behind.
                if let (true, Some(t)) = (is_memory && !existed, table) {
                    self.adopt_memory_table(&cs.name, t)?;
                }
                self.reg()
                    .sinks
                    .insert(cs.name.clone(), (cs.options.clone(), Arc::clone(&sink)));
                let Some(q) = cs.query else {
                    return Ok(Outcome::Done);
                };
                match self.streaming_query(&cs.name, q).await {
                    Ok(p) => Ok(Outcome::Query(p)),
                    Err(e) => {
                        self.forget_sink(&cs.name, is_memory && !existed);
                        Err(e)
                    }
                }
            }
            Statement::InsertInto { target, query } => self.insert_into(&target, query).await,
            Statement::Set { key, value } => {
                self.set(&key, &value).await?;
                Ok(Outcome::Done)
            }
            Statement::Explain(inner) => self.explain(*inner).await,
            Statement::DataFusion(stmt) => self.batch_statement(*stmt).await,
        }
    }

    fn forget_sink(&self, name: &str, drop_table: bool) {
        let mut reg = self.reg();
        reg.sinks.remove(name);
        reg.query_names.remove(name);
        if drop_table {
            reg.memory_tables.remove(name);
            drop(reg);
            let _ = self.session.deregister_table(name);
        }
    }

    async fn plan_query(&self, q: Box<Query>) -> Result<DataFrame> {
        let stmt = DFStatement::Statement(Box::new(ast::Statement::Query(q)));
        let state = self.session.state();
        let plan = state.statement_to_plan(stmt).await.map_err(Error::from)?;
        // DISTINCT ON over a stream runs as the ROW_NUMBER() = 1 it means.
        let plan = sluice_planner::distinct_on_as_row_number(plan)?;
        Ok(DataFrame::new(state, plan))
    }

    /// Plans the query feeding sink `sink_name`.
    async fn streaming_query(&self, sink_name: &str, q: Box<Query>) -> Result<Box<PendingQuery>> {
        let (options, sink) = self
            .reg()
            .sinks
            .get(sink_name)
            .cloned()
            .ok_or_else(|| Error::plan(format!("no sink named '{sink_name}'")))?;
        let df = self.plan_query(q).await?;
        if !df.is_streaming() {
            return Err(Error::plan(format!(
                "the query of sink '{sink_name}' reads no stream (only static tables): run it as a batch query, or read a source created with CREATE SOURCE"
            )));
        }
        let name = sink_name.to_string();
        let settings = self.settings();
        let mode: OutputMode = options.get("output_mode").unwrap_or("append").parse()?;
        // Refuse an unsupported query now, at CREATE SINK, not when it starts:
        // the plan as written names operators as the user wrote them, the
        // optimized one also shows subqueries turned into joins.
        check_streaming_plan(sink_name, df.logical_plan(), mode)?;
        let optimized = df.clone().into_optimized_plan().map_err(Error::from)?;
        check_streaming_plan(sink_name, &optimized, mode)?;
        let trigger = match options.get("trigger") {
            Some(t) => t.parse()?,
            None => settings.trigger,
        };
        let mut writer = df
            .write_stream()
            .name(name.clone())
            .output_mode(mode)
            .trigger(trigger)
            .durability(settings.durability)
            .max_batch_retries(settings.max_batch_retries)
            .retry_backoff(settings.retry_backoff)
            .random_splits(settings.split_seed)
            .state_snapshot_fallback(settings.state_snapshot_fallback)
            .state_ttl(options.get_duration("state_ttl")?);
        if let Some(dir) = options.get("checkpoint") {
            writer = writer.checkpoint(dir);
        } else if let Some(root) = &settings.checkpoint_root {
            writer = writer.checkpoint(root.join(&name));
        }
        // Only a query that planned takes the sink.
        self.reg().query_names.insert(name.clone(), 1);
        Ok(Box::new(PendingQuery {
            name,
            writer,
            sink,
            started: Arc::clone(&self.started),
            registry: Arc::clone(&self.registry),
        }))
    }

    async fn insert_into(&self, target: &str, query: Box<Query>) -> Result<Outcome> {
        if self.reg().sinks.contains_key(target) {
            if self.reg().query_names.contains_key(target) {
                // Sinks key their output by batch id, and every query counts
                // its own batches: two queries would overwrite each other.
                return Err(Error::not_supported(format!(
                    "a second query into sink '{target}': each sink takes one query; combine them with UNION ALL in one INSERT INTO {target}"
                )));
            }
            return self
                .streaming_query(target, query)
                .await
                .map(Outcome::Query);
        }
        let source = self.reg().sources.get(target).cloned();
        match source {
            Some(src) => {
                let mem = src.as_any().downcast_ref::<MemorySource>().ok_or_else(|| {
                    Error::plan(format!(
                        "INSERT INTO {target}: '{target}' is a {} source; only memory sources take rows from SQL",
                        src.connector()
                    ))
                })?;
                let df = self.plan_query(query).await?;
                if df.is_streaming() {
                    return Err(Error::plan(format!(
                        "INSERT INTO {target}: the rows must come from VALUES or static tables, not a stream"
                    )));
                }
                for batch in df.collect().await.map_err(Error::from)? {
                    mem.append(batch)?;
                }
                Ok(Outcome::Done)
            }
            None => Err(Error::plan(format!(
                "INSERT INTO {target}: no sink or memory source named '{target}' (create it with CREATE SINK or CREATE SOURCE)"
            ))),
        }
    }

    async fn set(&self, key: &str, value: &str) -> Result<()> {
        if key.starts_with("datafusion.") {
            let state = self.session.state_ref();
            let mut state = state.write();
            return state
                .config_mut()
                .options_mut()
                .set(key, value)
                .map_err(Error::from);
        }
        let bad = |what: &str| Error::plan(format!("SET {key} = '{value}': expected {what}"));
        let mut reg = self.reg();
        match key {
            "checkpoint_root" => {
                reg.settings.checkpoint_root = Some(PathBuf::from(value));
                *self
                    .checkpoint_root
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(PathBuf::from(value));
            }
            "trigger" => reg.settings.trigger = value.parse()?,
            "checkpoint_sync" => {
                reg.settings.durability = match value.to_ascii_lowercase().as_str() {
                    "true" => Durability::Fsync,
                    "false" => Durability::NoSync,
                    _ => return Err(bad("true or false")),
                }
            }
            "split_seed" => {
                reg.settings.split_seed = Some(value.parse().map_err(|_| bad("a number"))?)
            }
            "max_batch_retries" => {
                reg.settings.max_batch_retries = value.parse().map_err(|_| bad("a count"))?
            }
            "state_snapshot_fallback" => {
                reg.settings.state_snapshot_fallback = match value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("true or false")),
                }
            }
            _ => {
                return Err(Error::plan(format!(
                    "SET {key}: unknown setting (known: {}, and datafusion.*)",
                    SETTINGS.join(", ")
                )));
            }
        }
        Ok(())
    }

    async fn explain(&self, inner: Statement) -> Result<Outcome> {
        let (name, q, options) = match inner {
            Statement::CreateSink(cs) => match cs.query {
                Some(q) => (cs.name, q, cs.options),
                None => return Err(Error::plan("EXPLAIN CREATE SINK needs the sink's AS query")),
            },
            Statement::InsertInto { target, query } => {
                let options = self
                    .reg()
                    .sinks
                    .get(&target)
                    .map(|(o, _)| o.clone())
                    .ok_or_else(|| {
                        Error::plan(format!(
                            "EXPLAIN INSERT INTO {target}: no sink named '{target}'"
                        ))
                    })?;
                (target, query, options)
            }
            Statement::DataFusion(stmt) => {
                let state = self.session.state();
                let plan = state.statement_to_plan(*stmt).await.map_err(Error::from)?;
                let rows = DataFrame::new(state, plan)
                    .explain(false, false)
                    .map_err(Error::from)?
                    .collect()
                    .await
                    .map_err(Error::from)?;
                return Ok(Outcome::Rows(rows));
            }
            _ => {
                return Err(Error::plan(
                    "EXPLAIN takes CREATE SINK ... AS <query>, INSERT INTO <sink> <query>, or a batch query",
                ));
            }
        };
        let df = self.plan_query(q).await?;
        let mode: OutputMode = options.get("output_mode").unwrap_or("append").parse()?;
        let (state, plan) = df.into_parts();
        let plan = state.optimize(&plan).map_err(Error::from)?;
        let plan = sluice_planner::sign_updating_edges(plan)?;
        let shape = check_streaming_plan(&name, &plan, mode)?;
        let (plan, _) = fork_streams(plan)?;
        let physical = state
            .create_physical_plan(&plan)
            .await
            .map_err(Error::from)?;
        // The plan as it runs: with its stateful nodes.
        let physical = if shape.is_stateful() {
            sluice_exec::operators::plan_stateful(
                physical,
                sluice_exec::operators::StatefulOptions {
                    mode,
                    state_ttl: options.get_duration("state_ttl")?,
                    signed_edges: shape.aggregates.iter().filter(|a| a.feeds_signed).count(),
                },
                &sluice_exec::operators::event_time_columns(&plan),
            )
            .map_err(|e| e.context(format!("query '{name}'")))?
        } else {
            physical
        };
        let sink = options.get("connector").unwrap_or("?").to_string();
        let trigger = match options.get("trigger") {
            Some(t) => t.parse::<Trigger>()?,
            None => self.settings().trigger,
        };
        Ok(Outcome::Explain(explain_streaming(
            &name,
            &plan,
            &physical,
            &shape,
            mode,
            &sink,
            &trigger.to_string(),
        )))
    }

    async fn batch_statement(&self, stmt: DFStatement) -> Result<Outcome> {
        let state = self.session.state();
        let plan = state.statement_to_plan(stmt).await.map_err(Error::from)?;
        if let Some(t) = stream_tables(&plan).first() {
            return Err(Error::plan(format!(
                "this query reads the stream '{}': a streaming query must write to a sink — CREATE SINK name WITH (connector = 'memory' | 'console' | 'file', ...) AS <query>",
                t.source().name()
            )));
        }
        let df = self
            .session
            .execute_logical_plan(plan)
            .await
            .map_err(Error::from)?;
        let rows = df.collect().await.map_err(Error::from)?;
        Ok(Outcome::Rows(rows))
    }
}
