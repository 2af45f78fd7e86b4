//! Adapters brought from outside ([`crate::adapters`]): `POST /v1/adapters` (a multipart form:
//! `name`, `base_model`, and the adapter as its two files, `adapter_config` and
//! `adapter_model`, or as one tar of them, `adapter`), `GET /v1/adapters`,
//! `DELETE /v1/adapters/{name}`; vLLM's `POST /v1/load_lora_adapter` (`lora_name`, `lora_path`:
//! a folder under the server's `--allow-model-dirs`) and `POST /v1/unload_lora_adapter`; and
//! OpenAI's `DELETE /v1/models/{model}`, for an adapter's name or a fine-tuned model.

use std::path::{Path, PathBuf};

use axum::extract::{FromRequest, Multipart, Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::{ApiError, Owner};
use crate::adapters::AdapterError;
use crate::db::AdapterRow;
use crate::state::AppState;
use crate::train::checkpoint::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> ApiError {
        match e {
            AdapterError::Invalid { param, message } => ApiError::bad(param, message),
            AdapterError::NameTaken(name) => ApiError::new(
                StatusCode::CONFLICT,
                "name_taken",
                format!("an adapter named {name:?} exists already: remove it first"),
            )
            .param("name"),
            AdapterError::OverQuota { quota_mib } => ApiError::quota(
                format!("the key's stored bytes would pass its {quota_mib} MiB"),
                3600,
            ),
            AdapterError::NotFound(name) => ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("no adapter named {name:?}"),
            )
            .param("name"),
            AdapterError::Failed(why) => {
                tracing::error!(error = %why, "an adapter could not be stored or loaded");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the adapter could not be stored or loaded (the server's log says why)",
                )
            }
        }
    }
}

fn view(row: &AdapterRow) -> Value {
    json!({"id": row.name, "object": "adapter", "adapter_id": row.id, "base_model": row.base_model,
           "bytes": row.bytes, "sha256": row.sha256,
           "created_at": crate::job::unix_seconds(&row.created_at)})
}

/// A scratch folder for a form's files, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// `POST /v1/adapters`.
pub async fn create(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    req: Request,
) -> Result<Response, ApiError> {
    let scratch = Scratch(
        state
            .config
            .data_dir
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string()),
    );
    tokio::fs::create_dir_all(&scratch.0).await?;
    let form = Multipart::from_request(req, &state)
        .await
        .map_err(|e| ApiError::new(e.status(), "invalid_body", e.body_text()))?;
    let (name, base_model) = read_form(form, &scratch.0).await?;
    let row =
        crate::adapters::add(&state, owner.as_deref(), &name, &base_model, &scratch.0).await?;
    Ok((StatusCode::CREATED, Json(view(&row))).into_response())
}

/// The form's `name` and `base_model`; its files written into `dir` under their PEFT names.
async fn read_form(mut form: Multipart, dir: &Path) -> Result<(String, String), ApiError> {
    let (mut name, mut base) = (None, None);
    while let Some(mut field) = form.next_field().await? {
        let file = match field.name() {
            Some("name") => {
                name = Some(super::files::small_field(field).await?);
                continue;
            }
            Some("base_model") => {
                base = Some(super::files::small_field(field).await?);
                continue;
            }
            Some("adapter_config") => ADAPTER_CONFIG,
            Some("adapter_model") => ADAPTER_WEIGHTS,
            Some("adapter") => "adapter.tar",
            other => {
                return Err(ApiError::bad(
                    other.unwrap_or("form"),
                    "unknown field: name, base_model, adapter_config, adapter_model or adapter",
                ))
            }
        };
        let mut out = tokio::fs::File::create(dir.join(file)).await?;
        while let Some(chunk) = field.chunk().await? {
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await?;
        }
        // tokio's file finishes its last write on another thread: without this, what reads
        // the file next (the tar's unpacking, the copy into the store) can find it short
        tokio::io::AsyncWriteExt::flush(&mut out).await?;
    }
    if dir.join("adapter.tar").exists() {
        let tar = dir.to_path_buf();
        tokio::task::spawn_blocking(move || unpack(&tar))
            .await
            .map_err(|e| ApiError::bad("adapter", e.to_string()))??;
    }
    for (file, param) in [
        (ADAPTER_CONFIG, "adapter_config"),
        (ADAPTER_WEIGHTS, "adapter_model"),
    ] {
        if !dir.join(file).exists() {
            return Err(ApiError::bad(
                param,
                format!("missing: the adapter's {file}"),
            ));
        }
    }
    let missing = |p: &str| ApiError::bad(p, "missing");
    Ok((
        name.ok_or_else(|| missing("name"))?,
        base.ok_or_else(|| missing("base_model"))?,
    ))
}

