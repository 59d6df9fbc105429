//! Validated types shared by the HTTP layer and the stores: file purposes, API keys, datasets.
//! Nothing here does I/O.

pub mod api_key;
pub mod dataset;
pub mod file;
pub mod hyperparameters;
pub mod job;
pub mod model_name;
