//! The Files API over both backends.

use axum::http::StatusCode;
use serde_json::Value;

use crate::helpers::{backends, chat_dataset, Field, TestApp};

#[tokio::test]
async fn uploading_a_valid_chat_dataset_returns_a_processed_file_object() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let content = chat_dataset(3);
        let file = app.upload_dataset("train.jsonl", &content, None).await;
        assert!(file["id"].as_str().unwrap().starts_with("file-"), "{backend:?}");
        assert_eq!(file["object"], "file");
        assert_eq!(file["bytes"], content.len());
        assert_eq!(file["filename"], "train.jsonl");
        assert_eq!(file["purpose"], "fine-tune");
        assert_eq!(file["status"], "processed");
        assert_eq!(file["format"], "chat");
        assert_eq!(file["examples"], 3);
        assert!(file["created_at"].as_i64().unwrap() > 1_700_000_000);
    }
}

#[tokio::test]
async fn a_dataset_with_three_broken_lines_is_rejected_naming_each_and_nothing_is_stored() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let mut lines: Vec<String> = chat_dataset(5).lines().map(str::to_string).collect();
        lines[1] = "{\"messages\": [".into();
        lines[2] = r#"{"messages":[{"role":"wizard","content":"x"},{"role":"assistant","content":"y"}]}"#.into();
        lines[4] = r#"{"messages":[{"role":"user","content":"no answer"}]}"#.into();
        let response = app
            .upload(&[Field::text("purpose", "fine-tune"), Field::file("bad.jsonl", lines.join("\n").as_bytes())], None)
            .await;
        let error = response.assert_error(StatusCode::BAD_REQUEST, "invalid_dataset");
        let problems: Vec<(u64, String)> = error["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["line"].as_u64().unwrap(), p["code"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            problems,
            vec![
                (2, "invalid_json".to_string()),
                (3, "unrecognized_role".to_string()),
                (5, "no_assistant_message".to_string())
            ],
            "{backend:?}"
        );
        assert_eq!(error["total_problems"], 3);
        assert_eq!(error["param"], "file");
        assert_no_files(&app).await;
    }
}

