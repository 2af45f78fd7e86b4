//! The OpenAI-compatible fine-tuning API, as the official `openai` SDK calls it
//! (`/v1/fine_tuning/jobs…`, and the results files that `/v1/files` serves): a view over the
//! native jobs — the same rows, workers, API keys and events — not a second system.
//!
//! A create request becomes a native [`JobSpec`]: `model` is the base (or a previous job's
//! `fine_tuned_model`, whose adapter the new job starts from), `training_file` and
//! `validation_file` the dataset, `hyperparameters` the epochs, batch size and learning rate
//! (`learning_rate_multiplier` × [`DEFAULT_LEARNING_RATE`]), and an optional `qtune` object any
//! other native field. Uploaded training files are checked line by line before the job is
//! queued (OpenAI's `validating_files`, done within the request). Jobs are shown as
//! `fine_tuning.job` objects, their event log as `fine_tuning.job.event`s, their checkpoints as
//! `fine_tuning.job.checkpoint`s with the metrics of that step.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

use super::{jobs, ApiError, Owner};
use crate::artifacts::Key;
use crate::db::{JobRow, Order};
use crate::events::JobEvent;
use crate::job::{unix_seconds, FileView, JobId, JobStatus};
use crate::queue::Control;
use crate::spec::{DatasetFormat, JobSpec, DEFAULT_LEARNING_RATE};
use crate::state::AppState;

/// The purpose of the files qtune makes from a job's step metrics.
pub const RESULTS_PURPOSE: &str = "fine-tune-results";
const RESULTS_PREFIX: &str = "file-results-";

/// A native error as this API answers it: invalid input is a 400, as OpenAI's.
fn as_openai(mut e: ApiError) -> ApiError {
    if e.status == StatusCode::UNPROCESSABLE_ENTITY {
        e.status = StatusCode::BAD_REQUEST;
    }
    e
}

/// `ft:{base}:{suffix}:{job id}`: the name a succeeded job's model goes by.
pub fn fine_tuned_model_name(spec: &JobSpec, job_id: &str) -> String {
    format!(
        "ft:{}:{}:{job_id}",
        spec.base_model,
        spec.suffix.as_deref().unwrap_or("")
    )
}

/// The job (and checkpoint step) a `ft:…:{job id}[:ckpt-step-N]` name points at.
pub fn parse_fine_tuned_model(model: &str) -> Option<(JobId, Option<u64>)> {
    let rest = model.strip_prefix("ft:")?;
    let (rest, step) = match rest.rsplit_once(":ckpt-step-") {
        Some((r, n)) => (r, Some(n.parse().ok()?)),
        None => (rest, None),
    };
    let (_, id) = rest.rsplit_once(':')?;
    Some((JobId::parse(id)?, step))
}

fn hyperparameters(spec: &JobSpec) -> Value {
    json!({
        "n_epochs": spec.training.epochs,
        "batch_size": spec.training.batch_size,
        "learning_rate_multiplier": spec.training.learning_rate / DEFAULT_LEARNING_RATE,
    })
}

