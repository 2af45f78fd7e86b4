//! Models loaded for chat and completions. Each base model is loaded once; each fine-tuned
//! job's adapter is attached to its base as a view that shares the base's weights (only the
//! LoRA factors are its own), so many adapters sit over one resident base. Both are kept least
//! recently used within the operator's limits (`--max-loaded-bases`, `--adapter-cache-mib`).
//! Each loaded base decodes its requests in one continuous batch on a thread of its own
//! ([`batch`]; up to `--max-concurrent-generations` together, whatever adapter each uses),
//! never on the async runtime. Which base or job a request may name is the API's to decide;
//! this room loads and runs.

pub mod batch;
pub mod structured;

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};

use crate::metrics::Metrics;

use crate::spec::LoraSpec;
use crate::train::generate::{Generation, Sampling, TokenConstraint};
use crate::train::model::{self, BaseModel, Llama};
use crate::train::tokenizer::TextTokenizer;
use crate::train::{checkpoint, Error, Result};

/// A model requests run: a base, or a base with one job's adapter.
pub struct Served {
    pub base: Arc<BaseModel>,
    view: Option<Llama>,
    /// The base's decode loop (shared by the base and every adapter over it).
    batcher: Arc<batch::Batcher>,
    /// The base tokenizer's [`structured::Vocabulary`], built on the first request that needs it.
    vocabulary: Arc<OnceLock<std::result::Result<Arc<structured::Vocabulary>, String>>>,
}

impl Served {
    pub fn model(&self) -> &Llama {
        self.view.as_ref().unwrap_or(&self.base.model)
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.base.tokenizer
    }

    /// This model's tokens as bytes and its grammar compiler (built once per base: a blocking
    /// call the first time, some tens of milliseconds).
    pub fn vocabulary(&self) -> Result<Arc<structured::Vocabulary>> {
        self.vocabulary
            .get_or_init(|| {
                structured::Vocabulary::new(self.tokenizer())
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::Tokenizer)
    }

    /// `view` (made over `base`'s model by [`Llama::with_lora`]) served in `base`'s batch.
    pub(crate) fn adapter_view(base: &Arc<Served>, view: Llama) -> Arc<Served> {
        Arc::new(Served {
            base: base.base.clone(),
            view: Some(view),
            batcher: base.batcher.clone(),
            vocabulary: base.vocabulary.clone(),
        })
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
    /// Requests a base decodes together.
    max_rows: usize,
    kv: Arc<batch::KvBudget>,
    /// Requests waiting for a place in a batch, and how many may.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    metrics: Arc<Metrics>,
    /// One load at a time: two requests for a model not yet loaded load it once.
    loading: tokio::sync::Mutex<()>,
    resident: Mutex<Resident>,
}

impl Models {
    pub fn new(config: &crate::config::ServeConfig, metrics: Arc<Metrics>) -> Models {
        Models {
            max_bases: config.max_loaded_bases.max(1),
            adapter_budget: (config.adapter_cache_mib as usize) << 20,
            max_rows: config.max_concurrent_generations.max(1),
            kv: Arc::new(batch::KvBudget::new(
                (config.kv_cache_mib as usize) << 20,
                metrics.clone(),
            )),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting: config.max_waiting_generations,
            metrics,
            loading: tokio::sync::Mutex::new(()),
            resident: Mutex::new(Resident::default()),
        }
    }

    fn resident(&self) -> std::sync::MutexGuard<'_, Resident> {
        self.resident.lock().expect("no panics while holding it")
    }

    /// The base model `name` (as a job's `base_model`), loaded on first use.
    pub async fn base(&self, name: &str) -> Result<Arc<Served>> {
        // one entry per file, however its path is spelled (`dir/./x.gguf` is `dir/x.gguf`)
        let key = std::fs::canonicalize(name)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| name.to_string());
        if let Some(found) = self.find_base(&key) {
            return Ok(found);
        }
        let _one_load = self.loading.lock().await;
        if let Some(found) = self.find_base(&key) {
            return Ok(found);
        }
        let owned = name.to_string();
        let base = tokio::task::spawn_blocking(move || load_plain_base(&owned))
            .await
            .map_err(|e| Error::Model(format!("loading {name}: {e}")))??;
        let base = Arc::new(base);
        let batcher = batch::Batcher::start(base.clone(), self.max_rows, self.kv.clone());
        let served = Arc::new(Served {
            batcher: Arc::new(batcher),
            base,
            view: None,
            vocabulary: Default::default(),
        });
        let mut r = self.resident();
        r.bases.push((key, served.clone()));
        while r.bases.len() > self.max_bases {
            let (gone, _) = r.bases.remove(0);
            // adapters over a dropped base keep it alive until they are dropped too
            tracing::info!(base = %gone, "unloaded the least recently used base model");
        }
        self.metrics.bases_loaded.set(r.bases.len() as i64);
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
        self.metrics
            .adapter_requests
            .with_label_values(&["hit"])
            .inc();
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
        let served = Served::adapter_view(&base, view);
        let mut r = self.resident();
        r.adapters.push((job.to_string(), served.clone(), bytes));
        let mut total: usize = r.adapters.iter().map(|a| a.2).sum();
        // the one just loaded stays even when it alone is over the budget
        while total > self.adapter_budget && r.adapters.len() > 1 {
            let (gone, _, freed) = r.adapters.remove(0);
            total -= freed;
            tracing::info!(job.id = %gone, "unloaded the least recently used adapter");
        }
        self.metrics
            .adapter_requests
            .with_label_values(&["load"])
            .inc();
        self.metrics.adapters_loaded.set(r.adapters.len() as i64);
        Ok(served)
    }

