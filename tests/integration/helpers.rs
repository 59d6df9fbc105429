//! Test harness: backends, in-process apps, real servers, multipart bodies.
//!
//! Postgres + S3 run when `FERROTUNE_TEST_POSTGRES_URL` (an admin URL; each test gets its own
//! database) and `FERROTUNE_TEST_S3_ENDPOINT` / `FERROTUNE_TEST_S3_BUCKET` are set; with
//! `FERROTUNE_TEST_REQUIRE_ALL=1` (as in CI) their absence fails the tests instead of skipping.

use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use ferrotune::db::{NewApiKey, Store};
use ferrotune::domain::api_key::generate_key;
use ferrotune::domain::dataset::Limits;
use ferrotune::http::state::AppState;
use ferrotune::startup::{build_state, open_backends, Application, Settings};
use ferrotune::storage::{ArtifactStore, S3Settings, StorageSettings};
use http_body_util::BodyExt;
use serde_json::Value;
use sqlx::{Connection, Executor};
use tower::ServiceExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    SqliteLocal,
    PostgresS3,
}

fn require_all() -> bool {
    std::env::var("FERROTUNE_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

pub fn env_or_skip(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if require_all() => panic!("{name} is not set but FERROTUNE_TEST_REQUIRE_ALL=1"),
        _ => None,
    }
}

/// The backends to run a suite against.
pub fn backends() -> Vec<Backend> {
    let mut all = vec![Backend::SqliteLocal];
    let postgres = env_or_skip("FERROTUNE_TEST_POSTGRES_URL");
    let s3 = env_or_skip("FERROTUNE_TEST_S3_ENDPOINT");
    if postgres.is_some() && s3.is_some() {
        all.push(Backend::PostgresS3);
    } else {
        eprintln!("skipping Postgres + S3: set FERROTUNE_TEST_POSTGRES_URL and FERROTUNE_TEST_S3_ENDPOINT");
    }
    all
}

pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
            let _ = ferrotune::telemetry::init(ferrotune::config::LogFormat::Text, "info,ferrotune=debug");
        }
    });
}

pub fn random_suffix() -> String {
    ferrotune::ids::random_alphanumeric(12).to_lowercase()
}

/// A Postgres database that exists for one test and is dropped afterwards.
pub struct TempDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TempDatabase {
    pub async fn create(admin_url: &str) -> Self {
        let name = format!("ferrotune_t_{}", random_suffix());
        let mut admin = sqlx::PgConnection::connect(admin_url).await.expect("connect to Postgres");
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create a test database");
        let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin_url);
        Self { admin_url: admin_url.to_string(), url: format!("{base}/{name}"), name }
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime; use a thread with its own to wait for the drop.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
                }
            });
        })
        .join();
    }
}

/// Backend resources that must outlive the app.
pub struct Backing {
    pub settings: Settings,
    _dir: tempfile::TempDir,
    _database: Option<TempDatabase>,
}

pub async fn backing(backend: Backend) -> Backing {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let (database_url, storage, database) = match backend {
        Backend::SqliteLocal => (
            format!("sqlite://{}", dir.path().join("ferrotune.db").display()),
            StorageSettings::Local(dir.path().join("artifacts")),
            None,
        ),
        Backend::PostgresS3 => {
            let database = TempDatabase::create(&env_or_skip("FERROTUNE_TEST_POSTGRES_URL").unwrap()).await;
            (database.url.clone(), s3_settings(), Some(database))
        }
    };
    Backing {
        settings: Settings {
            bind: "127.0.0.1:0".parse().unwrap(),
            database_url,
            database_max_connections: 8,
            storage,
            dataset_limits: Limits { max_line_bytes: 64 << 10, min_examples: 2 },
            max_upload_bytes: 4 << 20,
            max_json_body_bytes: 64 << 10,
            shutdown_grace: Duration::from_secs(5),
            catalog: Arc::new(test_catalog()),
            executor: ferrotune::executor::ExecutorSettings {
                executors: 0,
                devices: Vec::new(),
                lease: Duration::from_secs(3),
                poll_interval: Duration::from_millis(50),
                work_dir: dir.path().join("work"),
            },
            inference: ferrotune::serving::InferenceSettings {
                engine: ferrotune::infer::engine::EngineSettings { max_batch: 16, max_queue: 64 },
                adapter_cache_bytes: 256 << 20,
                max_models: 2,
                work_dir: dir.path().join("work").join("serving"),
                device: Default::default(),
            },
        },
        _dir: dir,
        _database: database,
    }
}