/// A job as OpenAI's `fine_tuning.job`.
pub fn job_object(row: &JobRow) -> Value {
    let spec: Option<JobSpec> = serde_json::from_str(&row.spec).ok();
    let Some(spec) = spec else {
        return json!({"id": row.id, "object": "fine_tuning.job", "status": row.status});
    };
    let succeeded = row.status == JobStatus::Succeeded;
    let estimated_finish = match (row.total_steps, row.elapsed_seconds) {
        (Some(total), Some(elapsed)) if row.step > 0 && row.status == JobStatus::Running => {
            let left = elapsed / row.step as f64 * (total - row.step).max(0) as f64;
            Some(time::OffsetDateTime::now_utc().unix_timestamp() + left.round() as i64)
        }
        _ => None,
    };
    let error = row.error_code.as_ref().map(|code| {
        json!({"code": code, "message": row.error_message.clone().unwrap_or_default(), "param": null})
    });
    let hyper = hyperparameters(&spec);
    json!({
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": unix_seconds(&row.created_at),
        "finished_at": row.finished_at.as_deref().map(unix_seconds),
        "model": spec.base_model,
        "fine_tuned_model": succeeded.then(|| fine_tuned_model_name(&spec, &row.id)),
        "organization_id": format!("org-{}", row.owner.as_deref().unwrap_or("qtune")),
        "status": row.status,
        "training_file": spec.dataset.url,
        "validation_file": spec.dataset.validation_url,
        "result_files": if succeeded { vec![format!("{RESULTS_PREFIX}{}", row.id)] } else { vec![] },
        "trained_tokens": row.tokens_seen,
        "error": error,
        "estimated_finish": estimated_finish,
        "hyperparameters": hyper,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "seed": spec.seed,
        "suffix": spec.suffix,
        "metadata": spec.metadata,
        "integrations": [],
        "user_provided_suffix": spec.suffix,
        "qtune": {"phase": row.phase, "step": row.step, "total_steps": row.total_steps},
    })
}

/// `"auto"` or a number from a hyperparameters object; `None` for auto or absent.
fn hyper_number(h: &Map<String, Value>, key: &str, param: &str) -> Result<Option<f64>, ApiError> {
    match h.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::bad(param, "must be \"auto\" or a number")),
    }
}

/// The hyperparameters a request gives (top level, or under `method.supervised`), with the
/// param each was read from.
fn requested_hyperparameters(
    req: &Map<String, Value>,
) -> Result<(Map<String, Value>, String), ApiError> {
    let top = req.get("hyperparameters").filter(|v| !v.is_null());
    let method = match req.get("method") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => return Err(ApiError::bad("method", "must be an object")),
    };
    let mut under_method = None;
    if let Some(m) = method {
        match m.get("type").and_then(Value::as_str) {
            None | Some("supervised") => {}
            Some(t @ ("dpo" | "reinforcement")) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unsupported_method",
                    format!("qtune trains supervised fine-tuning only; method.type {t:?} is not supported yet"),
                )
                .param("method.type"))
            }
            Some(other) => {
                return Err(ApiError::bad(
                    "method.type",
                    format!("unknown method type {other:?} (supervised)"),
                ))
            }
        }
        under_method = m
            .get("supervised")
            .and_then(|s| s.get("hyperparameters"))
            .filter(|v| !v.is_null());
    }
    let (h, param) =
        match (top, under_method) {
            (Some(_), Some(_)) => return Err(ApiError::bad(
                "hyperparameters",
                "give hyperparameters either at the top level or under method.supervised, not both",
            )),
            (Some(h), None) => (h, "hyperparameters".to_string()),
            (None, Some(h)) => (h, "method.supervised.hyperparameters".to_string()),
            (None, None) => return Ok((Map::new(), "hyperparameters".into())),
        };
    let h = h
        .as_object()
        .ok_or_else(|| ApiError::bad(&param, "must be an object"))?;
    for key in h.keys() {
        if !["n_epochs", "batch_size", "learning_rate_multiplier"].contains(&key.as_str()) {
            return Err(ApiError::bad(
                &format!("{param}.{key}"),
                "unknown hyperparameter (n_epochs, batch_size, learning_rate_multiplier)",
            ));
        }
    }
    Ok((h.clone(), param))
}

