//! `/v1/jobs`: create, list, read, cancel, metrics.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, Owner};
use crate::db::{JobRow, KeyClaim};
use crate::events::JobEvent;
use crate::job::{JobErrorView, JobId, JobList, JobStatus, JobView, MetricsRow, Progress};
use crate::queue::Control;
use crate::spec::JobSpec;
use crate::state::AppState;

/// The job as the API shows it.
pub fn job_view(row: &JobRow) -> JobView {
    JobView {
        id: row.id.to_string(),
        object: "fine_tuning.job".into(),
        status: row.status,
        phase: row.phase.map(|p| p.as_str().to_string()),
        spec: serde_json::value::to_raw_value(&row.spec).expect("a spec serializes"),
        created_at: row.created_at.clone(),
        started_at: row.started_at.clone(),
        finished_at: row.finished_at.clone(),
        progress: Progress {
            step: row.step,
            total_steps: row.total_steps,
            epoch: row.epoch,
            tokens_seen: row.tokens_seen,
            elapsed_seconds: row.elapsed_seconds,
            eta_seconds: row.eta_seconds(),
        },
        train_loss: row.train_loss,
        eval_loss: row.eval_loss,
        best_step: row.best_step,
        error: row.error_code.as_ref().map(|code| JobErrorView {
            code: code.clone(),
            message: row.error_message.clone(),
        }),
        attempt: row.attempt,
        cancel_requested: row.stop_requested.is_some(),
    }
}

/// A job id from a URL; anything but a UUID names no job.
pub(super) fn parse_id(id: &str) -> Result<JobId, ApiError> {
    JobId::parse(id).ok_or_else(|| ApiError::not_found("job", id))
}

/// The job `id` if the caller may see it.
pub(super) async fn load(state: &AppState, id: &str, owner: &Owner) -> Result<JobRow, ApiError> {
    let job = parse_id(id)?;
    state
        .db
        .get_job(&job, owner.as_deref())
        .await?
        .ok_or_else(|| ApiError::not_found("job", id))
}

/// A job spec from a request body: not JSON at all is a 400; JSON that is not a valid spec is a
/// 422 naming the field.
fn spec_from_body(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<JobSpec, ApiError> {
    super::require_json(headers, "a job spec")?;
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not JSON: {e}"),
        )
        .param("body"));
    }
    let text = std::str::from_utf8(body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body is not UTF-8",
        )
    })?;
    JobSpec::from_json(text).map_err(|e| ApiError::invalid(&e.param, e.to_string()))
}

pub async fn create(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let spec = spec_from_body(&headers, &body)?;
    let idempotency = super::idempotency_key(&headers)?;
    let row = submit_once(&state, &owner, idempotency.as_deref(), &body, &spec).await?;
    Ok((StatusCode::CREATED, Json(job_view(&row))).into_response())
}

/// `POST /v1/jobs/estimate`: a job spec's peak memory and time on the pool's workers, without
/// queueing it.
pub async fn estimate(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let spec = spec_from_body(&headers, &body)?;
    crate::model_access::check_base_model(&state.config, &spec.base_model)
        .map_err(|m| ApiError::invalid("base_model", m))?;
    match crate::estimate::estimate(&state, &spec).await {
        Ok(estimate) => Ok(Json(estimate).into_response()),
        Err(crate::estimate::EstimateError::Model(m)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "model_unavailable",
            format!("base_model {:?}: {m}", spec.base_model),
        )
        .param("base_model")),
        Err(crate::estimate::EstimateError::Db(e)) => Err(e.into()),
    }
}

