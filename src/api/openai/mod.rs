//! The OpenAI-compatible fine-tuning API, as the official `openai` SDK calls it
//! (`/v1/fine_tuning/jobs…`, and the results files that `/v1/files` serves): a view over the
//! native jobs — the same rows, workers, API keys and events — not a second system.
//!
//! - [`request`]: the typed create request and its translation into a native [`JobSpec`];
//! - [`views`]: `fine_tuning.job`, `fine_tuning.job.event`, `fine_tuning.job.checkpoint`;
//! - [`results`]: the results files (a job's step metrics as CSV);
//! - here: the handlers, each a parse, a call into `queue` / `uploads` / `db`, and a view.
//!
//! Uploaded training files are checked line by line before the job is queued (OpenAI's
//! `validating_files`, done within the request).

mod request;
mod results;
mod views;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

pub use results::{list_results_files, results_file, results_file_job, RESULTS_PURPOSE};
pub use views::{fine_tuned_model_name, parse_fine_tuned_model};

use self::request::{Continued, CreateFineTuningJob};
use self::views::{CheckpointObject, FineTuningJob, JobEventObject};
use super::{jobs, ApiError, Owner};
use crate::queue::Control;
use crate::spec::JobSpec;
use crate::state::AppState;
use crate::uploads::FileCheck;

/// A native error as this API answers it: invalid input is a 400, as OpenAI's, naming the
/// request's field.
fn as_openai(mut e: ApiError) -> ApiError {
    if e.status == StatusCode::UNPROCESSABLE_ENTITY {
        e.status = StatusCode::BAD_REQUEST;
    }
    e.param = e.param.map(|p| match request::request_field(&p) {
        Some(field) => field.to_string(),
        None => p,
    });
    e
}

/// What a request's `model` continues from, when it names a fine-tuned model (the caller's own).
async fn continued(
    state: &AppState,
    owner: &Owner,
    model: &str,
) -> Result<Option<Continued>, ApiError> {
    let not_found =
        |why: String| ApiError::new(StatusCode::BAD_REQUEST, "model_not_found", why).param("model");
    let Some(from) = parse_fine_tuned_model(model) else {
        if model.starts_with("ft:") {
            return Err(not_found(format!(
                "{model:?} is not a fine-tuned model name (ft:BASE:SUFFIX:JOB_ID)"
            )));
        }
        return Ok(None);
    };
    let earlier = state
        .db
        .get_job(&from.job, owner.as_deref())
        .await?
        .ok_or_else(|| not_found(format!("no fine-tuned model {model:?}")))?;
    Ok(Some(Continued {
        spec: earlier.spec,
        from,
    }))
}

/// OpenAI's `validating_files`, within the request: each uploaded file the job names is read
/// line by line and every record checked (JSON, format, fields, roles, weights) before the job
/// is queued; the first bad line is the error. A file checked once is not read again.
async fn validate_files(state: &AppState, owner: &Owner, spec: &JobSpec) -> Result<(), ApiError> {
    let files = [
        ("training_file", Some(&spec.dataset.url)),
        ("validation_file", spec.dataset.validation_url.as_ref()),
    ];
    for (param, id) in files {
        let Some(id) = id.filter(|id| id.starts_with("file-")) else {
            continue;
        };
        let row = state
            .db
            .get_file(id, owner.as_deref())
            .await?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "file_not_found",
                    format!("no file {id:?}"),
                )
                .param(param)
            })?;
        let details = row.status_details.as_deref();
        let format = spec.dataset.format;
        let check =
            crate::uploads::check_training_file(state, id, row.status, details, format).await?;
        if let FileCheck::Invalid(details) = check {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_training_file",
                format!("{param}: {details}"),
            )
            .param(param));
        }
        let found = crate::uploads::first_record_format(state, id, format).await?;
        if let Some(found) = found.filter(|f| f.is_preference() != spec.method.is_preference()) {
            let wants = match spec.method.is_preference() {
                true => {
                    "preference pairs (input/preferred_output/non_preferred_output, or \
                         prompt/chosen/rejected)"
                }
                false => {
                    "single answers (messages, prompt/completion, …); preference pairs \
                          train with method dpo"
                }
            };
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_training_file",
                format!(
                    "{param}: {id} holds {} records; method {} trains on {wants}",
                    found.as_str(),
                    spec.method.name()
                ),
            )
            .param(param));
        }
    }
    Ok(())
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    super::require_json(&headers, "a fine-tuning job")?;
    let req = CreateFineTuningJob::from_json(&body)?;
    let idempotency = super::idempotency_key(&headers)?;
    let continued = continued(&state, &owner, req.model()?).await?;
    let spec = req.into_spec(continued)?;
    validate_files(&state, &owner, &spec).await?;
    let row = jobs::submit_once(&state, &owner, idempotency.as_deref(), &body, &spec)
        .await
        .map_err(as_openai)?;
    Ok(Json(FineTuningJob::from(&row)).into_response())
}

/// The query of `GET /v1/fine_tuning/jobs`: `after`, `limit`, `metadata[KEY]=VALUE` filters.
struct ListQuery {
    limit: i64,
    after: Option<String>,
    metadata: Vec<(String, String)>,
}