/// No record, and (for the local store) no bytes left anywhere under the artifact root.
async fn assert_no_files(app: &TestApp) {
    let listed = app.get("/v1/files", None).await.json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{listed}");
    if let ferrotune::storage::StorageSettings::Local(root) = &app.backing.settings.storage {
        let leftovers: Vec<_> = walk(root).into_iter().filter(|p| !p.ends_with(".uploads")).collect();
        assert!(leftovers.is_empty(), "objects left behind: {leftovers:?}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn the_purpose_may_come_after_the_file() {
    let app = TestApp::spawn(crate::helpers::Backend::SqliteLocal).await;
    let content = chat_dataset(2);
    let response =
        app.upload(&[Field::file("late.jsonl", content.as_bytes()), Field::text("purpose", "fine-tune")], None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.json()["format"], "chat");
    let bad =
        app.upload(&[Field::file("late.jsonl", b"{oops\n{oops\n"), Field::text("purpose", "fine-tune")], None).await;
    bad.assert_error(StatusCode::BAD_REQUEST, "invalid_dataset");
}

#[tokio::test]
async fn files_of_other_purposes_are_stored_without_dataset_validation() {
    let app = TestApp::spawn(crate::helpers::Backend::SqliteLocal).await;
    let response =
        app.upload(&[Field::text("purpose", "batch"), Field::file("notes.txt", b"not json at all")], None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let file = response.json();
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["format"], Value::Null);
}

#[tokio::test]
async fn missing_and_unknown_fields_are_clear_errors() {
    let app = TestApp::spawn(crate::helpers::Backend::SqliteLocal).await;
    let content = chat_dataset(2);
    app.upload(&[Field::file("a.jsonl", content.as_bytes())], None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "missing_purpose");
    app.upload(&[Field::text("purpose", "fine-tune")], None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "missing_file");
    let error = app
        .upload(&[Field::text("purpose", "fine-tuning"), Field::file("a.jsonl", content.as_bytes())], None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_purpose");
    assert_eq!(error["param"], "purpose");
    app.upload(&[Field::text("purpose", "fine-tune-results"), Field::file("a.jsonl", content.as_bytes())], None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_purpose");
    assert_no_files(&app).await;
}

#[tokio::test]
async fn too_few_and_empty_datasets_are_rejected() {
    let app = TestApp::spawn(crate::helpers::Backend::SqliteLocal).await;
    let error = app
        .upload(&[Field::text("purpose", "fine-tune"), Field::file("one.jsonl", chat_dataset(1).as_bytes())], None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_dataset");
    assert_eq!(error["problems"][0]["code"], "too_few_examples");
    let error = app
        .upload(&[Field::text("purpose", "fine-tune"), Field::file("none.jsonl", b"")], None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_dataset");
    assert_eq!(error["problems"][0]["code"], "empty_file");
}

#[tokio::test]
async fn oversized_uploads_and_lines_get_413_and_store_nothing() {
    for backend in backends() {
        let app = TestApp::spawn_with(backend, |s| {
            s.max_upload_bytes = 64 << 10;
            s.dataset_limits.max_line_bytes = 1024;
        })
        .await;
        let big = chat_dataset(2000);
        assert!(big.len() > 64 << 10);
        app.upload(&[Field::text("purpose", "fine-tune"), Field::file("big.jsonl", big.as_bytes())], None)
            .await
            .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "file_too_large");
        let long_line = format!("{}{{\"text\":\"{}\"}}\n", "{\"text\":\"short\"}\n".repeat(3), "x".repeat(2000));
        let error = app
            .upload(&[Field::text("purpose", "fine-tune"), Field::file("long.jsonl", long_line.as_bytes())], None)
            .await
            .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "line_too_long");
        assert_eq!(error["line"], 4);
        assert_no_files(&app).await;
    }
}

#[tokio::test]
async fn files_are_listed_newest_first_with_cursor_pagination_and_purpose_filter() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(app.upload_dataset(&format!("f{i}.jsonl"), &chat_dataset(2), None).await["id"].clone());
        }
        let other = app.upload(&[Field::text("purpose", "batch"), Field::file("b.jsonl", b"x")], None).await.json()
            ["id"]
            .clone();

        let page = app.get("/v1/files?limit=2&purpose=fine-tune", None).await.json();
        assert_eq!(page["object"], "list");
        assert_eq!(page["has_more"], true);
        let page_ids: Vec<Value> = page["data"].as_array().unwrap().iter().map(|f| f["id"].clone()).collect();
        assert_eq!(page_ids, vec![ids[2].clone(), ids[1].clone()], "{backend:?}");

        let after = page["last_id"].as_str().unwrap();
        let rest = app.get(&format!("/v1/files?limit=2&purpose=fine-tune&after={after}"), None).await.json();
        assert_eq!(rest["has_more"], false);
        assert_eq!(rest["data"].as_array().unwrap().len(), 1);
        assert_eq!(rest["data"][0]["id"], ids[0]);

        let all_asc = app.get("/v1/files?order=asc", None).await.json();
        let asc_ids: Vec<Value> = all_asc["data"].as_array().unwrap().iter().map(|f| f["id"].clone()).collect();
        assert_eq!(asc_ids, vec![ids[0].clone(), ids[1].clone(), ids[2].clone(), other]);
    }
}

#[tokio::test]
async fn bad_list_parameters_are_rejected() {
    let app = TestApp::spawn(crate::helpers::Backend::SqliteLocal).await;
    app.get("/v1/files?limit=0", None).await.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    app.get("/v1/files?limit=abc", None).await.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    app.get("/v1/files?order=sideways", None).await.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    app.get("/v1/files?after=file-nope", None).await.assert_error(StatusCode::BAD_REQUEST, "invalid_cursor");
    app.get("/v1/files?purpose=nonsense", None).await.assert_error(StatusCode::BAD_REQUEST, "invalid_purpose");
}

#[tokio::test]
async fn a_file_can_be_retrieved_downloaded_and_deleted() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let content = chat_dataset(4);
        let file = app.upload_dataset("mine.jsonl", &content, None).await;
        let id = file["id"].as_str().unwrap();

        let retrieved = app.get(&format!("/v1/files/{id}"), None).await;
        assert_eq!(retrieved.status, StatusCode::OK);
        assert_eq!(retrieved.json(), file);

        let download = app.get(&format!("/v1/files/{id}/content"), None).await;
        assert_eq!(download.status, StatusCode::OK);
        assert_eq!(download.text(), content, "{backend:?}");
        assert_eq!(download.headers["content-length"], content.len().to_string().as_str());

        let deleted = app.delete(&format!("/v1/files/{id}"), None).await;
        assert_eq!(deleted.status, StatusCode::OK);
        assert_eq!(deleted.json(), serde_json::json!({"id": id, "object": "file", "deleted": true}));

        app.get(&format!("/v1/files/{id}"), None).await.assert_error(StatusCode::NOT_FOUND, "file_not_found");
        app.get(&format!("/v1/files/{id}/content"), None).await.assert_error(StatusCode::NOT_FOUND, "file_not_found");
        app.delete(&format!("/v1/files/{id}"), None).await.assert_error(StatusCode::NOT_FOUND, "file_not_found");
        let storage_key = format!("files/{}/{id}", ferrotune::db::DEFAULT_PROJECT_ID);
        assert!(matches!(app.storage().get(&storage_key).await, Err(ferrotune::storage::StorageError::NotFound(_))));
    }
}
