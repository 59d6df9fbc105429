//! Devices are chosen at the edge: every command that takes one refuses a GPU it cannot use with
//! the reason (here: a build without the `cuda` feature), before doing any work, and never falls
//! back to the CPU; the CPU is named the same way; a job's record says which executor ran it.

use std::process::Command;
use std::time::Duration;

use crate::jobs_e2e::{all_events, create_job, job_request, status, upload_qa, wait_for};
use crate::model_numerics::fixture;

/// Runs the binary; returns (success, stdout + stderr).
fn ferrotune(args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn asking_for_a_gpu_without_cuda_support_stops_every_command_with_the_reason() {
    if cfg!(feature = "cuda") {
        eprintln!("skipping: this build has CUDA support");
        return;
    }
    let model = fixture("llama");
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("train.yaml");
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, crate::helpers::chat_dataset(4)).unwrap();
    std::fs::write(&config, format!("model: {model}\ntrain_file: {}\noutput_dir: out\n", data.display())).unwrap();
    let config = config.to_str().unwrap();
    let attempts: [&[&str]; 6] = [
        &["train", "--config", config, "--device", "cuda:0"],
        &["bench", "train", "--model", model, "--steps", "1", "--device", "cuda"],
        &["bench", "generate", "--model", model, "--device", "cuda:1"],
        &["worker", "--devices", "0,1"],
        &["serve", "--bind", "127.0.0.1:0", "--devices", "0"],
        &["serve", "--bind", "127.0.0.1:0", "--executors", "0", "--serve-device", "cuda"],
    ];
    for args in attempts {
        let (ok, text) = ferrotune(args);
        assert!(!ok, "{args:?} must fail");
        assert!(text.contains("built without CUDA support"), "{args:?}: {text}");
    }
    let (ok, text) = ferrotune(&["train", "--config", config, "--device", "tpu"]);
    assert!(!ok && text.contains("unknown device"), "{text}");
}

#[test]
fn the_cpu_is_a_device_like_any_other() {
    let model = fixture("llama");
    let (ok, text) = ferrotune(&[
        "bench",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        "1",
        "--seq",
        "8",
        "--steps",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains(r#""device":"cpu""#), "{text}");
}

#[tokio::test]
async fn a_job_records_the_host_and_device_that_ran_it() {
    let mut app = crate::helpers::TestApp::spawn(crate::helpers::Backend::SqliteLocal).await;
    app.start_executors(1);
    let file = upload_qa(&app).await;
    let id = create_job(&app, &job_request(&file, 1, 4, 0)).await;
    let job = wait_for(&app, &id, Duration::from_secs(60), |j| ["succeeded", "failed"].contains(&status(j))).await;
    assert_eq!(status(&job), "succeeded", "{job}");
    let executor = job["executor"].as_str().expect("the job names its executor");
    assert!(executor.ends_with(" (cpu)") && executor.len() > " (cpu)".len(), "{executor}");
    let events = all_events(&app, &id).await;
    assert!(events.iter().any(|e| e["message"] == format!("Training on {executor}")), "{events:?}");
}
