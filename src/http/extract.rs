//! Extractors whose rejections are our [`ApiError`]s: JSON bodies, query strings, and the caller's
//! project from `Authorization: Bearer <key>`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorCode};
use super::state::AppState;
use crate::db::DEFAULT_PROJECT_ID;
use crate::domain::api_key::hash_key;

/// A JSON body; malformed JSON, a wrong content type or an oversized body become API errors.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(ErrorCode::PayloadTooLarge, "the request body is too large");
    }
    let code = match rejection {
        JsonRejection::MissingJsonContentType(_) => ErrorCode::InvalidRequest,
        _ => ErrorCode::InvalidJson,
    };
    ApiError::new(code, rejection.body_text())
}

/// A query string decoded into `T`.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|rejection: QueryRejection| ApiError::new(ErrorCode::InvalidQuery, rejection.body_text()))
    }
}

/// The authenticated caller: every resource it touches belongs to this project.
#[derive(Debug, Clone)]
pub struct Caller {
    pub project_id: String,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // With no key configured (and only on loopback), every request is the default project,
        // whatever key a client sends: SDKs insist on sending one.
        if state.config.allow_anonymous && !state.store.any_keys_configured().await? {
            return Ok(Self { project_id: DEFAULT_PROJECT_ID.to_string() });
        }
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::new(
                ErrorCode::MissingApiKey,
                "no API key given; send `Authorization: Bearer <key>` (create one with `ferrotune keys create`)",
            ));
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidApiKey, "the Authorization header must be `Bearer <key>`")
            })?;
        match state.store.authenticate(&hash_key(key)).await? {
            Some(project_id) => Ok(Self { project_id }),
            None => Err(ApiError::new(ErrorCode::InvalidApiKey, "the API key is not valid (unknown or revoked)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::extract::DefaultBodyLimit;
    use axum::http::{Request, StatusCode};
    use axum::routing::post;
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::ApiJson;

    async fn echo(ApiJson(value): ApiJson<serde_json::Value>) -> axum::Json<serde_json::Value> {
        axum::Json(value)
    }

    async fn call(content_type: &str, body: String) -> (StatusCode, serde_json::Value) {
        let app = Router::new().route("/", post(echo)).layer(DefaultBodyLimit::max(1024));
        let request = Request::post("/").header("content-type", content_type).body(Body::from(body)).unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn malformed_json_is_a_shaped_400() {
        let (status, body) = call("application/json", "{\"a\": ".into()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_json");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn a_wrong_content_type_is_a_shaped_400() {
        let (status, body) = call("text/plain", "{}".into()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_request");
    }

    #[tokio::test]
    async fn an_oversized_body_is_a_shaped_413() {
        let (status, body) = call("application/json", format!("\"{}\"", "x".repeat(4096))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"]["code"], "payload_too_large");
    }
}
