//! Fine-tuning jobs end to end: the API, the executor pool and the trainer together, on both
//! backends; cancel, pause/resume, many jobs on two executors, and a worker killed mid-training.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use candle_core::Device;
use serde_json::{json, Value};

use crate::helpers::{backends, Backend, TestApp};

const WORDS: [&str; 8] = ["apple", "river", "stone", "cloud", "green", "tiger", "music", "paper"];

/// A chat dataset that teaches code words, uploaded as a fine-tune file; returns its id.
pub async fn upload_qa(app: &TestApp) -> String {
    upload_qa_times(app, 1).await
}

/// The question-answer set, `times` times over (8·times examples).
async fn upload_qa_times(app: &TestApp, times: usize) -> String {
    let lines: Vec<String> = (0..times)
        .flat_map(|_| WORDS.iter().enumerate())
        .map(|(i, w)| {
            json!({"messages": [{"role": "user", "content": format!("What is code number {i}?")},
                                {"role": "assistant", "content": format!("The code is {w}.")}]})
            .to_string()
        })
        .collect();
    let file = app.upload_dataset("qa.jsonl", &(lines.join("\n") + "\n"), None).await;
    file["id"].as_str().unwrap().to_string()
}

pub fn job_request(file: &str, epochs: u32, batch: u32, checkpoints: u32) -> Value {
    json!({
        "model": "tiny-llama",
        "training_file": file,
        "suffix": "qa",
        "seed": 11,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": epochs, "batch_size": batch, "learning_rate": 1e-2, "lr_scheduler": "constant",
            "lora": {"r": 16, "alpha": 32}, "n_checkpoints": checkpoints
        }}}
    })
}

pub async fn create_job(app: &TestApp, body: &Value) -> String {
    let response = app.post_json("/v1/fine_tuning/jobs", body, None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    response.json()["id"].as_str().unwrap().to_string()
}

pub async fn get_job(app: &TestApp, id: &str) -> Value {
    app.get(&format!("/v1/fine_tuning/jobs/{id}"), None).await.json()
}

/// Polls the job until `done` holds, failing after `timeout`.
pub async fn wait_for(app: &TestApp, id: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let job = get_job(app, id).await;
        if done(&job) {
            return job;
        }
        assert!(started.elapsed() < timeout, "timed out waiting; the job is {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn status(job: &Value) -> &str {
    job["status"].as_str().unwrap_or("")
}

/// Every event of the job, oldest first.
pub async fn all_events(app: &TestApp, id: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/fine_tuning/jobs/{id}/events?limit=100&after={a}"),
            None => format!("/v1/fine_tuning/jobs/{id}/events?limit=100"),
        };
        let page = app.get(&path, None).await.json();
        let data = page["data"].as_array().unwrap().clone();
        after = data.last().and_then(|e| e["id"].as_str()).map(str::to_string);
        events.extend(data);
        if page["has_more"] != true {
            break;
        }
    }
    events.reverse();
    events
}

/// Steps of the metrics events, oldest first.
fn metric_steps(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
        .map(|e| e["data"]["step"].as_i64().unwrap())
        .collect()
}

/// The tokens of the training examples, as the validation event counts them.
pub fn validated_tokens(events: &[Value]) -> i64 {
    let message = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .find(|m| m.starts_with("Files validated"))
        .expect("a validation event");
    // "Files validated: N examples, T tokens; ..."
    let tokens = message.split(", ").nth(1).and_then(|t| t.split(' ').next()).unwrap();
    tokens.parse().unwrap()
}

/// The steps of a results CSV's rows, in order.
pub fn csv_steps(csv: &str) -> Vec<i64> {
    csv.lines().skip(1).map(|line| line.split(',').next().unwrap().parse().unwrap()).collect()
}

/// Downloads a job's results CSV.
pub async fn results_csv(app: &TestApp, job: &Value) -> String {
    let results = job["result_files"][0].as_str().expect("a results file");
    let response = app.get(&format!("/v1/files/{results}/content"), None).await;
    assert_eq!(response.status, StatusCode::OK);
    response.text()
}

