//! A resource deleted while a request reads it: the request answers 404 as it would have a moment
//! later, never 500. The race is made exact: the artifact store runs the concurrent `DELETE`
//! right before it serves the first read of the resource's stored bytes (after the request found
//! the resource's row), on SQLite + local files and Postgres + S3.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::http::StatusCode;
use ferrotune::db::ModelRecord;
use ferrotune::storage::{ArtifactStore, Download, StorageError, Upload};
use futures::future::BoxFuture;
use serde_json::json;

use crate::helpers::{backends, chat_dataset, Backend, TestApp};

type Hook = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// Real storage with one planted interruption: the first `get` of a key under `prefix` first
/// runs the hook (another request, completed before the read goes on).
struct InterruptedStore {
    inner: Arc<dyn ArtifactStore>,
    planted: Mutex<Option<(String, Hook)>>,
}

impl InterruptedStore {
    fn plant(&self, prefix: &str, hook: Hook) {
        *self.planted.lock().unwrap() = Some((prefix.to_string(), hook));
    }

    fn fired(&self) -> bool {
        self.planted.lock().unwrap().is_none()
    }
}

#[async_trait]
impl ArtifactStore for InterruptedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn begin_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError> {
        self.inner.begin_upload(key).await
    }
    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        let hook = {
            let mut planted = self.planted.lock().unwrap();
            match planted.as_ref() {
                Some((prefix, _)) if key.starts_with(prefix.as_str()) => planted.take().map(|(_, hook)| hook),
                _ => None,
            }
        };
        if let Some(hook) = hook {
            hook().await;
        }
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.inner.delete(key).await
    }
    async fn check(&self) -> Result<(), StorageError> {
        self.inner.check().await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list(prefix).await
    }
}

async fn app_with_interruptions(backend: Backend) -> (TestApp, Arc<InterruptedStore>) {
    let slot: Arc<Mutex<Option<Arc<InterruptedStore>>>> = Arc::default();
    let kept = slot.clone();
    let app = TestApp::spawn_wrapping_storage(backend, move |inner| {
        let store = Arc::new(InterruptedStore { inner, planted: Mutex::default() });
        *kept.lock().unwrap() = Some(store.clone());
        store
    })
    .await;
    let store = slot.lock().unwrap().take().unwrap();
    (app, store)
}

/// A LoRA model of the default project, stored as a PEFT adapter (empty: it is deleted before
/// anything reads its tensors).
async fn stored_model(app: &TestApp, name: &str) -> ModelRecord {
    let dir = tempfile::tempdir().unwrap();
    let config = ferrotune::peft::lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: ferrotune::peft::lora::TargetModules::List(vec!["q_proj".into()]),
        use_rslora: false,
        target_parameters: Vec::new(),
        train_router: false,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
    };
    let tensors = std::collections::HashMap::new();
    ferrotune::peft::adapter::save_adapter(dir.path(), &config, "tiny-llama", &["q_proj"], &tensors, false).unwrap();
    let job_id = name.rsplit(':').next().unwrap();
    let model = ModelRecord {
        id: name.to_string(),
        project_id: ferrotune::db::DEFAULT_PROJECT_ID.into(),
        job_id: None,
        base_model: "tiny-llama".into(),
        method: "lora".into(),
        storage_key: format!("models/{}/ftjob-{job_id}", ferrotune::db::DEFAULT_PROJECT_ID),
        created_at: 1_800_000_000,
    };
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let key = format!("{}/{}", model.storage_key, path.file_name().unwrap().to_string_lossy());
        let bytes = bytes::Bytes::from(std::fs::read(&path).unwrap());
        let body = futures::StreamExt::boxed(futures::stream::iter(vec![Ok(bytes)]));
        ferrotune::storage::put_stream(app.storage().as_ref(), &key, body).await.unwrap();
    }
    app.store().insert_model(&model).await.unwrap();
    model
}

fn delete_hook(app: &TestApp, path: String) -> Hook {
    let router = app.router.clone();
    Box::new(move || {
        Box::pin(async move {
            let request = crate::helpers::request("DELETE", &path, None).body(axum::body::Body::empty()).unwrap();
            let response = tower::ServiceExt::oneshot(router, request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "the concurrent delete succeeds");
        })
    })
}

#[tokio::test]
async fn a_model_download_racing_its_delete_is_a_404() {
    for backend in backends() {
        let (app, store) = app_with_interruptions(backend).await;
        let model = stored_model(&app, "ft:tiny-llama:default:race:abc123").await;
        store.plant("models/", delete_hook(&app, format!("/v1/models/{}", model.id)));

        let response = app.get(&format!("/v1/models/{}/content", model.id), None).await;

        assert!(store.fired(), "{backend:?}: the delete ran in the middle of the download");
        response.assert_error(StatusCode::NOT_FOUND, "model_not_found");
    }
}

#[tokio::test]
async fn a_chat_with_a_model_deleted_while_it_loads_is_a_404() {
    for backend in backends() {
        let (app, store) = app_with_interruptions(backend).await;
        let model = stored_model(&app, "ft:tiny-llama:default:race:def456").await;
        store.plant("models/", delete_hook(&app, format!("/v1/models/{}", model.id)));

        let body = json!({"model": model.id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        let response = app.post_json("/v1/chat/completions", &body, None).await;

        assert!(store.fired(), "{backend:?}: the delete ran while the adapter loaded");
        response.assert_error(StatusCode::NOT_FOUND, "model_not_found");
    }
}

#[tokio::test]
async fn a_file_download_racing_its_delete_is_a_404() {
    for backend in backends() {
        let (app, store) = app_with_interruptions(backend).await;
        let file = app.upload_dataset("train.jsonl", &chat_dataset(3), None).await;
        let id = file["id"].as_str().unwrap();
        store.plant("files/", delete_hook(&app, format!("/v1/files/{id}")));

        let response = app.get(&format!("/v1/files/{id}/content"), None).await;

        assert!(store.fired(), "{backend:?}: the delete ran between finding the file and reading it");
        response.assert_error(StatusCode::NOT_FOUND, "file_not_found");
    }
}