    /// Drops the adapter loaded as `key`, if it is (requests using it finish with it).
    pub fn unload_adapter(&self, key: &str) {
        let mut r = self.resident();
        r.adapters.retain(|(k, _, _)| k != key);
        self.metrics.adapters_loaded.set(r.adapters.len() as i64);
    }

    /// The most requests a loaded base has decoded together in one step.
    pub fn largest_batch(&self) -> usize {
        let r = self.resident();
        r.bases
            .iter()
            .map(|(_, s)| s.batcher.peak_rows())
            .max()
            .unwrap_or(0)
    }

    /// Adapters loaded now and the bytes their factors take.
    pub fn adapters_loaded(&self) -> (usize, usize) {
        let r = self.resident();
        (r.adapters.len(), r.adapters.iter().map(|a| a.2).sum())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A place in the line for a request of `prompt_tokens` and at most `max_tokens` more with
    /// `served`: refused when the line is full, or when its cache alone would pass the whole
    /// budget (it could never run).
    /// `tenant` is whose request it is: a base's batch is shared fairly between tenants.
    pub fn ticket(
        &self,
        served: &Served,
        prompt_tokens: usize,
        max_tokens: usize,
        tenant: Option<&str>,
    ) -> std::result::Result<Ticket, Refusal> {
        let model = served.model();
        let positions = (prompt_tokens + max_tokens)
            .min(model.cfg.max_position_embeddings.max(prompt_tokens + 1));
        let kv_bytes = positions * model.kv_bytes_per_token();
        if kv_bytes > self.kv.total() {
            return Err(Refusal::TooLarge {
                need_mib: kv_bytes.div_ceil(1 << 20),
                budget_mib: self.kv.total() >> 20,
            });
        }
        let Some(place) = batch::Place::take(&self.waiting, self.max_waiting, &self.metrics) else {
            self.metrics.generations_rejected.inc();
            return Err(Refusal::Busy);
        };
        Ok(Ticket {
            place,
            kv_bytes,
            tenant: tenant.map(str::to_string),
        })
    }

    /// Decodes an answer to `prompt` with `served` in its base's batch, sending its text to
    /// `on_text` as it is decided (`on_text` answering `false`, or this future dropped, ends it
    /// early). An error in the model (or a panic: candle asserts on shapes) fails this request,
    /// not the server.
    pub async fn generate(
        &self,
        served: Arc<Served>,
        prompt: Vec<u32>,
        sampling: Sampling,
        constraint: Option<Box<dyn TokenConstraint>>,
        ticket: Ticket,
        on_text: batch::OnText,
    ) -> Result<Generation> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let batcher = served.batcher.clone();
        batcher.submit(batch::Request {
            served,
            prompt,
            sampling,
            constraint,
            on_text,
            done,
            place: Some(ticket.place),
            kv_bytes: ticket.kv_bytes,
            tenant: ticket.tenant,
            arrived: std::time::Instant::now(),
        });
        answer
            .await
            .map_err(|_| Error::Model("the decode loop dropped the request".into()))?
    }
}

/// A request's place in the line to a batch, and the cache memory it will reserve there.
pub struct Ticket {
    place: batch::Place,
    kv_bytes: usize,
    tenant: Option<String>,
}

/// Why a request gets no [`Ticket`].
#[derive(Debug)]
pub enum Refusal {
    /// `--max-waiting-generations` requests wait already.
    Busy,
    /// Its prompt and longest answer need more cache than the whole `--kv-cache-mib`.
    TooLarge { need_mib: usize, budget_mib: usize },
}

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
