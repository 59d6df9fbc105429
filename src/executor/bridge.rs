//! The link between a training thread and the async world: lease heartbeats and a registry of
//! running jobs that carry the client's cancel/pause requests to the trainer, and an observer
//! that forwards progress and waits until each checkpoint is safely stored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::ExecutorContext;
use crate::db::Lease;
use crate::train::{Control, Observer, Progress};

/// What the trainer should do next, shared between the heartbeat and the training thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Signal {
    Continue = 0,
    Cancel = 1,
    Pause = 2,
    /// The lease is gone: another executor owns the job now; stop without touching it.
    Lost = 3,
    /// This process is shutting down: checkpoint and hand the job back to the queue.
    Shutdown = 4,
}

impl Signal {
    /// The signal for a client's recorded request (`requested_action`).
    fn asked(action: &str) -> Option<Self> {
        match action {
            "cancel" => Some(Self::Cancel),
            "pause" => Some(Self::Pause),
            _ => None,
        }
    }
}

#[derive(Clone, Default)]
pub struct SharedSignal(Arc<AtomicU8>);

impl SharedSignal {
    pub fn get(&self) -> Signal {
        match self.0.load(Ordering::SeqCst) {
            1 => Signal::Cancel,
            2 => Signal::Pause,
            3 => Signal::Lost,
            4 => Signal::Shutdown,
            _ => Signal::Continue,
        }
    }

    /// Raises the signal; a stronger one (Lost > Shutdown, Cancel > Pause) is never downgraded.
    pub fn raise(&self, signal: Signal) {
        let rank = |s: u8| match s {
            3 => 4,
            1 => 3,
            4 => 2,
            2 => 1,
            _ => 0,
        };
        let _ = self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
            (rank(signal as u8) > rank(current)).then_some(signal as u8)
        });
    }
}

/// How often an executor reads a running job's cancel/pause request from the database, whatever
/// the lease: a request made through another process (another API replica) reaches the trainer
/// within this time and its current step. Requests made through this process's own API arrive at
/// once, through [`JobSignals`].
pub const CONTROL_POLL: Duration = Duration::from_secs(1);

/// Renews the job's lease every third of its length and, in between, reads the client's
/// requests every [`CONTROL_POLL`]; turns them into signals.
pub fn start_heartbeat(context: &ExecutorContext, job_id: &str, owner: &str, signal: SharedSignal) -> JoinHandle<()> {
    let (context, job_id, owner) = (context.clone(), job_id.to_string(), owner.to_string());
    tokio::spawn(async move {
        let renew_every = (context.settings.lease / 3).max(Duration::from_millis(200));
        let tick = renew_every.min(CONTROL_POLL);
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let renew = renewed.elapsed() + tick / 2 >= renew_every;
            let lease = if renew {
                context.store.renew_lease(&job_id, &owner, context.lease_secs()).await
            } else {
                context.store.job_control(&job_id, &owner).await
            };
            match lease {
                Ok(Lease::Held { requested_action }) => {
                    if renew {
                        renewed = Instant::now();
                    }
                    if let Some(signal_asked) = requested_action.as_deref().and_then(Signal::asked) {
                        signal.raise(signal_asked);
                    }
                }
                Ok(Lease::Lost) => {
                    tracing::warn!(job = %job_id, "lost the job's lease; stopping");
                    signal.raise(Signal::Lost);
                    return;
                }
                Err(err) => tracing::warn!(job = %job_id, error = %err, "could not renew the lease"),
            }
        }
    })
}

/// The signals of the jobs this process is training, by job id: a cancel or pause asked through
/// this process's API goes straight to the trainer, which acts before its next step.
#[derive(Clone, Default)]
pub struct JobSignals(Arc<Mutex<HashMap<String, SharedSignal>>>);

impl JobSignals {
    /// Makes `signal` reachable under `job_id` until the returned guard is dropped.
    pub fn register(&self, job_id: &str, signal: SharedSignal) -> Registered {
        self.0.lock().expect("job signals lock").insert(job_id.to_string(), signal);
        Registered { signals: self.clone(), job_id: job_id.to_string() }
    }

    /// Passes a recorded `cancel` or `pause` request to the job's trainer, if it runs here.
    pub fn deliver(&self, job_id: &str, action: &str) {
        let Some(signal) = Signal::asked(action) else { return };
        if let Some(shared) = self.0.lock().expect("job signals lock").get(job_id) {
            shared.raise(signal);
        }
    }
}

/// Unregisters a job's signal when dropped.
pub struct Registered {
    signals: JobSignals,
    job_id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut map) = self.signals.0.lock() {
            map.remove(&self.job_id);
        }
    }
}

/// Messages from the training thread.
pub enum Report {
    Progress(Box<Progress>),
    /// Stored and recorded before `done` fires, so a crash right after loses nothing.
    Checkpoint {
        step: u64,
        dir: PathBuf,
        done: oneshot::Sender<()>,
    },
}

pub struct JobObserver {
    pub reports: mpsc::UnboundedSender<Report>,
    pub signal: SharedSignal,
}

impl Observer for JobObserver {
    fn progress(&mut self, progress: &Progress) {
        let _ = self.reports.send(Report::Progress(Box::new(progress.clone())));
    }

    fn checkpointed(&mut self, step: u64, dir: &std::path::Path) {
        let (done, stored) = oneshot::channel();
        if self.reports.send(Report::Checkpoint { step, dir: dir.to_path_buf(), done }).is_ok() {
            let _ = stored.blocking_recv();
        }
    }

    fn control(&mut self) -> Control {
        match self.signal.get() {
            Signal::Continue => Control::Continue,
            Signal::Cancel | Signal::Lost => Control::Cancel,
            Signal::Pause | Signal::Shutdown => Control::Pause,
        }
    }
}
