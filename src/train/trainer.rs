//! The parts of a run: preparing it (load, tokenize, resume), one optimizer step, evaluation,
//! checkpoints. [`super::run`] strings them together; `qtune bench` times [`optimizer_step`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

use candle_core::Var;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, BestSoFar};
use super::data::{self, Batch, DataReport, DataSummary, Example};
use super::data::{DatasetFile, Datasets};
use super::error::{Error, Result};
use super::model::{mix_seed, BaseModel, ForwardMode};
use super::optim::{self, Optimizer};
use super::preference::{self, Pair, ReferenceLogps};
use super::report::{Event, Phase, Reporter};
pub(crate) use super::step::optimizer_step;
use super::step::{StepOutput, Update};
use crate::job::{with_legacy_loss, EvalMetrics, MetricsRow, StepMetrics};
use crate::spec::JobSpec;

/// Steps' worth of examples sorted by length together when micro-batches are grouped by length
/// (transformers' `LengthGroupedSampler` uses megabatches of 50 batches).
const LENGTH_GROUP_STEPS: usize = 50;

/// The examples of each optimizer step: examples are shuffled once per epoch (seeded), steps
/// take `batch_size × accumulation` of them in order; without packing, runs of 50 steps' worth
/// are sorted by length first, so that a micro-batch pads little. Everything is a function of
/// the step number, which is what makes resume exact.
pub(crate) struct Schedule {
    n_examples: usize,
    /// Example lengths, when steps are grouped by length.
    group_lengths: Option<Vec<usize>>,
    per_step: usize,
    steps_per_epoch: u64,
    pub total_steps: u64,
    seed: u64,
}

impl Schedule {
    fn new(spec: &JobSpec, lengths: Vec<usize>) -> Schedule {
        let n_examples = lengths.len();
        let t = &spec.training;
        let per_step = (t.batch_size * t.gradient_accumulation_steps) as usize;
        let steps_per_epoch = n_examples.div_ceil(per_step) as u64;
        let total_steps = match t.max_steps {
            Some(m) => m as u64,
            None => steps_per_epoch * t.epochs as u64,
        };
        Schedule {
            n_examples,
            group_lengths: (!t.packing).then_some(lengths),
            per_step,
            steps_per_epoch,
            total_steps,
            seed: spec.seed,
        }
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n_examples).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[
            self.seed, 0xda7a, epoch,
        ])));
        if let Some(lengths) = &self.group_lengths {
            for group in order.chunks_mut(self.per_step * LENGTH_GROUP_STEPS) {
                group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            }
        }
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

/// What an evaluation measured over every label token of a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Token-weighted mean cross-entropy.
    pub loss: f64,
    /// Fraction of label tokens the model ranks first (argmax = label).
    pub accuracy: f64,
}

/// Token-weighted mean cross-entropy and token accuracy over every label token of `examples`
/// (each batch packed: the numbers of one example per row, in less time).
pub fn evaluate(base: &BaseModel, examples: &[Example], batch_size: usize) -> Result<Evaluation> {
    let pad = base.tokenizer.eos_id.unwrap_or(0);
    let (mut sum, mut count, mut correct) = (0f64, 0usize, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = data::make_packed_batch(&refs, pad, &base.model.device)?;
        let loss = base.model.batch_loss(&batch, ForwardMode::EVAL)?;
        sum += loss.sum.to_scalar::<f32>()? as f64;
        correct += loss.correct;
        count += batch.label_tokens;
    }
    Ok(Evaluation {
        loss: sum / count.max(1) as f64,
        accuracy: correct as f64 / count.max(1) as f64,
    })
}