/// The adapter tensors of a finished job, read back from artifact storage.
pub async fn adapter_tensors(app: &TestApp, job: &Value) -> HashMap<String, Vec<f32>> {
    let key = format!(
        "models/{}/{}/adapter_model.safetensors",
        job["organization_id"].as_str().unwrap(),
        job["id"].as_str().unwrap()
    );
    let download = app.storage().get(&key).await.unwrap();
    let chunks: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(download.body).await.unwrap();
    let tensors = candle_core::safetensors::load_buffer(&chunks.concat(), &Device::Cpu).unwrap();
    tensors.into_iter().map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap())).collect()
}

#[tokio::test]
async fn a_job_runs_from_validation_to_a_registered_model_with_checkpoints_and_results() {
    for backend in backends() {
        let mut app = TestApp::spawn(backend).await;
        app.start_executors(1);
        let file = upload_qa(&app).await;
        let id = create_job(&app, &job_request(&file, 15, 4, 3)).await;
        let job = wait_for(&app, &id, Duration::from_secs(180), |j| {
            ["succeeded", "failed", "cancelled"].contains(&status(j))
        })
        .await;
        assert_eq!(status(&job), "succeeded", "{backend:?}: {job}");
        assert_eq!(job["hyperparameters"]["n_epochs"], 15);
        assert_eq!(job["hyperparameters"]["batch_size"], 4);
        let events = all_events(&app, &id).await;
        assert_eq!(
            job["trained_tokens"].as_i64(),
            Some(15 * validated_tokens(&events)),
            "{backend:?}: OpenAI's trained_tokens is the examples' tokens times the epochs"
        );
        let model = job["fine_tuned_model"].as_str().unwrap();
        assert!(model.starts_with("ft:tiny-llama:default:qa:"), "{model}");

        let checkpoints = app.get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints"), None).await.json();
        let steps: Vec<i64> =
            checkpoints["data"].as_array().unwrap().iter().map(|c| c["step_number"].as_i64().unwrap()).collect();
        assert_eq!(
            steps,
            vec![20, 10],
            "{backend:?}: 30 steps in 3 checkpoints; the last step writes the model instead"
        );
        assert_eq!(checkpoints["data"][0]["fine_tuned_model_checkpoint"], format!("{model}:ckpt-step-20"));

        let results = job["result_files"][0].as_str().unwrap();
        let csv = app.get(&format!("/v1/files/{results}/content"), None).await.text();
        assert!(csv.starts_with("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"), "{csv}");
        assert_eq!(csv_steps(&csv), (1..=30).collect::<Vec<_>>());

        assert_eq!(metric_steps(&events), (1..=30).collect::<Vec<_>>());
        assert!(events.last().unwrap()["message"].as_str().unwrap().contains("successfully completed"));
        let models = app.get("/v1/models", None).await.json();
        assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == model), "{models}");
        assert_eq!(adapter_tensors(&app, &job).await.len(), 28, "A and B of 7 modules in 2 layers");
    }
}

#[tokio::test]
async fn a_cancelled_job_stops_within_a_step() {
    for backend in backends() {
        cancel_stops_within_a_step(backend).await;
    }
}

