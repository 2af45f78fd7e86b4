//! The Llama-family decoder (llama, mistral, qwen2, qwen3, gemma3, phi3) as a trainable candle
//! graph. The families differ in details the config and [`super::Arch`] name (norms,
//! activation, local layers, fused checkpoint modules); the layer code is one.
//!
//! Base weights are plain tensors (never `Var`s), so they cannot change; only the LoRA factors are
//! `Var`s. Every op on the path from a LoRA factor to the loss has a backward (see `ops`).

use std::sync::Arc;

use candle_core::{DType, Device, Layout, Storage, Tensor, Var, D};

use super::arch::Proj;
use super::config::ModelConfig;
use super::weights::{Block, ForwardMode, GradStash, LayerContext};
use crate::kernels::attention::Packing;
use crate::kernels::decode::{LayerCache, Shape as DecodeShape};
use crate::train::ops;
use crate::train::Result;

pub struct Llama {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// `None` when the vocabulary projection is tied to the embedding.
    pub lm_head: Option<Tensor>,
    pub device: Device,
    /// Keep only each layer's input during a training forward and recompute the layer in
    /// backward (activation memory of one layer instead of all, for one more forward).
    pub gradient_checkpointing: bool,
    /// The vocabulary projection kept quantized for decode steps (set by
    /// [`super::load_for_decoding`]): at one row per step it is the largest single read.
    pub(crate) decode_head: Option<std::sync::Arc<crate::train::quant::QuantizedWeight>>,
    /// LoRA gradients computed by fused or recomputed layers during a backward pass, by
    /// variable id; [`Llama::lora_grads`] hands them to the optimizer step.
    pub(super) layer_grads: GradStash,
}

