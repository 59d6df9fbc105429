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
        if crate::models::bert::config::is_encoder_dir(&model_dir) {
            return check_encoder_data(&model_dir, &train, validation.as_deref(), &request, method);
        }
        if crate::models::t5::config::is_seq2seq_dir(&model_dir) {
            return check_seq2seq_data(&model_dir, &train, validation.as_deref(), &request, method);
        }
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

/// An encoder base: the files must hold one encoder task's data (labels of the validation file
/// among the training file's); counts its examples and tokens and resolves the plan.
/// DPO, and the training types in `refused`, on a base that is not a decoder (`what` it is).
fn refuse_non_decoder_settings(
    what: &str,
    method: MethodType,
    training_type: Option<crate::domain::hyperparameters::TrainingType>,
    refused: &[crate::domain::hyperparameters::TrainingType],
) -> Result<(), JobFailure> {
    use crate::domain::hyperparameters::TrainingType;
    if method == MethodType::Dpo {
        return Err(JobFailure::user(
            "invalid_file_format",
            format!("dpo trains decoder models; the base model is an {what}"),
            Some("method"),
        ));
    }
    let Some(kind) = training_type.filter(|t| refused.contains(t)) else { return Ok(()) };
    let allowed: Vec<String> = [TrainingType::Lora, TrainingType::Full, TrainingType::Bottleneck]
        .into_iter()
        .filter(|t| !refused.contains(t))
        .map(|t| format!("{t:?}").to_lowercase())
        .collect();
    Err(JobFailure::user(
        "invalid_hyperparameters",
        format!(
            "training_type {} does not apply to {what} models; use {}",
            format!("{kind:?}").to_lowercase(),
            allowed.join(", ")
        ),
        Some("method.supervised.hyperparameters.training_type"),
    ))
}

fn check_encoder_data(
    model_dir: &Path,
    train: &Path,
    validation: Option<&Path>,
    request: &HyperparametersRequest,
    method: MethodType,
) -> Result<JobPlan, JobFailure> {
    use crate::data::encoder::{encode_task_dataset, EncoderTokenizer};
    use crate::domain::hyperparameters::TrainingType;
    let config =
        crate::models::bert::EncoderConfig::from_file(&model_dir.join("config.json")).map_err(JobFailure::platform)?;
    let what = format!("encoder ({})", config.model_type);
    refuse_non_decoder_settings(&what, method, request.training_type, &[TrainingType::Qlora, TrainingType::Prefix])?;
    let tokenizer = EncoderTokenizer::from_dir(model_dir).map_err(JobFailure::platform)?;
    let max_len = request.max_seq_len.unwrap_or(512).min(config.max_tokens());
    let user = |param: &'static str| {
        move |e: crate::data::DataError| JobFailure::user("invalid_file", e.to_string(), Some(param))
    };
    let data = load_jsonl(train).map_err(user("training_file"))?;
    let task = crate::train::encoder::task_for(&data).ok_or_else(|| {
        JobFailure::user(
            "invalid_file_format",
            format!(
                "the training file is a {} dataset; an encoder base ({}) trains on classification, \
                 token_classification or embedding data",
                data.format.human_name(),
                config.model_type
            ),
            Some("training_file"),
        )
    })?;
    let labels = task.labels().map(<[String]>::to_vec).unwrap_or_default();
    if task.labels().is_some() && labels.len() < 2 {
        return Err(JobFailure::user(
            "invalid_file",
            format!("the training file has {} distinct label(s); classification needs at least 2", labels.len()),
            Some("training_file"),
        ));
    }
    let (_, counts) = encode_task_dataset(&tokenizer, &data, &labels, max_len).map_err(user("training_file"))?;
    if let Some(path) = validation {
        let held_out = load_jsonl(path).map_err(user("validation_file"))?;
        encode_task_dataset(&tokenizer, &held_out, &labels, max_len).map_err(user("validation_file"))?;
    }
    Ok(JobPlan::resolve(request, method, counts.examples, counts.tokens, config.max_tokens()))
}

/// The longest input or target a T5 job trains on unless `max_seq_len` says otherwise (relative
/// positions set no limit; memory does).
const SEQ2SEQ_DEFAULT_LEN: usize = 512;

/// An encoder-decoder (T5) base: the files must hold `prompt_completion` data, and the training
/// type be full or LoRA; counts its examples and tokens and resolves the plan.
fn check_seq2seq_data(
    model_dir: &Path,
    train: &Path,
    validation: Option<&Path>,
    request: &HyperparametersRequest,
    method: MethodType,
) -> Result<JobPlan, JobFailure> {
    use crate::data::encoder::EncoderTokenizer;
    use crate::domain::dataset::DatasetFormat;
    use crate::domain::hyperparameters::TrainingType;
    let refused = [TrainingType::Qlora, TrainingType::Prefix, TrainingType::Bottleneck];
    refuse_non_decoder_settings("encoder-decoder (T5)", method, request.training_type, &refused)?;
    let tokenizer = EncoderTokenizer::from_dir(model_dir).map_err(JobFailure::platform)?;
    let max_len = request.max_seq_len.unwrap_or(SEQ2SEQ_DEFAULT_LEN);
    let load = |path: &Path, param: &'static str| {
        let data = load_jsonl(path).map_err(|e| JobFailure::user("invalid_file", e.to_string(), Some(param)))?;
        if data.format != DatasetFormat::PromptCompletion {
            return Err(JobFailure::user(
                "invalid_file_format",
                format!(
                    "the {param} is a {} dataset; an encoder-decoder (T5) base trains on prompt_completion data",
                    data.format.human_name()
                ),
                Some(param),
            ));
        }
        crate::train::seq2seq::encode(&tokenizer, &data, max_len)
            .map_err(|e| JobFailure::user("invalid_file", e.to_string(), Some(param)))
    };
    let (examples, _) = load(train, "training_file")?;
    if let Some(path) = validation {
        load(path, "validation_file")?;
    }
    let tokens = examples.iter().map(|e| e.input.len() + e.labels.len()).sum();
    Ok(JobPlan::resolve(request, method, examples.len(), tokens, max_len))
}
