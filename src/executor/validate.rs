//! `validating_files`: the job's data is tokenized with its base model's tokenizer, counted and
//! checked; the hyperparameters are resolved against it; then the job is queued (or fails with a
//! user error naming the file).

use std::path::{Path, PathBuf};

use super::bridge::{start_heartbeat, SharedSignal};
use super::plan::JobPlan;
use super::{artifacts, ExecutorContext, JobFailure};
use crate::data::dataset::{encode_dataset, load_jsonl};
use crate::data::examples::EncodeOptions;
use crate::data::preference::encode_preference_dataset;
use crate::data::tokenizer::ChatTokenizer;
use crate::db::{JobRecord, NewEvent};
use crate::domain::hyperparameters::{HyperparametersRequest, MethodType};
use crate::models::config::ModelConfig;

pub async fn validate(context: &ExecutorContext, owner: &str, job: JobRecord) {
    let heartbeat = start_heartbeat(context, &job.id, owner, SharedSignal::default());
    let result = check(context, &job).await;
    heartbeat.abort();
    let stored = match result {
        Ok(plan) => {
            let message = format!(
                "Files validated: {} {}, {} tokens; {} epochs of batch {} make {} steps",
                plan.examples,
                if plan.loss.is_some() { "preference pairs" } else { "examples" },
                plan.tokens,
                plan.n_epochs,
                plan.batch_size,
                plan.total_steps
            );
            let plan = serde_json::to_string(&plan).expect("a plan serializes");
            // The staged data stays: if this machine also runs the job, it is not downloaded again.
            context.store.finish_validation(&job.id, &plan, NewEvent::message(message)).await
        }
        Err(failure) => {
            let _ = tokio::fs::remove_dir_all(job_dir(context, &job.id)).await;
            context.store.complete_job(&job.id, owner, failure.outcome()).await
        }
    };
    if let Err(err) = stored {
        tracing::error!(error = %err, "could not record the validation result; the lease will lapse and it runs again");
    }
}

pub fn job_dir(context: &ExecutorContext, job_id: &str) -> PathBuf {
    context.settings.work_dir.join(job_id)
}

/// Downloads a file of the job's project into `dir/<file id>.jsonl`.
pub async fn stage_file(
    context: &ExecutorContext,
    job: &JobRecord,
    file_id: &str,
    param: &'static str,
    dir: &Path,
) -> Result<PathBuf, JobFailure> {
    let record =
        context.store.get_file(&job.project_id, file_id).await.map_err(JobFailure::platform)?.ok_or_else(|| {
            JobFailure::user("file_not_found", format!("file {file_id} no longer exists"), Some(param))
        })?;
    let path = dir.join(format!("{file_id}.jsonl"));
    if !path.exists() {
        artifacts::download(context.storage.as_ref(), &record.storage_key, &path)
            .await
            .map_err(JobFailure::platform)?;
    }
    Ok(path)
}

async fn check(context: &ExecutorContext, job: &JobRecord) -> Result<JobPlan, JobFailure> {
    let request: HyperparametersRequest = serde_json::from_str(&job.hyperparameters).map_err(JobFailure::platform)?;
    let model_dir = context
        .model_dir(&job.project_id, &job.model)
        .await
        .map_err(|m| JobFailure::user("model_not_available", m, Some("model")))?;
    let data_dir = job_dir(context, &job.id).join("data");
    tokio::fs::create_dir_all(&data_dir).await.map_err(JobFailure::platform)?;
    let train = stage_file(context, job, &job.training_file, "training_file", &data_dir).await?;
    let validation = match &job.validation_file {
        Some(id) => Some(stage_file(context, job, id, "validation_file", &data_dir).await?),
        None => None,
    };
    let request_seq = request.max_seq_len;
    let method = MethodType::of(&serde_json::from_str(&job.method).map_err(JobFailure::platform)?);
    tokio::task::spawn_blocking(move || {
        let config = ModelConfig::from_file(&model_dir.join("config.json")).map_err(JobFailure::platform)?;
        let tokenizer = ChatTokenizer::from_dir(&model_dir).map_err(JobFailure::platform)?;
        let options = EncodeOptions {
            max_seq_len: request_seq.unwrap_or(1024).min(config.max_position_embeddings),
            train_on_inputs: false,
        };
        let count = |path: &Path, param: &'static str| -> Result<(usize, usize), JobFailure> {
            let user = |e: crate::data::DataError| JobFailure::user("invalid_file", e.to_string(), Some(param));
            let data = load_jsonl(path).map_err(user)?;
            let stats = match method {
                MethodType::Supervised => encode_dataset(&tokenizer, &data, &options).map_err(user)?.stats,
                MethodType::Dpo => encode_preference_dataset(&tokenizer, &data, &options).map_err(user)?.stats,
            };
            if stats.examples == 0 {
                let message = match method {
                    MethodType::Supervised => "no example has anything to learn once truncated to max_seq_len".into(),
                    MethodType::Dpo => format!(
                        "no preference pair fits max_seq_len {}: each prompt leaves no room for its answers",
                        options.max_seq_len
                    ),
                };
                return Err(JobFailure::user("invalid_file", message, Some(param)));
            }
            Ok((stats.examples, stats.tokens))
        };
        let (examples, tokens) = count(&train, "training_file")?;
        if let Some(path) = &validation {
            count(path, "validation_file")?;
        }
        Ok(JobPlan::resolve(&request, method, examples, tokens, config.max_position_embeddings))
    })
    .await
    .map_err(JobFailure::platform)?
}
