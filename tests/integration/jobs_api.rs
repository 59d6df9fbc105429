//! The fine-tuning jobs API without an executor: jobs stay where the API puts them, and tests
//! move them along through the store where an executor would.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use ferrotune::catalog::ModelSource;
use ferrotune::db::{NewEvent, DEFAULT_PROJECT_ID};
use ferrotune::domain::job::JobStatus;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::helpers::{backends, chat_dataset, request, test_catalog, Backend, Field, TestApp, TestResponse};

async fn post(app: &TestApp, path: &str, body: Value, key: Option<&str>) -> TestResponse {
    let request = request("POST", path, key).header("content-type", "application/json");
    app.send(request.body(Body::from(body.to_string())).unwrap()).await
}

async fn post_empty(app: &TestApp, path: &str, key: Option<&str>) -> TestResponse {
    app.send(request("POST", path, key).body(Body::empty()).unwrap()).await
}

/// Creates a job, asserting success; returns the job object.
async fn create_job(app: &TestApp, body: Value, key: Option<&str>) -> Value {
    let response = post(app, "/v1/fine_tuning/jobs", body, key).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    response.json()
}

/// Uploads a small chat dataset and returns its id.
async fn upload_chat(app: &TestApp, key: Option<&str>) -> String {
    app.upload_dataset("train.jsonl", &chat_dataset(3), key).await["id"].as_str().unwrap().to_string()
}

