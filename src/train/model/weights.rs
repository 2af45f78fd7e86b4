//! The pieces of the decoder that both of its forward paths share: a layer's frozen linears and
//! their LoRA factors ([`Block`], one named field per projection), what a forward knows
//! ([`ForwardMode`], [`LayerContext`]) and how dropout masks are seeded ([`lora_dropout`],
//! [`dropout_seed`]: the one place the seed formula is written). `llama.rs` (the composite graph
//! and the model) and `layer.rs` (the fused CPU layer) both build on this file.

use std::sync::{Arc, Mutex};

use candle_core::{Tensor, TensorId, Var};

use super::arch::Proj;
use super::config::ModelConfig;
use crate::kernels::lora::Dropout;
use crate::train::quant::QuantizedWeight;
use crate::train::{ops, quant, Result};

/// A LoRA pair on one linear layer: `y += scale · B · A · dropout(x)`.
#[derive(Clone)]
pub struct LoraAdapter {
    /// (r, in), Kaiming-uniform like PEFT.
    pub a: Var,
    /// (out, r), zeros.
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    /// Set where the checkpoint fuses this projection with others into one module (Phi-3's
    /// `qkv_proj`): A and B are that module's, shared with its other projections, and this
    /// projection's output is `rows` of B.
    pub fused: Option<FusedRows>,
}

/// A projection's share of a fused module's LoRA.
#[derive(Clone, Copy, Debug)]
pub struct FusedRows {
    pub start: usize,
    pub len: usize,
    /// The module's first projection: the one whose dropout mask the whole module uses (PEFT
    /// drops out the module's input once).
    pub first: Proj,
}

impl LoraAdapter {
    /// This projection's B: all of it, or its rows of a fused module's.
    pub(crate) fn b_rows(&self, b: &Tensor) -> candle_core::Result<Tensor> {
        match self.fused {
            Some(f) => b.narrow(0, f.start, f.len),
            None => Ok(b.clone()),
        }
    }
}

/// A frozen base weight: dense in the compute dtype, or quantized (QLoRA).
#[derive(Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(Arc<QuantizedWeight>),
}

impl FrozenWeight {
    /// Bytes the weight holds.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenWeight::Quantized(q) => q.bytes(),
        }
    }
}

/// A frozen linear layer, optionally adapted.
#[derive(Clone)]
pub struct Linear {
    /// (out, in).
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

/// One decoder layer's weights.
#[derive(Clone)]
pub struct Block {
    pub attn_norm: Tensor,
    pub mlp_norm: Tensor,
    /// Per-head RMSNorm weights `(head_dim,)` of q and k (qwen3, gemma3), applied before RoPE.
    pub(crate) qk_norm: Option<(Tensor, Tensor)>,
    /// Gemma's norms of the attention's and of the MLP's output, before each residual add.
    pub(crate) post_norms: Option<(Tensor, Tensor)>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub(crate) gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Block {
    pub fn linear(&self, proj: Proj) -> &Linear {
        match proj {
            Proj::Q => &self.q_proj,
            Proj::K => &self.k_proj,
            Proj::V => &self.v_proj,
            Proj::O => &self.o_proj,
            Proj::Gate => &self.gate_proj,
            Proj::Up => &self.up_proj,
            Proj::Down => &self.down_proj,
        }
    }

    pub(crate) fn linear_mut(&mut self, proj: Proj) -> &mut Linear {
        match proj {
            Proj::Q => &mut self.q_proj,
            Proj::K => &mut self.k_proj,
            Proj::V => &mut self.v_proj,
            Proj::O => &mut self.o_proj,
            Proj::Gate => &mut self.gate_proj,
            Proj::Up => &mut self.up_proj,
            Proj::Down => &mut self.down_proj,
        }
    }

    /// The seven projections with their linears, in [`Proj::ALL`] order.
    pub fn linears(&self) -> impl Iterator<Item = (Proj, &Linear)> {
        Proj::ALL.into_iter().map(move |p| (p, self.linear(p)))
    }
}

/// What differs between a training forward and an evaluation forward.
#[derive(Debug, Clone, Copy)]
pub struct ForwardMode {
    /// Track LoRA factors (build a graph) and apply dropout.
    pub train: bool,
    /// Seeds the dropout masks of this forward; masks are a pure function of it, so a resumed
    /// run draws the same masks as an uninterrupted one.
    pub dropout_seed: u64,
    /// Apply the LoRA branches; off, the frozen base alone runs (DPO's reference model, as TRL
    /// gets it from a PEFT model with its adapter disabled).
    pub adapter: bool,
}

impl ForwardMode {
    pub const EVAL: ForwardMode = ForwardMode {
        train: false,
        dropout_seed: 0,
        adapter: true,
    };
    /// The base model without its adapter, nothing tracked.
    pub const BASE: ForwardMode = ForwardMode {
        train: false,
        dropout_seed: 0,
        adapter: false,
    };