/// The fixture models as base models: `tiny-llama` (llama) and `tiny-qwen2` (qwen2).
pub fn test_catalog() -> ferrotune::catalog::Catalog {
    let mut catalog = ferrotune::catalog::Catalog::default();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    for (name, dir) in [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2")] {
        catalog.add(name, ferrotune::catalog::ModelSource::Directory(fixtures.join(dir))).unwrap();
    }
    catalog
}

/// S3 settings with a fresh prefix in the test bucket.
pub fn s3_settings() -> StorageSettings {
    StorageSettings::S3(S3Settings {
        bucket: env_or_skip("FERROTUNE_TEST_S3_BUCKET").unwrap_or_else(|| "ferrotune-test".into()),
        prefix: format!("t-{}/", random_suffix()),
        endpoint: env_or_skip("FERROTUNE_TEST_S3_ENDPOINT"),
        region: Some(std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into())),
        force_path_style: true,
    })
}

/// The app in-process: requests go straight to the router.
pub struct TestApp {
    pub router: Router,
    pub state: AppState,
    pub backing: Backing,
    /// Executor pools started by `start_executors`: each is like one worker process.
    pub pools: Vec<ferrotune::executor::ExecutorPool>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut backing = backing(backend).await;
        adjust(&mut backing.settings);
        let (store, storage) = open_backends(&backing.settings).await.expect("open backends");
        let state = build_state(&backing.settings, store, storage).await.expect("build state");
        Self { router: ferrotune::http::router(state.clone()), state, backing, pools: Vec::new() }
    }

    /// An app whose artifact store is the backend's real one seen through `wrap`.
    pub async fn spawn_wrapping_storage(
        backend: Backend,
        wrap: impl FnOnce(Arc<dyn ArtifactStore>) -> Arc<dyn ArtifactStore>,
    ) -> Self {
        let backing = backing(backend).await;
        let (store, storage) = open_backends(&backing.settings).await.expect("open backends");
        let state = build_state(&backing.settings, store, wrap(storage)).await.expect("build state");
        Self { router: ferrotune::http::router(state.clone()), state, backing, pools: Vec::new() }
    }

    /// Another API process on this app's database and storage (a replica behind the same load
    /// balancer): its own state, and none of this app's executors. It lives no longer than `self`.
    pub async fn replica(&self) -> TestApp {
        let backing =
            Backing { settings: self.backing.settings.clone(), _dir: tempfile::tempdir().unwrap(), _database: None };
        let (store, storage) = open_backends(&backing.settings).await.expect("open backends");
        let state = build_state(&backing.settings, store, storage).await.expect("build state");
        TestApp { router: ferrotune::http::router(state.clone()), state, backing, pools: Vec::new() }
    }

    /// Starts a pool of `n` executors (a worker) on this app's database and storage.
    pub fn start_executors(&mut self, n: usize) {
        let mut settings = self.backing.settings.clone();
        settings.executor.executors = n;
        let context = ferrotune::startup::executor_context(&settings, &self.state);
        self.pools.push(ferrotune::executor::ExecutorPool::start(context));
    }

    pub async fn post_json(&self, path: &str, body: &Value, key: Option<&str>) -> TestResponse {
        let request = request("POST", path, key)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        self.send(request).await
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.state.store
    }

    pub fn storage(&self) -> &Arc<dyn ArtifactStore> {
        &self.state.storage
    }

    /// Creates a key for `project` and returns the secret.
    pub async fn create_key(&self, project: &str) -> String {
        let key = generate_key();
        self.store()
            .create_api_key(NewApiKey {
                project_name: project,
                name: "test",
                key_hash: &key.hash,
                display_prefix: &key.display_prefix,
            })
            .await
            .unwrap();
        key.secret
    }

    /// Sends a request to the router; the response is checked against `openapi.yaml`.
    pub async fn send(&self, request: Request<Body>) -> TestResponse {
        let (method, uri) = (request.method().to_string(), request.uri().to_string());
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes().to_vec();
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
        crate::schema::check_response(&method, &uri, status.as_u16(), content_type, &body);
        TestResponse { status, headers, body }
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> TestResponse {
        self.send(request("GET", path, key).body(Body::empty()).unwrap()).await
    }

    pub async fn delete(&self, path: &str, key: Option<&str>) -> TestResponse {
        self.send(request("DELETE", path, key).body(Body::empty()).unwrap()).await
    }

    /// `POST /v1/files` with the given multipart fields.
    pub async fn upload(&self, fields: &[Field<'_>], key: Option<&str>) -> TestResponse {
        let (content_type, body) = multipart(fields);
        let request =
            request("POST", "/v1/files", key).header("content-type", content_type).body(Body::from(body)).unwrap();
        self.send(request).await
    }

    /// Uploads a fine-tune file and returns its object, asserting success.
    pub async fn upload_dataset(&self, filename: &str, content: &str, key: Option<&str>) -> Value {
        let response =
            self.upload(&[Field::text("purpose", "fine-tune"), Field::file(filename, content.as_bytes())], key).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        response.json()
    }
}

pub fn request(method: &str, path: &str, key: Option<&str>) -> axum::http::request::Builder {
    let builder = Request::builder().method(method).uri(path);
    match key {
        Some(key) => builder.header("authorization", format!("Bearer {key}")),
        None => builder,
    }
}

pub struct TestResponse {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl TestResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an OpenAI-shaped error with this status and code.
    pub fn assert_error(&self, status: StatusCode, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        let body = self.json();
        let error = &body["error"];
        assert_eq!(error["code"], code, "{body}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        assert!(error["type"].is_string(), "{body}");
        assert!(error.get("param").is_some(), "{body}");
        error.clone()
    }
}

pub enum Field<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a [u8]),
}

