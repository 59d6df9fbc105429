//! Architectures beyond Llama through the whole service: a job trains on them, the model serves
//! what it learned, and downloads load back. (Their numerics against transformers/PEFT are in
//! `model_numerics`, which runs every fixture family.)

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::{backends, test_catalog, TestApp};
use crate::jobs_e2e::{create_job, download_tar, job_request, status, upload_qa, wait_for};
use crate::model_numerics::fixture;

#[tokio::test]
async fn a_qwen3_model_learns_through_a_job_and_serves_what_it_learned() {
    for backend in backends() {
        let mut app = TestApp::spawn_with(backend, |settings| {
            let mut catalog = test_catalog();
            catalog.add("tiny-qwen3", ferrotune::catalog::ModelSource::Directory(fixture("qwen3"))).unwrap();
            settings.catalog = Arc::new(catalog);
        })
        .await;
        app.start_executors(1);
        let file = upload_qa(&app).await;
        let mut request = job_request(&file, 30, 4, 0);
        request["model"] = json!("tiny-qwen3");
        let id = create_job(&app, &request).await;
        let job = wait_for(&app, &id, Duration::from_secs(300), |j| ["succeeded", "failed"].contains(&status(j))).await;
        assert_eq!(status(&job), "succeeded", "{backend:?}: {job}");
        let model = job["fine_tuned_model"].as_str().unwrap();
        assert!(model.starts_with("ft:tiny-qwen3:"), "{model}");

        let messages = json!([{"role": "user", "content": "What is code number 3?"}]);
        let body = json!({"model": model, "messages": messages, "max_tokens": 16, "temperature": 0});
        let response = app.post_json("/v1/chat/completions", &body, None).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let answer = response.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        // What it was taught (a tiny model may run on past the turn's end within max_tokens).
        assert!(answer.starts_with("The code is cloud."), "{backend:?}: {answer:?}");

        // The merged download is a Qwen3 directory with the per-head norms, loadable as a base.
        let merged = download_tar(&app, model, "?format=merged").await;
        let config = ferrotune::models::config::ModelConfig::from_file(&merged.path().join("config.json")).unwrap();
        assert!(config.qk_norm && config.model_type == "qwen3");
        let weights = ferrotune::models::weights::load_model_weights(
            merged.path(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(weights.contains_key("model.layers.1.self_attn.k_norm.weight"));
    }
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
