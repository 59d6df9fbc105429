//! A `ferrotune worker` killed with SIGKILL mid-training, on SQLite + local files and Postgres +
//! S3: its lease lapses, the job waits in the queue showing its checkpoint's progress, another
//! executor resumes it from that checkpoint (the resume event names it; the first step after it
//! is the checkpoint's step + 1), the results file holds every step once, and the final adapter
//! equals that of an uninterrupted run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrotune::storage::StorageSettings;

use crate::helpers::{backends, Backend, KillOnDrop, TestApp};
use crate::jobs_e2e::{adapter_tensors, all_events, create_job, job_request, status, upload_qa, wait_for};

#[tokio::test]
async fn a_killed_worker_s_job_resumes_elsewhere_from_its_last_checkpoint() {
    for backend in backends() {
        killed_worker_resumes(backend).await;
    }
}

/// A `ferrotune worker` process on the app's database and storage.
fn start_worker(app: &TestApp) -> KillOnDrop {
    let settings = &app.backing.settings;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    command
        .args(["--log", "warn", "--lease-secs", "2", "--poll-interval-ms", "50", "worker"])
        .env("FERROTUNE_DATABASE_URL", &settings.database_url)
        .env("FERROTUNE_DATA_DIR", settings.executor.work_dir.parent().unwrap())
        .env("FERROTUNE_BASE_MODELS", format!("tiny-llama={}", fixture.display()))
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null());
    match &settings.storage {
        StorageSettings::Local(dir) => command.env("FERROTUNE_STORAGE_URL", dir),
        StorageSettings::S3(s3) => command
            .env("FERROTUNE_STORAGE_URL", format!("s3://{}/{}", s3.bucket, s3.prefix))
            .env("FERROTUNE_S3_ENDPOINT", s3.endpoint.as_deref().unwrap_or_default())
            .env("FERROTUNE_S3_FORCE_PATH_STYLE", "true"),
    };
    KillOnDrop(command.spawn().expect("start a worker"))
}

async fn killed_worker_resumes(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let file = upload_qa(&app).await;
    let request = job_request(&file, 50, 1, 20); // 400 steps, a checkpoint every 20
    let crashed = create_job(&app, &request).await;
    let mut worker = start_worker(&app);

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
        assert!(started.elapsed() < Duration::from_secs(120), "{backend:?}: the worker made no checkpoint: {job:?}");
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
    assert_eq!(
        adapter_tensors(&app, &job).await,
        adapter_tensors(&app, &reference).await,
        "{backend:?}: the resumed run ends where the uninterrupted one does"
    );
}
