//! The training engine: LoRA fine-tuning of a Llama-family model with candle.
//!
//! [`run`] takes a validated [`JobSpec`] and does, step after step, the four things training is
//! made of — forward, loss, backward, optimizer update ([`step::Update`]) — reporting
//! each step through a [`Reporter`] and checking it for cancellation between steps. It knows
//! nothing of HTTP or SQL: the CLI prints its events, the service stores and streams them.
//!
//! Modules: `model` (loading, the decoder), `ops` (differentiable fast ops), `tokenizer`
//! (tokenizer + chat template), `data` (JSONL → labelled examples → batches), `optim`
//! (AdamW/SGD, schedule, clipping), `trainer` (the step, evaluation, checkpoint saving),
//! `checkpoint` (PEFT adapter + resume state), `device` (device names and memory), `cost` (a
//! job's peak memory and work, estimated before it runs).

pub mod checkpoint;
pub(crate) mod cost;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod generate;
pub mod model;
pub(crate) mod ops;
pub(crate) mod optim;
pub mod preference;
pub(crate) mod quant;
pub mod report;
pub(crate) mod step;
#[cfg(test)]
mod testing;
pub(crate) mod timing;
pub mod tokenizer;
pub(crate) mod trainer;

use std::path::PathBuf;

use serde::Serialize;

pub use data::{DataSummary, DatasetFile, Datasets};
pub use error::{Error, Result};
pub use optim::Optimizer;
pub(crate) use report::Phase;
pub use report::{Event, Reporter, Silent};
pub use trainer::{evaluate, RunOptions};

use crate::spec::JobSpec;
use trainer::{Judgement, Trainer};

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub steps: u64,
    pub(crate) final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub adapter_dir: PathBuf,
    /// Under early stopping: the step whose checkpoint is the adapter.
    pub best_step: Option<u64>,
    /// Why the run ended before its last step, when early stopping ended it.
    pub stopped_early: Option<String>,
}

/// Runs a whole fine-tuning job. See the module docs.
pub fn run(spec: &JobSpec, opts: &RunOptions, reporter: &mut dyn Reporter) -> Result<Outcome> {
    let datasets = match &opts.datasets {
        Some(d) => d.clone(),
        None => Datasets::from_spec(spec)?,
    };
    let mut trainer = Trainer::prepare(spec, opts, &datasets, reporter)?;
    reporter.report(&Event::Phase(Phase::Training));
    let (mut last_loss, mut last_eval, mut stopped_early) = (None, None, None);
    for step in trainer.start_step..trainer.schedule.total_steps {
        if reporter.should_stop() {
            if step > trainer.start_step {
                trainer.save_checkpoint(step, reporter)?;
            }
            return Err(Error::Cancelled);
        }
        let metrics = trainer.train_step(step)?;
        last_loss = Some(metrics.train_loss);
        reporter.report(&Event::Step(metrics));
        let done = step + 1;
        let mut judged = Judgement::Continue;
        if trainer.eval_due(done) {
            let eval = trainer.evaluate_at(done)?;
            last_eval = Some(eval.eval_loss);
            judged = trainer.judge(done, eval.eval_loss);
            reporter.report(&Event::Eval(eval));
        }
        // the best step's checkpoint is the adapter, and a run stopped early ends on one: both
        // are written whatever the schedule says (the last step's by `finish`)
        let special = judged != Judgement::Continue;
        if (trainer.checkpoint_due(done) || special) && done != trainer.schedule.total_steps {
            trainer.save_checkpoint(done, reporter)?;
        }
        match judged {
            Judgement::Continue => {}
            Judgement::Improved => reporter.report(&Event::Best { step: done }),
            Judgement::Stop(why) => {
                tracing::info!(step = done, reason = %why, "stopping early");
                stopped_early = Some(why);
                break;
            }
        }
    }
    reporter.report(&Event::Phase(Phase::Saving));
    let adapter_dir = trainer.finish(reporter)?;
    Ok(Outcome {
        steps: trainer.steps_done(),
        final_loss: last_loss,
        eval_loss: last_eval,
        adapter_dir,
        best_step: trainer.best_step(),
        stopped_early,
    })
}

/// Whether the engine takes its fused CPU paths (the fused decoder layer and ops) or candle's
/// composite graph of stock ops: the same numbers either way, which the tests compare. On by
/// default; process-wide.
pub fn use_fused_paths(on: bool) {
    ops::set_fused(on);
}

/// Whether the frozen multiplies go through oneDNN when the library is installed (else gemm):
/// process-wide, for comparing the two; on by default.
pub fn use_onednn(on: bool) {
    crate::kernels::onednn::set_enabled(on);
}

/// Whether oneDNN's library was found on this machine.
pub fn onednn_available() -> bool {
    crate::kernels::onednn::available()
}
