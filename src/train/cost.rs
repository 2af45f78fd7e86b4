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
//! buffers the CPU's fused layer keeps (`model/layer.rs`: `Saved`), and for the composite graph
//! (other devices, and families without the fused layer) multiples of them measured on the CPU.
//! Checked against measured peaks on the CPU, fused and composite (`tests/it/capacity.rs`,
//! within 25 %); on CUDA it is the same arithmetic with a CUDA context, not yet measured there.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::model::{ModelConfig, Proj, StoredBase};
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
    /// gradients, a dequantized weight, bf16 attention's score gradients (and, under
    /// checkpointing, one layer recomputed).
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

const F32: f64 = 4.0;
/// Rows of logits computed at once by the chunked loss (`ops::lm_head_cross_entropy`).
const LOGIT_ROWS: f64 = 128.0;
/// The process without a model: code, oneDNN, tokenizer, dataset and allocator slack (`qtune
/// train` on a two-layer model of hidden size 32 peaks at 25 MiB).
const CPU_RUNTIME_BYTES: u64 = 32 << 20;
/// A CUDA context and candle's kernels on the device.
const CUDA_RUNTIME_BYTES: u64 = 600 << 20;
/// What the composite graph keeps per layer, as multiples of the fused layer's row buffers and
/// attention probabilities (see [`estimate_memory`]).
const COMPOSITE_ROWS: f64 = 4.0;
const COMPOSITE_SCORES: f64 = 5.0;

/// The peak memory `spec` needs on `device` for a model of shape `cfg`. Computed in f64 and
/// converted with saturation: a config with absurd sizes gives an absurd figure, not an overflow.
pub fn estimate_memory(
    cfg: &ModelConfig,
    spec: &JobSpec,
    stored: StoredBase,
    device: DeviceKind,
) -> MemoryEstimate {
    let f = |n: usize| n as f64;
    let (h, i, v) = (
        f(cfg.hidden_size),
        f(cfg.intermediate_size),
        f(cfg.vocab_size),
    );
    let layers = f(cfg.num_hidden_layers);
    let (nh, nkv, hd) = (
        f(cfg.num_attention_heads),
        f(cfg.num_key_value_heads),
        f(cfg.head_dim),
    );
    let size = |p: Proj| {
        let (o, i) = cfg.linear_shape(p);
        (f(o), f(i))
    };

    // the frozen base
    let linear_params = Proj::ALL
        .iter()
        .map(|&p| size(p).0 * size(p).1)
        .sum::<f64>()
        * layers;
    let quant = spec.quantization.as_ref();
    let dense_bytes = match spec.compute_dtype {
        ComputeDtype::Bf16 | ComputeDtype::F16 if quant.is_none() => 2.0,
        _ => F32,
    };
    let per_param = match quant.map(|q| q.kind) {
        None => dense_bytes,
        Some(QuantType::Nf4 | QuantType::Fp4) => {
            // 4-bit codes; one absmax per 64 weights, itself 8-bit with a float per 256 when
            // double-quantized
            if quant.is_some_and(|q| q.double_quant) {
                0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0)
            } else {
                0.5 + 4.0 / 64.0
            }
        }
        Some(QuantType::Int8) => 1.0 + 4.0 / 64.0,
        Some(QuantType::Gguf) => match stored.gguf_linear_bytes {
            Some(bytes) => bytes as f64 / linear_params.max(1.0),
            None => 0.5625, // Q4_0's 18 bytes per 32 weights
        },
    };
    let norms = (2.0 * layers + 1.0) * h * F32;
    let head = if cfg.tie_word_embeddings {
        0.0
    } else {
        v * h * dense_bytes
    };
    let weights = linear_params * per_param + head + v * h * F32 + norms;

    // LoRA: factor, gradient, two moments, and the gradient's copy in candle's store
    let lora = &spec.lora;
    let r = lora.r.max(0) as f64;
    let targets = &lora.target_modules;
    let adapted: Vec<Proj> = Proj::ALL
        .iter()
        .copied()
        .filter(|p| targets.iter().any(|t| t == p.name()))
        .collect();
    let lora_params = adapted
        .iter()
        .map(|&p| r * (size(p).0 + size(p).1))
        .sum::<f64>()
        * layers;
    let adapter = lora_params * F32 * 5.0;

    // activations: a micro-batch of rows max_seq_len long
    let t = spec.training.max_seq_len.max(1) as f64;
    let tokens = sequences_per_micro_batch(spec) * t;
    // Saved of the fused layer, per token: h1, x1, h2 and the layer's output; q and the
    // attention output; k, v; gate, up, act; x·A of each LoRA branch (dropout masks are
    // regenerated from their seed, not kept); and a row of t probabilities per head
    let rows = 4.0 * h + 2.0 * nh * hd + 2.0 * nkv * hd + 3.0 * i + r * adapted.len() as f64;
    let scores = nh * t;
    // the composite graph keeps every op's inputs: measured on the CPU (a Qwen3-shaped model,
    // 6 layers, 1 x 1024 tokens at 256 and 512 long), about 4x the fused layer's row buffers
    // and 5x its attention probabilities (scores, masked scores, probabilities, their grads)
    let composite = device == DeviceKind::Cuda || !cfg.arch.fused_layer_applies();
    let per_token = if composite {
        COMPOSITE_ROWS * rows + COMPOSITE_SCORES * scores
    } else {
        rows + scores
    };
    let layer_kept = tokens * per_token * F32;
    let (activations, recomputed) = if spec.training.gradient_checkpointing {
        // each layer's input; in backward, one layer recomputed with all it keeps
        (layers * tokens * h * F32, layer_kept)
    } else {
        (layers * layer_kept, 0.0)
    };

    // the loss holds a chunk of logits and its softmax; the hidden states' gradients pass
    // through a few buffers; a quantized base unpacks one weight (and its transpose) at a time
    let largest_linear = Proj::ALL
        .iter()
        .map(|&p| size(p).0 * size(p).1)
        .fold(0.0, f64::max);
    let logits = LOGIT_ROWS * v * F32 * 2.0 + tokens * h * F32 * 4.0;
    let unpacked = if quant.is_some() {
        2.0 * largest_linear * F32
    } else {
        0.0
    };
    // bf16 attention on the CPU's fused layer holds a layer's score gradients in f32 and bf16
    // at once during backward (`kernels::attention`)
    let bf16_scores = if !composite && dense_bytes == 2.0 && device == DeviceKind::Cpu {
        tokens * scores * (F32 + 2.0)
    } else {
        0.0
    };
    let workspace = recomputed + logits + unpacked + bf16_scores;
    let runtime = match device {
        DeviceKind::Cpu => CPU_RUNTIME_BYTES,
        DeviceKind::Cuda => CUDA_RUNTIME_BYTES,
    };
    // tensors are read whole before they are converted: the embedding is the largest
    let largest_tensor = (v * h).max(largest_linear) * F32;
    // saturating conversions; the sums are of the converted parts, so they add up exactly
    let bytes = |x: f64| x as u64;
    let (weights, adapter, activations, workspace) = (
        bytes(weights),
        bytes(adapter),
        bytes(activations),
        bytes(workspace),
    );
    let training = weights
        .saturating_add(adapter)
        .saturating_add(activations)
        .saturating_add(workspace)
        .saturating_add(runtime);
    let loading = runtime
        .saturating_add(weights)
        .saturating_add(bytes(largest_tensor));
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
    let f = |n: usize| n as f64;
    let size = |p: Proj| {
        let (o, i) = cfg.linear_shape(p);
        f(o) * f(i)
    };
    let layers = f(cfg.num_hidden_layers);
    let n_lin = Proj::ALL.iter().map(|&p| size(p)).sum::<f64>() * layers
        + f(cfg.hidden_size) * f(cfg.vocab_size);
    let attn = 3.0 * layers * 2.0 * (2.0 * f(seq) * f(cfg.num_attention_heads) * f(cfg.head_dim));
    let lora = targets
        .iter()
        .filter_map(|m| Proj::from_name(m))
        .map(|p| {
            let (o, i) = cfg.linear_shape(p);
            6.0 * f(r) * (f(i) + f(o))
        })
        .sum::<f64>()
        * layers;
    4.0 * n_lin + attn + lora
}