/// A create request as the native spec it stands for, and where each native field came from
/// (to name the request's own field in errors).
async fn spec_from_request(
    state: &AppState,
    owner: &Owner,
    req: &Map<String, Value>,
) -> Result<JobSpec, ApiError> {
    const KNOWN: [&str; 10] = [
        "model",
        "training_file",
        "validation_file",
        "suffix",
        "seed",
        "metadata",
        "hyperparameters",
        "method",
        "integrations",
        "qtune",
    ];
    if let Some(unknown) = req.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad(unknown, "unknown parameter"));
    }
    let text = |key: &str| -> Result<Option<String>, ApiError> {
        match req.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::bad(key, "must be a string")),
        }
    };
    let model = text("model")?
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| {
            ApiError::bad(
                "model",
                "missing: the base model (or a fine_tuned_model) to train",
            )
        })?;
    let training_file = text("training_file")?
        .filter(|f| !f.trim().is_empty())
        .ok_or_else(|| {
            ApiError::bad(
                "training_file",
                "missing: the id of an uploaded training file",
            )
        })?;
    let validation_file = text("validation_file")?;
    match req.get("integrations") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => {
            return Err(ApiError::bad(
                "integrations",
                "qtune reports to no third-party service; watch jobs through their events",
            ))
        }
    }
    let (hyper, hyper_param) = requested_hyperparameters(req)?;
    let mut spec = match req.get("qtune") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(q)) => q.clone(),
        Some(_) => {
            return Err(ApiError::bad(
                "qtune",
                "must be an object of native job spec fields",
            ))
        }
    };
    for (field, instead) in [
        ("base_model", "model"),
        ("seed", "seed"),
        ("suffix", "suffix"),
        ("metadata", "metadata"),
        ("from_checkpoint", "model (a fine_tuned_model)"),
    ] {
        if spec.contains_key(field) {
            return Err(ApiError::bad(
                &format!("qtune.{field}"),
                format!("set by the request's {instead}, not inside qtune"),
            ));
        }
    }
    // `model`: a base, or a fine-tuned model to continue from
    let (base, from_checkpoint) = match parse_fine_tuned_model(&model) {
        Some((job, step)) => {
            let earlier = state
                .db
                .get_job(&job, owner.as_deref())
                .await?
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "model_not_found",
                        format!("no fine-tuned model {model:?}"),
                    )
                    .param("model")
                })?;
            let earlier_spec: JobSpec = serde_json::from_str(&earlier.spec).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "model_not_found",
                    "the earlier job's spec is unreadable",
                )
                .param("model")
            })?;
            // the adapter continues with its own shape unless the request says otherwise
            if !spec.contains_key("lora") {
                spec.insert(
                    "lora".into(),
                    serde_json::to_value(&earlier_spec.lora).expect("serializes"),
                );
            }
            let reference = match step {
                Some(n) => format!("{job}:{n}"),
                None => job.to_string(),
            };
            (earlier_spec.base_model, Some(reference))
        }
        None if model.starts_with("ft:") => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "model_not_found",
                format!("{model:?} is not a fine-tuned model name (ft:BASE:SUFFIX:JOB_ID)"),
            )
            .param("model"))
        }
        None => (model.clone(), None),
    };
    spec.insert("base_model".into(), json!(base));
    if let Some(r) = from_checkpoint {
        spec.insert("from_checkpoint".into(), json!(r));
    }
    let mut dataset = match spec.remove("dataset") {
        None => Map::new(),
        Some(Value::Object(d)) => d,
        Some(_) => return Err(ApiError::bad("qtune.dataset", "must be an object")),
    };
    for (field, instead) in [
        ("url", "training_file"),
        ("validation_url", "validation_file"),
    ] {
        if dataset.contains_key(field) {
            return Err(ApiError::bad(
                &format!("qtune.dataset.{field}"),
                format!("set by the request's {instead}, not inside qtune"),
            ));
        }
    }
    dataset.insert("url".into(), json!(training_file));
    if let Some(v) = validation_file {
        dataset.insert("validation_url".into(), json!(v));
    }
    spec.insert("dataset".into(), Value::Object(dataset));
    let mut training = match spec.remove("training") {
        None => Map::new(),
        Some(Value::Object(t)) => t,
        Some(_) => return Err(ApiError::bad("qtune.training", "must be an object")),
    };
    let mut from_hyper = Vec::new();
    for (key, native) in [
        ("n_epochs", "epochs"),
        ("batch_size", "batch_size"),
        ("learning_rate_multiplier", "learning_rate"),
    ] {
        let param = format!("{hyper_param}.{key}");
        let Some(v) = hyper_number(&hyper, key, &param)? else {
            continue;
        };
        if training.contains_key(native) {
            return Err(ApiError::bad(
                &param,
                format!("also set as qtune.training.{native}: give one"),
            ));
        }
        let value = match key {
            "learning_rate_multiplier" if !(v.is_finite() && v > 0.0) => {
                return Err(ApiError::bad(&param, format!("must be > 0, got {v}")))
            }
            "learning_rate_multiplier" => json!(v * DEFAULT_LEARNING_RATE),
            _ if v.fract() != 0.0 || v < 1.0 => {
                return Err(ApiError::bad(
                    &param,
                    format!("must be a whole number ≥ 1, got {v}"),
                ))
            }
            _ => json!(v as i64),
        };
        training.insert(native.into(), value);
        from_hyper.push((format!("training.{native}"), param));
    }
    spec.insert("training".into(), Value::Object(training));
    for key in ["seed", "suffix", "metadata"] {
        if let Some(v) = req.get(key).filter(|v| !v.is_null()) {
            spec.insert(key.into(), v.clone());
        }
    }
    JobSpec::from_json(&Value::Object(spec).to_string()).map_err(|e| {
        let param = match e.param.as_str() {
            "base_model" => "model".to_string(),
            "dataset.url" => "training_file".to_string(),
            "dataset.validation_url" => "validation_file".to_string(),
            p if p == "seed" || p == "suffix" || p.starts_with("metadata") => p.to_string(),
            p => from_hyper
                .iter()
                .find(|(native, _)| native == p)
                .map(|(_, asked)| asked.clone())
                .unwrap_or_else(|| format!("qtune.{p}")),
        };
        ApiError::bad(&param, e.message)
    })
}

