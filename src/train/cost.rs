//! What a job costs before it runs: its peak memory on a device, from the model's shape and the
//! spec alone, and its matmul work per token (for a time estimate from a device's measured
//! rate). Workers use the memory figure to claim only what fits them; `POST /v1/jobs/estimate`
//! shows both.
//!
//! The peak is the larger of loading's (the weights, and the largest tensor as read from the
//! file) and the training step's, with every row of a micro-batch `max_seq_len` tokens long (the
//! longest a step can be): the frozen base as loaded, the LoRA factors with their gradients and
//! AdamW's moments, what backward keeps of each layer, and the step's transient buffers (a chunk
//! of logits, a dequantized weight), plus the process itself. The activation terms count the
//! buffers the CPU's fused layer keeps (`model/layer.rs`: `Saved`); the composite graph (other
//! devices, and families without the fused layer) is taken to keep twice as much. Checked
//! against measured peaks on the CPU's fused path (`tests/it/capacity.rs`, within 25 %); the
//! composite path's factor and the CUDA figure are the same arithmetic, not yet measured.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::model::{ModelConfig, Proj};
use crate::spec::{ComputeDtype, JobSpec, QuantType};

/// Peak memory of a training job, in bytes, by what holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// The frozen base as loaded: linear weights (dense or quantized), embeddings and norms.
    pub weights_bytes: u64,
    /// LoRA factors, their gradients and AdamW's two moments (all float32).
    pub adapter_bytes: u64,
    /// What the forward pass keeps for backward, all layers, one full micro-batch.
    pub activations_bytes: u64,
    /// Transient buffers of a step: a chunk of logits and its softmax, the hidden states'
    /// gradients, a dequantized weight (and, under checkpointing, one layer recomputed).
    pub workspace_bytes: u64,
    /// The process itself (code, tokenizer, data) or a CUDA context.
    pub runtime_bytes: u64,
    /// During training: the sum of the above.
    pub training_bytes: u64,
    /// While the base loads: the runtime, the weights, and the largest tensor as read from
    /// the file before it is converted.
    pub loading_bytes: u64,
    /// The larger of the two.
    pub peak_bytes: u64,
}

/// How the device runs the decoder layers: the CPU's fused layer, or candle's composite graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn of(name: &str) -> DeviceKind {
        if name.starts_with("cuda") {
            DeviceKind::Cuda
        } else {
            DeviceKind::Cpu
        }
    }
}

/// What the stored base is, when it matters for its size: the linear weights' bytes in a GGUF
/// file that a `{"type": "gguf"}` job keeps in their own types.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoredBase {
    pub gguf_linear_bytes: Option<u64>,
}

const F32: u64 = 4;
/// Rows of logits computed at once by the chunked loss (`ops::lm_head_cross_entropy`).
const LOGIT_ROWS: u64 = 128;
/// The process without a model: code, oneDNN, tokenizer, dataset and allocator slack (`qtune
/// train` on a two-layer model of hidden size 32 peaks at 25 MiB).
const CPU_RUNTIME_BYTES: u64 = 32 << 20;
/// A CUDA context and candle's kernels on the device.
const CUDA_RUNTIME_BYTES: u64 = 600 << 20;

