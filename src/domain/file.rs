//! File purposes and statuses, as in OpenAI's Files API.

use serde::{Deserialize, Serialize};

/// Why a file was uploaded. Only `fine-tune` files are validated as datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilePurpose {
    #[serde(rename = "fine-tune")]
    FineTune,
    #[serde(rename = "fine-tune-results")]
    FineTuneResults,
    #[serde(rename = "assistants")]
    Assistants,
    #[serde(rename = "batch")]
    Batch,
    #[serde(rename = "vision")]
    Vision,
    #[serde(rename = "user_data")]
    UserData,
    #[serde(rename = "evals")]
    Evals,
}

impl FilePurpose {
    pub const ALL: [FilePurpose; 7] = [
        Self::FineTune,
        Self::FineTuneResults,
        Self::Assistants,
        Self::Batch,
        Self::Vision,
        Self::UserData,
        Self::Evals,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::FineTune => "fine-tune",
            Self::FineTuneResults => "fine-tune-results",
            Self::Assistants => "assistants",
            Self::Batch => "batch",
            Self::Vision => "vision",
            Self::UserData => "user_data",
            Self::Evals => "evals",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == text)
    }

    /// Purposes a client may upload with; `fine-tune-results` files are written by the service.
    pub fn is_uploadable(self) -> bool {
        self != Self::FineTuneResults
    }
}

/// Processing state of a file. Uploads are validated before they are stored, so a stored file is
/// `processed`; `uploaded` and `error` exist for OpenAI compatibility and later asynchronous checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    Uploaded,
    Processed,
    Error,
}

impl FileStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uploaded => "uploaded",
            Self::Processed => "processed",
            Self::Error => "error",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Uploaded, Self::Processed, Self::Error].into_iter().find(|s| s.as_str() == text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purposes_round_trip_through_their_names() {
        for purpose in FilePurpose::ALL {
            assert_eq!(FilePurpose::parse(purpose.as_str()), Some(purpose));
        }
        assert_eq!(FilePurpose::parse("fine_tune"), None);
    }
}