/// GFLOP/s of the float32 matmul the frozen linears use (oneDNN when installed, else candle's
/// gemm) on 1024×576 @ 576×1536, SmolLM2-135M's MLP shape, fastest of many runs: the rate a
/// worker registers, and the ceiling `qtune bench` takes a step's share of. Takes a few hundred
/// milliseconds at 30 runs; measure on an idle device (after training, candle's threads still spin).
pub fn measure_matmul_gflops(device: &Device, runs: usize) -> candle_core::Result<f64> {
    if device.is_cpu() {
        if let Some(gflops) = crate::kernels::onednn::matmul_gflops(1024, 1536, 576, false, runs) {
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

/// Sequences in a micro-batch, at most: a preference example is a pair, two sequences (less
/// their shared prompt when packed, which this upper bound leaves out); the reference pass of
/// DPO runs once before the first step, without a graph.
fn sequences_per_micro_batch(spec: &JobSpec) -> f64 {
    let per_example = match spec.method {
        crate::spec::Method::Sft => 1.0,
        crate::spec::Method::Dpo(_) | crate::spec::Method::Orpo(_) => 2.0,
    };
    spec.training.batch_size.max(1) as f64 * per_example
}

/// Seconds of one optimizer step of `spec` on a device that multiplies at `gflops`.
pub fn seconds_per_step(cfg: &ModelConfig, spec: &JobSpec, gflops: f64) -> f64 {
    let seq = spec.training.max_seq_len.max(1) as usize;
    let tokens = sequences_per_micro_batch(spec)
        * spec.training.gradient_accumulation_steps.max(1) as f64
        * seq as f64;
    let targets = &spec.lora.target_modules;
    let flops = flops_per_token(cfg, seq, targets, spec.lora.r as usize) * tokens;
    flops / (gflops * 1e9 * STEP_EFFICIENCY)
}
