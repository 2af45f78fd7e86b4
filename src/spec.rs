//! The job spec: one validated type shared by the HTTP API, the CLI and the training engine.
//!
//! A spec is parsed from JSON (unknown fields are refused), then [`JobSpec::normalize`] fills the
//! defaults that depend on other fields (alpha = 2·r, the target-module list) and checks every
//! range, so what is stored and echoed back is exactly what will run.

use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Hub repo id (`HuggingFaceTB/SmolLM2-135M-Instruct`), a local model directory, or a `.gguf` file.
    pub base_model: String,
    /// Hub revision (branch, tag or commit); ignored for local models.
    #[serde(default)]
    pub revision: Option<String>,
    pub dataset: DatasetSpec,
    #[serde(default)]
    pub lora: LoraSpec,
    /// Frozen-base quantization (QLoRA); `null` trains plain LoRA on a dense base.
    #[serde(default)]
    pub quantization: Option<QuantizationSpec>,
    /// Dtype the frozen base weights are stored and multiplied in: f32, or bf16 (on the CPU the
    /// dense linear weights in bf16 with everything else in f32; on CUDA the whole base), f16 on
    /// CUDA. LoRA weights and optimizer state stay f32. With `quantization`, this is its
    /// `compute_dtype`.
    #[serde(default)]
    pub compute_dtype: Option<ComputeDtype>,
    #[serde(default)]
    pub training: TrainingSpec,
    /// Write a checkpoint every N optimizer steps (the final adapter is always written).
    #[serde(default)]
    pub checkpoint_every_steps: Option<u64>,
    /// Free text appended to the adapter's name.
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `"<job id>:<step>"` or `"<job id>"`: start from an adapter an earlier job made.
    #[serde(default)]
    pub from_checkpoint: Option<String>,
    /// Up to 16 key/value pairs of the caller's own (keys ≤ 64, values ≤ 512 characters), as
    /// OpenAI's jobs carry them; job lists filter on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
}

fn default_seed() -> u64 {
    42
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Local path, `file://` URL (or, through the service, http(s) / `file-<id>`), of a JSON Lines file.
    pub url: String,
    #[serde(default)]
    pub format: DatasetFormat,
    /// A second JSONL file used for evaluation.
    #[serde(default)]
    pub validation_url: Option<String>,
    /// Fraction of the training examples held out for evaluation (0 < f < 1).
    #[serde(default)]
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
        }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    F32,
    Bf16,
    F16,
}

/// `{"bits": 4, "type": "nf4", "double_quant": true, "compute_dtype": "f32"}` and its variants.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationSpec {
    /// 4 or 8; implied by the type when absent.
    #[serde(default)]
    pub bits: Option<i64>,
    /// nf4 (default for 4 bits), fp4, int8 (default for 8 bits), or gguf.
    #[serde(default, rename = "type")]
    pub kind: Option<QuantType>,
    /// Quantize the 4-bit block constants again (default true for 4-bit types).
    #[serde(default)]
    pub double_quant: Option<bool>,
    /// Dtype the frozen base is dequantized to and multiplied in (f32; bf16/f16 on CUDA).
    #[serde(default)]
    pub compute_dtype: Option<ComputeDtype>,
}

impl QuantizationSpec {
    /// Fills the implied fields and refuses impossible combinations.
    fn normalize(mut self, base_model: &str) -> Result<QuantizationSpec, SpecError> {
        let kind = match (self.kind, self.bits) {
            (Some(k), _) => k,
            (None, Some(4)) => QuantType::Nf4,
            (None, Some(8)) => QuantType::Int8,
            (None, Some(b)) => {
                return Err(err("quantization.bits", format!("must be 4 or 8, got {b}")))
            }
            (None, None) => QuantType::Nf4,
        };
        let bits = match kind {
            QuantType::Nf4 | QuantType::Fp4 => 4,
            QuantType::Int8 => 8,
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
                0
            }
        };
        if let Some(b) = self.bits {
            if b != 4 && b != 8 {
                return Err(err("quantization.bits", format!("must be 4 or 8, got {b}")));
            }
            if kind != QuantType::Gguf && b != bits {
                let name = serde_json::to_value(kind).expect("serializes");
                return Err(err(
                    "quantization.type",
                    format!(
                        "{} is a {bits}-bit type, but bits is {b}",
                        name.as_str().unwrap_or("?")
                    ),
                ));
            }
        }
        let double_quant = match (bits, self.double_quant) {
            (4, dq) => dq.unwrap_or(true),
            (_, Some(true)) => {
                return Err(err(
                    "quantization.double_quant",
                    "only 4-bit types have block constants to quantize again",
                ))
            }
            _ => false,
        };
        self.kind = Some(kind);
        self.bits = (bits > 0).then_some(bits);
        self.double_quant = Some(double_quant);
        self.compute_dtype = Some(self.compute_dtype.unwrap_or(ComputeDtype::F32));
        Ok(self)
    }
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
pub const FUSED_MODULES: [&str; 2] = ["qkv_proj", "gate_up_proj"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `"all-linear"` (every linear layer of every block, as PEFT means it).
    Keyword(String),
    List(Vec<String>),
}

