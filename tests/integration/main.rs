//! The one integration-test binary. The API in-process (and over real sockets where it matters),
//! against SQLite + local files always and Postgres + S3 when configured (see `helpers`); the
//! training core against PyTorch/transformers/PEFT references in `tests/fixtures`.

mod auth;
mod bench_cli;
mod checkpointing;
mod continuing;
mod devices;
mod encoder_interop;
mod encoder_numerics;
mod encoder_training;
mod encoders_api;
mod errors;
mod families;
mod files;
mod gguf;
mod helpers;
mod inference;
mod interop;
mod job_store;
mod jobs_api;
mod jobs_e2e;
mod large_upload;
mod memory;
mod model_numerics;
mod openapi;
mod preference;
mod races;
mod schema;
mod sdk;
mod storage;
mod store;
mod t5;
mod t5_api;
mod training;
mod worker_crash;
