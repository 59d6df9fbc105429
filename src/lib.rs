//! ferrotune: a self-hosted fine-tuning service with OpenAI-compatible Files, Fine-tuning and Chat APIs.
//!
//! Layers (dependencies point inwards): `http` serves requests using `domain`, `db` and `storage`;
//! `cli` and `startup` wire everything together. The machine-learning core (`models`, `peft`,
//! `data`, `train`) knows nothing of HTTP or SQL.

pub mod bench;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod data;
pub mod db;
pub mod device;
pub mod domain;
pub mod executor;
pub mod http;
pub mod ids;
pub mod infer;
pub mod memory;
pub mod models;
pub mod peft;
pub mod rng;
pub mod serving;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod train;
