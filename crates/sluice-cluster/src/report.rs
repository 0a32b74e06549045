//! What a partition's task did, sent back to the driver through the
//! checkpoint.
//!
//! A Ballista job gives its client the rows of its last stage and nothing
//! else, but the driver needs more of each stateful task: its rows on time
//! and late (for the progress record), the late rows themselves (for the
//! streams' `late_rows` sinks) and what the commit of its state did. So the
//! task for partition k writes `state/<op>/p<k>/report` after its commit,
//! before it returns, and the driver reads every partition's once the job
//! has ended, before the batch's commit record.
//!
//! The file is rewritten every batch and names its batch: a report of
//! another batch is an error (the batch is retried). Any attempt of a task
//! writes the same report, as it writes the same state. It is written
//! whole and renamed into place (one `PUT` in a bucket), without fsync: it
//! is read right after the job, and a batch re-run after a crash writes it
//! again.
//!
//! Layout: `SLUICE-REPORT/1`, a u32 (little-endian) length and a JSON
//! header, then each late batch as an Arrow IPC stream of the length the
//! header gives.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{LazyLock, Mutex};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use serde::{Deserialize, Serialize};
use sluice_common::durable::{Durability, write_atomic};
use sluice_common::{BatchId, Error, Result};
use sluice_exec::operators::OperatorReport;
use sluice_state::store::CommitStats;

const MAGIC: &[u8] = b"SLUICE-REPORT/1";

/// The report's file name in a partition's directory.
pub const REPORT: &str = "report";

/// One partition's report of one batch.
#[derive(Debug, Default)]
pub struct PartitionReport {
    /// The batch it is of.
    pub batch_id: BatchId,
    /// What the operator's run did.
    pub report: OperatorReport,
    /// What the commit of the partition's state did.
    pub stats: CommitStats,
    /// The memory the partition's state takes on its executor.
    pub memory_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    batch_id: u64,
    input_rows: u64,
    late_rows: u64,
    rows: u64,
    updated: u64,
    removed: u64,
    bytes_written: u64,
    memory_bytes: u64,
    steps: Vec<(String, f64)>,
    /// Per late batch: the operator input it came in by, and its length.
    late: Vec<(usize, u64)>,
}

/// Writes `report` as `dir`'s report (see the module docs).
pub fn write(dir: &Path, report: &PartitionReport) -> Result<()> {
    let path = dir.join(REPORT);
    let mut late_bytes = Vec::new();
    let mut late = Vec::new();
    for (k, batch) in &report.report.late {
        let mut buf = Vec::new();
        let mut w = StreamWriter::try_new(&mut buf, &batch.schema())?;
        w.write(batch)?;
        w.finish()?;
        drop(w);
        late.push((*k, buf.len() as u64));
        late_bytes.extend_from_slice(&buf);
    }
    let r = &report.report;
    let header = Header {
        batch_id: report.batch_id,
        input_rows: r.input_rows,
        late_rows: r.late_rows,
        rows: report.stats.rows,
        updated: report.stats.updated,
        removed: report.stats.removed,
        bytes_written: report.stats.bytes_written,
        memory_bytes: report.memory_bytes,
        steps: r.steps.iter().map(|(s, ms)| (s.to_string(), *ms)).collect(),
        late,
    };
    let header = serde_json::to_vec(&header)
        .map_err(|e| Error::internal(format!("encoding a task's report: {e}")))?;
    let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + header.len() + late_bytes.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&late_bytes);
    write_atomic(&path, &bytes, Durability::NoSync)
}

/// A step's name as the `&'static str` an [`OperatorReport`] holds: each
/// distinct name is kept once for the life of the process.
fn step_name(name: &str) -> &'static str {
    static NAMES: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Mutex::default);
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = names.get(name) {
        return n;
    }
    let n: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.insert(n);
    n
}

/// Decodes a report read from `path` (named in errors).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<PartitionReport> {
    let bad = |what: String| Error::checkpoint(path, format!("a task's report: {what}"));
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("it does not start with SLUICE-REPORT/1".into()))?;
    let len = rest
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("truncated".into()))?;
    let header = rest
        .get(4..4 + len)
        .ok_or_else(|| bad("its header is truncated".into()))?;
    let header: Header =
        serde_json::from_slice(header).map_err(|e| bad(format!("its header: {e}")))?;
    let mut at = 4 + len;
    let mut late = Vec::with_capacity(header.late.len());
    for (k, n) in &header.late {
        let end = usize::try_from(*n)
            .ok()
            .and_then(|n| at.checked_add(n))
            .filter(|end| *end <= rest.len())
            .ok_or_else(|| bad("its late rows are truncated".into()))?;
        let reader = StreamReader::try_new(&rest[at..end], None)
            .map_err(|e| bad(format!("its late rows: {e}")))?;
        for batch in reader {
            let batch: RecordBatch = batch.map_err(|e| bad(format!("its late rows: {e}")))?;
            late.push((*k, batch));
        }
        at = end;
    }
    Ok(PartitionReport {
        batch_id: header.batch_id,
        report: OperatorReport {
            input_rows: header.input_rows,
            late_rows: header.late_rows,
            late,
            steps: header
                .steps
                .iter()
                .map(|(s, ms)| (step_name(s), *ms))
                .collect(),
        },
        stats: CommitStats {
            rows: header.rows,
            updated: header.updated,
            removed: header.removed,
            bytes_written: header.bytes_written,
        },
        memory_bytes: header.memory_bytes,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn a_report_reads_back_as_written_and_a_damaged_one_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        let late = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![Some("a"), None])),
            ],
        )
        .unwrap();
        let report = PartitionReport {
            batch_id: 7,
            report: OperatorReport {
                input_rows: 10,
                late_rows: 3,
                late: vec![(0, late.clone()), (1, late.slice(1, 1))],
                steps: vec![("run", 1.5)],
            },
            stats: CommitStats {
                rows: 4,
                updated: 2,
                removed: 1,
                bytes_written: 99,
            },
            memory_bytes: 1234,
        };
        write(tmp.path(), &report).unwrap();
        let path = tmp.path().join(REPORT);
        let bytes = std::fs::read(&path).unwrap();
        let back = decode(&path, &bytes).unwrap();
        assert_eq!(back.batch_id, 7);
        assert_eq!(back.report.input_rows, 10);
        assert_eq!(back.report.late_rows, 3);
        assert_eq!(back.report.steps, vec![("run", 1.5)]);
        assert_eq!(back.stats, report.stats);
        assert_eq!(back.memory_bytes, 1234);
        assert_eq!(back.report.late.len(), 2);
        assert_eq!(back.report.late[0], (0, late.clone()));
        assert_eq!(back.report.late[1], (1, late.slice(1, 1)));

        // Every cut of the file is an error, never a panic.
        for cut in 0..bytes.len() {
            assert!(decode(&path, &bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
