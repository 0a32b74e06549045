//! Whether a failure on the cluster is worth retrying.
//!
//! In one process a Sluice error keeps its kind, and the query retries a
//! batch that failed for a passing reason (an I/O error: a network or
//! object-store hiccup) and stops on one that will not pass (bad input, a
//! damaged checkpoint, a bug). A task's error reaches the driver as text,
//! inside the job's failure, so the kind has to travel another way:
//!
//! - on an executor, a task of Sluice's nodes fails with DataFusion's own
//!   I/O error for a passing failure ([`task_error`]), which Ballista takes
//!   for retryable: it runs the task again, and if the job fails anyway,
//!   its message says `Task failed due to IO error`; anything else fails as
//!   a runtime execution error, which Ballista does not retry;
//! - on the driver, a failed job is an I/O error (retried as a batch),
//!   unless its message says a task failed with a runtime execution error
//!   ([`job_error`]). Failures of the cluster itself (a lost executor, a
//!   shuffle fetch, a scheduler that does not answer) pass too.

use datafusion::error::DataFusionError;
use sluice_common::Error;

/// What Ballista writes for a task that failed with an error it does not
/// retry.
const NOT_RETRYABLE: &str = "failed due to runtime execution error";

/// `e`, raised by a task of one of Sluice's nodes, as the task's error: an
/// I/O error Ballista retries when `e` is transient, `e` itself otherwise.
pub fn task_error(e: Error) -> DataFusionError {
    if e.is_transient() {
        DataFusionError::IoError(std::io::Error::other(e.to_string()))
    } else {
        e.into()
    }
}

/// The error of `what` (a job) that failed with `e`: transient unless a
/// task of it failed with an error that will not pass.
pub fn job_error(what: &str, e: DataFusionError) -> Error {
    let e = Error::from(e);
    // Raised in this process as a Sluice error: it has its kind.
    if !matches!(e.root(), Error::DataFusion(_)) {
        return e.context(what.to_string());
    }
    let text = match e.root() {
        Error::DataFusion(d) => d.to_string(),
        other => other.to_string(),
    };
    if text.contains(NOT_RETRYABLE) {
        e.context(what.to_string())
    } else {
        Error::io(what.to_string(), std::io::Error::other(text))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::error::DataFusionError;
    use sluice_common::Error;

    use super::{job_error, task_error};

    #[test]
    fn passing_task_failures_are_retried_and_the_rest_stop_the_query() {
        // On the executor: an I/O error becomes DataFusion's own, which
        // Ballista retries; bad input stays what it is.
        let io = Error::io("reading part 3", std::io::Error::other("connection reset"));
        assert!(matches!(task_error(io), DataFusionError::IoError(_)));
        let data = Error::data("line 2: not JSON").context("part 3");
        assert!(matches!(task_error(data), DataFusionError::External(_)));

        // On the driver: how Ballista words a failed job.
        let failed = |m: &str| DataFusionError::Execution(format!("Job 038J failed: {m}"));
        for passing in [
            "Task failed due to IO error: IoError(Custom { kind: Other, error: \"I/O error\" })",
            "Task failure due to Executor 7b01 lost",
            "Stage 2 has failed 4 times, most recent failure reason: FetchPartitionError",
        ] {
            let e = job_error("batch 3's job", failed(passing));
            assert!(e.is_transient(), "{passing}: {e}");
            assert!(e.to_string().contains("batch 3's job"), "{e}");
        }
        let e = job_error(
            "batch 3's job",
            failed(
                "Task failed due to runtime execution error: DataFusionError(External(Checkpoint { .. }))",
            ),
        );
        assert!(!e.is_transient(), "{e}");
        // An error of this process keeps its kind.
        let here: DataFusionError = Error::data("bad row").into();
        assert!(matches!(
            job_error("batch 3's job", here).root(),
            Error::Data(_)
        ));
        // The scheduler not answering passes.
        let gone = DataFusionError::Execution("transport error: connection refused".into());
        assert!(job_error("batch 3's job", gone).is_transient());
    }
}
