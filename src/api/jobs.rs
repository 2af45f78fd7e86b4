//! `/v1/jobs`: create, list, read, cancel, metrics.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{ApiError, Owner};
use crate::app::AppState;
use crate::db::{CancelOutcome, JobRow};
use crate::spec::JobSpec;

/// The job as the API shows it. The stored spec is passed through as raw JSON: listing 50
/// jobs then costs no parse-and-reserialize of 50 specs.
#[derive(Serialize)]
pub struct JobView<'a> {
    id: &'a str,
    object: &'static str,
    status: &'a str,
    phase: Option<&'a str>,
    spec: &'a RawValue,
    created_at: &'a str,
    started_at: Option<&'a str>,
    finished_at: Option<&'a str>,
    progress: Progress,
    train_loss: Option<f64>,
    eval_loss: Option<f64>,
    error: Option<ErrorView<'a>>,
    attempt: i64,
    cancel_requested: bool,
}

#[derive(Serialize)]
struct Progress {
    step: i64,
    total_steps: Option<i64>,
    epoch: Option<f64>,
    tokens_seen: i64,
    elapsed_seconds: Option<f64>,
    eta_seconds: Option<f64>,
}

#[derive(Serialize)]
struct ErrorView<'a> {
    code: &'a str,
    message: Option<&'a str>,
}

pub fn job_view(row: &JobRow) -> JobView<'_> {
    let eta = match (row.total_steps, row.elapsed_seconds) {
        (Some(total), Some(elapsed)) if row.step > 0 && row.status == "running" => {
            Some(elapsed / row.step as f64 * (total - row.step).max(0) as f64)
        }
        _ => None,
    };
    let spec: &RawValue = serde_json::from_str(&row.spec)
        .unwrap_or_else(|_| serde_json::from_str("null").expect("null is JSON"));
    JobView {
        id: &row.id,
        object: "fine_tuning.job",
        status: &row.status,
        phase: row.phase.as_deref(),
        spec,
        created_at: &row.created_at,
        started_at: row.started_at.as_deref(),
        finished_at: row.finished_at.as_deref(),
        progress: Progress {
            step: row.step,
            total_steps: row.total_steps,
            epoch: row.epoch,
            tokens_seen: row.tokens_seen,
            elapsed_seconds: row.elapsed_seconds,
            eta_seconds: eta,
        },
        train_loss: row.train_loss,
        eval_loss: row.eval_loss,
        error: row.error_code.as_deref().map(|code| ErrorView {
            code,
            message: row.error_message.as_deref(),
        }),
        attempt: row.attempt,
        cancel_requested: row.cancel_requested != 0,
    }
}

#[derive(Serialize)]
struct JobList<'a> {
    object: &'static str,
    data: Vec<JobView<'a>>,
    has_more: bool,
    last_id: Option<&'a str>,
}

fn parse_id(id: &str) -> Result<(), ApiError> {
    uuid::Uuid::parse_str(id)
        .map(|_| ())
        .map_err(|_| ApiError::not_found("job", id))
}

pub(super) async fn load(state: &AppState, id: &str, owner: &Owner) -> Result<JobRow, ApiError> {
    parse_id(id)?;
    state
        .db
        .get_job(id, owner.as_deref())
        .await?
        .ok_or_else(|| ApiError::not_found("job", id))
}

pub async fn create(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    // Not JSON at all is a 400; JSON that is not a valid spec is a 422 naming the field.
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not JSON: {e}"),
        )
        .param("body"));
    }
    let text = std::str::from_utf8(&body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body is not UTF-8",
        )
    })?;
    let spec = JobSpec::from_json(text).map_err(|e| ApiError::invalid(&e.param, e.to_string()))?;
    check_references(&state, &spec, &owner).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let stored = serde_json::to_string(&spec).expect("a spec serializes");
    let row = state.db.insert_job(&id, owner.as_deref(), &stored).await?;
    state
        .publish(&id, "status", &json!({"status": "queued"}))
        .await?;
    state.job_queued.notify_waiters();
    tracing::info!(job.id = %id, base_model = %spec.base_model, "job queued");
    Ok((StatusCode::CREATED, Json(job_view(&row))).into_response())
}

