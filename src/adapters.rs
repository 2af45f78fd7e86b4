//! Adapters brought from outside: a PEFT adapter (its `adapter_config.json` and
//! `adapter_model.safetensors`, as `save_pretrained` writes them) checked against its base (the
//! settings it uses, the modules it targets, every tensor's name and shape, by loading it over
//! the base), stored under `adapters/{id}/`, recorded under its owner's name, and served by that
//! name like a fine-tune, in the same batches.

use std::path::Path;
use std::sync::Arc;

use crate::artifacts::{new_adapter_id, Key};
use crate::db::adapters::RecordedAdapter;
use crate::db::AdapterRow;
use crate::inference::Served;
use crate::state::AppState;
use crate::train::checkpoint::{self, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

/// Why an adapter cannot be added, used or removed.
#[derive(Debug)]
pub(crate) enum AdapterError {
    /// The request's `param` is wrong, as `message` says.
    Invalid {
        param: &'static str,
        message: String,
    },
    NameTaken(String),
    OverQuota {
        quota_mib: u64,
    },
    NotFound(String),
    /// The store or the database failed (the log says how).
    Failed(String),
}

impl From<crate::db::Error> for AdapterError {
    fn from(e: crate::db::Error) -> AdapterError {
        AdapterError::Failed(e.to_string())
    }
}

impl From<std::io::Error> for AdapterError {
    fn from(e: std::io::Error) -> AdapterError {
        AdapterError::Failed(e.to_string())
    }
}

/// A model name ([`crate::config::is_model_name`]) that is not a job id either.
pub(crate) fn check_name(name: &str) -> Result<(), AdapterError> {
    let ok = crate::config::is_model_name(name) && crate::job::JobId::parse(name).is_none();
    if ok {
        Ok(())
    } else {
        Err(AdapterError::Invalid {
            param: "name",
            message: "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit \
                      (and not a job id)"
                .into(),
        })
    }
}

/// The key its loaded view goes by among the resident models.
fn served_key(id: &str) -> String {
    format!("adapter:{id}")
}

fn stored_dir(row_id: &str) -> Result<Key, AdapterError> {
    Key::outside_adapter_dir(row_id)
        .ok_or_else(|| AdapterError::Failed(format!("{row_id:?} is not an adapter id")))
}

/// Adds the PEFT adapter in the local folder `files` as `owner`'s `name` over `base_model`:
/// checked, loaded (so the first request finds it resident), stored and recorded.
pub(crate) async fn add(
    state: &AppState,
    owner: Option<&str>,
    name: &str,
    base_model: &str,
    files: &Path,
) -> Result<AdapterRow, AdapterError> {
    check_name(name)?;
    crate::model_access::check_base_model(&state.config, base_model).map_err(|why| {
        AdapterError::Invalid {
            param: "base_model",
            message: why.into(),
        }
    })?;
    let dir = files.to_path_buf();
    tokio::task::spawn_blocking(move || checkpoint::read_outside_lora_spec(&dir))
        .await
        .map_err(|e| AdapterError::Failed(e.to_string()))?
        .map_err(|e| AdapterError::Invalid {
            param: "adapter_config",
            message: e.to_string(),
        })?;
    let id = new_adapter_id();
    let key = stored_dir(&id)?;
    let local = state.artifacts.local_path(&key);
    let (bytes, sha256) = match copy_in(files, &local).await {
        Ok(copied) => copied,
        Err(e) => {
            state.artifacts.delete_dir(&key).await.ok();
            return Err(e);
        }
    };
    let recorded = async {
        state
            .models
            .load_adapter(
                &served_key(&id),
                &state.config.model_source(base_model),
                &local,
            )
            .await
            .map_err(|e| AdapterError::Invalid {
                param: "adapter_model",
                message: format!("does not fit {base_model}: {e}"),
            })?;
        state.artifacts.save_dir(&key).await?;
        let row = AdapterRow {
            id: id.clone(),
            owner: owner.map(str::to_string),
            name: name.to_string(),
            base_model: base_model.to_string(),
            bytes: bytes as i64,
            sha256,
            created_at: crate::db::now(),
        };
        record(state, row).await
    }
    .await;
    if recorded.is_err() {
        // nothing of a refused adapter stays: its view, its files
        state.models.unload_adapter(&served_key(&id));
        state.artifacts.delete_dir(&key).await?;
    }
    let row = recorded?;
    tracing::info!(adapter = %row.id, name, base_model, bytes, "adapter added");
    Ok(row)
}

/// Records `row` within its owner's stored-bytes quota, under a name of its own.
async fn record(state: &AppState, row: AdapterRow) -> Result<AdapterRow, AdapterError> {
    let quota_mib = state.config.max_stored_mib_per_key;
    let quota = (quota_mib > 0).then_some(quota_mib << 20);
    match state.db.insert_adapter(&row, quota).await? {
        RecordedAdapter::Recorded => Ok(row),
        RecordedAdapter::NameTaken => Err(AdapterError::NameTaken(row.name)),
        RecordedAdapter::OverQuota => Err(AdapterError::OverQuota { quota_mib }),
    }
}

/// Copies the adapter's two files from `files` into `local`; their bytes in all and the
/// weights' sha256.
async fn copy_in(files: &Path, local: &Path) -> Result<(u64, String), AdapterError> {
    tokio::fs::create_dir_all(local).await?;
    let mut bytes = 0;
    for file in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        bytes += tokio::fs::copy(files.join(file), local.join(file)).await?;
    }
    let weights = crate::artifacts::digest_file(&local.join(ADAPTER_WEIGHTS)).await?;
    Ok((bytes, weights.sha256))
}

