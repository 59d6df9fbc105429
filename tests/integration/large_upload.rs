//! The real binary: a large streamed upload in bounded memory, and graceful shutdown on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

/// A `ferrotune serve` child process on a free port, with its own data directory.
struct ServerProcess {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(["--log-format", "json", "serve", "--bind", "127.0.0.1:0"])
            .env("FERROTUNE_DATA_DIR", dir.path())
            .env_remove("FERROTUNE_DATABASE_URL")
            .env_remove("FERROTUNE_STORAGE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferrotune");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let address = loop {
            let line = lines.next().expect("server exited before listening").unwrap();
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["fields"]["message"] == "ferrotune is listening" {
                break event["fields"]["address"].as_str().unwrap().to_string();
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, url: format!("http://{address}"), _dir: dir }
    }

    /// Peak resident memory of the server so far, in MiB (Linux `VmHWM`).
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib / 1024.0
    }

    fn terminate(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// About 1 MiB of valid chat lines, and how many lines it holds.
fn block() -> (Bytes, u64) {
    let mut text = String::new();
    let mut lines = 0;
    while text.len() < (1 << 20) - 200 {
        text.push_str(&format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"Question number {lines}?\"}},{{\"role\":\"assistant\",\"content\":\"Answer {lines}.\"}}]}}\n"
        ));
        lines += 1;
    }
    (Bytes::from(text), lines)
}

fn upload_form(blocks: u64, delay: Duration) -> (reqwest::multipart::Form, u64, u64) {
    let (block, lines) = block();
    let total = block.len() as u64 * blocks;
    let stream = futures::stream::iter(0..blocks).then(move |_| {
        let block = block.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<Bytes, std::io::Error>(block)
        }
    });
    let part =
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), total).file_name("big.jsonl");
    let form = reqwest::multipart::Form::new().text("purpose", "fine-tune").part("file", part);
    (form, total, lines * blocks)
}

#[tokio::test]
async fn a_large_upload_streams_in_bounded_memory() {
    let mib: u64 = std::env::var("FERROTUNE_TEST_UPLOAD_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let server = ServerProcess::start();
    let (form, bytes, examples) = upload_form(mib, Duration::ZERO);
    let started = Instant::now();
    let response =
        reqwest::Client::new().post(format!("{}/v1/files", server.url)).multipart(form).send().await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let status = response.status();
    let file: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["bytes"], bytes);
    assert_eq!(file["examples"], examples);
    let peak = server.peak_rss_mib();
    eprintln!(
        "upload: {mib} MiB in {elapsed:.1} s = {:.0} MB/s; server peak RSS {peak:.0} MiB",
        bytes as f64 / 1e6 / elapsed
    );
    assert!(peak < 200.0, "server peak RSS {peak:.0} MiB for a {mib} MiB upload");
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_upload_finish_then_exits_cleanly() {
    let mut server = ServerProcess::start();
    let (form, bytes, _) = upload_form(12, Duration::from_millis(100));
    let url = format!("{}/v1/files", server.url);
    let upload = tokio::spawn(async move { reqwest::Client::new().post(url).multipart(form).send().await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.terminate();
    let response = upload.await.unwrap().expect("the in-flight request is answered");
    assert_eq!(response.status(), 200);
    let file: serde_json::Value = response.json().await.unwrap();
    assert_eq!(file["bytes"], bytes);
    let exit = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().unwrap();
        drop(server);
        status
    })
    .await
    .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}
