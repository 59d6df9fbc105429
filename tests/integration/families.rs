//! Architectures beyond Llama through the whole service: a job trains on them, the model serves
//! what it learned, and downloads load back. (Their numerics against transformers/PEFT are in
//! `model_numerics`, which runs every fixture family.)

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{backends, test_catalog, TestApp};
use crate::jobs_e2e::{create_job, download_tar, job_request, status, upload_qa, wait_for};
use crate::model_numerics::fixture;

/// A LoRA job on fixture `family` (catalog name `tiny-<family>`, its `config.json` updated with
/// `config`) succeeds on every backend, the model answers what it was taught, and its merged
/// download is a `family` directory holding `weight` (a tensor only that family has).
async fn learns_through_a_job_and_serves_what_it_learned(family: &str, weight: &str, config: serde_json::Value) {
    let copy = tempfile::tempdir().unwrap();
    let source = ferrotune::catalog::ModelSource::Directory(copy.path().to_path_buf());
    for entry in std::fs::read_dir(fixture(family)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    let path = copy.path().join("config.json");
    let mut document: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (key, value) in config.as_object().unwrap() {
        document[key] = value.clone();
    }
    std::fs::write(&path, document.to_string()).unwrap();
    job_learns(family, source, weight, json!({})).await;
}

/// [`job_learns`] on a mixture-of-experts fixture directory. These jobs ask for a learning rate of
/// 3e-3: at the 1e-2 of the dense families' jobs the tiny MoE fixtures oscillate (Mixtral with
/// `ferrotune train`, 50 epochs: final train loss 0.44 at 1e-2, 0.03 at 3e-3).
async fn moe_job_learns(family: &str, weight: &str, hyperparameters: Value) {
    job_learns(family, ferrotune::catalog::ModelSource::Directory(fixture(family)), weight, hyperparameters).await;
}

/// A job (`hyperparameters` added to the usual LoRA ones) on `source` as `tiny-<family>`.
async fn job_learns(family: &str, source: ferrotune::catalog::ModelSource, weight: &str, hyperparameters: Value) {
    for backend in backends() {
        let base = format!("tiny-{family}");
        let mut app = TestApp::spawn_with(backend, |settings| {
            let mut catalog = test_catalog();
            catalog.add(&base, source.clone()).unwrap();
            settings.catalog = Arc::new(catalog);
        })
        .await;
        app.start_executors(1);
        let file = upload_qa(&app).await;
        let mut request = job_request(&file, 30, 4, 0);
        request["model"] = json!(base);
        for (key, value) in hyperparameters.as_object().unwrap() {
            request["method"]["supervised"]["hyperparameters"][key] = value.clone();
        }
        let id = create_job(&app, &request).await;
        let job = wait_for(&app, &id, Duration::from_secs(300), |j| ["succeeded", "failed"].contains(&status(j))).await;
        assert_eq!(status(&job), "succeeded", "{family} {backend:?}: {job}");
        let model = job["fine_tuned_model"].as_str().unwrap();
        assert!(model.starts_with(&format!("ft:{base}:")), "{model}");

        let messages = json!([{"role": "user", "content": "What is code number 3?"}]);
        let body = json!({"model": model, "messages": messages, "max_tokens": 16, "temperature": 0});
        let response = app.post_json("/v1/chat/completions", &body, None).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let answer = response.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        // What it was taught (a tiny model may run on past the turn's end within max_tokens).
        assert!(answer.starts_with("The code is cloud."), "{family} {backend:?}: {answer:?}");
        // Its checkpoints serve too (their adapters are rebuilt from the job's LoRA settings).
        let checkpoints = app.get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints"), None).await.json();
        for checkpoint in checkpoints["data"].as_array().unwrap() {
            let name = checkpoint["fine_tuned_model_checkpoint"].as_str().unwrap();
            let body = json!({"model": name, "messages": messages, "max_tokens": 4, "temperature": 0});
            let response = app.post_json("/v1/chat/completions", &body, None).await;
            assert_eq!(response.status, StatusCode::OK, "{family} {name}: {}", response.text());
        }

        // The merged download is a directory of the same family, loadable as a base.
        let merged = download_tar(&app, model, "?format=merged").await;
        let config = ferrotune::models::config::ModelConfig::from_file(&merged.path().join("config.json")).unwrap();
        // (Gemma 3's text model is `gemma3_text`.)
        assert!(config.model_type.starts_with(family), "{family}: {}", config.model_type);
        let weights = ferrotune::models::weights::load_model_weights(
            merged.path(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(weights.contains_key(weight), "{family}: {weight} in the merged model");
    }
}

#[tokio::test]
async fn a_qwen3_model_learns_through_a_job_and_serves_what_it_learned() {
    learns_through_a_job_and_serves_what_it_learned("qwen3", "model.layers.1.self_attn.k_norm.weight", json!({})).await;
}

/// A Qwen3 GGUF base (Q8_0, `tests/fixtures/gguf`): QLoRA over the weights kept quantized.
#[tokio::test]
async fn a_qwen3_gguf_base_learns_with_qlora_through_a_job() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/qwen3.gguf");
    let weight = "model.layers.1.self_attn.q_norm.weight";
    job_learns("qwen3", ferrotune::catalog::ModelSource::Gguf(path), weight, json!({"training_type": "qlora"})).await;
}

/// Phi-3: LoRA on the fused `qkv_proj` and `gate_up_proj` (what `all-linear` means there), with
/// LongRoPE. The fixture's 6-token sliding window (there to test the window against transformers)
/// hides the question's number from the answer in a 2-layer model, so the job's base has a
/// window of 32, like Phi-3-mini's 2047 longer than its conversations.
#[tokio::test]
async fn a_phi3_model_learns_through_a_job_and_serves_what_it_learned() {
    let weight = "model.layers.1.mlp.gate_up_proj.weight";
    learns_through_a_job_and_serves_what_it_learned("phi3", weight, json!({"sliding_window": 32})).await;
}

/// A Qwen3 LoRA adapter that trained the norms (PEFT's `norm` covers the per-head `q_norm` and
/// `k_norm` too) decodes in batched serving exactly as the training-path model does.
#[test]
fn a_qwen3_adapter_with_trained_norms_serves_like_its_training_model() {
    use ferrotune::models::llama::ServingAdapter;
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::training::config_for(dir.path(), ferrotune::train::Method::Lora, "qwen3");
    config.epochs = 2;
    config.learning_rate = 1e-2;
    config.lora.train_norms = true;
    let output = ferrotune::train::train(&config, &mut ferrotune::train::Silent).unwrap().output.unwrap();
    let (lora, norms, tensors) = ferrotune::peft::adapter::load_adapter(&output, &candle_core::Device::Cpu).unwrap();
    assert!(norms && tensors.keys().any(|k| k.ends_with("self_attn.q_norm.weight")), "the per-head norms are saved");
    let adapted = crate::continuing::model_from(&fixture("qwen3"), Some(&output));
    let base = crate::continuing::model_from(&fixture("qwen3"), None);
    let serving = ServingAdapter::from_peft(&base, &lora, &tensors).unwrap();
    let prompt: Vec<u32> = (0..6u32).map(|i| 40 + i * 17).collect();
    let expected = ferrotune::infer::generate::generate_greedy(&adapted, &prompt, 10, &[]).unwrap();
    let plain = ferrotune::infer::generate::generate_greedy(&base, &prompt, 10, &[]).unwrap();
    let rows = crate::inference::greedy_rows(&base, &[(prompt.clone(), Some(&serving)), (prompt, None)], 10);
    assert_eq!(rows[0], expected, "with the adapter");
    assert_eq!(rows[1], plain, "without");
}

/// Gemma 2 (soft-capping, norms after each sublayer, GeGLU, a sliding layer) and Gemma 3 (per-head
/// norms, a RoPE per layer type).
#[tokio::test]
async fn gemma_models_learn_through_a_job_and_serve_what_they_learned() {
    let weight = "model.layers.1.post_feedforward_layernorm.weight";
    learns_through_a_job_and_serves_what_it_learned("gemma2", weight, json!({})).await;
    let weight = "model.layers.1.self_attn.q_norm.weight";
    learns_through_a_job_and_serves_what_it_learned("gemma3", weight, json!({})).await;
}

/// Mixture of experts through the service: Mixtral with LoRA on the attention and on every expert
/// (PEFT `target_parameters`) and trained routers, served batched with the experts' adapters;
/// Qwen2-MoE (shared expert) and Qwen3-MoE (a dense layer too) with the default LoRA targets. The
/// merged downloads hold the experts per expert, in each family's checkpoint names.
#[tokio::test]
async fn mixture_of_experts_models_learn_through_a_job_and_serve_what_they_learned() {
    // Mixtral's all-linear as PEFT converts it (experts at twice the rank), expert LoRA asked for by
    // name, trained routers; a checkpoint half-way, served too.
    let experts = json!({"n_epochs": 50, "learning_rate": 3e-3, "n_checkpoints": 2, "lora": {"r": 16, "alpha": 32,
        "target_modules": "all-linear", "target_parameters": ["gate_up_proj", "down_proj"], "train_router": true}});
    moe_job_learns("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight", experts).await;
    let longer = json!({"n_epochs": 50, "learning_rate": 3e-3});
    moe_job_learns("qwen2_moe", "model.layers.1.mlp.shared_expert_gate.weight", longer.clone()).await;
    moe_job_learns("qwen3_moe", "model.layers.0.mlp.experts.3.up_proj.weight", longer).await;
    // A Qwen2-MoE GGUF base (Q8_0 experts, `tests/fixtures/gguf`): QLoRA over the experts kept
    // quantized, per expert.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/qwen2_moe.gguf");
    let source = ferrotune::catalog::ModelSource::Gguf(path);
    let qlora = json!({"training_type": "qlora", "n_epochs": 50, "learning_rate": 3e-3});
    job_learns("qwen2_moe", source, "model.layers.1.mlp.experts.3.down_proj.weight", qlora).await;
}

/// The mixture-of-experts fixture adapters (LoRA on attention and on every expert, routers saved
/// whole; Qwen2-MoE's shared-expert gate too) decode in batched serving, next to a row without an
/// adapter, exactly as the model built with the adapter does.
#[test]
fn moe_adapters_with_expert_lora_and_routers_serve_like_their_training_models() {
    use ferrotune::models::llama::ServingAdapter;
    for name in crate::model_numerics::MOE_MODELS {
        let (lora, _, tensors) =
            ferrotune::peft::adapter::load_adapter(&fixture(name).join("lora"), &candle_core::Device::Cpu).unwrap();
        assert!(
            lora.train_router && !lora.target_parameters.is_empty(),
            "{name}: the fixture adapts experts and routers"
        );
        let adapted = crate::continuing::model_from(&fixture(name), Some(&fixture(name).join("lora")));
        let base = crate::continuing::model_from(&fixture(name), None);
        let serving = ServingAdapter::from_peft(&base, &lora, &tensors).unwrap();
        let prompt: Vec<u32> = (0..6u32).map(|i| 40 + i * 17).collect();
        let expected = ferrotune::infer::generate::generate_greedy(&adapted, &prompt, 10, &[]).unwrap();
        let plain = ferrotune::infer::generate::generate_greedy(&base, &prompt, 10, &[]).unwrap();
        assert_ne!(expected, plain, "{name}: the adapter changes the answer");
        let rows = crate::inference::greedy_rows(&base, &[(prompt.clone(), Some(&serving)), (prompt, None)], 10);
        assert_eq!(rows[0], expected, "{name}: with the adapter");
        assert_eq!(rows[1], plain, "{name}: without");
    }
}
