//! Streaming on DataFusion's own `DataFrame`: a stream read with
//! [`StreamContext::read_stream`](crate::StreamContext::read_stream) is a
//! `DataFrame` whose scan yields the current micro-batch, so every DataFusion
//! transformation works; this trait adds the streaming verbs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datafusion::common::ScalarValue;
use datafusion::dataframe::DataFrame;
use datafusion::functions::datetime::expr_fn::date_bin;
use datafusion::functions_nested::expr_fn::gen_series;
use datafusion::prelude::{col, ident, lit};
use sluice_common::connector::Sink;
use sluice_common::durable::Durability;
use sluice_common::{Error, Result};
use sluice_exec::{
    Fault, MicroBatchExecution, PlanRunner, QueryConfig, StateFinalizer, StreamingQuery, Trigger,
};
use sluice_planner::{
    OutputMode, SessionEnd, WatermarkDef, fork_streams, stream_tables, window_time_udf,
};

/// Streaming verbs on a DataFusion [`DataFrame`].
pub trait StreamingDataFrame: Sized {
    /// Declares `column` of the stream this frame reads as its event time,
    /// with the watermark trailing the largest event time seen by `delay`.
    fn with_watermark(self, column: &str, delay: Duration) -> Result<DataFrame>;
    /// Adds `window_start`, `window_end` and `window_time` (the window's
    /// last instant): the tumbling window of `size`
    /// (aligned to the Unix epoch) that timestamp column `column` falls in —
    /// what `TUMBLE(t, column, size)` adds in SQL. Group by both (and any
    /// keys) for a windowed aggregate.
    fn tumble(self, column: &str, size: Duration) -> Result<DataFrame>;
    /// One row per hopping window of `size` every `slide` (aligned to the
    /// Unix epoch) that timestamp column `column` falls in, with
    /// `window_start`, `window_end` and `window_time` — what `HOP(t, column, slide, size)`
    /// gives in SQL.
    fn hop(self, column: &str, slide: Duration, size: Duration) -> Result<DataFrame>;
    /// Adds `window_start` and `window_end` for session windows with `gap`
    /// on timestamp column `column` — what `SESSION(t, column, gap)` adds in
    /// SQL. Group by both (and any keys): sessions of a key that come closer
    /// than the gap merge, across batches too.
    fn session(self, column: &str, gap: Duration) -> Result<DataFrame>;
    /// Keeps the first row of each distinct value of `columns` (Spark's
    /// `dropDuplicates(cols)`): a row is emitted the first time its key is
    /// seen, in arrival order, and the key is remembered for ever. It is
    /// `ROW_NUMBER() OVER (PARTITION BY columns) = 1`, so it runs as a
    /// keep-first top-N node and its output is append-only.
    fn drop_duplicates(self, columns: &[&str]) -> Result<DataFrame>;
    /// Keeps the first row of each distinct value of `columns` among rows
    /// whose event times lie within the watermark delay of each other
    /// (Spark's `dropDuplicatesWithinWatermark(cols)`): a key is remembered
    /// until the watermark reaches its first row's event time plus the
    /// delay, then forgotten, so a later row of the key is emitted again.
    /// Rows at or below the watermark are late. The frame must read a
    /// stream with a watermark ([`Self::with_watermark`] or `WATERMARK FOR`)
    /// on a column it still has. Its output is append-only.
    fn drop_duplicates_within_watermark(self, columns: &[&str]) -> Result<DataFrame>;
    /// Whether the frame reads a stream.
    fn is_streaming(&self) -> bool;
    /// Starts describing how to run this frame as a streaming query.
    fn write_stream(self) -> DataStreamWriter;
}

impl StreamingDataFrame for DataFrame {
    fn with_watermark(self, column: &str, delay: Duration) -> Result<DataFrame> {
        let (state, plan) = self.into_parts();
        // This frame gets its own copies of its streams, so the watermark is
        // this frame's, not every reader's of the source.
        let (plan, tables) = fork_streams(plan)?;
        let mut set = false;
        for t in &tables {
            if t.source().schema().field_with_name(column).is_ok() {
                t.set_watermark(WatermarkDef {
                    column: column.to_string(),
                    delay,
                    idle_timeout: None,
                })?;
                set = true;
            }
        }
        if !set {
            let names: Vec<_> = tables
                .iter()
                .map(|t| t.source().name().to_string())
                .collect();
            return Err(Error::plan(format!(
                "with_watermark('{column}'): none of the streams this frame reads ({}) has that column",
                names.join(", ")
            )));
        }
        Ok(DataFrame::new(state, plan))
    }

