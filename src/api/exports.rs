//! `POST /v1/jobs/{id}/exports`: a succeeded job's adapter in the form a serving stack loads —
//! `merged` (a Hugging Face folder with the adapter folded in, as a tar), `gguf-f32`,
//! `gguf-f16`, `gguf-q8_0`, `gguf-q4_k` (that merged model as one llama.cpp GGUF file) or
//! `gguf-lora` (llama.cpp's LoRA file) — made by the engine's exporters and stored with the
//! job's other artifacts; `GET /v1/jobs/{id}/exports/{format}` downloads it.

use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::{files, jobs, ApiError, Owner};
use crate::artifacts::Key;
use crate::db::JobRow;
use crate::job::JobStatus;
use crate::state::AppState;
use crate::train::export::GgufType;

/// What each format is made as.
enum Export {
    Merged,
    GgufLora,
    Gguf(GgufType),
}

const FORMATS: &str = "merged, gguf-f32, gguf-f16, gguf-q8_0, gguf-q4_k or gguf-lora";

/// A format's export and its stored file.
fn parse_format(format: &str) -> Result<(Export, String), ApiError> {
    let unknown = || {
        ApiError::invalid(
            "format",
            format!("unknown export format {format:?} ({FORMATS})"),
        )
    };
    let export = match format {
        "merged" => Export::Merged,
        "gguf-lora" => Export::GgufLora,
        _ => Export::Gguf(
            format
                .strip_prefix("gguf-")
                .and_then(GgufType::parse)
                .ok_or_else(unknown)?,
        ),
    };
    let file = match &export {
        Export::Merged => "merged.tar".to_string(),
        Export::GgufLora => "adapter.gguf".to_string(),
        Export::Gguf(ty) => format!("model-{}.gguf", ty.name()),
    };
    Ok((export, file))
}

pub async fn create(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    body: Json<Value>,
) -> Result<Response, ApiError> {
    let format = body
        .get("format")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("format", format!("missing: {FORMATS}")))?
        .to_string();
    let (export, file) = parse_format(&format)?;
    let row = jobs::load(&state, &id, &owner).await?;
    let base = exportable_base(&state, &row)?;
    let adapter = state.artifacts.init_adapter_dir(&row.id, None).await?;
    let key = Key::export(&row.id, &file).expect("a known export file");
    let dest = state.artifacts.local_path(&key);
    tokio::task::spawn_blocking(move || write_export(export, &base, &adapter, &dest))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "export_failed",
                e.to_string(),
            )
        })?
        .map_err(|why| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "export_failed", why).param("format")
        })?;
    state.artifacts.save(&key).await?;
    let digest = state.artifacts.digest(&key).await?;
    let made = json!({
        "object": "export",
        "job_id": id,
        "format": format,
        "file": file,
        "bytes": digest.bytes,
        "sha256": digest.sha256,
        "url": format!("/v1/jobs/{id}/exports/{format}"),
    });
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

/// The base a succeeded job's exports are made from: stored on this server and still allowed.
fn exportable_base(state: &AppState, row: &JobRow) -> Result<PathBuf, ApiError> {
    if row.status != JobStatus::Succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_ready",
            format!(
                "job {} is {}; exports exist once it has succeeded",
                row.id, row.status
            ),
        ));
    }
    files::gone_by_retention(row)?;
    let spec = &row.spec;
    // the operator's lists may have changed since the job ran
    crate::model_access::check_base_model(&state.config, &spec.base_model)
        .map_err(|m| ApiError::invalid("base_model", m))?;
    let base = PathBuf::from(&spec.base_model);
    if !(base.is_dir() || spec.base_model.ends_with(".gguf")) {
        return Err(ApiError::invalid(
            "format",
            format!(
                "{:?} is a Hub id; exports are made from a base stored on this server (a folder \
                 or .gguf under --allow-model-dirs)",
                spec.base_model
            ),
        ));
    }
    Ok(base)
}

/// Writes one export of `adapter` over `base` to `dest` (on a blocking thread: the engine's
/// exports read and write whole models).
fn write_export(
    export: Export,
    base: &std::path::Path,
    adapter: &std::path::Path,
    dest: &std::path::Path,
) -> Result<(), String> {
    let text = |e: crate::train::Error| e.to_string();
    std::fs::create_dir_all(dest.parent().expect("a job folder")).map_err(|e| e.to_string())?;
    match export {
        Export::GgufLora => {
            let cfg = crate::train::model::base_config(base).map_err(text)?;
            crate::train::export::gguf_lora(adapter, &cfg, dest).map_err(text)?;
        }
        Export::Gguf(ty) => {
            crate::train::export::gguf_model(base, adapter, ty, dest).map_err(text)?;
        }
        Export::Merged => {
            let folder = dest.with_extension("folder");
            // a folder left by an export that died half-way is replaced whole
            std::fs::remove_dir_all(&folder).ok();
            crate::train::export::merged(base, adapter, &folder).map_err(text)?;
            crate::artifacts::write_tar_as(&folder, "merged", dest).map_err(|e| e.to_string())?;
            if let Err(e) = std::fs::remove_dir_all(&folder) {
                tracing::warn!(folder = %folder.display(), error = %e, "could not remove the merged folder after packing it");
            }
        }
    }
    Ok(())
}

pub async fn download(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path((id, format)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, file) = parse_format(&format)?;
    let row = jobs::load(&state, &id, &owner).await?;
    files::gone_by_retention(&row)?;
    let job = jobs::parse_id(&id)?;
    let key = Key::export(&job, &file).expect("a known export file");
    if state.artifacts.size(&key).await?.is_none() {
        return Err(ApiError::not_found("export", &format!("{id}/{format}")));
    }
    let digest = state.artifacts.digest(&key).await.ok();
    files::serve(&state, &key, digest, false, &headers).await
}

pub(super) fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/jobs/{id}/exports", post(create))
        .route("/v1/jobs/{id}/exports/{format}", get(download))
}