/// What a spec points at that can be checked before queueing: uploaded files and the job a
/// `from_checkpoint` names.
async fn check_references(state: &AppState, spec: &JobSpec, owner: &Owner) -> Result<(), ApiError> {
    for (param, url) in [
        ("dataset.url", Some(&spec.dataset.url)),
        (
            "dataset.validation_url",
            spec.dataset.validation_url.as_ref(),
        ),
    ] {
        let Some(url) = url else { continue };
        if url.starts_with("file-") {
            if state.db.get_file(url, owner.as_deref()).await?.is_none() {
                return Err(ApiError::invalid(
                    param,
                    format!("no uploaded file {url:?}"),
                ));
            }
        } else if !(url.starts_with("http://")
            || url.starts_with("https://")
            || url.starts_with("file://")
            || url.starts_with('/'))
        {
            return Err(ApiError::invalid(
                param,
                format!("{url:?} is not a dataset URL: use http(s)://, file:// (allowed directories only) or file-<id> from POST /v1/files"),
            ));
        }
    }
    if let Some(from) = &spec.from_checkpoint {
        let (job_id, step) = match from.split_once(':') {
            Some((j, s)) => (j, Some(s)),
            None => (from.as_str(), None),
        };
        let job = match uuid::Uuid::parse_str(job_id) {
            Ok(_) => state.db.get_job(job_id, owner.as_deref()).await?,
            Err(_) => None,
        };
        let Some(job) = job else {
            return Err(ApiError::invalid(
                "from_checkpoint",
                format!("no job {job_id:?}"),
            ));
        };
        match step {
            Some(s) => {
                let step: i64 = s
                    .parse()
                    .map_err(|_| ApiError::invalid("from_checkpoint", format!("bad step {s:?}")))?;
                if !state
                    .db
                    .list_checkpoints(job_id)
                    .await?
                    .iter()
                    .any(|c| c.step == step)
                {
                    return Err(ApiError::invalid(
                        "from_checkpoint",
                        format!("job {job_id} has no checkpoint at step {step}"),
                    ));
                }
            }
            None if job.status != "succeeded" => {
                return Err(ApiError::invalid(
                    "from_checkpoint",
                    format!(
                        "job {job_id} has not succeeded (it is {}), so it has no final adapter",
                        job.status
                    ),
                ));
            }
            None => {}
        }
    }
    Ok(())
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
    if let Some(s) = &q.status {
        if !["queued", "running", "succeeded", "failed", "cancelled"].contains(&s.as_str()) {
            return Err(ApiError::invalid("status", format!("unknown status {s:?}")));
        }
    }
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
        .list_jobs(owner.as_deref(), q.status.as_deref(), after, limit + 1)
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let body = JobList {
        object: "list",
        data: rows.iter().map(job_view).collect(),
        has_more,
        last_id: rows.last().map(|r| r.id.as_str()),
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

pub async fn cancel(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    parse_id(&id)?;
    match state.db.request_cancel(&id, owner.as_deref()).await? {
        CancelOutcome::NotFound => return Err(ApiError::not_found("job", &id)),
        CancelOutcome::Finished(status) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_finished",
                format!("job {id} already {status}; nothing to cancel"),
            ))
        }
        CancelOutcome::Cancelled => {
            state
                .publish(&id, "status", &json!({"status": "cancelled"}))
                .await?;
        }
        CancelOutcome::Requested => {
            if let Some(flag) = state.running.lock().expect("poisoned").get(&id) {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        CancelOutcome::AlreadyCancelled => {}
    }
    Ok(Json(job_view(&load(&state, &id, &owner).await?)).into_response())
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
    load(&state, &id, &owner).await?;
    // A resumed job repeats the steps after its last checkpoint: the later row of a step wins.
    let mut by_step: std::collections::BTreeMap<(i64, u8), Value> = Default::default();
    for e in state.db.events_after(&id, 0).await? {
        let d: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
        let step = d["step"].as_i64().unwrap_or(0);
        match e.kind.as_str() {
            "metrics" => by_step.insert((step, 0), json!({
                "step": d["step"], "epoch": d["epoch"], "train_loss": d["loss"], "eval_loss": null,
                "learning_rate": d["learning_rate"], "grad_norm": d["grad_norm"], "tokens_per_second": d["tokens_per_second"],
            })),
            "eval" => by_step.insert((step, 1), json!({
                "step": d["step"], "epoch": d["epoch"], "train_loss": null, "eval_loss": d["eval_loss"],
                "learning_rate": null, "grad_norm": null, "tokens_per_second": null,
            })),
            _ => None,
        };
    }
    let rows: Vec<Value> = by_step.into_values().collect();
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(json!({"object": "list", "data": rows})).into_response()),
        Some("csv") => {
            let cols = [
                "step",
                "epoch",
                "train_loss",
                "eval_loss",
                "learning_rate",
                "grad_norm",
                "tokens_per_second",
            ];
            let mut csv = cols.join(",") + "\n";
            for r in &rows {
                let line: Vec<String> = cols
                    .iter()
                    .map(|c| match &r[*c] {
                        Value::Null => String::new(),
                        v => v.to_string(),
                    })
                    .collect();
                csv += &(line.join(",") + "\n");
            }
            Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response())
        }
        Some(other) => Err(ApiError::invalid(
            "format",
            format!("unknown format {other:?} (json or csv)"),
        )),
    }
}
