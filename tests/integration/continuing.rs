//! Jobs that start from a fine-tuned model (`model: "ft:..."`): supervised tuning, then DPO on
//! top of it, through the API on both backends; a LoRA job on a fully fine-tuned model; and the
//! starts that cannot work, refused clearly.

use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use candle_core::{DType, Device, Tensor};
use ferrotune::data::tokenizer::ChatTokenizer;
use ferrotune::models::llama::{Adaptation, CausalLm, KvCache};
use serde_json::{json, Value};

use crate::helpers::{backends, Backend, TestApp};
use crate::jobs_e2e::{create_job, download_tar, status, wait_for};
use crate::model_numerics::fixture;
use crate::preference::{preference_accuracy, unit_pair, unit_pairs_jsonl};

/// The model in `dir` (a Hugging Face directory), with the PEFT adapter in `adapter` if given.
pub fn model_from(dir: &Path, adapter: Option<&Path>) -> CausalLm {
    let config = ferrotune::models::config::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = ferrotune::models::weights::load_model_weights(dir, DType::F32, &Device::Cpu).unwrap();
    let plan = adapter.map(|a| {
        let (config, norms, tensors) = ferrotune::peft::adapter::load_adapter(a, &Device::Cpu).unwrap();
        ferrotune::peft::lora::LoraPlan { config, seed: 0, trainable: false, train_norms: norms, loaded: Some(tensors) }
    });
    match &plan {
        Some(plan) => CausalLm::new(config, weights, Adaptation::Lora(plan)).unwrap(),
        None => CausalLm::new(config, weights, Adaptation::None).unwrap(),
    }
}

