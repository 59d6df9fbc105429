//! Running a queued job: stage its data (and its last checkpoint, when resuming), train on a
//! dedicated thread while heartbeats and reports flow, then store the result and end the job.

use std::path::Path;

use tokio::sync::{mpsc, watch};

use super::bridge::{start_heartbeat, JobObserver, SharedSignal, Signal};
use super::plan::JobPlan;
use super::validate::{job_dir, stage_file};
use super::{artifacts, report, Executor, ExecutorContext, JobFailure, CHECKPOINT_FILES};
use crate::db::{JobOutcome, JobRecord, ModelRecord, NewEvent};
use crate::domain::job::JobStatus;
use crate::domain::model_name::fine_tuned_model_name;
use crate::ids::unix_now;
use crate::train::{spawn_training, StopReason, Summary, TrainError};

pub async fn run(context: &ExecutorContext, executor: &Executor, job: JobRecord, mut shutdown: watch::Receiver<bool>) {
    let owner = executor.owner.as_str();
    let signal = SharedSignal::default();
    let _registered = context.signals.register(&job.id, signal.clone());
    let heartbeat = start_heartbeat(context, &job.id, owner, signal.clone());
    let watcher = {
        let signal = signal.clone();
        tokio::spawn(async move {
            while shutdown.changed().await.is_ok() {
                if *shutdown.borrow() {
                    signal.raise(Signal::Shutdown);
                }
            }
        })
    };
    let outcome = train_job(context, executor, &job, signal.clone()).await;
    heartbeat.abort();
    watcher.abort();
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(failure) => Some(failure.outcome()),
    };
    // `None`: the lease was lost, so the job is another executor's now; leave it alone.
    if let Some(outcome) = outcome {
        let terminal = outcome.status.is_terminal();
        match context.store.complete_job(&job.id, owner, outcome).await {
            Ok(true) if terminal => {
                let _ = tokio::fs::remove_dir_all(job_dir(context, &job.id)).await;
            }
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "could not record how the job ended; its lease will lapse"),
        }
    }
}

async fn train_job(
    context: &ExecutorContext,
    executor: &Executor,
    job: &JobRecord,
    signal: SharedSignal,
) -> Result<Option<JobOutcome>, JobFailure> {
    let owner = executor.owner.as_str();
    let plan: JobPlan = serde_json::from_str(&job.hyperparameters).map_err(JobFailure::platform)?;
    let model_dir = context
        .model_dir(&job.project_id, &job.model)
        .await
        .map_err(|m| JobFailure::user("model_not_available", m, Some("model")))?;
    let dir = job_dir(context, &job.id);
    let data_dir = dir.join("data");
    tokio::fs::create_dir_all(&data_dir).await.map_err(JobFailure::platform)?;
    let train_file = stage_file(context, job, &job.training_file, "training_file", &data_dir).await?;
    let validation_file = match &job.validation_file {
        Some(id) => Some(stage_file(context, job, id, "validation_file", &data_dir).await?),
        None => None,
    };
    let output_dir = dir.join("output");
    let mut config = plan.train_config(&model_dir, train_file, validation_file, output_dir.clone(), job.seed as u64);
    config.device = executor.device;
    let resume = stage_latest_checkpoint(context, job, &output_dir).await?;
    let start_message = match &resume {
        Some((_, step)) => format!("Fine-tuning resumed from the checkpoint at step {step} (attempt {})", job.attempts),
        None => "Fine-tuning job started".to_string(),
    };
    config.resume_from = resume.map(|(dir, _)| dir);
    let _ = context.store.add_event(&job.id, NewEvent::message(start_message)).await;
    let runs_on = executor.label();
    let _ = context.store.record_executor(&job.id, owner, &runs_on).await;
    let _ = context.store.add_event(&job.id, NewEvent::message(format!("Training on {runs_on}"))).await;

    let (reports, received) = mpsc::unbounded_channel();
    let observer = JobObserver { reports, signal: signal.clone() };
    let reporter = tokio::spawn(report::report_loop(context.clone(), job.id.clone(), owner.to_string(), received));
    let training = spawn_training(config, observer).map_err(JobFailure::platform)?;
    let result = tokio::task::spawn_blocking(move || {
        let result = training.join();
        // The job's model, activations and optimizer state are freed now; without this they
        // would stay resident in the allocator's arenas for the life of the process.
        crate::memory::release_free_memory();
        result
    })
    .await
    .map_err(JobFailure::platform)?
    .map_err(|_| JobFailure::platform("the training thread panicked"))?;
    reporter.await.map_err(JobFailure::platform)?;
    let summary = result.map_err(train_failure)?;
    match summary.stop {
        StopReason::Completed | StopReason::EarlyStopped => Ok(Some(finish(context, job, &plan, &summary).await?)),
        StopReason::Cancelled if signal.get() == Signal::Lost => Ok(None),
        StopReason::Cancelled => Ok(Some(simple_outcome(JobStatus::Cancelled, "Job cancelled"))),
        StopReason::Paused if signal.get() == Signal::Shutdown => Ok(Some(simple_outcome(
            JobStatus::Queued,
            "The executor is shutting down; the job is queued again and will resume from its checkpoint",
        ))),
        StopReason::Paused => {
            Ok(Some(simple_outcome(JobStatus::Paused, &format!("Job paused at step {}", summary.steps))))
        }
    }
}

