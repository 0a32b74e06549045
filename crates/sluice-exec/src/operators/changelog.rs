//! Changelog output: `_op` = `+I`, `-U`, `+U`, `-D` for downstream systems
//! that apply changes.
//!
//! The topmost stateful node emits its changes with two trailing columns:
//! the operation and a sequence number that the two rows of one update
//! share. The stateless plan above it (projections, filters) is rebuilt to
//! carry both columns ([`carry_to_root`]); at the root, [`ChangelogExec`]
//! looks at what is left of each change: a filter may have dropped half of
//! an update, and then the old row alone is a `-D` (the row left the
//! result) and the new row alone a `+I` (it entered it). So applying the
//! changelog always gives the batch query's result.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, RecordBatch, StringArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, collect,
};
use sluice_common::{Error, Result};

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_plan::expressions::{CaseExpr, Literal};
use sluice_common::OutputMode;
use sluice_planner::SIGN_PLACEHOLDER;

use super::{StreamingAggregateExec, TopNExec, as_stateful, stateful_nodes};

/// The operation column of a changelog.
pub const OP: &str = "_op";
/// The column that pairs the two rows of one update inside the plan.
pub const SEQ: &str = "__sluice_change_seq";

/// `schema` with the change columns (operation, pair) after its own.
pub fn with_change_fields(schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(OP, DataType::Utf8, false)));
    fields.push(Arc::new(Field::new(SEQ, DataType::UInt64, false)));
    Arc::new(Schema::new(fields))
}

/// `schema` with the changelog's `_op` column first: what a changelog sink
/// receives.
pub fn with_op_field(schema: &SchemaRef) -> SchemaRef {
    let mut fields = vec![Arc::new(Field::new(OP, DataType::Utf8, false))];
    fields.extend(schema.fields().iter().cloned());
    Arc::new(Schema::new(fields))
}

/// Rebuilds the stateless plan between the root and the topmost stateful
/// node (which emits changes) so that it carries the two change columns,
/// and puts a [`ChangelogExec`] on top.
pub fn carry_to_root(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let carried = carry(plan)?;
    Ok(Arc::new(ChangelogExec::new(carried)))
}

fn carry(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    carry_with(plan, &|node| Ok(node))
}

/// Makes every aggregate or top-N that feeds an updating edge (a
/// projection with the sign placeholder above it, see
/// `sluice_planner::retract`) emit its changes, and puts each change's sign in the placeholder's place: −1 for
/// an old value (`-U`, `-D`), +1 for a new one.
pub fn sign_edges(plan: Arc<dyn ExecutionPlan>) -> Result<(Arc<dyn ExecutionPlan>, usize)> {
    let mut failure: Option<Error> = None;
    let mut signed = 0;
    let out = plan
        .transform_up(|node| {
            let any: &dyn std::any::Any = node.as_ref();
            let Some(p) = any.downcast_ref::<ProjectionExec>() else {
                return Ok(Transformed::no(node));
            };
            if failure.is_some() || !p.expr().iter().any(|e| is_sign_placeholder(&e.expr)) {
                return Ok(Transformed::no(node));
            }
            match signed_projection(p) {
                Ok(plan) => {
                    signed += 1;
                    Ok(Transformed::yes(plan))
                }
                Err(e) => {
                    failure = Some(e);
                    Ok(Transformed::no(node))
                }
            }
        })
        .map_err(Error::from)?;
    match failure {
        Some(e) => Err(e),
        None => Ok((out.data, signed)),
    }
}

fn is_sign_placeholder(e: &Arc<dyn PhysicalExpr>) -> bool {
    let any: &dyn std::any::Any = e.as_ref();
    any.downcast_ref::<ScalarFunctionExpr>()
        .is_some_and(|f| f.name() == SIGN_PLACEHOLDER)
}

/// The projection `p` over its input carrying changes, the placeholder
/// replaced by `CASE _op WHEN '-U' THEN -1 WHEN '-D' THEN -1 ELSE 1 END`.
fn signed_projection(p: &ProjectionExec) -> Result<Arc<dyn ExecutionPlan>> {
    let input = carry_with(Arc::clone(p.input()), &|node| {
        let any: &dyn std::any::Any = node.as_ref();
        if let Some(agg) = any.downcast_ref::<StreamingAggregateExec>() {
            return Ok(Arc::new(agg.with_emit(OutputMode::Changelog)?));
        }
        match any.downcast_ref::<TopNExec>() {
            Some(topn) => Ok(Arc::new(topn.with_emit(OutputMode::Changelog))),
            None => Err(Error::not_supported(format!(
                "an operator over the changes of {}: only an aggregate's and a top-N's changes can be undone",
                node.name()
            ))),
        }
    })?;
    let n = input.schema().fields().len();
    let text = |s: &str| -> Arc<dyn PhysicalExpr> {
        Arc::new(Literal::new(ScalarValue::Utf8(Some(s.to_string()))))
    };
    let int =
        |v: i64| -> Arc<dyn PhysicalExpr> { Arc::new(Literal::new(ScalarValue::Int64(Some(v)))) };
    let sign: Arc<dyn PhysicalExpr> = Arc::new(CaseExpr::try_new(
        Some(Arc::new(Column::new(OP, n - 2))),
        vec![(text("-U"), int(-1)), (text("-D"), int(-1))],
        Some(int(1)),
    )?);
    let exprs: Vec<ProjectionExpr> = p
        .expr()
        .iter()
        .map(|e| {
            if is_sign_placeholder(&e.expr) {
                ProjectionExpr::new(Arc::clone(&sign), e.alias.clone())
            } else {
                e.clone()
            }
        })
        .collect();
    Ok(Arc::new(ProjectionExec::try_new(exprs, input)?))
}

