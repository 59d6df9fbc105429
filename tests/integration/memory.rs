//! A `serve` process gives a finished job's memory back: a QLoRA job on SmolLM2-135M (a GGUF
//! base) in its in-process executor, then the process's resident memory must have fallen back
//! close to where it started, far below the job's peak. Measured in a process of its own (the
//! server binary), since this test binary runs many tests at once. Before the fix the process
//! kept about two thirds of the job's peak (854 of 1,271 MiB with `scripts/job_memory.py`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::gguf::smollm2;
use crate::helpers::KillOnDrop;

/// (VmRSS, VmHWM) of a process, in MiB.
fn resident_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> f64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test]
async fn a_serve_process_returns_a_finished_job_s_memory() {
    let Some(gguf) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["--log-format", "json", "--log", "info", "--data-dir"])
        .arg(dir.path())
        .arg("--base-model")
        .arg(format!("smollm2={}", gguf.display()))
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = child.stderr.take().unwrap();
    let server = KillOnDrop(child);
    let mut lines = BufReader::new(log).lines();
    let address = loop {
        let line = lines.next().expect("the server printed its address").unwrap();
        let entry: Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(address) = entry["fields"]["address"].as_str() {
            break address.to_string();
        }
    };
    // Keep reading the log so that the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let base = format!("http://{address}");
    let client = reqwest::Client::new();
    let pid = server.0.id();
    let (idle, _) = resident_mib(pid);

    let examples: String = (0..16)
        .map(|i| {
            json!({"messages": [{"role": "user", "content": format!("What is the capital of land {i}?")},
                {"role": "assistant", "content": format!("The capital of land {i} is City {i}.")}]})
            .to_string()
                + "\n"
        })
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part("file", reqwest::multipart::Part::bytes(examples.into_bytes()).file_name("capitals.jsonl"));
    let file: Value =
        client.post(format!("{base}/v1/files")).multipart(form).send().await.unwrap().json().await.unwrap();
    let request = json!({"model": "smollm2", "training_file": file["id"], "seed": 1,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "training_type": "qlora", "n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3,
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}}}}});
    let mut job: Value =
        client.post(format!("{base}/v1/fine_tuning/jobs")).json(&request).send().await.unwrap().json().await.unwrap();
    let started = Instant::now();
    while !["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or("")) {
        assert!(started.elapsed() < Duration::from_secs(900), "the job did not end: {job}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let url = format!("{base}/v1/fine_tuning/jobs/{}", job["id"].as_str().unwrap());
        job = client.get(url).send().await.unwrap().json().await.unwrap();
    }
    assert_eq!(job["status"], "succeeded", "{job}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (after, peak) = resident_mib(pid);
    let kept = (after - idle) / (peak - idle);
    eprintln!("resident MiB: idle {idle:.0}, job peak {peak:.0}, after the job {after:.0}");
    assert!(
        kept < 0.25,
        "after the job the server holds {after:.0} MiB (idle {idle:.0}, job peak {peak:.0}): {:.0}% of the job's memory",
        kept * 100.0
    );
}
