//! The job spec: one validated type shared by the HTTP API, the CLI and the training engine.
//!
//! Parse, don't validate: a spec arrives as a [`RawJobSpec`] (the JSON as the caller wrote it,
//! unknown fields refused, anything left out `None`), and `JobSpec::try_from(raw)` is the one
//! place that checks it and resolves every default (alpha = 2·r, the target-module list, the
//! quantization's implied bits, the compute dtype, the checkpoint reference). What comes out is a
//! [`JobSpec`] with nothing left to fill: it is what is stored, echoed back and run, and nothing
//! downstream derives a default again.
//!
//! Every way in goes through that conversion: [`JobSpec::from_json`] (the API and the CLI, with
//! errors that name the field), the OpenAI request's translation, and deserializing a `JobSpec`
//! (the database reading a stored one, which also fills the fields a spec stored by an earlier
//! version lacks). A resolved spec parses to itself.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::job::CheckpointRef;

mod method;
pub use method::{DpoLoss, DpoSpec, EarlyStoppingSpec, Method, OrpoSpec};
pub(crate) use method::{RawEarlyStopping, RawMethod};

/// A spec error names the offending field (`param`, in dotted form) and says what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct SpecError {
    pub param: String,
    pub message: String,
}

fn err(param: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        param: param.to_string(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The spec as it arrives

/// A job spec as the caller wrote it: the shape of the JSON, nothing checked or filled yet.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJobSpec {
    pub(crate) base_model: String,
    #[serde(default)]
    pub(crate) revision: Option<String>,
    pub(crate) dataset: RawDataset,
    #[serde(default)]
    pub(crate) method: Option<RawMethod>,
    #[serde(default)]
    pub(crate) lora: Option<RawLora>,
    #[serde(default)]
    pub(crate) quantization: Option<RawQuantization>,
    #[serde(default)]
    pub(crate) compute_dtype: Option<ComputeDtype>,
    #[serde(default)]
    pub(crate) training: RawTraining,
    #[serde(default)]
    pub(crate) checkpoint_every_steps: Option<u64>,
    #[serde(default)]
    pub(crate) early_stopping: Option<RawEarlyStopping>,
    #[serde(default)]
    pub(crate) suffix: Option<String>,
    #[serde(default)]
    pub(crate) seed: Option<u64>,
    #[serde(default)]
    pub(crate) from_checkpoint: Option<String>,
    #[serde(default)]
    pub(crate) metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDataset {
    pub(crate) url: String,
    #[serde(default)]
    pub(crate) format: DatasetFormat,
    #[serde(default)]
    pub(crate) validation_url: Option<String>,
    #[serde(default)]
    pub(crate) validation_split: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLora {
    #[serde(default)]
    pub(crate) r: Option<i64>,
    #[serde(default)]
    pub(crate) alpha: Option<f64>,
    #[serde(default)]
    pub(crate) dropout: Option<f64>,
    #[serde(default)]
    pub(crate) target_modules: Option<TargetModules>,
    #[serde(default)]
    pub(crate) use_rslora: Option<bool>,
}

/// `{"bits": 4, "type": "nf4", "double_quant": true, "compute_dtype": "f32"}` and its variants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuantization {
    #[serde(default)]
    pub(crate) bits: Option<i64>,
    #[serde(default, rename = "type")]
    pub(crate) kind: Option<QuantType>,
    #[serde(default)]
    pub(crate) double_quant: Option<bool>,
    #[serde(default)]
    pub(crate) compute_dtype: Option<ComputeDtype>,
}

/// A resolved shape as a request would write it (a job continuing another's adapter keeps its
/// shape).
impl From<&LoraSpec> for RawLora {
    fn from(l: &LoraSpec) -> RawLora {
        RawLora {
            r: Some(l.r),
            alpha: Some(l.alpha),
            dropout: Some(l.dropout),
            target_modules: Some(TargetModules::List(l.target_modules.clone())),
            use_rslora: Some(l.use_rslora),
        }
    }
}

/// `target_modules` as written: `"all-linear"` (every linear layer of every block, as PEFT
/// means it) or a list of module names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub(crate) enum TargetModules {
    Keyword(String),
    List(Vec<String>),
}

/// The training fields as written; each `None` takes its default when the spec is parsed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTraining {
    #[serde(default)]
    pub(crate) epochs: Option<i64>,
    #[serde(default)]
    pub(crate) max_steps: Option<i64>,
    #[serde(default)]
    pub(crate) batch_size: Option<i64>,
    #[serde(default)]
    pub(crate) gradient_accumulation_steps: Option<i64>,
    #[serde(default)]
    pub(crate) learning_rate: Option<f64>,
    #[serde(default)]
    pub(crate) lr_scheduler: Option<LrScheduler>,
    #[serde(default)]
    pub(crate) warmup_steps: Option<i64>,
    #[serde(default)]
    pub(crate) warmup_ratio: Option<f64>,
    #[serde(default)]
    pub(crate) optimizer: Option<OptimizerKind>,
    #[serde(default)]
    pub(crate) weight_decay: Option<f64>,
    #[serde(default)]
    pub(crate) adam_beta1: Option<f64>,
    #[serde(default)]
    pub(crate) adam_beta2: Option<f64>,
    #[serde(default)]
    pub(crate) adam_epsilon: Option<f64>,
    #[serde(default)]
    pub(crate) momentum: Option<f64>,
    #[serde(default)]
    pub(crate) max_grad_norm: Option<f64>,
    #[serde(default)]
    pub(crate) max_seq_len: Option<i64>,
    #[serde(default)]
    pub(crate) train_on_inputs: Option<bool>,
    #[serde(default)]
    pub(crate) gradient_checkpointing: Option<bool>,
    #[serde(default)]
    pub(crate) packing: Option<bool>,
    #[serde(default)]
    pub(crate) eval_every_steps: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// The validated spec

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawJobSpec")]
pub struct JobSpec {
    /// Hub repo id (`HuggingFaceTB/SmolLM2-135M-Instruct`), a local model directory, or a `.gguf` file.
    pub base_model: String,
    /// Hub revision (branch, tag or commit); ignored for local models.
    pub revision: Option<String>,
    pub dataset: DatasetSpec,
    /// What the job trains for: `sft` (the default), `dpo` or `orpo` on preference pairs.
    pub method: Method,
    pub lora: LoraSpec,
    /// Frozen-base quantization (QLoRA); `None` trains plain LoRA on a dense base.
    pub quantization: Option<QuantizationSpec>,
    /// Dtype the frozen base weights are stored and multiplied in: f32, or bf16 (on the CPU the
    /// dense linear weights in bf16 with everything else in f32; on CUDA the whole base), f16 on
    /// CUDA. LoRA weights and optimizer state stay f32. With `quantization`, the same as its
    /// `compute_dtype`.
    pub compute_dtype: ComputeDtype,
    pub training: TrainingSpec,
    /// Write a checkpoint every N optimizer steps (the final adapter is always written).
    pub checkpoint_every_steps: Option<u64>,
    /// Stop when the validation loss stops improving; the best evaluation's checkpoint is then
    /// the job's adapter. Needs validation data and `training.eval_every_steps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingSpec>,
    /// Free text appended to the adapter's name.
    pub suffix: Option<String>,
    pub seed: u64,
    /// Start from an adapter an earlier job made (`"<job id>:<step>"` or `"<job id>"` in JSON).
    pub from_checkpoint: Option<CheckpointRef>,
    /// Up to 16 key/value pairs of the caller's own (keys ≤ 64, values ≤ 512 characters), as
    /// OpenAI's jobs carry them; job lists filter on them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetSpec {
    /// Local path, `file://` URL (or, through the service, http(s) / `file-<id>`), of a JSON Lines file.
    pub url: String,
    pub format: DatasetFormat,
    /// A second JSONL file used for evaluation.
    pub validation_url: Option<String>,
    /// Fraction of the training examples held out for evaluation (0 < f < 1).
    pub validation_split: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// Detected from the first record's fields.
    #[default]
    Auto,
    /// `{"messages": [{"role", "content"}, ...]}`, rendered with the model's chat template.
    Messages,
    /// `{"instruction", "input"?, "output"}`, rendered with the Alpaca prompt.
    Alpaca,
    /// `{"conversations": [{"from", "value"}, ...]}`, rendered with the model's chat template.
    Sharegpt,
    /// `{"prompt", "completion"}`, concatenated as is.
    PromptCompletion,
    /// `{"text"}`: loss on every token.
    Text,
    /// OpenAI's preference records: `{"input": {"messages", "tools"?}, "preferred_output":
    /// [message], "non_preferred_output": [message]}` (dpo, orpo).
    Preference,
    /// TRL's preference records: `{"prompt"?, "chosen", "rejected"}`, each a string or a list
    /// of messages; without `prompt`, the turns chosen and rejected share are the prompt.
    ChosenRejected,
}

impl DatasetFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetFormat::Auto => "auto",
            DatasetFormat::Messages => "messages",
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::Sharegpt => "sharegpt",
            DatasetFormat::PromptCompletion => "prompt_completion",
            DatasetFormat::Text => "text",
            DatasetFormat::Preference => "preference",
            DatasetFormat::ChosenRejected => "chosen_rejected",
        }
    }

    /// Whether the records are chosen/rejected pairs.
    pub fn is_preference(self) -> bool {
        matches!(
            self,
            DatasetFormat::Preference | DatasetFormat::ChosenRejected
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// 4-bit NormalFloat (QLoRA).
    Nf4,
    /// 4-bit float.
    Fp4,
    /// 8-bit block-wise absmax.
    Int8,
    /// A `.gguf` base kept in its own GGML types (Q4_0, Q4_1, Q8_0, K-quants, ...).
    Gguf,
}

impl QuantType {
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
            QuantType::Int8 => "int8",
            QuantType::Gguf => "gguf",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

/// A frozen base's quantization, every implied field resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantizationSpec {
    /// 4 or 8; `None` for `gguf`, which keeps the file's own types.
    pub bits: Option<i64>,
    #[serde(rename = "type")]
    pub kind: QuantType,
    /// The 4-bit block constants quantized again (always false for 8 bits and gguf).
    pub double_quant: bool,
    /// Dtype the frozen base is dequantized to and multiplied in (f32; bf16/f16 on CUDA).
    pub compute_dtype: ComputeDtype,
}

/// The linear layers of a Llama-family block, by their Hugging Face names.
pub const ALL_LINEAR: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Phi-3's fused modules, which `target_modules` may name besides [`ALL_LINEAR`]; which of them
/// a model has is its family's business (`Arch::lora_targets`).
pub(crate) const FUSED_MODULES: [&str; 2] = ["qkv_proj", "gate_up_proj"];

/// The LoRA adapter's shape and regularization, resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraSpec {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names in the canonical order of [`ALL_LINEAR`] then [`FUSED_MODULES`].
    pub target_modules: Vec<String>,
    /// Scale by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
}

