//! Wires the application together: database, storage, router, listener. Tests use it too.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::catalog::Catalog;
use crate::db::{SqlStore, Store};
use crate::domain::dataset::Limits;
use crate::executor::{ExecutorContext, ExecutorPool, ExecutorSettings};
use crate::http::state::{AppState, HttpConfig};
use crate::serving::{Inference, InferenceSettings};
use crate::storage::{self, StorageSettings};

/// Everything `serve` needs, already parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    pub database_url: String,
    pub database_max_connections: u32,
    pub storage: StorageSettings,
    pub dataset_limits: Limits,
    pub max_upload_bytes: u64,
    pub max_json_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub catalog: Arc<Catalog>,
    pub executor: ExecutorSettings,
    pub inference: InferenceSettings,
}

/// Connects to the database (migrating it) and opens the artifact store.
pub async fn open_backends(settings: &Settings) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn storage::ArtifactStore>)> {
    let store = SqlStore::connect(&settings.database_url, settings.database_max_connections)
        .await
        .context("could not open the database")?;
    store.migrate().await.context("could not migrate the database")?;
    let artifacts = storage::open(&settings.storage).await.context("could not open artifact storage")?;
    Ok((Arc::new(store), artifacts))
}

/// The application state for a set of backends; `bind` decides whether anonymous access is allowed.
pub async fn build_state(
    settings: &Settings,
    store: Arc<dyn Store>,
    storage: Arc<dyn storage::ArtifactStore>,
) -> anyhow::Result<AppState> {
    let loopback = settings.bind.ip().is_loopback();
    if !loopback && !store.any_keys_configured().await? {
        anyhow::bail!(
            "refusing to listen on {} without API keys: anyone who can reach it could use it. \
             Create a key with `ferrotune keys create`, or bind to 127.0.0.1",
            settings.bind
        );
    }
    let inference = Arc::new(
        Inference::new(settings.catalog.clone(), store.clone(), storage.clone(), settings.inference.clone())
            .context("--serve-device")?,
    );
    Ok(AppState {
        store,
        storage,
        inference,
        job_signals: crate::executor::JobSignals::default(),
        catalog: settings.catalog.clone(),
        config: Arc::new(HttpConfig {
            max_upload_bytes: settings.max_upload_bytes,
            max_json_body_bytes: settings.max_json_body_bytes,
            dataset_limits: settings.dataset_limits,
            allow_anonymous: loopback,
        }),
    })
}

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    shutdown_grace: Duration,
    pool: Option<ExecutorPool>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let (store, artifacts) = open_backends(&settings).await?;
        let state = build_state(&settings, store, artifacts).await?;
        let listener =
            TcpListener::bind(settings.bind).await.with_context(|| format!("could not listen on {}", settings.bind))?;
        tracing::info!(
            address = %listener.local_addr()?,
            storage = %state.storage.describe(),
            anonymous = state.config.allow_anonymous,
            "ferrotune is listening"
        );
        let executors = settings.executor.executor_devices().len();
        let pool = (executors > 0).then(|| ExecutorPool::start(executor_context(&settings, &state)));
        Ok(Self { listener, state, shutdown_grace: settings.shutdown_grace, pool })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish (up to the grace period).
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = stopping_tx.send(());
        };
        let server = axum::serve(self.listener, crate::http::router(self.state)).with_graceful_shutdown(signal);
        let grace = self.shutdown_grace;
        let deadline = async move {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            result = server => result.context("the server failed")?,
            () = deadline => tracing::warn!("grace period over; exiting with requests still in flight"),
        }
        if let Some(pool) = self.pool {
            // Running jobs checkpoint and go back to the queue for another executor.
            pool.shutdown().await;
        }
        Ok(())
    }
}

/// The executors' view of the application's backends.
pub fn executor_context(settings: &Settings, state: &AppState) -> ExecutorContext {
    ExecutorContext {
        store: state.store.clone(),
        storage: state.storage.clone(),
        catalog: state.catalog.clone(),
        settings: settings.executor.clone(),
        signals: state.job_signals.clone(),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}