    /// A training forward of micro-batch masks seeded `dropout_seed`.
    pub fn train(dropout_seed: u64) -> ForwardMode {
        ForwardMode {
            train: true,
            dropout_seed,
            adapter: true,
        }
    }
}

/// Mixes numbers into a 64-bit seed (splitmix64 finaliser), for independent RNG streams.
pub(crate) fn mix_seed(parts: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h = z ^ (z >> 31);
    }
    h
}

/// The seed of micro-batch `micro_batch`'s dropout masks at optimizer step `step` (0-based)
/// of a run seeded `seed`: masks are a pure function of it, so a resumed run draws the masks an
/// uninterrupted one would.
pub fn dropout_seed(seed: u64, step: u64, micro_batch: u64) -> u64 {
    mix_seed(&[seed, step, micro_batch])
}

/// The dropout on the LoRA input of `proj` in layer `layer` during a forward in `mode`, if any.
/// Both forward paths draw it here, so their masks are the same.
pub(crate) fn lora_dropout(
    mode: ForwardMode,
    lora: &LoraAdapter,
    layer: usize,
    proj: Proj,
) -> Option<Dropout> {
    let proj = lora.fused.map_or(proj, |f| f.first);
    (mode.train && lora.dropout > 0.0).then(|| Dropout {
        p: lora.dropout,
        seed: mix_seed(&[mode.dropout_seed, (layer * 8 + proj as usize) as u64]),
    })
}

/// LoRA gradients produced inside fused or recomputed layers, by variable id.
pub(crate) type GradStash = Arc<Mutex<Vec<(TensorId, Tensor)>>>;

/// What every layer of one forward shares: rotary tables, mask, shapes, mode.
#[derive(Clone)]
pub(crate) struct LayerContext {
    pub cfg: ModelConfig,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub mask: Tensor,
    /// cos, sin and mask of Gemma 3's local layers.
    pub local: Option<(Tensor, Tensor, Tensor)>,
    pub scale: f64,
    /// batch, time, heads, key/value heads, head dim
    pub shape: (usize, usize, usize, usize, usize),
    pub mode: ForwardMode,
    /// Packed rows: per position, the column its example starts at and the span it hides (cos
    /// and sin are then `(b, t, d/2)` and the mask `(b, 1, t, t)`).
    pub(crate) packing: Option<Arc<crate::kernels::attention::Packing>>,
}

impl LayerContext {
    /// cos, sin and mask of `layer`.
    pub(crate) fn tables(&self, layer: usize) -> (&Tensor, &Tensor, &Tensor) {
        match &self.local {
            Some((cos, sin, mask)) if self.cfg.is_local_layer(layer) => (cos, sin, mask),
            _ => (&self.cos, &self.sin, &self.mask),
        }
    }
}

impl Linear {
    /// The composite-graph forward: `x · Wᵀ + bias + scale · B · A · dropout(x)`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mode: ForwardMode,
        layer: usize,
        proj: Proj,
    ) -> Result<Tensor> {
        let y = self.frozen(x, false)?;
        match self.lora_delta(x, mode, layer, proj)? {
            Some(delta) => {
                let delta = delta.to_dtype(y.dtype())?;
                Ok((y + delta)?)
            }
            None => Ok(y),
        }
    }

    /// The frozen part, `x · Wᵀ + bias`; `decode`: `x` holds the rows of a batched decode step
    /// (a GGUF weight multiplies them on its stored blocks, as it does one row).
    pub(crate) fn frozen(&self, x: &Tensor, decode: bool) -> Result<Tensor> {
        let y = match &self.weight {
            FrozenWeight::Dense(w) => ops::frozen_matmul(x, w)?,
            FrozenWeight::Quantized(q) if decode => quant::decode_matmul(x, q)?,
            FrozenWeight::Quantized(q) => quant::quantized_matmul(x, q)?,
        };
        match &self.bias {
            Some(bias) => Ok(y.broadcast_add(bias)?),
            None => Ok(y),
        }
    }

    /// The LoRA branch alone, `scale · B · A · dropout(x)` in the factors' dtype and `x`'s shape
    /// but for the last dimension; `None` without an adapter or with it switched off.
    pub(crate) fn lora_delta(
        &self,
        x: &Tensor,
        mode: ForwardMode,
        layer: usize,
        proj: Proj,
    ) -> Result<Option<Tensor>> {
        let Some(lora) = self.lora.as_ref().filter(|_| mode.adapter) else {
            return Ok(None);
        };
        let (a, b) = if mode.train {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        } else {
            (lora.a.as_detached_tensor(), lora.b.as_detached_tensor())
        };
        let dropout = lora_dropout(mode, lora, layer, proj);
        let in_dim = a.dim(1)?;
        let mut x32 = x.to_dtype(a.dtype())?.reshape(((), in_dim))?;
        if let Some(d) = dropout {
            let n = x32.elem_count();
            let mask = Tensor::from_vec(d.mask_values(n), n, x.device())?.to_dtype(x32.dtype())?;
            x32 = x32.mul(&mask.reshape(x32.shape())?)?;
        }
        let b = lora.b_rows(&b)?;
        let delta = (x32.matmul(&a.t()?)?.matmul(&b.t()?)? * lora.scale)?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("x has dimensions") = delta.dim(1)?;
        Ok(Some(delta.reshape(dims)?))
    }
}
