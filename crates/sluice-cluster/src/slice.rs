//! One partition of a plan, as a plan of one partition.

use std::fmt;
use std::sync::Arc;

use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};

/// Partition `k` of its child, as a plan with one partition: how a
/// partitioned operator's task reads only its own share of the input.
/// Built on an executor for one task, never sent.
#[derive(Debug)]
pub struct PartitionSliceExec {
    input: Arc<dyn ExecutionPlan>,
    k: usize,
    properties: Arc<PlanProperties>,
}

impl PartitionSliceExec {
    /// Partition `k` of `input`.
    pub fn new(input: Arc<dyn ExecutionPlan>, k: usize) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(input.schema()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        PartitionSliceExec {
            input,
            k,
            properties,
        }
    }
}

impl DisplayAs for PartitionSliceExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PartitionSliceExec: partition={}", self.k)
    }
}

impl ExecutionPlan for PartitionSliceExec {
    fn name(&self) -> &str {
        "PartitionSliceExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_expr::PhysicalExpr>,
        ) -> datafusion::common::Result<
            datafusion::common::tree_node::TreeNodeRecursion,
        >,
    ) -> datafusion::common::Result<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(datafusion::error::DataFusionError::Internal(
                "PartitionSliceExec takes one child".into(),
            ));
        }
        Ok(Arc::new(Self::new(children.swap_remove(0), self.k)))
    }

    fn execute(
        &self,
        partition: usize,
        ctx: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(datafusion::error::DataFusionError::Internal(format!(
                "PartitionSliceExec has one partition, asked for {partition}"
            )));
        }
        self.input.execute(self.k, ctx)
    }
}