const DEFAULT_R: i64 = 8;
const DEFAULT_DROPOUT: f64 = 0.05;

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            r: DEFAULT_R,
            alpha: 2.0 * DEFAULT_R as f64,
            dropout: DEFAULT_DROPOUT,
            target_modules: ALL_LINEAR[..4].iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
        }
    }
}

impl LoraSpec {
    /// A LoRA shape from its parts, alpha defaulting to 2·r as in a job spec (an adapter's
    /// `adapter_config.json`, a benchmark's shape).
    pub fn new(r: i64, alpha: Option<f64>, target_modules: &[&str], use_rslora: bool) -> LoraSpec {
        LoraSpec {
            r,
            alpha: alpha.unwrap_or(2.0 * r as f64),
            dropout: 0.0,
            target_modules: target_modules.iter().map(|s| s.to_string()).collect(),
            use_rslora,
        }
    }

    /// The factor applied to B·A·x.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingSpec {
    pub epochs: i64,
    /// Stop after this many optimizer steps (overrides epochs; data repeats if needed).
    pub max_steps: Option<i64>,
    pub batch_size: i64,
    pub gradient_accumulation_steps: i64,
    pub learning_rate: f64,
    pub lr_scheduler: LrScheduler,
    pub warmup_steps: i64,
    /// Fraction of the total steps used for warmup when warmup_steps is 0.
    pub warmup_ratio: f64,
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Examples longer than this many tokens are truncated (and counted as truncated).
    pub max_seq_len: i64,
    /// Put the loss on prompt tokens too.
    pub train_on_inputs: bool,
    /// Recompute each decoder layer in backward instead of keeping its activations: less memory
    /// for about one more forward pass (transformers' `gradient_checkpointing`).
    pub gradient_checkpointing: bool,
    /// Pack each micro-batch's examples into shared rows (`data::make_packed_batch`), attention
    /// and positions kept within each example: the same loss and gradients as one example per
    /// row, without most of the padding. On by default because it changes no number but the time; off,
    /// micro-batches are grouped by length instead (examples of similar length train together).
    pub packing: bool,
    /// Evaluate every N optimizer steps (and always at the end) when a validation set exists.
    pub eval_every_steps: Option<i64>,
}

