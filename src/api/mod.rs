//! HTTP API: thin handlers that parse, make one call into `db`, `queue` or the artifact store,
//! and answer JSON. Every error body is `{"error": {"code", "message", "param"}}`.

mod adapters;
mod auth;
mod chat;
mod dashboard;
mod error;
mod exports;
mod files;
mod guard;
mod jobs;
mod openai;
mod stream;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;

pub(crate) use auth::Owner;
pub(crate) use error::ApiError;
pub(crate) use guard::HostPolicy;

use crate::state::AppState;

/// The largest JSON body a route takes (a job spec, a request of the OpenAI routes): a
/// request of this kind is a few kilobytes, and a parsed JSON document takes many times its
/// size in memory. Chat takes [`chat::BODY_LIMIT`]; uploads stream up to --max-upload-mib.
pub(crate) const JSON_BODY_LIMIT: usize = 1 << 20;

/// The HTTP API of `state`, served on `bound` (the `Host` values it answers to follow from it).
pub fn router(state: AppState, bound: std::net::SocketAddr) -> Router {
    let hosts = Arc::new(HostPolicy::new(&state.config.allowed_hosts, bound));
    let failures = Arc::new(auth::FailedAuth::default());
    let uploads = guard::Slots::uploads(state.config.max_concurrent_uploads);
    let exports = guard::Slots::exports(state.config.max_concurrent_exports);
    let upload_limit = (state.config.max_upload_mib * 1024 * 1024) as usize;
    let v1 = Router::new()
        .merge(jobs::routes())
        .merge(stream::routes())
        .merge(exports::routes(exports))
        .merge(files::routes(uploads.clone(), upload_limit))
        .merge(adapters::routes(uploads, upload_limit))
        .merge(openai::routes())
        .merge(chat::routes())
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), failures),
            auth::authenticate,
        ));
    Router::new()
        .route("/", get(dashboard::index))
        .route("/assets/app.js", get(dashboard::app_js))
        .route("/assets/app.css", get(dashboard::app_css))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .merge(v1)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(hosts, guard::browser_checks))
        .layer(middleware::from_fn(guard::response_shape))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// What a `qtune worker` serves on `--health-listen`: `/healthz` and `/readyz` alone.
pub(crate) fn health_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// A list as OpenAI's API sends one: `{object: "list", data, has_more, first_id, last_id}`
/// (a client pages by sending `after=<last_id>`).
pub(crate) fn list_page<T: serde::Serialize>(
    data: &[T],
    has_more: bool,
    id_of: impl Fn(&T) -> String,
) -> serde_json::Value {
    serde_json::json!({
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data.first().map(&id_of),
        "last_id": data.last().map(&id_of),
    })
}

/// Refuses a POST body not sent as `Content-Type: application/json`: a form on any web page can
/// post text/plain or form data without the browser asking first; a JSON body cannot be sent
/// cross-origin without a preflight, which is never granted.
pub(crate) fn require_json(headers: &axum::http::HeaderMap, what: &str) -> Result<(), ApiError> {
    let essence = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    if essence.as_deref() == Some("application/json") {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("{what} is sent as Content-Type: application/json"),
    )
    .param("content-type"))
}

/// The `Idempotency-Key` a POST carries, if any: at most 255 visible ASCII characters.
pub(crate) fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(v) if !v.is_empty() && v.len() <= 255 && v.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(v.to_string()))
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
        .param("Idempotency-Key")),
    }
}

/// A key sent again with a different request.
pub(crate) fn idempotency_key_reused() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "idempotency_key_reused",
        "this Idempotency-Key was used with a different request; use a new key for a new request",
    )
    .param("Idempotency-Key")
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus' text format ([`crate::metrics`]); counts only, no tenant's
/// names, so it is served without a key, as `/healthz` is.
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let queue = state.db.queue_snapshot().await?;
    let text = state.models.metrics().render(&queue);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let workers = state.workers_up.load(std::sync::atomic::Ordering::SeqCst);
    if state.db.ping().await.is_err() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "database unreachable",
        )
        .retry_after(5));
    }
    if let Some(free) = crate::disk::short_of_space(&state.config) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!(
                "the data dir's disk has {} free, under --min-free-disk-mib {}",
                crate::disk::human(free),
                state.config.min_free_disk_mib
            ),
        )
        .retry_after(60));
    }
    let expected = state.config.worker_devices().len();
    if workers < expected {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("{workers} of {expected} workers up"),
        ));
    }
    Ok(Json(
        serde_json::json!({"status": "ready", "database": "ok", "workers": workers}),
    ))
}

/// The OpenAPI document (openapi/openapi.yaml, embedded at build time) as JSON.
pub const OPENAPI_YAML: &str = include_str!("../../openapi/openapi.yaml");

/// Parsed once: the YAML document is large, and parsing it per request would let anyone with
/// the URL keep the CPU busy.
async fn openapi() -> Response {
    static JSON: std::sync::OnceLock<Result<bytes::Bytes, String>> = std::sync::OnceLock::new();
    let json = JSON.get_or_init(|| {
        serde_yaml::from_str::<serde_json::Value>(OPENAPI_YAML)
            .map(|v| bytes::Bytes::from(v.to_string()))
            .map_err(|e| e.to_string())
    });
    match json {
        Ok(body) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.clone(),
        )
            .into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.clone(),
        )
        .into_response(),
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}
