//! Models by Hub repo id, through `hf-hub` and its cache (`HF_HOME`; `HF_HUB_OFFLINE=1`).

use std::path::PathBuf;

use crate::train::error::{Area, Error, Result};
use hf_hub::{Cache, Repo, RepoType};

const FILES: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];

/// The snapshot folder holding `config.json` of `repo_id` (from the cache, or that one file
/// downloaded).
pub fn fetch_config(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let revision = revision.unwrap_or("main").to_string();
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.clone());
    let cache = Cache::from_env();
    let config = match cache.repo(repo.clone()).get("config.json") {
        Some(cached) => cached,
        None if offline() => {
            return Err(Error::Model(format!(
                "HF_HUB_OFFLINE=1 and {repo_id} (revision {revision}) is not in the Hugging Face cache at {}",
                cache.path().display()
            )))
        }
        None => hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| Error::caused(Area::Model, "Hugging Face Hub client", e))?
            .repo(repo)
            .get("config.json")
            .map_err(|e| {
                Error::Model(format!(
                    "could not download config.json of {repo_id} (revision {revision}) from the Hub: {e}"
                ))
            })?,
    };
    Ok(config
        .parent()
        .expect("a cached file lives in a snapshot folder")
        .to_path_buf())
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false)
}

pub fn fetch(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let revision = revision.unwrap_or("main").to_string();
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.clone());
    let cache = Cache::from_env();
    let config = if offline() {
        let cached = cache.repo(repo.clone());
        let config = cached.get("config.json").ok_or_else(|| {
            Error::Model(format!(
                "HF_HUB_OFFLINE=1 and {repo_id} (revision {revision}) is not in the Hugging Face cache at {}",
                cache.path().display()
            ))
        })?;
        if cached.get("tokenizer.json").is_none() {
            return Err(Error::Model(format!(
                "HF_HUB_OFFLINE=1 and tokenizer.json of {repo_id} is not in the cache at {}",
                cache.path().display()
            )));
        }
        config
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| Error::caused(Area::Model, "Hugging Face Hub client", e))?;
        let r = api.repo(repo);
        let get = |f: &str| {
            r.get(f).map_err(|e| {
                Error::Model(format!(
                    "could not download {f} of {repo_id} (revision {revision}) from the Hub: {e}; \
                     set HF_HUB_OFFLINE=1 to use the cache at {}",
                    cache.path().display()
                ))
            })
        };
        let config = get(FILES[0])?;
        get(FILES[1])?;
        // optional files: a repo without them is fine, but a failed fetch is worth a line
        for optional in [FILES[2], "chat_template.jinja"] {
            if let Err(e) = r.get(optional) {
                tracing::debug!(file = optional, repo = %repo_id, error = %e, "optional Hub file not fetched");
            }
        }
        if r.get("model.safetensors").is_err() {
            let index = get("model.safetensors.index.json")?;
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::caused(Area::Model, index.display().to_string(), e))?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                get(&s)?;
            }
        }
        config
    };
    Ok(config
        .parent()
        .expect("a cached file lives in a snapshot folder")
        .to_path_buf())
}
