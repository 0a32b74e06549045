//! A running streaming query: its trigger loop and its handle.

use std::sync::{Arc, Mutex};

use sluice_common::{Error, Progress, Result};
use sluice_planner::OutputMode;
use tokio::sync::{Mutex as AsyncMutex, watch};
use tokio::task::JoinHandle;

use crate::execution::{MicroBatchExecution, ProgressListener, ProgressLog};
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
    stop_tx: watch::Sender<bool>,
    task: AsyncMutex<Option<JoinHandle<Result<()>>>>,
    status: Arc<watch::Sender<QueryStatus>>,
    info: QueryInfo,
}

/// Whether a query runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryStatus {
    /// Its trigger loop runs, or (manual trigger) its handle is alive.
    Active,
    /// It ended without an error: by its trigger, `max_batches` or a stop.
    Stopped,
    /// It ended with this error.
    Failed(String),
}

impl QueryStatus {
    /// `active`, `stopped` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            QueryStatus::Active => "active",
            QueryStatus::Stopped => "stopped",
            QueryStatus::Failed(_) => "failed",
        }
    }
}

/// A live, read-only view of a started query for monitoring (the HTTP
/// endpoint, the CLI): what it is, whether it runs, and its recent progress.
/// Cheap to clone; it stays valid after the query's handle is dropped.
#[derive(Debug, Clone)]
pub struct QueryInfo {
    /// The query's name (its sink's name).
    pub name: String,
    /// The query's id, fixed for the life of its checkpoint.
    pub id: String,
    /// When its batches run.
    pub trigger: Trigger,
    /// How its sink receives results.
    pub output_mode: OutputMode,
    /// Its sources, by name.
    pub sources: Vec<String>,
    /// Its sink, by name.
    pub sink: String,
    /// Its checkpoint directory.
    pub checkpoint: std::path::PathBuf,
    progress: Arc<Mutex<ProgressLog>>,
    status: watch::Receiver<QueryStatus>,
}

impl QueryInfo {
    /// Whether the query runs, stopped, or failed (with its error).
    pub fn status(&self) -> QueryStatus {
        self.status.borrow().clone()
    }

    /// Up to the last `n` progress records (at most the 100 kept in
    /// memory), oldest first.
    pub fn recent_progress(&self, n: usize) -> Vec<Progress> {
        let log = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let recent = log.recent();
        recent
            .iter()
            .skip(recent.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The newest progress record.
    pub fn last_progress(&self) -> Option<Progress> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recent()
            .back()
            .cloned()
    }

    /// Tells `listener` of every progress record kept so far (up to 100),
    /// then of each new one as its batch completes.
    pub fn listen(&self, listener: ProgressListener) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .listen(listener);
    }

    /// Waits until the query is no longer active (returns at once if it
    /// is not).
    pub async fn finished(&self) {
        let mut rx = self.status.clone();
        // An error means the sender is gone: the query is gone too.
        let _ = rx.wait_for(|s| *s != QueryStatus::Active).await;
    }
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
        let (status_tx, status_rx) = watch::channel(QueryStatus::Active);
        let status = Arc::new(status_tx);
        let info = QueryInfo {
            name: name.clone(),
            id: id.clone(),
            trigger,
            output_mode: exec.config().output_mode,
            sources: exec.source_names(),
            sink: exec.sink_name().to_string(),
            checkpoint: checkpoint.clone(),
            progress: Arc::clone(&progress),
            status: status_rx,
        };
        let exec = Arc::new(AsyncMutex::new(exec));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = match trigger {
            Trigger::Manual => None,
            _ => {
                let exec = Arc::clone(&exec);
                let status = Arc::clone(&status);
                Some(tokio::spawn(async move {
                    // Set as the task ends, even by a panic (the guard's
                    // drop), so that no one waits on an ended query.
                    let guard = EndGuard(status);
                    let outcome = trigger_loop(exec, trigger, stop_rx).await;
                    guard.0.send_replace(match &outcome {
                        Ok(()) => QueryStatus::Stopped,
                        Err(e) => QueryStatus::Failed(e.to_string()),
                    });
                    outcome
                }))
            }
        };
        StreamingQuery {
            status,
            info,
            name,
            id,
            checkpoint,
            finalizer,
            result_keys,
            exec,
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

    /// A live view of the query for monitoring, valid after this handle
    /// is dropped.
    pub fn info(&self) -> QueryInfo {
        self.info.clone()
    }

    /// Waits until the query is no longer active: its trigger loop ended
    /// (by its trigger, `max_batches`, a stop or an error). A manual query
    /// is active until its handle is dropped.
    pub async fn finished(&self) {
        self.info.finished().await
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
        self.info.last_progress()
    }

    /// Up to the last 100 progress records, oldest first.
    pub fn recent_progress(&self) -> Vec<Progress> {
        self.info.recent_progress(usize::MAX)
    }
}

impl Drop for StreamingQuery {
    /// A dropped handle stops its trigger loop after the batch in flight, so
    /// no query runs on that nobody can stop.
    fn drop(&mut self) {
        let _ = self.stop_tx.send(true);
        // A manual query ends with its handle; a trigger loop reports its
        // own end when it has one.
        if self.info.trigger == Trigger::Manual {
            self.status.send_replace(QueryStatus::Stopped);
        }
    }
}

/// Marks a query failed when its trigger loop's task ends without saying
/// how (it panicked, or its runtime shut down).
struct EndGuard(Arc<watch::Sender<QueryStatus>>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.send_if_modified(|s| {
            if *s == QueryStatus::Active {
                *s = QueryStatus::Failed(
                    "the query's task ended abnormally (a bug in Sluice)".to_string(),
                );
                true
            } else {
                false
            }
        });
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
