//! A `ferrotune worker` killed with SIGKILL mid-training: its lease lapses, another executor
//! resumes the job from the last checkpoint (the first step after resuming is the checkpoint's
//! step + 1), and the final adapter equals that of an uninterrupted run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{Backend, TestApp};
use crate::jobs_e2e::{all_events, create_job, job_request, status, upload_qa, wait_for};

/// The worker process, killed if the test ends early so it never outlives it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_killed_worker_s_job_resumes_elsewhere_from_its_last_checkpoint() {
    let mut app = TestApp::spawn(Backend::SqliteLocal).await;
    let file = upload_qa(&app).await;
    let request = job_request(&file, 50, 1, 20); // 400 steps, a checkpoint every 20
    let crashed = create_job(&app, &request).await;

    let settings = app.backing.settings.clone();
    let ferrotune::storage::StorageSettings::Local(artifacts) = settings.storage.clone() else { unreachable!() };
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let mut worker = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(["--log", "warn", "--lease-secs", "2", "--poll-interval-ms", "50", "worker"])
            .env("FERROTUNE_DATABASE_URL", &settings.database_url)
            .env("FERROTUNE_STORAGE_URL", &artifacts)
            .env("FERROTUNE_DATA_DIR", settings.executor.work_dir.parent().unwrap())
            .env("FERROTUNE_BASE_MODELS", format!("tiny-llama={}", fixture.display()))
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .spawn()
            .expect("start a worker"),
    );

    // Kill it once a checkpoint exists and training has moved past it.
    let started = Instant::now();
    let checkpoint_step = loop {
        let checkpoints = app.store().list_checkpoints(&crashed).await.unwrap();
        let job = app.store().job_by_id(&crashed).await.unwrap().unwrap();
        if let Some(latest) = checkpoints.first() {
            if job.step > latest.step_number {
                worker.0.kill().unwrap();
                worker.0.wait().unwrap();
                // Whatever the worker recorded after the checkpoint is lost with it.
                break app.store().list_checkpoints(&crashed).await.unwrap()[0].step_number;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the worker made no checkpoint: {job:?}");
        assert!(job.status != "succeeded", "the job finished before it could be killed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Once the lease has lapsed, the job waits in the queue showing the checkpoint's progress:
    // what the dead worker did after it will be done again.
    let lapsed = Instant::now();
    while app.store().requeue_expired().await.unwrap() != vec![crashed.clone()] {
        assert!(lapsed.elapsed() < Duration::from_secs(10), "the dead worker's lease never lapsed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let queued = crate::jobs_e2e::get_job(&app, &crashed).await;
    assert_eq!(status(&queued), "queued");
    assert_eq!(queued["progress"]["step"].as_i64(), Some(checkpoint_step), "{queued}");

    app.start_executors(1);
    let job =
        wait_for(&app, &crashed, Duration::from_secs(240), |j| ["succeeded", "failed"].contains(&status(j))).await;
    assert_eq!(status(&job), "succeeded", "{job}");
    let events = all_events(&app, &crashed).await;
    let resumed = events
        .iter()
        .position(|e| e["message"].as_str().is_some_and(|m| m.starts_with("Fine-tuning resumed")))
        .expect("a resume event");
    assert_eq!(
        events[resumed]["message"],
        format!("Fine-tuning resumed from the checkpoint at step {checkpoint_step} (attempt 2)"),
        "the resume event names the checkpoint training continues from"
    );
    assert_eq!(
        crate::jobs_e2e::csv_steps(&crate::jobs_e2e::results_csv(&app, &job).await),
        (1..=400).collect::<Vec<_>>(),
        "the results file holds every step once, the dead worker's included"
    );
    let first_after = events[resumed..]
        .iter()
        .find(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
        .map(|e| e["data"]["step"].as_i64().unwrap());
    assert_eq!(first_after, Some(checkpoint_step + 1), "resumed at the step after the checkpoint");

    // The same job without interruption ends with the same adapter.
    let straight = create_job(&app, &request).await;
    let reference =
        wait_for(&app, &straight, Duration::from_secs(240), |j| ["succeeded", "failed"].contains(&status(j))).await;
    assert_eq!(status(&reference), "succeeded");
    let adapter = |job: &serde_json::Value| {
        let key = format!(
            "models/{}/{}/adapter_model.safetensors",
            job["organization_id"].as_str().unwrap(),
            job["id"].as_str().unwrap()
        );
        artifacts.join(key)
    };
    let tensors = |path: std::path::PathBuf| {
        candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        tensors(adapter(&job)),
        tensors(adapter(&reference)),
        "the resumed run ends where the uninterrupted one does"
    );
}
