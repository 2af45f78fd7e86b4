//! Building a [`Llama`] from a weight source: the frozen weights in the layout the spec asks
//! for (dense in its dtype, re-quantized, or GGUF blocks kept as they are), Phi-3's fused
//! checkpoint modules split, and fresh LoRA factors initialised as PEFT does.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::arch::{LoraModule, Proj};
use super::config::ModelConfig;
use super::source::WeightSource;
use super::weights::{mix_seed, Block, FrozenWeight, FusedRows, Linear, LoraAdapter};
use super::Llama;
use crate::spec::{LoraSpec, QuantType, QuantizationSpec};
use crate::train::quant::{Kind4, QuantizedWeight};
use crate::train::Result;

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
        let mut fused_split;
        let weights: &mut dyn WeightSource = if cfg.arch == super::Arch::Phi3 {
            fused_split = FusedSplit::new(weights, &cfg);
            &mut fused_split
        } else {
            weights
        };
        let adds_one = cfg.arch.norm_adds_one();
        // Gemma's norms scale by (1 + w): the one is added here, once.
        let norm = |weights: &mut dyn WeightSource, name: &str, dim: usize| -> Result<Tensor> {
            let w = take_dense(weights, name, &[dim], dtype, device)?;
            Ok(if adds_one { (w + 1.0)? } else { w })
        };
        let modules = cfg.arch.lora_targets(&lora.target_modules)?;
        let embed = take_dense(
            weights,
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            dtype,
            device,
        )?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for layer in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let attn_norm = norm(weights, &format!("{p}.input_layernorm.weight"), h)?;
            let (mlp_norm, post_norms) = if cfg.arch.has_sandwich_norms() {
                let pre_mlp = norm(weights, &format!("{p}.pre_feedforward_layernorm.weight"), h)?;
                let post_attn = norm(weights, &format!("{p}.post_attention_layernorm.weight"), h)?;
                let post_mlp = norm(
                    weights,
                    &format!("{p}.post_feedforward_layernorm.weight"),
                    h,
                )?;
                (pre_mlp, Some((post_attn, post_mlp)))
            } else {
                let pre_mlp = norm(weights, &format!("{p}.post_attention_layernorm.weight"), h)?;
                (pre_mlp, None)
            };
            let qk_norm = if cfg.arch.has_qk_norm() {
                let hd = cfg.head_dim;
                Some((
                    norm(weights, &format!("{p}.self_attn.q_norm.weight"), hd)?,
                    norm(weights, &format!("{p}.self_attn.k_norm.weight"), hd)?,
                ))
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
                Ok(Linear {
                    weight,
                    bias,
                    lora: None,
                })
            };
            let mut block = Block {
                attn_norm,
                mlp_norm,
                qk_norm,
                post_norms,
                q_proj: linear(Proj::Q)?,
                k_proj: linear(Proj::K)?,
                v_proj: linear(Proj::V)?,
                o_proj: linear(Proj::O)?,
                gate_proj: linear(Proj::Gate)?,
                up_proj: linear(Proj::Up)?,
                down_proj: linear(Proj::Down)?,
            };
            attach_lora(&mut block, layer, &cfg, &modules, lora, seed, device, dtype)?;
            blocks.push(block);
        }
        let norm = norm(weights, "model.norm.weight", h)?;
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
        let modules = match lora {
            Some(l) => self.cfg.arch.lora_targets(&l.target_modules)?,
            None => Vec::new(),
        };
        let mut blocks = self.blocks.clone();
        for (layer, block) in blocks.iter_mut().enumerate() {
            for proj in Proj::ALL {
                block.linear_mut(proj).lora = None;
            }
            if let Some(spec) = lora {
                let dtype = self.embed.dtype();
                attach_lora(
                    block,
                    layer,
                    &self.cfg,
                    &modules,
                    spec,
                    seed,
                    &self.device,
                    dtype,
                )?;
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
}

pub(crate) fn take_dense(
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
pub(crate) fn quantize_weight(
    weights: &mut dyn WeightSource,
    name: &str,
    shape: (usize, usize),
    q: &QuantizationSpec,
    device: &Device,
) -> Result<QuantizedWeight> {
    let kind = q.kind;
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
    let double_quant = q.double_quant;
    Ok(match kind {
        QuantType::Nf4 => QuantizedWeight::four_bit(&dense, Kind4::Nf4, double_quant)?,
        QuantType::Fp4 => QuantizedWeight::four_bit(&dense, Kind4::Fp4, double_quant)?,
        QuantType::Int8 => QuantizedWeight::int8(&dense)?,
        QuantType::Gguf => unreachable!("handled above"),
    })
}

pub(crate) fn init_lora(
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
        fused: None,
    })
}

