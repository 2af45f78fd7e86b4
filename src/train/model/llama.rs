//! The Llama-family decoder (llama, mistral, qwen2, qwen3) as a trainable candle graph.
//!
//! Base weights are plain tensors (never `Var`s), so they cannot change; only the LoRA factors are
//! `Var`s. Every op on the path from a LoRA factor to the loss has a backward (see `ops`).

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use std::sync::Arc;

use candle_core::quantized::QTensor;

use super::config::{ModelConfig, Proj};
use super::weights::{
    lora_dropout, mix_seed, Block, ForwardMode, FrozenWeight, GradStash, LayerContext, Linear,
    LoraAdapter,
};
use crate::spec::{LoraSpec, QuantType, QuantizationSpec};
use crate::train::ops;
use crate::train::quant::{self, Kind4, QuantizedWeight};
use crate::train::Result;

impl Linear {
    /// The composite-graph forward: `x · Wᵀ + bias + scale · B · A · dropout(x)`.
    fn forward(&self, x: &Tensor, mode: ForwardMode, layer: usize, proj: Proj) -> Result<Tensor> {
        let mut y = match &self.weight {
            FrozenWeight::Dense(w) => ops::frozen_matmul(x, w)?,
            FrozenWeight::Quantized(q) => quant::quantized_matmul(x, q)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let Some(lora) = &self.lora else {
            return Ok(y);
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
            let mask = d
                .mask(x32.elem_count(), x.device())?
                .to_dtype(x32.dtype())?;
            x32 = x32.mul(&mask.reshape(x32.shape())?)?;
        }
        let delta = (x32.matmul(&a.t()?)?.matmul(&b.t()?)? * lora.scale)?;
        let delta = delta.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + delta)?)
    }
}

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
    pub decode_head: Option<std::sync::Arc<QTensor>>,
    /// LoRA gradients computed by fused or recomputed layers during a backward pass, by
    /// variable id; [`Llama::lora_grads`] hands them to the optimizer step.
    layer_grads: GradStash,
}

/// Source of named base weights in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>>;
    /// The weight in its stored quantized type, for sources that have one (GGUF).
    fn take_quantized(&mut self, _name: &str) -> Result<Option<QTensor>> {
        Ok(None)
    }
}

