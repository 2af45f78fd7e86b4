//! Uploads (`POST /v1/files`) and downloads of checkpoints and adapters, streamed from the
//! artifact store.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{jobs, ApiError, Owner};
use futures_util::StreamExt;

use crate::artifacts::{new_upload_id, Key, PutError};
use crate::db::{FileRow, Order};
use crate::job::{unix_seconds, CheckpointView, FileDigest, FileStatus, FileView, JobStatus};
use crate::state::AppState;
use crate::uploads::{self, StoredUpload, UploadError, UploadRoom, UPLOAD_PURPOSE};

fn check_purpose(purpose: &str) -> Result<(), ApiError> {
    if purpose == UPLOAD_PURPOSE {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_purpose",
        format!("qtune stores files for fine-tuning only: purpose must be \"{UPLOAD_PURPOSE}\""),
    )
    .param("purpose"))
}

/// Stores a dataset sent as the raw request body (`?filename=` names it) or as the `file` field
/// of a multipart form (OpenAI's `files.create`: fields `purpose` and `file`). The body goes to
/// the store as it arrives (hashed on the way, never held whole); one announced as larger than
/// the limit is refused before it is read. With an `Idempotency-Key`, a repeat of the same
/// upload answers with the file the first one made.
pub async fn upload(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    req: Request,
) -> Result<(StatusCode, Json<FileView>), ApiError> {
    let room = UploadRoom::for_owner(&state, owner.as_deref()).await?;
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Err(e) = room.check_announced(announced) {
        if matches!(e, UploadError::OverQuota { .. }) {
            drain_small_body(req.into_body(), announced).await;
        }
        return Err(e.into());
    }
    let idempotency_key = super::idempotency_key(req.headers())?;
    let id = new_upload_id();
    let key = Key::upload(&id).expect("a fresh upload id is valid");
    let mut purpose = q.get("purpose").cloned();
    if let Some(p) = &purpose {
        check_purpose(p)?;
    }
    if let Some(name) = q.get("filename") {
        check_filename(name)?;
    }
    let (stored, filename) = if is_multipart(req.headers()) {
        store_form(&state, req, &key, room.limit(), &mut purpose).await?
    } else {
        let chunks = paced(
            req.into_body()
                .into_data_stream()
                .map(|c| c.map_err(|e| e.to_string())),
        )
        .boxed();
        let stored = state.artifacts.put_stream(&key, chunks, room.limit()).await;
        (stored, q.get("filename").cloned())
    };
    let upload = StoredUpload {
        id,
        key,
        digest: stored.map_err(|e| room.refused(e))?,
        filename,
        purpose: purpose.unwrap_or_else(|| UPLOAD_PURPOSE.to_string()),
    };
    let owner = owner.as_deref();
    let (row, new) = uploads::record(&state, owner, upload, idempotency_key.as_deref()).await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(file_view(row))))
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"))
}