fn ids(list: &Value) -> Vec<String> {
    list["data"].as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn a_job_created_with_method_hyperparameters_is_returned_as_openais_job_object() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let file = upload_chat(&app, None).await;
        let hyperparameters = json!({"n_epochs": 2, "batch_size": 1, "training_type": "lora", "lora": {"r": 4}});
        let job = create_job(
            &app,
            json!({
                "model": "tiny-llama",
                "training_file": file,
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
                "suffix": "demo",
                "seed": 7,
                "metadata": {"team": "search"},
            }),
            None,
        )
        .await;

        let id = job["id"].as_str().unwrap();
        assert!(id.starts_with("ftjob-"), "{backend:?}: {job}");
        let shown = json!({"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": "auto",
                           "training_type": "lora", "lora": {"r": 4}});
        let expected = json!({
            "id": id, "object": "fine_tuning.job", "created_at": job["created_at"], "finished_at": null,
            "model": "tiny-llama", "fine_tuned_model": null, "organization_id": DEFAULT_PROJECT_ID,
            "status": "validating_files", "training_file": file, "validation_file": null, "result_files": [],
            "trained_tokens": null, "error": null, "hyperparameters": shown,
            "method": {"type": "supervised", "supervised": {"hyperparameters": shown}},
            "seed": 7, "suffix": "demo", "metadata": {"team": "search"}, "estimated_finish": null,
            "integrations": [], "user_provided_suffix": "demo",
            "progress": {"step": 0, "total_steps": null, "epoch": null}, "queue_position": null,
            "executor": null,
        });
        assert_eq!(job, expected, "{backend:?}");
        assert!(job["created_at"].as_i64().unwrap() > 1_700_000_000);
        assert_eq!(app.get(&format!("/v1/fine_tuning/jobs/{id}"), None).await.json(), expected);

        // The executor receives the method as requested, normalised.
        let stored = app.store().job_by_id(id).await.unwrap().unwrap();
        let method: Value = serde_json::from_str(&stored.method).unwrap();
        assert_eq!(method, json!({"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}));
        assert_eq!(serde_json::from_str::<Value>(&stored.hyperparameters).unwrap(), hyperparameters);
        let events = app.get(&format!("/v1/fine_tuning/jobs/{id}/events"), None).await.json();
        assert_eq!(events["data"][0]["message"], format!("Validating training file: {file}"));
    }
}

#[tokio::test]
async fn the_legacy_hyperparameters_form_and_a_validation_file_are_accepted() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let (train, valid) = (upload_chat(&app, None).await, upload_chat(&app, None).await);
    let job = create_job(
        &app,
        json!({"model": "tiny-qwen2", "training_file": train, "validation_file": valid,
               "hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 0.5}}),
        None,
    )
    .await;
    assert_eq!(job["validation_file"], valid);
    assert_eq!(job["hyperparameters"], json!({"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 0.5}));
    assert_eq!(job["method"]["supervised"]["hyperparameters"], job["hyperparameters"]);
    assert!(job["seed"].as_i64().is_some_and(|s| (0..1 << 31).contains(&s)), "a random seed: {job}");
    assert_eq!((job["suffix"].clone(), job["metadata"].clone()), (Value::Null, Value::Null));
}

#[tokio::test]
async fn invalid_requests_name_their_param_and_create_nothing() {
    for backend in backends() {
        let app = TestApp::spawn_with(backend, |settings| {
            let mut catalog = test_catalog();
            catalog.add("tiny-hub", ModelSource::Hub("org/tiny".into())).unwrap();
            settings.catalog = Arc::new(catalog);
        })
        .await;
        let key = app.create_key("acme").await;
        let other_key = app.create_key("other").await;
        let file = upload_chat(&app, Some(&key)).await;
        let foreign = upload_chat(&app, Some(&other_key)).await;
        let classification = "{\"text\": \"great\", \"label\": \"pos\"}\n{\"text\": \"awful\", \"label\": \"neg\"}\n";
        let labels = app.upload_dataset("labels.jsonl", classification, Some(&key)).await["id"].clone();
        let batch = app.upload(&[Field::text("purpose", "batch"), Field::file("b.jsonl", b"{}")], Some(&key)).await;
        let batch = batch.json()["id"].clone();
        let body = |extra: Value| {
            let mut body = json!({"model": "tiny-llama", "training_file": file});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            body
        };
        let hyper = |h: Value| json!({"method": {"type": "supervised", "supervised": {"hyperparameters": h}}});
        let too_much_metadata: serde_json::Map<String, Value> =
            (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        let cases = [
            (body(json!({"model": "no-such-model"})), "model_not_found", "model"),
            (body(json!({"model": "tiny-hub"})), "model_not_supported", "model"),
            (
                // q4_k quantizes blocks of 256 weights; the tiny model's rows have 64.
                body(hyper(json!({"training_type": "qlora", "quantization": "q4_k"}))),
                "invalid_hyperparameters",
                "method.supervised.hyperparameters.quantization",
            ),
            (
                body(hyper(json!({"training_type": "lora", "quantization": "q4_0"}))),
                "invalid_hyperparameters",
                "method.supervised.hyperparameters.quantization",
            ),
            (body(json!({"training_file": foreign})), "file_not_found", "training_file"),
            (body(json!({"training_file": "file-missing"})), "file_not_found", "training_file"),
            (body(json!({"validation_file": foreign})), "file_not_found", "validation_file"),
            (body(json!({"training_file": labels})), "invalid_file_format", "training_file"),
            (body(json!({"training_file": batch})), "invalid_purpose", "training_file"),
            (
                body(hyper(json!({"n_epochs": 0}))),
                "invalid_hyperparameters",
                "method.supervised.hyperparameters.n_epochs",
            ),
            (body(hyper(json!({"epochs": 3}))), "invalid_hyperparameters", "method.supervised.hyperparameters"),
            (
                body(json!({"hyperparameters": {"learning_rate_multiplier": 20}})),
                "invalid_hyperparameters",
                "hyperparameters.learning_rate_multiplier",
            ),
            (
                body(json!({"hyperparameters": {"n_epochs": 1}, "method": hyper(json!({"n_epochs": 2}))["method"]})),
                "conflicting_hyperparameters",
                "hyperparameters",
            ),
            (body(json!({"method": {"type": "reinforcement"}})), "unsupported_method", "method.type"),
            // A dpo job needs a preference file, and dpo's settings belong to dpo jobs.
            (body(json!({"method": {"type": "dpo"}})), "invalid_file_format", "training_file"),
            (
                body(json!({"method": hyper(json!({"beta": 0.1}))["method"]})),
                "invalid_hyperparameters",
                "method.supervised.hyperparameters.beta",
            ),
            (body(json!({"suffix": "not a suffix!"})), "invalid_request", "suffix"),
            (body(json!({"metadata": too_much_metadata})), "invalid_request", "metadata"),
            (body(json!({"integrations": [{"type": "wandb"}]})), "invalid_request", "integrations"),
        ];
        for (request, code, param) in cases {
            let response = post(&app, "/v1/fine_tuning/jobs", request.clone(), Some(&key)).await;
            let error = response.assert_error(StatusCode::BAD_REQUEST, code);
            assert_eq!(error["param"], param, "{backend:?}: {request}");
            let listed = app.get("/v1/fine_tuning/jobs", Some(&key)).await.json();
            assert_eq!(listed["data"], json!([]), "{backend:?}: {request} created a job");
        }
    }
}

#[tokio::test]
async fn jobs_are_listed_newest_first_in_pages_and_filtered_by_metadata() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let file = upload_chat(&app, None).await;
        let mut jobs = Vec::new();
        for i in 0..5 {
            let parity = if i % 2 == 0 { "even" } else { "odd" };
            let metadata = json!({"i": i.to_string(), "parity": parity});
            let body = json!({"model": "tiny-llama", "training_file": file, "metadata": metadata});
            jobs.push(create_job(&app, body, None).await["id"].as_str().unwrap().to_string());
        }
        let page = |query: String| {
            let app = &app;
            async move { app.get(&format!("/v1/fine_tuning/jobs?{query}"), None).await.json() }
        };

        let first = page("limit=2".into()).await;
        assert_eq!((ids(&first), first["has_more"].clone()), (vec![jobs[4].clone(), jobs[3].clone()], json!(true)));
        assert_eq!(first["object"], "list");
        let second = page(format!("limit=2&after={}", jobs[3])).await;
        assert_eq!(ids(&second), vec![jobs[2].clone(), jobs[1].clone()], "{backend:?}");
        let last = page(format!("limit=2&after={}", jobs[1])).await;
        assert_eq!((ids(&last), last["has_more"].clone()), (vec![jobs[0].clone()], json!(false)));

        let even = page("limit=2&metadata[parity]=even".into()).await;
        assert_eq!((ids(&even), even["has_more"].clone()), (vec![jobs[4].clone(), jobs[2].clone()], json!(true)));
        let rest = page(format!("limit=2&metadata[parity]=even&after={}", jobs[2])).await;
        assert_eq!((ids(&rest), rest["has_more"].clone()), (vec![jobs[0].clone()], json!(false)));
        // Matches spread over several pages of rows.
        let odd = page("limit=1&metadata%5Bparity%5D=odd".into()).await;
        assert_eq!((ids(&odd), odd["has_more"].clone()), (vec![jobs[3].clone()], json!(true)));
        let both = page("metadata[parity]=even&metadata[i]=2".into()).await;
        assert_eq!(ids(&both), vec![jobs[2].clone()]);
        assert_eq!(page("metadata[parity]=none".into()).await["data"], json!([]));

        app.get("/v1/fine_tuning/jobs?limit=0", None).await.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
        app.get("/v1/fine_tuning/jobs?limit=101", None).await.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
        app.get("/v1/fine_tuning/jobs?after=ftjob-missing", None)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_cursor");
    }
}

#[tokio::test]
async fn another_projects_job_is_indistinguishable_from_a_missing_one() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let (key, other) = (app.create_key("acme").await, app.create_key("other").await);
    let file = upload_chat(&app, Some(&key)).await;
    let job = create_job(&app, json!({"model": "tiny-llama", "training_file": file}), Some(&key)).await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(app.get(&format!("/v1/fine_tuning/jobs/{id}"), Some(&key)).await.status, StatusCode::OK);
    for path in ["", "/events", "/checkpoints"] {
        let theirs = app.get(&format!("/v1/fine_tuning/jobs/{id}{path}"), Some(&other)).await;
        let error = theirs.assert_error(StatusCode::NOT_FOUND, "job_not_found");
        let missing = app.get(&format!("/v1/fine_tuning/jobs/ftjob-missing{path}"), Some(&other)).await;
        assert_eq!(error["message"].as_str().unwrap().replace(id, "ftjob-missing"), missing.json()["error"]["message"]);
    }
    post_empty(&app, &format!("/v1/fine_tuning/jobs/{id}/cancel"), Some(&other))
        .await
        .assert_error(StatusCode::NOT_FOUND, "job_not_found");
    assert_eq!(app.get("/v1/fine_tuning/jobs", Some(&other)).await.json()["data"], json!([]));
    assert_eq!(app.get(&format!("/v1/fine_tuning/jobs/{id}"), Some(&key)).await.json()["status"], "validating_files");
}

async fn action(app: &TestApp, id: &str, verb: &str) -> TestResponse {
    post_empty(app, &format!("/v1/fine_tuning/jobs/{id}/{verb}"), None).await
}

async fn new_job(app: &TestApp) -> String {
    let file = upload_chat(app, None).await;
    create_job(app, json!({"model": "tiny-llama", "training_file": file}), None).await["id"].as_str().unwrap().into()
}

#[tokio::test]
async fn jobs_that_no_executor_holds_move_at_once() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let validating = new_job(&app).await;
        action(&app, &validating, "pause").await.assert_error(StatusCode::CONFLICT, "invalid_job_state");
        action(&app, &validating, "resume").await.assert_error(StatusCode::CONFLICT, "invalid_job_state");
        let cancelled = action(&app, &validating, "cancel").await.json();
        assert_eq!(cancelled["status"], "cancelled", "{backend:?}");
        assert!(cancelled["finished_at"].is_i64());
        let error = action(&app, &validating, "cancel").await.assert_error(StatusCode::CONFLICT, "invalid_job_state");
        assert!(error["message"].as_str().unwrap().contains("cancelled"), "{error}");

        let queued = new_job(&app).await;
        assert!(app.store().finish_validation(&queued, "{}", NewEvent::message("validated")).await.unwrap());
        assert_eq!(app.get(&format!("/v1/fine_tuning/jobs/{queued}"), None).await.json()["queue_position"], 1);
        let paused = action(&app, &queued, "pause").await.json();
        assert_eq!((paused["status"].clone(), paused["queue_position"].clone()), (json!("paused"), Value::Null));
        action(&app, &queued, "pause").await.assert_error(StatusCode::CONFLICT, "invalid_job_state");
        assert_eq!(action(&app, &queued, "resume").await.json()["status"], "queued");
        assert_eq!(action(&app, &queued, "cancel").await.json()["status"], "cancelled");
        action(&app, &queued, "resume").await.assert_error(StatusCode::CONFLICT, "invalid_job_state");

        let events = app.get(&format!("/v1/fine_tuning/jobs/{queued}/events"), None).await.json();
        let messages: Vec<&str> =
            events["data"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
        assert_eq!(messages[..3], ["Job cancelled", "Job resumed and queued", "Job paused"], "{backend:?}");
    }
}

#[tokio::test]
async fn a_running_job_is_only_asked_to_pause_or_cancel() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let paused = new_job(&app).await;
        app.store().finish_validation(&paused, "{}", NewEvent::message("validated")).await.unwrap();
        app.store().claim_job(JobStatus::Queued, "worker", 60).await.unwrap().unwrap();
        action(&app, &paused, "resume").await.assert_error(StatusCode::CONFLICT, "invalid_job_state");
        assert_eq!(action(&app, &paused, "pause").await.json()["status"], "pausing", "{backend:?}");
        let stored = app.store().job_by_id(&paused).await.unwrap().unwrap();
        assert_eq!(stored.requested_action.as_deref(), Some("pause"));
        action(&app, &paused, "pause").await.assert_error(StatusCode::CONFLICT, "invalid_job_state");

        let cancelled = new_job(&app).await;
        app.store().finish_validation(&cancelled, "{}", NewEvent::message("validated")).await.unwrap();
        app.store().claim_job(JobStatus::Queued, "worker", 60).await.unwrap().unwrap();
        // The executor stops it within a step; until then it is still running.
        assert_eq!(action(&app, &cancelled, "cancel").await.json()["status"], "running", "{backend:?}");
        let stored = app.store().job_by_id(&cancelled).await.unwrap().unwrap();
        assert_eq!((stored.status.as_str(), stored.requested_action.as_deref()), ("running", Some("cancel")));
        action(&app, &cancelled, "pause").await.assert_error(StatusCode::CONFLICT, "invalid_job_state");
        assert_eq!(action(&app, &cancelled, "cancel").await.json()["status"], "running", "asking again is harmless");
        let events = app.get(&format!("/v1/fine_tuning/jobs/{cancelled}/events"), None).await.json();
        assert_eq!(events["data"][0]["message"], "Cancellation requested");
        assert_ne!(events["data"][1]["message"], "Cancellation requested", "one request, one event");
    }
}

#[tokio::test]
async fn events_are_listed_newest_first_and_page_towards_older_ones() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let job = new_job(&app).await;
        let first = app.store().list_events(&job, None, 1).await.unwrap()[0].id.clone();
        let mut added = vec![first];
        for i in 1..=3 {
            added.push(app.store().add_event(&job, NewEvent::message(format!("step {i}"))).await.unwrap().id);
        }
        let metrics = json!({"step": 4, "train_loss": 2.5, "train_mean_token_accuracy": 0.5});
        added.push(app.store().add_event(&job, NewEvent::metrics("step 4", metrics.clone())).await.unwrap().id);
        let path = format!("/v1/fine_tuning/jobs/{job}/events");

        let page = app.get(&format!("{path}?limit=2"), None).await.json();
        assert_eq!((ids(&page), page["has_more"].clone()), (vec![added[4].clone(), added[3].clone()], json!(true)));
        let newest = &page["data"][0];
        assert_eq!(
            (newest["object"].clone(), newest["type"].clone(), newest["level"].clone(), newest["data"].clone()),
            (json!("fine_tuning.job.event"), json!("metrics"), json!("info"), metrics),
            "{backend:?}"
        );
        assert_eq!(page["data"][1]["data"], Value::Null);
        let older = app.get(&format!("{path}?limit=2&after={}", added[3]), None).await.json();
        assert_eq!(ids(&older), vec![added[2].clone(), added[1].clone()], "{backend:?}");
        let oldest = app.get(&format!("{path}?limit=2&after={}", added[1]), None).await.json();
        assert_eq!((ids(&oldest), oldest["has_more"].clone()), (vec![added[0].clone()], json!(false)));
        app.get(&format!("{path}?after=ftevent-missing"), None)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_cursor");
        app.get(&format!("{path}?limit=500"), None).await.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    }
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(text: &str) -> Vec<String> {
    text.lines().filter_map(|line| line.strip_prefix("data: ")).map(str::to_string).collect()
}

