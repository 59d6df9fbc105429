//! ferrotune: a self-hosted fine-tuning service with OpenAI-compatible Files, Fine-tuning and Chat APIs.
//!
//! Layers (dependencies point inwards): `http` serves requests using `domain`, `db` and `storage`;
//! `cli` and `startup` wire everything together.

pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod http;
pub mod ids;
pub mod startup;
pub mod storage;
pub mod telemetry;
