//! The one integration-test binary: the API in-process (and over real sockets where it matters),
//! against SQLite + local files always, and Postgres + S3 when configured (see `helpers`).

mod auth;
mod errors;
mod files;
mod helpers;
mod large_upload;
mod openapi;
mod sdk;
mod storage;
mod store;
