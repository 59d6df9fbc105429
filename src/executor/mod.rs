//! The executor pool: workers that claim jobs from the database, validate their data, train them
//! on a dedicated thread, report progress and checkpoints, and survive crashes (a job whose
//! executor dies goes back to the queue when its lease lapses and resumes from its last
//! checkpoint). Used in-process by `serve` and alone by `ferrotune worker`.

mod artifacts;
mod base_model;
pub use artifacts::download_files;
pub(crate) use base_model::{download_once, download_once_with};
pub use base_model::{local_model_dir, ModelSources};
mod bridge;
pub use bridge::{JobSignals, CONTROL_POLL};
mod job;
pub mod plan;
mod report;
mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::catalog::Catalog;
use crate::db::{JobOutcome, JobRecord, NewEvent, Store};
use crate::device::DeviceSpec;
use crate::domain::job::JobStatus;
use crate::storage::ArtifactStore;

/// Files a checkpoint consists of (see `train::checkpoint`).
pub const CHECKPOINT_FILES: [&str; 3] = ["trainable.safetensors", "optimizer.safetensors", "state.json"];

#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    /// Executors on the CPU, when `devices` is empty.
    pub executors: usize,
    /// One executor per device (a GPU each, usually); each job trains on its executor's device.
    pub devices: Vec<DeviceSpec>,
    /// How long a claim lasts without a heartbeat.
    pub lease: Duration,
    pub poll_interval: Duration,
    /// Scratch space for data, checkpoints and outputs of running jobs.
    pub work_dir: PathBuf,
}

/// Everything an executor works with.
#[derive(Clone)]
pub struct ExecutorContext {
    pub store: Arc<dyn Store>,
    pub storage: Arc<dyn ArtifactStore>,
    pub catalog: Arc<Catalog>,
    pub settings: ExecutorSettings,
    /// Shared with this process's API, which delivers cancel/pause requests through it.
    pub signals: JobSignals,
}

impl ExecutorSettings {
    /// The device of each executor to start.
    pub fn executor_devices(&self) -> Vec<DeviceSpec> {
        if self.devices.is_empty() {
            vec![DeviceSpec::Cpu; self.executors]
        } else {
            self.devices.clone()
        }
    }
}

/// One executor: its lease-owner name, and the host and device it trains on.
#[derive(Debug, Clone)]
pub struct Executor {
    pub owner: String,
    pub host: String,
    pub device: DeviceSpec,
}

impl Executor {
    /// `host (device)`, as the job record and its events show it.
    pub fn label(&self) -> String {
        format!("{} ({})", self.host, self.device)
    }
}

impl ExecutorContext {
    fn lease_secs(&self) -> i64 {
        self.settings.lease.as_secs().max(1) as i64
    }

    /// The local directory of the model to train, or why it cannot be trained here: `name` is a
    /// base model or a fine-tuned model of `project`.
    async fn model_dir(&self, project: &str, name: &str) -> Result<PathBuf, String> {
        let sources = ModelSources {
            catalog: &self.catalog,
            storage: self.storage.as_ref(),
            fine_tuned: Some((self.store.as_ref(), project)),
        };
        local_model_dir(sources, name, &self.settings.work_dir.join("base-models")).await
    }
}

/// A failure that ends a job: user errors (bad data or settings) keep their own code and param.
#[derive(Debug)]
pub struct JobFailure {
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
}

impl JobFailure {
    pub fn platform(message: impl std::fmt::Display) -> Self {
        Self {
            code: "internal_error",
            message: format!("the service failed while running the job: {message}"),
            param: None,
        }
    }

    pub fn user(code: &'static str, message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { code, message: message.into(), param }
    }

    fn outcome(&self) -> JobOutcome {
        JobOutcome {
            status: JobStatus::Failed,
            trained_tokens: None,
            model: None,
            result_file: None,
            error: Some(serde_json::json!({ "code": self.code, "message": self.message, "param": self.param })),
            event: NewEvent::error(format!("Job failed: {}", self.message)),
        }
    }
}

pub struct ExecutorPool {
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl ExecutorPool {
    /// Starts one executor per device of the settings on the current runtime (training itself
    /// runs on dedicated threads, never on the runtime's workers).
    pub fn start(context: ExecutorContext) -> Self {
        let (stop, stopped) = watch::channel(false);
        let host = hostname();
        let workers = context
            .settings
            .executor_devices()
            .into_iter()
            .enumerate()
            .map(|(i, device)| {
                let owner = format!("{host}-{}-{i}", crate::ids::random_alphanumeric(6));
                let executor = Executor { owner, host: host.clone(), device };
                tokio::spawn(executor_loop(context.clone(), executor, stopped.clone()))
            })
            .collect();
        Self { stop, workers }
    }

    /// Asks every executor to stop: running jobs checkpoint and go back to the queue.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for worker in self.workers {
            let _ = worker.await;
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "executor".into())
}

#[tracing::instrument(skip(context, stopped), fields(owner = %executor.owner, device = %executor.device))]
async fn executor_loop(context: ExecutorContext, executor: Executor, mut stopped: watch::Receiver<bool>) {
    tracing::info!("executor started");
    let owner = &executor.owner;
    while !*stopped.borrow() {
        match next_job(&context, owner).await {
            Ok(Some((job, validating))) => {
                let span = tracing::info_span!("job", job = %job.id);
                if validating {
                    validate::validate(&context, owner, job).instrument(span).await;
                } else {
                    job::run(&context, &executor, job, stopped.clone()).instrument(span).await;
                }
            }
            Ok(None) => {
                tokio::select! {
                    _ = tokio::time::sleep(context.settings.poll_interval) => {}
                    _ = stopped.changed() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not poll for jobs");
                tokio::time::sleep(context.settings.poll_interval).await;
            }
        }
    }
    tracing::info!("executor stopped");
}

/// Requeues abandoned jobs, then claims validation work first, training second.
async fn next_job(context: &ExecutorContext, owner: &str) -> Result<Option<(JobRecord, bool)>, crate::db::DbError> {
    let requeued = context.store.requeue_expired().await?;
    if !requeued.is_empty() {
        tracing::warn!(jobs = ?requeued, "requeued jobs whose executor stopped responding");
    }
    let lease = context.lease_secs();
    if let Some(job) = context.store.claim_job(JobStatus::ValidatingFiles, owner, lease).await? {
        return Ok(Some((job, true)));
    }
    Ok(context.store.claim_job(JobStatus::Queued, owner, lease).await?.map(|job| (job, false)))
}