/// The peak memory `spec` needs on `device` for a model of shape `cfg`.
pub fn estimate_memory(
    cfg: &ModelConfig,
    spec: &JobSpec,
    stored: StoredBase,
    device: DeviceKind,
) -> MemoryEstimate {
    let (h, i, v) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.vocab_size as u64,
    );
    let layers = cfg.num_hidden_layers as u64;
    let (nh, nkv, hd) = (
        cfg.num_attention_heads as u64,
        cfg.num_key_value_heads as u64,
        cfg.head_dim as u64,
    );

    // the frozen base
    let linear_params: u64 = Proj::ALL
        .iter()
        .map(|&p| {
            let (o, i) = cfg.linear_shape(p);
            (o * i) as u64
        })
        .sum::<u64>()
        * layers;
    let quant = spec.quantization.as_ref();
    let dense_bytes = match quant.and_then(|q| q.compute_dtype).or(spec.compute_dtype) {
        Some(ComputeDtype::Bf16 | ComputeDtype::F16) if quant.is_none() => 2.0,
        _ => 4.0,
    };
    let per_param = match quant.and_then(|q| q.kind) {
        None => dense_bytes,
        Some(QuantType::Nf4 | QuantType::Fp4) => {
            // 4-bit codes; one absmax per 64 weights, itself 8-bit with a float per 256 when
            // double-quantized
            if quant.and_then(|q| q.double_quant).unwrap_or(true) {
                0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0)
            } else {
                0.5 + 4.0 / 64.0
            }
        }
        Some(QuantType::Int8) => 1.0 + 4.0 / 64.0,
        Some(QuantType::Gguf) => match stored.gguf_linear_bytes {
            Some(bytes) => bytes as f64 / linear_params.max(1) as f64,
            None => 0.5625, // Q4_0's 18 bytes per 32 weights
        },
    };
    let norms = (2 * layers + 1) * h * F32;
    let head = if cfg.tie_word_embeddings {
        0.0
    } else {
        (v * h) as f64 * dense_bytes
    };
    let weights = (linear_params as f64 * per_param + head) as u64 + v * h * F32 + norms;

    // LoRA: factor, gradient, two moments, and the gradient's copy in candle's store
    let lora = &spec.lora;
    let r = lora.r as u64;
    let targets = lora.target_modules.names();
    let adapted: Vec<Proj> = Proj::ALL
        .iter()
        .copied()
        .filter(|p| targets.iter().any(|t| t == p.name()))
        .collect();
    let lora_params: u64 = adapted
        .iter()
        .map(|&p| {
            let (o, i) = cfg.linear_shape(p);
            r * (o + i) as u64
        })
        .sum::<u64>()
        * layers;
    let adapter = lora_params * F32 * 5;

    // activations: a micro-batch of rows max_seq_len long
    let t = spec.training.max_seq_len.max(1) as u64;
    let tokens = spec.training.batch_size.max(1) as u64 * t;
    // Saved of the fused layer, per token: h1, x1, h2 and the layer's output; q and the
    // attention output; k, v; gate, up, act; a row of t probabilities per head; x·A of each
    // LoRA branch (dropout masks are regenerated from their seed, not kept)
    let per_token = 4 * h + 2 * nh * hd + 2 * nkv * hd + 3 * i + nh * t + r * adapted.len() as u64;
    let layer_kept = tokens * per_token * F32;
    // the composite graph keeps each op's inputs: about twice the fused layer's buffers
    let composite = device == DeviceKind::Cuda || !cfg.arch.fused_layer_applies();
    let layer_kept = if composite {
        2 * layer_kept
    } else {
        layer_kept
    };
    let (activations, recomputed) = if spec.training.gradient_checkpointing {
        // each layer's input; in backward, one layer recomputed with all it keeps
        (layers * tokens * h * F32, layer_kept)
    } else {
        (layers * layer_kept, 0)
    };

    // the loss holds a chunk of logits and its softmax; the hidden states' gradients pass
    // through a few buffers; a quantized base unpacks one weight (and its transpose) at a time
    let largest_linear = Proj::ALL
        .iter()
        .map(|&p| {
            let (o, i) = cfg.linear_shape(p);
            (o * i) as u64
        })
        .max()
        .unwrap_or(0);
    let logits = LOGIT_ROWS * v * F32 * 2 + tokens * h * F32 * 4;
    let unpacked = if quant.is_some() {
        2 * largest_linear * F32
    } else {
        0
    };
    let workspace = recomputed + logits + unpacked;
    let runtime = match device {
        DeviceKind::Cpu => CPU_RUNTIME_BYTES,
        DeviceKind::Cuda => CUDA_RUNTIME_BYTES,
    };
    let training = weights + adapter + activations + workspace + runtime;
    // tensors are read whole before they are converted: the embedding is the largest
    let largest_tensor = (v * h).max(largest_linear) * F32;
    let loading = runtime + weights + largest_tensor;
    MemoryEstimate {
        weights_bytes: weights,
        adapter_bytes: adapter,
        activations_bytes: activations,
        workspace_bytes: workspace,
        runtime_bytes: runtime,
        training_bytes: training,
        loading_bytes: loading,
        peak_bytes: training.max(loading),
    }
}

/// Analytic matmul FLOPs per token of a LoRA training step (as in the PEFT reference script):
/// frozen linears and lm_head 4·N (no weight gradients), attention 3 × forward, LoRA 6r(in+out).
pub fn flops_per_token(cfg: &ModelConfig, seq: usize, targets: &[String], r: usize) -> f64 {
    let n_lin: usize = Proj::ALL
        .iter()
        .map(|&p| {
            let (o, i) = cfg.linear_shape(p);
            o * i
        })
        .sum::<usize>()
        * cfg.num_hidden_layers
        + cfg.hidden_size * cfg.vocab_size;
    let attn = 3 * cfg.num_hidden_layers * 2 * (2 * seq * cfg.num_attention_heads * cfg.head_dim);
    let lora: usize = targets
        .iter()
        .filter_map(|m| Proj::from_name(m))
        .map(|p| {
            let (o, i) = cfg.linear_shape(p);
            6 * r * (i + o)
        })
        .sum::<usize>()
        * cfg.num_hidden_layers;
    (4 * n_lin + attn + lora) as f64
}

/// GFLOP/s of the float32 matmul the frozen linears use (oneDNN when installed, else candle's
/// gemm) on 1024×576 @ 576×1536, SmolLM2-135M's MLP shape, fastest of many runs: the rate a
/// worker registers, and the ceiling `qtune bench` takes a step's share of. Takes a few hundred
/// milliseconds at 30 runs; measure on an idle device (after training, candle's threads still spin).
pub fn measure_matmul_gflops(device: &Device, runs: usize) -> candle_core::Result<f64> {
    if device.is_cpu() {
        if let Some(gflops) = super::onednn::matmul_gflops(1024, 1536, 576, false, runs) {
            return Ok(gflops);
        }
    }
    let a = Tensor::ones((1024, 576), DType::F32, device)?;
    let w = Tensor::ones((1536, 576), DType::F32, device)?;
    let mut fastest = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let y = super::ops::frozen_matmul(&a, &w)?;
        device.synchronize()?;
        drop(y);
        fastest = fastest.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * 1024.0 * 576.0 * 1536.0 / fastest / 1e9)
}

/// The share of a device's measured matmul rate a training step reaches (`qtune bench` measures
/// 45-70 % at SmolLM2's shapes on the CPU): what turns FLOPs into a time estimate.
pub const STEP_EFFICIENCY: f64 = 0.5;

/// Seconds of one optimizer step of `spec` on a device that multiplies at `gflops`.
pub fn seconds_per_step(cfg: &ModelConfig, spec: &JobSpec, gflops: f64) -> f64 {
    let seq = spec.training.max_seq_len.max(1) as usize;
    let tokens = spec.training.batch_size.max(1) as f64
        * spec.training.gradient_accumulation_steps.max(1) as f64
        * seq as f64;
    let targets = spec.lora.target_modules.names();
    let flops = flops_per_token(cfg, seq, &targets, spec.lora.r as usize) * tokens;
    flops / (gflops * 1e9 * STEP_EFFICIENCY)
}
