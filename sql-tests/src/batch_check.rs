//! The differential check: a sink's final result against the same query run
//! by plain DataFusion as one batch query over every on-time input row.
//!
//! What "final result" means depends on the output mode: append — every row
//! emitted (no duplicates, no losses), compared with the batch rows whose
//! window has closed by the last watermark; update — the last row emitted
//! per group key; complete — the last result; changelog — the changes
//! applied. Rows the stream counted late are taken out of the batch query's
//! aggregate input (they come from the source's `late_rows` table), so the
//! check holds whichever split made them late.

use std::collections::HashMap;
use std::sync::Arc;

use sluice::deps::datafusion::arrow::array::{AsArray, BooleanArray};
use sluice::deps::datafusion::arrow::compute::{cast, filter_record_batch};
use sluice::deps::datafusion::arrow::datatypes::SchemaRef;
use sluice::deps::datafusion::arrow::record_batch::RecordBatch;
use sluice::deps::datafusion::arrow::row::{RowConverter, SortField};
use sluice::deps::datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use sluice::deps::datafusion::datasource::MemTable;
use sluice::deps::datafusion::datasource::memory::MemorySourceConfig;
use sluice::deps::datafusion::logical_expr::LogicalPlan;
use sluice::deps::datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use sluice::deps::datafusion::physical_plan::{
    ExecutionPlan, collect, replace_children_if_necessary,
};
use sluice::deps::datafusion::prelude::SessionContext;
use sluice::deps::datafusion::sql::parser::Statement as DFStatement;
use sluice::deps::datafusion::sql::sqlparser::ast;
use sluice::deps::sluice_planner::{Statement, parse_script};
use sluice::deps::sluice_state::checkpoint::{read_last_commit, read_progress};

use crate::{SluiceDb, TestError, rows_of};

type Rows = Vec<Vec<String>>;

impl SluiceDb {
    /// `CHECK ALL AGAINST BATCH [EXCEPT s1 s2 ...]`: drains every query,
    /// then checks each sink a running query writes, but those named.
    pub(crate) async fn check_all(&self, except: &[&str]) -> Result<(), TestError> {
        for q in self.queries.iter().filter(|q| !except.contains(&q.name())) {
            q.process_all_available().await.map_err(|e| {
                TestError(format!(
                    "draining '{}' before the batch check: {e}",
                    q.name()
                ))
            })?;
        }
        for q in &self.queries {
            if !except.contains(&q.name()) {
                self.check_against_batch(q.name(), None).await?;
            }
        }
        Ok(())
    }

    /// Compares what sink `name` holds with its query (or with `reference`,
    /// a batch query written by the test for what plain SQL cannot say the
    /// same way, such as session windows) run as one batch query.
    pub(crate) async fn check_against_batch(
        &self,
        name: &str,
        reference: Option<&str>,
    ) -> Result<(), TestError> {
        let err = |m: String| TestError(format!("CHECK {name} AGAINST BATCH: {m}"));
        let query = self
            .definitions
            .iter()
            .find_map(|d| match d {
                Statement::CreateSink(cs) if cs.name == name => cs.query.clone(),
                Statement::InsertInto { target, query } if target == name => Some(query.clone()),
                _ => None,
            })
            .ok_or_else(|| err("no query writes to it".into()))?;
        let options = self
            .definitions
            .iter()
            .find_map(|d| match d {
                Statement::CreateSink(cs) if cs.name == name => Some(cs.options.clone()),
                _ => None,
            })
            .ok_or_else(|| err("no CREATE SINK defines it".into()))?;
        let mode = options
            .get("output_mode")
            .unwrap_or("append")
            .to_ascii_lowercase();
        let table = self
            .ctx
            .memory_tables()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t);
        let connector = options.get("connector").unwrap_or_default();
        let kafka_json = connector == "kafka" && options.get("format") == Some("json");
        if table.is_none() && connector != "file" && !kafka_json {
            return Err(err(
                "the check reads memory, file and JSON Kafka sinks; say why not with `# no-batch-check`"
                    .into(),
            ));
        }
        let running = self.queries.iter().find(|q| q.name() == name);
        let stateful = running.and_then(|q| q.state_finalizer());
        let progress = match running {
            Some(q) => read_progress(q.checkpoint_dir())?,
            None => Vec::new(),
        };
        // A re-run batch may be recorded twice; its last record counts.
        let mut late_by_batch = HashMap::new();
        for p in &progress {
            late_by_batch.insert(p.batch_id, p.late_rows);
        }
        let late_count: u64 = late_by_batch.values().sum();
        // Windows close against the watermark at the end of the last batch.
        let watermark = match running {
            Some(q) => read_last_commit(q.checkpoint_dir())?.and_then(|c| c.watermark_ms),
            None => None,
        };