impl<'a> Field<'a> {
    pub fn text(name: &'a str, value: &'a str) -> Self {
        Self::Text(name, value)
    }

    pub fn file(filename: &'a str, content: &'a [u8]) -> Self {
        Self::File(filename, content)
    }
}

/// A `multipart/form-data` body; returns (content type, body).
pub fn multipart(fields: &[Field<'_>]) -> (String, Vec<u8>) {
    let boundary = format!("----ferrotune{}", random_suffix());
    let mut body = Vec::new();
    for field in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match field {
            Field::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
                );
            }
            Field::File(filename, content) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/jsonl\r\n\r\n")
                        .as_bytes(),
                );
                body.extend_from_slice(content);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `n` valid chat examples, one per line.
pub fn chat_dataset(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"messages":[{{"role":"user","content":"What is {i} + 1?"}},{{"role":"assistant","content":"{}"}}]}}"#,
                i + 1
            ) + "\n"
        })
        .collect()
}

/// A child process (a worker, a server), killed when the test ends so it never outlives it.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server on a real socket (port 0); stops when the handle is dropped.
pub struct RunningServer {
    pub addr: SocketAddr,
    _backing: Backing,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningServer {
    /// A server with `executors` in-process training executors.
    pub async fn start_with_executors(backend: Backend, executors: usize) -> Self {
        let mut backing = backing(backend).await;
        backing.settings.executor.executors = executors;
        let app = Application::build(backing.settings.clone()).await.expect("build the app");
        let addr = app.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self { addr, _backing: backing, stop: Some(stop), task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Asks for a graceful shutdown and waits for the server to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await?
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
