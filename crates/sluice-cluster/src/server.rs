//! Starting a Ballista scheduler and executors that run Sluice's plans.
//!
//! Both are Ballista's own servers (`ballista-scheduler`, `ballista-executor`)
//! configured with Sluice's session ([`crate::session`]): its functions for
//! decoding plans and its codec for their nodes. The scheduler keeps its
//! state in memory and pushes tasks to executors (`PushStaged`; or they
//! poll for them, `PullStaged`, see [`Scheduling`]); an executor
//! keeps a batch's shuffle files in its work directory until the scheduler
//! has them removed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballista_core::config::TaskSchedulingPolicy;
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use datafusion::prelude::SessionConfig;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use sluice_common::{Error, Result};
use tokio::task::JoinHandle;

use crate::session::{physical_codec, session_config, session_state};

/// How long, after a batch's job finishes, the executors keep its shuffle
/// and result files (the driver has read the results by then).
const JOB_DATA_KEPT_SECONDS: u64 = 10;

/// A running scheduler: its address, and the task serving it (aborted on
/// drop).
#[derive(Debug)]
pub struct Scheduler {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Scheduler {
    /// Where it listens (the address drivers and executors are given).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the server fails (a started scheduler runs until its
    /// process ends).
    pub async fn wait(mut self) -> Result<()> {
        (&mut self.task)
            .await
            .map_err(|e| Error::internal(format!("the scheduler's task failed: {e}")))
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a scheduler waits, by default, for an executor that stopped
/// sending heartbeats before it takes the executor for lost and runs its
/// tasks elsewhere.
pub const EXECUTOR_TIMEOUT: Duration = Duration::from_secs(20);

/// How often an executor sends its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// How tasks reach executors. A scheduler and its executors must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduling {
    /// The scheduler pushes each task to an executor's gRPC port as soon as
    /// it is ready (Ballista's `PushStaged`): tens of milliseconds a batch.
    /// With Ballista 55, an executor that dies in the middle of a task can
    /// leave the scheduler scheduling nothing more (see the architecture
    /// page).
    #[default]
    Push,
    /// Executors poll the scheduler for tasks (Ballista's `PullStaged`):
    /// hundreds of milliseconds a batch on a loopback cluster, but the
    /// tasks of an executor lost mid-task run again elsewhere.
    Pull,
}

impl std::str::FromStr for Scheduling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "push" => Ok(Scheduling::Push),
            "pull" => Ok(Scheduling::Pull),
            other => Err(Error::plan(format!(
                "scheduling '{other}' is not one of push, pull"
            ))),
        }
    }
}

impl Scheduling {
    fn policy(self) -> TaskSchedulingPolicy {
        match self {
            Scheduling::Push => TaskSchedulingPolicy::PushStaged,
            Scheduling::Pull => TaskSchedulingPolicy::PullStaged,
        }
    }
}

/// Starts a scheduler listening on `bind` (port 0 picks a free one), with
/// push scheduling and the default executor timeout.
pub async fn start_scheduler(bind: SocketAddr) -> Result<Scheduler> {
    start_scheduler_with(bind, EXECUTOR_TIMEOUT, Scheduling::Push).await
}

/// Starts a scheduler listening on `bind` that takes an executor for lost
/// after `executor_timeout` without a heartbeat (at least twice
/// [`HEARTBEAT`]) and hands out tasks by `scheduling`.
pub async fn start_scheduler_with(
    bind: SocketAddr,
    executor_timeout: Duration,
    scheduling: Scheduling,
) -> Result<Scheduler> {
    if executor_timeout < 2 * HEARTBEAT {
        return Err(Error::plan(format!(
            "an executor timeout of {executor_timeout:?} is shorter than two heartbeats ({:?})",
            2 * HEARTBEAT
        )));
    }
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| Error::io(format!("binding the scheduler to {bind}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the scheduler's address", e))?;
    let config = SchedulerConfig {
        bind_host: addr.ip().to_string(),
        bind_port: addr.port(),
        external_host: addr.ip().to_string(),
        scheduler_id: addr.to_string(),
        scheduling_policy: scheduling.policy(),
        finished_job_data_clean_up_interval_seconds: JOB_DATA_KEPT_SECONDS,
        executor_timeout_seconds: executor_timeout.as_secs().max(1),
        expire_dead_executor_interval_seconds: 1,
        override_physical_codec: Some(physical_codec()),
        override_config_producer: Some(Arc::new(session_config)),
        override_session_builder: Some(Arc::new(|config: SessionConfig| Ok(session_state(config)))),
        ..SchedulerConfig::default()
    };
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| Error::internal(format!("creating the scheduler's state: {e}")))?;
    let scheduler =
        create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, Arc::new(config))
            .await
            .map_err(|e| Error::internal(format!("creating the scheduler: {e}")))?;
    let task = tokio::spawn(async move {
        if let Err(e) = start_grpc_service_with_listener(listener, scheduler).await {
            eprintln!("sluice: the scheduler at {addr} stopped: {e}");
        }
    });
    Ok(Scheduler { addr, task })
}

