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
