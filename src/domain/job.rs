//! Fine-tuning job states and the transitions between them (OpenAI's statuses plus pausing).
//!
//! `validating_files → queued → running → succeeded | failed | cancelled`, and
//! `running → pausing → paused → (resume) → queued`. Anything else is a conflict (409).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Pausing,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

/// What a client can ask of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    Cancel,
    Pause,
    Resume,
}

impl JobStatus {
    pub const ALL: [JobStatus; 8] = [
        Self::ValidatingFiles,
        Self::Queued,
        Self::Running,
        Self::Pausing,
        Self::Paused,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValidatingFiles => "validating_files",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Pausing => "pausing",
            Self::Paused => "paused",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The status a client action moves the job to, or `None` when it is not allowed now.
    ///
    /// Cancelling or pausing a running job only asks for it (the executor acts within one step):
    /// `running → cancelled` is recorded by the executor; the request leaves `running` with a
    /// pending cancel, and `running → pausing` until the checkpoint is saved.
    pub fn after(self, action: JobAction) -> Option<JobStatus> {
        use JobStatus::*;
        match (action, self) {
            (JobAction::Cancel, ValidatingFiles | Queued | Paused | Pausing | Running) => Some(Cancelled),
            (JobAction::Pause, Running) => Some(Pausing),
            (JobAction::Pause, Queued) => Some(Paused),
            (JobAction::Resume, Paused) => Some(Queued),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn only_documented_transitions_are_allowed() {
        use JobAction::*;
        use JobStatus::*;
        assert_eq!(Running.after(Pause), Some(Pausing));
        assert_eq!(Paused.after(Resume), Some(Queued));
        assert_eq!(Queued.after(Cancel), Some(Cancelled));
        assert_eq!(Succeeded.after(Cancel), None);
        assert_eq!(Failed.after(Resume), None);
        assert_eq!(Running.after(Resume), None);
        assert_eq!(Paused.after(Pause), None);
        assert!(JobStatus::ALL.iter().filter(|s| s.is_terminal()).all(|s| s.after(Cancel).is_none()));
    }
}
