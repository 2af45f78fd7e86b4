//! The training engine: LoRA fine-tuning of a Llama-family model with candle.
//!
//! [`run`] takes a validated [`JobSpec`] and does, step after step, the four things training is
//! made of — forward, loss, backward, optimizer update — reporting each step through a
//! [`Reporter`] and checking it for cancellation between steps. It knows nothing of HTTP or SQL:
//! the CLI prints its events, the service stores and streams them.
//!
//! Modules: `model` (loading, the decoder), `ops` (differentiable fast ops), `tokenizer`
//! (tokenizer + chat template), `data` (JSONL → labelled examples → batches), `optim`
//! (AdamW/SGD, schedule, clipping), `checkpoint` (PEFT adapter + resume state).

pub mod attention;
pub mod checkpoint;
mod cpu;
pub mod data;
pub mod elementwise;
pub mod error;
pub mod generate;
pub mod lora;
pub mod model;
pub mod onednn;
pub mod ops;
pub mod optim;
pub mod quant;
pub mod timing;
pub mod tokenizer;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

pub use error::{Error, Result};

use crate::spec::JobSpec;
use data::{DataReport, Example};
use model::{mix_seed_for, BaseModel, ForwardMode};
use optim::Optimizer;

/// Where a run is; the service adds its own phases (downloading, fetching) around these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    LoadingModel,
    Tokenizing,
    Training,
    Saving,
}

/// Metrics of one optimizer step.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer steps completed, counting this one (1-based).
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    /// Token-weighted mean cross-entropy of the step's label tokens.
    pub loss: f64,
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens processed by this step (padding excluded).
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Phase {
        phase: Phase,
    },
    Data {
        train: DataReport,
        validation: Option<DataReport>,
        total_steps: u64,
        trainable_parameters: usize,
    },
    Step(StepMetrics),
    Eval {
        step: u64,
        epoch: f64,
        eval_loss: f64,
    },
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
}

/// Receives the engine's progress, and may ask it to stop.
pub trait Reporter {
    fn report(&mut self, event: &Event);
    /// Checked between optimizer steps; `true` makes the run checkpoint and return `Cancelled`.
    fn should_stop(&self) -> bool {
        false
    }
}

/// A reporter that ignores everything (tests, benchmarks).
pub struct Silent;
impl Reporter for Silent {
    fn report(&mut self, _: &Event) {}
}

pub struct RunOptions {
    /// Checkpoints, `adapter/` (the final PEFT adapter) and `metrics.jsonl` go here.
    pub output_dir: PathBuf,
    pub device: Device,
    /// Continue from the latest checkpoint in `output_dir` if there is one.
    pub resume: bool,
    /// Start from the weights of an existing PEFT adapter (same r and targets).
    pub init_adapter: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub adapter_dir: PathBuf,
}

/// A dataset reference the engine can read: a local path or a `file://` URL.
pub fn local_dataset_path(url: &str) -> Result<PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(Error::Data(format!(
            "{url}: the engine reads local files; remote datasets are fetched by the service"
        )));
    }
    Ok(PathBuf::from(url))
}

/// The examples of each optimizer step: examples are shuffled once per epoch (seeded), steps
/// take `batch_size × accumulation` of them in order. Everything is a function of the step
/// number, which is what makes resume exact.
struct Schedule {
    n_examples: usize,
    per_step: usize,
    steps_per_epoch: u64,
    total_steps: u64,
    seed: u64,
}

impl Schedule {
    fn new(spec: &JobSpec, n_examples: usize) -> Schedule {
        let t = &spec.training;
        let per_step = (t.batch_size * t.gradient_accumulation_steps) as usize;
        let steps_per_epoch = n_examples.div_ceil(per_step) as u64;
        let total_steps = match t.max_steps {
            Some(m) => m as u64,
            None => steps_per_epoch * t.epochs as u64,
        };
        Schedule {
            n_examples,
            per_step,
            steps_per_epoch,
            total_steps,
            seed: spec.seed,
        }
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n_examples).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed_for(&[
            self.seed, 0xda7a, epoch,
        ])));
        order
    }

    /// Example indices of step `step` (0-based).
    fn step_examples(&self, step: u64) -> Vec<usize> {
        let epoch = step / self.steps_per_epoch;
        let k = (step % self.steps_per_epoch) as usize;
        let order = self.epoch_order(epoch);
        let end = ((k + 1) * self.per_step).min(self.n_examples);
        order[k * self.per_step..end].to_vec()
    }

    fn epoch_at(&self, steps_done: u64) -> f64 {
        steps_done as f64 / self.steps_per_epoch as f64
    }
}

