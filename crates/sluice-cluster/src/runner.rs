//! Running each micro-batch's plan as one Ballista job.

use std::collections::HashMap;
use std::sync::Arc;

use ballista_core::execution_plans::execute_physical_plan;
use ballista_core::extension::SessionConfigExt;
use datafusion::arrow::array::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::{ExecutionPlan, collect_partitioned};
use datafusion_proto::physical_plan::AsExecutionPlan;
use datafusion_proto::protobuf::PhysicalPlanNode;
use futures::TryStreamExt;
use futures::future::BoxFuture;
use sluice_common::{Error, Result};
use sluice_exec::PlanRunner;
use sluice_exec::operators::{BatchContext, stateful_nodes};
use sluice_planner::is_stream_scan;

use crate::session::{physical_codec, session_config};

/// Runs each batch's plan on a Ballista cluster, as one job submitted to
/// its scheduler.
///
/// The driver (the query's executor in this process) reads the sources as
/// in one process and puts each stream scan's rows for the batch into the
/// plan as an in-memory scan; the cluster runs the rest, shuffling at its
/// hash repartitions, and the driver collects the job's rows for the sinks.
/// Stateful operators are not run on a cluster yet: a query with one is
/// refused when it starts.
#[derive(Debug, Clone)]
pub struct ClusterRunner {
    url: String,
    session_id: String,
}

impl ClusterRunner {
    /// A runner for the scheduler at `scheduler` (`host:port`).
    pub fn new(scheduler: &str) -> Self {
        let url = if scheduler.contains("://") {
            scheduler.to_string()
        } else {
            format!("http://{scheduler}")
        };
        ClusterRunner {
            url,
            session_id: format!("sluice-{}", uuid::Uuid::new_v4()),
        }
    }

    /// The scheduler's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// `plan` with every stream scan replaced by an in-memory scan of the rows
/// it yields now (the batch's rows, in as many partitions as the scan
/// had): a plan whose every node the cluster can decode and run.
async fn detach(
    plan: Arc<dyn ExecutionPlan>,
    ctx: Arc<TaskContext>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let mut scans: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
    plan.apply(|p| {
        if is_stream_scan(p.as_ref()) {
            scans.push(Arc::clone(p));
            return Ok(TreeNodeRecursion::Jump);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(Error::from)?;
    let mut rows: HashMap<usize, Vec<Vec<RecordBatch>>> = HashMap::new();
    for scan in scans {
        let key = Arc::as_ptr(&scan) as *const () as usize;
        if rows.contains_key(&key) {
            continue;
        }
        let parts = collect_partitioned(scan, Arc::clone(&ctx))
            .await
            .map_err(Error::from)?;
        rows.insert(key, parts);
    }
    let detached = plan
        .transform_up(|p| {
            let key = Arc::as_ptr(&p) as *const () as usize;
            match rows.get(&key) {
                Some(parts) => {
                    let scan = MemorySourceConfig::try_new_exec(parts, p.schema(), None)?;
                    Ok(Transformed::yes(scan as Arc<dyn ExecutionPlan>))
                }
                None => Ok(Transformed::no(p)),
            }
        })
        .map_err(Error::from)?;
    Ok(detached.data)
}

/// Encodes `plan` as the scheduler will receive it, naming the node that
/// cannot be.
fn encode(plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
    let codec = physical_codec();
    PhysicalPlanNode::try_from_physical_plan(Arc::clone(plan), codec.as_ref())
        .map(|_| ())
        .map_err(|e| Error::not_supported(format!("the plan cannot be sent to a cluster: {e}")))
}

impl PlanRunner for ClusterRunner {
    fn describe(&self) -> String {
        format!("ballista at {}", self.url)
    }

    fn check(&self, plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
        if let Some(op) = stateful_nodes(plan).first() {
            return Err(Error::not_supported(format!(
                "stateful operator '{}' ({}) does not run on a cluster yet: run the query in one process (without --cluster)",
                op.operator_id(),
                op.description()
            )));
        }
        // The plan as a batch sends it, with no rows in its scans.
        let empty = plan
            .clone()
            .transform_up(|p| {
                if is_stream_scan(p.as_ref()) {
                    let scan = MemorySourceConfig::try_new_exec(&[vec![]], p.schema(), None)?;
                    return Ok(Transformed::yes(scan as Arc<dyn ExecutionPlan>));
                }
                Ok(Transformed::no(p))
            })
            .map_err(Error::from)?
            .data;
        encode(&empty)
    }

    fn run(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        ctx: Arc<TaskContext>,
        _batch: BatchContext,
    ) -> BoxFuture<'_, Result<Vec<RecordBatch>>> {
        Box::pin(async move {
            let plan = detach(plan, ctx).await?;
            let config = session_config();
            let codec = physical_codec();
            let stream = execute_physical_plan::<PhysicalPlanNode>(
                self.url.clone(),
                &config.ballista_config(),
                plan,
                codec.as_ref(),
                self.session_id.clone(),
                config,
            )
            .await
            .map_err(Error::from)?;
            stream.try_collect().await.map_err(Error::from)
        })
    }
}