/// A multipart form's `file` stored under `key` as it arrives, its `purpose` checked; the
/// store's answer and the file's name. A form refused after its file was stored leaves nothing
/// behind.
async fn store_form(
    state: &AppState,
    req: Request,
    key: &Key,
    limit: u64,
    purpose: &mut Option<String>,
) -> Result<(Result<FileDigest, PutError>, Option<String>), ApiError> {
    let mut form = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::new(e.status(), "invalid_body", e.body_text()))?;
    let mut stored = None;
    let read = async {
        while let Some(field) = form.next_field().await? {
            match field.name() {
                Some("purpose") => {
                    let text = small_field(field).await?;
                    check_purpose(text.trim())?;
                    *purpose = Some(text.trim().to_string());
                }
                Some("file") | None if stored.is_none() => {
                    let name = field.file_name().map(str::to_string);
                    if let Some(name) = &name {
                        check_filename(name)?;
                    }
                    let chunks = paced(field.map(|c| c.map_err(|e| e.body_text()))).boxed();
                    stored = Some((state.artifacts.put_stream(key, chunks, limit).await, name));
                }
                // other fields (OpenAI's expires_after[…]) are read past: retention is the
                // operator's
                _ => {
                    small_field(field).await?;
                }
            }
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = read {
        if matches!(stored, Some((Ok(_), _))) {
            state.artifacts.delete(key).await?;
        }
        return Err(e);
    }
    stored.ok_or_else(|| ApiError::invalid("file", "the multipart form has no file field"))
}

/// An upload's name as it is kept and shown (OpenAI's `filename`; a download's
/// `Content-Disposition`): a file name, not a path, of at most 255 bytes, without control
/// characters (a CR or LF would split a header, a NUL cut the name short in other tools).
fn check_filename(name: &str) -> Result<(), ApiError> {
    let why = if name.is_empty() || name.len() > 255 {
        Some("must be 1 to 255 bytes long")
    } else if name.chars().any(|c| c.is_control()) {
        Some("must not hold control characters")
    } else if name.contains(['/', '\\']) || name == "." || name == ".." {
        Some("must be a file name, not a path")
    } else if name.contains('"') {
        Some("must not hold a double quote")
    } else {
        None
    };
    match why {
        Some(why) => Err(ApiError::bad("filename", format!("the file's name {why}"))),
        None => Ok(()),
    }
}

/// An upload body that sends nothing for this long is cut off.
const BODY_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// The slowest an upload body may arrive, on average once [`BODY_STALL`] has passed: a client
/// trickling a few bytes a second would hold its upload slot for days.
const MIN_BODY_BYTES_PER_SEC: u64 = 16 << 10;

/// `body`, cut off with an error when it stalls or arrives slower than the minimum rate.
fn paced<'a>(
    body: impl futures_util::Stream<Item = Result<bytes::Bytes, String>> + Send + Unpin + 'a,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, String>> + Send + 'a {
    let start = std::time::Instant::now();
    futures_util::stream::unfold(
        (body, 0u64, false),
        move |(mut body, total, ended)| async move {
            if ended {
                return None;
            }
            match tokio::time::timeout(BODY_STALL, body.next()).await {
                Err(_) => Some((
                    Err(format!(
                        "the upload sent nothing for {} seconds and was cut off",
                        BODY_STALL.as_secs()
                    )),
                    (body, total, true),
                )),
                Ok(None) => None,
                Ok(Some(Err(e))) => Some((Err(e), (body, total, true))),
                Ok(Some(Ok(chunk))) => {
                    let total = total + chunk.len() as u64;
                    let elapsed = start.elapsed();
                    if elapsed > BODY_STALL && total < MIN_BODY_BYTES_PER_SEC * elapsed.as_secs() {
                        return Some((
                        Err(format!(
                            "the upload arrived at {} bytes a second, under the {} KiB a second an upload must keep up; it was cut off",
                            total / elapsed.as_secs().max(1),
                            MIN_BODY_BYTES_PER_SEC >> 10
                        )),
                        (body, total, true),
                    ));
                    }
                    Some((Ok(chunk), (body, total, false)))
                }
            }
        },
    )
}

/// The most a form field other than the file may hold.
const SMALL_FIELD_BYTES: usize = 64 << 10;

/// A form field other than the file, read a chunk at a time up to [`SMALL_FIELD_BYTES`]: only
/// the file is meant to be large, and it is streamed to the store.
pub(super) async fn small_field(
    mut field: axum::extract::multipart::Field<'_>,
) -> Result<String, ApiError> {
    let name = field.name().unwrap_or("(unnamed)").to_string();
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await? {
        if bytes.len() + chunk.len() > SMALL_FIELD_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "form field {name:?} is over {} KiB; only the file field may be large",
                    SMALL_FIELD_BYTES >> 10
                ),
            )
            .param(name));
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes)
        .map_err(|_| ApiError::bad(&name, format!("form field {name:?} is not UTF-8 text")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListQuery {
    limit: Option<i64>,
    after: Option<String>,
    order: Option<String>,
    purpose: Option<String>,
}

/// The caller's files, newest first (`order=asc`: oldest first), a page at a time (`after` the
/// id of the previous page's last); `purpose=fine-tune-results` lists the results files of the
/// caller's finished jobs.
pub async fn list(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    query: Result<Query<FileListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and 1000, got {limit}"),
        ));
    }
    let order = match q.order.as_deref() {
        None | Some("desc") => Order::Newest,
        Some("asc") => Order::Oldest,
        Some(other) => {
            return Err(ApiError::invalid(
                "order",
                format!("{other:?} is not an order (asc or desc)"),
            ))
        }
    };
    if q.purpose.as_deref() == Some(super::openai::RESULTS_PURPOSE) {
        return super::openai::list_results_files(&state, &owner, order, q.after.as_deref(), limit)
            .await;
    }
    if let Some(after) = &q.after {
        if state.db.get_file(after, owner.as_deref()).await?.is_none() {
            return Err(ApiError::invalid("after", format!("no file {after:?}")));
        }
    }
    let mut rows = state
        .db
        .list_files(
            owner.as_deref(),
            q.purpose.as_deref(),
            order,
            q.after.as_deref(),
            limit + 1,
        )
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let data: Vec<FileView> = rows.into_iter().map(file_view).collect();
    Ok(Json(super::list_page(&data, has_more, |f| f.id.clone())))
}

