//! HTTP API: thin handlers that parse, make one call into `db`, `queue` or the artifact store,
//! and answer JSON. Every error body is `{"error": {"code", "message", "param"}}`.

mod auth;
mod dashboard;
mod error;
mod files;
mod guard;
mod jobs;
mod stream;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use std::sync::Arc;

pub use auth::{key_fingerprint, Owner};
pub use error::ApiError;
pub use guard::HostPolicy;

use crate::state::AppState;

/// The HTTP API of `state`, served on `bound` (the `Host` values it answers to follow from it).
pub fn router(state: AppState, bound: std::net::SocketAddr) -> Router {
    let hosts = Arc::new(HostPolicy::new(&state.config.allowed_hosts, bound));
    let failures = Arc::new(auth::FailedAuth::default());
    let uploads = Arc::new(tokio::sync::Semaphore::new(
        state.config.max_concurrent_uploads.max(1),
    ));
    let limit = (state.config.max_upload_mib * 1024 * 1024) as usize;
    let v1 = Router::new()
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::delete))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/metrics", get(jobs::metrics))
        .route("/v1/jobs/{id}/events", get(stream::events))
        .route("/v1/jobs/{id}/checkpoints", get(files::checkpoints))
        .route(
            "/v1/jobs/{id}/checkpoints/{step}/{file}",
            get(files::checkpoint_file),
        )
        .route("/v1/jobs/{id}/adapter", get(files::adapter))
        .route(
            "/v1/files",
            post(files::upload)
                .get(files::list)
                .route_layer(middleware::from_fn_with_state(
                    uploads,
                    guard::bound_uploads,
                )),
        )
        .route("/v1/files/{id}", delete(files::delete))
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
        .route("/openapi.json", get(openapi))
        .merge(v1)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(hosts, guard::browser_checks))
        .layer(middleware::from_fn(guard::response_shape))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// What a `qtune worker` serves on `--health-listen`: `/healthz` and `/readyz` alone.
pub fn health_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let workers = state.workers_up.load(std::sync::atomic::Ordering::SeqCst);
    if state.db.ping().await.is_err() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "database unreachable",
        ));
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

async fn openapi() -> Response {
    match serde_yaml::from_str::<serde_json::Value>(OPENAPI_YAML) {
        Ok(v) => Json(v).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
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
