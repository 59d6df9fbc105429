//! The link between a training thread and the async world: lease heartbeats that carry the
//! client's cancel/pause requests to the trainer, and an observer that forwards progress and
//! waits until each checkpoint is safely stored.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::ExecutorContext;
use crate::db::Lease;
use crate::train::{Control, EvalMetrics, Observer, Progress};

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

/// Renews the job's lease every third of its length and turns requests into signals.
pub fn start_heartbeat(context: &ExecutorContext, job_id: &str, owner: &str, signal: SharedSignal) -> JoinHandle<()> {
    let (context, job_id, owner) = (context.clone(), job_id.to_string(), owner.to_string());
    tokio::spawn(async move {
        let every = (context.settings.lease / 3).max(std::time::Duration::from_millis(200));
        loop {
            tokio::time::sleep(every).await;
            match context.store.renew_lease(&job_id, &owner, context.lease_secs()).await {
                Ok(Lease::Held { requested_action }) => match requested_action.as_deref() {
                    Some("cancel") => signal.raise(Signal::Cancel),
                    Some("pause") => signal.raise(Signal::Pause),
                    _ => {}
                },
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

/// Messages from the training thread.
pub enum Report {
    Progress(Progress),
    Evaluated(u64, EvalMetrics),
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
        let _ = self.reports.send(Report::Progress(progress.clone()));
    }

    fn evaluated(&mut self, step: u64, metrics: &EvalMetrics) {
        let _ = self.reports.send(Report::Evaluated(step, *metrics));
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