/// One file: an upload, or a job's results file.
pub async fn retrieve(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<FileView>, ApiError> {
    if let Some(job) = super::openai::results_file_job(&id) {
        return Ok(Json(
            super::openai::results_file(&state, &owner, &job).await?.0,
        ));
    }
    let row = state
        .db
        .get_file(&id, owner.as_deref())
        .await?
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    Ok(Json(file_view(row)))
}

#[derive(Deserialize)]
pub struct CheckQuery {
    format: Option<String>,
}

/// Reads an upload through training's own record checks, as creating an OpenAI-style job does,
/// so a client (the dashboard) hears of a bad line before it names the file in a job. The
/// result is the file's recorded status (`processed`, or `error` with the line in
/// `status_details`); a file checked before answers from that record.
pub async fn check(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    query: Result<Query<CheckQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<FileView>, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let format = match q.format.as_deref() {
        None => crate::spec::DatasetFormat::Auto,
        Some(f) => serde_json::from_value(Value::String(f.into())).map_err(|_| {
            ApiError::invalid(
                "format",
                format!("unknown dataset format {f:?} (auto, messages, alpaca, sharegpt, prompt_completion, text, preference, chosen_rejected)"),
            )
        })?,
    };
    let mut row = state
        .db
        .get_file(&id, owner.as_deref())
        .await?
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    let details = row.status_details.as_deref();
    // the check records what it found; the row read above is brought up to it, not read again
    match uploads::check_training_file(&state, &id, row.status, details, format).await? {
        uploads::FileCheck::Valid => {
            (row.status, row.status_details) = (FileStatus::Processed, None)
        }
        uploads::FileCheck::Invalid(why) => {
            (row.status, row.status_details) = (FileStatus::Error, Some(why))
        }
    }
    Ok(Json(file_view(row)))
}

/// A file's bytes: an upload as stored (checked against its recorded sha256 as it streams), or
/// a results file's CSV.
pub async fn content(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(job) = super::openai::results_file_job(&id) {
        let (_, csv) = super::openai::results_file(&state, &owner, &job).await?;
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response());
    }
    let key = Key::upload(&id).ok_or_else(|| ApiError::not_found("file", &id))?;
    let row = state
        .db
        .get_file(&id, owner.as_deref())
        .await?
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    let digest = FileDigest {
        name: key.file_name().to_string(),
        bytes: row.bytes as u64,
        sha256: row.sha256,
    };
    serve(&state, &key, Some(digest), true, &headers).await
}

/// Deletes an upload (jobs that name it and have not fetched it yet will fail saying so).
pub async fn delete(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = Key::upload(&id).ok_or_else(|| ApiError::not_found("file", &id))?;
    if !state.db.delete_file(&id, owner.as_deref()).await? {
        return Err(ApiError::not_found("file", &id));
    }
    state.artifacts.delete(&key).await?;
    Ok(Json(json!({"object": "file", "id": id, "deleted": true})))
}

pub(super) fn file_view(row: FileRow) -> FileView {
    FileView {
        object: "file".into(),
        filename: row.filename.unwrap_or_else(|| row.id.clone()),
        id: row.id,
        bytes: row.bytes,
        created_at: unix_seconds(&row.created_at),
        purpose: row.purpose,
        status: row.status,
        status_details: row.status_details,
        sha256: Some(row.sha256),
    }
}