async fn cancel_stops_within_a_step(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    app.start_executors(1);
    let file = upload_qa(&app).await;
    let id = create_job(&app, &job_request(&file, 50, 1, 0)).await;
    wait_for(&app, &id, Duration::from_secs(60), |j| {
        status(j) == "running" && j["progress"]["step"].as_i64() >= Some(2)
    })
    .await;
    let response = app.post_json(&format!("/v1/fine_tuning/jobs/{id}/cancel"), &json!({}), None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let job = wait_for(&app, &id, Duration::from_secs(30), |j| status(j) == "cancelled").await;
    assert!(job["fine_tuned_model"].is_null());
    let stopped_at = job["progress"]["step"].as_i64().unwrap();
    assert!(stopped_at < 400, "stopped before the end: {stopped_at}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_job(&app, &id).await["progress"]["step"].as_i64().unwrap(), stopped_at, "no step after cancelling");
}

#[tokio::test]
async fn a_paused_job_checkpoints_and_resumes_where_it_stopped() {
    for backend in backends() {
        pause_and_resume(backend).await;
    }
}

async fn pause_and_resume(backend: Backend) {
    // A lease far longer than the job: the pause must not wait for a heartbeat.
    let mut app = TestApp::spawn_with(backend, |s| s.executor.lease = Duration::from_secs(60)).await;
    app.start_executors(1);
    // 40 epochs over the set 8 times (64 examples), batch 1: 2,560 steps, so the job is still
    // running when the pause lands (320 steps took about a second once training got faster).
    let file = upload_qa_times(&app, 8).await;
    let (epochs, steps) = (40, 2560);
    let id = create_job(&app, &job_request(&file, epochs, 1, 0)).await;
    wait_for(&app, &id, Duration::from_secs(60), |j| {
        status(j) == "running" && j["progress"]["step"].as_i64() >= Some(3)
    })
    .await;
    assert_eq!(
        app.post_json(&format!("/v1/fine_tuning/jobs/{id}/pause"), &json!({}), None).await.status,
        StatusCode::OK
    );
    let paused = wait_for(&app, &id, Duration::from_secs(3), |j| status(j) == "paused").await;
    let paused_step = paused["progress"]["step"].as_i64().unwrap();
    assert!(paused_step < steps, "{backend:?}: paused mid-way, at {paused_step}");
    let checkpoints = app.get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints"), None).await.json();
    assert_eq!(checkpoints["data"][0]["step_number"].as_i64(), Some(paused_step), "pausing saved a checkpoint first");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&get_job(&app, &id).await), "paused", "a paused job stays paused");

    assert_eq!(
        app.post_json(&format!("/v1/fine_tuning/jobs/{id}/resume"), &json!({}), None).await.status,
        StatusCode::OK
    );
    let job =
        wait_for(&app, &id, Duration::from_secs(180), |j| status(j) == "succeeded" || status(j) == "failed").await;
    assert_eq!(status(&job), "succeeded", "{job}");
    let events = all_events(&app, &id).await;
    assert_eq!(
        metric_steps(&events),
        (1..=steps).collect::<Vec<_>>(),
        "no step is repeated or skipped around the pause"
    );
    assert!(
        events
            .iter()
            .any(|e| e["message"]
                == format!("Fine-tuning resumed from the checkpoint at step {paused_step} (attempt 2)")),
        "{backend:?}: the resume event names the checkpoint"
    );
    assert_eq!(
        csv_steps(&results_csv(&app, &job).await),
        (1..=steps).collect::<Vec<_>>(),
        "{backend:?}: the results file holds both attempts' steps"
    );
}

/// A pause asked through another API process (a replica without this executor) reaches the
/// trainer through the database within `CONTROL_POLL`, whatever the lease.
#[tokio::test]
async fn a_pause_asked_through_another_replica_lands_within_the_control_poll() {
    for backend in backends() {
        let mut app = TestApp::spawn_with(backend, |s| s.executor.lease = Duration::from_secs(60)).await;
        app.start_executors(1);
        let file = upload_qa_times(&app, 8).await;
        let id = create_job(&app, &job_request(&file, 40, 1, 0)).await;
        wait_for(&app, &id, Duration::from_secs(60), |j| {
            status(j) == "running" && j["progress"]["step"].as_i64() >= Some(3)
        })
        .await;
        let replica = app.replica().await;
        let response = replica.post_json(&format!("/v1/fine_tuning/jobs/{id}/pause"), &json!({}), None).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let asked = Instant::now();
        let paused = wait_for(&app, &id, Duration::from_secs(10), |j| status(j) == "paused").await;
        let waited = asked.elapsed();
        assert!(
            waited < ferrotune::executor::CONTROL_POLL + Duration::from_secs(2),
            "{backend:?}: paused after {waited:?}"
        );
        assert!(paused["progress"]["step"].as_i64().unwrap() < 2560);
    }
}