        // The batch side: a plain DataFusion context where each stream is a
        // table of every row it received, and static tables are as defined.
        // One partition: no repartition under a join or an aggregate, so an
        // input whose late rows are taken out can be replaced by one
        // in-memory partition.
        let batch_ctx = SessionContext::new_with_config(
            sluice::deps::datafusion::prelude::SessionConfig::new().with_target_partitions(1),
        );
        // The window rewrites call Sluice's two time functions.
        for udf in sluice::deps::sluice_planner::window_udfs() {
            batch_ctx.register_udf(udf);
        }
        for d in &self.definitions {
            match d {
                Statement::CreateSource(cs) => {
                    let src = self
                        .ctx
                        .source(&cs.name)
                        .ok_or_else(|| err(format!("source {} vanished", cs.name)))?;
                    if let Some(mem) = src.as_any().downcast_ref::<sluice::MemorySource>() {
                        let t = MemTable::try_new(src.schema(), vec![mem.all_rows()])
                            .map_err(|e| err(e.to_string()))?;
                        batch_ctx
                            .register_table(cs.name.as_str(), Arc::new(t))
                            .map_err(|e| err(e.to_string()))?;
                    } else if let Some(nx) =
                        src.as_any()
                            .downcast_ref::<sluice::deps::sluice_connectors::NexmarkSource>()
                    {
                        let rows = nx
                            .generate(0, nx.events())
                            .map_err(|e| err(e.to_string()))?;
                        let t = MemTable::try_new(src.schema(), vec![rows])
                            .map_err(|e| err(e.to_string()))?;
                        batch_ctx
                            .register_table(cs.name.as_str(), Arc::new(t))
                            .map_err(|e| err(e.to_string()))?;
                    } else if src.as_any().downcast_ref::<sluice::KafkaSource>().is_some() {
                        let rows = read_whole(&src, &self.dir.join("batch-check").join(&cs.name))
                            .await
                            .map_err(err)?;
                        let t = MemTable::try_new(src.schema(), vec![rows])
                            .map_err(|e| err(e.to_string()))?;
                        batch_ctx
                            .register_table(cs.name.as_str(), Arc::new(t))
                            .map_err(|e| err(e.to_string()))?;
                    } else if cs.options.get("connector") == Some("file") {
                        register_files(&batch_ctx, &cs.name, &cs.options, src.schema())
                            .await
                            .map_err(err)?;
                    }
                    // Other sources are left out: a query over one fails to
                    // plan, naming it.
                }
                Statement::DataFusion(stmt) => {
                    crate::run_batch(&batch_ctx, stmt.as_ref().clone())
                        .await
                        .map_err(err)?;
                }
                _ => {}
            }
        }
        let stmt = match reference {
            Some(sql) => match parse_script(sql)?.pop() {
                Some(Statement::DataFusion(s)) => *s,
                _ => return Err(err("the reference is not one plain query".into())),
            },
            None => DFStatement::Statement(Box::new(ast::Statement::Query(query))),
        };
        let logical = batch_ctx
            .state()
            .statement_to_plan(stmt)
            .await
            .map_err(|e| err(format!("{e} (only memory sources can be read as a batch)")))?;
        let df = batch_ctx
            .execute_logical_plan(logical.clone())
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut plan = df
            .create_physical_plan()
            .await
            .map_err(|e| err(e.to_string()))?;
        if late_count > 0 {
            if reference.is_some() {
                return Err(err(format!(
                    "{late_count} rows were late; a hand-written reference cannot have them taken out"
                )));
            }
            let late = self.late_rows_of(name, &logical, late_count).map_err(err)?;
            plan = without_rows(plan, late, &batch_ctx).await.map_err(err)?;
        }
        // A hand-written reference says itself which windows have closed.
        let keeps_state = stateful.is_some() || progress.iter().any(|p| !p.operators.is_empty());
        if mode == "append" && keeps_state && reference.is_none() {
            // The topmost windowed operator closes windows against its own
            // input watermark: the query's, less the delay of joins below.
            let watermark = progress
                .last()
                .and_then(|p| {
                    p.operators
                        .iter()
                        .rev()
                        .find(|o| o.id.starts_with("aggregate") || o.id.starts_with("topn"))
                })
                .and_then(|o| o.watermark_ms)
                .or(watermark);
            plan = closed_windows(plan, watermark, stateful.is_some()).map_err(err)?;
        }
        let plan_schema = plan.schema();
        let batch = collect(plan, batch_ctx.task_ctx())
            .await
            .map_err(|e| err(e.to_string()))?;

