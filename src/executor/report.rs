//! What a running job reports, recorded as it comes: each step's progress and metrics event
//! (only while the executor holds the job), checkpoints stored before training goes on, and at
//! the end the results CSV, rebuilt from the stored metrics events of every attempt.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::bridge::Report;
use super::{artifacts, ExecutorContext, JobFailure};
use crate::db::{FileRecord, JobProgress, JobRecord, NewEvent};
use crate::domain::file::{FilePurpose, FileStatus};
use crate::ids::{new_id, unix_now};

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
        if let Some(pairs) = &m.preference {
            add_preference(&mut data, "valid_", pairs);
        }
        if let Some(task) = &m.task {
            add_task_metrics(&mut data, task);
        }
    }
    if let Some(pairs) = &p.preference {
        add_preference(&mut data, "train_", pairs);
    }
    if let Some(aux) = p.router_aux_loss {
        data["train_router_aux_loss"] = json!(aux);
    }
    data
}

/// Encoder tasks' validation metrics, as `valid_<name>` (`valid_accuracy`, `valid_macro_f1`,
/// `valid_f1`, `valid_recall_at_1`, ...).
fn add_task_metrics(data: &mut Value, task: &crate::train::encoder::metrics::TaskMetrics) {
    if let Ok(Value::Object(fields)) = serde_json::to_value(task) {
        for (name, value) in fields.into_iter().filter(|(name, _)| name != "task") {
            data[format!("valid_{name}")] = value;
        }
    }
}

/// TRL's preference metric names, after OpenAI's `train_` / `valid_` prefix.
const PREFERENCE_METRICS: [&str; 6] =
    ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"];

fn add_preference(data: &mut Value, prefix: &str, m: &crate::train::preference::PreferenceMetrics) {
    let values = [
        m.rewards_chosen,
        m.rewards_rejected,
        m.rewards_accuracies,
        m.rewards_margins,
        m.logps_chosen,
        m.logps_rejected,
    ];
    for (name, value) in PREFERENCE_METRICS.iter().zip(values) {
        data[format!("{prefix}{name}")] = json!(value);
    }
}

/// Records progress, metrics and checkpoints as the trainer reports them.
pub(super) async fn report_loop(
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
    // A preference job's rows also carry its reward metrics, train then validation.
    let preference = by_step.values().any(|d| d.get("train_rewards/chosen").is_some());
    let mut extra: Vec<String> = match preference {
        true => ["train_", "valid_"].iter().flat_map(|p| PREFERENCE_METRICS.map(|m| format!("{p}{m}"))).collect(),
        false => Vec::new(),
    };
    // An encoder job's rows also carry its task's validation metrics (those it reported).
    extra.extend(
        crate::domain::hyperparameters::EARLY_STOPPING_METRICS
            .iter()
            .filter(|metric| **metric != "loss")
            .map(|metric| format!("valid_{metric}"))
            .filter(|column| by_step.values().any(|d| d.get(column).is_some())),
    );
    let mut header: Vec<String> = RESULT_COLUMNS.iter().map(|c| c.to_string()).collect();
    header.extend(extra.iter().cloned());
    let mut csv = header.join(",") + "\n";
    for (step, data) in by_step {
        let field = |key: &str| data.get(key).filter(|v| v.is_number()).map(Value::to_string).unwrap_or_default();
        let mut row = vec![
            step.to_string(),
            field("train_loss"),
            field("train_mean_token_accuracy"),
            field("valid_loss"),
            field("valid_mean_token_accuracy"),
        ];
        row.extend(extra.iter().map(|key| field(key)));
        csv.push_str(&(row.join(",") + "\n"));
    }
    Ok(csv)
}

pub(super) async fn store_results_csv(context: &ExecutorContext, job: &JobRecord) -> Result<FileRecord, JobFailure> {
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