impl Llama {
    /// Builds the model from frozen weights and fresh LoRA factors (seeded).
    pub fn load(
        cfg: ModelConfig,
        weights: &mut dyn WeightSource,
        lora: &LoraSpec,
        quantization: Option<&QuantizationSpec>,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Llama> {
        // bf16 on the CPU stores the frozen linear weights in bf16 (half the memory, oneDNN's
        // bf16 kernels); activations, norms, embeddings and LoRA stay f32 there, as under
        // PyTorch's autocast. On CUDA the whole base takes the dtype.
        let (dtype, linear_dtype) = if device.is_cpu() && dtype == DType::BF16 {
            (DType::F32, DType::BF16)
        } else {
            (dtype, dtype)
        };
        let h = cfg.hidden_size;
        let embed = take_dense(
            weights,
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            dtype,
            device,
        )?;
        let targets = lora.target_modules.names();
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for layer in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let attn_norm = take_dense(
                weights,
                &format!("{p}.input_layernorm.weight"),
                &[h],
                dtype,
                device,
            )?;
            let mlp_norm = take_dense(
                weights,
                &format!("{p}.post_attention_layernorm.weight"),
                &[h],
                dtype,
                device,
            )?;
            let qk_norm = if cfg.arch.has_qk_norm() {
                let mut norm = |which: &str| {
                    take_dense(
                        weights,
                        &format!("{p}.self_attn.{which}.weight"),
                        &[cfg.head_dim],
                        dtype,
                        device,
                    )
                };
                Some((norm("q_norm")?, norm("k_norm")?))
            } else {
                None
            };
            let mut linear = |proj: Proj| -> Result<Linear> {
                let (out_dim, in_dim) = cfg.linear_shape(proj);
                let name = format!("{p}.{}.{}.weight", proj.group(), proj.name());
                let weight = match quantization {
                    None => FrozenWeight::Dense(take_dense(
                        weights,
                        &name,
                        &[out_dim, in_dim],
                        linear_dtype,
                        device,
                    )?),
                    Some(q) => FrozenWeight::Quantized(Arc::new(quantize_weight(
                        weights,
                        &name,
                        (out_dim, in_dim),
                        q,
                        device,
                    )?)),
                };
                let bias = if cfg.attention_bias && proj.is_qkv() {
                    Some(take_dense(
                        weights,
                        &format!("{p}.{}.{}.bias", proj.group(), proj.name()),
                        &[out_dim],
                        dtype,
                        device,
                    )?)
                } else {
                    None
                };
                let lora = if targets.iter().any(|t| t == proj.name()) {
                    Some(init_lora(
                        lora,
                        out_dim,
                        in_dim,
                        mix_seed(&[seed, layer as u64, proj as u64]),
                        device,
                        dtype,
                    )?)
                } else {
                    None
                };
                Ok(Linear { weight, bias, lora })
            };
            blocks.push(Block {
                attn_norm,
                mlp_norm,
                qk_norm,
                q_proj: linear(Proj::Q)?,
                k_proj: linear(Proj::K)?,
                v_proj: linear(Proj::V)?,
                o_proj: linear(Proj::O)?,
                gate_proj: linear(Proj::Gate)?,
                up_proj: linear(Proj::Up)?,
                down_proj: linear(Proj::Down)?,
            });
        }
        let norm = take_dense(weights, "model.norm.weight", &[h], dtype, device)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(take_dense(
                weights,
                "lm_head.weight",
                &[cfg.vocab_size, h],
                dtype,
                device,
            )?)
        };
        Ok(Llama {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            device: device.clone(),
            gradient_checkpointing: false,
            decode_head: None,
            layer_grads: Default::default(),
        })
    }

    /// The same model with fresh LoRA factors as `lora` asks (B = 0, so the output is the
    /// base's until an adapter is loaded into them), or none when `lora` is `None`. The base
    /// weights are shared, not copied: many adapters can sit over one base in memory.
    pub fn with_lora(&self, lora: Option<&LoraSpec>, seed: u64) -> Result<Llama> {
        let targets = lora.map(|l| l.target_modules.names()).unwrap_or_default();
        let mut blocks = self.blocks.clone();
        for (layer, block) in blocks.iter_mut().enumerate() {
            for proj in Proj::ALL {
                let (out_dim, in_dim) = self.cfg.linear_shape(proj);
                let attach = lora.filter(|_| targets.iter().any(|t| t == proj.name()));
                block.linear_mut(proj).lora = match attach {
                    Some(spec) => Some(init_lora(
                        spec,
                        out_dim,
                        in_dim,
                        mix_seed(&[seed, layer as u64, proj as u64]),
                        &self.device,
                        self.embed.dtype(),
                    )?),
                    None => None,
                };
            }
        }
        Ok(Llama {
            cfg: self.cfg.clone(),
            embed: self.embed.clone(),
            blocks,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            device: self.device.clone(),
            gradient_checkpointing: false,
            decode_head: self.decode_head.clone(),
            layer_grads: Default::default(),
        })
    }

    /// Bytes of the LoRA factors (what an adapter view adds to its base).
    pub fn lora_bytes(&self) -> usize {
        self.lora_vars()
            .iter()
            .map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every trainable tensor with its PEFT name (without the `.weight` suffix's prefix), in a
    /// fixed order: `model.layers.{i}.self_attn.q_proj.lora_A`.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            for (proj, lin) in block.linears() {
                if let Some(l) = &lin.lora {
                    let base = format!("model.layers.{layer}.{}.{}", proj.group(), proj.name());
                    out.push((format!("{base}.lora_A"), l.a.clone()));
                    out.push((format!("{base}.lora_B"), l.b.clone()));
                }
            }
        }
        out
    }

    /// Final hidden states `(b, t, hidden)` for token ids `(b, t)`. Sequences are right-padded,
    /// so the causal mask alone keeps real tokens from seeing padding.
    pub fn hidden_states(&self, ids: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let dtype = self.embed.dtype();
        let (cos, sin) = self.rope_tables(t, dtype)?;
        let mask = self.attention_mask(t, dtype)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x =
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, cfg.hidden_size))?;
        let context = LayerContext {
            cfg: cfg.clone(),
            cos,
            sin,
            mask,
            scale,
            shape: (b, t, nh, nkv, hd),
            mode,
        };
        let checkpoint = self.gradient_checkpointing && mode.train;
        // the fused CPU layer has no per-head q/k norm: those families take the composite graph
        if ops::fused_applies(&x) && !cfg.arch.has_qk_norm() {
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
        let h = self.hidden_states(ids, mode)?;
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
                // (b, t, kv_heads, d): positions along dim 1, grown 256 at a time
                .map(|_| candle_nn::kv_cache::KvCache::new(1, 256))
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
        let (cos, sin) = self.rope_tables_from(offset, n, dtype)?;
        let total = offset + n;
        let mask = self.attention_mask_rows(offset, n, total, dtype)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = self
            .embed
            .index_select(&ids, 0)?
            .reshape((1, n, cfg.hidden_size))?;
        let mode = ForwardMode::EVAL;
        for (layer, block) in self.blocks.iter().enumerate() {
            let proj = |p: Proj, input: &Tensor| block.linear(p).forward(input, mode, layer, p);
            let h = ops::rms_norm(&x, &block.attn_norm, cfg.rms_norm_eps)?;
            let q = proj(Proj::Q, &h)?.reshape((1, n, nh, hd))?;
            let k = proj(Proj::K, &h)?.reshape((1, n, nkv, hd))?;
            let v = proj(Proj::V, &h)?.reshape((1, n, nkv, hd))?;
            let (q, k) = head_norms(block, q, k, cfg.rms_norm_eps)?;
            let q = ops::rope_thd(&q, &cos, &sin)?;
            let k = ops::rope_thd(&k, &cos, &sin)?;
            let (k, v) = cache.layers[layer].append(&k.contiguous()?, &v.contiguous()?)?;
            let o = ops::attention(&q, &k, &v, &mask, scale)?.reshape((1, n, nh * hd))?;
            x = (x + proj(Proj::O, &o)?)?;
            let h = ops::rms_norm(&x, &block.mlp_norm, cfg.rms_norm_eps)?;
            let mlp = ops::silu_mul(&proj(Proj::Gate, &h)?, &proj(Proj::Up, &h)?)?;
            x = (&x + proj(Proj::Down, &mlp)?)?;
        }
        cache.len = total;
        let last = x.narrow(1, n - 1, 1)?;
        let last = ops::rms_norm(&last, &self.norm, cfg.rms_norm_eps)?;
        let logits = match &self.decode_head {
            Some(q) if last.dtype() == DType::F32 => last.apply_op1_no_bwd(q.as_ref())?,
            _ => ops::frozen_matmul(&last, self.lm_head_weight())?,
        };
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }

    fn rope_tables(&self, t: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        self.rope_tables_from(0, t, dtype)
    }

    /// cos and sin `(t, head_dim / 2)` of positions `start .. start + t`.
    fn rope_tables_from(&self, start: usize, t: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let inv = self.cfg.rope_inv_freq();
        let half = inv.len();
        let mut freqs = Vec::with_capacity(t * half);
        for pos in start..start + t {
            freqs.extend(inv.iter().map(|f| pos as f32 * f));
        }
        let freqs = Tensor::from_vec(freqs, (t, half), &self.device)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    fn attention_mask(&self, t: usize, dtype: DType) -> Result<Tensor> {
        self.attention_mask_rows(0, t, t, dtype)
    }

    /// The additive causal (and sliding-window) mask `(rows, total)` of the query positions
    /// `first .. first + rows` over key positions `0 .. total`.
    fn attention_mask_rows(
        &self,
        first: usize,
        rows: usize,
        total: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
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

/// The keys and values of every position a decode has run, per layer.
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn take_dense(
    weights: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = weights.take(name)?.ok_or_else(|| {
        crate::train::Error::Model(format!("weight {name:?} is missing from the checkpoint"))
    })?;
    if t.dims() != shape {
        return Err(crate::train::Error::Model(format!(
            "weight {name:?} has shape {:?}, the config implies {shape:?}",
            t.dims()
        )));
    }
    Ok(t.to_dtype(dtype)?.to_device(device)?.contiguous()?)
}

/// The frozen weight `name` in the layout the spec asks for. Re-quantizing types go through a
/// float32 copy that is dropped right after; `gguf` takes the file's own tensor as it is.
fn quantize_weight(
    weights: &mut dyn WeightSource,
    name: &str,
    shape: (usize, usize),
    q: &QuantizationSpec,
    device: &Device,
) -> Result<QuantizedWeight> {
    let kind = q.kind.unwrap_or(QuantType::Nf4);
    if kind == QuantType::Gguf {
        let t = weights.take_quantized(name)?.ok_or_else(|| {
            crate::train::Error::Model(format!("weight {name:?} is not in the GGUF file"))
        })?;
        if t.shape().dims2()? != shape {
            return Err(crate::train::Error::Model(format!(
                "weight {name:?} has shape {:?}, the config implies {shape:?}",
                t.shape().dims()
            )));
        }
        return Ok(QuantizedWeight::Ggml(Arc::new(t)));
    }
    let dense = take_dense(weights, name, &[shape.0, shape.1], DType::F32, device)?;
    let double_quant = q.double_quant.unwrap_or(true);
    Ok(match kind {
        QuantType::Nf4 => QuantizedWeight::four_bit(&dense, Kind4::Nf4, double_quant)?,
        QuantType::Fp4 => QuantizedWeight::four_bit(&dense, Kind4::Fp4, double_quant)?,
        QuantType::Int8 => QuantizedWeight::int8(&dense)?,
        QuantType::Gguf => unreachable!("handled above"),
    })
}

fn init_lora(
    spec: &LoraSpec,
    out_dim: usize,
    in_dim: usize,
    seed: u64,
    device: &Device,
    base_dtype: DType,
) -> Result<LoraAdapter> {
    // Adapters train in float32 whatever the base dtype; a float64 base (gradient checks) keeps f64.
    let lora_dtype = if base_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let r = spec.r as usize;
    // PEFT: kaiming_uniform_(A, a=√5) ⇒ U(−1/√in, 1/√in); B = 0 so training starts at the base model.
    let bound = 1.0 / (in_dim as f32).sqrt();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let a: Vec<f32> = (0..r * in_dim)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let a = Var::from_tensor(&Tensor::from_vec(a, (r, in_dim), device)?.to_dtype(lora_dtype)?)?;
    let b = Var::zeros((out_dim, r), lora_dtype, device)?;
    Ok(LoraAdapter {
        a,
        b,
        scale: spec.scale(),
        dropout: spec.dropout,
    })
}

/// q and k `(b, t, heads, head_dim)` with each head RMS-normalised, where the family has it.
fn head_norms(block: &Block, q: Tensor, k: Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    match &block.qk_norm {
        Some((qn, kn)) => Ok((ops::rms_norm(&q, qn, eps)?, ops::rms_norm(&k, kn, eps)?)),
        None => Ok((q, k)),
    }
}

/// One decoder layer: attention then MLP, each with a pre-norm and a residual (the composite
/// graph: the reference the fused layer is tested against, and the path of other devices).
fn block_forward(block: &Block, layer: usize, x: &Tensor, c: &LayerContext) -> Result<Tensor> {
    let (b, t, nh, nkv, hd) = c.shape;
    let mode = c.mode;
    let proj = |p: Proj, input: &Tensor| block.linear(p).forward(input, mode, layer, p);
    let h = ops::rms_norm(x, &block.attn_norm, c.cfg.rms_norm_eps)?;
    // (b, t, heads, d): the projections' own layout; the attention op reads it as it is.
    let q = proj(Proj::Q, &h)?.reshape((b, t, nh, hd))?;
    let k = proj(Proj::K, &h)?.reshape((b, t, nkv, hd))?;
    let v = proj(Proj::V, &h)?.reshape((b, t, nkv, hd))?;
    let (q, k) = head_norms(block, q, k, c.cfg.rms_norm_eps)?;
    let q = ops::rope_thd(&q, &c.cos, &c.sin)?;
    let k = ops::rope_thd(&k, &c.cos, &c.sin)?;
    let o = ops::attention(&q, &k, &v, &c.mask, c.scale)?.reshape((b, t, nh * hd))?;
    let x = (x + proj(Proj::O, &o)?)?;
    let h = ops::rms_norm(&x, &block.mlp_norm, c.cfg.rms_norm_eps)?;
    let mlp = ops::silu_mul(&proj(Proj::Gate, &h)?, &proj(Proj::Up, &h)?)?;
    Ok((&x + proj(Proj::Down, &mlp)?)?)
}