        let emitted = match table {
            Some(t) => t.rows(),
            None if kafka_json => {
                let schema = Arc::new(plan_schema.as_ref().clone());
                kafka_sink_rows(name, &options, schema).map_err(err)?
            }
            None => {
                // A file sink: what a reader listing its directory sees.
                let schema = match batch.first() {
                    Some(b) => b.schema(),
                    None => Arc::new(plan_schema.as_ref().clone()),
                };
                let out = SessionContext::new();
                register_files(&out, "sink_output", &options, schema)
                    .await
                    .map_err(err)?;
                out.sql("SELECT * FROM sink_output")
                    .await
                    .map_err(|e| err(e.to_string()))?
                    .collect()
                    .await
                    .map_err(|e| err(e.to_string()))?
            }
        };
        // The columns that identify a row of an update-mode result: the
        // topmost aggregate's keys (or a top-1's partition keys).
        let upsert_keys: Option<Vec<String>> = match running.and_then(|q| q.result_keys()) {
            Some(keys) => Some(keys.to_vec()),
            None => stateful.map(|f| {
                f.schema().fields()[..f.key_count()]
                    .iter()
                    .map(|k| k.name().clone())
                    .collect()
            }),
        };
        let got = match (mode.as_str(), upsert_keys) {
            // A complete-mode memory table holds only the last result.
            ("complete", _) | ("append" | "update", None) => rows_of(&emitted)?,
            ("append", Some(_)) => rows_of(&emitted)?,
            ("update", Some(names)) => {
                let schema = match emitted.first() {
                    Some(b) => b.schema(),
                    None => return compare(rows_of(&batch)?, vec![]).map_err(err),
                };
                let keys = names
                    .iter()
                    .map(|k| {
                        schema.index_of(k).map_err(|_| {
                            err(format!(
                                "update mode: group key '{k}' is not an output column, so rows cannot be matched by key"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut last: Vec<(Vec<String>, Vec<String>)> = Vec::new();
                for row in rows_of(&emitted)? {
                    let key: Vec<String> = keys.iter().map(|&i| row[i].clone()).collect();
                    match last.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => slot.1 = row,
                        None => last.push((key, row)),
                    }
                }
                last.into_iter().map(|(_, r)| r).collect()
            }
            ("changelog", _) => apply_changelog(rows_of(&emitted)?).map_err(err)?,
            (other, _) => return Err(err(format!("unknown output mode {other}"))),
        };
        compare(rows_of(&batch)?, got).map_err(err)
    }

    /// The rows a query's sources counted late, from their `late_rows`
    /// tables, without the `_source`, `_query`, `_batch_id` and `_offsets` columns.
    fn late_rows_of(
        &self,
        query: &str,
        plan: &LogicalPlan,
        expected: u64,
    ) -> Result<Vec<Vec<RecordBatch>>, String> {
        let mut read = Vec::new();
        // Subqueries too: an EXISTS / IN over a stream is a join of it.
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                read.push(scan.table_name.table().to_string());
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut found = 0u64;
        for d in &self.definitions {
            let Statement::CreateSource(cs) = d else {
                continue;
            };
            let (true, Some(target)) = (read.contains(&cs.name), &cs.late_rows) else {
                continue;
            };
            let table = self
                .ctx
                .memory_tables()
                .into_iter()
                .find(|(n, _)| n == target)
                .map(|(_, t)| t)
                .ok_or_else(|| {
                    format!("late rows go to '{target}', which is not a memory table")
                })?;
            let mut group = Vec::new();
            // Every query reading the source writes there, each in the
            // shape of its own operator's input: read this query's rows as
            // it wrote them, and check that `_query` says so.
            for b in table.rows_of(query) {
                let theirs = b
                    .column_by_name("_query")
                    .and_then(|c| c.as_string_opt::<i32>())
                    .ok_or_else(|| format!("'{target}' has no _query column"))?
                    .iter()
                    .filter(|q| *q != Some(query))
                    .count();
                if theirs > 0 {
                    return Err(format!(
                        "'{target}' holds {theirs} rows of another query among those query '{query}' wrote"
                    ));
                }
                let keep = b.num_columns().saturating_sub(4);
                found += b.num_rows() as u64;
                if b.num_rows() > 0 {
                    group.push(
                        b.project(&(0..keep).collect::<Vec<_>>())
                            .map_err(|e| e.to_string())?,
                    );
                }
            }
            if !group.is_empty() {
                out.push(group);
            }
        }
        if found != expected {
            return Err(format!(
                "the query counted {expected} late rows but its sources' late_rows tables hold {found}; \
                 declare `late_rows = '<table>'` on the source so the check can leave them out"
            ));
        }
        Ok(out)
    }
}

/// Registers the files under a file source's or sink's `path` as table
/// `name`, read with its `format` and `schema`.
/// Every row a source offers now, read through a reader of its own (for
/// a Kafka source: every partition from where its options start).
async fn read_whole(
    src: &Arc<dyn sluice::Source>,
    dir: &std::path::Path,
) -> Result<Vec<RecordBatch>, String> {
    let _ = std::fs::remove_dir_all(dir);
    let mut reader = src
        .open(sluice::deps::sluice_connectors::SourceContext {
            dir: dir.to_path_buf(),
            durability: sluice::Durability::NoSync,
            clock: Arc::new(sluice::ManualClock::new(0)),
        })
        .map_err(|e| e.to_string())?;
    let mut start = reader.initial_offset();
    let mut rows = Vec::new();
    for _ in 0..10_000 {
        let end = reader
            .latest_offset(&start)
            .await
            .map_err(|e| e.to_string())?;
        if end == start {
            return Ok(rows);
        }
        rows.extend(
            reader
                .read(&start, &end)
                .await
                .map_err(|e| e.to_string())?
                .batches,
        );
        start = end;
    }
    Err(format!("source '{}' kept offering data", src.name()))
}

/// The rows a JSON Kafka sink wrote: the records of its topic that carry
/// its sink id, decoded back into the query's output schema.
fn kafka_sink_rows(
    name: &str,
    options: &sluice::deps::sluice_common::Options,
    schema: SchemaRef,
) -> Result<Vec<RecordBatch>, String> {
    use sluice::deps::sluice_connectors::decode::{Format, decode_records};
    use sluice::deps::sluice_connectors::kafka::consume_all;
    let servers = options
        .get("bootstrap.servers")
        .ok_or("no bootstrap.servers")?;
    let topic = options.get("topic").ok_or("no topic")?;
    let sink_id = options.get("sink_id").unwrap_or(name);
    let records = consume_all(servers, topic, std::time::Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let values: Vec<&[u8]> = records
        .iter()
        .filter(|r| r.header("sluice.sink") == Some(sink_id))
        .map(|r| r.value.as_deref().unwrap_or_default())
        .collect();
    let d = decode_records(&Format::Json, &schema, &values);
    if let Some((i, e)) = d.bad.first() {
        return Err(format!(
            "record {i} of topic '{topic}' does not decode: {e}"
        ));
    }
    Ok(d.batches)
}

async fn register_files(
    ctx: &SessionContext,
    name: &str,
    options: &sluice::deps::sluice_common::options::Options,
    schema: SchemaRef,
) -> Result<(), String> {
    use sluice::deps::datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions};
    let path = options.get("path").ok_or("no path")?;
    let path = format!("{}/", path.trim_end_matches('/'));
    let done = match options.get("format").unwrap_or_default() {
        "json" => {
            ctx.register_json(name, &path, JsonReadOptions::default().schema(&schema))
                .await
        }
        "parquet" => {
            ctx.register_parquet(name, &path, ParquetReadOptions::default().schema(&schema))
                .await
        }
        "csv" => {
            let header = options
                .get("header")
                .is_none_or(|h| h.eq_ignore_ascii_case("true"));
            let delimiter = options.get("delimiter").map_or(b',', |d| d.as_bytes()[0]);
            ctx.register_csv(
                name,
                &path,
                CsvReadOptions::new()
                    .schema(&schema)
                    .has_header(header)
                    .delimiter(delimiter),
            )
            .await
        }
        other => return Err(format!("files of format '{other}'")),
    };
    done.map_err(|e| e.to_string())
}

/// `plan` with `late` taken out of the input of the streaming operator
/// they were late for, as a multiset: each late row removes one equal input
/// row. Late rows are the first (bottom) stateful operator's, which in a
/// chain is not the topmost, and static aggregates may stand below it: the
/// first aggregate, window sort or join input (top down) that holds every
/// late row of a group is the one. Each group holds one stream's late rows
/// (a join's two sides have two).
async fn without_rows(
    mut plan: Arc<dyn ExecutionPlan>,
    late: Vec<Vec<RecordBatch>>,
    ctx: &SessionContext,
) -> Result<Arc<dyn ExecutionPlan>, String> {
    for group in late {
        plan = without_group(plan, &group, ctx).await?;
    }
    Ok(plan)
}

/// [`without_rows`] for one stream's late rows.
async fn without_group(
    plan: Arc<dyn ExecutionPlan>,
    late: &[RecordBatch],
    ctx: &SessionContext,
) -> Result<Arc<dyn ExecutionPlan>, String> {
    // (node, which of its children is the input the rows were late in).
    let mut targets: Vec<(Arc<dyn ExecutionPlan>, usize)> = Vec::new();
    plan.apply(|node| {
        let any: &dyn std::any::Any = node.as_ref();
        let first_stage = any.downcast_ref::<AggregateExec>().is_some_and(|agg| {
            matches!(
                agg.mode(),
                AggregateMode::Partial | AggregateMode::Single | AggregateMode::SinglePartitioned
            )
        });
        if first_stage {
            targets.push((Arc::clone(node), 0));
        }
        // A ROW_NUMBER() top-N's late rows are its window's input rows: the
        // sort under the window node reads them, and keeps them sorted.
        let window = any
            .is::<sluice::deps::datafusion::physical_plan::windows::BoundedWindowAggExec>()
            || any.is::<sluice::deps::datafusion::physical_plan::windows::WindowAggExec>();
        if let (true, [child]) = (window, node.children().as_slice()) {
            let sort: &dyn std::any::Any = child.as_ref();
            if sort.is::<sluice::deps::datafusion::physical_plan::sorts::sort::SortExec>() {
                targets.push((Arc::clone(child), 0));
            }
        }
        // A join's late rows are rows of one of its two inputs.
        if node.name().contains("Join") && node.children().len() == 2 {
            targets.push((Arc::clone(node), 0));
            targets.push((Arc::clone(node), 1));
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| e.to_string())?;
    let mut last = Err("rows were late but the batch plan has no aggregate or join".to_string());
    for (node, child) in targets {
        last = without_rows_below(Arc::clone(&plan), &node, child, late, ctx).await;
        if last.is_ok() {
            break;
        }
    }
    last
}

/// `plan` with `late` taken out of child `child` of its node `agg`.
async fn without_rows_below(
    plan: Arc<dyn ExecutionPlan>,
    agg: &Arc<dyn ExecutionPlan>,
    child: usize,
    late: &[RecordBatch],
    ctx: &SessionContext,
) -> Result<Arc<dyn ExecutionPlan>, String> {
    let input = Arc::clone(agg.children()[child]);
    let schema = input.schema();
    let rows = collect(Arc::clone(&input), ctx.task_ctx())
        .await
        .map_err(|e| e.to_string())?;

    let fields: Vec<SortField> = schema
        .fields()
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields).map_err(|e| e.to_string())?;
    let mut pending: HashMap<Vec<u8>, usize> = HashMap::new();
    for b in late {
        if b.num_columns() != schema.fields().len() {
            return Err(format!(
                "late rows have {} columns, the aggregate's input {}",
                b.num_columns(),
                schema.fields().len()
            ));
        }
        let cols = b
            .columns()
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| cast(c, f.data_type()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let converted = converter
            .convert_columns(&cols)
            .map_err(|e| e.to_string())?;
        for r in converted.iter() {
            *pending.entry(r.as_ref().to_vec()).or_default() += 1;
        }
    }
    let mut kept = Vec::new();
    for b in rows {
        let converted = converter
            .convert_columns(b.columns())
            .map_err(|e| e.to_string())?;
        let mask: BooleanArray = converted
            .iter()
            .map(|r| match pending.get_mut(r.as_ref()) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    Some(false)
                }
                _ => Some(true),
            })
            .collect();
        kept.push(filter_record_batch(&b, &mask).map_err(|e| e.to_string())?);
    }
    let left: usize = pending.values().sum();
    if left > 0 {
        return Err(format!(
            "{left} late rows are not rows of the batch query's aggregate input"
        ));
    }
    let source =
        MemorySourceConfig::try_new_exec(&[kept], schema, None).map_err(|e| e.to_string())?;
    let mut children: Vec<Arc<dyn ExecutionPlan>> = agg.children().into_iter().cloned().collect();
    children[child] = source;
    let new_agg =
        replace_children_if_necessary(Arc::clone(agg), children).map_err(|e| e.to_string())?;
    replace(plan, agg, &new_agg)
}

/// `plan` with the node `old` (by identity) replaced by `new`.
fn replace(
    plan: Arc<dyn ExecutionPlan>,
    old: &Arc<dyn ExecutionPlan>,
    new: &Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>, String> {
    if Arc::ptr_eq(&plan, old) {
        return Ok(Arc::clone(new));
    }
    let children: Vec<Arc<dyn ExecutionPlan>> = plan.children().into_iter().cloned().collect();
    if children.is_empty() {
        return Ok(plan);
    }
    let children = children
        .into_iter()
        .map(|c| replace(c, old, new))
        .collect::<Result<Vec<_>, _>>()?;
    replace_children_if_necessary(plan, children).map_err(|e| e.to_string())
}

/// `plan` keeping only the windows closed by `watermark`: a filter
/// `window_end <= watermark` on the output of its topmost aggregate, whose
/// group keys hold the window bounds, or of its topmost window node (a
/// `ROW_NUMBER()` top-N per window, emitted when the window closes). A
/// deduplication (an aggregate without functions, when the query has no
/// other aggregate) and a keep-first `ROW_NUMBER()` emit at once: nothing
/// to filter.
fn closed_windows(
    plan: Arc<dyn ExecutionPlan>,
    watermark: Option<i64>,
    has_aggregate: bool,
) -> Result<Arc<dyn ExecutionPlan>, String> {
    use sluice::deps::datafusion::common::ScalarValue;
    use sluice::deps::datafusion::logical_expr::Operator;
    use sluice::deps::datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
    use sluice::deps::datafusion::physical_plan::filter::FilterExec;

    let mut target = None;
    plan.apply(|node| {
        let any: &dyn std::any::Any = node.as_ref();
        let window = any
            .is::<sluice::deps::datafusion::physical_plan::windows::BoundedWindowAggExec>()
            || any.is::<sluice::deps::datafusion::physical_plan::windows::WindowAggExec>();
        if any.downcast_ref::<AggregateExec>().is_some() || window {
            target = Some((Arc::clone(node), window));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| e.to_string())?;
    let (agg, window) = match target {
        Some(t) => t,
        None if has_aggregate => {
            return Err("an append-mode aggregate, but the batch plan has no aggregate".into());
        }
        None => return Ok(plan),
    };
    let schema = agg.schema();
    let at = match schema.index_of("window_end") {
        Ok(at) => at,
        Err(_) if window || !has_aggregate => return Ok(plan),
        Err(_) => {
            return Err(
                "an append-mode aggregate without a window_end group key: the check cannot tell emitted windows from open ones"
                    .to_string(),
            );
        }
    };
    if !window && !has_aggregate {
        return Ok(plan);
    }
    let end_type = schema.field(at).data_type().clone();
    let bound = match watermark {
        Some(w) => ScalarValue::TimestampMillisecond(Some(w), None)
            .cast_to(&end_type)
            .map_err(|e| e.to_string())?,
        // No watermark yet: no window has closed; no real end is this early.
        None => ScalarValue::TimestampMillisecond(Some(i64::MIN / 1_000_000), None)
            .cast_to(&end_type)
            .map_err(|e| e.to_string())?,
    };
    let predicate = Arc::new(BinaryExpr::new(
        Arc::new(Column::new("window_end", at)),
        Operator::LtEq,
        Arc::new(Literal::new(bound)),
    ));
    let filtered: Arc<dyn ExecutionPlan> =
        Arc::new(FilterExec::try_new(predicate, Arc::clone(&agg)).map_err(|e| e.to_string())?);
    replace(plan, &agg, &filtered)
}

/// A changelog applied: +I/+U add a row, -U/-D remove an equal one.
fn apply_changelog(rows: Rows) -> Result<Rows, String> {
    let mut live: Rows = Vec::new();
    for row in rows {
        let (op, rest) = row.split_first().ok_or("an empty changelog row")?;
        match op.as_str() {
            "+I" | "+U" => live.push(rest.to_vec()),
            _ => {
                let at = live
                    .iter()
                    .position(|r| r == rest)
                    .ok_or_else(|| format!("{op} of a row never inserted: {rest:?}"))?;
                live.remove(at);
            }
        }
    }
    Ok(live)
}

/// Equal as multisets, or an error listing (a few of) the differences.
fn compare(mut expected: Rows, mut got: Rows) -> Result<(), String> {
    expected.sort();
    got.sort();
    if got == expected {
        return Ok(());
    }
    let (mut missing, mut extra) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < expected.len() || j < got.len() {
        match (expected.get(i), got.get(j)) {
            (Some(e), Some(g)) if e == g => {
                i += 1;
                j += 1;
            }
            (Some(e), Some(g)) if e < g => {
                missing.push(e);
                i += 1;
            }
            (Some(e), None) => {
                missing.push(e);
                i += 1;
            }
            (_, Some(g)) => {
                extra.push(g);
                j += 1;
            }
            (None, None) => break,
        }
    }
    missing.truncate(5);
    extra.truncate(5);
    Err(format!(
        "streaming gave {} rows, batch {}; missing from streaming: {missing:?}; not in batch: {extra:?}",
        got.len(),
        expected.len()
    ))
}

#[cfg(test)]
mod tests {
    use sqllogictest::AsyncDB;

    use super::*;

    async fn db_with_windowed_query(dir: &std::path::Path) -> SluiceDb {
        let mut db = SluiceDb::new(dir);
        for sql in [
            "CREATE SOURCE t (k VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'memory', late_rows = 'late_t')",
            "CREATE SINK app WITH (connector = 'memory', output_mode = 'append') AS SELECT window_start, window_end, k, count(*) AS n FROM TUMBLE(t, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k",
            "INSERT INTO t VALUES ('a', '1970-01-01T00:00:01'), ('a', '1970-01-01T00:00:04'), ('b', '1970-01-01T00:00:21')",
            "RUN ALL",
            // a@3 is late: [0,10) closed at 16.
            "INSERT INTO t VALUES ('a', '1970-01-01T00:00:03'), ('b', '1970-01-01T00:00:40')",
            "RUN ALL",
        ] {
            db.run(sql).await.expect(sql);
        }
        db
    }

    #[tokio::test]
    async fn the_check_passes_on_the_engine_output_and_fails_on_a_tampered_sink() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_windowed_query(dir.path()).await;
        db.check_all(&[]).await.expect("the engine's own output");

        // A row emitted twice is caught.
        let table = db.ctx.memory_table("app").unwrap();
        let first = table.rows()[0].slice(0, 1);
        table.put(99, vec![first]);
        let e = db.check_against_batch("app", None).await.unwrap_err();
        assert!(e.0.contains("not in batch: [["), "{e}");
    }

    #[tokio::test]
    async fn the_check_fails_when_a_late_row_was_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_windowed_query(dir.path()).await;
        let late = db.ctx.memory_table("late_t").unwrap();
        assert_eq!(late.rows().iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        for id in late.batch_ids() {
            late.put_scoped("app", id, vec![]);
        }
        let e = db.check_against_batch("app", None).await.unwrap_err();
        assert!(e.0.contains("counted 1 late rows"), "{e}");
    }

    #[tokio::test]
    async fn a_lost_window_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_windowed_query(dir.path()).await;
        let table = db.ctx.memory_table("app").unwrap();
        for id in table.batch_ids() {
            table.put(id, vec![]);
        }
        let e = db.check_against_batch("app", None).await.unwrap_err();
        assert!(e.0.contains("missing from streaming: [["), "{e}");
    }
}