/// Validation metrics are part of the step's metrics event, as in OpenAI's: one event per step,
/// `valid_loss` beside `train_loss` where the model was evaluated, and in the results file.
#[tokio::test]
async fn validation_metrics_come_in_the_step_s_metrics_event() {
    for backend in backends() {
        let mut app = TestApp::spawn(backend).await;
        app.start_executors(1);
        let file = upload_qa(&app).await;
        let validation = upload_qa(&app).await;
        let mut request = job_request(&file, 3, 2, 0);
        request["validation_file"] = json!(validation);
        request["method"]["supervised"]["hyperparameters"]["eval_interval"] = json!(4);
        let id = create_job(&app, &request).await;
        let job = wait_for(&app, &id, Duration::from_secs(120), |j| ["succeeded", "failed"].contains(&status(j))).await;
        assert_eq!(status(&job), "succeeded", "{backend:?}: {job}");
        let events = all_events(&app, &id).await;
        let metrics: Vec<&Value> = events.iter().filter(|e| e["type"] == "metrics").collect();
        let steps: Vec<i64> = metrics.iter().map(|e| e["data"]["step"].as_i64().unwrap()).collect();
        assert_eq!(steps, (1..=12).collect::<Vec<_>>(), "{backend:?}: one metrics event per step");
        for event in &metrics {
            let step = event["data"]["step"].as_i64().unwrap();
            assert!(event["data"]["train_loss"].is_number(), "{event}");
            assert_eq!(event["data"]["valid_loss"].is_number(), step % 4 == 0, "{event}");
            assert_eq!(event["data"]["full_valid_loss"], event["data"]["valid_loss"], "{event}");
        }
        let csv = results_csv(&app, &job).await;
        for line in csv.lines().skip(1) {
            let fields: Vec<&str> = line.split(',').collect();
            let step: i64 = fields[0].parse().unwrap();
            assert_eq!(!fields[3].is_empty(), step % 4 == 0, "{backend:?}: {line}");
        }
    }
}

#[tokio::test]
async fn two_workers_run_ten_jobs_each_exactly_once() {
    for backend in backends() {
        let mut app = TestApp::spawn(backend).await;
        app.start_executors(1);
        app.start_executors(1);
        let file = upload_qa(&app).await;
        let mut ids = Vec::new();
        for _ in 0..10 {
            ids.push(create_job(&app, &job_request(&file, 2, 4, 0)).await);
        }
        for id in &ids {
            let job =
                wait_for(&app, id, Duration::from_secs(240), |j| ["succeeded", "failed"].contains(&status(j))).await;
            assert_eq!(status(&job), "succeeded", "{backend:?}: {job}");
            let events = all_events(&app, id).await;
            let starts = events.iter().filter(|e| e["message"] == "Fine-tuning job started").count();
            assert_eq!(starts, 1, "{backend:?}: job {id} started {starts} times");
            assert_eq!(metric_steps(&events), (1..=4).collect::<Vec<_>>());
        }
    }
}

/// Downloads `GET /v1/models/{name}/content[?query]` and unpacks it with tar into a new directory.
pub async fn download_tar(app: &TestApp, name: &str, query: &str) -> tempfile::TempDir {
    let path = format!("/v1/models/{}/content{query}", name.replace('/', "%2F"));
    let response = app.get(&path, None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.headers["content-type"], "application/x-tar");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("download.tar"), &response.body).unwrap();
    let status =
        std::process::Command::new("tar").args(["-xf", "download.tar"]).current_dir(dir.path()).status().unwrap();
    assert!(status.success());
    std::fs::remove_file(dir.path().join("download.tar")).unwrap();
    dir
}

fn logits_of(dir: &std::path::Path, adapter: Option<&std::path::Path>) -> candle_core::Tensor {
    use ferrotune::models::llama::{Adaptation, CausalLm};
    let base = adapter.map_or(dir.to_path_buf(), |_| crate::model_numerics::fixture("llama"));
    let config = ferrotune::models::config::ModelConfig::from_file(&base.join("config.json")).unwrap();
    let weights = ferrotune::models::weights::load_model_weights(&base, candle_core::DType::F32, &Device::Cpu).unwrap();
    let plan = adapter.map(|a| {
        let (config, norms, tensors) = ferrotune::peft::adapter::load_adapter(a, &Device::Cpu).unwrap();
        ferrotune::peft::lora::LoraPlan { config, seed: 0, trainable: false, train_norms: norms, loaded: Some(tensors) }
    });
    let model = match &plan {
        Some(plan) => CausalLm::new(config, weights, Adaptation::Lora(plan)).unwrap(),
        None => CausalLm::new(config, weights, Adaptation::None).unwrap(),
    };
    let ids: Vec<u32> = (0..12u32).map(|i| 4 + i * 31 % 500).collect();
    let mut cache = ferrotune::models::llama::KvCache::default();
    model
        .forward_cached(
            &candle_core::Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(),
            &mut cache,
        )
        .unwrap()
}

