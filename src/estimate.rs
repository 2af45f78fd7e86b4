//! `POST /v1/jobs/estimate`'s answer: what a job spec would need (peak memory, by what holds
//! it) and take (seconds per step and in all, from the measured matmul rate of the workers it
//! fits), for each worker of the pool, without queueing anything. The same arithmetic decides
//! which worker may claim a job (`worker/capacity.rs`).

use serde::Serialize;

use crate::spec::JobSpec;
use crate::state::AppState;
use crate::train::cost::{self, DeviceKind, MemoryEstimate};

#[derive(Debug, Serialize)]
pub struct JobEstimate {
    pub object: &'static str,
    pub base_model: String,
    pub model: ModelShape,
    /// Tokens of one optimizer step at its longest (every row `max_seq_len` long).
    pub tokens_per_step: u64,
    pub flops_per_token: f64,
    /// The peak on the CPU (`memory_cuda` on a CUDA device): what `qtune train` would reach.
    pub memory: MemoryEstimate,
    pub memory_cuda: MemoryEstimate,
    /// Whether some worker of the pool could hold the job; null while no worker has reported.
    pub fits: Option<bool>,
    /// The workers that reported lately, with the estimate for each one's device.
    pub workers: Vec<WorkerEstimate>,
    /// `training.max_steps`, when the spec sets it (otherwise the steps depend on the data).
    pub total_steps: Option<u64>,
    /// On the fastest worker that could hold the job.
    pub seconds_per_step: Option<f64>,
    pub total_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ModelShape {
    pub model_type: &'static str,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
}

#[derive(Debug, Serialize)]
pub struct WorkerEstimate {
    pub id: String,
    pub device: String,
    pub total_bytes: i64,
    pub free_bytes: i64,
    pub peak_bytes: u64,
    /// Its device is large enough for the job.
    pub fits: bool,
    /// It has that much free now.
    pub fits_now: bool,
    pub seconds_per_step: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// The spec's base model cannot be read; the message names why.
    #[error("{0}")]
    Model(String),
    #[error(transparent)]
    Db(#[from] crate::db::Error),
}

/// Estimates `spec` (validated by `JobSpec::from_json`, base model allowed) against the pool's
/// live workers.
pub async fn estimate(state: &AppState, spec: &JobSpec) -> Result<JobEstimate, EstimateError> {
    let base = state.config.model_source(&spec.base_model);
    let revision = spec.revision.clone();
    let (cfg, stored) = tokio::task::spawn_blocking(move || {
        crate::train::model::base_shape(&base, revision.as_deref())
    })
    .await
    .map_err(|e| EstimateError::Model(format!("reading the base model: {e}")))?
    .map_err(|e| EstimateError::Model(e.to_string()))?;
    let memory = cost::estimate_memory(&cfg, spec, stored, DeviceKind::Cpu);
    let memory_cuda = cost::estimate_memory(&cfg, spec, stored, DeviceKind::Cuda);
    let seconds = |gflops: Option<f64>| gflops.map(|g| cost::seconds_per_step(&cfg, spec, g));
    let workers: Vec<WorkerEstimate> = state
        .db
        .live_workers()
        .await?
        .into_iter()
        .map(|w| {
            let peak = match DeviceKind::of(&w.device) {
                DeviceKind::Cpu => memory.peak_bytes,
                DeviceKind::Cuda => memory_cuda.peak_bytes,
            };
            WorkerEstimate {
                fits: peak <= w.total_bytes.max(0) as u64,
                fits_now: peak <= w.free_bytes.max(0) as u64,
                seconds_per_step: seconds(w.gflops),
                peak_bytes: peak,
                id: w.id,
                device: w.device,
                total_bytes: w.total_bytes,
                free_bytes: w.free_bytes,
            }
        })
        .collect();
    let fits = (!workers.is_empty()).then(|| workers.iter().any(|w| w.fits));
    let seconds_per_step = workers
        .iter()
        .filter(|w| w.fits)
        .filter_map(|w| w.seconds_per_step)
        .min_by(f64::total_cmp);
    let total_steps = spec.training.max_steps.map(|s| s.max(0) as u64);
    let t = &spec.training;
    Ok(JobEstimate {
        object: "fine_tuning.job.estimate",
        base_model: spec.base_model.clone(),
        model: ModelShape {
            model_type: cfg.arch.as_str(),
            layers: cfg.num_hidden_layers,
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
        },
        tokens_per_step: (t.batch_size.max(1)
            * t.gradient_accumulation_steps.max(1)
            * t.max_seq_len.max(1)) as u64,
        flops_per_token: cost::flops_per_token(
            &cfg,
            t.max_seq_len.max(1) as usize,
            &spec.lora.target_modules,
            spec.lora.r as usize,
        ),
        memory,
        memory_cuda,
        fits,
        workers,
        total_steps,
        seconds_per_step,
        total_seconds: seconds_per_step.zip(total_steps).map(|(s, n)| s * n as f64),
    })
}