#[tokio::test]
async fn the_event_stream_of_a_finished_job_sends_every_event_oldest_first_then_done() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let job = new_job(&app).await;
    app.store().add_event(&job, NewEvent::message("between")).await.unwrap();
    action(&app, &job, "cancel").await;
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        app.get(&format!("/v1/fine_tuning/jobs/{job}/events?stream=true"), None),
    )
    .await
    .expect("a finished job's stream ends");
    assert_eq!(response.status, StatusCode::OK);
    assert!(response.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let data = sse_data(&response.text());
    let (done, events) = data.split_last().unwrap();
    assert_eq!(done, "[DONE]");
    let messages: Vec<String> =
        events.iter().map(|e| serde_json::from_str::<Value>(e).unwrap()["message"].as_str().unwrap().into()).collect();
    assert_eq!(messages[1..], ["between".to_string(), "Job cancelled".to_string()]);
    assert!(messages[0].starts_with("Validating training file"));
    let sse_ids = response.text().lines().filter(|line| line.starts_with("id: ftevent-")).count();
    assert_eq!(sse_ids, events.len(), "every event carries its SSE id");
}

#[tokio::test]
async fn a_reconnecting_stream_resumes_after_its_last_event_id() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let job = new_job(&app).await;
    let seen = app.store().add_event(&job, NewEvent::message("seen before")).await.unwrap();
    app.store().add_event(&job, NewEvent::message("missed")).await.unwrap();
    action(&app, &job, "cancel").await;
    let uri = format!("/v1/fine_tuning/jobs/{job}/events?stream=true");
    let request = request("GET", &uri, None).header("last-event-id", &seen.id).body(Body::empty()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), app.send(request)).await.unwrap();
    let data = sse_data(&response.text());
    let messages: Vec<String> =
        data.iter().map(|d| serde_json::from_str::<Value>(d).map_or(d.clone(), |e| e["message"].to_string())).collect();
    assert_eq!(messages, ["\"missed\"", "\"Job cancelled\"", "[DONE]"]);
}