/// The request's field a native field came from (for the errors of the queue's own checks).
fn openai_param(native: &str) -> String {
    match native {
        "base_model" => "model".into(),
        "dataset.url" => "training_file".into(),
        "dataset.validation_url" => "validation_file".into(),
        "from_checkpoint" => "model".into(),
        other => other.into(),
    }
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
        let not_found = || {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "file_not_found",
                format!("no file {id:?}"),
            )
            .param(param)
        };
        let row = state
            .db
            .get_file(id, owner.as_deref())
            .await?
            .ok_or_else(not_found)?;
        let invalid = |details: &str| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_training_file",
                format!("{param}: {details}"),
            )
            .param(param)
        };
        match row.status.as_str() {
            "processed" => continue,
            "error" => return Err(invalid(row.status_details.as_deref().unwrap_or("invalid"))),
            _ => {}
        }
        let key = Key::upload(id).ok_or_else(not_found)?;
        let max_record = (state.config.max_record_kib * 1024) as usize;
        match check_jsonl(state, &key, id, spec.dataset.format, max_record).await? {
            Ok(()) => state.db.set_file_status(id, "processed", None).await?,
            Err(details) => {
                state
                    .db
                    .set_file_status(id, "error", Some(&details))
                    .await?;
                return Err(invalid(&details));
            }
        }
    }
    Ok(())
}

/// Reads a stored JSONL file through the engine's own record checks: `Ok(Err(why))` names the
/// line of the first bad record.
async fn check_jsonl(
    state: &AppState,
    key: &Key,
    shown: &str,
    format: DatasetFormat,
    max_record: usize,
) -> Result<Result<(), String>, ApiError> {
    use crate::train::data::{check_record, parse_line};
    let mut chunks = state.artifacts.read(key, None).await?;
    let mut format = format;
    let (mut pending, mut line_no, mut records) = (Vec::<u8>::new(), 0usize, 0usize);
    let check = |raw: &mut Vec<u8>, line_no: usize, format: &mut DatasetFormat| {
        let record =
            parse_line(raw, shown, line_no, format, max_record).map_err(|e| e.to_string())?;
        if let Some(record) = record {
            check_record(&record, *format)
                .map_err(|e| format!("{shown} line {line_no}: {}", data_message(e)))?;
            return Ok::<bool, String>(true);
        }
        Ok(false)
    };
    loop {
        let chunk = chunks.next().await;
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            pending.extend_from_slice(&chunk?);
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = pending.drain(..=end).collect();
            line_no += 1;
            match check(&mut line, line_no, &mut format) {
                Ok(counted) => records += counted as usize,
                Err(why) => return Ok(Err(why)),
            }
        }
        if pending.len() > max_record + 2 {
            return Ok(Err(format!(
                "{shown} line {}: the record is over {max_record} bytes, the most one record may have",
                line_no + 1
            )));
        }
        if done {
            break;
        }
    }
    if !pending.is_empty() {
        line_no += 1;
        match check(&mut pending, line_no, &mut format) {
            Ok(counted) => records += counted as usize,
            Err(why) => return Ok(Err(why)),
        }
    }
    if records == 0 {
        return Ok(Err(format!("{shown} has no records")));
    }
    Ok(Ok(()))
}

