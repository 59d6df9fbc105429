//! What every handler can reach.

use std::sync::Arc;

use crate::catalog::Catalog;
use crate::db::Store;
use crate::domain::dataset::Limits;
use crate::storage::ArtifactStore;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub storage: Arc<dyn ArtifactStore>,
    pub catalog: Arc<Catalog>,
    pub inference: Arc<crate::serving::Inference>,
    pub config: Arc<HttpConfig>,
    /// The jobs this process's executors are training, for cancel and pause to reach them at once.
    pub job_signals: crate::executor::JobSignals,
}

/// Request limits and policies of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub max_upload_bytes: u64,
    pub max_json_body_bytes: usize,
    pub dataset_limits: Limits,
    /// Requests without a key are served as the default project while no key exists. Only
    /// ever true when the server listens on a loopback address.
    pub allow_anonymous: bool,
}