/// The learning rate a job gets when it names none (OpenAI's `learning_rate_multiplier`
/// scales this).
pub(crate) const DEFAULT_LEARNING_RATE: f64 = 2e-4;
/// The seed a job gets when it names none.
pub(crate) const DEFAULT_SEED: u64 = 42;

impl Default for TrainingSpec {
    fn default() -> Self {
        RawTraining::default()
            .resolve()
            .expect("the defaults are valid")
    }
}

/// Bounds that keep one spec from asking for absurd work or storage (a job's total work is
/// also bounded by the operator's `--max-job-steps` and `--max-job-hours`).
pub(crate) const MAX_STEPS: i64 = 1_000_000;
pub(crate) const MAX_EPOCHS: i64 = 10_000;
pub(crate) const MAX_BATCH_SIZE: i64 = 4096;
pub(crate) const MAX_ACCUMULATION: i64 = 1024;
pub(crate) const MAX_ALPHA: f64 = 1e6;
const MAX_NAME_LEN: usize = 512;
const MAX_URL_LEN: usize = 4096;
const MAX_SUFFIX_LEN: usize = 64;
const MAX_METADATA_PAIRS: usize = 16;

// ---------------------------------------------------------------------------------------------
// Parsing: the one place a spec is checked and its defaults resolved

impl JobSpec {
    /// Parses JSON text into a validated spec; errors name the field.
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let raw: RawJobSpec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            serde_error(&path, &e.inner().to_string())
        })?;
        JobSpec::try_from(raw)
    }
}

impl TryFrom<RawJobSpec> for JobSpec {
    type Error = SpecError;

    /// Checks every field of `raw` and resolves every default.
    fn try_from(raw: RawJobSpec) -> Result<JobSpec, SpecError> {
        check_texts(&raw)?;
        check_metadata(raw.metadata.as_ref())?;
        let dataset = raw.dataset.resolve()?;
        let method = raw
            .method
            .map(RawMethod::resolve)
            .transpose()?
            .unwrap_or_default();
        check_format_for_method(dataset.format, &method)?;
        let lora = raw.lora.unwrap_or_default().resolve()?;
        let (quantization, compute_dtype) = match raw.quantization {
            None => (None, raw.compute_dtype.unwrap_or_default()),
            Some(q) => {
                let q = q.resolve(raw.compute_dtype, &raw.base_model)?;
                let dtype = q.compute_dtype;
                (Some(q), dtype)
            }
        };
        let training = raw.training.resolve()?;
        let early_stopping = raw
            .early_stopping
            .map(RawEarlyStopping::resolve)
            .transpose()?;
        if early_stopping.is_some() {
            if dataset.validation_url.is_none() && dataset.validation_split.is_none() {
                return Err(err(
                    "early_stopping",
                    "needs validation data to judge by: give dataset.validation_url or \
                     dataset.validation_split",
                ));
            }
            if training.eval_every_steps.is_none() {
                return Err(err(
                    "early_stopping",
                    "needs evaluations along the run: set training.eval_every_steps",
                ));
            }
        }
        if raw.checkpoint_every_steps == Some(0) {
            return Err(err("checkpoint_every_steps", "must be >= 1"));
        }
        let from_checkpoint = raw
            .from_checkpoint
            .map(|text| text.parse::<CheckpointRef>())
            .transpose()
            .map_err(|e| err("from_checkpoint", e))?;
        Ok(JobSpec {
            base_model: raw.base_model,
            revision: raw.revision,
            dataset,
            method,
            lora,
            quantization,
            compute_dtype,
            training,
            checkpoint_every_steps: raw.checkpoint_every_steps,
            early_stopping,
            suffix: raw.suffix,
            seed: raw.seed.unwrap_or(DEFAULT_SEED),
            from_checkpoint,
            metadata: raw.metadata,
        })
    }
}

