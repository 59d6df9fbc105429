//! The official `openai` Python SDK against a live server (tests/sdk/*.py).

use crate::helpers::{backends, env_or_skip, RunningServer};

#[tokio::test]
async fn the_openai_python_sdk_creates_lists_retrieves_downloads_and_deletes_files() {
    run_sdk_script("files_sdk.py").await;
}

#[tokio::test]
async fn the_openai_python_sdk_creates_lists_and_controls_fine_tuning_jobs_and_lists_models() {
    run_sdk_script("jobs_sdk.py").await;
}

#[tokio::test]
async fn the_openai_python_sdk_follows_a_job_to_its_fine_tuned_model() {
    run_sdk_script_with(1, "job_run_sdk.py").await;
}

#[tokio::test]
async fn a_model_fine_tuned_by_a_job_answers_what_it_was_taught_through_the_sdk_and_curl() {
    run_sdk_script_with(1, "chat_sdk.py").await;
}

/// Runs `tests/sdk/<script> BASE_URL` against a live server (without executors) on every backend.
async fn run_sdk_script(script: &str) {
    run_sdk_script_with(0, script).await;
}

async fn run_sdk_script_with(executors: usize, script: &str) {
    let Some(python) = env_or_skip("FERROTUNE_TEST_PYTHON") else {
        eprintln!("skipping: set FERROTUNE_TEST_PYTHON to a Python with the `openai` package");
        return;
    };
    let script = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    for backend in backends() {
        let server = RunningServer::start_with_executors(backend, executors).await;
        let output =
            tokio::process::Command::new(&python).arg(&script).arg(server.url()).output().await.expect("run python");
        assert!(
            output.status.success(),
            "{backend:?}: SDK script failed\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        server.shutdown().await.unwrap();
    }
}
