//! Where a restarted query resumes: pure logic over what the logs hold.

use sluice_common::{BatchId, Error, Result};

/// What a (re)started query does first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Nothing was ever planned: start with batch 0.
    Fresh,
    /// Every planned batch committed: plan `next` with new offsets.
    Next {
        /// The batch id to plan next.
        next: BatchId,
    },
    /// Batch `batch_id` was planned (its offsets are logged) but not committed:
    /// run it again with exactly the logged offsets, then go on.
    Rerun {
        /// The batch to run again.
        batch_id: BatchId,
    },
}

/// Decides how to resume from the newest plan and newest commit of the
/// batch log.
///
/// The protocol logs batch N's plan before running it and its commit
/// after, and never plans N+1 before committing N, so the only consistent
/// states are `commit == offset` and `commit + 1 == offset`.
pub fn decide(last_offset: Option<BatchId>, last_commit: Option<BatchId>) -> Result<Resume> {
    match (last_offset, last_commit) {
        (None, None) => Ok(Resume::Fresh),
        (Some(0), None) => Ok(Resume::Rerun { batch_id: 0 }),
        (Some(o), Some(c)) if o == c => Ok(Resume::Next { next: o + 1 }),
        (Some(o), Some(c)) if o == c + 1 => Ok(Resume::Rerun { batch_id: o }),
        (None, Some(c)) => Err(Error::internal(format!(
            "commit log has batch {c} but the offset log is empty"
        ))),
        (Some(o), None) => Err(Error::internal(format!(
            "offset log reaches batch {o} but the commit log is empty: batches 0..{o} were never committed"
        ))),
        (Some(o), Some(c)) if c > o => Err(Error::internal(format!(
            "commit log reaches batch {c}, past the offset log's last batch {o}"
        ))),
        (Some(o), Some(c)) => Err(Error::internal(format!(
            "offset log reaches batch {o} but the commit log stops at {c}: more than one uncommitted batch"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistent_states_resume_and_inconsistent_ones_are_refused() {
        assert_eq!(decide(None, None).unwrap(), Resume::Fresh);
        assert_eq!(
            decide(Some(0), None).unwrap(),
            Resume::Rerun { batch_id: 0 }
        );
        assert_eq!(decide(Some(5), Some(5)).unwrap(), Resume::Next { next: 6 });
        assert_eq!(
            decide(Some(6), Some(5)).unwrap(),
            Resume::Rerun { batch_id: 6 }
        );
        assert!(decide(Some(7), Some(5)).is_err());
        assert!(decide(Some(3), Some(5)).is_err());
        assert!(decide(None, Some(0)).is_err());
        assert!(decide(Some(2), None).is_err());
    }
}