#[tokio::test]
async fn models_and_checkpoints_download_as_adapters_or_merged_models() {
    for backend in backends() {
        let mut app = TestApp::spawn(backend).await;
        app.start_executors(1);
        let file = upload_qa(&app).await;
        let id = create_job(&app, &job_request(&file, 4, 4, 2)).await;
        let job = wait_for(&app, &id, Duration::from_secs(120), |j| ["succeeded", "failed"].contains(&status(j))).await;
        assert_eq!(status(&job), "succeeded", "{job}");
        let model = job["fine_tuned_model"].as_str().unwrap();

        let adapter = download_tar(&app, model, "").await;
        let mut names: Vec<String> = std::fs::read_dir(adapter.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert!(
            names.contains(&"adapter_config.json".to_string())
                && names.contains(&"adapter_model.safetensors".to_string()),
            "{names:?}"
        );
        let merged = download_tar(&app, model, "?format=merged").await;
        assert!(merged.path().join("model.safetensors").exists() && merged.path().join("config.json").exists());
        let (with_adapter, folded) = (logits_of(adapter.path(), Some(adapter.path())), logits_of(merged.path(), None));
        let diff: f32 =
            (with_adapter - folded).unwrap().abs().unwrap().max(1).unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(diff < 1e-4, "{backend:?}: merged model differs from base + adapter by {diff}");

        let checkpoint = format!("{model}:ckpt-step-4");
        let retrieved = app.get(&format!("/v1/models/{checkpoint}"), None).await;
        assert_eq!(retrieved.status, StatusCode::OK, "{backend:?}: {}", retrieved.text());
        let retrieved = retrieved.json();
        assert_eq!((retrieved["id"].as_str(), retrieved["parent"].as_str()), (Some(checkpoint.as_str()), Some(model)));
        assert_eq!(retrieved["root"], "tiny-llama");
        let job_id = model.rsplit(':').next().unwrap();
        let impostor = format!("ft:tiny-llama:default:other:{job_id}:ckpt-step-4");
        app.get(&format!("/v1/models/{impostor}"), None).await.assert_error(StatusCode::NOT_FOUND, "model_not_found");
        let from_checkpoint = download_tar(&app, &checkpoint, "").await;
        assert!(from_checkpoint.path().join("adapter_model.safetensors").exists());
        let missing = app.get(&format!("/v1/models/{model}:ckpt-step-3/content"), None).await;
        missing.assert_error(StatusCode::NOT_FOUND, "model_not_found");
    }
}

#[tokio::test]
async fn a_base_model_in_object_storage_is_fetched_and_trained() {
    use ferrotune::catalog::ModelSource;
    for backend in backends() {
        let mut app = TestApp::spawn_with(backend, |settings| {
            let mut catalog = crate::helpers::test_catalog();
            catalog.add("tiny-stored", ModelSource::Storage("base-models/tiny".into())).unwrap();
            settings.catalog = std::sync::Arc::new(catalog);
        })
        .await;
        for entry in std::fs::read_dir(crate::model_numerics::fixture("llama")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let bytes = bytes::Bytes::from(std::fs::read(&path).unwrap());
                let key = format!("base-models/tiny/{}", path.file_name().unwrap().to_string_lossy());
                let body = futures::StreamExt::boxed(futures::stream::iter(vec![Ok(bytes)]));
                ferrotune::storage::put_stream(app.storage().as_ref(), &key, body).await.unwrap();
            }
        }
        app.start_executors(1);
        let file = upload_qa(&app).await;
        let mut request = job_request(&file, 2, 4, 0);
        request["model"] = json!("tiny-stored");
        let id = create_job(&app, &request).await;
        let job = wait_for(&app, &id, Duration::from_secs(120), |j| ["succeeded", "failed"].contains(&status(j))).await;
        assert_eq!(status(&job), "succeeded", "{backend:?}: {job}");
        assert!(job["fine_tuned_model"].as_str().unwrap().starts_with("ft:tiny-stored:"));
    }
}