/// A dataset format given outright must hold what the method trains on: pairs for dpo and orpo,
/// single answers for sft (`auto` is checked when the data is read).
fn check_format_for_method(format: DatasetFormat, method: &Method) -> Result<(), SpecError> {
    match (format.is_preference(), method.is_preference()) {
        (true, false) => Err(err(
            "dataset.format",
            format!(
                "{} holds preference pairs; train them with method dpo or orpo",
                format.as_str()
            ),
        )),
        (false, true) if format != DatasetFormat::Auto => Err(err(
            "dataset.format",
            format!(
                "method {} trains on preference pairs (format preference or chosen_rejected), not {}",
                method.name(),
                format.as_str()
            ),
        )),
        _ => Ok(()),
    }
}

/// A serde error as a [`SpecError`]: unknown and missing fields are named themselves (serde
/// reports them at their enclosing object), anything else at its path.
pub(crate) fn serde_error(path: &str, msg: &str) -> SpecError {
    let param = match (
        msg.starts_with("missing field"),
        field_from_serde_message(msg),
    ) {
        (true, Some(field)) if path == "." => field,
        (true, Some(field)) => format!("{path}.{field}"),
        _ if path == "." => "body".to_string(),
        _ => path.to_string(),
    };
    err(&param, msg)
}

/// Lengths and characters of the free-text fields, and the revision's shape.
fn check_texts(raw: &RawJobSpec) -> Result<(), SpecError> {
    if raw.base_model.trim().is_empty() {
        return Err(err("base_model", "must not be empty"));
    }
    if raw.dataset.url.trim().is_empty() {
        return Err(err("dataset.url", "must not be empty"));
    }
    if let Some(rev) = &raw.revision {
        let plain = rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if rev.is_empty() || !plain || rev.contains("..") || rev.starts_with('/') {
            return Err(err(
                "revision",
                "must be a branch, tag or commit: letters, digits, - _ . / (no ..)",
            ));
        }
    }
    let texts = [
        ("base_model", Some(&raw.base_model), MAX_NAME_LEN),
        ("revision", raw.revision.as_ref(), MAX_NAME_LEN),
        ("dataset.url", Some(&raw.dataset.url), MAX_URL_LEN),
        (
            "dataset.validation_url",
            raw.dataset.validation_url.as_ref(),
            MAX_URL_LEN,
        ),
        ("suffix", raw.suffix.as_ref(), MAX_SUFFIX_LEN),
        (
            "from_checkpoint",
            raw.from_checkpoint.as_ref(),
            MAX_NAME_LEN,
        ),
    ];
    for (field, text, max) in texts {
        if let Some(text) = text {
            if text.chars().count() > max {
                return Err(err(field, format!("longer than {max} characters")));
            }
            if text.chars().any(char::is_control) {
                return Err(err(field, "must not contain control characters"));
            }
        }
    }
    Ok(())
}

fn check_metadata(pairs: Option<&BTreeMap<String, String>>) -> Result<(), SpecError> {
    let Some(pairs) = pairs else { return Ok(()) };
    if pairs.len() > MAX_METADATA_PAIRS {
        return Err(err(
            "metadata",
            format!("at most {MAX_METADATA_PAIRS} pairs, got {}", pairs.len()),
        ));
    }
    for (key, value) in pairs {
        let param = format!("metadata.{key}");
        if key.is_empty() || key.chars().count() > 64 {
            return Err(err("metadata", "keys are 1 to 64 characters"));
        }
        if value.chars().count() > 512 {
            return Err(err(&param, "longer than 512 characters"));
        }
        if key.chars().chain(value.chars()).any(char::is_control) {
            return Err(err(&param, "must not contain control characters"));
        }
    }
    Ok(())
}

impl RawDataset {
    fn resolve(self) -> Result<DatasetSpec, SpecError> {
        if let Some(f) = self.validation_split {
            if !(f > 0.0 && f < 1.0) {
                return Err(err(
                    "dataset.validation_split",
                    format!("must be between 0 and 1 (exclusive), got {f}"),
                ));
            }
            if self.validation_url.is_some() {
                return Err(err(
                    "dataset.validation_split",
                    "give either validation_url or validation_split, not both",
                ));
            }
        }
        Ok(DatasetSpec {
            url: self.url,
            format: self.format,
            validation_url: self.validation_url,
            validation_split: self.validation_split,
        })
    }
}