impl TargetModules {
    /// The module names, once normalized.
    pub fn names(&self) -> Vec<String> {
        match self {
            TargetModules::Keyword(_) => ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
            TargetModules::List(l) => l.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    #[serde(default = "default_r")]
    pub r: i64,
    /// Defaults to 2·r.
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// Scale by alpha/√r instead of alpha/r.
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_r() -> i64 {
    8
}
fn default_dropout() -> f64 {
    0.05
}
fn default_targets() -> TargetModules {
    TargetModules::List(ALL_LINEAR[..4].iter().map(|s| s.to_string()).collect())
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            r: default_r(),
            alpha: None,
            dropout: default_dropout(),
            target_modules: default_targets(),
            use_rslora: false,
        }
    }
}

impl LoraSpec {
    /// The factor applied to B·A·x.
    pub fn scale(&self) -> f64 {
        let alpha = self.alpha.unwrap_or(2.0 * self.r as f64);
        if self.use_rslora {
            alpha / (self.r as f64).sqrt()
        } else {
            alpha / self.r as f64
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    #[serde(default = "default_epochs")]
    pub epochs: i64,
    /// Stop after this many optimizer steps (overrides epochs; data repeats if needed).
    #[serde(default)]
    pub max_steps: Option<i64>,
    #[serde(default = "default_batch")]
    pub batch_size: i64,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: i64,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    #[serde(default = "default_scheduler")]
    pub lr_scheduler: LrScheduler,
    #[serde(default)]
    pub warmup_steps: i64,
    /// Fraction of the total steps used for warmup when warmup_steps is 0.
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerKind,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// SGD momentum.
    #[serde(default)]
    pub momentum: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Examples longer than this many tokens are truncated (and counted as truncated).
    #[serde(default = "default_seq")]
    pub max_seq_len: i64,
    /// Put the loss on prompt tokens too.
    #[serde(default)]
    pub train_on_inputs: bool,
    /// Recompute each decoder layer in backward instead of keeping its activations: less memory
    /// for about one more forward pass (transformers' `gradient_checkpointing`).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Pack each micro-batch's examples into shared rows (`data::make_packed_batch`), attention
    /// and positions kept within each example: the same loss and gradients as one example per
    /// row, without most of the padding. On by default because it changes no number but the time; off,
    /// micro-batches are grouped by length instead (examples of similar length train together).
    #[serde(default = "yes")]
    pub packing: bool,
    /// Evaluate every N optimizer steps (and always at the end) when a validation set exists.
    #[serde(default)]
    pub eval_every_steps: Option<i64>,
}

fn default_epochs() -> i64 {
    3
}
fn default_batch() -> i64 {
    4
}
fn one() -> i64 {
    1
}
fn yes() -> bool {
    true
}
/// The learning rate a job gets when it names none (OpenAI's `learning_rate_multiplier`
/// scales this).
pub const DEFAULT_LEARNING_RATE: f64 = 2e-4;

fn default_lr() -> f64 {
    DEFAULT_LEARNING_RATE
}
fn default_scheduler() -> LrScheduler {
    LrScheduler::Linear
}
fn default_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_seq() -> i64 {
    1024
}

impl Default for TrainingSpec {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all training fields have defaults")
    }
}

impl JobSpec {
    /// Parses JSON text into a normalized, validated spec.
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let spec: JobSpec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let msg = e.inner().to_string();
            // serde reports unknown/missing fields at the enclosing object: name the field itself
            // a missing field is reported at its enclosing object: name the field itself
            let param = match (
                msg.starts_with("missing field"),
                field_from_serde_message(&msg),
            ) {
                (true, Some(field)) if path == "." => field,
                (true, Some(field)) => format!("{path}.{field}"),
                _ if path == "." => "body".to_string(),
                _ => path,
            };
            err(&param, msg)
        })?;
        spec.normalize()
    }

    /// Fills dependent defaults and checks every field.
    pub fn normalize(mut self) -> Result<JobSpec, SpecError> {
        if self.base_model.trim().is_empty() {
            return Err(err("base_model", "must not be empty"));
        }
        if self.dataset.url.trim().is_empty() {
            return Err(err("dataset.url", "must not be empty"));
        }
        let texts = [
            ("base_model", Some(&self.base_model), MAX_NAME_LEN),
            ("revision", self.revision.as_ref(), MAX_NAME_LEN),
            ("dataset.url", Some(&self.dataset.url), MAX_URL_LEN),
            (
                "dataset.validation_url",
                self.dataset.validation_url.as_ref(),
                MAX_URL_LEN,
            ),
            ("suffix", self.suffix.as_ref(), MAX_SUFFIX_LEN),
            (
                "from_checkpoint",
                self.from_checkpoint.as_ref(),
                MAX_NAME_LEN,
            ),
        ];
        if let Some(rev) = &self.revision {
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
        if let Some(pairs) = &self.metadata {
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
        }
        if let Some(f) = self.dataset.validation_split {
            if !(f > 0.0 && f < 1.0) {
                return Err(err(
                    "dataset.validation_split",
                    format!("must be between 0 and 1 (exclusive), got {f}"),
                ));
            }
            if self.dataset.validation_url.is_some() {
                return Err(err(
                    "dataset.validation_split",
                    "give either validation_url or validation_split, not both",
                ));
            }
        }
        let lora = &mut self.lora;
        if !(1..=1024).contains(&lora.r) {
            return Err(err(
                "lora.r",
                format!("must be between 1 and 1024, got {}", lora.r),
            ));
        }
        let alpha = lora.alpha.unwrap_or(2.0 * lora.r as f64);
        if !(alpha.is_finite() && alpha > 0.0 && alpha <= MAX_ALPHA) {
            return Err(err(
                "lora.alpha",
                format!("must be > 0 and at most {MAX_ALPHA}, got {alpha}"),
            ));
        }
        lora.alpha = Some(alpha);
        if !(0.0..1.0).contains(&lora.dropout) {
            return Err(err(
                "lora.dropout",
                format!("must be in [0, 1), got {}", lora.dropout),
            ));
        }
        let names = match &lora.target_modules {
            TargetModules::Keyword(k) if k == "all-linear" => lora.target_modules.names(),
            TargetModules::Keyword(k) => {
                return Err(err(
                    "lora.target_modules",
                    format!("unknown keyword {k:?}: use \"all-linear\" or a list of module names"),
                ))
            }
            TargetModules::List(l) => l.clone(),
        };
        if names.is_empty() {
            return Err(err("lora.target_modules", "must name at least one module"));
        }
        let known: Vec<&str> = ALL_LINEAR.iter().chain(&FUSED_MODULES).copied().collect();
        let mut ordered = Vec::new();
        for module in &known {
            if names.iter().any(|n| n == module) {
                ordered.push(module.to_string());
            }
        }
        if let Some(bad) = names.iter().find(|n| !known.contains(&n.as_str())) {
            return Err(err(
                "lora.target_modules",
                format!("unknown module {bad:?} (known: {})", known.join(", ")),
            ));
        }
        lora.target_modules = TargetModules::List(ordered);

        if let Some(mut q) = self.quantization.take() {
            match (self.compute_dtype, q.compute_dtype) {
                (Some(a), Some(b)) if a != b => {
                    return Err(err(
                        "compute_dtype",
                        "differs from quantization.compute_dtype; give one of them",
                    ))
                }
                (Some(a), None) => q.compute_dtype = Some(a),
                _ => {}
            }
            let q = q.normalize(&self.base_model)?;
            self.compute_dtype = q.compute_dtype;
            self.quantization = Some(q);
        }
        self.compute_dtype = Some(self.compute_dtype.unwrap_or(ComputeDtype::F32));
        let t = &self.training;
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
        within("epochs", t.epochs, MAX_EPOCHS)?;
        within("batch_size", t.batch_size, MAX_BATCH_SIZE)?;
        within(
            "gradient_accumulation_steps",
            t.gradient_accumulation_steps,
            MAX_ACCUMULATION,
        )?;
        if let Some(m) = t.max_steps {
            within("max_steps", m, MAX_STEPS)?;
        }
        if let Some(e) = t.eval_every_steps {
            positive("eval_every_steps", e)?;
        }
        if t.max_seq_len < 2 || t.max_seq_len > 131_072 {
            return Err(err(
                "training.max_seq_len",
                format!("must be between 2 and 131072, got {}", t.max_seq_len),
            ));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return Err(err(
                "training.learning_rate",
                format!("must be > 0, got {}", t.learning_rate),
            ));
        }
        if !(0..=MAX_STEPS).contains(&t.warmup_steps) {
            return Err(err(
                "training.warmup_steps",
                format!("must be between 0 and {MAX_STEPS}"),
            ));
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(err(
                "training.warmup_ratio",
                format!("must be in [0, 1), got {}", t.warmup_ratio),
            ));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return Err(err("training.weight_decay", "must be >= 0"));
        }
        for (name, b) in [("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(err(
                    &format!("training.{name}"),
                    format!("must be in [0, 1), got {b}"),
                ));
            }
        }
        if t.adam_epsilon.is_nan() || t.adam_epsilon <= 0.0 {
            return Err(err("training.adam_epsilon", "must be > 0"));
        }
        if !(0.0..1.0).contains(&t.momentum) {
            return Err(err("training.momentum", "must be in [0, 1)"));
        }
        if !(t.max_grad_norm >= 0.0 && t.max_grad_norm.is_finite()) {
            return Err(err(
                "training.max_grad_norm",
                "must be >= 0 (0 disables clipping)",
            ));
        }
        if let Some(c) = self.checkpoint_every_steps {
            if c < 1 {
                return Err(err("checkpoint_every_steps", "must be >= 1"));
            }
        }
        Ok(self)
    }
}

