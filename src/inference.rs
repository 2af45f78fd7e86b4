//! Models loaded for chat and completions. Each base model is loaded once; each fine-tuned
//! job's adapter is attached to its base as a view that shares the base's weights (only the
//! LoRA factors are its own), so many adapters sit over one resident base. Both are kept least
//! recently used within the operator's limits (`--max-loaded-bases`, `--adapter-cache-mib`).
//! Generations take turns from a first-come-first-served semaphore
//! (`--max-concurrent-generations`) and run on blocking threads, never on the async runtime.
//! Which base or job a request may name is the API's to decide; this room loads and runs.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::spec::LoraSpec;
use crate::train::model::{self, BaseModel, Llama};
use crate::train::tokenizer::TextTokenizer;
use crate::train::{checkpoint, Error, Result};

/// A model requests run: a base, or a base with one job's adapter.
pub struct Served {
    pub base: Arc<BaseModel>,
    view: Option<Llama>,
}

impl Served {
    pub fn model(&self) -> &Llama {
        self.view.as_ref().unwrap_or(&self.base.model)
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.base.tokenizer
    }
}

#[derive(Default)]
struct Resident {
    /// Most recently used last.
    bases: Vec<(String, Arc<Served>)>,
    /// Keyed by job id, with the bytes their LoRA factors take; most recently used last.
    adapters: Vec<(String, Arc<Served>, usize)>,
}

pub struct Models {
    max_bases: usize,
    adapter_budget: usize,
    turns: Arc<Semaphore>,
    /// One load at a time: two requests for a model not yet loaded load it once.
    loading: tokio::sync::Mutex<()>,
    resident: Mutex<Resident>,
}

impl Models {
    pub fn new(config: &crate::config::ServeConfig) -> Models {
        Models {
            max_bases: config.max_loaded_bases.max(1),
            adapter_budget: (config.adapter_cache_mib as usize) << 20,
            turns: Arc::new(Semaphore::new(config.max_concurrent_generations.max(1))),
            loading: tokio::sync::Mutex::new(()),
            resident: Mutex::new(Resident::default()),
        }
    }

    fn resident(&self) -> std::sync::MutexGuard<'_, Resident> {
        self.resident.lock().expect("no panics while holding it")
    }

    /// The base model `name` (as a job's `base_model`), loaded on first use.
    pub async fn base(&self, name: &str) -> Result<Arc<Served>> {
        if let Some(found) = self.find_base(name) {
            return Ok(found);
        }
        let _one_load = self.loading.lock().await;
        if let Some(found) = self.find_base(name) {
            return Ok(found);
        }
        let owned = name.to_string();
        let base = tokio::task::spawn_blocking(move || load_plain_base(&owned))
            .await
            .map_err(|e| Error::Model(format!("loading {name}: {e}")))??;
        let served = Arc::new(Served {
            base: Arc::new(base),
            view: None,
        });
        let mut r = self.resident();
        r.bases.push((name.to_string(), served.clone()));
        while r.bases.len() > self.max_bases {
            let (gone, _) = r.bases.remove(0);
            // adapters over a dropped base keep it alive until they are dropped too
            tracing::info!(base = %gone, "unloaded the least recently used base model");
        }
        Ok(served)
    }

    fn find_base(&self, name: &str) -> Option<Arc<Served>> {
        let mut r = self.resident();
        let at = r.bases.iter().position(|(n, _)| n == name)?;
        let entry = r.bases.remove(at);
        let found = entry.1.clone();
        r.bases.push(entry);
        Some(found)
    }

    /// A job's adapter over its base, if it is loaded.
    pub fn loaded_adapter(&self, job: &str) -> Option<Arc<Served>> {
        let mut r = self.resident();
        let at = r.adapters.iter().position(|(j, _, _)| j == job)?;
        let entry = r.adapters.remove(at);
        let found = entry.1.clone();
        r.adapters.push(entry);
        Some(found)
    }

    /// Loads the PEFT adapter in `dir` (job `job`'s) over the base `base_name`.
    pub async fn load_adapter(
        &self,
        job: &str,
        base_name: &str,
        dir: &Path,
    ) -> Result<Arc<Served>> {
        if let Some(found) = self.loaded_adapter(job) {
            return Ok(found);
        }
        let base = self.base(base_name).await?;
        let _one_load = self.loading.lock().await;
        if let Some(found) = self.loaded_adapter(job) {
            return Ok(found);
        }
        let dir = dir.to_path_buf();
        let shared = base.base.clone();
        let view = tokio::task::spawn_blocking(move || -> Result<Llama> {
            let lora: LoraSpec = checkpoint::read_lora_spec(&dir)?;
            let view = shared.model.with_lora(Some(&lora), 0)?;
            checkpoint::load_adapter(&dir, &view)?;
            Ok(view)
        })
        .await
        .map_err(|e| Error::Model(format!("loading the adapter of job {job}: {e}")))??;
        let bytes = view.lora_bytes();
        let served = Arc::new(Served {
            base: base.base.clone(),
            view: Some(view),
        });
        let mut r = self.resident();
        r.adapters.push((job.to_string(), served.clone(), bytes));
        let mut total: usize = r.adapters.iter().map(|a| a.2).sum();
        // the one just loaded stays even when it alone is over the budget
        while total > self.adapter_budget && r.adapters.len() > 1 {
            let (gone, _, freed) = r.adapters.remove(0);
            total -= freed;
            tracing::info!(job.id = %gone, "unloaded the least recently used adapter");
        }
        Ok(served)
    }

    /// Adapters loaded now and the bytes their factors take.
    pub fn adapters_loaded(&self) -> (usize, usize) {
        let r = self.resident();
        (r.adapters.len(), r.adapters.iter().map(|a| a.2).sum())
    }

    /// Runs `work` (a generation) on a blocking thread once it is its turn. A panic inside it
    /// (candle asserts on shapes) becomes this request's error, as a worker makes it a job's
    /// failure, instead of a panic in the server.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, GenerationPanicked> {
        let _turn = self
            .turns
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        tokio::task::spawn_blocking(work).await.map_err(|e| {
            tracing::error!(error = %e, "a generation panicked");
            GenerationPanicked(e.to_string())
        })
    }
}

/// A generation that panicked, with what the panic said.
#[derive(Debug, thiserror::Error)]
#[error("the generation stopped on an internal error: {0}")]
pub struct GenerationPanicked(String);

/// A base as a job names it, without LoRA factors, loaded for decoding
/// ([`model::load_for_decoding`]: a `.gguf` base stays quantized).
fn load_plain_base(name: &str) -> Result<BaseModel> {
    let loaded = model::load_for_decoding(name, &LoraSpec::default())?;
    Ok(BaseModel {
        model: loaded.model.with_lora(None, 0)?,
        tokenizer: loaded.tokenizer,
        name: loaded.name,
    })
}