/// Takes `adapter_config.json` and `adapter_model.safetensors` out of `dir/adapter.tar`
/// (anywhere in it, as `save_pretrained` into a folder then `tar` makes them); nothing else in
/// it is written anywhere.
fn unpack(dir: &Path) -> Result<(), ApiError> {
    let bad = |e: std::io::Error| ApiError::bad("adapter", format!("not a tar archive: {e}"));
    let file = std::fs::File::open(dir.join("adapter.tar"))?;
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        if [ADAPTER_CONFIG, ADAPTER_WEIGHTS].contains(&file)
            && entry.header().entry_type().is_file()
        {
            let mut out = std::fs::File::create(dir.join(file))?;
            std::io::copy(&mut entry, &mut out)?;
        }
    }
    Ok(())
}

/// `GET /v1/adapters`: the caller's adapters, newest first.
pub async fn list(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
) -> Result<Json<Value>, ApiError> {
    let rows = state.db.list_adapters(owner.as_deref(), 1000).await?;
    let data: Vec<Value> = rows.iter().map(view).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `DELETE /v1/adapters/{name}`.
pub async fn delete(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    crate::adapters::remove(&state, owner.as_deref(), &name).await?;
    Ok(Json(
        json!({"id": name, "object": "adapter", "deleted": true}),
    ))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadLora {
    lora_name: String,
    lora_path: String,
    /// qtune's: the base the adapter goes over (default: the config's `base_model_name_or_path`).
    base_model: Option<String>,
    /// vLLM's; loading is done at once here.
    #[allow(dead_code)]
    load_inplace: Option<bool>,
}

/// `POST /v1/load_lora_adapter` (vLLM's): adds the adapter in a folder of the server's.
pub async fn load_lora(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    body: Result<Json<LoadLora>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad("body", e.body_text()))?;
    let dir = crate::adapters::allowed_folder(&state.config, &req.lora_path)?;
    let base = match req.base_model {
        Some(b) => b,
        None => crate::adapters::recorded_base(&dir).await?,
    };
    crate::adapters::add(&state, owner.as_deref(), &req.lora_name, &base, &dir).await?;
    let said = format!(
        "Success: LoRA adapter '{}' added successfully.",
        req.lora_name
    );
    Ok((StatusCode::OK, said).into_response())
}

#[derive(serde::Deserialize)]
pub struct UnloadLora {
    lora_name: String,
}

/// `POST /v1/unload_lora_adapter` (vLLM's).
pub async fn unload_lora(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    body: Result<Json<UnloadLora>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad("body", e.body_text()))?;
    crate::adapters::remove(&state, owner.as_deref(), &req.lora_name).await?;
    let said = format!(
        "Success: LoRA adapter '{}' removed successfully.",
        req.lora_name
    );
    Ok((StatusCode::OK, said).into_response())
}

/// `DELETE /v1/models/{model}` (OpenAI's): an adapter's name removes the adapter; a fine-tuned
/// model (`ft:…`, or its job's id) deletes its job with the job's files, as
/// `DELETE /v1/jobs/{id}` does.
pub async fn delete_model(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    UrlPath(model): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let job = super::openai::parse_fine_tuned_model(&model)
        .filter(|c| c.step.is_none())
        .map(|c| c.job)
        .or_else(|| crate::job::JobId::parse(&model));
    match job {
        Some(job) => crate::queue::delete(&state, &job, owner.as_deref()).await?,
        None => {
            crate::adapters::remove(&state, owner.as_deref(), &model).await?;
        }
    }
    Ok(Json(
        json!({"id": model, "object": "model", "deleted": true}),
    ))
}

pub(super) fn routes(
    uploads: std::sync::Arc<super::guard::Slots>,
    upload_limit: usize,
) -> axum::Router<AppState> {
    use axum::routing::{delete as delete_route, post};
    axum::Router::new()
        .route(
            "/v1/adapters",
            post(create)
                .get(list)
                .route_layer(axum::middleware::from_fn_with_state(
                    uploads,
                    super::guard::bound_uploads,
                ))
                .route_layer(axum::extract::DefaultBodyLimit::max(upload_limit)),
        )
        .route("/v1/adapters/{name}", delete_route(delete))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .route("/v1/models/{model}", delete_route(delete_model))
}