impl Llama {
    /// Bytes of the LoRA factors (what an adapter view adds to its base).
    pub(crate) fn lora_bytes(&self) -> usize {
        self.lora_vars()
            .iter()
            .map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    pub(crate) fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The modules carrying LoRA factors, by their checkpoint names (PEFT's `target_modules`).
    pub(crate) fn adapted_modules(&self) -> Vec<&'static str> {
        let Some(block) = self.blocks.first() else {
            return Vec::new();
        };
        self.cfg
            .arch
            .lora_modules()
            .iter()
            .filter(|m| block.linear(m.projs[0]).lora.is_some())
            .map(|m| m.name)
            .collect()
    }

    /// Every trainable tensor with its PEFT name (without the `.weight` suffix's prefix), in a
    /// fixed order: `model.layers.{i}.self_attn.q_proj.lora_A`.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            for module in self.cfg.arch.lora_modules() {
                // a fused module's projections share one A and B: listed once, by its name
                if let Some(l) = &block.linear(module.projs[0]).lora {
                    let base = format!("model.layers.{layer}.{}.{}", module.group(), module.name);
                    out.push((format!("{base}.lora_A"), l.a.clone()));
                    out.push((format!("{base}.lora_B"), l.b.clone()));
                }
            }
        }
        out
    }

    /// Final hidden states `(b, t, hidden)` for token ids `(b, t)`. Sequences are right-padded,
    /// so the causal mask alone keeps real tokens from seeing padding.
    pub(crate) fn hidden_states(&self, ids: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        self.hidden_states_in(ids, None, mode)
    }

    /// [`Llama::hidden_states`] of rows that may hold several examples: `packing` gives, per
    /// position, the column its example starts at and the span it hides (see
    /// [`crate::train::data::Batch`]).
    fn hidden_states_in(
        &self,
        ids: &Tensor,
        packing: Option<&Arc<Packing>>,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let dtype = self.embed.dtype();
        if packing.is_some_and(|p| {
            p.starts.len() != b * t || !(p.hidden.is_empty() || p.hidden.len() == b * t)
        }) {
            return Err(crate::train::Error::Data(
                "packed batch: example starts do not cover the rows".into(),
            ));
        }
        let tables = |inv: &[f32], window: Option<usize>| match packing {
            None => {
                let (cos, sin) = self.rope_tables_from(inv, 0, t, dtype)?;
                Ok((cos, sin, self.attention_mask_rows(0, t, t, window, dtype)?))
            }
            Some(packing) => self.packed_tables(inv, packing, (b, t), window, dtype),
        };
        let (cos, sin, mask) = tables(&cfg.rope_inv_freq(), cfg.sliding_window)?;
        let local = match &cfg.local_attention {
            Some(l) => {
                let first_local = l.layers.iter().position(|&s| s).unwrap_or(0);
                Some(tables(
                    &cfg.layer_rope_inv_freq(first_local),
                    Some(l.window),
                )?)
            }
            None => None,
        };
        let mut x = self
            .embed_tokens(&ids.flatten_all()?)?
            .reshape((b, t, cfg.hidden_size))?;
        let context = LayerContext {
            cfg: cfg.clone(),
            cos,
            sin,
            mask,
            local,
            scale: cfg.attention_scale(),
            shape: (b, t, nh, nkv, hd),
            mode,
            packing: packing.cloned(),
        };
        let checkpoint = self.gradient_checkpointing && mode.train;
        if ops::fused_applies(&x) && cfg.arch.fused_layer_applies() {
            if mode.train {
                // The first layer's backward must run although the embedding is frozen.
                x = Var::from_tensor(&x)?.as_tensor().clone();
            }
            for (layer, block) in self.blocks.iter().enumerate() {
                x = super::layer::forward(
                    block,
                    layer,
                    &x,
                    &context,
                    &self.layer_grads,
                    checkpoint,
                )?;
            }
            return Ok(ops::rms_norm(&x, &self.norm, cfg.rms_norm_eps)?);
        }
        if checkpoint {
            // The first layer's backward must run although the embedding is frozen.
            x = Var::from_tensor(&x)?.as_tensor().clone();
        }
        for (layer, block) in self.blocks.iter().enumerate() {
            if !checkpoint {
                x = block_forward(block, layer, &x, &context)?;
                continue;
            }
            // Forward without keeping the layer's graph; backward recomputes it from its input.
            let y = block_forward(block, layer, &x.detach(), &context)?.detach();
            let (block, context, stash) =
                (block.clone(), context.clone(), self.layer_grads.clone());
            x = ops::attach_backward("checkpointed-layer", &x, y, move |x_in, _y, grad| {
                let input = Var::from_tensor(&x_in.detach())?;
                let y = block_forward(&block, layer, input.as_tensor(), &context)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let grads = (y * grad.detach())?.sum_all()?.backward()?;
                let mut stash = stash.lock().expect("no panics while holding it");
                for (_, lin) in block.linears() {
                    if let Some(l) = &lin.lora {
                        for var in [&l.a, &l.b] {
                            if let Some(g) = grads.get(var.as_tensor()) {
                                stash.push((var.id(), g.clone()));
                            }
                        }
                    }
                }
                grads.get(input.as_tensor()).cloned().ok_or_else(|| {
                    candle_core::Error::Msg("checkpointed layer: no input gradient".into())
                })
            })?;
        }
        Ok(ops::rms_norm(&x, &self.norm, cfg.rms_norm_eps)?)
    }

    /// The gradient of every LoRA factor after `loss.backward()`, in [`Llama::lora_vars`] order:
    /// from candle's gradient store, or handed over by layers that computed their own backward
    /// (fused or recomputed layers). Takes those hand-overs, so call it once per backward.
    pub fn lora_grads(&self, store: &candle_core::backprop::GradStore) -> Result<Vec<Tensor>> {
        let handed: std::collections::HashMap<candle_core::TensorId, Tensor> = self
            .layer_grads
            .lock()
            .expect("no panics while holding it")
            .drain(..)
            .collect();
        self.lora_vars()
            .into_iter()
            .map(|(name, var)| {
                store
                    .get(&var)
                    .or_else(|| handed.get(&var.id()))
                    .cloned()
                    .ok_or_else(|| {
                        crate::train::Error::Model(format!(
                            "no gradient reached {name} (a graph cut on the path to the loss)"
                        ))
                    })
            })
            .collect()
    }

    /// Logits `(b, t, vocab)` for every position (evaluation and generation).
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.hidden_states(ids, ForwardMode::EVAL)?;
        Ok(ops::frozen_matmul(&h, self.lm_head_weight())?)
    }

    /// Summed cross-entropy over the label positions (and how many the model ranks first):
    /// `positions` index the flattened `(b·t)` hidden states, `targets` are the next tokens
    /// there. Only label rows reach the vocabulary projection.
    pub fn loss_sum(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        targets: &Tensor,
        mode: ForwardMode,
    ) -> Result<ops::LossSum> {
        self.loss_in(ids, None, positions, targets, mode)
    }

    /// [`Llama::loss_sum`] of a batch as the data pipeline makes it, packed or not.
    pub fn batch_loss(
        &self,
        batch: &crate::train::data::Batch,
        mode: ForwardMode,
    ) -> Result<ops::LossSum> {
        let packing = batch.packing.as_ref();
        self.loss_in(&batch.ids, packing, &batch.positions, &batch.targets, mode)
    }

    /// Each label token's cross-entropy `(label_tokens,)` of a batch, differentiable row by row:
    /// what sequence-level losses (DPO, ORPO) are built from.
    pub fn batch_token_losses(
        &self,
        batch: &crate::train::data::Batch,
        mode: ForwardMode,
    ) -> Result<ops::TokenLosses> {
        let h = self.hidden_states_in(&batch.ids, batch.packing.as_ref(), mode)?;
        let h = h
            .reshape(((), self.cfg.hidden_size))?
            .index_select(&batch.positions, 0)?;
        Ok(ops::lm_head_token_losses(
            &h,
            self.lm_head_weight(),
            &batch.targets,
        )?)
    }

    fn loss_in(
        &self,
        ids: &Tensor,
        packing: Option<&Arc<Packing>>,
        positions: &Tensor,
        targets: &Tensor,
        mode: ForwardMode,
    ) -> Result<ops::LossSum> {
        let h = self.hidden_states_in(ids, packing, mode)?;
        let h = h
            .reshape(((), self.cfg.hidden_size))?
            .index_select(positions, 0)?;
        Ok(ops::lm_head_cross_entropy(
            &h,
            self.lm_head_weight(),
            targets,
        )?)
    }

    /// An empty key/value cache for [`Llama::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.blocks.len())
                .map(|_| LayerCache::default())
                .collect(),
            len: 0,
        }
    }

    /// Bytes of key/value cache one position takes (every layer's float32 keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.cfg;
        c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * std::mem::size_of::<f32>()
    }

    /// A cache with room for `tokens` positions allocated at once, so that what a request
    /// reserves is what it holds (a growing vector would double past it).
    pub fn new_cache_for(&self, tokens: usize) -> KvCache {
        let row = self.cfg.num_key_value_heads * self.cfg.head_dim;
        KvCache {
            layers: (0..self.blocks.len())
                .map(|_| LayerCache {
                    keys: Vec::with_capacity(tokens * row),
                    values: Vec::with_capacity(tokens * row),
                })
                .collect(),
            len: 0,
        }
    }

    /// Runs `ids` (the positions after those `cache` holds) through the model, appends their
    /// keys and values to the cache, and returns the float32 logits `(vocab,)` of the last one:
    /// a prompt's prefill, then one token at a time. LoRA branches apply, without dropout.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (n, offset) = (ids.len(), cache.len);
        if n == 0 {
            return Err(crate::train::Error::Data(
                "nothing to run: no tokens".into(),
            ));
        }
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let dtype = self.embed.dtype();
        let total = offset + n;
        let (cos, sin) = self.rope_tables_from(&cfg.rope_inv_freq(), offset, n, dtype)?;
        let mask = self.attention_mask_rows(offset, n, total, cfg.sliding_window, dtype)?;
        let local = match &cfg.local_attention {
            Some(l) => {
                let first_local = l.layers.iter().position(|&s| s).unwrap_or(0);
                let inv = cfg.layer_rope_inv_freq(first_local);
                let (cos, sin) = self.rope_tables_from(&inv, offset, n, dtype)?;
                let mask = self.attention_mask_rows(offset, n, total, Some(l.window), dtype)?;
                Some((cos, sin, mask))
            }
            None => None,
        };
        let scale = cfg.attention_scale();
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = self.embed_tokens(&ids)?.reshape((1, n, cfg.hidden_size))?;
        let mode = ForwardMode::EVAL;
        for (layer, block) in self.blocks.iter().enumerate() {
            let (cos, sin, mask) = match &local {
                Some((cos, sin, mask)) if cfg.is_local_layer(layer) => (cos, sin, mask),
                _ => (&cos, &sin, &mask),
            };
            let shape = self.decode_shape(layer);
            let attend = |q: Tensor, k: Tensor, v: Tensor| {
                let held = cache.append(layer, &k, &v)?;
                if n == 1 {
                    return decode_attention(&q, &[held], shape);
                }
                let t = held.keys.len() / (nkv * hd);
                let stored = |data: &[f32]| -> Result<Tensor> {
                    let all = Tensor::from_slice(data, (1, t, nkv, hd), &self.device)?;
                    Ok(all.to_dtype(q.dtype())?)
                };
                let (k, v) = (stored(&held.keys)?, stored(&held.values)?);
                Ok(ops::attention(&q, &k, &v, mask, scale)?)
            };
            x = if n == 1 {
                // one new position: the projections as a decode batch computes its rows
                // ([`Llama::decode_batch`]), so that a sequence decodes to the same numbers
                // alone or batched
                let proj = |p: Proj, h: &Tensor| -> Result<Tensor> {
                    let linear = block.linear(p);
                    lora_rows(linear.frozen(h, true)?, h, &[Some(linear)], (layer, p))
                };
                layer_forward_with(block, &x, cfg, (nh, nkv, hd), (cos, sin), proj, attend)?
            } else {
                layer_forward(block, layer, &x, cfg, mode, (nh, nkv, hd), cos, sin, attend)?
            };
        }
        cache.len = total;
        Ok(self.decode_logits(&x.narrow(1, n - 1, 1)?)?.flatten_all()?)
    }

    /// The float32 logits of a decode's last hidden states `x` `(rows, 1, hidden)`: the final
    /// norm, then the quantized vocabulary head where the model keeps one for decoding.
    fn decode_logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = ops::rms_norm(x, &self.norm, self.cfg.rms_norm_eps)?;
        let logits = match &self.decode_head {
            Some(q) if x.dtype() == DType::F32 => crate::train::quant::decode_matmul(&x, q)?,
            _ => ops::frozen_matmul(&x, self.lm_head_weight())?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// One decode step of many sequences at once, each its token at its own position, through
    /// its own cache and its own adapter (a view of this model's base, as
    /// [`Llama::with_lora`] makes them, or none: the base alone). The frozen products run once
    /// for all rows, each adapter's LoRA products over the rows that use it: on a CPU, where
    /// decoding is bound by reading the weights, rows cost little more than one. Attention
    /// runs per row over its own cache. Returns the float32 logits `(rows, vocab)`, each row
    /// what [`Llama::forward_cached`] gives for it alone.
    pub fn decode_batch(&self, rows: &mut [DecodeRow<'_>]) -> Result<Tensor> {
        let cfg = &self.cfg;
        let n = rows.len();
        if n == 0 {
            return Err(crate::train::Error::Data("nothing to run: no rows".into()));
        }
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let dtype = self.embed.dtype();
        let positions: Vec<usize> = rows.iter().map(|r| r.cache.len).collect();
        let tables =
            |inv: &[f32]| self.rope_tables_at(inv, positions.iter().copied(), &[n, 1], dtype);
        let global = tables(&cfg.rope_inv_freq())?;
        let local = match &cfg.local_attention {
            Some(l) => {
                let first_local = l.layers.iter().position(|&s| s).unwrap_or(0);
                Some((tables(&cfg.layer_rope_inv_freq(first_local))?, l.window))
            }
            None => None,
        };
        let adapters: Vec<Option<&Llama>> = rows.iter().map(|r| r.adapter).collect();
        let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let ids = Tensor::from_vec(ids, n, &self.device)?;
        let mut x = self.embed_tokens(&ids)?.reshape((n, 1, cfg.hidden_size))?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let (cos, sin) = match &local {
                Some((t, _)) if cfg.is_local_layer(layer) => t,
                _ => &global,
            };
            let proj = |p: Proj, h: &Tensor| -> Result<Tensor> {
                let y = block.linear(p).frozen(h, true)?;
                let linears: Vec<Option<&super::weights::Linear>> = adapters
                    .iter()
                    .map(|a| a.map(|view| view.blocks[layer].linear(p)))
                    .collect();
                lora_rows(y, h, &linears, (layer, p))
            };
            let shape = self.decode_shape(layer);
            let attend = |q: Tensor, k: Tensor, v: Tensor| -> Result<Tensor> {
                for (i, row) in rows.iter_mut().enumerate() {
                    row.cache
                        .append(layer, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
                }
                let held: Vec<&LayerCache> = rows.iter().map(|r| &r.cache.layers[layer]).collect();
                decode_attention(&q, &held, shape)
            };
            x = layer_forward_with(block, &x, cfg, (nh, nkv, hd), (cos, sin), proj, attend)?;
        }
        for row in rows.iter_mut() {
            row.cache.len += 1;
        }
        Ok(self.decode_logits(&x)?.reshape((n, ()))?)
    }

    /// The attention of `layer` as the decode kernel takes it.
    fn decode_shape(&self, layer: usize) -> DecodeShape {
        let cfg = &self.cfg;
        let window = match &cfg.local_attention {
            Some(l) if cfg.is_local_layer(layer) => Some(l.window),
            _ => cfg.sliding_window,
        };
        DecodeShape {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            scale: cfg.attention_scale() as f32,
            window: window.unwrap_or(usize::MAX),
        }
    }

    /// The embeddings of `ids` (scaled by √hidden where the family does, in the embeddings'
    /// dtype as transformers rounds it).
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed.index_select(ids, 0)?;
        if !self.cfg.arch.scales_embeddings() {
            return Ok(x);
        }
        let scale = Tensor::new((self.cfg.hidden_size as f32).sqrt(), &self.device)?;
        Ok(x.broadcast_mul(&scale.to_dtype(x.dtype())?)?)
    }

    /// cos and sin `(t, head_dim / 2)` of positions `start .. start + t` for inverse
    /// frequencies `inv`.
    fn rope_tables_from(
        &self,
        inv: &[f32],
        start: usize,
        t: usize,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        self.rope_tables_at(inv, start..start + t, &[t], dtype)
    }

    /// cos and sin `(lead…, head_dim / 2)` of `positions`, one per entry of the leading
    /// dimensions `lead`, for inverse frequencies `inv`.
    fn rope_tables_at(
        &self,
        inv: &[f32],
        positions: impl Iterator<Item = usize>,
        lead: &[usize],
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let freqs: Vec<f32> = positions
            .flat_map(|pos| inv.iter().map(move |f| pos as f32 * f))
            .collect();
        let shape: Vec<usize> = lead.iter().copied().chain([inv.len()]).collect();
        let freqs = Tensor::from_vec(freqs, shape, &self.device)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// cos and sin `(b, t, head_dim / 2)` and the additive mask `(b, 1, t, t)` of packed rows:
    /// positions count from each example's start, and a query sees the keys of its own example
    /// only (causally, within `window`).
    fn packed_tables(
        &self,
        inv: &[f32],
        packing: &Packing,
        (b, t): (usize, usize),
        window: Option<usize>,
        dtype: DType,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let positions = (0..b * t).map(|i| packing.position(i, t));
        let (cos, sin) = self.rope_tables_at(inv, positions, &[b, t], dtype)?;
        let window = window.unwrap_or(usize::MAX);
        let mut mask = vec![f32::NEG_INFINITY; b * t * t];
        for row in 0..b {
            for i in 0..t {
                let p = row * t + i;
                let start = packing.starts[p] as usize;
                let first = start.max((i + 1).saturating_sub(window));
                mask[p * t + first..p * t + i + 1].fill(0.0);
                if let Some((from, to)) = packing.hidden_at(p) {
                    mask[p * t + start + from..p * t + start + to].fill(f32::NEG_INFINITY);
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, t), &self.device)?.to_dtype(dtype)?;
        Ok((cos, sin, mask))
    }

    /// The additive causal (and sliding-window) mask `(rows, total)` of the query positions
    /// `first .. first + rows` over key positions `0 .. total`.
    fn attention_mask_rows(
        &self,
        first: usize,
        rows: usize,
        total: usize,
        window: Option<usize>,
        dtype: DType,
    ) -> Result<Tensor> {
        let window = window.unwrap_or(usize::MAX);
        let mask: Vec<f32> = (0..rows * total)
            .map(|i| {
                let (row, col) = (first + i / total, i % total);
                if col > row || row - col >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Tensor::from_vec(mask, (rows, total), &self.device)?.to_dtype(dtype)?)
    }
}

/// A sequence in [`Llama::decode_batch`]: the token it runs, its cache, and the adapter view it
/// decodes with (`None`: the base alone).
pub struct DecodeRow<'a> {
    pub token: u32,
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a Llama>,
}

/// The keys and values of every position a decode has run, per layer.
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    /// Appends `k` and `v` `(1, t, kv_heads, head_dim)` to `layer`'s cache; returns the cache.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<&LayerCache> {
        let cache = &mut self.layers[layer];
        let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        cache.keys.extend(flat(k)?);
        cache.values.extend(flat(v)?);
        Ok(cache)
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `y` (a decode step's rows through a frozen projection) plus each row's LoRA branch of
/// `linears` (its adapter's projection, or none) on its row of `h`: one pass over the rows on
/// the host ([`crate::kernels::lora::rows_forward_into`]), the factors read where they are
/// stored; factors that are not plain float32 ones of their own on the host (a fused module's
/// rows) go through the graph instead, row by row.
fn lora_rows(
    y: Tensor,
    h: &Tensor,
    linears: &[Option<&super::weights::Linear>],
    (layer, proj): (usize, Proj),
) -> Result<Tensor> {
    let adapted: Vec<(usize, &super::weights::LoraAdapter)> = linears
        .iter()
        .enumerate()
        .filter_map(|(i, l)| Some((i, l.and_then(|l| l.lora.as_ref())?)))
        .collect();
    if adapted.is_empty() {
        return Ok(y);
    }
    let stored: Vec<_> = adapted
        .iter()
        .map(|(i, l)| {
            let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
            (*i, l, a.storage_and_layout(), b.storage_and_layout())
        })
        .collect();
    fn host<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
        match storage {
            Storage::Cpu(cpu) => ops::f32_rows(cpu, layout, layout.shape().elem_count()),
            _ => None,
        }
    }
    let mut factors: Vec<crate::kernels::lora::RowFactors> = vec![None; linears.len()];
    for (i, lora, a, b) in &stored {
        match (host(&a.0, a.1), host(&b.0, b.1)) {
            (Some(a), Some(b)) if lora.fused.is_none() => {
                factors[*i] = Some((a, b, lora.scale as f32))
            }
            _ => {
                drop(stored);
                return lora_rows_through_the_graph(y, h, linears, (layer, proj));
            }
        }
    }
    let x: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out: Vec<f32> = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    crate::kernels::lora::rows_forward_into(&mut out, &x, &factors, h.dim(D::Minus1)?);
    Ok(Tensor::from_vec(out, y.shape(), y.device())?.to_dtype(y.dtype())?)
}

/// [`lora_rows`] through each row's own projection ([`super::weights::Linear::lora_delta`]).
fn lora_rows_through_the_graph(
    mut y: Tensor,
    h: &Tensor,
    linears: &[Option<&super::weights::Linear>],
    (layer, proj): (usize, Proj),
) -> Result<Tensor> {
    for (i, lin) in linears.iter().enumerate() {
        let Some(lin) = lin else { continue };
        let at = Tensor::new(&[i as u32], h.device())?;
        let part = h.index_select(&at, 0)?;
        if let Some(d) = lin.lora_delta(&part, ForwardMode::EVAL, layer, proj)? {
            y = y.index_add(&at, &d.to_dtype(y.dtype())?, 0)?;
        }
    }
    Ok(y)
}

/// One query position per row, `q` `(rows, 1, heads, head_dim)`, against each row's `caches`
/// (its own key and value appended): the kernel on the host's float32 numbers, back in `q`'s
/// dtype and shape.
fn decode_attention(q: &Tensor, caches: &[&LayerCache], shape: DecodeShape) -> Result<Tensor> {
    let flat: Vec<f32> = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let out = crate::kernels::decode::decode_attention(&flat, caches, shape);
    Ok(Tensor::from_vec(out, q.shape(), q.device())?.to_dtype(q.dtype())?)
}

/// q and k `(b, t, heads, head_dim)` with each head RMS-normalised, where the family has it.
fn head_norms(block: &Block, q: Tensor, k: Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    match &block.qk_norm {
        Some((qn, kn)) => Ok((ops::rms_norm(&q, qn, eps)?, ops::rms_norm(&k, kn, eps)?)),
        None => Ok((q, k)),
    }
}

/// One decoder layer: attention then MLP, each with a pre-norm (Gemma: and a post-norm) and a
/// residual (the composite graph: the reference the fused layer is tested against, and the
/// path of other devices and families).
fn block_forward(block: &Block, layer: usize, x: &Tensor, c: &LayerContext) -> Result<Tensor> {
    let (_, _, nh, nkv, hd) = c.shape;
    let (cos, sin, mask) = c.tables(layer);
    layer_forward(
        block,
        layer,
        x,
        &c.cfg,
        c.mode,
        (nh, nkv, hd),
        cos,
        sin,
        |q, k, v| Ok(ops::attention(&q, &k, &v, mask, c.scale)?),
    )
}

/// The layer's math around its attention, which `attend` computes from q, k and v
/// `(b, t, heads, head_dim)` (normed and rotated): over this forward's positions, or appending
/// them to a decode's cache first.
#[allow(clippy::too_many_arguments)]
fn layer_forward(
    block: &Block,
    layer: usize,
    x: &Tensor,
    cfg: &ModelConfig,
    mode: ForwardMode,
    (nh, nkv, hd): (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
    attend: impl FnOnce(Tensor, Tensor, Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let proj = |p: Proj, input: &Tensor| block.linear(p).forward(input, mode, layer, p);
    layer_forward_with(block, x, cfg, (nh, nkv, hd), (cos, sin), proj, attend)
}

/// [`layer_forward`] with the projections `proj` computes (a batch of rows over several
/// adapters: [`Llama::decode_batch`]).
fn layer_forward_with(
    block: &Block,
    x: &Tensor,
    cfg: &ModelConfig,
    (nh, nkv, hd): (usize, usize, usize),
    (cos, sin): (&Tensor, &Tensor),
    proj: impl Fn(Proj, &Tensor) -> Result<Tensor>,
    attend: impl FnOnce(Tensor, Tensor, Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let eps = cfg.rms_norm_eps;
    let h = ops::rms_norm(x, &block.attn_norm, eps)?;
    // (b, t, heads, d): the projections' own layout; the attention op reads it as it is.
    let q = proj(Proj::Q, &h)?.reshape((b, t, nh, hd))?;
    let k = proj(Proj::K, &h)?.reshape((b, t, nkv, hd))?;
    let v = proj(Proj::V, &h)?.reshape((b, t, nkv, hd))?;
    let (q, k) = head_norms(block, q, k, eps)?;
    let q = ops::rope_thd(&q, cos, sin)?;
    let k = ops::rope_thd(&k, cos, sin)?;
    let o = attend(q, k, v)?.reshape((b, t, nh * hd))?;
    let mut attn = proj(Proj::O, &o)?;
    if let Some((post_attn, _)) = &block.post_norms {
        attn = ops::rms_norm(&attn, post_attn, eps)?;
    }
    let x = (x + attn)?;
    let h = ops::rms_norm(&x, &block.mlp_norm, eps)?;
    let (gate, up) = (proj(Proj::Gate, &h)?, proj(Proj::Up, &h)?);
    let act = if cfg.arch.gelu_gate() {
        // tanh-approximated GELU, transformers' gelu_pytorch_tanh
        (gate.gelu()? * up)?
    } else {
        ops::silu_mul(&gate, &up)?
    };
    let mut mlp = proj(Proj::Down, &act)?;
    if let Some((_, post_mlp)) = &block.post_norms {
        mlp = ops::rms_norm(&mlp, post_mlp, eps)?;
    }
    Ok((&x + mlp)?)
}