pub async fn checkpoints(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = jobs::parse_id(&id)?;
    jobs::load(&state, &id, &owner).await?;
    let data: Vec<CheckpointView> = state
        .db
        .list_checkpoints(&job)
        .await?
        .into_iter()
        .map(|r| CheckpointView {
            step: r.step as u64,
            created_at: r.created_at,
            files: r.files,
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn checkpoint_file(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path((id, step, file)): Path<(String, u64, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = jobs::parse_id(&id)?;
    let row = jobs::load(&state, &id, &owner).await?;
    gone_by_retention(&row)?;
    let key = Key::checkpoint_file(&job, step, &file)
        .ok_or_else(|| ApiError::not_found("checkpoint file", &file))?;
    let rows = state.db.list_checkpoints(&job).await?;
    let Some(row) = rows.iter().find(|r| r.step as u64 == step) else {
        return Err(ApiError::not_found("checkpoint", &format!("{id}:{step}")));
    };
    let recorded = row.files.iter().find(|f| f.name == file).cloned();
    let checked = recorded.is_some();
    serve(&state, &key, recorded, checked, &headers).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterQuery {
    file: Option<String>,
}

/// The final adapter: a tar of the PEFT folder, or one of its files with `?file=`.
pub async fn adapter(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    query: Result<Query<AdapterQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let row = jobs::load(&state, &id, &owner).await?;
    if row.status != JobStatus::Succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_ready",
            format!(
                "job {id} is {}; the adapter exists once it has succeeded",
                row.status
            ),
        ));
    }
    gone_by_retention(&row)?;
    let job = jobs::parse_id(&id)?;
    let key = match q.file.as_deref() {
        None => Key::adapter_tar(&job),
        Some(f) => Key::adapter_file(&job, f).ok_or_else(|| {
            ApiError::invalid(
                "file",
                format!(
                    "unknown adapter file {f:?} (adapter_model.safetensors or adapter_config.json)"
                ),
            )
        })?,
    };
    // recorded when the job succeeded; jobs finished before digests were kept get one now
    let name = key.file_name();
    let recorded: Vec<FileDigest> = row.adapter_files.clone().unwrap_or_default();
    match recorded.into_iter().find(|d| d.name == name) {
        Some(digest) => serve(&state, &key, Some(digest), true, &headers).await,
        None => {
            let computed = state.artifacts.digest(&key).await.ok();
            serve(&state, &key, computed, false, &headers).await
        }
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("json") => "application/json",
        Some("tar") => "application/x-tar",
        Some("gguf") => "application/octet-stream",
        _ => "application/octet-stream",
    }
}

/// One byte range of a file, as `Range: bytes=…` asks (a single range; others get the whole file).
enum Wanted {
    Whole,
    Part(u64, u64),
    Unsatisfiable,
}

fn wanted(headers: &HeaderMap, len: u64) -> Wanted {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
    else {
        return Wanted::Whole;
    };
    if spec.contains(',') {
        return Wanted::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Wanted::Whole;
    };
    let (start, end) = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(s), Some(e)) => (s, e.min(len.saturating_sub(1))),
        (Some(s), None) if b.is_empty() => (s, len.saturating_sub(1)),
        (None, Some(n)) if a.is_empty() && n > 0 => (len.saturating_sub(n), len.saturating_sub(1)),
        _ => return Wanted::Whole,
    };
    if len == 0 || start > end || start >= len {
        return Wanted::Unsatisfiable;
    }
    Wanted::Part(start, end)
}

/// Streams a stored file with Content-Type, Content-Length, `Accept-Ranges` and its digest as
/// a strong ETag (304 to a matching If-None-Match; 206 to a single `Range`). With `verify`, the
/// digest is the one recorded when the file was written: a size that differs is refused before
/// anything is sent, and a whole-file response whose bytes do not hash to it is broken off at
/// its end, so a corrupted artifact never arrives whole.
pub(super) async fn serve(
    state: &AppState,
    key: &Key,
    digest: Option<FileDigest>,
    verify: bool,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let name = key.file_name().to_string();
    let Some(bytes) = state.artifacts.size(key).await? else {
        return Err(ApiError::not_found("file", &name));
    };
    if verify && digest.as_ref().is_some_and(|d| d.bytes != bytes) {
        tracing::error!(key = key.as_str(), stored = bytes, recorded = ?digest.as_ref().map(|d| d.bytes), "artifact size differs from its record");
        return Err(corrupt(&name));
    }
    let etag = digest.as_ref().map(|d| format!("\"{}\"", d.sha256));
    if let (Some(tag), Some(inm)) = (&etag, headers.get(header::IF_NONE_MATCH)) {
        if inm.as_bytes() == tag.as_bytes() {
            return Ok(StatusCode::NOT_MODIFIED.into_response());
        }
    }
    let (status, length, body) = match wanted(headers, bytes) {
        Wanted::Unsatisfiable => {
            let mut resp = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("{name} has {bytes} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{bytes}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
        Wanted::Part(start, end) => {
            let body = Body::from_stream(state.artifacts.read(key, Some((start, end))).await?);
            (
                StatusCode::PARTIAL_CONTENT,
                end - start + 1,
                (body, Some((start, end))),
            )
        }
        Wanted::Whole => {
            let chunks = state.artifacts.read(key, None).await?;
            let body = match digest.filter(|_| verify) {
                Some(d) => Body::from_stream(verified(chunks, d.sha256, key.as_str().to_string())),
                None => Body::from_stream(chunks),
            };
            (StatusCode::OK, bytes, (body, None))
        }
    };
    let (body, range) = body;
    let mut resp = (status, body).into_response();
    download_headers(resp.headers_mut(), &name, length, bytes, range, etag);
    Ok(resp)
}

/// A download's headers: its type, length, range (of `total` bytes), file name and ETag.
fn download_headers(
    h: &mut HeaderMap,
    name: &str,
    length: u64,
    total: u64,
    range: Option<(u64, u64)>,
    etag: Option<String>,
) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(name)),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some((start, end)) = range {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{total}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(&t).ok()) {
        h.insert(header::ETAG, tag);
    }
}

