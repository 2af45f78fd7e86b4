//! A decoder layer as one graph node whose backward is written out (CPU, float32 activations).
//!
//! Through candle's autograd a layer is some forty nodes, and every gradient that reaches a node
//! costs a zero-filled buffer plus an add (`GradStore::or_insert`), besides the composite ops
//! themselves. Here the layer is one node: the forward runs the fused kernels on plain buffers and
//! keeps what the backward needs (or nothing, under gradient checkpointing, and runs the forward
//! again in backward); the backward runs the chain rule by hand, hands each LoRA factor's gradient
//! to the step through the model's gradient stash, and returns the input gradient. The composite
//! path in `llama.rs` is the reference it is tested against, and what other devices run.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, TensorId};

use super::arch::Proj;
use super::weights::{lora_dropout, Block, FrozenWeight, GradStash, LayerContext, Linear};
use crate::kernels::lora::{self, Dropout, LoraDims, LoraSaved};
use crate::kernels::{attention, elementwise};
use crate::train::ops;
use crate::train::ops::f32_slice;
use crate::train::timing::{self, Part};

type Result<T> = candle_core::Result<T>;

/// Runs `block` on `x` as one graph node. `recompute`: keep nothing for backward and run the
/// forward again there (gradient checkpointing).
pub(crate) fn forward(
    block: &Block,
    layer: usize,
    x: &Tensor,
    context: &LayerContext,
    stash: &GradStash,
    recompute: bool,
) -> Result<Tensor> {
    let op = LayerOp {
        block: block.clone(),
        layer,
        context: context.clone(),
        stash: stash.clone(),
        keep: x.track_op() && !recompute,
        saved: Mutex::new(None),
    };
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

struct LayerOp {
    block: Block,
    layer: usize,
    context: LayerContext,
    stash: GradStash,
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

/// Activations the backward pass reads.
struct Saved {
    h1: Vec<f32>,
    /// q and k after the rotary embedding.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    x1: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// What each projection's LoRA branch keeps, in [`Proj::ALL`] order.
    lora: [Option<LoraSaved>; 7],
}

/// A tensor's values as a float32 vector (small tensors: norms, biases, LoRA factors).
fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

/// The weight as a dense tensor (a cheap handle for dense weights; quantized ones are unpacked).
fn dense(w: &FrozenWeight) -> Result<Tensor> {
    match w {
        FrozenWeight::Dense(t) => Ok(t.clone()),
        FrozenWeight::Quantized(q) => timing::scope(Part::Dequantize, || {
            q.dequantize(&Device::Cpu, DType::F32)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        }),
    }
}

impl LayerOp {
    fn dropout(&self, lin: &Linear, proj: Proj) -> Option<Dropout> {
        lora_dropout(self.context.mode, lin.lora.as_ref()?, self.layer, proj)
    }

    /// `x · Wᵀ + bias + LoRA(x)` for projection `proj`.
    fn linear(&self, proj: Proj, x: &[f32]) -> Result<(Vec<f32>, Option<LoraSaved>)> {
        let lin = self.block.linear(proj);
        let mut y = ops::cpu_frozen(x, &dense(&lin.weight)?, true)?;
        if let Some(bias) = &lin.bias {
            let bias = host(bias)?;
            timing::scope(Part::Elementwise, || {
                y.chunks_exact_mut(bias.len())
                    .for_each(|row| row.iter_mut().zip(&bias).for_each(|(y, b)| *y += b))
            });
        }
        let Some(l) = lin.lora.as_ref().filter(|_| self.context.mode.adapter) else {
            return Ok((y, None));
        };
        let (a, b) = (host(l.a.as_tensor())?, host(l.b.as_tensor())?);
        let (rank, inputs) = l.a.as_tensor().dims2()?;
        let dims = LoraDims {
            rank,
            inputs,
            outputs: l.b.as_tensor().dim(0)?,
        };
        let dropout = self.dropout(lin, proj);
        let saved = timing::scope(Part::Lora, || {
            lora::forward_into(&mut y, x, (&a, &b), dims, l.scale as f32, dropout)
        });
        Ok((y, Some(saved)))
    }

    /// The input gradient of projection `proj` for output gradient `g`; LoRA gradients go to
    /// `grads`.
    fn linear_backward(
        &self,
        proj: Proj,
        x: &[f32],
        g: &[f32],
        saved: Option<&LoraSaved>,
        grads: &mut Vec<(TensorId, Tensor)>,
    ) -> Result<Vec<f32>> {
        let lin = self.block.linear(proj);
        let mut dx = ops::cpu_frozen(g, &dense(&lin.weight)?, false)?;
        if let (Some(l), Some(saved)) = (&lin.lora, saved) {
            let (a, b) = (host(l.a.as_tensor())?, host(l.b.as_tensor())?);
            let (rank, inputs) = l.a.as_tensor().dims2()?;
            let outputs = l.b.as_tensor().dim(0)?;
            let dims = LoraDims {
                rank,
                inputs,
                outputs,
            };
            let (da, db) = timing::scope(Part::Lora, || {
                lora::backward(g, x, saved, (&a, &b), dims, l.scale as f32, Some(&mut dx))
            });
            grads.push((
                l.a.id(),
                Tensor::from_vec(da, (rank, inputs), &Device::Cpu)?,
            ));
            grads.push((
                l.b.id(),
                Tensor::from_vec(db, (outputs, rank), &Device::Cpu)?,
            ));
        }
        Ok(dx)
    }

    fn rope_tables(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((host(&self.context.cos)?, host(&self.context.sin)?))
    }

    fn attention(&self) -> attention::CausalAttention {
        let c = &self.context;
        let window = c.cfg.sliding_window.unwrap_or(usize::MAX);
        // bf16 frozen weights on the CPU mean compute_dtype bf16: the attention products follow
        let bf16 = matches!(&self.block.linear(Proj::Q).weight,
            FrozenWeight::Dense(w) if w.dtype() == DType::BF16);
        attention::kernels(c.shape, c.scale, window, c.packing.clone(), bf16)
    }

    fn run_forward(&self, x: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let c = &self.context;
        let (_, _, nh, nkv, _) = c.shape;
        let eps = c.cfg.rms_norm_eps;
        let (w1, w2) = (host(&self.block.attn_norm)?, host(&self.block.mlp_norm)?);
        let (cos, sin) = self.rope_tables()?;
        // one table row per position (t), or per position of every packed row (b·t)
        let table_rows = cos.len() / (c.shape.4 / 2);
        let h1 = timing::scope(Part::Elementwise, || elementwise::rms_norm(x, &w1, eps));
        let (mut q, lq) = self.linear(Proj::Q, &h1)?;
        let (mut k, lk) = self.linear(Proj::K, &h1)?;
        let (v, lv) = self.linear(Proj::V, &h1)?;
        timing::scope(Part::Elementwise, || {
            elementwise::rope(&mut q, nh, table_rows, &cos, &sin, false);
            elementwise::rope(&mut k, nkv, table_rows, &cos, &sin, false);
        });
        let (probs, attn) = timing::scope(Part::Attention, || self.attention().forward(&q, &k, &v));
        let (mut x1, lo) = self.linear(Proj::O, &attn)?;
        timing::scope(Part::Elementwise, || elementwise::add_in_place(&mut x1, x));
        let h2 = timing::scope(Part::Elementwise, || elementwise::rms_norm(&x1, &w2, eps));
        let (gate, lg) = self.linear(Proj::Gate, &h2)?;
        let (up, lu) = self.linear(Proj::Up, &h2)?;
        let act = timing::scope(Part::Elementwise, || {
            elementwise::silu_mul_forward(&gate, &up)
        });
        let (mut y, ld) = self.linear(Proj::Down, &act)?;
        timing::scope(Part::Elementwise, || elementwise::add_in_place(&mut y, &x1));
        let saved = Saved {
            h1,
            q,
            k,
            v,
            probs,
            attn,
            x1,
            h2,
            gate,
            up,
            act,
            lora: [lq, lk, lv, lo, lg, lu, ld],
        };
        Ok((y, saved))
    }

    /// The input gradient for the output gradient `gy`; LoRA gradients go to `grads`.
    fn run_backward(
        &self,
        x: &[f32],
        s: &Saved,
        gy: &[f32],
        grads: &mut Vec<(TensorId, Tensor)>,
    ) -> Result<Vec<f32>> {
        let c = &self.context;
        let (_, _, nh, nkv, _) = c.shape;
        let eps = c.cfg.rms_norm_eps;
        let (w1, w2) = (host(&self.block.attn_norm)?, host(&self.block.mlp_norm)?);
        let (cos, sin) = self.rope_tables()?;
        // one table row per position (t), or per position of every packed row (b·t)
        let table_rows = cos.len() / (c.shape.4 / 2);
        let lora = |p: Proj| s.lora[p as usize].as_ref();
        // MLP: y = x1 + down(silu(gate(h2)) · up(h2)), h2 = rms(x1)
        let d_act = self.linear_backward(Proj::Down, &s.act, gy, lora(Proj::Down), grads)?;
        let (d_gate, d_up) = timing::scope(Part::Elementwise, || {
            elementwise::silu_mul_backward(&s.gate, &s.up, &d_act)
        });
        drop(d_act);
        let mut d_h2 = self.linear_backward(Proj::Gate, &s.h2, &d_gate, lora(Proj::Gate), grads)?;
        let d_h2_up = self.linear_backward(Proj::Up, &s.h2, &d_up, lora(Proj::Up), grads)?;
        let dx1 = timing::scope(Part::Elementwise, || {
            elementwise::add_in_place(&mut d_h2, &d_h2_up);
            let mut dx1 = elementwise::rms_norm_grad(&s.x1, &d_h2, &w2, eps);
            elementwise::add_in_place(&mut dx1, gy);
            dx1
        });
        drop((d_gate, d_up, d_h2, d_h2_up));
        // Attention: x1 = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = rms(x)
        let d_attn = self.linear_backward(Proj::O, &s.attn, &dx1, lora(Proj::O), grads)?;
        let (mut dq, mut dk, dv) = timing::scope(Part::Attention, || {
            self.attention()
                .backward(&s.q, &s.k, &s.v, &s.probs, &d_attn)
        });
        timing::scope(Part::Elementwise, || {
            elementwise::rope(&mut dq, nh, table_rows, &cos, &sin, true);
            elementwise::rope(&mut dk, nkv, table_rows, &cos, &sin, true);
        });
        let mut d_h1 = self.linear_backward(Proj::Q, &s.h1, &dq, lora(Proj::Q), grads)?;
        let d_h1_k = self.linear_backward(Proj::K, &s.h1, &dk, lora(Proj::K), grads)?;
        let d_h1_v = self.linear_backward(Proj::V, &s.h1, &dv, lora(Proj::V), grads)?;
        timing::scope(Part::Elementwise, || {
            elementwise::add_in_place(&mut d_h1, &d_h1_k);
            elementwise::add_in_place(&mut d_h1, &d_h1_v);
            let mut dx = elementwise::rms_norm_grad(x, &d_h1, &w1, eps);
            elementwise::add_in_place(&mut dx, &dx1);
            Ok(dx)
        })
    }
}

impl CustomOp1 for LayerOp {
    fn name(&self) -> &'static str {
        "decoder-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "fused layer input")?;
        let (y, saved) = self.run_forward(x)?;
        if self.keep {
            *self.saved.lock().expect("no panics while holding it") = Some(saved);
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("fused layer: runs on the CPU only")
        };
        let x_ = f32_slice(xs, xl, "fused layer input")?;
        let gy = f32_slice(gs, gl, "fused layer output gradient")?;
        let kept = self
            .saved
            .lock()
            .expect("no panics while holding it")
            .take();
        let saved = match kept {
            Some(saved) => saved,
            // Gradient checkpointing: the forward again, from the layer's input.
            None => self.run_forward(x_)?.1,
        };
        let mut grads = Vec::new();
        let dx = self.run_backward(x_, &saved, gy, &mut grads)?;
        drop(saved);
        self.stash
            .lock()
            .expect("no panics while holding it")
            .extend(grads);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