#[tokio::test]
async fn the_event_stream_follows_a_live_job_until_it_ends() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let job = new_job(&app).await;
    let uri = format!("/v1/fine_tuning/jobs/{job}/events?stream=true");
    let response = app.router.clone().oneshot(request("GET", &uri, None).body(Body::empty()).unwrap()).await.unwrap();
    let mut body = response.into_body();
    // What an executor would do while the client waits: report, then end the job.
    let store = app.store().clone();
    let executor = {
        let job = job.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            store.add_event(&job, NewEvent::message("live one")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(700)).await;
            let from = [JobStatus::ValidatingFiles];
            store.transition(&job, &from, JobStatus::Failed, NewEvent::error("Job failed")).await.unwrap();
        })
    };
    let mut text = String::new();
    while !text.contains("[DONE]") {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("an event in time");
        if let Ok(data) = frame.expect("the stream stays open until [DONE]").unwrap().into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    executor.await.unwrap();
    let messages: Vec<String> = sse_data(&text)
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).map(|e| e["message"].as_str().unwrap().to_string()).unwrap_or(d.clone())
        })
        .collect();
    assert_eq!(messages[1..], ["live one", "Job failed", "[DONE]"], "{text}");
    assert!(body.frame().await.is_none(), "the stream ends after [DONE]");
}