impl ListQuery {
    fn parse(query: Vec<(String, String)>) -> Result<ListQuery, ApiError> {
        let mut q = ListQuery {
            limit: 20,
            after: None,
            metadata: Vec::new(),
        };
        for (key, value) in query {
            let filter = key
                .strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'));
            match (key.as_str(), filter) {
                ("limit", _) => q.limit = page_limit(&value)?,
                ("after", _) => q.after = Some(value),
                // a job has at most 16 pairs: more filters could match nothing
                (_, Some(_)) if q.metadata.len() == 16 => {
                    return Err(ApiError::bad("metadata", "at most 16 metadata filters"))
                }
                (_, Some(k)) => q.metadata.push((k.to_string(), value)),
                (k, None) => {
                    return Err(ApiError::bad(
                        k,
                        "unknown query parameter (after, limit, metadata[KEY])",
                    ))
                }
            }
        }
        Ok(q)
    }
}

fn page_limit(value: &str) -> Result<i64, ApiError> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=100).contains(n))
        .ok_or_else(|| ApiError::bad("limit", "must be a whole number from 1 to 100"))
}

/// `GET /v1/fine_tuning/jobs?after&limit&metadata[k]=v`.
pub async fn list(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = ListQuery::parse(query)?;
    let after = match q.after {
        None => None,
        Some(id) => Some(
            jobs::load(&state, &id, &owner)
                .await
                .map_err(|_| ApiError::bad("after", format!("no job {id:?}")))?
                .seq,
        ),
    };
    let mut rows = state
        .db
        .list_jobs_tagged(owner.as_deref(), None, &q.metadata, after, q.limit + 1)
        .await?;
    let has_more = rows.len() as i64 > q.limit;
    rows.truncate(q.limit as usize);
    let data: Vec<FineTuningJob> = rows.iter().map(FineTuningJob::from).collect();
    Ok(Json(super::list_page(&data, has_more, |j| j.id.clone())))
}

pub async fn retrieve(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<FineTuningJob>, ApiError> {
    let row = jobs::load(&state, &id, &owner).await?;
    Ok(Json(FineTuningJob::from(&row)))
}

/// `POST …/cancel`, `…/pause`, `…/resume`: the job-control service, answered as a
/// `fine_tuning.job`.
async fn control(
    state: AppState,
    owner: Owner,
    id: String,
    what: Control,
) -> Result<Json<FineTuningJob>, ApiError> {
    let row = jobs::control(&state, &owner, &id, what).await?;
    Ok(Json(FineTuningJob::from(&row)))
}

pub async fn cancel(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<FineTuningJob>, ApiError> {
    control(state, owner, id, Control::Cancel).await
}

pub async fn pause(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<FineTuningJob>, ApiError> {
    control(state, owner, id, Control::Pause).await
}

pub async fn resume(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<FineTuningJob>, ApiError> {
    control(state, owner, id, Control::Resume).await
}

/// `after` and `limit` of the events and checkpoints lists.
fn page_query(
    query: Vec<(String, String)>,
    prefix: &str,
) -> Result<(Option<String>, i64), ApiError> {
    let (mut after, mut limit) = (None, 20i64);
    for (key, value) in query {
        match key.as_str() {
            "limit" => limit = page_limit(&value)?,
            "after" if value.starts_with(prefix) => after = Some(value),
            "after" => {
                return Err(ApiError::bad(
                    "after",
                    format!("not an id of this list ({prefix}…)"),
                ))
            }
            other => {
                return Err(ApiError::bad(
                    other,
                    "unknown query parameter (after, limit)",
                ))
            }
        }
    }
    Ok((after, limit))
}

/// `GET /v1/fine_tuning/jobs/{id}/events`: newest first, `after` pages to older ones.
pub async fn events(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (after, limit) = page_query(query, "ftevent-")?;
    let row = jobs::load(&state, &id, &owner).await?;
    let before = match after {
        None => None,
        Some(a) => Some(
            a["ftevent-".len()..]
                .parse::<i64>()
                .map_err(|_| ApiError::bad("after", format!("not an event id: {a:?}")))?,
        ),
    };
    let mut rows = state
        .db
        .events_page(row.id.as_str(), before, limit + 1)
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let data: Vec<JobEventObject> = rows
        .iter()
        .map(|e| JobEventObject::new(e.id, &e.created_at, &e.kind, &e.data))
        .collect();
    Ok(Json(super::list_page(&data, has_more, |e| e.id.clone())))
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: newest first, with the metrics of their step.
pub async fn checkpoints(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (after, limit) = page_query(query, "ftckpt-")?;
    let row = jobs::load(&state, &id, &owner).await?;
    let before = match after {
        None => u64::MAX,
        Some(a) => a
            .rsplit_once('-')
            .and_then(|(_, step)| step.parse::<u64>().ok())
            .ok_or_else(|| ApiError::bad("after", format!("not a checkpoint id: {a:?}")))?,
    };
    let curve = jobs::curve(&state, &row.id).await?;
    let mut recorded = state.db.list_checkpoints(&row.id).await?;
    recorded.retain(|c| (c.step as u64) < before);
    recorded.reverse();
    let has_more = recorded.len() as i64 > limit;
    recorded.truncate(limit as usize);
    let data: Vec<CheckpointObject> = recorded
        .iter()
        .map(|c| CheckpointObject::new(&row, c, &curve))
        .collect();
    Ok(Json(super::list_page(&data, has_more, |c| c.id.clone())))
}

/// `/v1/fine_tuning/jobs…` (the results files are served through `/v1/files`).
pub(super) fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/fine_tuning/jobs", post(create).get(list))
        .route("/v1/fine_tuning/jobs/{id}", get(retrieve))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(cancel))
        .route("/v1/fine_tuning/jobs/{id}/pause", post(pause))
        .route("/v1/fine_tuning/jobs/{id}/resume", post(resume))
        .route("/v1/fine_tuning/jobs/{id}/events", get(events))
        .route("/v1/fine_tuning/jobs/{id}/checkpoints", get(checkpoints))
}
