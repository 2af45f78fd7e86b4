//! Uploads (`POST /v1/files`) and downloads of checkpoints and adapters, streamed from the
//! artifact store.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{jobs, ApiError, Owner};
use crate::artifacts::{new_upload_id, Key, Opened};
use crate::db::FileRow;
use crate::job::{CheckpointView, FileDigest, FileView, JobStatus};
use crate::state::AppState;

/// Stores a dataset sent as the raw request body (`?filename=` names it) or as the first file
/// field of a multipart form.
pub async fn upload(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    req: Request,
) -> Result<(StatusCode, Json<FileView>), ApiError> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (body, filename) = if is_multipart {
        let mut form = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::new(e.status(), "invalid_body", e.body_text()))?;
        let mut found = None;
        while let Some(field) = form.next_field().await? {
            if field.file_name().is_some() || field.name() == Some("file") {
                let name = field.file_name().map(str::to_string);
                let bytes = field.bytes().await?;
                found = Some((bytes, name));
                break;
            }
        }
        found.ok_or_else(|| ApiError::invalid("file", "the multipart form has no file field"))?
    } else {
        let body: Result<Bytes, BytesRejection> = Bytes::from_request(req, &state).await;
        (body?, q.get("filename").cloned())
    };
    if body.is_empty() {
        return Err(ApiError::invalid("body", "the upload is empty"));
    }
    let id = new_upload_id();
    let key = Key::upload(&id).expect("a fresh upload id is valid");
    let digest = state.artifacts.put_bytes(&key, &body).await?;
    let row = FileRow {
        id,
        owner: owner.0.clone(),
        filename,
        bytes: digest.bytes as i64,
        sha256: digest.sha256,
        created_at: crate::db::now(),
    };
    state.db.insert_file(&row).await?;
    Ok((
        StatusCode::CREATED,
        Json(FileView {
            object: "file".into(),
            id: row.id,
            filename: row.filename,
            bytes: row.bytes,
            sha256: row.sha256,
            created_at: row.created_at,
        }),
    ))
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
            files: serde_json::from_str(&r.files).unwrap_or_default(),
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
    jobs::load(&state, &id, &owner).await?;
    let key = Key::checkpoint_file(&job, step, &file)
        .ok_or_else(|| ApiError::not_found("checkpoint file", &file))?;
    let rows = state.db.list_checkpoints(&job).await?;
    let Some(row) = rows.iter().find(|r| r.step as u64 == step) else {
        return Err(ApiError::not_found("checkpoint", &format!("{id}:{step}")));
    };
    let files: Vec<FileDigest> = serde_json::from_str(&row.files).unwrap_or_default();
    let sha = files.into_iter().find(|f| f.name == file).map(|f| f.sha256);
    send(&state, &key, sha, &headers).await
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
    let sha = state.artifacts.digest(&key).await.ok().map(|d| d.sha256);
    send(&state, &key, sha, &headers).await
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("json") => "application/json",
        Some("tar") => "application/x-tar",
        _ => "application/octet-stream",
    }
}

/// Streams a stored file with Content-Type, Content-Length and a strong ETag (its sha256);
/// answers 304 to a matching If-None-Match.
async fn send(
    state: &AppState,
    key: &Key,
    sha: Option<String>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let Some(Opened { file, bytes, name }) = state.artifacts.open(key).await? else {
        let name = key.as_str().rsplit('/').next().unwrap_or_default();
        return Err(ApiError::not_found("file", name));
    };
    let etag = sha.map(|s| format!("\"{s}\""));
    if let (Some(tag), Some(inm)) = (&etag, headers.get(header::IF_NONE_MATCH)) {
        if inm.as_bytes() == tag.as_bytes() {
            return Ok(StatusCode::NOT_MODIFIED.into_response());
        }
    }
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&name)),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(&t).ok()) {
        h.insert(header::ETAG, tag);
    }
    Ok(resp)
}
