//! `SELECT * FROM state('<query>') [VERSION AS OF <batch id>]`: a query's
//! state as a table, read from its checkpoint.
//!
//! For a query started in this context the rows are the group keys and the
//! current aggregate values (the stored states finalized with the query's own
//! aggregate functions). For a query that is not running here — found under
//! the context's checkpoint root — they are the keys and the raw accumulator
//! states (e.g. `avg(x)[sum]`, `avg(x)[count]`).

use std::collections::BTreeMap;
use std::path::PathBuf;
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

fn load(name: &str, query: &QueryState, version: Option<u64>) -> Result<RecordBatch> {
    let state_dir = query.checkpoint.join("state").join("aggregate");
    if !state_dir.join("meta").exists() {
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
    Ok(read_state(&state_dir, version)?.0)
}

/// The operators with state under a query's checkpoint (`state/<id>/meta`)
/// other than the first aggregate, by id.
pub fn other_operators(checkpoint: &std::path::Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(checkpoint.join("state"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("meta").exists())
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