/// 410 for a job whose artifacts retention has removed.
pub(super) fn gone_by_retention(row: &crate::db::JobRow) -> Result<(), ApiError> {
    match &row.artifacts_removed_at {
        Some(when) => Err(ApiError::new(
            StatusCode::GONE,
            "artifacts_removed",
            format!(
                "job {}'s files were removed at {when}, past the server's retention period",
                row.id
            ),
        )),
        None => Ok(()),
    }
}

fn corrupt(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "artifact_corrupt",
        format!("{name} on the server does not match what was recorded when it was written"),
    )
}

/// The chunks of a file, hashed as they pass. Each chunk is held back until the next one has
/// been read, and the last one is sent only if the whole hashes to `expected`: otherwise the
/// body ends short of its Content-Length with an error, and the client sees a failed download
/// rather than a complete one.
fn verified(
    chunks: crate::artifacts::ByteStream,
    expected: String,
    what: String,
) -> impl futures_util::Stream<Item = std::io::Result<axum::body::Bytes>> {
    use sha2::{Digest, Sha256};
    struct Reading {
        chunks: crate::artifacts::ByteStream,
        hasher: Sha256,
        held: Option<axum::body::Bytes>,
    }
    let start = Reading {
        chunks,
        hasher: Sha256::new(),
        held: None,
    };
    futures_util::stream::unfold(Some(start), move |state| {
        let (expected, what) = (expected.clone(), what.clone());
        async move {
            let mut r = state?;
            loop {
                match r.chunks.next().await {
                    Some(Ok(b)) => {
                        r.hasher.update(&b);
                        if let Some(previous) = r.held.replace(b) {
                            return Some((Ok(previous), Some(r)));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), None)),
                    None => {
                        let got = crate::artifacts::hex(&r.hasher.finalize_reset());
                        if got != expected {
                            tracing::error!(key = %what, %got, %expected, "artifact does not hash to its record");
                            return Some((Err(std::io::Error::other("artifact corrupt")), None));
                        }
                        return r.held.take().map(|last| (Ok(last), None));
                    }
                }
            }
        }
    })
}

/// Reads and drops the body of a request refused before reading it, when it is small (at most
/// 4 MiB, for 5 s at most): a client still sending it then gets the answer instead of a
/// connection closed under it. A larger body is answered at once and its connection closed.
async fn drain_small_body(body: axum::body::Body, announced: Option<u64>) {
    const MOST: u64 = 4 << 20;
    if announced.is_none_or(|n| n > MOST) {
        return;
    }
    let mut chunks = body.into_data_stream();
    let drain = async {
        let mut read = 0u64;
        while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut chunks).await {
            read += chunk.len() as u64;
            if read > MOST {
                break;
            }
        }
    };
    // a client still sending after five seconds gets its answer anyway
    tokio::time::timeout(std::time::Duration::from_secs(5), drain)
        .await
        .ok();
}

/// `/v1/files…` (uploads, at most `uploads` at a time) and a job's checkpoint and adapter files.
pub(super) fn routes(
    uploads: std::sync::Arc<super::guard::Slots>,
    upload_limit: usize,
) -> axum::Router<AppState> {
    use axum::routing::get;
    axum::Router::new()
        .route("/v1/jobs/{id}/checkpoints", get(checkpoints))
        .route(
            "/v1/jobs/{id}/checkpoints/{step}/{file}",
            get(checkpoint_file),
        )
        .route("/v1/jobs/{id}/adapter", get(adapter))
        .route(
            "/v1/files",
            axum::routing::post(upload)
                .get(list)
                .route_layer(axum::middleware::from_fn_with_state(
                    uploads,
                    super::guard::bound_uploads,
                ))
                // a multipart form is read through the extractor, which takes its limit from here
                .route_layer(axum::extract::DefaultBodyLimit::max(upload_limit)),
        )
        .route("/v1/files/{id}", get(retrieve).delete(delete))
        .route("/v1/files/{id}/content", get(content))
        .route("/v1/files/{id}/check", axum::routing::post(check))
}