/// `plan` rebuilt to carry the change columns up from the stateful node
/// under it, which `leaf` makes emit them.
fn carry_with(
    plan: Arc<dyn ExecutionPlan>,
    leaf: &dyn Fn(Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    if as_stateful(&plan).is_some() {
        return leaf(plan);
    }
    let children = plan.children();
    let [child] = children.as_slice() else {
        return Err(Error::not_supported(format!(
            "output mode changelog with {} above the stateful operator; use update mode, or combine the streams downstream",
            plan.name()
        )));
    };
    if stateful_nodes(child).is_empty() {
        return Err(Error::internal(
            "changelog: no stateful operator under the plan's root",
        ));
    }
    let child = carry_with(Arc::clone(child), leaf)?;
    let n = child.schema().fields().len();
    let any: &dyn std::any::Any = plan.as_ref();
    let change_columns = || {
        [
            ProjectionExpr::new(Arc::new(Column::new(OP, n - 2)), OP),
            ProjectionExpr::new(Arc::new(Column::new(SEQ, n - 1)), SEQ),
        ]
    };
    if let Some(p) = any.downcast_ref::<ProjectionExec>() {
        let exprs: Vec<ProjectionExpr> = p.expr().iter().cloned().chain(change_columns()).collect();
        return Ok(Arc::new(ProjectionExec::try_new(exprs, child)?));
    }
    if let Some(f) = any.downcast_ref::<FilterExec>() {
        let projection = f
            .projection()
            .as_ref()
            .map(|p| p.iter().copied().chain([n - 2, n - 1]).collect::<Vec<_>>());
        let filter = FilterExecBuilder::new(Arc::clone(f.predicate()), child)
            .with_default_selectivity(f.default_selectivity())
            .apply_projection(projection)?
            .build()?;
        return Ok(Arc::new(filter));
    }
    let passes_columns = any.is::<CoalescePartitionsExec>() || any.is::<RepartitionExec>();
    if passes_columns {
        #[allow(deprecated)]
        return Ok(plan.with_new_children(vec![child])?);
    }
    Err(Error::not_supported(format!(
        "output mode changelog with {} above the stateful operator; use update mode, or filter and project only",
        plan.name()
    )))
}

/// The root of a changelog plan: `_op` first, each change whole.
#[derive(Debug)]
pub struct ChangelogExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl ChangelogExec {
    /// The root over `input`, whose last two columns are the change columns.
    pub fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        let schema = input.schema();
        let n = schema.fields().len();
        let values = Arc::new(Schema::new(schema.fields()[..n - 2].to_vec()));
        let properties = super::node_properties(with_op_field(&values));
        ChangelogExec { input, properties }
    }
}

/// The changes of `rows` (values, operation, pair) as a sink gets them:
/// `_op` first, a lone old row of an update as `-D`, a lone new one as `+I`.
fn normalize(rows: &RecordBatch, out: &SchemaRef) -> Result<RecordBatch> {
    let n = rows.num_columns();
    let ops = rows.column(n - 2).as_string::<i32>();
    let seqs = rows.column(n - 1).as_primitive::<UInt64Type>();
    // Per pair: (an old row is there, a new row is there).
    let mut halves: HashMap<u64, (bool, bool)> = HashMap::new();
    for i in 0..rows.num_rows() {
        let h = halves.entry(seqs.value(i)).or_default();
        match ops.value(i) {
            "-U" => h.0 = true,
            "+U" => h.1 = true,
            _ => {}
        }
    }
    let new_ops: StringArray = (0..rows.num_rows())
        .map(|i| {
            let (old, new) = halves[&seqs.value(i)];
            Some(match ops.value(i) {
                "-U" if !new => "-D",
                "+U" if !old => "+I",
                op => op,
            })
        })
        .collect();
    let mut cols: Vec<ArrayRef> = vec![Arc::new(new_ops)];
    cols.extend(rows.columns()[..n - 2].iter().cloned());
    Ok(RecordBatch::try_new(Arc::clone(out), cols)?)
}

impl DisplayAs for ChangelogExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "ChangelogExec: _op first; an update whose other half a filter dropped becomes -D / +I"
        )
    }
}

impl ExecutionPlan for ChangelogExec {
    fn name(&self) -> &str {
        "ChangelogExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::common::Result<TreeNodeRecursion>,
    ) -> datafusion::common::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(ChangelogExec::new(children.swap_remove(0))))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        let input = Arc::clone(&self.input);
        let out = self.schema();
        let schema = Arc::clone(&out);
        super::run_once("ChangelogExec", partition, out, async move {
            let in_schema = input.schema();
            let batches = collect(input, context).await?;
            let all = concat_batches(&in_schema, &batches)?;
            if all.num_rows() == 0 {
                return Ok(vec![]);
            }
            Ok(vec![normalize(&all, &schema)?])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, UInt64Array};

    #[test]
    fn a_lone_half_of_an_update_is_a_delete_or_an_insert() {
        let values = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let with = with_change_fields(&values);
        let rows = RecordBatch::try_new(
            with,
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5])),
                Arc::new(StringArray::from(vec!["-U", "+U", "-U", "+U", "+I"])),
                Arc::new(UInt64Array::from(vec![7, 7, 8, 9, 10])),
            ],
        )
        .unwrap();
        let out = normalize(&rows, &with_op_field(&values)).unwrap();
        let ops: Vec<&str> = out.column(0).as_string::<i32>().iter().flatten().collect();
        assert_eq!(ops, ["-U", "+U", "-D", "+I", "+I"]);
        assert_eq!(out.num_columns(), 2);
        assert_eq!(out.column(1).len(), 5);
    }
}
