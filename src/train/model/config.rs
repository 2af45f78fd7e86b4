//! A model's hyper-parameters, whichever source they come from (a Hugging Face `config.json`
//! through `hf_config`, or GGUF metadata through `source::gguf`), and the shapes they imply.

use serde::{Deserialize, Serialize};

use super::arch::{Arch, Proj};
use super::rope::{self, RopeScaling};
use crate::train::error::Error;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2).
    pub attention_bias: bool,
    /// Mistral's sliding attention window, when it is in use.
    pub sliding_window: Option<usize>,
    pub max_position_embeddings: usize,
    /// Attention scores are scaled by `query_pre_attn_scalar^-½` where set (Gemma), by
    /// `head_dim^-½` otherwise.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3's local layers, where the family has them.
    #[serde(default)]
    pub local_attention: Option<LocalAttention>,
}

/// Layers that attend only within a window of recent positions, with a RoPE of their own
/// (Gemma 3: five local layers to each global one). Global layers use the model's
/// `rope_theta` / `rope_scaling` and see every earlier position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalAttention {
    /// A key is seen when `query position − key position < window`.
    pub window: usize,
    /// The local layers' RoPE base (unscaled).
    pub(crate) rope_theta: f64,
    /// Per layer: local (true) or global.
    pub layers: Vec<bool>,
}

/// Gemma 3's layer kinds when a config lists none: every `pattern`-th layer global (as
/// transformers' `sliding_window_pattern` and llama.cpp's `set_swa_pattern(6)`).
pub(crate) fn gemma3_local_layers(num_layers: usize, pattern: usize) -> Vec<bool> {
    (0..num_layers)
        .map(|i| !(i + 1).is_multiple_of(pattern))
        .collect()
}

impl ModelConfig {
    /// The scale of the attention scores.
    pub(crate) fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// Whether `layer` attends within Gemma 3's local window.
    pub(crate) fn is_local_layer(&self, layer: usize) -> bool {
        self.local_attention
            .as_ref()
            .is_some_and(|l| l.layers.get(layer).copied().unwrap_or(false))
    }

    /// The narrowest attention window of any layer (`usize::MAX`: none): a sequence no longer
    /// sees the same keys under every layout that keeps positions apart.
    pub(crate) fn narrowest_window(&self) -> usize {
        let local = self.local_attention.as_ref().map(|l| l.window);
        [self.sliding_window, local]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(usize::MAX)
    }

    pub fn check(&self) -> Result<(), Error> {
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::Model(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if let Some(local) = &self.local_attention {
            if local.layers.len() != self.num_hidden_layers || local.window == 0 {
                return Err(Error::Model(format!(
                    "local attention: {} layer kinds for {} layers, window {}",
                    local.layers.len(),
                    self.num_hidden_layers,
                    local.window
                )));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Model(format!(
                "head_dim must be even for RoPE, got {}",
                self.head_dim
            )));
        }
        Ok(())
    }

    /// (out, in) of a projection's weight.
    pub(crate) fn linear_shape(&self, proj: Proj) -> (usize, usize) {
        let (h, q, kv, ff) = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
            self.intermediate_size,
        );
        match proj {
            Proj::Q => (q, h),
            Proj::K | Proj::V => (kv, h),
            Proj::O => (h, q),
            Proj::Gate | Proj::Up => (ff, h),
            Proj::Down => (h, ff),
        }
    }

    /// Inverse RoPE frequencies, one per pair of head dimensions, with scaling applied, of the
    /// global layers.
    pub(crate) fn rope_inv_freq(&self) -> Vec<f32> {
        rope::inv_freq(self.head_dim, self.rope_theta, self.rope_scaling.as_ref())
    }

    /// Those of `layer` (Gemma 3's local layers have their own base, unscaled).
    pub(crate) fn layer_rope_inv_freq(&self, layer: usize) -> Vec<f32> {
        match &self.local_attention {
            Some(l) if self.is_local_layer(layer) => {
                rope::inv_freq(self.head_dim, l.rope_theta, None)
            }
            _ => self.rope_inv_freq(),
        }
    }
}