/// Bounds that keep one spec from asking for absurd work or storage (a job's total work is
/// also bounded by the operator's `--max-job-steps` and `--max-job-hours`).
pub const MAX_STEPS: i64 = 1_000_000;
pub const MAX_EPOCHS: i64 = 10_000;
pub const MAX_BATCH_SIZE: i64 = 4096;
pub const MAX_ACCUMULATION: i64 = 1024;
pub const MAX_ALPHA: f64 = 1e6;
const MAX_NAME_LEN: usize = 512;
const MAX_URL_LEN: usize = 4096;
const MAX_SUFFIX_LEN: usize = 64;
const MAX_METADATA_PAIRS: usize = 16;

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

    #[test]
    fn defaults_are_filled_and_echoed() {
        let spec = JobSpec::from_json(r#"{"base_model":"m","dataset":{"url":"d.jsonl"}}"#).unwrap();
        assert_eq!(spec.lora.r, 8);
        assert_eq!(spec.lora.alpha, Some(16.0));
        assert_eq!(
            spec.lora.target_modules.names(),
            vec!["q_proj", "k_proj", "v_proj", "o_proj"]
        );
        assert_eq!(spec.training.batch_size, 4);
        let echoed = serde_json::to_value(&spec).unwrap();
        assert_eq!(echoed["lora"]["alpha"], 16.0);
        assert_eq!(echoed["training"]["lr_scheduler"], "linear");
    }

    #[test]
    fn all_linear_expands() {
        let spec = JobSpec::from_json(
            r#"{"base_model":"m","dataset":{"url":"d"},"lora":{"target_modules":"all-linear","r":4}}"#,
        )
        .unwrap();
        assert_eq!(spec.lora.target_modules.names().len(), 7);
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
            (
                Some(QuantType::Nf4),
                Some(4),
                Some(true),
                Some(ComputeDtype::F32)
            )
        );
        let q = parse(r#"{"type":"fp4"}"#).unwrap().quantization.unwrap();
        assert_eq!((q.bits, q.double_quant), (Some(4), Some(true)));
        let q = parse(r#"{"bits":8}"#).unwrap().quantization.unwrap();
        assert_eq!(
            (q.kind, q.double_quant),
            (Some(QuantType::Int8), Some(false))
        );
        assert!(parse(r#"{"type":"gguf"}"#).is_ok());
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
}
