//! `POST /v1/jobs/{id}/exports`: a succeeded job's adapter in the form a serving stack loads —
//! `merged` (a Hugging Face folder with the adapter folded in, as a tar), `gguf-f32`,
//! `gguf-f16`, `gguf-q8_0`, `gguf-q4_k` (that merged model as one llama.cpp GGUF file) or
//! `gguf-lora` (llama.cpp's LoRA file) — made by the engine's exporters and stored with the
//! job's other artifacts; `GET /v1/jobs/{id}/exports/{format}` downloads it.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::guard::Slots;
use super::{files, jobs, ApiError, Owner};
use crate::artifacts::Key;
use crate::db::{ExportRow, JobRow, RecordedExport};
use crate::job::FileDigest;
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

/// `POST /v1/jobs/{id}/exports` with `{"format": …}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    format: String,
}

/// Makes an export: the adapter checked against its recorded digests, the export written into
/// a folder of its own (so that neither a crash half-way nor a concurrent export of the same
/// format touches the file a download is reading), stored, and recorded with its digest only
/// then; the export it replaces is removed after. Bounded per key ([`Slots::exports`]) and
/// counted in the key's stored bytes.
pub async fn create(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Extension(slots): Extension<Arc<Slots>>,
    Path(id): Path<String>,
    body: Result<Json<ExportRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(ExportRequest { format }) = body
        .map_err(|e| ApiError::new(e.status(), "invalid_request", e.body_text()).param("format"))?;
    let (export, file) = parse_format(&format)?;
    let row = jobs::load(&state, &id, &owner).await?;
    let base = exportable_base(&state, &row)?;
    let quota = match state.config.max_stored_mib_per_key {
        0 => None,
        mib => Some(mib * 1024 * 1024),
    };
    if let Some(q) = quota {
        if state.db.stored_bytes(owner.as_deref()).await? >= q {
            return Err(over_quota(&state));
        }
    }
    let _slot = slots.take(owner.as_deref())?;
    let (export_id, digest) = write_and_store(&state, &row, export, base, &file).await?;
    let record = ExportRow {
        format: format.clone(),
        export_id,
        bytes: digest.bytes as i64,
        sha256: digest.sha256.clone(),
    };
    record_as_newest(&state, &row, &owner, &record, quota).await?;
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

/// Writes an export of the job's adapter (checked against its recorded digests first) into a
/// new folder of its own and stores it; returns the export's id and digest. Nothing of it is
/// left when this fails.
async fn write_and_store(
    state: &AppState,
    row: &JobRow,
    export: Export,
    base: PathBuf,
    file: &str,
) -> Result<(String, FileDigest), ApiError> {
    let adapter = state
        .stored_adapter(row, None)
        .await
        .map_err(ApiError::stored_adapter)?;
    let export_id = crate::artifacts::new_export_id();
    let key = Key::export(&row.id, &export_id, file).expect("a known export file");
    let dest = state.artifacts.local_path(&key);
    let stored = async {
        let target = dest.clone();
        tokio::task::spawn_blocking(move || write_export(export, &base, &adapter, &target))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|why| {
                tracing::warn!(job = %row.id, file, error = %why, "an export failed");
                export_failed(&why, &[(&dest, file)])
            })?;
        let digest = crate::artifacts::digest_file(&dest).await?;
        state.artifacts.save(&key).await?;
        Ok::<_, ApiError>(digest)
    }
    .await;
    match stored {
        Ok(digest) => Ok((export_id, digest)),
        Err(e) => {
            discard(state, &row.id, &export_id).await;
            Err(e)
        }
    }
}

/// Records `export` as the newest of its format and removes the export it replaces; refused
/// (and the new export removed) when it would take the key past its stored-bytes quota.
async fn record_as_newest(
    state: &AppState,
    row: &JobRow,
    owner: &Owner,
    export: &ExportRow,
    quota: Option<u64>,
) -> Result<(), ApiError> {
    let recorded = state
        .db
        .record_export(&row.id, owner.as_deref(), export, quota)
        .await;
    match recorded {
        Ok(RecordedExport::Recorded { replaced }) => {
            if let Some(old) = replaced {
                discard(state, &row.id, &old).await;
            }
            Ok(())
        }
        Ok(RecordedExport::OverQuota) => {
            discard(state, &row.id, &export.export_id).await;
            Err(over_quota(state))
        }
        Err(e) => {
            discard(state, &row.id, &export.export_id).await;
            Err(e.into())
        }
    }
}

/// Removes the files of an export no record points at (any more).
async fn discard(state: &AppState, job: &crate::job::JobId, export_id: &str) {
    let Some(folder) = Key::export_dir(job, export_id) else {
        return;
    };
    if let Err(e) = state.artifacts.delete_dir(&folder).await {
        tracing::warn!(key = folder.as_str(), error = %e, "could not remove an unrecorded export");
    }
}

fn over_quota(state: &AppState) -> ApiError {
    ApiError::quota(
        format!(
            "this key stores its {} MiB (uploads, checkpoints, exports); delete files or jobs it \
             no longer needs (a job's checkpoints and exports go with it)",
            state.config.max_stored_mib_per_key
        ),
        3600,
    )
}

/// An export the engine could not make: its reason, with the server's paths replaced by what
/// they are to the client.
fn export_failed(why: &str, paths: &[(&std::path::Path, &str)]) -> ApiError {
    let mut message = why.to_string();
    for (path, name) in paths {
        message = message.replace(&path.display().to_string(), name);
    }
    if message.contains(std::path::MAIN_SEPARATOR) {
        // a path this function was not told of: say nothing of it
        message = "the export could not be written (the server's log says why)".to_string();
    }
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "export_failed", message).param("format")
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
    let source = state.config.model_source(&spec.base_model);
    let base = PathBuf::from(&source);
    if !(base.is_dir() || source.ends_with(".gguf")) {
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
            crate::train::export::merged(base, adapter, &folder).map_err(text)?;
            crate::artifacts::write_tar_as(&folder, "merged", dest).map_err(|e| e.to_string())?;
            if let Err(e) = std::fs::remove_dir_all(&folder) {
                tracing::warn!(folder = %folder.display(), error = %e, "could not remove the merged folder after packing it");
            }
        }
    }
    Ok(())
}

/// The newest recorded export of a format, served under its recorded digest (a file that no
/// longer matches is never sent whole).
pub async fn download(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path((id, format)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, file) = parse_format(&format)?;
    let row = jobs::load(&state, &id, &owner).await?;
    files::gone_by_retention(&row)?;
    let Some(export) = state.db.get_export(&row.id, &format).await? else {
        return Err(ApiError::not_found("export", &format!("{id}/{format}")));
    };
    let key = Key::export(&row.id, &export.export_id, &file)
        .ok_or_else(|| ApiError::not_found("export", &format!("{id}/{format}")))?;
    let digest = FileDigest {
        name: file,
        bytes: export.bytes as u64,
        sha256: export.sha256,
    };
    files::serve(&state, &key, Some(digest), true, &headers).await
}

pub(super) fn routes(slots: Arc<Slots>) -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/jobs/{id}/exports", post(create))
        .route("/v1/jobs/{id}/exports/{format}", get(download))
        .layer(Extension(slots))
}
