//! Uploads (`POST /v1/files`) and downloads of checkpoints and adapters, streamed from disk.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{jobs, ApiError, Owner};
use crate::app::AppState;
use crate::db::FileRow;

/// Stores a dataset sent as the raw request body (`?filename=` names it) or as the first file
/// field of a multipart form.
pub async fn upload(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    let id = format!("file-{}", uuid::Uuid::new_v4().simple());
    let path = state.config.files_dir().join(&id);
    let sha = hex(&Sha256::digest(&body));
    let tmp = path.with_extension("part");
    tokio::fs::write(&tmp, &body).await?;
    tokio::fs::rename(&tmp, &path).await?;
    let row = FileRow {
        id,
        owner: owner.0.clone(),
        filename,
        bytes: body.len() as i64,
        sha256: sha,
        created_at: crate::db::now(),
    };
    state.db.insert_file(&row).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"object": "file", "id": row.id, "filename": row.filename, "bytes": row.bytes, "sha256": row.sha256, "created_at": row.created_at}),
        ),
    ))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn checkpoints(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    jobs::load(&state, &id, &owner).await?;
    let rows = state.db.list_checkpoints(&id).await?;
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            let files: Value = serde_json::from_str(&r.files).unwrap_or(Value::Null);
            json!({"step": r.step, "created_at": r.created_at, "files": files})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// Files a checkpoint exposes (the resume state stays private).
const DOWNLOADABLE: [&str; 2] = ["adapter_model.safetensors", "adapter_config.json"];

pub async fn checkpoint_file(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path((id, step, file)): Path<(String, i64, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    jobs::load(&state, &id, &owner).await?;
    if !DOWNLOADABLE.contains(&file.as_str()) {
        return Err(ApiError::not_found("checkpoint file", &file));
    }
    let rows = state.db.list_checkpoints(&id).await?;
    let Some(row) = rows.iter().find(|r| r.step == step) else {
        return Err(ApiError::not_found("checkpoint", &format!("{id}:{step}")));
    };
    let files: Vec<Value> = serde_json::from_str(&row.files).unwrap_or_default();
    let sha = files
        .iter()
        .find(|f| f["name"] == file.as_str())
        .and_then(|f| f["sha256"].as_str())
        .map(str::to_string);
    let path = state
        .config
        .job_dir(&id)
        .join("output")
        .join(format!("checkpoint-{step}"))
        .join(&file);
    send_file(&path, sha, &headers).await
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
    let job = jobs::load(&state, &id, &owner).await?;
    if job.status != "succeeded" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_ready",
            format!(
                "job {id} is {}; the adapter exists once it has succeeded",
                job.status
            ),
        ));
    }
    let out = state.config.job_dir(&id).join("output");
    let path = match q.file.as_deref() {
        None => out.join("adapter.tar"),
        Some(f) if DOWNLOADABLE.contains(&f) => out.join("adapter").join(f),
        Some(f) => {
            return Err(ApiError::invalid(
                "file",
                format!(
                    "unknown adapter file {f:?} (adapter_model.safetensors or adapter_config.json)"
                ),
            ))
        }
    };
    let sha = sha256_file(&path).await.ok();
    send_file(&path, sha, &headers).await
}

pub async fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn content_type(path: &std::path::Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        Some("tar") => "application/x-tar",
        _ => "application/octet-stream",
    }
}

/// Streams a file with Content-Type, Content-Length and a strong ETag (its sha256); answers
/// 304 to a matching If-None-Match.
async fn send_file(
    path: &std::path::Path,
    sha: Option<String>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(
                "file",
                &path.file_name().unwrap_or_default().to_string_lossy(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let len = file.metadata().await?.len();
    let etag = sha.map(|s| format!("\"{s}\""));
    if let (Some(tag), Some(inm)) = (&etag, headers.get(header::IF_NONE_MATCH)) {
        if inm.as_bytes() == tag.as_bytes() {
            return Ok(StatusCode::NOT_MODIFIED.into_response());
        }
    }
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(&t).ok()) {
        h.insert(header::ETAG, tag);
    }
    Ok(resp)
}