fn simple_outcome(status: JobStatus, message: &str) -> JobOutcome {
    JobOutcome {
        status,
        trained_tokens: None,
        model: None,
        result_file: None,
        error: None,
        event: NewEvent::message(message),
    }
}

/// Data and settings problems are the user's; anything else is ours.
fn train_failure(err: TrainError) -> JobFailure {
    match err {
        TrainError::Data(e) => JobFailure::user("invalid_file", e.to_string(), Some("training_file")),
        TrainError::Config(e) => JobFailure::user("invalid_hyperparameters", e, Some("hyperparameters")),
        other => JobFailure::platform(other),
    }
}

/// Downloads the job's newest checkpoint into the output directory, for the trainer to resume;
/// returns its directory and step.
async fn stage_latest_checkpoint(
    context: &ExecutorContext,
    job: &JobRecord,
    output_dir: &Path,
) -> Result<Option<(std::path::PathBuf, i64)>, JobFailure> {
    let checkpoints = context.store.list_checkpoints(&job.id).await.map_err(JobFailure::platform)?;
    let Some(latest) = checkpoints.first() else { return Ok(None) };
    let dir = output_dir.join("checkpoints").join(format!("step-{}", latest.step_number));
    let names: Vec<String> = CHECKPOINT_FILES.iter().map(|s| s.to_string()).collect();
    artifacts::download_files(context.storage.as_ref(), &latest.storage_key, &names, &dir)
        .await
        .map_err(JobFailure::platform)?;
    Ok(Some((dir, latest.step_number)))
}

/// Uploads the adapter or model and the results CSV; returns the success outcome.
async fn finish(
    context: &ExecutorContext,
    job: &JobRecord,
    plan: &JobPlan,
    summary: &Summary,
) -> Result<JobOutcome, JobFailure> {
    let output = summary.output.as_ref().ok_or_else(|| JobFailure::platform("the trainer wrote no output"))?;
    let project = context
        .store
        .project_name(&job.project_id)
        .await
        .map_err(JobFailure::platform)?
        .unwrap_or_else(|| job.project_id.clone());
    let name = fine_tuned_model_name(&job.model, &project, job.suffix.as_deref(), &job.id);
    let prefix = format!("models/{}/{}", job.project_id, job.id);
    artifacts::upload_dir(context.storage.as_ref(), output, &prefix).await.map_err(JobFailure::platform)?;
    let result_file = report::store_results_csv(context, job).await?;
    let method = match plan.training_type {
        crate::domain::hyperparameters::TrainingType::Bottleneck => "bottleneck",
        crate::domain::hyperparameters::TrainingType::Prefix => "prefix",
        _ if plan.lora.is_some() => "lora",
        _ => "full",
    };
    let tokens = format!(
        "Training processed {} tokens (the examples' tokens times the epochs); the loss was computed on {} of them",
        summary.processed_tokens, summary.trained_tokens
    );
    let _ = context.store.add_event(&job.id, NewEvent::message(tokens)).await;
    // OpenAI's final message, word for word: clients wait for it.
    let message = match summary.stop {
        StopReason::EarlyStopped => "The job has successfully completed (stopped early: the validation loss stopped improving; the model keeps the best weights)",
        _ => "The job has successfully completed",
    };
    Ok(JobOutcome {
        status: JobStatus::Succeeded,
        trained_tokens: Some(summary.processed_tokens as i64),
        model: Some(ModelRecord {
            id: name,
            project_id: job.project_id.clone(),
            job_id: Some(job.id.clone()),
            base_model: job.model.clone(),
            method: method.into(),
            storage_key: prefix,
            created_at: unix_now(),
        }),
        result_file: Some(result_file),
        error: None,
        event: NewEvent::message(message),
    })
}
