//! One optimizer step: micro-batches forward and backward, gradient accumulation, clipping,
//! the update ([`Update::run`]); what a supervised micro-batch computes ([`optimizer_step`]).
//! A preference step (`preference::micro_step`) runs through the same [`Update::run`].

use std::time::Instant;

use candle_core::{Tensor, Var};

use super::data::Batch;
use super::error::{Error, Result};
use super::model::{dropout_seed, ForwardMode, Llama};
use super::optim::{self, Optimizer};

/// Seconds of each part of an optimizer step.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepTimes {
    /// Forward and loss of every micro-batch.
    pub forward: f64,
    /// Backward of every micro-batch and the gradient accumulation.
    pub backward: f64,
    /// Clipping and the update.
    pub optimizer: f64,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepOutput {
    /// Token-weighted mean loss over the step's label tokens.
    pub loss: f64,
    /// Fraction of the step's label tokens the model ranked first, before the update.
    pub accuracy: f64,
    /// How many they were.
    pub correct: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens processed (padding excluded).
    pub tokens: usize,
    pub times: StepTimes,
    /// A preference step's reward metrics.
    pub rewards: Option<super::preference::RewardMetrics>,
}

/// One optimizer step over `micro_batches`: forward and loss, backward, gradient accumulation,
/// clipping, update. Each micro-batch's loss is weighted by its share of the step's label
/// tokens, so any split of the same examples into batch × accumulation gives the same gradient;
/// micro-batch `i` draws its dropout masks from `dropout_seed(seed, step, i)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn optimizer_step(
    model: &Llama,
    vars: &[Var],
    optimizer: &mut Optimizer,
    micro_batches: &[Batch],
    seed: u64,
    step: u64,
    learning_rate: f64,
    max_grad_norm: f64,
) -> Result<StepOutput> {
    let label_total: usize = micro_batches.iter().map(|b| b.label_tokens).sum();
    let update = Update {
        seed,
        step,
        learning_rate,
        max_grad_norm,
    };
    let mut out = update.run(model, vars, optimizer, micro_batches.len(), |mi, mode| {
        let batch = &micro_batches[mi];
        let loss_sum = model.batch_loss(batch, mode)?;
        let objective = (loss_sum.sum / label_total as f64)?;
        Ok(MicroStep {
            loss: objective.to_scalar::<f32>()? as f64,
            objective,
            correct: loss_sum.correct,
            tokens: batch.tokens,
        })
    })?;
    out.accuracy = out.correct as f64 / label_total.max(1) as f64;
    Ok(out)
}

/// What a micro-batch's forward gives the step: the tensor its backward starts from (weighted
/// by the micro-batch's share of the step), that share of the step's loss, the label tokens the
/// model ranked first, and the input tokens it read.
pub(crate) struct MicroStep {
    pub objective: Tensor,
    pub loss: f64,
    pub correct: usize,
    pub tokens: usize,
}

/// The optimizer step's settings.
pub(crate) struct Update {
    pub seed: u64,
    pub step: u64,
    pub learning_rate: f64,
    pub max_grad_norm: f64,
}

impl Update {
    /// Runs `micro` micro-batches through `forward` (micro-batch `i` with its dropout masks),
    /// a backward from each, accumulates the LoRA gradients, clips and updates.
    pub(crate) fn run(
        &self,
        model: &Llama,
        vars: &[Var],
        optimizer: &mut Optimizer,
        micro: usize,
        mut forward: impl FnMut(usize, ForwardMode) -> Result<MicroStep>,
    ) -> Result<StepOutput> {
        let (step, learning_rate) = (self.step, self.learning_rate);
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_value, mut tokens, mut correct) = (0f64, 0usize, 0usize);
        let mut times = StepTimes::default();
        for mi in 0..micro {
            let t0 = Instant::now();
            let mode = ForwardMode::train(dropout_seed(self.seed, step, mi as u64));
            let m = forward(mi, mode)?;
            tokens += m.tokens;
            correct += m.correct;
            loss_value += m.loss;
            let t1 = Instant::now();
            let store = m.objective.backward()?;
            for (i, g) in model.lora_grads(&store)?.iter().enumerate() {
                grads[i] = Some(match grads[i].take() {
                    None => g.clone(),
                    Some(acc) => (acc + g)?,
                });
            }
            drop(store);
            times.forward += (t1 - t0).as_secs_f64();
            times.backward += t1.elapsed().as_secs_f64();
        }
        if !loss_value.is_finite() {
            return Err(Error::Diverged {
                step: step + 1,
                reason: format!(
                    "the loss is {loss_value}; lower training.learning_rate (now {learning_rate})"
                ),
            });
        }
        let t2 = Instant::now();
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .map(|g| g.expect("every var has a gradient after the first micro-batch"))
            .collect();
        let grad_norm = optim::clip_grad_norm(&mut grads, self.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(Error::Diverged {
                step: step + 1,
                reason: format!(
                    "the gradient norm is {grad_norm}; lower training.learning_rate (now {learning_rate})"
                ),
            });
        }
        optimizer.step(vars, &grads, learning_rate)?;
        times.optimizer = t2.elapsed().as_secs_f64();
        Ok(StepOutput {
            loss: loss_value,
            accuracy: 0.0,
            correct,
            grad_norm,
            tokens,
            times,
            rewards: None,
        })
    }
}
