//! The one HTTP error type. Every error response is built from the [`ErrorCode`] table and has
//! OpenAI's shape: `{"error": {"message", "type", "param", "code", ...details}}`.
//!
//! Server faults (5xx) say only "internal error"; their cause is logged once, inside the request's
//! span (which carries the request id also returned in `x-request-id`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::db::DbError;
use crate::storage::StorageError;

/// Stable error codes: the API contract. Add new ones; never rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidJson,
    InvalidQuery,
    InvalidMultipart,
    MissingFile,
    MissingPurpose,
    InvalidPurpose,
    MultipleFiles,
    InvalidDataset,
    FileTooLarge,
    LineTooLong,
    PayloadTooLarge,
    InvalidCursor,
    FileNotFound,
    RouteNotFound,
    MethodNotAllowed,
    MissingApiKey,
    InvalidApiKey,
    InternalError,
    NotReady,
    JobNotFound,
    ModelNotFound,
    /// `model_not_found` for a model named in a request body (400, with `param`).
    UnknownModel,
    /// `file_not_found` for a file named in a request body (400, with `param`).
    UnknownFile,
    ModelNotSupported,
    ModelNotOwned,
    /// A fine-tuned model that others were trained from, which serve on top of it.
    ModelInUse,
    InvalidFileFormat,
    UnsupportedMethod,
    InvalidHyperparameters,
    ConflictingHyperparameters,
    InvalidJobState,
    /// The prompt plus the requested completion do not fit the model's context.
    ContextLengthExceeded,
    /// A request parameter this server does not implement (rather than silently ignoring it).
    UnsupportedParameter,
    /// The model's generation queue is full: retry later (429).
    EngineOverloaded,
}

impl ErrorCode {
    /// (code, OpenAI error type, HTTP status)
    fn describe(self) -> (&'static str, &'static str, StatusCode) {
        use ErrorCode::*;
        const BAD: StatusCode = StatusCode::BAD_REQUEST;
        const REQ: &str = "invalid_request_error";
        match self {
            InvalidRequest => ("invalid_request", REQ, BAD),
            InvalidJson => ("invalid_json", REQ, BAD),
            InvalidQuery => ("invalid_query", REQ, BAD),
            InvalidMultipart => ("invalid_multipart", REQ, BAD),
            MissingFile => ("missing_file", REQ, BAD),
            MissingPurpose => ("missing_purpose", REQ, BAD),
            InvalidPurpose => ("invalid_purpose", REQ, BAD),
            MultipleFiles => ("multiple_files", REQ, BAD),
            InvalidDataset => ("invalid_dataset", REQ, BAD),
            FileTooLarge => ("file_too_large", REQ, StatusCode::PAYLOAD_TOO_LARGE),
            LineTooLong => ("line_too_long", REQ, StatusCode::PAYLOAD_TOO_LARGE),
            PayloadTooLarge => ("payload_too_large", REQ, StatusCode::PAYLOAD_TOO_LARGE),
            InvalidCursor => ("invalid_cursor", REQ, BAD),
            FileNotFound => ("file_not_found", REQ, StatusCode::NOT_FOUND),
            RouteNotFound => ("route_not_found", REQ, StatusCode::NOT_FOUND),
            MethodNotAllowed => ("method_not_allowed", REQ, StatusCode::METHOD_NOT_ALLOWED),
            MissingApiKey => ("missing_api_key", "authentication_error", StatusCode::UNAUTHORIZED),
            InvalidApiKey => ("invalid_api_key", "authentication_error", StatusCode::UNAUTHORIZED),
            InternalError => ("internal_error", "server_error", StatusCode::INTERNAL_SERVER_ERROR),
            NotReady => ("not_ready", "server_error", StatusCode::SERVICE_UNAVAILABLE),
            JobNotFound => ("job_not_found", REQ, StatusCode::NOT_FOUND),
            ModelNotFound => ("model_not_found", REQ, StatusCode::NOT_FOUND),
            UnknownModel => ("model_not_found", REQ, BAD),
            UnknownFile => ("file_not_found", REQ, BAD),
            ModelNotSupported => ("model_not_supported", REQ, BAD),
            ModelNotOwned => ("model_not_owned", REQ, StatusCode::FORBIDDEN),
            ModelInUse => ("model_in_use", REQ, StatusCode::CONFLICT),
            InvalidFileFormat => ("invalid_file_format", REQ, BAD),
            UnsupportedMethod => ("unsupported_method", REQ, BAD),
            InvalidHyperparameters => ("invalid_hyperparameters", REQ, BAD),
            ConflictingHyperparameters => ("conflicting_hyperparameters", REQ, BAD),
            InvalidJobState => ("invalid_job_state", REQ, StatusCode::CONFLICT),
            ContextLengthExceeded => ("context_length_exceeded", REQ, BAD),
            UnsupportedParameter => ("unsupported_parameter", REQ, BAD),
            EngineOverloaded => ("engine_overloaded", "rate_limit_error", StatusCode::TOO_MANY_REQUESTS),
        }
    }

    pub fn as_str(self) -> &'static str {
        self.describe().0
    }

    pub fn status(self) -> StatusCode {
        self.describe().2
    }
}

#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    param: Option<String>,
    /// Extra fields merged into the `error` object (e.g. a dataset's `problems`).
    details: Box<Map<String, Value>>,
    /// The real cause of a server fault, logged and never sent.
    cause: Option<anyhow::Error>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), param: None, details: Box::default(), cause: None }
    }

    /// A server fault: the client sees a generic message; `cause` is logged.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Self { cause: Some(cause.into()), ..Self::new(ErrorCode::InternalError, "internal error") }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_detail(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.details.insert(key.to_string(), json!(value));
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn param(&self) -> Option<&str> {
        self.param.as_deref()
    }
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        Self::internal(err)
    }
}

impl From<StorageError> for ApiError {
    fn from(err: StorageError) -> Self {
        Self::internal(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, kind, status) = self.code.describe();
        let message = if status.is_server_error() {
            match &self.cause {
                Some(cause) => {
                    tracing::error!(code, error = format!("{cause:#}"), "request failed")
                }
                None => tracing::error!(code, message = %self.message, "request failed"),
            }
            if self.code == ErrorCode::InternalError {
                "internal error; the server logged the cause under this response's x-request-id".to_string()
            } else {
                self.message
            }
        } else {
            self.message
        };
        let mut error = Map::new();
        error.insert("message".into(), json!(message));
        error.insert("type".into(), json!(kind));
        error.insert("param".into(), json!(self.param));
        error.insert("code".into(), json!(code));
        error.extend(*self.details);
        (status, Json(json!({ "error": error }))).into_response()
    }
}
