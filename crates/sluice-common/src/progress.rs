//! The progress record each micro-batch produces.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::BatchId;

/// What one micro-batch did: kept in the checkpoint, returned by
/// `last_progress()`, shown by the CLI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The query (sink) name.
    pub name: String,
    /// The query's id, fixed for the life of its checkpoint.
    pub query_id: String,
    /// The batch id.
    pub batch_id: BatchId,
    /// When the batch started, in milliseconds since the Unix epoch (trigger clock).
    pub timestamp_ms: i64,
    /// Rows read from all sources (after dropping bad rows).
    pub input_rows: u64,
    /// Rows written to the sink.
    pub output_rows: u64,
    /// Input rows per second of wall time between this batch's start and the previous batch's start.
    pub input_rows_per_second: f64,
    /// Input rows per second of this batch's own processing time.
    pub processed_rows_per_second: f64,
    /// Milliseconds spent per phase: `offsets`, `offset_log`, `read`, `execute`, `state_commit`, `sink`, `commit_log`, `total`.
    pub durations_ms: BTreeMap<String, f64>,
    /// Per source: offsets, rows read, bad rows.
    pub sources: Vec<SourceProgress>,
    /// The event-time watermark in force for this batch (ms), if any.
    pub watermark_ms: Option<i64>,
    /// How often the batch was retried after a transient error.
    pub retries: u32,
    /// Rows left out because their window had closed before the batch began.
    #[serde(default)]
    pub late_rows: u64,
    /// The state of each stateful operator of the query, bottom up (none
    /// for a stateless query).
    #[serde(default)]
    pub operators: Vec<StateProgress>,
    /// Whether the batch took longer than the processing-time trigger's
    /// interval: batches cannot keep up, and the backlog grows.
    #[serde(default)]
    pub falling_behind: bool,
    /// End-to-end latency, in ms: from when the oldest record the batch read
    /// became available (see `ReadBatch::available_ms`) to the batch's
    /// commit, on the trigger clock. `None` for a batch that read nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Whether this batch re-ran a batch that had been planned but not committed.
    pub recovered: bool,
    /// What the batch had to work around, e.g. a damaged state snapshot
    /// passed over with `state_snapshot_fallback`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One source's share of a [`Progress`] record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceProgress {
    /// The source name.
    pub name: String,
    /// The offset the batch started at (exclusive of earlier data).
    pub start_offset: serde_json::Value,
    /// The offset the batch ended at.
    pub end_offset: serde_json::Value,
    /// Rows read.
    pub input_rows: u64,
    /// Rows that could not be decoded and were dropped (`on_error = 'drop'`).
    pub dropped_rows: u64,
    /// Rows that could not be decoded and went to the dead-letter table.
    pub dead_letter_rows: u64,
    /// Data available after `end_offset` but not taken by this batch, when
    /// it was planned (`backlog_unit`: rows, or files for a file source);
    /// missing when the source cannot tell or the batch was a re-run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u64>,
    /// What `backlog` counts: `rows` or `files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_unit: Option<String>,
}

/// A stateful operator's state after a batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateProgress {
    /// The operator id: its state lives in `state/<id>/` of the checkpoint.
    #[serde(default)]
    pub id: String,
    /// The operator, e.g. `aggregate count(Int64(1)) GROUP BY [window_start, window_end, k]`.
    pub operator: String,
    /// Keys held after the batch.
    pub rows: u64,
    /// Keys inserted or updated by the batch.
    pub updated: u64,
    /// Keys removed (evicted) by the batch.
    pub removed: u64,
    /// Approximate bytes of state in memory.
    pub memory_bytes: u64,
    /// Bytes of state files the batch wrote.
    pub bytes_written: u64,
    /// The operator's input watermark after the batch (ms; what its state
    /// was evicted against): the query's, less the delay of the joins
    /// below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark_ms: Option<i64>,
}
