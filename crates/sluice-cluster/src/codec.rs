//! The codec for Sluice's plan nodes, around Ballista's.
//!
//! DataFusion's serialization (datafusion-proto) knows DataFusion's nodes,
//! Ballista's codec its shuffle and stage nodes; [`SluiceCodec`] adds
//! Sluice's. A Sluice node is written as `SLUICE/1`, a kind byte, a JSON
//! header (ids, options, the batch) and, for an aggregate, DataFusion's
//! aggregate it was made from over an empty input, in DataFusion's own
//! encoding. Anything else goes to Ballista's codec unchanged.

use std::sync::Arc;

use ballista_core::serde::BallistaPhysicalExtensionCodec;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion_proto::physical_plan::{
    AsExecutionPlan, DefaultPhysicalExtensionCodec, PhysicalExtensionCodec,
    PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf::PhysicalPlanNode;
use serde::{Deserialize, Serialize};
use sluice_common::OutputMode;
use sluice_common::durable::Durability;
use sluice_exec::operators::{BatchContext, StatefulExec, StreamingAggregateExec};

use crate::stateful::{PartitionedAggregateExec, StateJob};

const MAGIC: &[u8] = b"SLUICE/1";
const AGGREGATE: u8 = 1;

/// Ballista's codec, and Sluice's nodes.
#[derive(Debug, Default)]
pub struct SluiceCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

/// What a [`PartitionedAggregateExec`] is besides DataFusion's aggregate.
#[derive(Debug, Serialize, Deserialize)]
struct AggregateHeader {
    id: String,
    emit: String,
    ttl_ms: Option<u64>,
    checkpoint: String,
    fsync: bool,
    batch_id: u64,
    now_ms: i64,
    watermark_start: Option<i64>,
    watermark_end: Option<i64>,
    input_rows: u64,
}

fn bad(what: impl Into<String>) -> DataFusionError {
    DataFusionError::Internal(format!("decoding a Sluice plan node: {}", what.into()))
}

impl SluiceCodec {
    fn encode_aggregate(&self, node: &PartitionedAggregateExec, buf: &mut Vec<u8>) -> Result<()> {
        let agg = node.aggregate();
        let job = node.job();
        let input_schema = agg.children()[0].schema();
        let shell = agg
            .top_over(Arc::new(EmptyExec::new(input_schema)))
            .map_err(DataFusionError::from)?;
        let shell =
            PhysicalPlanNode::try_from_physical_plan(shell, &DefaultPhysicalExtensionCodec {})?;
        let mut shell_bytes = Vec::new();
        shell.try_encode(&mut shell_bytes)?;
        let header = AggregateHeader {
            id: agg.operator_id().to_string(),
            emit: agg.emit_mode().to_string(),
            ttl_ms: agg.ttl().map(|d| d.as_millis() as u64),
            checkpoint: job.checkpoint.display().to_string(),
            fsync: job.durability == Durability::Fsync,
            batch_id: job.batch.batch_id,
            now_ms: job.batch.now_ms,
            watermark_start: job.batch.watermark_start,
            watermark_end: job.batch.watermark_end,
            input_rows: job.batch.input_rows,
        };
        let header =
            serde_json::to_vec(&header).map_err(|e| DataFusionError::External(e.into()))?;
        buf.extend_from_slice(MAGIC);
        buf.push(AGGREGATE);
        buf.extend_from_slice(&(header.len() as u32).to_le_bytes());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(&shell_bytes);
        Ok(())
    }

    fn decode_aggregate(
        &self,
        body: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let [input, ids] = inputs else {
            return Err(bad(format!("an aggregate with {} inputs", inputs.len())));
        };
        let len = body
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("a truncated aggregate"))?;
        let header = body
            .get(4..4 + len)
            .ok_or_else(|| bad("a truncated aggregate header"))?;
        let header: AggregateHeader =
            serde_json::from_slice(header).map_err(|e| bad(format!("its header: {e}")))?;
        let shell = PhysicalPlanNode::try_decode(&body[4 + len..])?
            .try_into_physical_plan(ctx, &DefaultPhysicalExtensionCodec {})?;
        // The empty input the aggregate was sent over becomes its input.
        let top = shell
            .transform_up(|p| {
                let any: &dyn std::any::Any = p.as_ref();
                if any.is::<EmptyExec>() {
                    return Ok(Transformed::yes(Arc::clone(input)));
                }
                Ok(Transformed::no(p))
            })?
            .data;
        let emit: OutputMode = header
            .emit
            .parse()
            .map_err(|e| bad(format!("its output mode: {e}")))?;
        let ttl = header.ttl_ms.map(std::time::Duration::from_millis);
        let agg = StreamingAggregateExec::try_new(header.id, top, ttl)
            .and_then(|a| a.with_emit(emit))
            .map_err(DataFusionError::from)?;
        let job = StateJob {
            checkpoint: header.checkpoint.into(),
            durability: if header.fsync {
                Durability::Fsync
            } else {
                Durability::NoSync
            },
            batch: BatchContext {
                batch_id: header.batch_id,
                now_ms: header.now_ms,
                watermark_start: header.watermark_start,
                watermark_end: header.watermark_end,
                input_rows: header.input_rows,
            },
        };
        Ok(Arc::new(
            PartitionedAggregateExec::new(agg, Arc::clone(ids), job)
                .map_err(DataFusionError::from)?,
        ))
    }
}

impl PhysicalExtensionCodec for SluiceCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match buf.strip_prefix(MAGIC) {
            Some([AGGREGATE, body @ ..]) => self.decode_aggregate(body, inputs, ctx),
            Some(_) => Err(bad("an unknown kind of node (a newer Sluice?)")),
            None => self.ballista.try_decode(buf, inputs, ctx, proto_converter),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let any: &dyn std::any::Any = node.as_ref();
        if let Some(agg) = any.downcast_ref::<PartitionedAggregateExec>() {
            return self.encode_aggregate(agg, buf);
        }
        self.ballista.try_encode(node, buf, proto_converter)
    }
}
