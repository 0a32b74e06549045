//! `SELECT * FROM state('<query>') [VERSION AS OF <batch id>]`: a query's
//! state as a table, read from its checkpoint.
//!
//! For a query started in this context the rows are the group keys and the
//! current aggregate values (the stored states finalized with the query's own
//! aggregate functions). For a query that is not running here — found under
//! the context's checkpoint root — they are the keys and the raw accumulator
//! states (e.g. `avg(x)[sum]`, `avg(x)[count]`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::{ExecutionPlan, collect};
use sluice_common::{Error, Result};
use sluice_exec::StateFinalizer;
use sluice_state::checkpoint::last_committed;
use sluice_state::store::read_state;

/// What the context knows of a started query's state.
#[derive(Debug, Clone)]
pub(crate) struct QueryState {
    pub checkpoint: PathBuf,
    pub finalizer: Option<StateFinalizer>,
}

/// The `state(...)` table function.
#[derive(Debug)]
pub(crate) struct StateFunction {
    pub queries: Arc<Mutex<BTreeMap<String, QueryState>>>,
    pub checkpoint_root: Arc<Mutex<Option<PathBuf>>>,
}

fn arg_err(msg: String) -> DataFusionError {
    DataFusionError::from(Error::plan(msg))
}

impl TableFunctionImpl for StateFunction {
    fn call_with_args(
        &self,
        args: TableFunctionArgs,
    ) -> datafusion::common::Result<Arc<dyn TableProvider>> {
        let usage = "state('<query>') or state('<query>') VERSION AS OF <batch id>";
        let name = match args.exprs().first() {
            Some(Expr::Literal(ScalarValue::Utf8(Some(s)), _)) => s.clone(),
            _ => return Err(arg_err(format!("state() takes a query name: {usage}"))),
        };
        let version = match args.exprs().get(1) {
            None => None,
            Some(Expr::Literal(v, _)) => Some(v.to_string().parse::<u64>().map_err(|_| {
                arg_err(format!(
                    "state('{name}'): VERSION AS OF takes a batch id, got {v}"
                ))
            })?),
            Some(other) => {
                return Err(arg_err(format!(
                    "state('{name}'): VERSION AS OF takes a batch id, got {other}"
                )));
            }
        };
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(arg_err(format!("state('{name}'): not a query name")));
        }
        let known = self
            .queries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .cloned();
        let query = match known {
            Some(q) => q,
            None => {
                let root = self
                    .checkpoint_root
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                // A root in a bucket is read from a local copy of it.
                let dir = root
                    .map(|r| {
                        let dir = sluice_common::remote::local_dir_unsynced(&r.join(&name))?;
                        // Current as of now, not as of the first read.
                        sluice_common::remote::sync(&dir)?;
                        Ok::<_, Error>(dir)
                    })
                    .transpose()
                    .map_err(DataFusionError::from)?;
                let dir = dir.filter(|d| d.join("metadata").exists()).ok_or_else(|| {
                    arg_err(format!("state('{name}'): no query named '{name}' was started here or checkpointed under the checkpoint root"))
                })?;
                QueryState {
                    checkpoint: dir,
                    finalizer: None,
                }
            }
        };
        let batch = load(&name, &query, version).map_err(DataFusionError::from)?;
        Ok(Arc::new(StateTable {
            batch,
            finalizer: query.finalizer,
        }))
    }
}