    fn tumble(self, column: &str, size: Duration) -> Result<DataFrame> {
        let size = interval("tumble", column, size)?;
        let epoch = lit(ScalarValue::TimestampNanosecond(Some(0), None));
        let start = date_bin(size.clone(), ident(column), epoch);
        let end = SessionEnd::window_end_udf().call(vec![start.clone(), size]);
        Ok(self
            .with_column("window_start", start)?
            .with_column("window_end", end.clone())?
            .with_column("window_time", window_time_udf().call(vec![end]))?)
    }

    fn hop(self, column: &str, slide: Duration, size: Duration) -> Result<DataFrame> {
        let slide = interval("hop", column, slide)?;
        let size = interval("hop", column, size)?;
        let epoch = lit(ScalarValue::TimestampNanosecond(Some(0), None));
        // The slide-grid starts from the one at or before ts - size up to the
        // one at or before ts; keep the windows that hold ts.
        let first = date_bin(slide.clone(), ident(column) - size.clone(), epoch.clone());
        let last = date_bin(slide.clone(), ident(column), epoch);
        let names: Vec<String> = self
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let starts = self
            .with_column("__hop_start", gen_series(first, last, slide))?
            .unnest_columns(&["__hop_start"])?
            .filter(
                SessionEnd::window_end_udf()
                    .call(vec![col("__hop_start"), size.clone()])
                    .gt(ident(column)),
            )?;
        let mut exprs: Vec<datafusion::prelude::Expr> =
            names.iter().map(|n| ident(n.as_str())).collect();
        exprs.push(col("__hop_start").alias("window_start"));
        let end = SessionEnd::window_end_udf().call(vec![col("__hop_start"), size]);
        exprs.push(end.clone().alias("window_end"));
        exprs.push(window_time_udf().call(vec![end]).alias("window_time"));
        Ok(starts.select(exprs)?)
    }

    fn session(self, column: &str, gap: Duration) -> Result<DataFrame> {
        let gap = interval("session", column, gap)?;
        let end = SessionEnd::udf().call(vec![ident(column), gap]);
        Ok(self
            .with_column("window_start", ident(column))?
            .with_column("window_end", end)?)
    }

    fn drop_duplicates(self, columns: &[&str]) -> Result<DataFrame> {
        if columns.is_empty() {
            return Err(Error::plan(
                "drop_duplicates needs at least one column; use distinct() for whole rows",
            ));
        }
        let names = column_names(&self, "drop_duplicates", columns)?;
        first_row_per_key(self, &names, columns, vec![])
    }

    fn drop_duplicates_within_watermark(self, columns: &[&str]) -> Result<DataFrame> {
        let what = "drop_duplicates_within_watermark";
        if columns.is_empty() {
            return Err(Error::plan(format!("{what} needs at least one column")));
        }
        let names = column_names(&self, what, columns)?;
        let watermark = stream_tables(self.logical_plan())
            .iter()
            .filter_map(|t| t.watermark())
            .find(|w| names.contains(&w.column))
            .ok_or_else(|| {
                Error::plan(format!(
                    "{what} needs a watermark on an event-time column of the frame, to know when a key may be forgotten: call with_watermark(column, delay) first, or declare WATERMARK FOR in the source"
                ))
            })?;
        let delay_ms = i64::try_from(watermark.delay.as_millis()).unwrap_or(i64::MAX);
        let order = datafusion::logical_expr::Expr::ScalarFunction(
            datafusion::logical_expr::expr::ScalarFunction::new_udf(
                Arc::new(sluice_planner::within_watermark_udf()),
                vec![ident(watermark.column.as_str()), lit(delay_ms)],
            ),
        );
        first_row_per_key(self, &names, columns, vec![order.sort(true, false)])
    }

    fn is_streaming(&self) -> bool {
        !stream_tables(self.logical_plan()).is_empty()
    }

    fn write_stream(self) -> DataStreamWriter {
        DataStreamWriter {
            df: self,
            name: None,
            output_mode: OutputMode::Append,
            trigger: Trigger::default(),
            checkpoint: None,
            durability: Durability::Fsync,
            max_batches: None,
            max_batch_retries: None,
            retry_backoff: None,
            fault: None,
            split_seed: None,
            state_ttl: None,
            state_snapshot_fallback: false,
            runner: None,
        }
    }
}

