//! Optimizers (AdamW, SGD with momentum), the learning-rate schedule and gradient clipping.
//!
//! Written here rather than taken from candle-nn because a resumable run must save and restore
//! the optimizer state, and candle's optimizers keep theirs private.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::spec::{LrScheduler, OptimizerKind, TrainingSpec};
use crate::train::{Error, Result};

/// Learning rate before the update that follows `step` completed updates (Hugging Face's
/// `get_*_schedule_with_warmup` semantics: linear warmup from 0, then constant/linear/cosine).
pub fn learning_rate(t: &TrainingSpec, step: u64, total_steps: u64) -> f64 {
    let warmup = warmup_steps(t, total_steps);
    let base = t.learning_rate;
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total_steps.saturating_sub(warmup)).max(1) as f64;
    match t.lr_scheduler {
        LrScheduler::Constant => base,
        LrScheduler::Linear => base * (1.0 - progress).max(0.0),
        LrScheduler::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

pub fn warmup_steps(t: &TrainingSpec, total_steps: u64) -> u64 {
    if t.warmup_steps > 0 {
        t.warmup_steps as u64
    } else {
        (t.warmup_ratio * total_steps as f64).ceil() as u64
    }
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (0 = no clipping).
/// Returns the norm before clipping.
pub(crate) fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let coef = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// Per-parameter optimizer state.
pub struct Optimizer {
    kind: OptimizerKind,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    momentum: f64,
    /// Updates applied so far (Adam's bias correction).
    pub(crate) updates: u64,
    /// AdamW: exp_avg, exp_avg_sq. SGD: momentum buffer (first slot only).
    state: Vec<(Option<Tensor>, Option<Tensor>)>,
}

impl Optimizer {
    pub fn new(t: &TrainingSpec, n_params: usize) -> Optimizer {
        Optimizer {
            kind: t.optimizer,
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
            momentum: t.momentum,
            updates: 0,
            state: vec![(None, None); n_params],
        }
    }

    /// Applies one update to `vars` with their (accumulated, clipped) gradients.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.updates += 1;
        let t = self.updates as i32;
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let theta = var.as_tensor();
            match self.kind {
                OptimizerKind::Adamw => {
                    let (m, v) = &mut self.state[i];
                    let m_new = match m.take() {
                        Some(m) => ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?,
                        None => (g * (1.0 - self.beta1))?,
                    };
                    let v_new = match v.take() {
                        Some(v) => ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
                        None => (g.sqr()? * (1.0 - self.beta2))?,
                    };
                    let m_hat = (&m_new / (1.0 - self.beta1.powi(t)))?;
                    let v_hat = (&v_new / (1.0 - self.beta2.powi(t)))?;
                    let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
                    let decayed = (theta * (1.0 - lr * self.weight_decay))?;
                    var.set(&(decayed - (update * lr)?)?)?;
                    *m = Some(m_new);
                    *v = Some(v_new);
                }
                OptimizerKind::Sgd => {
                    let g = if self.weight_decay > 0.0 {
                        (g + (theta * self.weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let d = if self.momentum > 0.0 {
                        let buf = match self.state[i].0.take() {
                            Some(b) => ((b * self.momentum)? + &g)?,
                            None => g,
                        };
                        self.state[i].0 = Some(buf.clone());
                        buf
                    } else {
                        g
                    };
                    var.set(&(theta - (d * lr)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`, `{name}.momentum`).
    pub(crate) fn state_tensors(&self, names: &[String]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, (a, b)) in names.iter().zip(&self.state) {
            let first = if self.kind == OptimizerKind::Sgd {
                "momentum"
            } else {
                "exp_avg"
            };
            if let Some(a) = a {
                out.insert(format!("{name}.{first}"), a.clone());
            }
            if let Some(b) = b {
                out.insert(format!("{name}.exp_avg_sq"), b.clone());
            }
        }
        out
    }

    pub(crate) fn load_state(
        &mut self,
        names: &[String],
        tensors: &mut HashMap<String, Tensor>,
        updates: u64,
    ) -> Result<()> {
        let first = if self.kind == OptimizerKind::Sgd {
            "momentum"
        } else {
            "exp_avg"
        };
        for (i, name) in names.iter().enumerate() {
            let a = tensors.remove(&format!("{name}.{first}"));
            let b = tensors.remove(&format!("{name}.exp_avg_sq"));
            if updates > 0 && self.kind == OptimizerKind::Adamw && (a.is_none() || b.is_none()) {
                return Err(Error::Checkpoint(format!(
                    "optimizer state has no AdamW moments for {name}"
                )));
            }
            self.state[i] = (a, b);
        }
        self.updates = updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_hugging_face() {
        let mut t = TrainingSpec {
            learning_rate: 1.0,
            warmup_steps: 2,
            ..Default::default()
        };
        assert_eq!(learning_rate(&t, 0, 10), 0.0);
        assert_eq!(learning_rate(&t, 1, 10), 0.5);
        assert_eq!(learning_rate(&t, 2, 10), 1.0);
        assert_eq!(learning_rate(&t, 6, 10), 0.5);
        t.lr_scheduler = LrScheduler::Cosine;
        assert!((learning_rate(&t, 6, 10) - 0.5).abs() < 1e-12);
        assert!(learning_rate(&t, 10, 10).abs() < 1e-12);
        t.lr_scheduler = LrScheduler::Constant;
        assert_eq!(learning_rate(&t, 9, 10), 1.0);
        t.warmup_steps = 0;
        t.warmup_ratio = 0.25;
        assert_eq!(warmup_steps(&t, 10), 3);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // After one step Adam's bias-corrected update is g/|g| = ±1 per element (eps aside).
        let dev = candle_core::Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev).unwrap()).unwrap();
        let g = Tensor::new(&[0.5f32, -3.0], &dev).unwrap();
        let mut opt = Optimizer::new(&TrainingSpec::default(), 1);
        opt.step(std::slice::from_ref(&var), &[g], 0.1).unwrap();
        let v: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6,
            "{v:?}"
        );
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let dev = candle_core::Device::Cpu;
        let mut g = vec![Tensor::new(&[3.0f32, 4.0], &dev).unwrap()];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let v: Vec<f32> = g[0].to_vec1().unwrap();
        assert!(((v[0] * v[0] + v[1] * v[1]).sqrt() - 1.0).abs() < 1e-5);
    }
}