#[tokio::test]
async fn checkpoints_are_listed_newest_first_under_the_future_model_name() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let key = app.create_key("acme").await;
        let file = upload_chat(&app, Some(&key)).await;
        let body = json!({"model": "tiny-llama", "training_file": file, "suffix": "bot"});
        let job = create_job(&app, body, Some(&key)).await["id"].as_str().unwrap().to_string();
        let mut checkpoints = Vec::new();
        for step in [10, 20, 30] {
            let metrics = json!({"train_loss": 1.5});
            checkpoints
                .push(app.store().add_checkpoint(&job, step, &metrics, &format!("ckpt/{step}")).await.unwrap().id);
        }
        let path = format!("/v1/fine_tuning/jobs/{job}/checkpoints");
        let page = app.get(&format!("{path}?limit=2"), Some(&key)).await.json();
        assert_eq!(ids(&page), vec![checkpoints[2].clone(), checkpoints[1].clone()], "{backend:?}");
        assert_eq!(page["has_more"], true);
        let bare_id = job.strip_prefix("ftjob-").unwrap();
        let newest = &page["data"][0];
        assert_eq!(
            newest,
            &json!({
                "id": checkpoints[2], "object": "fine_tuning.job.checkpoint", "created_at": newest["created_at"],
                "fine_tuned_model_checkpoint": format!("ft:tiny-llama:acme:bot:{bare_id}:ckpt-step-30"),
                "fine_tuning_job_id": job, "metrics": {"train_loss": 1.5, "step": 30}, "step_number": 30,
            })
        );
        let rest = app.get(&format!("{path}?after={}", checkpoints[1]), Some(&key)).await.json();
        assert_eq!((ids(&rest), rest["has_more"].clone()), (vec![checkpoints[0].clone()], json!(false)));
        app.get(&format!("{path}?after=ftckpt-missing"), Some(&key))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_cursor");
    }
}

