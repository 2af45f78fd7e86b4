//! A worker's device as the pool sees it: its memory (capped by `--worker-memory-mib`), its
//! measured matmul rate, reported to the `workers` table while the worker runs; and the check
//! a claimed job passes before anything is fetched: its estimated peak against this device's
//! free memory and against the largest device in the pool.

use std::time::Duration;

use candle_core::Device;

use crate::db::Lease;
use crate::spec::JobSpec;
use crate::state::AppState;
use crate::train::cost::{self, DeviceKind, MemoryEstimate};
use crate::train::device::DeviceMemory;

/// How often a worker reports its device, training or not (well inside
/// [`crate::db::WORKER_SEEN_SECS`]).
pub const REPORT_EVERY: Duration = Duration::from_secs(15);

pub struct WorkerDevice {
    pub id: String,
    pub name: String,
    pub device: Device,
    /// The operator's cap on what jobs here may plan for (`--worker-memory-mib`).
    cap_bytes: Option<u64>,
    /// The measured float32 matmul rate, once [`keep_reporting`] has measured it.
    gflops: std::sync::OnceLock<f64>,
}

impl WorkerDevice {
    pub fn new(id: String, name: String, device: Device, cap_bytes: Option<u64>) -> WorkerDevice {
        WorkerDevice {
            id,
            name,
            device,
            cap_bytes,
            gflops: std::sync::OnceLock::new(),
        }
    }

    /// The device's memory, within the operator's cap.
    pub fn memory(&self) -> Option<DeviceMemory> {
        let m = match crate::train::device::memory(&self.device) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the device's memory");
                return self.cap_bytes.map(|c| DeviceMemory { total: c, free: c });
            }
        };
        Some(match self.cap_bytes {
            Some(cap) => DeviceMemory {
                total: m.total.min(cap),
                free: m.free.min(cap),
            },
            None => m,
        })
    }

    pub async fn report(&self, state: &AppState) {
        if let Err(e) = state.db.forget_silent_workers().await {
            tracing::warn!(error = %e, "could not remove silent workers' rows");
        }
        let Some(m) = self.memory() else { return };
        if let Err(e) = state
            .db
            .report_worker(
                &self.id,
                &self.name,
                m.total,
                m.free,
                self.gflops.get().copied(),
            )
            .await
        {
            tracing::warn!(error = %e, "could not report the worker's device");
        }
    }

    fn kind(&self) -> DeviceKind {
        DeviceKind::of(&self.name)
    }
}

/// Measures `worker`'s matmul rate, then reports it every [`REPORT_EVERY`] until the server
/// shuts down, and removes its row. (Measured here, beside the claim loop, so that a worker is
/// up at once; a short measurement: a few products of SmolLM2's MLP shape. A failure leaves the
/// rate unknown and time estimates empty.)
pub async fn keep_reporting(state: AppState, worker: std::sync::Arc<WorkerDevice>) {
    // in the pool at once (its memory is what claims need); the rate follows
    worker.report(&state).await;
    let measuring = worker.clone();
    if let Ok(Ok(gflops)) =
        tokio::task::spawn_blocking(move || cost::measure_matmul_gflops(&measuring.device, 5)).await
    {
        let _first = worker.gflops.set(gflops);
    }
    loop {
        worker.report(&state).await;
        tokio::select! {
            _ = tokio::time::sleep(REPORT_EVERY) => {}
            _ = state.shutdown.cancelled() => break,
        }
    }
    if let Err(e) = state.db.remove_worker(&worker.id).await {
        tracing::warn!(error = %e, "could not remove the worker's row");
    }
}

/// Why a claimed job does not go on here.
pub enum Misfit {
    /// Another attempt holds the job.
    LeaseLost,
    /// This worker's free memory is short, but some device in the pool is large enough: back to
    /// the queue, saying so.
    Waiting(String),
    /// No device in the pool could ever hold it: the job fails with this message.
    NeverFits(String),
}

/// What a claimed job does next, by its estimated peak memory: go on; wait in the queue for a
/// worker with room; or fail, naming the estimate, when no device in the pool could ever hold
/// it. A job whose model cannot be read goes on: the engine reports that error as it does for
/// any job.
pub async fn check_fit(
    state: &AppState,
    worker: &WorkerDevice,
    lease: &Lease,
    spec: &JobSpec,
) -> Result<(), Misfit> {
    let (spec, kind) = (spec.clone(), worker.kind());
    let estimated = tokio::task::spawn_blocking(move || {
        let (cfg, stored) =
            crate::train::model::base_shape(&spec.base_model, spec.revision.as_deref())?;
        Ok::<_, crate::train::Error>(cost::estimate_memory(&cfg, &spec, stored, kind))
    })
    .await;
    let estimate = match estimated {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "no memory estimate; the engine will say what is wrong");
            return Ok(());
        }
        Err(e) => {
            tracing::warn!(error = %e, "the memory estimate panicked");
            return Ok(());
        }
    };
    if let Err(e) = state.db.set_job_memory(lease, estimate.peak_bytes).await {
        return match e {
            crate::db::Error::LeaseLost { .. } => Err(Misfit::LeaseLost),
            e => {
                tracing::warn!(error = %e, "could not record the job's memory estimate");
                Ok(())
            }
        };
    }
    let Some(mem) = worker.memory() else {
        return Ok(());
    };
    if estimate.peak_bytes <= mem.free {
        return Ok(());
    }
    let largest = match state.db.live_workers().await {
        Ok(workers) => workers
            .iter()
            .map(|w| w.total_bytes.max(0) as u64)
            .chain([mem.total])
            .max()
            .unwrap_or(mem.total),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the pool's workers");
            mem.total
        }
    };
    if estimate.peak_bytes > largest {
        return Err(Misfit::NeverFits(format!(
            "the job needs about {} at its peak ({}), more than any device in the pool has \
             (the largest: {}); lower training.batch_size or training.max_seq_len, turn on \
             training.gradient_checkpointing or quantize the base (quantization)",
            gib(estimate.peak_bytes),
            breakdown(&estimate),
            gib(largest)
        )));
    }
    Err(Misfit::Waiting(format!(
        "needs about {} at its peak; this worker ({}) has {} free: left in the queue for a \
         worker with room",
        gib(estimate.peak_bytes),
        worker.name,
        gib(mem.free)
    )))
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn breakdown(e: &MemoryEstimate) -> String {
    format!(
        "weights {}, adapter and optimizer {}, activations {}, workspace {}, runtime {}",
        gib(e.weights_bytes),
        gib(e.adapter_bytes),
        gib(e.activations_bytes),
        gib(e.workspace_bytes),
        gib(e.runtime_bytes)
    )
}