impl RawLora {
    /// The LoRA settings checked and completed: the one place a job's, and an adapter file's
    /// ([`crate::train::checkpoint::read_lora_spec`]), are validated.
    pub(crate) fn resolve(self) -> Result<LoraSpec, SpecError> {
        let r = self.r.unwrap_or(DEFAULT_R);
        if !(1..=1024).contains(&r) {
            return Err(err(
                "lora.r",
                format!("must be between 1 and 1024, got {r}"),
            ));
        }
        let alpha = self.alpha.unwrap_or(2.0 * r as f64);
        if !(alpha.is_finite() && alpha > 0.0 && alpha <= MAX_ALPHA) {
            return Err(err(
                "lora.alpha",
                format!("must be > 0 and at most {MAX_ALPHA}, got {alpha}"),
            ));
        }
        let dropout = self.dropout.unwrap_or(DEFAULT_DROPOUT);
        if !(0.0..1.0).contains(&dropout) {
            return Err(err(
                "lora.dropout",
                format!("must be in [0, 1), got {dropout}"),
            ));
        }
        let names: Vec<String> = match self.target_modules {
            None => LoraSpec::default().target_modules,
            Some(TargetModules::Keyword(k)) if k == "all-linear" => {
                ALL_LINEAR.iter().map(|s| s.to_string()).collect()
            }
            Some(TargetModules::Keyword(k)) => {
                return Err(err(
                    "lora.target_modules",
                    format!("unknown keyword {k:?}: use \"all-linear\" or a list of module names"),
                ))
            }
            Some(TargetModules::List(l)) => l,
        };
        if names.is_empty() {
            return Err(err("lora.target_modules", "must name at least one module"));
        }
        let known: Vec<&str> = ALL_LINEAR.iter().chain(&FUSED_MODULES).copied().collect();
        if let Some(bad) = names.iter().find(|n| !known.contains(&n.as_str())) {
            return Err(err(
                "lora.target_modules",
                format!("unknown module {bad:?} (known: {})", known.join(", ")),
            ));
        }
        let target_modules = known
            .iter()
            .filter(|module| names.iter().any(|n| n == *module))
            .map(|m| m.to_string())
            .collect();
        Ok(LoraSpec {
            r,
            alpha,
            dropout,
            target_modules,
            use_rslora: self.use_rslora.unwrap_or(false),
        })
    }
}

impl RawQuantization {
    /// Fills the implied fields and refuses impossible combinations; `top_dtype` is the spec's
    /// own `compute_dtype`, which must agree with the quantization's when both are given.
    fn resolve(
        self,
        top_dtype: Option<ComputeDtype>,
        base_model: &str,
    ) -> Result<QuantizationSpec, SpecError> {
        let compute_dtype = match (top_dtype, self.compute_dtype) {
            (Some(a), Some(b)) if a != b => {
                return Err(err(
                    "compute_dtype",
                    "differs from quantization.compute_dtype; give one of them",
                ))
            }
            (a, b) => b.or(a).unwrap_or_default(),
        };
        let kind = match (self.kind, self.bits) {
            (Some(k), _) => k,
            (None, Some(8)) => QuantType::Int8,
            (None, Some(4) | None) => QuantType::Nf4,
            (None, Some(b)) => {
                return Err(err("quantization.bits", format!("must be 4 or 8, got {b}")))
            }
        };
        let bits = match kind {
            QuantType::Nf4 | QuantType::Fp4 => Some(4),
            QuantType::Int8 => Some(8),
            QuantType::Gguf => {
                if let Some(b) = self.bits {
                    return Err(err(
                        "quantization.bits",
                        format!("type gguf keeps the file's own types; do not give bits (got {b})"),
                    ));
                }
                if !base_model.ends_with(".gguf") {
                    return Err(err(
                        "quantization.type",
                        "gguf keeps a .gguf base quantized; base_model is not a .gguf file",
                    ));
                }
                None
            }
        };
        if let (Some(asked), Some(bits)) = (self.bits, bits) {
            if asked != 4 && asked != 8 {
                return Err(err(
                    "quantization.bits",
                    format!("must be 4 or 8, got {asked}"),
                ));
            }
            if asked != bits {
                return Err(err(
                    "quantization.type",
                    format!(
                        "{} is a {bits}-bit type, but bits is {asked}",
                        kind.as_str()
                    ),
                ));
            }
        }
        let double_quant = match (bits, self.double_quant) {
            (Some(4), dq) => dq.unwrap_or(true),
            (_, Some(true)) => {
                return Err(err(
                    "quantization.double_quant",
                    "only 4-bit types have block constants to quantize again",
                ))
            }
            _ => false,
        };
        Ok(QuantizationSpec {
            bits,
            kind,
            double_quant,
            compute_dtype,
        })
    }
}

impl RawTraining {
    fn resolve(self) -> Result<TrainingSpec, SpecError> {
        let t = TrainingSpec {
            epochs: self.epochs.unwrap_or(3),
            max_steps: self.max_steps,
            batch_size: self.batch_size.unwrap_or(4),
            gradient_accumulation_steps: self.gradient_accumulation_steps.unwrap_or(1),
            learning_rate: self.learning_rate.unwrap_or(DEFAULT_LEARNING_RATE),
            lr_scheduler: self.lr_scheduler.unwrap_or(LrScheduler::Linear),
            warmup_steps: self.warmup_steps.unwrap_or(0),
            warmup_ratio: self.warmup_ratio.unwrap_or(0.0),
            optimizer: self.optimizer.unwrap_or(OptimizerKind::Adamw),
            weight_decay: self.weight_decay.unwrap_or(0.0),
            adam_beta1: self.adam_beta1.unwrap_or(0.9),
            adam_beta2: self.adam_beta2.unwrap_or(0.999),
            adam_epsilon: self.adam_epsilon.unwrap_or(1e-8),
            momentum: self.momentum.unwrap_or(0.0),
            max_grad_norm: self.max_grad_norm.unwrap_or(1.0),
            max_seq_len: self.max_seq_len.unwrap_or(1024),
            train_on_inputs: self.train_on_inputs.unwrap_or(false),
            gradient_checkpointing: self.gradient_checkpointing.unwrap_or(false),
            packing: self.packing.unwrap_or(true),
            eval_every_steps: self.eval_every_steps,
        };
        t.check()?;
        Ok(t)
    }
}