/// Submits `spec`, once per `Idempotency-Key`: a repeat of the request (same key, same body)
/// answers with the job the first one made; the same key with another body is refused; a repeat
/// that arrives while the first is still being queued gets a 409 to retry.
pub(super) async fn submit_once(
    state: &AppState,
    owner: &Owner,
    idempotency: Option<&str>,
    body: &[u8],
    spec: &JobSpec,
) -> Result<JobRow, ApiError> {
    use sha2::{Digest, Sha256};
    let id = JobId::new();
    let scope = owner.as_deref().unwrap_or("");
    if let Some(key) = idempotency {
        let request = crate::artifacts::hex(&Sha256::digest(body));
        let claim = state
            .db
            .claim_idempotency_key(scope, "jobs", key, &request, id.as_str())
            .await?;
        match claim {
            KeyClaim::Bound => {}
            KeyClaim::Reused => return Err(super::idempotency_key_reused()),
            KeyClaim::Repeat { object_id } => {
                let job = JobId::parse(&object_id)
                    .ok_or_else(|| ApiError::not_found("job", &object_id))?;
                return state
                    .db
                    .get_job(&job, owner.as_deref())
                    .await?
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::CONFLICT,
                            "request_in_progress",
                            "a request with this Idempotency-Key is still being processed",
                        )
                    });
            }
        }
    }
    match crate::queue::submit_as(state, &id, spec, owner.as_deref()).await {
        Ok(row) => Ok(row),
        Err(e) => {
            if let Some(key) = idempotency {
                state.db.release_idempotency_key(scope, "jobs", key).await?;
            }
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<i64>,
    after: Option<String>,
    status: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and 100, got {limit}"),
        ));
    }
    let status = q
        .status
        .as_deref()
        .map(str::parse::<JobStatus>)
        .transpose()
        .map_err(|e| ApiError::invalid("status", e.to_string()))?;
    let after = match &q.after {
        None => None,
        Some(id) => Some(
            load(&state, id, &owner)
                .await
                .map_err(|_| ApiError::invalid("after", format!("no job {id:?}")))?
                .seq,
        ),
    };
    // one row more than asked tells whether another page exists
    let mut rows = state
        .db
        .list_jobs(owner.as_deref(), status, after, limit + 1)
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let body = JobList {
        object: "list".into(),
        data: rows.iter().map(job_view).collect(),
        has_more,
        last_id: rows.last().map(|r| r.id.to_string()),
    };
    Ok(Json(body).into_response())
}

pub async fn get(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(job_view(&load(&state, &id, &owner).await?)).into_response())
}

/// Asks `what` of job `id`; the job as it is then.
pub(super) async fn control(
    state: &AppState,
    owner: &Owner,
    id: &str,
    what: Control,
) -> Result<JobRow, ApiError> {
    let job = parse_id(id)?;
    crate::queue::control(state, &job, owner.as_deref(), what).await?;
    load(state, id, owner).await
}

/// Cancels a job: a queued or paused one at once, a running one at its next step.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(job_view(
        &control(&state, &owner, &id, Control::Cancel).await?,
    )))
}

/// Pauses a job: a running one checkpoints at its next step and leaves its worker.
pub async fn pause(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(job_view(
        &control(&state, &owner, &id, Control::Pause).await?,
    )))
}

/// Resumes a paused job from its last checkpoint.
pub async fn resume(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(job_view(
        &control(&state, &owner, &id, Control::Resume).await?,
    )))
}

/// Deletes a finished or queued job with its events, checkpoints and adapter.
pub async fn delete(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = parse_id(&id)?;
    crate::queue::delete(&state, &job, owner.as_deref()).await?;
    Ok(
        Json(json!({"object": "fine_tuning.job.deleted", "id": id, "deleted": true}))
            .into_response(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    format: Option<String>,
}

/// The loss curve: one row per optimizer step (and per evaluation), from the event log.
pub async fn metrics(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    query: Result<Query<MetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let job = load(&state, &id, &owner).await?;
    let rows = curve(&state, &job.id).await?;
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(json!({"object": "list", "data": rows})).into_response()),
        Some("csv") => {
            let mut csv = MetricsRow::COLUMNS.join(",") + "\n";
            for r in &rows {
                csv += &(r.csv_fields().join(",") + "\n");
            }
            Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response())
        }
        Some(other) => Err(ApiError::invalid(
            "format",
            format!("unknown format {other:?} (json or csv)"),
        )),
    }
}

/// A job's loss curve from its event log: one row per step and per evaluation. A resumed job
/// repeats the steps after its last checkpoint: the later row of a step wins.
pub(super) async fn curve(state: &AppState, job: &JobId) -> Result<Vec<MetricsRow>, ApiError> {
    let mut by_step: std::collections::BTreeMap<(u64, bool), MetricsRow> = Default::default();
    for e in state.db.events_after(job.as_str(), 0).await? {
        let row = match JobEvent::parse(&e.kind, &e.data) {
            Ok(JobEvent::Metrics(m)) => MetricsRow::from(&m),
            Ok(JobEvent::Eval(ev)) => MetricsRow::from(&ev),
            _ => continue,
        };
        by_step.insert((row.step, row.is_eval()), row);
    }
    Ok(by_step.into_values().collect())
}

/// `/v1/jobs…`: the native job API (its event stream, files and exports are routed by their
/// modules).
pub(super) fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/jobs", post(create).get(list))
        .route("/v1/jobs/estimate", post(estimate))
        .route("/v1/jobs/{id}", get(self::get).delete(delete))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/pause", post(pause))
        .route("/v1/jobs/{id}/resume", post(resume))
        .route("/v1/jobs/{id}/metrics", get(metrics))
}