/// A positive duration as an interval literal, for window helpers.
fn interval(helper: &str, column: &str, d: Duration) -> Result<datafusion::prelude::Expr> {
    let nanos = i64::try_from(d.as_nanos())
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            Error::plan(format!(
                "{helper}('{column}'): the size must be positive and finite, got {d:?}"
            ))
        })?;
    Ok(lit(ScalarValue::new_interval_mdn(0, 0, nanos)))
}

/// How a streaming frame runs: output mode, trigger, checkpoint, sink.
#[derive(Debug)]
pub struct DataStreamWriter {
    df: DataFrame,
    name: Option<String>,
    output_mode: OutputMode,
    trigger: Trigger,
    checkpoint: Option<PathBuf>,
    durability: Durability,
    max_batches: Option<u64>,
    max_batch_retries: Option<u32>,
    retry_backoff: Option<Duration>,
    fault: Option<Fault>,
    split_seed: Option<u64>,
    state_ttl: Option<Duration>,
    state_snapshot_fallback: bool,
    runner: Option<Arc<dyn PlanRunner>>,
}

impl DataStreamWriter {
    /// The query's name (default: the sink's name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How the sink receives results (default: append).
    pub fn output_mode(mut self, mode: OutputMode) -> Self {
        self.output_mode = mode;
        self
    }

    /// When batches run (default: each as soon as the previous one commits).
    pub fn trigger(mut self, trigger: Trigger) -> Self {
        self.trigger = trigger;
        self
    }

    /// The checkpoint directory. Without one, a fresh temporary directory is
    /// used and the query cannot be resumed.
    pub fn checkpoint(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoint = Some(dir.into());
        self
    }

    /// Whether checkpoint writes are fsynced (default) or only renamed.
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Stop after `n` batches.
    pub fn max_batches(mut self, n: u64) -> Self {
        self.max_batches = Some(n);
        self
    }

    /// How often a batch failing on a transient error is retried (default 3).
    pub fn max_batch_retries(mut self, n: u32) -> Self {
        self.max_batch_retries = Some(n);
        self
    }

    /// The delay before the first retry of a failed batch (doubling after;
    /// measured on the trigger clock). Default 100 ms.
    pub fn retry_backoff(mut self, d: Duration) -> Self {
        self.retry_backoff = Some(d);
        self
    }

    /// Tests: splits the available input into random smaller batches,
    /// seeded, to check that results do not depend on batch boundaries.
    pub fn random_splits(mut self, seed: Option<u64>) -> Self {
        self.split_seed = seed;
        self
    }

    /// When a state snapshot is unreadable, rebuilds its version from an
    /// older snapshot and the deltas after it instead of failing.
    pub fn state_snapshot_fallback(mut self, on: bool) -> Self {
        self.state_snapshot_fallback = on;
        self
    }

    /// Runs each batch's plan with `runner` instead of in this process
    /// (`sluice_cluster::ClusterRunner` runs it on a Ballista cluster).
    pub fn runner(mut self, runner: Arc<dyn PlanRunner>) -> Self {
        self.runner = Some(runner);
        self
    }

    /// Drops the aggregate's keys that no batch updated for `ttl` of trigger
    /// time (for unwindowed aggregates, whose keys no watermark evicts).
    pub fn state_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.state_ttl = ttl;
        self
    }

    /// Injects a crash at a step of the commit protocol (tests).
    pub fn inject_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// Plans the query as [`DataStreamWriter::start`] would, without
    /// starting it or opening anything (for `sluice state`).
    pub async fn plan_finalizer(self, name: &str) -> Result<PlannedState> {
        let frame = self.df.clone();
        let (state, plan) = self.df.into_parts();
        let mut config = QueryConfig::new(name, PathBuf::new());
        config.output_mode = self.output_mode;
        config.state_ttl = self.state_ttl;
        let (finalizer, fingerprint) =
            sluice_exec::execution::plan_finalizer(plan, &state, &config).await?;
        // Optimized only now: optimizing draws names from the session, so
        // doing it first could change the plan whose fingerprint is taken.
        Ok(PlannedState {
            finalizer,
            fingerprint,
            renamed: renamed_columns(frame),
        })
    }

    /// Starts the query writing to `sink`.
    pub async fn start(self, sink: impl Sink + 'static) -> Result<StreamingQuery> {
        self.start_with(Arc::new(sink)).await
    }

    /// Starts the query writing to a shared sink.
    pub async fn start_with(self, sink: Arc<dyn Sink>) -> Result<StreamingQuery> {
        let (state, plan) = self.df.into_parts();
        let tables = stream_tables(&plan);
        let Some(first) = tables.first() else {
            return Err(Error::plan(
                "write_stream() on a frame that reads no stream: use DataFrame::collect() for a batch query",
            ));
        };
        let clock = Arc::clone(first.clock());
        let name = self.name.unwrap_or_else(|| sink.name().to_string());
        let checkpoint = match self.checkpoint {
            Some(c) => c,
            None => std::env::temp_dir().join(format!("sluice-{}", uuid::Uuid::new_v4())),
        };
        let mut config = QueryConfig::new(name, checkpoint);
        config.output_mode = self.output_mode;
        config.trigger = self.trigger;
        config.durability = self.durability;
        config.max_batches = self.max_batches;
        if let Some(r) = self.max_batch_retries {
            config.max_batch_retries = r;
        }
        if let Some(b) = self.retry_backoff {
            config.retry_backoff = b;
        }
        config.split_seed = self.split_seed;
        config.state_ttl = self.state_ttl;
        config.state_snapshot_fallback = self.state_snapshot_fallback;
        config.runner = self.runner;
        if self.fault.is_some() {
            config.fault = self.fault;
        }
        let exec = MicroBatchExecution::start(plan, &state, sink, config, clock).await?;
        let query = StreamingQuery::start(exec);
        // A query started from a StreamContext's session is watched by its
        // HTTP endpoint.
        if let Some(watched) = state.config().get_extension::<crate::http::Watched>() {
            watched.add(query.info());
        }
        Ok(query)
    }
}

