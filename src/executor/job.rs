//! Running a queued job: stage its data (and its last checkpoint, when resuming), train on a
//! dedicated thread while heartbeats and reports flow, then store the result and end the job.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::bridge::{start_heartbeat, JobObserver, Report, SharedSignal, Signal};
use super::plan::JobPlan;
use super::validate::{job_dir, stage_file};
use super::{artifacts, ExecutorContext, JobFailure, CHECKPOINT_FILES};
use crate::db::{FileRecord, JobOutcome, JobProgress, JobRecord, ModelRecord, NewEvent};
use crate::domain::file::{FilePurpose, FileStatus};
use crate::domain::job::JobStatus;
use crate::domain::model_name::fine_tuned_model_name;
use crate::ids::{new_id, unix_now};
use crate::train::{spawn_training, StopReason, Summary, TrainError};

pub async fn run(context: &ExecutorContext, owner: &str, job: JobRecord, mut shutdown: watch::Receiver<bool>) {
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
    let outcome = train_job(context, owner, &job, signal.clone()).await;
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
    owner: &str,
    job: &JobRecord,
    signal: SharedSignal,
) -> Result<Option<JobOutcome>, JobFailure> {
    let plan: JobPlan = serde_json::from_str(&job.hyperparameters).map_err(JobFailure::platform)?;
    let model_dir =
        context.model_dir(&job.model).await.map_err(|m| JobFailure::user("model_not_available", m, Some("model")))?;
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
    let resume = stage_latest_checkpoint(context, job, &output_dir).await?;
    let start_message = match &resume {
        Some((_, step)) => format!("Fine-tuning resumed from the checkpoint at step {step} (attempt {})", job.attempts),
        None => "Fine-tuning job started".to_string(),
    };
    config.resume_from = resume.map(|(dir, _)| dir);
    let _ = context.store.add_event(&job.id, NewEvent::message(start_message)).await;

    let (reports, received) = mpsc::unbounded_channel();
    let observer = JobObserver { reports, signal: signal.clone() };
    let reporter = tokio::spawn(report_loop(context.clone(), job.id.clone(), owner.to_string(), received));
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

/// The `data` of a step's metrics event: OpenAI's names, with the validation metrics at the steps
/// where the model was evaluated (evaluation covers the whole validation file, so `valid_*` and
/// OpenAI's `full_valid_*` are the same numbers).
fn metrics_data(p: &crate::train::Progress) -> Value {
    let mut data = json!({
        "step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "train_loss": p.loss,
        "train_mean_token_accuracy": p.accuracy, "learning_rate": p.learning_rate,
        "tokens_per_second": p.tokens_per_second,
    });
    if let Some(m) = &p.eval {
        for (key, value) in [
            ("valid_loss", m.loss),
            ("valid_mean_token_accuracy", m.mean_token_accuracy),
            ("full_valid_loss", m.loss),
            ("full_valid_mean_token_accuracy", m.mean_token_accuracy),
            ("valid_perplexity", m.perplexity),
        ] {
            data[key] = json!(value);
        }
    }
    data
}

/// Records progress, metrics and checkpoints as the trainer reports them.
async fn report_loop(
    context: ExecutorContext,
    job_id: String,
    owner: String,
    mut reports: mpsc::UnboundedReceiver<Report>,
) {
    // The last step's metrics: a checkpoint is made right after the step it saves.
    let mut last: Option<(u64, Value)> = None;
    while let Some(report) = reports.recv().await {
        match report {
            Report::Progress(p) => {
                let progress = JobProgress {
                    step: p.step as i64,
                    total_steps: p.total_steps as i64,
                    epoch: p.epoch,
                    estimated_finish: Some(unix_now() + p.eta_seconds.round() as i64),
                };
                let mut message = format!("Step {}/{}: training loss={:.4}", p.step, p.total_steps, p.loss);
                if let Some(m) = &p.eval {
                    message.push_str(&format!(", validation loss={:.4}", m.loss));
                }
                let data = metrics_data(&p);
                let event = NewEvent::metrics(message, data.clone());
                if let Err(err) = context.store.record_progress(&job_id, &owner, progress, event).await {
                    tracing::warn!(error = %err, step = p.step, "could not record a step's progress");
                }
                last = Some((p.step, data));
            }
            Report::Checkpoint { step, dir, done } => {
                let prefix = format!("checkpoints/{job_id}/step-{step}");
                let metrics = match &last {
                    Some((at, data)) if *at == step => checkpoint_metrics(data),
                    _ => json!({ "step": step }),
                };
                match artifacts::upload_dir(context.storage.as_ref(), &dir, &prefix).await {
                    Ok(_) => {
                        let _ = context.store.add_checkpoint(&job_id, step as i64, &metrics, &prefix).await;
                        let _ = context
                            .store
                            .add_event(&job_id, NewEvent::message(format!("Checkpoint created at step {step}")))
                            .await;
                    }
                    Err(err) => tracing::error!(error = %err, step, "could not store a checkpoint"),
                }
                let _ = done.send(());
            }
        }
    }
}

/// A checkpoint's `metrics`: the fields of OpenAI's checkpoint metrics, from the step's metrics.
fn checkpoint_metrics(data: &Value) -> Value {
    const FIELDS: [&str; 7] = [
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "full_valid_loss",
        "full_valid_mean_token_accuracy",
    ];
    let metrics = FIELDS.iter().map(|key| (key.to_string(), data.get(*key).cloned().unwrap_or(Value::Null)));
    Value::Object(metrics.collect())
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
    let result_file = store_results_csv(context, job).await?;
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

/// The results CSV's columns, named as OpenAI's results files name them.
const RESULT_COLUMNS: [&str; 5] = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"];

/// One row per step, from the job's stored metrics events: every attempt's steps, each once (a
/// step that a resumed attempt ran again keeps the later, continued attempt's numbers).
async fn results_csv(context: &ExecutorContext, job_id: &str) -> Result<String, JobFailure> {
    let mut by_step: BTreeMap<u64, Value> = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page =
            context.store.list_events_after(job_id, after.as_deref(), 1000).await.map_err(JobFailure::platform)?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for event in page.iter().filter(|e| e.kind == "metrics") {
            let data: Value = event.data.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
            if let Some(step) = data["step"].as_u64() {
                by_step.insert(step, data);
            }
        }
    }
    let mut csv = RESULT_COLUMNS.join(",") + "\n";
    for (step, data) in by_step {
        let field = |key: &str| data.get(key).filter(|v| v.is_number()).map(Value::to_string).unwrap_or_default();
        let row = [
            step.to_string(),
            field("train_loss"),
            field("train_mean_token_accuracy"),
            field("valid_loss"),
            field("valid_mean_token_accuracy"),
        ];
        csv.push_str(&(row.join(",") + "\n"));
    }
    Ok(csv)
}

async fn store_results_csv(context: &ExecutorContext, job: &JobRecord) -> Result<FileRecord, JobFailure> {
    let csv = results_csv(context, &job.id).await?;
    let id = new_id("file");
    let key = format!("files/{}/{id}", job.project_id);
    let bytes = csv.len() as i64;
    let body = futures::stream::iter(vec![Ok(bytes::Bytes::from(csv))]);
    crate::storage::put_stream(context.storage.as_ref(), &key, Box::pin(body)).await.map_err(JobFailure::platform)?;
    Ok(FileRecord {
        id,
        project_id: job.project_id.clone(),
        filename: format!("{}-results.csv", job.id),
        purpose: FilePurpose::FineTuneResults.as_str().into(),
        bytes,
        status: FileStatus::Processed.as_str().into(),
        status_details: None,
        format: None,
        examples: None,
        storage_key: key,
        created_at: unix_now(),
    })
}