/// `path`, a folder of the server's that `POST /v1/load_lora_adapter` names, if the operator
/// allows reading it (`--allow-model-dirs`).
pub(crate) fn allowed_folder(
    config: &crate::config::ServeConfig,
    path: &str,
) -> Result<std::path::PathBuf, AdapterError> {
    crate::model_access::allowed_folder(config, path).map_err(|why| AdapterError::Invalid {
        param: "lora_path",
        message: why.into(),
    })
}

/// The base an adapter folder's config names (PEFT's `base_model_name_or_path`).
pub(crate) async fn recorded_base(dir: &Path) -> Result<String, AdapterError> {
    let missing = || AdapterError::Invalid {
        param: "base_model",
        message: format!("{ADAPTER_CONFIG} names no base_model_name_or_path: give base_model"),
    };
    let text = tokio::fs::read_to_string(dir.join(ADAPTER_CONFIG))
        .await
        .map_err(|_| AdapterError::Invalid {
            param: "lora_path",
            message: format!("the folder has no readable {ADAPTER_CONFIG}"),
        })?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| AdapterError::Invalid {
            param: "lora_path",
            message: format!("{ADAPTER_CONFIG} is not JSON: {e}"),
        })?;
    cfg["base_model_name_or_path"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(missing)
}

/// `owner`'s adapter `name`, loaded over its base.
pub(crate) async fn served(
    state: &AppState,
    row: &AdapterRow,
) -> Result<Arc<Served>, AdapterError> {
    let key = served_key(&row.id);
    if let Some(found) = state.models.loaded_adapter(&key) {
        return Ok(found);
    }
    let dir = stored_dir(&row.id)?;
    if !state.artifacts.load_dir(&dir).await? {
        return Err(AdapterError::Failed(format!(
            "the files of adapter {} are missing from the store",
            row.id
        )));
    }
    let local = state.artifacts.local_path(&dir);
    state
        .models
        .load_adapter(&key, &state.config.model_source(&row.base_model), &local)
        .await
        .map_err(|e| AdapterError::Failed(e.to_string()))
}

/// Removes `owner`'s adapter `name`: its record, its view, its files.
pub(crate) async fn remove(
    state: &AppState,
    owner: Option<&str>,
    name: &str,
) -> Result<AdapterRow, AdapterError> {
    let row = state
        .db
        .delete_adapter(owner, name)
        .await?
        .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
    state.models.unload_adapter(&served_key(&row.id));
    state.artifacts.delete_dir(&stored_dir(&row.id)?).await?;
    tracing::info!(adapter = %row.id, name, "adapter removed");
    Ok(row)
}
