//! The job queue contract on SQLite and Postgres: atomic claims, leases, transitions, events.

use std::collections::BTreeSet;
use std::sync::Arc;

use ferrotune::db::{
    JobOutcome, JobProgress, JobRecord, JobStore, Lease, NewEvent, SqlStore, Store, DEFAULT_PROJECT_ID,
};
use ferrotune::domain::job::JobStatus;

use crate::helpers::{backends, backing, Backend};

async fn open(backend: Backend) -> (Arc<SqlStore>, crate::helpers::Backing) {
    let backing = backing(backend).await;
    let store = SqlStore::connect(&backing.settings.database_url, 8).await.unwrap();
    store.migrate().await.unwrap();
    (Arc::new(store), backing)
}

fn job(id: &str, status: JobStatus) -> JobRecord {
    JobRecord {
        id: id.into(),
        project_id: DEFAULT_PROJECT_ID.into(),
        model: "tiny".into(),
        training_file: "file-x".into(),
        validation_file: None,
        status: status.as_str().into(),
        method: "{}".into(),
        hyperparameters: "{}".into(),
        suffix: None,
        seed: 1,
        metadata: None,
        fine_tuned_model: None,
        trained_tokens: None,
        error: None,
        result_files: "[]".into(),
        step: 0,
        total_steps: None,
        epoch: None,
        estimated_finish: None,
        requested_action: None,
        lease_owner: None,
        lease_expires_at: None,
        attempts: 0,
        executor: None,
        created_at: 1_800_000_000,
        started_at: None,
        finished_at: None,
    }
}

#[tokio::test]
async fn two_claimers_take_every_job_exactly_once() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        let ids: Vec<String> = (0..10).map(|i| format!("ftjob-{i}")).collect();
        for id in &ids {
            store.insert_job(&job(id, JobStatus::Queued), NewEvent::message("created")).await.unwrap();
        }
        let claimer = |owner: &'static str| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(job) = store.claim_job(JobStatus::Queued, owner, 60).await.unwrap() {
                    assert_eq!(job.status, "running");
                    assert_eq!(job.lease_owner.as_deref(), Some(owner));
                    got.push(job.id);
                }
                got
            })
        };
        let (a, b) = (claimer("worker-a"), claimer("worker-b"));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let mut all: Vec<String> = a.iter().chain(&b).cloned().collect();
        all.sort();
        let unique: BTreeSet<&String> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "{backend:?}: a job was claimed twice");
        assert_eq!(all, ids, "{backend:?}: every job was claimed");
    }
}

#[tokio::test]
async fn a_lapsed_lease_requeues_the_job_and_its_old_owner_loses_it() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        store.insert_job(&job("ftjob-l", JobStatus::Queued), NewEvent::message("created")).await.unwrap();
        let claimed = store.claim_job(JobStatus::Queued, "w1", -5).await.unwrap().unwrap();
        assert_eq!(claimed.attempts, 1);
        assert_eq!(store.requeue_expired().await.unwrap(), vec!["ftjob-l".to_string()], "{backend:?}");
        assert_eq!(store.renew_lease("ftjob-l", "w1", 60).await.unwrap(), Lease::Lost);
        let again = store.claim_job(JobStatus::Queued, "w2", 60).await.unwrap().unwrap();
        assert_eq!((again.attempts, again.lease_owner.as_deref()), (2, Some("w2")));
        assert_eq!(store.renew_lease("ftjob-l", "w2", 60).await.unwrap(), Lease::Held { requested_action: None });
        assert!(store.requeue_expired().await.unwrap().is_empty(), "a live lease stays");
        let events = store.list_events("ftjob-l", None, 10).await.unwrap();
        assert!(events.iter().any(|e| e.level == "warn" && e.message.contains("stopped responding")));
    }
}

fn progress(step: i64) -> JobProgress {
    JobProgress { step, total_steps: 200, epoch: step as f64 / 40.0, estimated_finish: Some(1_900_000_000) }
}

fn metrics(step: i64) -> NewEvent {
    NewEvent::metrics(format!("step {step}"), serde_json::json!({ "step": step }))
}

#[tokio::test]
async fn a_requeued_job_shows_the_progress_of_the_checkpoint_it_resumes_from() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        store.insert_job(&job("ftjob-r", JobStatus::Queued), NewEvent::message("created")).await.unwrap();
        store.claim_job(JobStatus::Queued, "w1", -5).await.unwrap().unwrap();
        store.add_checkpoint("ftjob-r", 120, &serde_json::json!({"step": 120}), "checkpoints/r/120").await.unwrap();
        assert!(store.record_progress("ftjob-r", "w1", progress(144), metrics(144)).await.unwrap());

        store.requeue_expired().await.unwrap();

        let requeued = store.job_by_id("ftjob-r").await.unwrap().unwrap();
        assert_eq!((requeued.status.as_str(), requeued.step), ("queued", 120), "{backend:?}");
        assert!(
            (requeued.epoch.unwrap() - 3.0).abs() < 1e-9,
            "{backend:?}: epoch of step 120 is 3, not {:?}",
            requeued.epoch
        );
        assert_eq!(requeued.estimated_finish, None);
    }
}