/// Splits off a seeded `fraction` of the examples for validation (at least one).
fn split_validation<T>(examples: Vec<T>, fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    let n = examples.len();
    let n_val = ((n as f64 * fraction).round() as usize).max(1);
    if n_val >= n {
        return Err(Error::Data(format!(
            "validation_split {fraction} of {n} examples leaves nothing to train on"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[seed, 0x5b11])));
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

/// What a run needs besides its spec.
pub struct RunOptions {
    /// Checkpoints, `adapter/` (the final PEFT adapter) and `metrics.jsonl` go here.
    pub output_dir: PathBuf,
    pub device: Device,
    /// Continue from the latest checkpoint in `output_dir` if there is one.
    pub resume: bool,
    /// Start from the weights of an existing PEFT adapter (same r and targets).
    pub init_adapter: Option<PathBuf>,
    /// Where the data is; `None`: the spec's URLs are local paths ([`Datasets::from_spec`]).
    pub datasets: Option<Datasets>,
    /// The largest record a dataset may hold ([`data::DEFAULT_MAX_RECORD_BYTES`] unless the
    /// operator says otherwise).
    pub max_record_bytes: usize,
    /// The most optimizer steps the run may take (an operator's limit); `None`: no limit.
    pub max_total_steps: Option<u64>,
}

/// A run in progress: the model, its data and optimizer, and where it writes.
pub(crate) struct Trainer {
    spec: JobSpec,
    base: BaseModel,
    vars: Vec<Var>,
    optimizer: Optimizer,
    pub(crate) schedule: Schedule,
    data: TrainingData,
    out: PathBuf,
    /// The step a resumed run continues from (0 for a fresh one).
    pub(crate) start_step: u64,
    /// Input tokens trained through the last step done.
    tokens_seen: u64,
    started: Instant,
    metrics: MetricsLog,
    health: Health,
    /// Optimizer steps done so far.
    done: u64,
    /// Early stopping's record (when the spec asks for it).
    best: Option<BestSoFar>,
}

/// What early stopping made of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Judgement {
    /// No early stopping, or no better and patience left.
    Continue,
    /// The best so far: its checkpoint is the adapter unless a better one follows.
    Improved,
    /// Not better for `patience` evaluations: the run ends here, for this reason.
    Stop(String),
}

/// What a run trains on: labelled examples (sft), or preference pairs with, for DPO, the
/// reference's log-probabilities of every pair (computed once, before the first step, from the
/// model as the run starts: the base, or the adapter it continues).
enum TrainingData {
    Examples {
        train: Vec<Example>,
        validation: Vec<Example>,
    },
    Pairs {
        train: Vec<Pair>,
        validation: Vec<Pair>,
        /// Empty for ORPO, which needs no reference.
        reference: Reference,
    },
}

#[derive(Default)]
struct Reference {
    train: Vec<ReferenceLogps>,
    validation: Vec<ReferenceLogps>,
}

impl TrainingData {
    fn has_validation(&self) -> bool {
        match self {
            TrainingData::Examples { validation, .. } => !validation.is_empty(),
            TrainingData::Pairs { validation, .. } => !validation.is_empty(),
        }
    }
}

/// Signs that a run has gone wrong although every number is finite: the loss far above where
/// it started for several steps, or no gradient at all (a model collapsed onto a uniform or
/// saturated prediction learns nothing more, and would "succeed" wrecked).
#[derive(Default)]
struct Health {
    first_loss: Option<f64>,
    rising: u32,
    flat: u32,
}

/// Consecutive steps of a sign before the run is failed.
const DIVERGED_STEPS: u32 = 5;
const FLAT_STEPS: u32 = 3;

impl Health {
    fn check(&mut self, m: &StepMetrics) -> Result<()> {
        let first = *self.first_loss.get_or_insert(m.train_loss);
        self.rising = if m.train_loss > 2.0 * first + 1.0 {
            self.rising + 1
        } else {
            0
        };
        self.flat = if m.grad_norm == 0.0 { self.flat + 1 } else { 0 };
        let advice = format!(
            "lower training.learning_rate (now {:e}) or add warmup; the last checkpoint before \
             this is kept and from_checkpoint can start from it",
            m.learning_rate
        );
        if self.rising >= DIVERGED_STEPS {
            return Err(Error::Diverged {
                step: m.step,
                reason: format!(
                    "the loss has been above twice its start ({first:.4}) for {} steps (now \
                     {:.4}); {advice}",
                    self.rising, m.train_loss
                ),
            });
        }
        if self.flat >= FLAT_STEPS {
            return Err(Error::Diverged {
                step: m.step,
                reason: format!(
                    "the gradient has been exactly zero for {} steps (loss {:.4}): the model \
                     has collapsed and learns nothing more; {advice}",
                    self.flat, m.train_loss
                ),
            });
        }
        Ok(())
    }
}

impl Trainer {
    /// Loads the base and the data, reports them, and restores the latest checkpoint when
    /// resuming.
    pub(crate) fn prepare(
        spec: &JobSpec,
        opts: &RunOptions,
        datasets: &Datasets,
        reporter: &mut dyn Reporter,
    ) -> Result<Trainer> {
        let t = &spec.training;
        let out = opts.output_dir.clone();
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;

        reporter.report(&Event::Phase(Phase::LoadingModel));
        let mut base = super::model::load_base_in(
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
        tracing::info!(model = %base.name, layers = base.model.blocks.len(), "base model loaded");

        reporter.report(&Event::Phase(Phase::Tokenizing));
        let (data, summary) = load_data(spec, opts, datasets, &base)?;
        let schedule = Schedule::new(spec, data.lengths());
        if let Some(cap) = opts.max_total_steps.filter(|c| schedule.total_steps > *c) {
            return Err(Error::Data(format!(
                "the job would run {} optimizer steps, over this server's limit of {cap}; lower \
                 training.epochs or set training.max_steps",
                schedule.total_steps
            )));
        }
        let vars: Vec<Var> = base.model.lora_vars().into_iter().map(|(_, v)| v).collect();
        tracing::info!(
            examples = summary.0.examples,
            validation = summary.1.as_ref().map_or(0, |v| v.examples),
            total_steps = schedule.total_steps,
            "data tokenized"
        );
        reporter.report(&Event::Data(DataSummary {
            train: summary.0,
            validation: summary.1,
            total_steps: schedule.total_steps,
            trainable_parameters: vars.iter().map(|v| v.elem_count()).sum(),
        }));
        let data = data.with_reference(spec, &base, opts.init_adapter.is_some())?;

        let mut optimizer = Optimizer::new(t, vars.len());
        let (mut start_step, mut tokens_seen, mut best) = (0, 0, None);
        if opts.resume {
            if let Some((_, dir)) = checkpoint::list_checkpoints(&out).pop() {
                let state = checkpoint::load_checkpoint(&dir, &base.model, &mut optimizer)?;
                if state.spec != *spec {
                    return Err(Error::Checkpoint(format!(
                        "{} was written by a different job spec; refusing to resume from it",
                        dir.display()
                    )));
                }
                start_step = state.step;
                tokens_seen = state.tokens_seen;
                best = state.best;
                tracing::info!(step = start_step, "resuming from the latest checkpoint");
            }
        }
        let metrics = MetricsLog::open(&out.join("metrics.jsonl"), start_step)?;
        Ok(Trainer {
            spec: spec.clone(),
            base,
            vars,
            optimizer,
            schedule,
            data,
            out,
            start_step,
            tokens_seen,
            started: Instant::now(),
            metrics,
            health: Health::default(),
            done: start_step,
            best,
        })
    }

    /// Optimizer step `step` (0-based) on the examples the schedule gives it; logged to
    /// `metrics.jsonl`.
    pub(crate) fn train_step(&mut self, step: u64) -> Result<StepMetrics> {
        let t = &self.spec.training;
        let t0 = Instant::now();
        let picked = self.schedule.step_examples(step);
        let lr = optim::learning_rate(t, step, self.schedule.total_steps);
        let out = match &self.data {
            TrainingData::Examples { train, .. } => {
                let pad = self.base.tokenizer.eos_id.unwrap_or(0);
                let batches = picked
                    .chunks(t.batch_size as usize)
                    .map(|micro| {
                        let refs: Vec<&Example> = micro.iter().map(|&i| &train[i]).collect();
                        if t.packing {
                            data::make_packed_batch(&refs, pad, &self.base.model.device)
                        } else {
                            data::make_batch(&refs, pad, &self.base.model.device)
                        }
                    })
                    .collect::<Result<Vec<Batch>>>()?;
                optimizer_step(
                    &self.base.model,
                    &self.vars,
                    &mut self.optimizer,
                    &batches,
                    self.spec.seed,
                    step,
                    lr,
                    t.max_grad_norm,
                )?
            }
            TrainingData::Pairs {
                train, reference, ..
            } => {
                let update = Update {
                    seed: self.spec.seed,
                    step,
                    learning_rate: lr,
                    max_grad_norm: t.max_grad_norm,
                };
                preference_step(
                    &self.base,
                    &self.spec,
                    &self.vars,
                    &mut self.optimizer,
                    (train, &reference.train),
                    &picked,
                    &update,
                )?
            }
        };
        let done = step + 1;
        self.done = done;
        self.tokens_seen += out.tokens as u64;
        let m = StepMetrics {
            step: done,
            total_steps: self.schedule.total_steps,
            epoch: self.schedule.epoch_at(done),
            train_loss: out.loss,
            // a preference step's tokens are chosen and rejected alike: no accuracy to speak of
            train_accuracy: out.rewards.is_none().then_some(out.accuracy),
            learning_rate: lr,
            grad_norm: out.grad_norm,
            tokens: out.tokens,
            tokens_seen: self.tokens_seen,
            tokens_per_second: out.tokens as f64 / t0.elapsed().as_secs_f64(),
            elapsed_seconds: self.started.elapsed().as_secs_f64(),
            rewards: out.rewards,
        };
        self.metrics.write(&MetricsRow::from(&m))?;
        self.health.check(&m)?;
        Ok(m)
    }

    /// Whether an evaluation follows step `done` (1-based): every `eval_every_steps`, and at
    /// the end, when there is validation data.
    pub(crate) fn eval_due(&self, done: u64) -> bool {
        self.data.has_validation()
            && (self
                .spec
                .training
                .eval_every_steps
                .is_some_and(|e| done.is_multiple_of(e as u64))
                || done == self.schedule.total_steps)
    }

    /// Evaluates on the validation data after step `done`; logged to `metrics.jsonl`.
    pub(crate) fn evaluate_at(&mut self, done: u64) -> Result<EvalMetrics> {
        let t = &self.spec.training;
        let (eval_loss, eval_accuracy, rewards) = match &self.data {
            TrainingData::Examples { validation, .. } => {
                let measured = evaluate(&self.base, validation, t.batch_size as usize)?;
                (measured.loss, Some(measured.accuracy), None)
            }
            TrainingData::Pairs {
                validation,
                reference,
                ..
            } => {
                let (loss, rewards) = preference::evaluate_pairs(
                    &self.base.model,
                    &self.spec.method,
                    validation,
                    &reference.validation,
                    t.batch_size as usize,
                    t.packing,
                    self.base.tokenizer.eos_id.unwrap_or(0),
                )?;
                (loss, None, Some(rewards))
            }
        };
        let e = EvalMetrics {
            step: done,
            epoch: self.schedule.epoch_at(done),
            eval_loss,
            eval_accuracy,
            rewards,
        };
        self.metrics.write(&MetricsRow::from(&e))?;
        Ok(e)
    }

    /// Whether step `done` ends with a checkpoint (the last step's is written by [`Trainer::finish`]).
    pub(crate) fn checkpoint_due(&self, done: u64) -> bool {
        self.spec
            .checkpoint_every_steps
            .is_some_and(|c| done.is_multiple_of(c))
            && done != self.schedule.total_steps
    }

    /// Writes checkpoint `step` (adapter + resume state) and reports it.
    pub(crate) fn save_checkpoint(&self, step: u64, reporter: &mut dyn Reporter) -> Result<()> {
        let dir = checkpoint::checkpoint_dir(&self.out, step);
        let state = checkpoint::TrainerState {
            step,
            total_steps: self.schedule.total_steps,
            epoch: self.schedule.epoch_at(step),
            seed: self.spec.seed,
            spec: self.spec.clone(),
            tokens_seen: self.tokens_seen,
            best: self.best,
        };
        checkpoint::save_checkpoint(
            &dir,
            &self.base.model,
            &self.optimizer,
            &state,
            &self.base.name,
        )?;
        tracing::info!(step, path = %dir.display(), "checkpoint written");
        reporter.report(&Event::Checkpoint { step, path: dir });
        Ok(())
    }

    /// Judges the evaluation `value` of step `done` by the spec's early stopping: better than
    /// the best by more than `min_delta` (transformers' rule), or one more evaluation without
    /// improvement, and at `patience` of those, the end.
    pub(crate) fn judge(&mut self, done: u64, value: f64) -> Judgement {
        let Some(rule) = &self.spec.early_stopping else {
            return Judgement::Continue;
        };
        let improves = |best: &BestSoFar| value < best.value - rule.min_delta;
        match &mut self.best {
            Some(best) if !improves(best) => {
                best.evals_without_improvement += 1;
                if best.evals_without_improvement < rule.patience {
                    return Judgement::Continue;
                }
                Judgement::Stop(format!(
                    "stopped early at step {done}: {} has not improved on step {}'s {:.6} by more \
                     than {} for {} evaluations; the adapter is step {}'s",
                    rule.metric,
                    best.step,
                    best.value,
                    rule.min_delta,
                    best.evals_without_improvement,
                    best.step
                ))
            }
            _ => {
                self.best = Some(BestSoFar {
                    step: done,
                    value,
                    evals_without_improvement: 0,
                });
                Judgement::Improved
            }
        }
    }

    pub(crate) fn steps_done(&self) -> u64 {
        self.done
    }

    /// Under early stopping, the step whose checkpoint is the adapter.
    pub(crate) fn best_step(&self) -> Option<u64> {
        self.best.map(|b| b.step)
    }

    /// The run's last checkpoint (unless it is written already: a resumed run with nothing left
    /// to do, a run stopped early) and the final adapter: the weights as trained, or under early
    /// stopping the best step's checkpoint's adapter files, copied byte for byte. Returns the
    /// adapter's folder.
    pub fn finish(&self, reporter: &mut dyn Reporter) -> Result<PathBuf> {
        if !checkpoint::checkpoint_dir(&self.out, self.done).is_dir() {
            self.save_checkpoint(self.done, reporter)?;
        }
        let adapter_dir = self.out.join(checkpoint::ADAPTER_DIR);
        match self.best {
            Some(best) => {
                let from = checkpoint::checkpoint_dir(&self.out, best.step);
                std::fs::create_dir_all(&adapter_dir).map_err(|e| Error::io(&adapter_dir, e))?;
                for name in [checkpoint::ADAPTER_WEIGHTS, checkpoint::ADAPTER_CONFIG] {
                    let (src, dst) = (from.join(name), adapter_dir.join(name));
                    std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
                }
                tracing::info!(
                    step = best.step,
                    "the best evaluation's adapter is the job's"
                );
            }
            None => checkpoint::save_adapter(
                &adapter_dir,
                &self.base.model,
                &self.spec,
                &self.base.name,
            )?,
        }
        tracing::info!(path = %adapter_dir.display(), "adapter saved");
        Ok(adapter_dir)
    }
}

/// A preference optimizer step: the step's pairs in micro-batches of `batch_size`, each
/// weighted by its share of the step's pairs (a step's loss is the mean over its pairs, as
/// TRL's with equal micro-batches).
fn preference_step(
    base: &BaseModel,
    spec: &JobSpec,
    vars: &[Var],
    optimizer: &mut Optimizer,
    (pairs, reference): (&[Pair], &[ReferenceLogps]),
    picked: &[usize],
    update: &Update,
) -> Result<StepOutput> {
    let t = &spec.training;
    let micro: Vec<&[usize]> = picked.chunks(t.batch_size as usize).collect();
    let pad = base.tokenizer.eos_id.unwrap_or(0);
    let mut rewards = preference::RewardSums::default();
    let mut out = update.run(&base.model, vars, optimizer, micro.len(), |mi, mode| {
        let idx = micro[mi];
        let batch: Vec<&Pair> = idx.iter().map(|&i| &pairs[i]).collect();
        let refs: Vec<ReferenceLogps> = match reference.is_empty() {
            true => Vec::new(),
            false => idx.iter().map(|&i| reference[i]).collect(),
        };
        let share = idx.len() as f64 / picked.len() as f64;
        let m = preference::micro_step(
            &base.model,
            &spec.method,
            &batch,
            &refs,
            share,
            t.packing,
            pad,
            mode,
        )?;
        rewards.merge(m.rewards);
        Ok(m.step)
    })?;
    out.rewards = Some(rewards.means());
    Ok(out)
}

/// Reads and tokenizes the run's data as its method wants it (examples or pairs), holding out
/// the validation share when asked; with what the data step reports for each set.
fn load_data(
    spec: &JobSpec,
    opts: &RunOptions,
    datasets: &Datasets,
    base: &BaseModel,
) -> Result<(TrainingData, (DataReport, Option<DataReport>))> {
    let t = &spec.training;
    let max_len = t.max_seq_len as usize;
    if spec.method.is_preference() {
        let load = |file: &DatasetFile| {
            let format = spec.dataset.format;
            let tok = &base.tokenizer;
            preference::load_pairs(
                file,
                format,
                &spec.method,
                tok,
                max_len,
                opts.max_record_bytes,
            )
        };
        let size = |p: &Pair| {
            (
                p.tokens(),
                p.chosen.label_count() + p.rejected.label_count(),
            )
        };
        let (train, validation, reports) = load_sets(spec, datasets, load, size)?;
        let reference = Reference::default();
        let data = TrainingData::Pairs {
            train,
            validation,
            reference,
        };
        return Ok((data, reports));
    }
    let load = |file: &DatasetFile| {
        let (format, tok) = (spec.dataset.format, &base.tokenizer);
        let max_record = opts.max_record_bytes;
        data::load_jsonl(file, format, tok, max_len, t.train_on_inputs, max_record)
    };
    let size = |e: &Example| (e.ids.len(), e.label_count());
    let (train, validation, reports) = load_sets(spec, datasets, load, size)?;
    Ok((TrainingData::Examples { train, validation }, reports))
}

/// The training and validation sets `load` reads: the validation file's when there is one,
/// else a seeded `validation_split` of the training items (the training report then counts what
/// is left). `size` gives an item's tokens and label tokens.
#[allow(clippy::type_complexity)]
fn load_sets<T>(
    spec: &JobSpec,
    datasets: &Datasets,
    load: impl Fn(&DatasetFile) -> Result<(Vec<T>, DataReport)>,
    size: impl Fn(&T) -> (usize, usize),
) -> Result<(Vec<T>, Vec<T>, (DataReport, Option<DataReport>))> {
    let (train, mut train_report) = load(&datasets.train)?;
    if let Some(file) = &datasets.validation {
        let (v, r) = load(file)?;
        return Ok((train, v, (train_report, Some(r))));
    }
    let Some(f) = spec.dataset.validation_split else {
        return Ok((train, Vec::new(), (train_report, None)));
    };
    let (tr, v) = split_validation(train, f, spec.seed)?;
    let count = |items: &[T]| {
        items
            .iter()
            .map(&size)
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    };
    (train_report.tokens, train_report.label_tokens) = count(&tr);
    train_report.examples = tr.len();
    let (tokens, label_tokens) = count(&v);
    let r = DataReport {
        path: format!("{} (validation_split {f})", train_report.path),
        format: train_report.format.clone(),
        records: v.len(),
        examples: v.len(),
        tokens,
        label_tokens,
        ..Default::default()
    };
    Ok((tr, v, (train_report, Some(r))))
}

impl TrainingData {
    /// Each training item's tokens, which the schedule groups steps by.
    fn lengths(&self) -> Vec<usize> {
        match self {
            TrainingData::Examples { train, .. } => train.iter().map(|e| e.ids.len()).collect(),
            TrainingData::Pairs { train, .. } => train.iter().map(Pair::tokens).collect(),
        }
    }

    /// A DPO run's data with the reference's log-probabilities of every pair: from the base
    /// with the adapter switched off, or, for a run that continues an adapter, from the model
    /// with that adapter as it starts (TRL's "ref" adapter). Computed before any step and
    /// before a resumed run loads its checkpoint, so a resumed run's reference is the same.
    fn with_reference(self, spec: &JobSpec, base: &BaseModel, continues: bool) -> Result<Self> {
        let TrainingData::Pairs {
            train, validation, ..
        } = self
        else {
            return Ok(self);
        };
        if !matches!(spec.method, crate::spec::Method::Dpo(_)) {
            let reference = Reference::default();
            return Ok(TrainingData::Pairs {
                train,
                validation,
                reference,
            });
        }
        let mode = match continues {
            true => ForwardMode::EVAL,
            false => ForwardMode::BASE,
        };
        let t = &spec.training;
        let pad = base.tokenizer.eos_id.unwrap_or(0);
        let of = |pairs: &[Pair]| {
            preference::reference_logps(
                &base.model,
                pairs,
                t.batch_size as usize,
                t.packing,
                pad,
                mode,
            )
        };
        let started = Instant::now();
        let reference = Reference {
            train: of(&train)?,
            validation: of(&validation)?,
        };
        tracing::info!(
            pairs = train.len() + validation.len(),
            seconds = started.elapsed().as_secs_f64(),
            "reference log-probabilities computed"
        );
        Ok(TrainingData::Pairs {
            train,
            validation,
            reference,
        })
    }
}

/// `metrics.jsonl`: one [`MetricsRow`] per step or evaluation (with the old `loss` name beside
/// `train_loss`). On resume, lines past the resumed step are dropped so the file reads as one
/// uninterrupted run.
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
    /// Rows dropped because the disk was full: the file is a local copy (the job's metrics go
    /// to the reporter too), not worth failing a job for.
    dropped: u64,
}

impl MetricsLog {
    fn open(path: &Path, keep_through_step: u64) -> Result<MetricsLog> {
        let kept: String = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<MetricsRow>(l).is_ok_and(|r| r.step <= keep_through_step)
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
            dropped: 0,
        })
    }

    fn write(&mut self, row: &MetricsRow) -> Result<()> {
        let value = with_legacy_loss(serde_json::to_value(row).expect("a row serializes"));
        match writeln!(self.file, "{value}") {
            Err(e) if crate::disk::is_full(&e) => {
                if self.dropped == 0 {
                    tracing::warn!(path = %self.path.display(), "the disk is full; metrics rows are left out of this file until it has room");
                }
                self.dropped += 1;
                Ok(())
            }
            written => written.map_err(|e| Error::io(&self.path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(packing: bool) -> JobSpec {
        JobSpec::from_json(
            &serde_json::json!({
                "base_model": "m", "dataset": {"url": "d"},
                "training": {"batch_size": 4, "epochs": 2, "packing": packing},
            })
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn without_packing_steps_are_grouped_by_length() {
        // 400 examples of lengths 1..=400 in a scrambled order
        let lengths: Vec<usize> = (0..400).map(|i| (i * 37) % 400 + 1).collect();
        let spread = |schedule: &Schedule| -> usize {
            (0..schedule.total_steps)
                .map(|step| {
                    let l: Vec<usize> = schedule
                        .step_examples(step)
                        .iter()
                        .map(|&i| lengths[i])
                        .collect();
                    l.iter().max().unwrap() - l.iter().min().unwrap()
                })
                .sum()
        };
        let grouped = Schedule::new(&spec(false), lengths.clone());
        let shuffled = Schedule::new(&spec(true), lengths.clone());
        // sorted runs of 200 of 400 lengths: about 2 apart per step; shuffled: about 240
        assert!(spread(&grouped) * 20 < spread(&shuffled));
        // every example once per epoch either way
        let mut seen: Vec<usize> = (0..100).flat_map(|s| grouped.step_examples(s)).collect();
        seen.sort();
        assert_eq!(seen, (0..400).collect::<Vec<_>>());
    }
}