/// Token-weighted mean cross-entropy over every label token of `examples`.
pub fn evaluate(base: &BaseModel, examples: &[Example], batch_size: usize) -> Result<f64> {
    let pad = base.tokenizer.eos_id.unwrap_or(0);
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = data::make_batch(&refs, pad, &base.model.device)?;
        let loss = base.model.loss_sum(
            &batch.ids,
            &batch.positions,
            &batch.targets,
            ForwardMode::EVAL,
        )?;
        sum += loss.to_scalar::<f32>()? as f64;
        count += batch.label_tokens;
    }
    Ok(sum / count.max(1) as f64)
}

/// Splits off a seeded `fraction` of the examples for validation (at least one).
fn split_validation(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    let n = examples.len();
    let n_val = ((n as f64 * fraction).round() as usize).max(1);
    if n_val >= n {
        return Err(Error::Data(format!(
            "validation_split {fraction} of {n} examples leaves nothing to train on"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed_for(&[
        seed, 0x5b11,
    ])));
    let val_idx: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, ex) in examples.into_iter().enumerate() {
        if val_idx.contains(&i) {
            val.push(ex)
        } else {
            train.push(ex)
        }
    }
    Ok((train, val))
}

/// Runs a whole fine-tuning job. See the module docs.
pub fn run(spec: &JobSpec, opts: &RunOptions, reporter: &mut dyn Reporter) -> Result<Outcome> {
    let spec = spec.clone().normalize()?;
    let t = &spec.training;
    let out = &opts.output_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    reporter.report(&Event::Phase {
        phase: Phase::LoadingModel,
    });
    let mut base = model::load_base_in(
        &spec.base_model,
        spec.revision.as_deref(),
        &spec.lora,
        spec.quantization.as_ref(),
        spec.compute_dtype,
        spec.seed,
        &opts.device,
    )?;
    base.model.gradient_checkpointing = t.gradient_checkpointing;
    if let Some(dir) = &opts.init_adapter {
        checkpoint::load_adapter(dir, &base.model)?;
    }

    reporter.report(&Event::Phase {
        phase: Phase::Tokenizing,
    });
    let max_len = t.max_seq_len as usize;
    let (train, mut train_report) = data::load_jsonl(
        &local_dataset_path(&spec.dataset.url)?,
        spec.dataset.format,
        &base.tokenizer,
        max_len,
        t.train_on_inputs,
    )?;
    let (train, validation, val_report) =
        match (&spec.dataset.validation_url, spec.dataset.validation_split) {
            (Some(url), _) => {
                let (v, r) = data::load_jsonl(
                    &local_dataset_path(url)?,
                    spec.dataset.format,
                    &base.tokenizer,
                    max_len,
                    t.train_on_inputs,
                )?;
                (train, v, Some(r))
            }
            (None, Some(f)) => {
                let (tr, v) = split_validation(train, f, spec.seed)?;
                // the training report counts what is left for training
                train_report.examples = tr.len();
                train_report.tokens = tr.iter().map(|e| e.ids.len()).sum();
                train_report.label_tokens = tr.iter().map(|e| e.label_count()).sum();
                let r = DataReport {
                    path: format!("{} (validation_split {f})", train_report.path),
                    format: train_report.format.clone(),
                    records: v.len(),
                    examples: v.len(),
                    tokens: v.iter().map(|e| e.ids.len()).sum(),
                    label_tokens: v.iter().map(|e| e.label_count()).sum(),
                    ..Default::default()
                };
                (tr, v, Some(r))
            }
            (None, None) => (train, Vec::new(), None),
        };
    let schedule = Schedule::new(&spec, train.len());
    let vars: Vec<Var> = base.model.lora_vars().into_iter().map(|(_, v)| v).collect();
    reporter.report(&Event::Data {
        train: train_report,
        validation: val_report,
        total_steps: schedule.total_steps,
        trainable_parameters: vars.iter().map(|v| v.elem_count()).sum(),
    });

    let mut optimizer = Optimizer::new(t, vars.len());
    let mut start_step = 0;
    if opts.resume {
        if let Some((_, dir)) = checkpoint::list_checkpoints(out).pop() {
            let state = checkpoint::load_checkpoint(&dir, &base.model, &mut optimizer)?;
            if state.spec != spec {
                return Err(Error::Checkpoint(format!(
                    "{} was written by a different job spec; refusing to resume from it",
                    dir.display()
                )));
            }
            start_step = state.step;
        }
    }
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = MetricsLog::open(&metrics_path, start_step)?;

    reporter.report(&Event::Phase {
        phase: Phase::Training,
    });
    let pad = base.tokenizer.eos_id.unwrap_or(0);
    let batch_size = t.batch_size as usize;
    let started = Instant::now();
    let mut last_loss = None;
    let mut last_eval = None;
    let save = |step: u64, optimizer: &Optimizer, reporter: &mut dyn Reporter| -> Result<()> {
        let dir = checkpoint::checkpoint_dir(out, step);
        let state = checkpoint::TrainerState {
            step,
            total_steps: schedule.total_steps,
            epoch: schedule.epoch_at(step),
            seed: spec.seed,
            spec: spec.clone(),
        };
        checkpoint::save_checkpoint(&dir, &base.model, optimizer, &state, &base.name)?;
        reporter.report(&Event::Checkpoint { step, path: dir });
        Ok(())
    };
    for step in start_step..schedule.total_steps {
        if reporter.should_stop() {
            if step > start_step {
                save(step, &optimizer, reporter)?;
            }
            return Err(Error::Cancelled);
        }
        let t0 = Instant::now();
        let picked = schedule.step_examples(step);
        let label_total: usize = picked.iter().map(|&i| train[i].label_count()).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_value, mut tokens) = (0f64, 0usize);
        for (mi, micro) in picked.chunks(batch_size).enumerate() {
            let refs: Vec<&Example> = micro.iter().map(|&i| &train[i]).collect();
            let batch = data::make_batch(&refs, pad, &opts.device)?;
            tokens += batch.tokens;
            let mode = ForwardMode {
                train: true,
                dropout_seed: mix_seed_for(&[spec.seed, step, mi as u64]),
            };
            let loss_sum =
                base.model
                    .loss_sum(&batch.ids, &batch.positions, &batch.targets, mode)?;
            // Each micro-batch is weighted by its share of the step's label tokens, so any split
            // of the same examples into batch × accumulation gives the same gradient.
            let loss = (loss_sum / label_total as f64)?;
            loss_value += loss.to_scalar::<f32>()? as f64;
            let store = loss.backward()?;
            for (i, g) in base.model.lora_grads(&store)?.iter().enumerate() {
                grads[i] = Some(match grads[i].take() {
                    None => g.clone(),
                    Some(acc) => (acc + g)?,
                });
            }
        }
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .map(|g| g.expect("filled above"))
            .collect();
        if !loss_value.is_finite() {
            return Err(Error::Diverged(loss_value, step + 1));
        }
        let grad_norm = optim::clip_grad_norm(&mut grads, t.max_grad_norm)?;
        let lr = optim::learning_rate(t, step, schedule.total_steps);
        optimizer.step(&vars, &grads, lr)?;
        let done = step + 1;
        let secs = t0.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: done,
            total_steps: schedule.total_steps,
            epoch: schedule.epoch_at(done),
            loss: loss_value,
            learning_rate: lr,
            grad_norm,
            tokens,
            tokens_per_second: tokens as f64 / secs,
            elapsed_seconds: started.elapsed().as_secs_f64(),
        };
        metrics.write(&serde_json::json!({
            "step": m.step, "epoch": m.epoch, "loss": m.loss, "eval_loss": null,
            "learning_rate": m.learning_rate, "grad_norm": m.grad_norm,
            "tokens_per_second": m.tokens_per_second,
        }))?;
        last_loss = Some(loss_value);
        reporter.report(&Event::Step(m));

        let eval_due = t.eval_every_steps.is_some_and(|e| done % e as u64 == 0)
            || done == schedule.total_steps;
        if !validation.is_empty() && eval_due {
            let eval_loss = evaluate(&base, &validation, batch_size)?;
            let epoch = schedule.epoch_at(done);
            metrics.write(&serde_json::json!({
                "step": done, "epoch": epoch, "loss": null, "eval_loss": eval_loss,
                "learning_rate": null, "grad_norm": null, "tokens_per_second": null,
            }))?;
            last_eval = Some(eval_loss);
            reporter.report(&Event::Eval {
                step: done,
                epoch,
                eval_loss,
            });
        }
        let checkpoint_due = spec.checkpoint_every_steps.is_some_and(|c| done % c == 0);
        if checkpoint_due && done != schedule.total_steps {
            save(done, &optimizer, reporter)?;
        }
    }

    reporter.report(&Event::Phase {
        phase: Phase::Saving,
    });
    if start_step < schedule.total_steps || checkpoint::list_checkpoints(out).is_empty() {
        save(schedule.total_steps, &optimizer, reporter)?;
    }
    let adapter_dir = out.join("adapter");
    checkpoint::save_adapter(&adapter_dir, &base.model, &spec, &base.name)?;
    Ok(Outcome {
        steps: schedule.total_steps,
        final_loss: last_loss,
        eval_loss: last_eval,
        adapter_dir,
    })
}

/// `metrics.jsonl`: one JSON object per step or evaluation. On resume, lines past the resumed
/// step are dropped so the file reads as one uninterrupted run.
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    fn open(path: &Path, keep_through_step: u64) -> Result<MetricsLog> {
        let kept: String = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= keep_through_step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(path, kept).map_err(|e| Error::io(path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            file,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io(&self.path, e))
    }
}