/// Attaches fresh LoRA factors to the projections of `modules` in one layer (B = 0). A fused
/// module's projections share one A and one B, each taking its rows of B.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attach_lora(
    block: &mut Block,
    layer: usize,
    cfg: &ModelConfig,
    modules: &[LoraModule],
    spec: &LoraSpec,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<()> {
    for module in modules {
        let first = module.projs[0];
        let in_dim = cfg.linear_shape(first).1;
        let out_dim: usize = module.projs.iter().map(|&p| cfg.linear_shape(p).0).sum();
        let seed = mix_seed(&[seed, layer as u64, first as u64]);
        let adapter = init_lora(spec, out_dim, in_dim, seed, device, dtype)?;
        let mut start = 0;
        for &proj in module.projs {
            let len = cfg.linear_shape(proj).0;
            let fused = (module.projs.len() > 1).then_some(FusedRows { start, len, first });
            block.linear_mut(proj).lora = Some(LoraAdapter {
                fused,
                ..adapter.clone()
            });
            start += len;
        }
    }
    Ok(())
}

/// Phi-3's checkpoints fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; the model
/// keeps separate projections (one layer code for every family), split here by rows on load.
pub(crate) struct FusedSplit<'a> {
    inner: &'a mut dyn WeightSource,
    /// The other parts of a fused tensor already read.
    parts: std::collections::HashMap<String, Tensor>,
    /// (fused module, its parts, their rows)
    fusions: [(&'static str, Vec<(&'static str, usize)>); 2],
}

impl<'a> FusedSplit<'a> {
    fn new(inner: &'a mut dyn WeightSource, cfg: &ModelConfig) -> FusedSplit<'a> {
        let rows = |p: Proj| cfg.linear_shape(p).0;
        FusedSplit {
            inner,
            parts: Default::default(),
            fusions: [
                (
                    "self_attn.qkv_proj",
                    vec![
                        ("self_attn.q_proj", rows(Proj::Q)),
                        ("self_attn.k_proj", rows(Proj::K)),
                        ("self_attn.v_proj", rows(Proj::V)),
                    ],
                ),
                (
                    "mlp.gate_up_proj",
                    vec![
                        ("mlp.gate_proj", rows(Proj::Gate)),
                        ("mlp.up_proj", rows(Proj::Up)),
                    ],
                ),
            ],
        }
    }
}

impl WeightSource for FusedSplit<'_> {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        if let Some(t) = self.parts.remove(name) {
            return Ok(Some(t));
        }
        for (fused, parts) in &self.fusions {
            let Some((part, _)) = parts.iter().find(|(p, _)| name.contains(&format!(".{p}.")))
            else {
                continue;
            };
            let fused_name = name.replacen(part, fused, 1);
            let Some(whole) = self.inner.take(&fused_name)? else {
                return Err(crate::train::Error::Model(format!(
                    "weight {fused_name:?} is missing from the checkpoint"
                )));
            };
            let expected: usize = parts.iter().map(|(_, r)| r).sum();
            if whole.dim(0)? != expected {
                return Err(crate::train::Error::Model(format!(
                    "weight {fused_name:?} has {} rows, the config implies {expected}",
                    whole.dim(0)?
                )));
            }
            let mut start = 0;
            for (p, rows) in parts {
                self.parts.insert(
                    name.replacen(part, p, 1),
                    whole.narrow(0, start, *rows)?.contiguous()?,
                );
                start += rows;
            }
            return Ok(self.parts.remove(name));
        }
        self.inner.take(name)
    }
}