/// Where an executor listens and what it runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler it registers with.
    pub scheduler: SocketAddr,
    /// The host it binds to and advertises (`127.0.0.1` on one machine).
    pub host: String,
    /// Its Arrow Flight port, from which other executors and the driver
    /// fetch the rows it produced.
    pub flight_port: u16,
    /// Its gRPC port, to which the scheduler pushes tasks.
    pub grpc_port: u16,
    /// Tasks it runs at once.
    pub slots: usize,
    /// Where it writes shuffle files.
    pub work_dir: PathBuf,
    /// How it gets tasks: as its scheduler hands them out.
    pub scheduling: Scheduling,
    /// How much memory the state partitions it keeps between tasks may
    /// take ([`crate::stateful::DEFAULT_KEPT_STATE_BYTES`] by default).
    pub kept_state_bytes: u64,
}

/// Runs an executor until its process is stopped (Ctrl-C or SIGTERM ends
/// it: Ballista's executor handles both).
pub async fn run_executor(options: ExecutorOptions) -> Result<()> {
    crate::stateful::set_kept_state_budget(options.kept_state_bytes);
    let config = session_config();
    let registry = BallistaFunctionRegistry::from(&session_state(config.clone()));
    let process = ExecutorProcessConfig {
        bind_host: options.host.clone(),
        external_host: Some(options.host.clone()),
        port: options.flight_port,
        grpc_port: options.grpc_port,
        scheduler_host: options.scheduler.ip().to_string(),
        scheduler_port: options.scheduler.port(),
        scheduler_connect_timeout_seconds: 10,
        vcores: options.slots.max(1),
        task_scheduling_policy: options.scheduling.policy(),
        work_dir: Some(options.work_dir.display().to_string()),
        print_thread_info: false,
        job_data_ttl_seconds: 3600,
        job_data_clean_up_interval_seconds: 600,
        executor_heartbeat_interval_seconds: HEARTBEAT.as_secs(),
        override_physical_codec: Some(physical_codec()),
        override_config_producer: Some(Arc::new(move || config.clone())),
        override_function_registry: Some(Arc::new(registry)),
        ..ExecutorProcessConfig::default()
    };
    std::fs::create_dir_all(&options.work_dir)
        .map_err(|e| Error::io(format!("creating {}", options.work_dir.display()), e))?;
    start_executor_process(Arc::new(process))
        .await
        .map_err(|e| {
            Error::internal(format!(
                "the executor on {}:{} stopped: {e}",
                options.host, options.flight_port
            ))
        })
}

/// Starts, in this process on 127.0.0.1 (free ports), a scheduler and
/// `executors` executors of `slots` slots each, working in
/// `work/executor-<i>`: a loopback cluster for tests and benchmarks. The
/// scheduler serves while its handle lives; the executors run until the
/// process ends (an executor that stops prints why).
pub async fn start_local(
    executors: usize,
    slots: usize,
    work: &std::path::Path,
) -> Result<Scheduler> {
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| Error::io("finding a free port", e))
    };
    let scheduler = start_scheduler(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    for i in 0..executors {
        let options = ExecutorOptions {
            scheduler: scheduler.addr(),
            host: "127.0.0.1".to_string(),
            flight_port: free_port()?,
            grpc_port: free_port()?,
            slots,
            work_dir: work.join(format!("executor-{i}")),
            scheduling: Scheduling::default(),
            kept_state_bytes: crate::stateful::DEFAULT_KEPT_STATE_BYTES,
        };
        tokio::spawn(async move {
            if let Err(e) = run_executor(options).await {
                eprintln!("sluice: executor {i} stopped: {e}");
            }
        });
    }
    Ok(scheduler)
}