fn data_message(e: crate::train::Error) -> String {
    match e {
        crate::train::Error::Data(m) => m,
        other => other.to_string(),
    }
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let req = super::json_object(&headers, &body, "a fine-tuning job")?;
    let idempotency = super::idempotency_key(&headers)?;
    let spec = spec_from_request(&state, &owner, &req).await?;
    validate_files(&state, &owner, &spec).await?;
    match jobs::submit_once(&state, &owner, idempotency.as_deref(), &body, &spec).await {
        Ok(row) => Ok(Json(job_object(&row)).into_response()),
        Err(mut e) => {
            e = as_openai(e);
            e.param = e.param.as_deref().map(openai_param);
            Err(e)
        }
    }
}

/// `GET /v1/fine_tuning/jobs?after&limit&metadata[k]=v`.
pub async fn list(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let (mut limit, mut after, mut metadata) = (20i64, None, Vec::new());
    for (key, value) in query {
        match key.as_str() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| ApiError::bad("limit", "must be a whole number from 1 to 100"))?
            }
            "after" => after = Some(value),
            k => match k
                .strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
            {
                // a job has at most 16 pairs: more filters could match nothing
                Some(_) if metadata.len() == 16 => {
                    return Err(ApiError::bad("metadata", "at most 16 metadata filters"))
                }
                Some(k) => metadata.push((k.to_string(), value)),
                None => {
                    return Err(ApiError::bad(
                        k,
                        "unknown query parameter (after, limit, metadata[KEY])",
                    ))
                }
            },
        }
    }
    let after = match after {
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
        .list_jobs_tagged(owner.as_deref(), None, &metadata, after, limit + 1)
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let data: Vec<Value> = rows.iter().map(job_object).collect();
    Ok(Json(super::list_page(&data, has_more, |j| {
        j["id"].as_str().unwrap_or_default().to_string()
    })))
}

pub async fn retrieve(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(job_object(&jobs::load(&state, &id, &owner).await?)))
}

pub async fn cancel(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = jobs::control(&state, &owner, &id, Control::Cancel).await?;
    Ok(Json(job_object(&row)))
}

pub async fn pause(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = jobs::control(&state, &owner, &id, Control::Pause).await?;
    Ok(Json(job_object(&row)))
}

pub async fn resume(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = jobs::control(&state, &owner, &id, Control::Resume).await?;
    Ok(Json(job_object(&row)))
}

/// `after` and `limit` of the events and checkpoints lists.
fn page_query(
    query: Vec<(String, String)>,
    prefix: &str,
) -> Result<(Option<String>, i64), ApiError> {
    let (mut after, mut limit) = (None, 20i64);
    for (key, value) in query {
        match key.as_str() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| ApiError::bad("limit", "must be a whole number from 1 to 100"))?
            }
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

