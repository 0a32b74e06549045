//! A running streaming query: its trigger loop and its handle.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use sluice_common::{Error, Progress, Result};
use tokio::sync::{Mutex as AsyncMutex, watch};
use tokio::task::JoinHandle;

use crate::execution::MicroBatchExecution;
use crate::fault::Fault;
use crate::operators::StateFinalizer;
use crate::trigger::{Trigger, next_start_ms};

/// The handle of a started query.
///
/// Batches run in a background task per the trigger, or only when asked
/// ([`StreamingQuery::process_all_available`], [`StreamingQuery::run_batch`])
/// with [`Trigger::Manual`]. Both paths take the same lock, so batches never
/// overlap.
#[derive(Debug)]
pub struct StreamingQuery {
    name: String,
    id: String,
    checkpoint: std::path::PathBuf,
    finalizer: Option<StateFinalizer>,
    result_keys: Option<Vec<String>>,
    exec: Arc<AsyncMutex<MicroBatchExecution>>,
    progress: Arc<Mutex<VecDeque<Progress>>>,
    stop_tx: watch::Sender<bool>,
    task: AsyncMutex<Option<JoinHandle<Result<()>>>>,
}

impl StreamingQuery {
    /// Starts `exec` per its trigger.
    pub fn start(exec: MicroBatchExecution) -> Self {
        let name = exec.name().to_string();
        let id = exec.id().to_string();
        let progress = exec.progress_handle();
        let checkpoint = exec.checkpoint_dir().to_path_buf();
        let finalizer = exec.state_finalizer();
        let result_keys = exec.result_keys();
        let trigger = exec.config().trigger;
        let exec = Arc::new(AsyncMutex::new(exec));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = match trigger {
            Trigger::Manual => None,
            _ => Some(tokio::spawn(trigger_loop(
                Arc::clone(&exec),
                trigger,
                stop_rx,
            ))),
        };
        StreamingQuery {
            name,
            id,
            checkpoint,
            finalizer,
            result_keys,
            exec,
            progress,
            stop_tx,
            task: AsyncMutex::new(task),
        }
    }

    /// The query's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The query's checkpoint directory.
    pub fn checkpoint_dir(&self) -> &std::path::Path {
        &self.checkpoint
    }

    /// What turns the query's stored states into values, if it keeps state.
    pub fn state_finalizer(&self) -> Option<&StateFinalizer> {
        self.finalizer.as_ref()
    }

    /// When the topmost stateful operator is an aggregate: its key columns,
    /// which identify a row of the result (an update-mode sink's upsert key).
    pub fn result_keys(&self) -> Option<&[String]> {
        self.result_keys.as_deref()
    }

    /// The query's id, fixed for the life of its checkpoint.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs one batch now (the uncommitted one first after a restart);
    /// `None` if there was no new data.
    pub async fn run_batch(&self) -> Result<Option<Progress>> {
        self.exec.lock().await.run_batch().await
    }

    /// Arms (or clears) a fault at a step of the commit protocol (tests).
    pub async fn inject_fault(&self, fault: Option<Fault>) {
        self.exec.lock().await.set_fault(fault);
    }

    /// Runs batches until no source has new data.
    ///
    /// With a source that never runs dry (`rate` on the system clock) this
    /// returns when a batch finds nothing new, which may take long.
    pub async fn process_all_available(&self) -> Result<()> {
        let mut exec = self.exec.lock().await;
        while exec.run_batch().await?.is_some() {}
        Ok(())
    }

    /// Asks the trigger loop to stop after the batch in flight commits, and
    /// waits for it.
    pub async fn stop(&self) -> Result<()> {
        let _ = self.stop_tx.send(true);
        self.await_termination().await
    }

    /// Waits for the trigger loop to end (by `once`/`available_now`,
    /// `max_batches`, [`StreamingQuery::stop`] or an error) and returns its
    /// outcome. Returns at once for a manual query.
    pub async fn await_termination(&self) -> Result<()> {
        let handle = self.task.lock().await.take();
        match handle {
            None => Ok(()),
            Some(h) => match h.await {
                Ok(r) => r,
                Err(e) => Err(Error::internal(format!(
                    "query '{}' task ended abnormally: {e}",
                    self.name
                ))),
            },
        }
    }

    /// Whether the trigger loop is still running.
    pub fn is_active(&self) -> bool {
        match self.task.try_lock() {
            Ok(t) => t.as_ref().is_some_and(|h| !h.is_finished()),
            Err(_) => true,
        }
    }

    /// The newest progress record.
    pub fn last_progress(&self) -> Option<Progress> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .back()
            .cloned()
    }

    /// Up to the last 100 progress records, oldest first.
    pub fn recent_progress(&self) -> Vec<Progress> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for StreamingQuery {
    /// A dropped handle stops its trigger loop after the batch in flight, so
    /// no query runs on that nobody can stop.
    fn drop(&mut self) {
        let _ = self.stop_tx.send(true);
    }
}

async fn trigger_loop(
    exec: Arc<AsyncMutex<MicroBatchExecution>>,
    trigger: Trigger,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let clock = Arc::clone(exec.lock().await.clock());
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let start = clock.now_millis();
        let (had_data, done) = {
            let mut e = exec.lock().await;
            let had = e.run_batch().await?.is_some();
            (had, e.reached_max_batches())
        };
        match trigger {
            Trigger::Once => return Ok(()),
            Trigger::AvailableNow if !had_data => return Ok(()),
            _ if done => return Ok(()),
            Trigger::AvailableNow => continue,
            Trigger::ProcessingTime(iv) => {
                let poll = exec.lock().await.config().poll_interval;
                let next = next_start_ms(start, iv, clock.now_millis(), had_data, poll);
                if next > clock.now_millis() {
                    tokio::select! {
                        _ = clock.wait_until(next) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
            Trigger::Manual => return Ok(()),
        }
    }
}
