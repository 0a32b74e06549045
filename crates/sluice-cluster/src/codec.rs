//! The codec for Sluice's plan nodes, around Ballista's.
//!
//! DataFusion's serialization (datafusion-proto) knows DataFusion's nodes,
//! Ballista's codec its shuffle and stage nodes; [`SluiceCodec`] adds
//! Sluice's. A Sluice node is written as `SLUICE/1`, a kind byte, a JSON
//! header (ids, options, the batch) and the DataFusion node the operator
//! is made from over empty inputs (an aggregate, a hash join, an aggregate
//! without functions for a deduplication), in DataFusion's own encoding;
//! the executor makes the operator again from it, as the planner did. Anything else goes to Ballista's codec unchanged.

use std::sync::Arc;

use ballista_core::serde::BallistaPhysicalExtensionCodec;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion_proto::physical_plan::{
    AsExecutionPlan, DefaultPhysicalExtensionCodec, PhysicalExtensionCodec,
    PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf::PhysicalPlanNode;
use serde::{Deserialize, Serialize};
use sluice_common::OutputMode;
use sluice_common::durable::Durability;
use sluice_exec::operators::changelog::ChangelogExec;
use sluice_exec::operators::{
    BatchContext, DedupExec, StreamJoinExec, StreamingAggregateExec, TopNExec,
};

use crate::source_read::{ReadMode, SourceReadExec};
use crate::stateful::{PartitionedExec, PartitionedOp, StateJob, recompute};

const MAGIC: &[u8] = b"SLUICE/1";
const AGGREGATE: u8 = 1;
const JOIN: u8 = 2;
const DEDUP: u8 = 3;
/// A changelog plan's root ([`ChangelogExec`]): nothing but its input.
const CHANGELOG: u8 = 4;
const TOPN: u8 = 5;
/// A read of a source's range ([`SourceReadExec`]): a JSON header, over
/// the scan of its parts.
const SOURCE: u8 = 6;

/// What a [`SourceReadExec`] is besides its parts.
#[derive(Debug, Serialize, Deserialize)]
struct SourceHeader {
    source: String,
    config: serde_json::Value,
    schema_ipc: Vec<u8>,
    watermark: Option<String>,
    stats: bool,
}

/// Ballista's codec, and Sluice's nodes.
#[derive(Debug, Default)]
pub struct SluiceCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

/// What a [`PartitionedExec`] is besides the DataFusion node its operator
/// is made from.
#[derive(Debug, Serialize, Deserialize)]
struct NodeHeader {
    id: String,
    emit: String,
    ttl_ms: Option<u64>,
    #[serde(default)]
    event_time_columns: Vec<String>,
    /// A top-N's limit, the names of its partition keys (the first keys of
    /// its shell's sort; the rest is its order) and the window node's
    /// schema it replaces, as an Arrow IPC stream.
    #[serde(default)]
    limit: usize,
    /// Whether an aggregate merges session windows.
    #[serde(default)]
    sessions: bool,
    #[serde(default)]
    partition_names: Vec<String>,
    #[serde(default)]
    schema_ipc: Vec<u8>,
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

/// `schema` as an Arrow IPC stream without batches.
fn schema_bytes(schema: &SchemaRef) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut w = StreamWriter::try_new(&mut buf, schema)?;
    w.finish()?;
    drop(w);
    Ok(buf)
}

/// The schema of an Arrow IPC stream [`schema_bytes`] wrote.
fn schema_from_bytes(bytes: &[u8]) -> Result<SchemaRef> {
    StreamReader::try_new(bytes, None)
        .map(|r| r.schema())
        .map_err(|e| bad(format!("a schema: {e}")))
}

/// An empty input with `plan`'s schema: what a shell is made over.
fn empty_like(plan: &Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    Arc::new(EmptyExec::new(plan.schema()))
}

impl SluiceCodec {
    fn encode_node(&self, node: &PartitionedExec, buf: &mut Vec<u8>) -> Result<()> {
        let op = node.op();
        let inputs = op.inputs();
        let job = node.job();
        // The DataFusion node the operator is made from, over empty inputs.
        let mut topn = (0, vec![], vec![]);
        let (kind, shell, ttl, event_time_columns): (_, Arc<dyn ExecutionPlan>, _, _) = match op {
            PartitionedOp::TopN(t) => {
                let (partition, order, limit, out_schema) = t.parts();
                topn = (
                    limit,
                    partition.iter().map(|(_, n)| n.clone()).collect(),
                    schema_bytes(out_schema)?,
                );
                // The sort the window ran over: its keys, then its order.
                let sort: Vec<PhysicalSortExpr> = partition
                    .iter()
                    .map(|(e, _)| PhysicalSortExpr::new_default(Arc::clone(e)))
                    .chain(order.iter().cloned())
                    .collect();
                let empty = empty_like(&inputs[0]);
                let shell: Arc<dyn ExecutionPlan> = match LexOrdering::new(sort) {
                    Some(ordering) => Arc::new(SortExec::new(ordering, empty)),
                    None => empty,
                };
                (TOPN, shell, None, vec![])
            }
            PartitionedOp::Aggregate(a) => (
                AGGREGATE,
                a.top_over(empty_like(&inputs[0]))
                    .map_err(DataFusionError::from)?,
                a.ttl(),
                vec![],
            ),
            PartitionedOp::Join(j) => (
                JOIN,
                Arc::new(
                    j.hash_join_over(empty_like(&inputs[0]), empty_like(&inputs[1]))
                        .map_err(DataFusionError::from)?,
                ),
                j.ttl(),
                j.event_time_columns().to_vec(),
            ),
            PartitionedOp::Dedup(d) => (
                DEDUP,
                d.distinct_over(empty_like(&inputs[0]))
                    .map_err(DataFusionError::from)?,
                d.ttl(),
                d.event_time_columns().to_vec(),
            ),
        };
        let shell =
            PhysicalPlanNode::try_from_physical_plan(shell, &DefaultPhysicalExtensionCodec {})?;
        let mut shell_bytes = Vec::new();
        shell.try_encode(&mut shell_bytes)?;
        let emit = match op {
            PartitionedOp::Aggregate(a) => a.emit_mode(),
            PartitionedOp::Join(j) => j.emit_mode(),
            PartitionedOp::Dedup(d) => d.emit_mode(),
            PartitionedOp::TopN(t) => t.emit_mode(),
        };
        let header = NodeHeader {
            id: op.node().operator_id().to_string(),
            emit: emit.to_string(),
            ttl_ms: ttl.map(|d| d.as_millis() as u64),
            event_time_columns,
            limit: topn.0,
            sessions: matches!(op, PartitionedOp::Aggregate(a) if a.merges_sessions()),
            partition_names: topn.1,
            schema_ipc: topn.2,
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
        buf.push(kind);
        buf.extend_from_slice(&(header.len() as u32).to_le_bytes());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(&shell_bytes);
        Ok(())
    }

    fn decode_node(
        &self,
        kind: u8,
        body: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let expected = if kind == JOIN { 3 } else { 2 };
        if inputs.len() != expected {
            return Err(bad(format!(
                "a node of kind {kind} with {} inputs, not {expected}",
                inputs.len()
            )));
        }
        let (ids, inputs) = inputs.split_last().expect("counted");
        let len = body
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("a truncated node"))?;
        let header = body
            .get(4..4 + len)
            .ok_or_else(|| bad("a truncated node header"))?;
        let header: NodeHeader =
            serde_json::from_slice(header).map_err(|e| bad(format!("its header: {e}")))?;
        let shell = PhysicalPlanNode::try_decode(&body[4 + len..])?
            .try_into_physical_plan(ctx, &DefaultPhysicalExtensionCodec {})?;
        let emit: OutputMode = header
            .emit
            .parse()
            .map_err(|e| bad(format!("its output mode: {e}")))?;
        let ttl = header.ttl_ms.map(std::time::Duration::from_millis);
        let id = header.id.clone();
        let any: &dyn std::any::Any = shell.as_ref();
        let op = match kind {
            AGGREGATE => {
                // The empty input the aggregate was sent over becomes its
                // input.
                let top = Arc::clone(&shell)
                    .transform_up(|p| {
                        let any: &dyn std::any::Any = p.as_ref();
                        if any.is::<EmptyExec>() {
                            return Ok(Transformed::yes(Arc::clone(&inputs[0])));
                        }
                        Ok(Transformed::no(p))
                    })?
                    .data;
                let agg = StreamingAggregateExec::try_new_with_sessions(
                    id,
                    top,
                    ttl,
                    Some(header.sessions),
                )
                .and_then(|a| a.with_emit(emit))
                .map_err(DataFusionError::from)?;
                PartitionedOp::Aggregate(agg)
            }
            JOIN => {
                let join = any
                    .downcast_ref::<HashJoinExec>()
                    .ok_or_else(|| bad("a join sent as another node"))?;
                let node =
                    StreamJoinExec::from_hash_join(id, join, &header.event_time_columns, ttl)
                        .map_err(DataFusionError::from)?
                        .with_emit(emit);
                let node = Arc::new(node).replace_children(inputs.to_vec(), recompute())?;
                PartitionedOp::of(node.as_ref()).ok_or_else(|| bad("a join rebuilt"))?
            }
            DEDUP => {
                let agg = any
                    .downcast_ref::<AggregateExec>()
                    .ok_or_else(|| bad("a deduplication sent as another node"))?;
                let node =
                    DedupExec::from_distinct(id, &shell, agg, &header.event_time_columns, ttl)
                        .map_err(DataFusionError::from)?
                        .with_emit(emit);
                let node = Arc::new(node).replace_children(inputs.to_vec(), recompute())?;
                PartitionedOp::of(node.as_ref()).ok_or_else(|| bad("a deduplication rebuilt"))?
            }
            TOPN => {
                let sort: Vec<PhysicalSortExpr> = match any.downcast_ref::<SortExec>() {
                    Some(s) => s.expr().iter().cloned().collect(),
                    None => vec![],
                };
                let keys = header.partition_names.len();
                if sort.len() < keys {
                    return Err(bad("a top-N with fewer sort keys than partition keys"));
                }
                let partition = sort[..keys]
                    .iter()
                    .zip(&header.partition_names)
                    .map(|(s, n)| (Arc::clone(&s.expr), n.clone()))
                    .collect();
                let out_schema = schema_from_bytes(&header.schema_ipc)?;
                let node = TopNExec::try_new(
                    id,
                    Arc::clone(&inputs[0]),
                    partition,
                    sort[keys..].to_vec(),
                    header.limit,
                    out_schema,
                )
                .map_err(DataFusionError::from)?
                .with_emit(emit);
                PartitionedOp::TopN(node)
            }
            other => {
                return Err(bad(format!(
                    "an unknown kind of node {other} (a newer Sluice?)"
                )));
            }
        };
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
            PartitionedExec::new(op, Arc::clone(ids), job).map_err(DataFusionError::from)?,
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
        // A task of a stage run again whole marks its job (see
        // `crate::rollback`); every stage after the first decodes a
        // shuffle read here.
        crate::rollback::note(ctx).map_err(|e| DataFusionError::External(Box::new(e)))?;
        match buf.strip_prefix(MAGIC) {
            Some([SOURCE, body @ ..]) => {
                let [parts] = inputs else {
                    return Err(bad(format!("a source read with {} inputs", inputs.len())));
                };
                let h: SourceHeader = serde_json::from_slice(body)
                    .map_err(|e| bad(format!("a source read's header: {e}")))?;
                Ok(Arc::new(SourceReadExec::new(
                    h.source,
                    h.config,
                    schema_from_bytes(&h.schema_ipc)?,
                    h.watermark,
                    if h.stats {
                        ReadMode::Stats
                    } else {
                        ReadMode::Rows
                    },
                    Arc::clone(parts),
                )))
            }
            Some([CHANGELOG]) => match inputs {
                [input] => Ok(Arc::new(ChangelogExec::new(Arc::clone(input)))),
                _ => Err(bad(format!(
                    "a changelog root with {} inputs",
                    inputs.len()
                ))),
            },
            Some([kind, body @ ..]) => self.decode_node(*kind, body, inputs, ctx),
            Some([]) => Err(bad("a node without its kind")),
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
        if let Some(node) = any.downcast_ref::<PartitionedExec>() {
            return self.encode_node(node, buf);
        }
        if let Some(read) = any.downcast_ref::<SourceReadExec>() {
            let header = SourceHeader {
                source: read.source().to_string(),
                config: read.config().clone(),
                schema_ipc: schema_bytes(read.source_schema())?,
                watermark: read.watermark().map(str::to_string),
                stats: read.mode() == ReadMode::Stats,
            };
            buf.extend_from_slice(MAGIC);
            buf.push(SOURCE);
            buf.extend_from_slice(
                &serde_json::to_vec(&header).map_err(|e| DataFusionError::External(e.into()))?,
            );
            return Ok(());
        }
        if any.is::<ChangelogExec>() {
            buf.extend_from_slice(MAGIC);
            buf.push(CHANGELOG);
            return Ok(());
        }
        self.ballista.try_encode(node, buf, proto_converter)
    }
}
