//! Knowing that a batch's job ran one of its stages again whole.
//!
//! Ballista (55) recovers from a lost executor inside the job: it runs the
//! lost tasks again and, for a stage that was still running and read
//! shuffle output from the lost executor, rolls the stage back and runs
//! **all** its tasks again under a new stage attempt number. The locations
//! of the output its tasks had published before the rollback stay in the
//! next stage's input lists beside the second attempt's, so the next stage
//! reads those tasks' rows twice. For a stateful stage those are the rows
//! its partitions emitted in the batch: a sink would get them twice (first
//! seen as a join's NULL-extended rows doubled after an executor was killed
//! in the middle of a batch). A live executor taken for lost (a heartbeat
//! late on a busy machine) does the same.
//!
//! Which locations are the stale ones cannot be told from the lists (a
//! location names the task slot that wrote it, not the input partitions it
//! covered), so the job as a whole is not trusted. Each batch's job
//! carries, in its session config ([`SluiceJobOptions`]), a marker path in
//! the checkpoint; a task of a stage attempt after the first writes it as
//! its plan is decoded ([`note`]), before it runs. After a job that
//! succeeded, the driver looks for the marker: when it is there, the job's
//! rows are dropped and the batch runs again as a new job, whose tasks load
//! their partitions' state as of the batch before, as every attempt does.
//! Only the rows of a job without a rolled-back stage reach the sinks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use datafusion::common::config::{ConfigEntry, ConfigExtension, ExtensionOptions};
use datafusion::execution::TaskContext;
use sluice_common::durable::{Durability, write_atomic};
use sluice_common::{Error, Result};

/// What a batch's job tells its tasks besides its plan: the `sluice.*`
/// keys of the job's session config, which Ballista sends the scheduler
/// with the plan and each task with its stage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SluiceJobOptions {
    /// The checkpoint the marker is in: an absolute path or a bucket URL,
    /// as the stateful nodes are sent it; empty when the job has no
    /// marker.
    pub marker_checkpoint: String,
    /// The marker's path below [`Self::marker_checkpoint`].
    pub marker: String,
}

const MARKER_CHECKPOINT: &str = "marker_checkpoint";
const MARKER: &str = "marker";

impl ConfigExtension for SluiceJobOptions {
    const PREFIX: &'static str = "sluice";
}

// By hand rather than with DataFusion's `extensions_options!`, whose
// entries leave out the prefix: a key sent as `marker` would not find this
// extension at the other end.
impl ExtensionOptions for SluiceJobOptions {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn cloned(&self) -> Box<dyn ExtensionOptions> {
        Box::new(self.clone())
    }

    fn set(&mut self, key: &str, value: &str) -> datafusion::common::Result<()> {
        match key {
            MARKER_CHECKPOINT => self.marker_checkpoint = value.to_string(),
            MARKER => self.marker = value.to_string(),
            other => {
                return Err(datafusion::error::DataFusionError::Configuration(format!(
                    "no Sluice job option '{other}'"
                )));
            }
        }
        Ok(())
    }

    fn entries(&self) -> Vec<ConfigEntry> {
        let entry = |key: &str, value: &str, description| ConfigEntry {
            key: format!("{}.{key}", Self::PREFIX),
            value: Some(value.to_string()),
            description,
        };
        vec![
            entry(
                MARKER_CHECKPOINT,
                &self.marker_checkpoint,
                "the checkpoint of the job's marker",
            ),
            entry(MARKER, &self.marker, "the job's marker, in its checkpoint"),
        ]
    }
}

/// The stage attempt number in a Ballista task's identity,
/// `TID <job>/<stage>.<stage attempt>/<task>.<task attempt>`.
pub fn stage_attempt(task_id: &str) -> Option<u64> {
    let rest = task_id.strip_prefix("TID ")?;
    let mut parts = rest.split('/');
    let _job = parts.next()?;
    let stage = parts.next()?;
    let _task = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let (_, attempt) = stage.split_once('.')?;
    attempt.parse().ok()
}

/// Markers this process has written (one per job and stage attempt is
/// enough; every node of every task's plan is decoded through the codec).
static WRITTEN: LazyLock<Mutex<HashSet<(String, String)>>> = LazyLock::new(Mutex::default);