/// A streaming query planned but not started: what `sluice state` needs to
/// show its stored aggregate states as values.
#[derive(Debug)]
pub struct PlannedState {
    /// What turns the first aggregate's stored states into values (`None`
    /// without an aggregate).
    pub finalizer: Option<StateFinalizer>,
    /// The plan's fingerprint, as a checkpoint's `metadata` records it.
    pub fingerprint: String,
    /// The columns the query's last projection passes on under another
    /// name (`count(*) AS n`): pairs of the name below the projection, as
    /// the running plan's nodes have it, and the query's name for it.
    pub renamed: Vec<(String, String)>,
}

/// See [`PlannedState::renamed`]. From the optimized plan, whose names are
/// those of the running plan's nodes (`count(*)` is `count(Int64(1))`).
fn renamed_columns(df: DataFrame) -> Vec<(String, String)> {
    use datafusion::logical_expr::{Expr, LogicalPlan};
    let plan = df.into_optimized_plan();
    let Ok(LogicalPlan::Projection(p)) = plan else {
        return Vec::new();
    };
    p.expr
        .iter()
        .filter_map(|e| {
            let Expr::Alias(a) = e else { return None };
            // `count(Int64(1)) AS count(*) AS n`: the innermost is the column.
            let mut inner = a.expr.as_ref();
            while let Expr::Alias(b) = inner {
                inner = b.expr.as_ref();
            }
            match inner {
                Expr::Column(c) => Some((c.name.clone(), a.name.clone())),
                _ => None,
            }
        })
        .collect()
}

/// The names of `df`'s columns, once every one of `columns` is among them
/// (`what` names the caller in the error).
fn column_names(df: &DataFrame, what: &str, columns: &[&str]) -> Result<Vec<String>> {
    let names: Vec<String> = df
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    for c in columns {
        if !names.iter().any(|n| n == c) {
            return Err(Error::plan(format!(
                "{what}: no column '{c}' (columns: {})",
                names.join(", ")
            )));
        }
    }
    Ok(names)
}

/// `ROW_NUMBER() OVER (PARTITION BY columns ORDER BY order) = 1` over
/// `df`, keeping its columns `names`: each key's first row, as the
/// streaming planner runs it (a keep-first top-N).
fn first_row_per_key(
    df: DataFrame,
    names: &[String],
    columns: &[&str],
    order: Vec<datafusion::logical_expr::SortExpr>,
) -> Result<DataFrame> {
    use datafusion::logical_expr::ExprFunctionExt;
    let mut rn = datafusion::functions_window::expr_fn::row_number()
        .partition_by(columns.iter().map(|c| ident(*c)).collect());
    // An empty ORDER BY is an error to DataFusion, not "no order".
    if !order.is_empty() {
        rn = rn.order_by(order);
    }
    let rn = rn
        .build()
        .map_err(Error::from)?
        .alias("__sluice_row_number");
    let kept = df
        .window(vec![rn])?
        .filter(col("__sluice_row_number").eq(lit(1u64)))?;
    Ok(kept.select(names.iter().map(|n| ident(n.as_str())).collect::<Vec<_>>())?)
}