/// The stored rows of a query's first aggregate (`state/aggregate`) as of
/// batch `version`, and how many of their columns are the key; `None` when
/// the query keeps no such state. A cluster's state, split into partition
/// directories `p<k>`, is read partition by partition, in order.
pub fn read_aggregate_state(
    checkpoint: &Path,
    version: u64,
) -> Result<Option<(RecordBatch, usize)>> {
    let dir = checkpoint.join("state").join("aggregate");
    if dir.join("meta").exists() {
        return read_state(&dir, version).map(Some);
    }
    if !dir
        .join(sluice_exec::execution::CLUSTER_STATE_MARK)
        .exists()
    {
        return Ok(None);
    }
    // Every partition the operator was split into: one missing is an
    // error, not a smaller state.
    let mark = dir.join(sluice_exec::execution::CLUSTER_STATE_MARK);
    let record: serde_json::Value = sluice_common::durable::read_json(&mark)?;
    let n = record
        .get("partitions")
        .and_then(serde_json::Value::as_u64)
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::checkpoint(&mark, "no partition count"))?;
    let parts: Vec<(usize, PathBuf)> = (0..n as usize)
        .map(|k| (k, dir.join(format!("p{k}"))))
        .collect();
    let mut batches = Vec::with_capacity(parts.len());
    let mut keys = 0;
    for (_, part) in parts {
        let (batch, k) = read_state(&part, version)?;
        keys = k;
        batches.push(batch);
    }
    let Some(first) = batches.first() else {
        return Ok(None);
    };
    let schema = first.schema();
    let all = datafusion::arrow::compute::concat_batches(&schema, &batches)?;
    Ok(Some((all, keys)))
}

fn load(name: &str, query: &QueryState, version: Option<u64>) -> Result<RecordBatch> {
    let has_state = {
        let dir = query.checkpoint.join("state").join("aggregate");
        dir.join("meta").exists()
            || dir
                .join(sluice_exec::execution::CLUSTER_STATE_MARK)
                .exists()
    };
    if !has_state {
        let others = other_operators(&query.checkpoint);
        return Err(Error::plan(if others.is_empty() {
            format!("state('{name}'): the query keeps no state (it is stateless)")
        } else {
            format!(
                "state('{name}'): the query's state is kept by {} (under state/), and state() reads only a first aggregate's (state/aggregate) for now",
                others.join(", ")
            )
        }));
    }
    let last = last_committed(&query.checkpoint)?;
    let version = match (version, last) {
        (_, None) => {
            return Err(Error::plan(format!(
                "state('{name}'): no batch has committed yet"
            )));
        }
        (None, Some(l)) => l,
        (Some(v), Some(l)) if v > l => {
            return Err(Error::plan(format!(
                "state('{name}') VERSION AS OF {v}: batch {v} has not committed (the last committed batch is {l})"
            )));
        }
        (Some(v), Some(_)) => v,
    };
    read_aggregate_state(&query.checkpoint, version)?
        .map(|(batch, _)| batch)
        .ok_or_else(|| {
            Error::plan(format!(
                "state('{name}'): the first aggregate's state holds no partition yet"
            ))
        })
}

/// The operators with state under a query's checkpoint (`state/<id>/meta`,
/// or `state/<id>/partitions` on a cluster) other than the first
/// aggregate, by id.
pub fn other_operators(checkpoint: &std::path::Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(checkpoint.join("state"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let p = e.path();
                    p.join("meta").exists()
                        || p.join(sluice_exec::execution::CLUSTER_STATE_MARK).exists()
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|id| id != "aggregate")
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids.iter().map(|id| format!("operator '{id}'")).collect()
}

#[derive(Debug)]
struct StateTable {
    batch: RecordBatch,
    finalizer: Option<StateFinalizer>,
}

#[async_trait]
impl TableProvider for StateTable {
    fn schema(&self) -> SchemaRef {
        match &self.finalizer {
            Some(f) => f.schema(),
            None => self.batch.schema(),
        }
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let rows = match &self.finalizer {
            Some(f) => {
                collect(
                    f.plan(self.batch.clone()).map_err(DataFusionError::from)?,
                    state.task_ctx(),
                )
                .await?
            }
            None => vec![self.batch.clone()],
        };
        Ok(MemorySourceConfig::try_new_exec(
            &[rows],
            self.schema(),
            projection.cloned(),
        )?)
    }
}