/// One logged event as a `fine_tuning.job.event`.
fn event_object(id: i64, created_at: &str, kind: &str, data: &str) -> Value {
    let (level, message, ty, payload) = match JobEvent::parse(kind, data) {
        Ok(JobEvent::Status(s)) => {
            let level = match s.status {
                JobStatus::Failed => "error",
                JobStatus::Cancelled | JobStatus::Paused => "warn",
                _ => "info",
            };
            let mut message = match (s.status, s.phase) {
                (JobStatus::Running, Some(phase)) => {
                    format!("Job {}", phase.as_str().replace('_', " "))
                }
                (JobStatus::Running, None) => {
                    format!("Job started (attempt {})", s.attempt.unwrap_or(1))
                }
                (JobStatus::Succeeded, _) => "The job has successfully completed".to_string(),
                (status, _) => format!("Job {status}"),
            };
            if let Some(reason) = &s.reason {
                message.push_str(&format!(": {reason}"));
            }
            if let Some(err) = &s.error {
                message.push_str(&format!(
                    ": {}",
                    err.message.as_deref().unwrap_or(&err.code)
                ));
            }
            (level, message, "message", Value::Null)
        }
        Ok(JobEvent::Data(d)) => (
            "info",
            format!(
                "Files validated and tokenized: {} training examples ({} tokens), {} steps",
                d.train.examples, d.train.tokens, d.total_steps
            ),
            "message",
            Value::Null,
        ),
        Ok(JobEvent::Metrics(m)) => (
            "info",
            format!(
                "Step {}/{}: training loss={:.4}",
                m.step, m.total_steps, m.train_loss
            ),
            "metrics",
            json!({
                "step": m.step,
                "total_steps": m.total_steps,
                "train_loss": m.train_loss,
                "train_mean_token_accuracy": m.train_accuracy,
                "learning_rate": m.learning_rate,
            }),
        ),
        Ok(JobEvent::Eval(e)) => (
            "info",
            format!("Step {}: validation loss={:.4}", e.step, e.eval_loss),
            "metrics",
            json!({
                "step": e.step,
                "valid_loss": e.eval_loss,
                "valid_mean_token_accuracy": e.eval_accuracy,
                "full_valid_loss": e.eval_loss,
                "full_valid_mean_token_accuracy": e.eval_accuracy,
            }),
        ),
        Ok(JobEvent::Checkpoint(c)) => (
            "info",
            format!("Checkpoint created at step {}", c.step),
            "message",
            Value::Null,
        ),
        Err(_) => ("info", format!("{kind} event"), "message", Value::Null),
    };
    json!({
        "id": format!("ftevent-{id}"),
        "object": "fine_tuning.job.event",
        "created_at": unix_seconds(created_at),
        "level": level,
        "message": message,
        "type": ty,
        "data": payload,
    })
}