async fn put_object(app: &TestApp, key: &str) {
    let body = futures::stream::once(async { Ok(bytes::Bytes::from_static(b"{}")) });
    ferrotune::storage::put_stream(app.storage().as_ref(), key, Box::pin(body)).await.unwrap();
}

#[tokio::test]
async fn models_are_the_catalog_plus_the_projects_fine_tuned_ones_which_it_alone_may_delete() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let (key, other) = (app.create_key("acme").await, app.create_key("other").await);
        let keys = app.store().list_api_keys().await.unwrap();
        let project = keys.iter().find(|k| k.project_name == "acme").unwrap().project_id.clone();
        let name = "ft:tiny-llama:acme:bot:abc123";
        let model = ferrotune::db::ModelRecord {
            id: name.into(),
            project_id: project.clone(),
            job_id: None,
            base_model: "tiny-llama".into(),
            method: "lora".into(),
            storage_key: "models/abc123".into(),
            created_at: 1_800_000_000,
        };
        app.store().insert_model(&model).await.unwrap();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            put_object(&app, &format!("models/abc123/{file}")).await;
        }

        let listed = app.get("/v1/models", Some(&key)).await.json();
        assert_eq!(listed["object"], "list");
        assert_eq!(ids(&listed), vec!["tiny-llama", "tiny-qwen2", name], "{backend:?}");
        assert_eq!(
            listed["data"][0],
            json!({"id": "tiny-llama", "object": "model", "created": 0, "owned_by": "ferrotune",
                   "root": "tiny-llama", "parent": null})
        );
        let tuned = json!({"id": name, "object": "model", "created": 1_800_000_000, "owned_by": project,
                           "root": "tiny-llama", "parent": "tiny-llama"});
        assert_eq!(listed["data"][2], tuned);
        assert_eq!(ids(&app.get("/v1/models", Some(&other)).await.json()), vec!["tiny-llama", "tiny-qwen2"]);

        assert_eq!(app.get(&format!("/v1/models/{name}"), Some(&key)).await.json(), tuned);
        assert_eq!(app.get("/v1/models/tiny-qwen2", Some(&other)).await.json()["owned_by"], "ferrotune");
        app.get(&format!("/v1/models/{name}"), Some(&other))
            .await
            .assert_error(StatusCode::NOT_FOUND, "model_not_found");
        app.get("/v1/models/nope", Some(&key)).await.assert_error(StatusCode::NOT_FOUND, "model_not_found");

        app.delete("/v1/models/tiny-llama", Some(&key)).await.assert_error(StatusCode::FORBIDDEN, "model_not_owned");
        app.delete(&format!("/v1/models/{name}"), Some(&other))
            .await
            .assert_error(StatusCode::NOT_FOUND, "model_not_found");
        let deleted = app.delete(&format!("/v1/models/{name}"), Some(&key)).await.json();
        assert_eq!(deleted, json!({"id": name, "object": "model", "deleted": true}));
        assert!(app.store().get_model(&project, name).await.unwrap().is_none());
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            assert!(app.storage().get(&format!("models/abc123/{file}")).await.is_err(), "{backend:?}: {file} remains");
        }
        app.delete(&format!("/v1/models/{name}"), Some(&key))
            .await
            .assert_error(StatusCode::NOT_FOUND, "model_not_found");
    }
}

#[tokio::test]
async fn a_base_model_whose_name_has_a_slash_is_reachable_percent_encoded() {
    let app = TestApp::spawn_with(Backend::SqliteLocal, |settings| {
        let mut catalog = test_catalog();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
        catalog.add("org/tiny", ModelSource::Directory(dir)).unwrap();
        settings.catalog = Arc::new(catalog);
    })
    .await;
    assert_eq!(app.get("/v1/models/org%2Ftiny", None).await.json()["id"], "org/tiny");
    assert!(ids(&app.get("/v1/models", None).await.json()).contains(&"org/tiny".to_string()));
}