impl TrainingSpec {
    fn check(&self) -> Result<(), SpecError> {
        let positive = |name: &str, v: i64| {
            if v < 1 {
                Err(err(
                    &format!("training.{name}"),
                    format!("must be >= 1, got {v}"),
                ))
            } else {
                Ok(())
            }
        };
        let within = |name: &str, v: i64, max: i64| {
            positive(name, v)?;
            if v > max {
                return Err(err(
                    &format!("training.{name}"),
                    format!("must be at most {max}, got {v}"),
                ));
            }
            Ok(())
        };
        within("epochs", self.epochs, MAX_EPOCHS)?;
        within("batch_size", self.batch_size, MAX_BATCH_SIZE)?;
        within(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            MAX_ACCUMULATION,
        )?;
        if let Some(m) = self.max_steps {
            within("max_steps", m, MAX_STEPS)?;
        }
        if let Some(e) = self.eval_every_steps {
            positive("eval_every_steps", e)?;
        }
        if self.max_seq_len < 2 || self.max_seq_len > 131_072 {
            return Err(err(
                "training.max_seq_len",
                format!("must be between 2 and 131072, got {}", self.max_seq_len),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(err(
                "training.learning_rate",
                format!("must be > 0, got {}", self.learning_rate),
            ));
        }
        if !(0..=MAX_STEPS).contains(&self.warmup_steps) {
            return Err(err(
                "training.warmup_steps",
                format!("must be between 0 and {MAX_STEPS}"),
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(err(
                "training.warmup_ratio",
                format!("must be in [0, 1), got {}", self.warmup_ratio),
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(err("training.weight_decay", "must be >= 0"));
        }
        for (name, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return Err(err(
                    &format!("training.{name}"),
                    format!("must be in [0, 1), got {b}"),
                ));
            }
        }
        if self.adam_epsilon.is_nan() || self.adam_epsilon <= 0.0 {
            return Err(err("training.adam_epsilon", "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(err("training.momentum", "must be in [0, 1)"));
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return Err(err(
                "training.max_grad_norm",
                "must be >= 0 (0 disables clipping)",
            ));
        }
        Ok(())
    }
}

/// serde_json says `unknown field `foo`` or `missing field `bar``; pull the name out so the
/// error can point at it.
fn field_from_serde_message(msg: &str) -> Option<String> {
    for prefix in ["unknown field `", "missing field `"] {
        if let Some(rest) = msg.split(prefix).nth(1) {
            return rest.split('`').next().map(str::to_string);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobId;

    #[test]
    fn defaults_are_filled_and_echoed() {
        let spec = JobSpec::from_json(r#"{"base_model":"m","dataset":{"url":"d.jsonl"}}"#).unwrap();
        assert_eq!(spec.lora.r, 8);
        assert_eq!(spec.lora.alpha, 16.0);
        assert_eq!(
            spec.lora.target_modules,
            vec!["q_proj", "k_proj", "v_proj", "o_proj"]
        );
        assert_eq!(spec.compute_dtype, ComputeDtype::F32);
        assert_eq!(spec.seed, DEFAULT_SEED);
        assert_eq!(spec.training.batch_size, 4);
        let echoed = serde_json::to_value(&spec).unwrap();
        assert_eq!(echoed["lora"]["alpha"], 16.0);
        assert_eq!(echoed["training"]["lr_scheduler"], "linear");
        // the stored form reads back as the same spec, without a second parse
        let stored: JobSpec = serde_json::from_value(echoed).unwrap();
        assert_eq!(stored, spec);
        // and its JSON parses to itself as a request: resolving is idempotent
        assert_eq!(
            JobSpec::from_json(&serde_json::to_string(&spec).unwrap()).unwrap(),
            spec
        );
    }

    #[test]
    fn from_checkpoint_is_parsed_once() {
        let id = JobId::new();
        let spec = JobSpec::from_json(&format!(
            r#"{{"base_model":"m","dataset":{{"url":"d"}},"from_checkpoint":"{id}:20"}}"#
        ))
        .unwrap();
        let named = spec.from_checkpoint.clone().unwrap();
        assert_eq!((named.job, named.step), (id.clone(), Some(20)));
        assert_eq!(
            serde_json::to_value(&spec).unwrap()["from_checkpoint"],
            format!("{id}:20")
        );
        let e = JobSpec::from_json(
            r#"{"base_model":"m","dataset":{"url":"d"},"from_checkpoint":"../x"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param, "from_checkpoint");
    }

    #[test]
    fn all_linear_expands() {
        let spec = JobSpec::from_json(
            r#"{"base_model":"m","dataset":{"url":"d"},"lora":{"target_modules":"all-linear","r":4}}"#,
        )
        .unwrap();
        assert_eq!(spec.lora.target_modules.len(), 7);
        assert_eq!(spec.lora.scale(), 2.0);
    }

    #[test]
    fn quantization_is_completed_or_refused() {
        let parse = |q: &str| {
            JobSpec::from_json(&format!(
                r#"{{"base_model":"m.gguf","dataset":{{"url":"d"}},"quantization":{q}}}"#
            ))
        };
        let q = parse(r#"{"bits":4}"#).unwrap().quantization.unwrap();
        assert_eq!(
            (q.kind, q.bits, q.double_quant, q.compute_dtype),
            (QuantType::Nf4, Some(4), true, ComputeDtype::F32)
        );
        let q = parse(r#"{"type":"fp4"}"#).unwrap().quantization.unwrap();
        assert_eq!((q.bits, q.double_quant), (Some(4), true));
        let q = parse(r#"{"bits":8}"#).unwrap().quantization.unwrap();
        assert_eq!((q.kind, q.double_quant), (QuantType::Int8, false));
        let q = parse(r#"{"type":"gguf"}"#).unwrap().quantization.unwrap();
        assert_eq!(
            (q.kind, q.bits, q.double_quant),
            (QuantType::Gguf, None, false)
        );
        assert!(parse("null").unwrap().quantization.is_none());
        for (q, param, words) in [
            (
                r#"{"bits":3}"#,
                "quantization.bits",
                "must be 4 or 8, got 3",
            ),
            (
                r#"{"bits":8,"type":"nf4"}"#,
                "quantization.type",
                "nf4 is a 4-bit type, but bits is 8",
            ),
            (
                r#"{"bits":4,"type":"int8"}"#,
                "quantization.type",
                "int8 is a 8-bit type, but bits is 4",
            ),
            (
                r#"{"type":"int8","double_quant":true}"#,
                "quantization.double_quant",
                "only 4-bit",
            ),
            (
                r#"{"type":"gguf","bits":4}"#,
                "quantization.bits",
                "keeps the file's own types",
            ),
            (r#"{"type":"nf5"}"#, "quantization.type", "unknown variant"),
            (
                r#"{"bits":4,"group":64}"#,
                "quantization.group",
                "unknown field",
            ),
            (
                r#"{"compute_dtype":"f8"}"#,
                "quantization.compute_dtype",
                "unknown variant",
            ),
        ] {
            let e = parse(q).unwrap_err();
            assert_eq!(e.param, param, "{q}: {e}");
            assert!(e.message.contains(words), "{q}: {e}");
        }
        let e = JobSpec::from_json(
            r#"{"base_model":"dir","dataset":{"url":"d"},"quantization":{"type":"gguf"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.param, "quantization.type");
    }

    /// Each field's check, as a request names it (these ran through HTTP before: the HTTP test
    /// keeps one of each kind to show the wiring).
    #[test]
    fn every_bad_field_is_named() {
        let ok = serde_json::json!({"base_model": "m", "dataset": {"url": "d.jsonl"}});
        let with = |extra: serde_json::Value| {
            let mut v = ok.clone();
            for (k, x) in extra.as_object().unwrap() {
                match (v.get_mut(k), x) {
                    (Some(serde_json::Value::Object(o)), serde_json::Value::Object(add)) => {
                        o.extend(add.clone())
                    }
                    _ => {
                        v[k] = x.clone();
                    }
                }
            }
            v.to_string()
        };
        let cases = [
            (serde_json::json!({"lora": {"r": 0}}), "lora.r"),
            (serde_json::json!({"lora": {"r": -3}}), "lora.r"),
            (serde_json::json!({"lora": {"alpha": -1.0}}), "lora.alpha"),
            (
                serde_json::json!({"lora": {"dropout": 1.5}}),
                "lora.dropout",
            ),
            (
                serde_json::json!({"lora": {"target_modules": ["attn"]}}),
                "lora.target_modules",
            ),
            (
                serde_json::json!({"lora": {"target_modules": "everything"}}),
                "lora.target_modules",
            ),
            (
                serde_json::json!({"lora": {"target_modules": []}}),
                "lora.target_modules",
            ),
            (
                serde_json::json!({"training": {"learning_rate": 0}}),
                "training.learning_rate",
            ),
            (
                serde_json::json!({"training": {"learning_rate": -0.1}}),
                "training.learning_rate",
            ),
            (
                serde_json::json!({"training": {"batch_size": 0}}),
                "training.batch_size",
            ),
            (
                serde_json::json!({"training": {"epochs": 0}}),
                "training.epochs",
            ),
            (
                serde_json::json!({"training": {"epochs": 10001}}),
                "training.epochs",
            ),
            (
                serde_json::json!({"training": {"max_seq_len": 1}}),
                "training.max_seq_len",
            ),
            (
                serde_json::json!({"training": {"warmup_ratio": 2}}),
                "training.warmup_ratio",
            ),
            (
                serde_json::json!({"training": {"lr_scheduler": "exotic"}}),
                "training.lr_scheduler",
            ),
            (
                serde_json::json!({"training": {"batch_size": "four"}}),
                "training.batch_size",
            ),
            (
                serde_json::json!({"training": {"adam_beta2": 1.0}}),
                "training.adam_beta2",
            ),
            (
                serde_json::json!({"training": {"max_grad_norm": -1}}),
                "training.max_grad_norm",
            ),
            (
                serde_json::json!({"training": {"eval_every_steps": 0}}),
                "training.eval_every_steps",
            ),
            (serde_json::json!({"extra_field": 1}), "extra_field"),
            (
                serde_json::json!({"training": {"bogus": 1}}),
                "training.bogus",
            ),
            (serde_json::json!({"base_model": ""}), "base_model"),
            (serde_json::json!({"revision": "../x"}), "revision"),
            (serde_json::json!({"suffix": "x".repeat(65)}), "suffix"),
            (
                serde_json::json!({"dataset": {"validation_split": 0}}),
                "dataset.validation_split",
            ),
            (
                serde_json::json!({"dataset": {"validation_split": 0.1, "validation_url": "v"}}),
                "dataset.validation_split",
            ),
            (
                serde_json::json!({"from_checkpoint": "not-a-job"}),
                "from_checkpoint",
            ),
            (
                serde_json::json!({"quantization": {"bits": 3}}),
                "quantization.bits",
            ),
            (
                serde_json::json!({"quantization": {"type": "nf4", "bits": 8}}),
                "quantization.type",
            ),
            (
                serde_json::json!({"quantization": {"type": "gguf"}}),
                "quantization.type",
            ),
            (
                serde_json::json!({"compute_dtype": "bf16", "quantization": {"compute_dtype": "f32"}}),
                "compute_dtype",
            ),
            (
                serde_json::json!({"checkpoint_every_steps": 0}),
                "checkpoint_every_steps",
            ),
            (
                serde_json::json!({"metadata": {"k": "v".repeat(513)}}),
                "metadata.k",
            ),
        ];
        for (extra, param) in cases {
            let body = with(extra);
            let e = JobSpec::from_json(&body).unwrap_err();
            assert_eq!(e.param, param, "{body}: {e}");
            assert!(!e.message.is_empty());
        }
        let e = JobSpec::from_json(r#"{"base_model": "m"}"#).unwrap_err();
        assert_eq!(e.param, "dataset");
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                r#"{"base_model":"m","dataset":{"url":"d"},"lora":{"r":0}}"#,
                "lora.r",
            ),
            (
                r#"{"base_model":"m","dataset":{"url":"d"},"lora":{"target_modules":["qq"]}}"#,
                "lora.target_modules",
            ),
            (
                r#"{"base_model":"m","dataset":{"url":"d"},"training":{"learning_rate":0}}"#,
                "training.learning_rate",
            ),
            (
                r#"{"base_model":"m","dataset":{"url":"d"},"training":{"batch_size":0}}"#,
                "training.batch_size",
            ),
            (
                r#"{"base_model":"m","dataset":{"url":"d"},"bogus":1}"#,
                "bogus",
            ),
            (r#"{"dataset":{"url":"d"}}"#, "base_model"),
            (
                r#"{"base_model":"m","dataset":{"url":"d","validation_split":1.5}}"#,
                "dataset.validation_split",
            ),
            (
                r#"{"base_model":"m","dataset":{"url":"d","format":"csv"}}"#,
                "dataset.format",
            ),
            (
                r#"{"base_model":"m","dataset":{"url":"d"},"training":{"bogus":1}}"#,
                "training.bogus",
            ),
            (r#"{"base_model":"m","dataset":{}}"#, "dataset.url"),
            (
                r#"{"base_model":"m","dataset":{"url":"d"},"training":{"batch_size":"x"}}"#,
                "training.batch_size",
            ),
        ];
        for (json, param) in cases {
            let e = JobSpec::from_json(json).unwrap_err();
            assert_eq!(e.param, param, "{json}: {e}");
        }
    }

    #[test]
    fn methods_and_early_stopping_resolve_and_refuse_what_does_not_apply() {
        let base = r#""base_model":"m","dataset":{"url":"d.jsonl""#;
        let spec = |extra: &str| JobSpec::from_json(&format!("{{{base}}}{extra}}}"));
        let sft = spec("").unwrap();
        assert_eq!(sft.method, Method::Sft);
        assert_eq!(
            serde_json::to_value(&sft).unwrap()["method"],
            serde_json::json!({"type": "sft"})
        );
        let dpo = spec(r#","method":{"type":"dpo","rpo_alpha":0.5}"#).unwrap();
        let Method::Dpo(d) = &dpo.method else {
            panic!("{:?}", dpo.method)
        };
        assert_eq!(
            (d.beta, d.label_smoothing, d.loss_type, d.rpo_alpha),
            (0.1, 0.0, DpoLoss::Sigmoid, Some(0.5))
        );
        // the stored form reads back as the same spec
        let stored: JobSpec = serde_json::from_value(serde_json::to_value(&dpo).unwrap()).unwrap();
        assert_eq!(stored, dpo);
        let orpo = spec(r#","method":{"type":"orpo","beta":0.25}"#).unwrap();
        assert_eq!(orpo.method, Method::Orpo(OrpoSpec { beta: 0.25 }));
        let stopping = JobSpec::from_json(
            r#"{"base_model":"m","dataset":{"url":"d.jsonl","validation_split":0.1},
                "training":{"eval_every_steps":5},"early_stopping":{"patience":2}}"#,
        )
        .unwrap();
        let rule = stopping.early_stopping.as_ref().unwrap();
        assert_eq!(
            (rule.patience, rule.min_delta, rule.metric.as_str()),
            (2, 0.0, "eval_loss")
        );
        for (extra, param) in [
            (r#","method":{"type":"dpo","beta":0}"#, "method.beta"),
            (
                r#","method":{"type":"dpo","label_smoothing":0.5}"#,
                "method.label_smoothing",
            ),
            (
                r#","method":{"type":"dpo","loss_type":"ipo","label_smoothing":0.1}"#,
                "method.label_smoothing",
            ),
            (
                r#","method":{"type":"orpo","rpo_alpha":1}"#,
                "method.rpo_alpha",
            ),
            (r#","method":{"type":"sft","beta":0.1}"#, "method.beta"),
            (r#","method":{"type":"grpo"}"#, "method.type"),
            (r#","method":{"type":"reinforcement"}"#, "method.type"),
            (r#","method":{"type":"dpo","gamma":1}"#, "method.gamma"),
            (r#","early_stopping":{"patience":2}"#, "early_stopping"),
            (
                r#","early_stopping":{"patience":0}"#,
                "early_stopping.patience",
            ),
            (
                r#","early_stopping":{"metric":"bleu"}"#,
                "early_stopping.metric",
            ),
        ] {
            let e = spec(extra).unwrap_err();
            assert_eq!(e.param, param, "{extra}: {e}");
        }
        // a format given outright must hold what the method trains on
        let e = JobSpec::from_json(
            r#"{"base_model":"m","dataset":{"url":"d.jsonl","format":"messages"},"method":{"type":"dpo"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.param, "dataset.format");
        let e = JobSpec::from_json(
            r#"{"base_model":"m","dataset":{"url":"d.jsonl","format":"preference"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.param, "dataset.format");
        // without validation data, early stopping has nothing to judge by; without evaluations
        // along the run, nothing to judge
        let e = JobSpec::from_json(
            r#"{"base_model":"m","dataset":{"url":"d.jsonl","validation_split":0.1},"early_stopping":{}}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("eval_every_steps"), "{e}");
    }
}