/// Writes the job's marker when `ctx` is a task of a stage attempt after
/// the first and the job has a marker; nothing otherwise (the driver, the
/// scheduler, a first attempt). An error fails the task, which the
/// scheduler runs again.
pub fn note(ctx: &TaskContext) -> Result<()> {
    let Some(task) = ctx.task_id() else {
        return Ok(());
    };
    if stage_attempt(&task).unwrap_or(0) == 0 {
        return Ok(());
    }
    let config = ctx.session_config().options();
    let Some(options) = config.extensions.get::<SluiceJobOptions>() else {
        return Ok(());
    };
    if options.marker_checkpoint.is_empty() || options.marker.is_empty() {
        return Ok(());
    }
    let key = (options.marker_checkpoint.clone(), options.marker.clone());
    if WRITTEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&key)
    {
        return Ok(());
    }
    let root = sluice_common::remote::local_dir_unsynced(Path::new(&options.marker_checkpoint))?;
    let path = root.join(&options.marker);
    write_atomic(&path, task.as_bytes(), Durability::NoSync)
        .map_err(|e| e.context("marking a batch's job as having run a stage again"))?;
    log::warn!("{task}: a stage ran again whole; the driver will run the batch again");
    WRITTEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key);
    Ok(())
}

/// The marker of one job of a batch, in the checkpoint (local directory
/// `root`): `cluster/rollback-<batch>-<nonce>`, a name of its own per job.
#[derive(Debug)]
pub struct Marker {
    relative: String,
    path: PathBuf,
}

impl Marker {
    /// A new marker for a job of batch `batch`, in the checkpoint whose
    /// local directory is `root`.
    pub fn new(root: &Path, batch: sluice_common::BatchId) -> Self {
        let relative = format!("cluster/rollback-{batch}-{}", uuid::Uuid::new_v4().simple());
        Marker {
            path: root.join(&relative),
            relative,
        }
    }

    /// The job options that have its tasks write this marker in
    /// `checkpoint` (what the executors are sent: an absolute path or a
    /// bucket URL).
    pub fn options(&self, checkpoint: &Path) -> SluiceJobOptions {
        SluiceJobOptions {
            marker_checkpoint: checkpoint.display().to_string(),
            marker: self.relative.clone(),
        }
    }

    /// Whether a task wrote the marker (what it wrote: the task's
    /// identity), removing it.
    pub fn take(&self) -> Result<Option<String>> {
        let found = sluice_common::remote::read(&self.path)?;
        if found.is_some() {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(format!("removing {}", self.path.display()), e));
                }
            }
            sluice_common::remote::remove(&self.path);
        }
        Ok(found.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::stage_attempt;

    #[test]
    fn the_stage_attempt_is_read_from_a_task_identity() {
        assert_eq!(stage_attempt("TID 038J55/2.0/3.0"), Some(0));
        assert_eq!(stage_attempt("TID 038J55/2.1/0.2"), Some(1));
        assert_eq!(stage_attempt("TID 038J55/12.3/7.0"), Some(3));
        for other in ["", "TID", "TID a/b/c", "task 1/2.1/3.0", "TID a/2.1/3.0/4"] {
            assert_eq!(stage_attempt(other), None, "{other:?}");
        }
    }
}

#[cfg(test)]
mod options_tests {
    use ballista_core::extension::SessionConfigHelperExt;

    use super::SluiceJobOptions;
    use crate::session::session_config;

    #[test]
    fn a_jobs_marker_travels_in_its_session_config() {
        // As the driver sets it, the scheduler takes the client's settings
        // and an executor the task's.
        let mut sent = session_config();
        sent.options_mut().extensions.insert(SluiceJobOptions {
            marker_checkpoint: "/ckpt".into(),
            marker: "cluster/rollback-3-x".into(),
        });
        let pairs = sent.to_key_value_pairs();
        let got = session_config().update_from_key_value_pair(&pairs);
        let o = got
            .options()
            .extensions
            .get::<SluiceJobOptions>()
            .expect("the options");
        assert_eq!(
            (o.marker_checkpoint.as_str(), o.marker.as_str()),
            ("/ckpt", "cluster/rollback-3-x")
        );
    }
}
