//! Projects, API keys and isolation.

use axum::http::StatusCode;
use ferrotune::domain::api_key::hash_key;
use ferrotune::startup::build_state;

use crate::helpers::{backends, backing, chat_dataset, Backend, TestApp};

#[tokio::test]
async fn a_key_of_one_project_gets_404_for_another_projects_file() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let key_a = app.create_key("project-a").await;
        let key_b = app.create_key("project-b").await;
        let file = app.upload_dataset("b.jsonl", &chat_dataset(2), Some(&key_b)).await;
        let id = file["id"].as_str().unwrap();

        for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
            let error = app.get(&path, Some(&key_a)).await.assert_error(StatusCode::NOT_FOUND, "file_not_found");
            // Exactly what a missing file looks like.
            let missing = app
                .get(&path.replace(id, "file-doesnotexist000000000"), Some(&key_a))
                .await
                .assert_error(StatusCode::NOT_FOUND, "file_not_found");
            assert_eq!(error["type"], missing["type"]);
        }
        app.delete(&format!("/v1/files/{id}"), Some(&key_a))
            .await
            .assert_error(StatusCode::NOT_FOUND, "file_not_found");
        let listed = app.get("/v1/files", Some(&key_a)).await.json();
        assert!(listed["data"].as_array().unwrap().is_empty(), "{backend:?}: {listed}");
        // B still has it.
        assert_eq!(app.get(&format!("/v1/files/{id}"), Some(&key_b)).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn keys_are_stored_hashed_never_in_clear() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let secret = app.create_key("hashing").await;
        let pool = sqlx_pool(&app).await;
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT id, key_hash, display_prefix FROM api_keys").fetch_all(&pool).await.unwrap();
        assert_eq!(rows.len(), 1);
        let (_, stored_hash, prefix) = &rows[0];
        assert_eq!(stored_hash, &hash_key(&secret));
        assert!(secret.starts_with(prefix.as_str()) && prefix.len() < secret.len() / 4);
        // The secret appears in no column of any row.
        let dump: Vec<(String,)> =
            sqlx::query_as("SELECT id || name || display_prefix || key_hash || project_id FROM api_keys")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert!(!dump[0].0.contains(&secret));
    }
}

async fn sqlx_pool(app: &TestApp) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(&app.backing.settings.database_url).await.unwrap()
}

#[tokio::test]
async fn revoked_unknown_and_missing_keys_get_401_once_keys_exist() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let key = app.create_key("p").await;
    assert_eq!(app.get("/v1/files", Some(&key)).await.status, StatusCode::OK);

    app.get("/v1/files", None).await.assert_error(StatusCode::UNAUTHORIZED, "missing_api_key");
    app.get("/v1/files", Some("ft-not-a-real-key")).await.assert_error(StatusCode::UNAUTHORIZED, "invalid_api_key");

    let keys = app.store().list_api_keys().await.unwrap();
    assert!(app.store().revoke_api_key(&keys[0].id).await.unwrap());
    let error = app.get("/v1/files", Some(&key)).await.assert_error(StatusCode::UNAUTHORIZED, "invalid_api_key");
    assert_eq!(error["type"], "authentication_error");
    assert!(!app.store().revoke_api_key(&keys[0].id).await.unwrap(), "revoking twice reports no active key");
}

#[tokio::test]
async fn without_keys_loopback_serves_anonymous_requests_as_the_default_project() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    assert_eq!(app.get("/v1/files", None).await.status, StatusCode::OK);
    // SDKs always send some key; without configured keys it does not matter which.
    assert_eq!(app.get("/v1/files", Some("sk-anything")).await.status, StatusCode::OK);
    let file = app.upload_dataset("anon.jsonl", &chat_dataset(2), None).await;
    let key = app.create_key("default").await;
    // Keys now exist: anonymous access ends, and the default project's key sees the file.
    app.get("/v1/files", None).await.assert_error(StatusCode::UNAUTHORIZED, "missing_api_key");
    let listed = app.get("/v1/files", Some(&key)).await.json();
    assert_eq!(listed["data"][0]["id"], file["id"]);
}

#[tokio::test]
async fn a_non_loopback_server_without_keys_refuses_to_start_and_starts_once_a_key_exists() {
    let mut backing = backing(Backend::SqliteLocal).await;
    backing.settings.bind = "0.0.0.0:0".parse().unwrap();
    let (store, storage) = ferrotune::startup::open_backends(&backing.settings).await.unwrap();
    let refused = build_state(&backing.settings, store.clone(), storage.clone()).await;
    let message = format!("{:#}", refused.err().expect("must refuse"));
    assert!(message.contains("without API keys"), "{message}");

    let key = ferrotune::domain::api_key::generate_key();
    store
        .create_api_key(ferrotune::db::NewApiKey {
            project_name: "ops",
            name: "",
            key_hash: &key.hash,
            display_prefix: &key.display_prefix,
        })
        .await
        .unwrap();
    let state = build_state(&backing.settings, store, storage).await.unwrap();
    assert!(!state.config.allow_anonymous);
}