/// `GET /v1/fine_tuning/jobs/{id}/events`: newest first, `after` pages to older ones.
pub async fn events(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
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
    let mut rows = state.db.events_page(&row.id, before, limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let data: Vec<Value> = rows
        .iter()
        .map(|e| event_object(e.id, &e.created_at, &e.kind, &e.data))
        .collect();
    Ok(Json(super::list_page(&data, has_more, |e| {
        e["id"].as_str().unwrap_or_default().to_string()
    })))
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: newest first, with the metrics of their step.
pub async fn checkpoints(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let (after, limit) = page_query(query, "ftckpt-")?;
    let row = jobs::load(&state, &id, &owner).await?;
    let job = jobs::parse_id(&id)?;
    let spec: Option<JobSpec> = serde_json::from_str(&row.spec).ok();
    let before = match after {
        None => u64::MAX,
        Some(a) => a
            .rsplit_once('-')
            .and_then(|(_, step)| step.parse::<u64>().ok())
            .ok_or_else(|| ApiError::bad("after", format!("not a checkpoint id: {a:?}")))?,
    };
    let curve = jobs::curve(&state, &row.id).await?;
    let mut recorded = state.db.list_checkpoints(&job).await?;
    recorded.retain(|c| (c.step as u64) < before);
    recorded.reverse();
    let has_more = recorded.len() as i64 > limit;
    recorded.truncate(limit as usize);
    let data: Vec<Value> = recorded
        .iter()
        .map(|c| {
            let step = c.step as u64;
            let train = curve.iter().find(|r| r.step == step && !r.is_eval());
            let valid = curve.iter().find(|r| r.step == step && r.is_eval());
            let model = spec
                .as_ref()
                .map(|s| format!("{}:ckpt-step-{step}", fine_tuned_model_name(s, &row.id)));
            json!({
                "id": format!("ftckpt-{}-{step}", row.id),
                "object": "fine_tuning.job.checkpoint",
                "created_at": unix_seconds(&c.created_at),
                "fine_tuned_model_checkpoint": model,
                "fine_tuning_job_id": row.id,
                "step_number": step,
                "metrics": {
                    "step": step,
                    "train_loss": train.and_then(|r| r.train_loss),
                    "train_mean_token_accuracy": train.and_then(|r| r.train_accuracy),
                    "valid_loss": valid.and_then(|r| r.eval_loss),
                    "valid_mean_token_accuracy": valid.and_then(|r| r.eval_accuracy),
                    "full_valid_loss": valid.and_then(|r| r.eval_loss),
                    "full_valid_mean_token_accuracy": valid.and_then(|r| r.eval_accuracy),
                },
            })
        })
        .collect();
    Ok(Json(super::list_page(&data, has_more, |c| {
        c["id"].as_str().unwrap_or_default().to_string()
    })))
}

/// The job whose results file `file_id` names (`file-results-{job id}`).
pub fn results_file_job(file_id: &str) -> Option<JobId> {
    JobId::parse(file_id.strip_prefix(RESULTS_PREFIX)?)
}

/// A succeeded job's results file — its step metrics as CSV, in the columns of OpenAI's
/// results files — and the file's record.
pub async fn results_file(
    state: &AppState,
    owner: &Owner,
    job: &JobId,
) -> Result<(FileView, String), ApiError> {
    let id = format!("{RESULTS_PREFIX}{job}");
    let row = state
        .db
        .get_job(job, owner.as_deref())
        .await?
        .filter(|r| r.status == JobStatus::Succeeded)
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    let curve = jobs::curve(state, &row.id).await?;
    let cell = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    let mut csv =
        String::from("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n");
    for r in curve.iter().filter(|r| !r.is_eval()) {
        let valid = curve.iter().find(|v| v.step == r.step && v.is_eval());
        csv += &format!(
            "{},{},{},{},{}\n",
            r.step,
            cell(r.train_loss),
            cell(r.train_accuracy),
            cell(valid.and_then(|v| v.eval_loss)),
            cell(valid.and_then(|v| v.eval_accuracy)),
        );
    }
    let view = FileView {
        object: "file".into(),
        id,
        bytes: csv.len() as i64,
        created_at: row.finished_at.as_deref().map(unix_seconds).unwrap_or(0),
        filename: "step_metrics.csv".into(),
        purpose: RESULTS_PURPOSE.into(),
        status: "processed".into(),
        status_details: None,
        sha256: None,
    };
    Ok((view, csv))
}

/// `GET /v1/files?purpose=fine-tune-results`: the results files of the caller's succeeded jobs,
/// newest first.
pub async fn list_results_files(
    state: &AppState,
    owner: &Owner,
    _order: Order,
    after: Option<&str>,
    limit: i64,
) -> Result<Json<Value>, ApiError> {
    let after = match after {
        None => None,
        Some(a) => {
            let job = results_file_job(a)
                .ok_or_else(|| ApiError::bad("after", format!("no file {a:?}")))?;
            Some(jobs::load(state, job.as_str(), owner).await?.seq)
        }
    };
    let mut rows = state
        .db
        .list_jobs(
            owner.as_deref(),
            Some(JobStatus::Succeeded),
            after,
            limit + 1,
        )
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let mut data = Vec::with_capacity(rows.len());
    for r in &rows {
        if let Some(job) = JobId::parse(&r.id) {
            data.push(results_file(state, owner, &job).await?.0);
        }
    }
    Ok(Json(super::list_page(&data, has_more, |f| f.id.clone())))
}
