//! The one error type handlers return: a status and
//! `{"error": {"code", "message", "param", "type"}}` (OpenAI's error shape).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Seconds after which trying again may succeed (`Retry-After`).
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub(crate) fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    /// A per-key limit reached: 429, with when to try again.
    pub(crate) fn quota(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message)
            .retry_after(retry_after)
    }

    pub fn param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    /// A part this server depends on (the database, the artifact store) cannot be reached
    /// now: 503 with when to try again, so clients back off instead of hanging or giving up.
    pub(crate) fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(5)
    }

    /// A stored adapter that cannot be used, answered without any path of this server.
    pub(crate) fn stored_adapter(e: crate::state::StoredAdapterError) -> ApiError {
        use crate::state::StoredAdapterError as E;
        match e {
            E::NoCheckpoint { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            E::Damaged { .. } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "artifact_corrupt",
                e.to_string(),
            ),
            E::Unreadable { .. } => ApiError::unavailable(e.to_string()),
            E::Db(e) => e.into(),
        }
    }

    pub(crate) fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} with id {id:?}"),
        )
    }

    /// A 400 naming the field: how the OpenAI-compatible routes answer invalid input (the SDK
    /// raises `BadRequestError` with `.param`).
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message).param(param)
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message).param(param)
    }
}

impl From<crate::db::Error> for ApiError {
    fn from(e: crate::db::Error) -> ApiError {
        // the cause goes to the log, not to the client
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            return ApiError::unavailable("the database is unreachable; try again shortly");
        }
        tracing::error!(error = %e, "database error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
    }
}

impl From<crate::queue::QueueError> for ApiError {
    fn from(e: crate::queue::QueueError) -> ApiError {
        use crate::queue::QueueError;
        match e {
            QueueError::Invalid { param, message } => ApiError::invalid(param, message),
            QueueError::NotFound(id) => ApiError::not_found("job", id.as_str()),
            e @ QueueError::Finished { .. } => {
                ApiError::new(StatusCode::CONFLICT, "job_finished", e.to_string())
            }
            e @ QueueError::WrongStatus { .. } => {
                ApiError::new(StatusCode::CONFLICT, "wrong_status", e.to_string())
            }
            e @ QueueError::Running(_) => {
                ApiError::new(StatusCode::CONFLICT, "job_running", e.to_string())
            }
            QueueError::Quota {
                message,
                retry_after,
            } => ApiError::quota(message, retry_after),
            QueueError::Db(e) => e.into(),
            QueueError::Io(e) => e.into(),
        }
    }
}

impl From<crate::uploads::UploadError> for ApiError {
    fn from(e: crate::uploads::UploadError) -> ApiError {
        use crate::uploads::UploadError;
        let message = e.to_string();
        match e {
            UploadError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
            }
            UploadError::OverQuota { .. } => ApiError::quota(message, 3600),
            UploadError::Empty => ApiError::invalid("file", message),
            UploadError::DiskFull { .. } => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                message,
            )
            .retry_after(60),
            UploadError::Body(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", message),
            UploadError::KeyReused => super::idempotency_key_reused(),
            UploadError::Missing(id) => ApiError::not_found("file", &id),
            UploadError::Db(e) => e.into(),
            UploadError::Io(e) => e.into(),
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> ApiError {
        tracing::error!(error = %e, "i/o error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> ApiError {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, code, r.body_text())
    }
}

impl From<axum::extract::multipart::MultipartError> for ApiError {
    fn from(e: axum::extract::multipart::MultipartError) -> ApiError {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, code, e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // OpenAI's error `type`, which its SDKs read beside the status
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            429 => "rate_limit_error",
            500.. => "server_error",
            _ => "invalid_request_error",
        };
        let body = serde_json::json!({
            "error": {"code": self.code, "message": self.message, "param": self.param, "type": kind}
        });
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}