fn logits(model: &CausalLm) -> Vec<f32> {
    let ids: Vec<u32> = (0..16u32).map(|i| 4 + i * 37 % 500).collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let out = model.forward_cached(&input, &mut KvCache::default()).unwrap();
    out.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

async fn finished(app: &TestApp, id: &str, backend: Backend) -> Value {
    let job =
        wait_for(app, id, Duration::from_secs(300), |j| ["succeeded", "failed", "cancelled"].contains(&status(j)))
            .await;
    assert_eq!(status(&job), "succeeded", "{backend:?}: {job}");
    job
}

/// What `model` answers to `prompt` by greedy decoding here, rendered and decoded as chat does.
pub fn local_answer(model: &CausalLm, tokenizer: &ChatTokenizer, prompt: &str) -> String {
    let messages = json!([{"role": "user", "content": prompt}]);
    let text = tokenizer.apply_chat_template(&messages, None, true).unwrap();
    let ids = tokenizer.encode(&text, false).unwrap();
    let stop: Vec<u32> = tokenizer.eos_token_id().into_iter().collect();
    let out = ferrotune::infer::generate::generate_greedy(model, &ids, 12, &stop).unwrap();
    tokenizer.decode(&out, true).unwrap()
}

async fn chat(app: &TestApp, model: &str, prompt: &str) -> String {
    let messages = json!([{"role": "user", "content": prompt}]);
    let body = json!({"model": model, "messages": messages, "max_tokens": 12, "temperature": 0});
    let response = app.post_json("/v1/chat/completions", &body, None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    response.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

/// The non-preferred answers as a chat dataset: supervised tuning on them makes a model that
/// answers with a thing, which DPO then has to turn around.
fn thing_answers_jsonl() -> String {
    (0..48)
        .map(|i| {
            let pair = unit_pair(i);
            let mut messages = pair["input"]["messages"].as_array().unwrap().clone();
            messages.extend(pair["non_preferred_output"].as_array().unwrap().iter().cloned());
            json!({ "messages": messages }).to_string() + "\n"
        })
        .collect()
}

#[tokio::test]
async fn dpo_continues_from_a_supervised_model_and_serves_on_top_of_it() {
    let tokenizer = ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    for backend in backends() {
        let mut app = TestApp::spawn(backend).await;
        app.start_executors(1);
        let things = app.upload_dataset("things.jsonl", &thing_answers_jsonl(), None).await;
        let sft = json!({
            "model": "tiny-llama", "training_file": things["id"], "suffix": "sft", "seed": 3,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 10, "batch_size": 4, "learning_rate": 0.005, "lora": {"r": 8, "alpha": 16}, "max_seq_len": 64
            }}},
        });
        let parent_job = finished(&app, &create_job(&app, &sft).await, backend).await;
        let parent = parent_job["fine_tuned_model"].as_str().unwrap().to_string();
        let parent_adapter = download_tar(&app, &parent, "").await;
        let parent_model = model_from(&fixture("llama"), Some(parent_adapter.path()));
        let parent_accuracy = preference_accuracy(&parent_model, &tokenizer);

        let prefs = app.upload_dataset("prefs.jsonl", &unit_pairs_jsonl(0..48), None).await;
        let dpo = json!({
            "model": parent, "training_file": prefs["id"], "suffix": "dpo", "seed": 5,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {
                "n_epochs": 24, "batch_size": 4, "learning_rate": 0.005, "lr_scheduler": "cosine",
                "lora": {"r": 16, "alpha": 32}, "max_seq_len": 64, "rpo_alpha": 1.0
            }}},
        });
        let child_job = finished(&app, &create_job(&app, &dpo).await, backend).await;
        let child = child_job["fine_tuned_model"].as_str().unwrap().to_string();
        assert!(child.starts_with("ft:tiny-llama:") && child.ends_with(&child_job["id"].as_str().unwrap()[6..]));
        let shown = app.get(&format!("/v1/models/{child}"), None).await.json();
        assert_eq!((shown["parent"].as_str(), shown["root"].as_str()), (Some(parent.as_str()), Some("tiny-llama")));
        assert_eq!(child_job["model"], parent);

        // The child's adapter is relative to the parent: the merged download is the base with
        // the parent's adapter folded in, then the child's.
        let adapter = download_tar(&app, &child, "").await;
        let merged = download_tar(&app, &child, "?format=merged").await;
        let parent_merged = tempfile::tempdir().unwrap();
        let parent_dir = parent_merged.path().join("model");
        ferrotune::train::output::merge_adapter_dir(&fixture("llama"), parent_adapter.path(), &parent_dir).unwrap();
        let composed = model_from(&parent_dir, Some(adapter.path()));
        let downloaded = model_from(merged.path(), None);
        let diff = max_abs_diff(&logits(&composed), &logits(&downloaded));
        assert!(diff < 1e-4, "{backend:?}: merged download vs base+parent+child: {diff}");
        let on_base = model_from(&fixture("llama"), Some(adapter.path()));
        assert!(max_abs_diff(&logits(&on_base), &logits(&downloaded)) > 1e-2, "the child must not sit on the base");

        let child_accuracy = preference_accuracy(&composed, &tokenizer);
        eprintln!("{backend:?}: held-out preference accuracy: parent (SFT on things) {parent_accuracy:.3}, child (DPO from it) {child_accuracy:.3}");
        assert!(parent_accuracy <= 0.25, "{backend:?}: the supervised parent prefers things: {parent_accuracy}");
        assert!(child_accuracy >= 0.9, "{backend:?}: DPO from the parent: {child_accuracy}");

        // Served: the child over the merged parent, the parent still over the base.
        let answer = chat(&app, &child, "Measure item 117.").await;
        let unit = answer.split_whitespace().last().unwrap_or_default().to_string();
        assert!(["km", "kg", "cm", "ml", "mm", "kw"].contains(&unit.as_str()), "{backend:?}: child answers {answer:?}");
        let answer = chat(&app, &parent, "Measure item 117.").await;
        let thing = answer.split_whitespace().last().unwrap_or_default().to_string();
        assert!(["red", "cat", "sun", "box", "pen", "toy"].contains(&thing.as_str()), "parent answers {answer:?}");

        // The parent stays while a model stands on it.
        app.delete(&format!("/v1/models/{parent}"), None).await.assert_error(StatusCode::CONFLICT, "model_in_use");
        assert_eq!(app.delete(&format!("/v1/models/{child}"), None).await.status, StatusCode::OK);
        assert_eq!(app.delete(&format!("/v1/models/{parent}"), None).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_lora_job_trains_on_a_fully_fine_tuned_model() {
    let mut app = TestApp::spawn(Backend::SqliteLocal).await;
    app.start_executors(1);
    let file = crate::jobs_e2e::upload_qa(&app).await;
    let mut full = crate::jobs_e2e::job_request(&file, 1, 4, 0);
    full["method"]["supervised"]["hyperparameters"] =
        json!({"n_epochs": 1, "batch_size": 4, "training_type": "full", "learning_rate": 1e-3});
    let parent = finished(&app, &create_job(&app, &full).await, Backend::SqliteLocal).await;
    let parent = parent["fine_tuned_model"].as_str().unwrap().to_string();
    let mut lora = crate::jobs_e2e::job_request(&file, 1, 4, 0);
    lora["model"] = json!(parent);
    let child = finished(&app, &create_job(&app, &lora).await, Backend::SqliteLocal).await;
    let child = child["fine_tuned_model"].as_str().unwrap().to_string();

    let parent_dir = download_tar(&app, &parent, "").await;
    let adapter = download_tar(&app, &child, "").await;
    let merged = download_tar(&app, &child, "?format=merged").await;
    let composed = logits(&model_from(parent_dir.path(), Some(adapter.path())));
    let diff = max_abs_diff(&composed, &logits(&model_from(merged.path(), None)));
    assert!(diff < 1e-4, "merged download vs full parent + adapter: {diff}");
    // Served over the parent's engine (which the parent served on its own shares): each answers
    // what its weights answer here.
    let tokenizer = ChatTokenizer::from_dir(parent_dir.path()).unwrap();
    let question = "What is code number 3?";
    let child_answer = local_answer(&model_from(parent_dir.path(), Some(adapter.path())), &tokenizer, question);
    let parent_answer = local_answer(&model_from(parent_dir.path(), None), &tokenizer, question);
    assert_ne!(child_answer, parent_answer, "the adapter changes the answer");
    assert_eq!(chat(&app, &child, question).await, child_answer);
    assert_eq!(chat(&app, &parent, question).await, parent_answer);
}

/// A model row (no files unless `files`) of `project`, as a finished job would leave it.
async fn model_row(app: &TestApp, project: &str, job: &str, method: &str) -> String {
    let model = ferrotune::db::ModelRecord {
        id: format!("ft:tiny-llama:p:x:{job}"),
        project_id: project.into(),
        job_id: None,
        base_model: "tiny-llama".into(),
        method: method.into(),
        storage_key: format!("models/{project}/ftjob-{job}"),
        created_at: 1_800_000_000,
    };
    app.store().insert_model(&model).await.unwrap();
    model.id
}

#[tokio::test]
async fn starts_that_cannot_work_are_refused_clearly() {
    let mut app = TestApp::spawn(Backend::SqliteLocal).await;
    app.start_executors(1);
    let file = crate::jobs_e2e::upload_qa(&app).await;
    let default = ferrotune::db::DEFAULT_PROJECT_ID;
    let lora = model_row(&app, default, "lora1", "lora").await;
    let bottleneck = model_row(&app, default, "neck1", "bottleneck").await;
    let prefix = model_row(&app, default, "prefix1", "prefix").await;
    let request = |model: &str| {
        let mut body = crate::jobs_e2e::job_request(&file, 1, 4, 0);
        body["model"] = json!(model);
        body
    };
    let cases = [
        ("ft:tiny-llama:default::nosuchjob".to_string(), "model_not_found"),
        (format!("{lora}:ckpt-step-2"), "model_not_supported"),
        (bottleneck.clone(), "model_not_supported"),
        (prefix.clone(), "model_not_supported"),
    ];
    for (model, code) in cases {
        let response = app.post_json("/v1/fine_tuning/jobs", &request(&model), None).await;
        let error = response.assert_error(StatusCode::BAD_REQUEST, code);
        assert_eq!(error["param"], "model", "{model}: {error}");
    }
    // A parent whose files are gone: the job is accepted, then fails saying why.
    let id = create_job(&app, &request(&lora)).await;
    let job = wait_for(&app, &id, Duration::from_secs(60), |j| ["succeeded", "failed"].contains(&status(j))).await;
    assert_eq!(status(&job), "failed", "{job}");
    assert_eq!(job["error"]["code"], "model_not_available", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("could not fetch the adapter of") && message.contains(&lora), "{message}");

    // Another project's model looks like no model at all (keys end anonymous access, so last).
    let other_key = app.create_key("other").await;
    let theirs = app.post_json("/v1/fine_tuning/jobs", &request(&lora), Some(&other_key)).await;
    theirs.assert_error(StatusCode::BAD_REQUEST, "model_not_found");
}