#[tokio::test]
async fn an_executor_that_lost_its_lease_records_no_progress_and_no_metrics() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        store.insert_job(&job("ftjob-p", JobStatus::Queued), NewEvent::message("created")).await.unwrap();
        store.claim_job(JobStatus::Queued, "w1", -5).await.unwrap().unwrap();
        store.requeue_expired().await.unwrap();
        store.claim_job(JobStatus::Queued, "w2", 60).await.unwrap().unwrap();

        assert!(!store.record_progress("ftjob-p", "w1", progress(7), metrics(7)).await.unwrap());
        assert!(store.record_progress("ftjob-p", "w2", progress(3), metrics(3)).await.unwrap());

        let events = store.list_events("ftjob-p", None, 100).await.unwrap();
        let steps: Vec<&str> = events.iter().filter(|e| e.kind == "metrics").map(|e| e.message.as_str()).collect();
        assert_eq!(steps, vec!["step 3"], "{backend:?}");
        assert_eq!(store.job_by_id("ftjob-p").await.unwrap().unwrap().step, 3);
        assert_eq!(
            store.job_control("ftjob-p", "w1").await.unwrap(),
            Lease::Lost,
            "{backend:?}: the old owner learns it lost the job"
        );
    }
}

#[tokio::test]
async fn transitions_are_conditional_and_requests_reach_the_executor() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        store.insert_job(&job("ftjob-t", JobStatus::Queued), NewEvent::message("created")).await.unwrap();
        assert_eq!(store.queue_position("ftjob-t").await.unwrap(), Some(1));
        store.claim_job(JobStatus::Queued, "w", 60).await.unwrap().unwrap();
        assert_eq!(store.queue_position("ftjob-t").await.unwrap(), None);
        assert!(store
            .request_action("ftjob-t", "pause", JobStatus::Pausing, NewEvent::message("pausing"))
            .await
            .unwrap());
        assert_eq!(
            store.renew_lease("ftjob-t", "w", 60).await.unwrap(),
            Lease::Held { requested_action: Some("pause".into()) }
        );
        assert_eq!(
            store.job_control("ftjob-t", "w").await.unwrap(),
            Lease::Held { requested_action: Some("pause".into()) },
            "{backend:?}: the request is read without renewing too"
        );
        assert!(!store
            .transition("ftjob-t", &[JobStatus::Paused], JobStatus::Queued, NewEvent::message("x"))
            .await
            .unwrap());
        let paused = JobOutcome {
            status: JobStatus::Paused,
            trained_tokens: None,
            model: None,
            result_file: None,
            error: None,
            event: NewEvent::message("paused"),
        };
        assert!(store.complete_job("ftjob-t", "w", paused.clone()).await.unwrap());
        assert!(!store.complete_job("ftjob-t", "w", paused).await.unwrap(), "no longer held");
        assert!(store
            .transition("ftjob-t", &[JobStatus::Paused], JobStatus::Queued, NewEvent::message("resumed"))
            .await
            .unwrap());
        let job = store.get_job(DEFAULT_PROJECT_ID, "ftjob-t").await.unwrap().unwrap();
        assert_eq!((job.status.as_str(), job.lease_owner, job.requested_action), ("queued", None, None), "{backend:?}");
        assert!(store.get_job("proj-other", "ftjob-t").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn events_page_in_order_and_checkpoints_list_newest_first() {
    for backend in backends() {
        let (store, _backing) = open(backend).await;
        store.insert_job(&job("ftjob-e", JobStatus::Queued), NewEvent::message("created")).await.unwrap();
        let mut ids = vec![store.list_events("ftjob-e", None, 1).await.unwrap()[0].id.clone()];
        for i in 0..4 {
            ids.push(store.add_event("ftjob-e", NewEvent::message(format!("step {i}"))).await.unwrap().id);
        }
        let newest_two = store.list_events("ftjob-e", None, 2).await.unwrap();
        assert_eq!(newest_two.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids[3..].to_vec(), "{backend:?}");
        let after = store.list_events("ftjob-e", Some(&ids[1]), 10).await.unwrap();
        assert_eq!(after.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids[2..].to_vec());

        let metrics = serde_json::json!({"train_loss": 1.5});
        store.add_checkpoint("ftjob-e", 10, &metrics, "ckpt/10").await.unwrap();
        store.add_checkpoint("ftjob-e", 20, &metrics, "ckpt/20").await.unwrap();
        store.add_checkpoint("ftjob-e", 20, &metrics, "ckpt/20b").await.unwrap();
        let checkpoints = store.list_checkpoints("ftjob-e").await.unwrap();
        let listed: Vec<(i64, String)> = checkpoints.iter().map(|c| (c.step_number, c.storage_key.clone())).collect();
        assert_eq!(listed, vec![(20, "ckpt/20b".to_string()), (10, "ckpt/10".to_string())]);
    }
}
