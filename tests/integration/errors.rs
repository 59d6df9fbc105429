//! Every error has OpenAI's shape and a request id; server faults reveal nothing internal.

use axum::body::Body;
use axum::http::StatusCode;

use crate::helpers::{chat_dataset, request, Backend, Field, TestApp};

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_shaped_errors() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let error = app.get("/v1/nothing-here", None).await.assert_error(StatusCode::NOT_FOUND, "route_not_found");
    assert!(error["message"].as_str().unwrap().contains("/v1/nothing-here"));
    app.send(request("PUT", "/v1/files", None).body(Body::empty()).unwrap())
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    app.send(request("POST", "/v1/files/file-abc", None).body(Body::empty()).unwrap())
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn a_non_multipart_upload_is_a_clear_400() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let response = app
        .send(
            request("POST", "/v1/files", None)
                .header("content-type", "application/json")
                .body(Body::from("{\"purpose\":\"fine-tune\"}"))
                .unwrap(),
        )
        .await;
    response.assert_error(StatusCode::BAD_REQUEST, "invalid_multipart");
}

#[tokio::test]
async fn responses_carry_a_request_id_and_echo_the_clients() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let generated = app.get("/v1/files", None).await;
    let id = generated.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let echoed = app
        .send(request("GET", "/v1/nope", None).header("x-request-id", "trace-me-42").body(Body::empty()).unwrap())
        .await;
    assert_eq!(echoed.headers["x-request-id"], "trace-me-42");
}

#[tokio::test]
async fn a_storage_failure_is_a_500_that_reveals_nothing_and_makes_the_server_unready() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let ferrotune::storage::StorageSettings::Local(root) = app.backing.settings.storage.clone() else { unreachable!() };
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::write(&root, b"not a directory").unwrap();

    let response = app
        .upload(&[Field::text("purpose", "fine-tune"), Field::file("x.jsonl", chat_dataset(2).as_bytes())], None)
        .await;
    let error = response.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error");
    assert_eq!(error["type"], "server_error");
    let text = response.text();
    let root_text = root.display().to_string();
    assert!(!text.contains(&root_text) && !text.contains("os error"), "{text}");
    assert!(response.headers.contains_key("x-request-id"));

    let ready = app.get("/ready", None).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["storage"], "unavailable");
    assert_eq!(ready.json()["database"], "ok");
    assert!(!ready.text().contains(&root_text));
    assert_eq!(app.get("/health", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn ready_reports_both_backends_ok() {
    for backend in crate::helpers::backends() {
        let app = TestApp::spawn(backend).await;
        let ready = app.get("/ready", None).await;
        assert_eq!(ready.status, StatusCode::OK, "{backend:?}: {}", ready.text());
        assert_eq!(ready.json(), serde_json::json!({"status": "ready", "database": "ok", "storage": "ok"}));
    }
}
