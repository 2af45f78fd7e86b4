//! Checkpoints in Hugging Face PEFT's adapter format, plus what a resume needs.
//!
//! A checkpoint folder holds:
//! - `adapter_config.json` and `adapter_model.safetensors` (tensor names like
//!   `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`): `PeftModel.from_pretrained`
//!   loads them unchanged;
//! - `optimizer.safetensors` and `trainer_state.json`: optimizer moments and the step counter.
//!   The data order and dropout masks are pure functions of (seed, step), so nothing else is needed
//!   to continue the identical loss curve.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::model::Llama;
use super::optim::Optimizer;
use crate::spec::JobSpec;
use crate::train::error::{Area, Error, Result};

pub(crate) const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// A checkpoint's folder under a run's output folder is this and its step.
const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// The final adapter's folder under a run's output folder.
pub const ADAPTER_DIR: &str = "adapter";
pub(crate) const ADAPTER_CONFIG: &str = "adapter_config.json";
const OPTIMIZER_STATE: &str = "optimizer.safetensors";
const TRAINER_STATE: &str = "trainer_state.json";

/// PEFT's name for a LoRA tensor.
pub fn peft_name(var_name: &str) -> String {
    format!("base_model.model.{var_name}.weight")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub seed: u64,
    /// The spec the run was started with (a resume refuses a different one).
    pub spec: JobSpec,
    /// Input tokens trained through `step` (0 in checkpoints written before it was kept).
    #[serde(default)]
    pub tokens_seen: u64,
    /// Early stopping's record through `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestSoFar>,
}

/// Early stopping's record: the best evaluation so far, its step, and how many evaluations
/// since have not improved on it. Kept in each checkpoint's resume state.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct BestSoFar {
    pub step: u64,
    pub value: f64,
    pub evals_without_improvement: u32,
}

/// The `adapter_config.json` PEFT expects; `target_modules` are the modules the model adapted,
/// by the names of its family's checkpoints (Phi-3's `qkv_proj` where the spec said q_proj).
pub fn adapter_config(
    spec: &JobSpec,
    base_model_name: &str,
    target_modules: &[&str],
) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": spec.revision,
        "r": spec.lora.r,
        "lora_alpha": spec.lora.alpha,
        "lora_dropout": spec.lora.dropout,
        "target_modules": target_modules,
        "use_rslora": spec.lora.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("serializable");
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes the PEFT adapter files of `model` into `dir`.
pub fn save_adapter(
    dir: &Path,
    model: &Llama,
    spec: &JobSpec,
    base_model_name: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e).or_disk_full(dir))?;
    let tensors: HashMap<String, Tensor> = model
        .lora_vars()
        .into_iter()
        .map(|(name, var)| (peft_name(&name), var.as_detached_tensor()))
        .collect();
    let weights = dir.join(ADAPTER_WEIGHTS);
    candle_core::safetensors::save(&tensors, &weights)
        .map_err(|e| Error::from(e).or_disk_full(&weights))?;
    let config = dir.join(ADAPTER_CONFIG);
    write_json(
        &config,
        &adapter_config(spec, base_model_name, &model.adapted_modules()),
    )
    .map_err(|e| e.or_disk_full(&config))
}

/// Writes a full checkpoint (adapter + resume state) atomically: into a temporary folder that is
/// renamed into place, so a crash never leaves a half-written checkpoint behind.
pub(crate) fn save_checkpoint(
    dir: &Path,
    model: &Llama,
    optimizer: &Optimizer,
    state: &TrainerState,
    base_model_name: &str,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    // a leftover of an interrupted save, usually absent
    std::fs::remove_dir_all(&tmp).ok();
    let written = (|| {
        save_adapter(&tmp, model, &state.spec, base_model_name)?;
        let names: Vec<String> = model.lora_vars().into_iter().map(|(n, _)| n).collect();
        let opt = optimizer.state_tensors(&names);
        if !opt.is_empty() {
            candle_core::safetensors::save(&opt, tmp.join(OPTIMIZER_STATE))?;
        }
        write_json(&tmp.join(TRAINER_STATE), state)
    })();
    if let Err(e) = written {
        // nothing half-written stays behind (on a full disk, it is the room others need)
        std::fs::remove_dir_all(&tmp).ok();
        return Err(e.or_disk_full(&tmp));
    }
    // the same step written again (a resumed attempt): replaced whole; usually absent
    std::fs::remove_dir_all(dir).ok();
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

/// The LoRA shape an adapter folder was trained with (r, alpha, targets), from its
/// `adapter_config.json`: what a base model must be loaded with before [`load_adapter`].
pub fn read_lora_spec(dir: &Path) -> Result<crate::spec::LoraSpec> {
    lora_spec_of(&read_adapter_config(dir)?)
}

/// `adapter_config.json` of `dir`, as JSON.
fn read_adapter_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    // the file's name, not its path on this server: the message may reach a client
    serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{ADAPTER_CONFIG} is not JSON: {e}")))
}

/// The LoRA settings PEFT's config names, checked as a job's are ([`crate::spec::RawLora`]:
/// rank, alpha, known modules, `"all-linear"`).
fn lora_spec_of(cfg: &serde_json::Value) -> Result<crate::spec::LoraSpec> {
    let bad = |e: String| Error::Checkpoint(format!("{ADAPTER_CONFIG}: {e}"));
    let target_modules = serde_json::from_value(cfg["target_modules"].clone())
        .map_err(|e| bad(format!("target_modules: {e}")))?;
    let r = cfg["r"]
        .as_i64()
        .ok_or_else(|| bad("no integer \"r\"".into()))?;
    crate::spec::RawLora {
        r: Some(r),
        alpha: cfg["lora_alpha"].as_f64(),
        // dropout is training's; an adapter read back is run without it
        dropout: Some(0.0),
        target_modules: Some(target_modules),
        use_rslora: cfg["use_rslora"].as_bool(),
    }
    .resolve()
    .map_err(|e| bad(e.to_string()))
}

/// The LoRA settings of an adapter made elsewhere (by PEFT itself): what [`read_lora_spec`]
/// reads, after refusing, by name, every PEFT setting that would make it compute something
/// else than plain LoRA over the listed modules (DoRA, biases, modules saved whole, per-layer
/// ranks, a subset of layers, ...).
pub fn read_outside_lora_spec(dir: &Path) -> Result<crate::spec::LoraSpec> {
    let cfg = read_adapter_config(dir)?;
    let refuse = |why: String| Err(Error::Checkpoint(format!("{ADAPTER_CONFIG}: {why}")));
    match cfg["peft_type"].as_str() {
        Some("LORA") => {}
        other => {
            return refuse(format!(
                "peft_type {other:?}: only LORA adapters are served"
            ))
        }
    }
    let empty = |v: &serde_json::Value| {
        v.is_null()
            || v.as_object().is_some_and(|o| o.is_empty())
            || v.as_array().is_some_and(|a| a.is_empty())
    };
    for (field, off) in [
        ("use_dora", cfg["use_dora"].as_bool() != Some(true)),
        (
            "fan_in_fan_out",
            cfg["fan_in_fan_out"].as_bool() != Some(true),
        ),
        ("lora_bias", cfg["lora_bias"].as_bool() != Some(true)),
        ("bias", matches!(cfg["bias"].as_str(), None | Some("none"))),
        ("modules_to_save", empty(&cfg["modules_to_save"])),
        ("rank_pattern", empty(&cfg["rank_pattern"])),
        ("alpha_pattern", empty(&cfg["alpha_pattern"])),
        ("layers_to_transform", empty(&cfg["layers_to_transform"])),
        ("layer_replication", empty(&cfg["layer_replication"])),
        (
            "trainable_token_indices",
            empty(&cfg["trainable_token_indices"]),
        ),
        ("exclude_modules", empty(&cfg["exclude_modules"])),
        ("target_parameters", empty(&cfg["target_parameters"])),
    ] {
        if !off {
            return refuse(format!(
                "{field} is set: qtune serves plain LoRA adapters only"
            ));
        }
    }
    // rank (1 to 1024, checked before any factor is allocated from it), alpha, modules
    lora_spec_of(&cfg)
}

/// Loads PEFT adapter weights into the model's LoRA vars. Every var must be present with its
/// shape, and the file must hold nothing else (a tensor for a module the model has no LoRA on
/// would otherwise be silently dropped).
pub fn load_adapter(dir: &Path, model: &Llama) -> Result<()> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::caused(Area::Checkpoint, path.display().to_string(), e))?;
    for (name, var) in model.lora_vars() {
        let key = peft_name(&name);
        let t = tensors
            .remove(&key)
            .ok_or_else(|| Error::Checkpoint(format!("{ADAPTER_WEIGHTS} has no tensor {key}")))?;
        set_var(&var, &t, &key)?;
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(Error::Checkpoint(format!(
            "{ADAPTER_WEIGHTS} has {} tensor(s) the model has no place for, such as {extra}",
            tensors.len()
        )));
    }
    Ok(())
}

fn set_var(var: &Var, t: &Tensor, name: &str) -> Result<()> {
    if t.dims() != var.dims() {
        return Err(Error::Checkpoint(format!(
            "{name} has shape {:?}, the model expects {:?} (different r or base model?)",
            t.dims(),
            var.dims()
        )));
    }
    var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    Ok(())
}

/// Restores model and optimizer from a checkpoint folder; returns its trainer state.
pub(crate) fn load_checkpoint(
    dir: &Path,
    model: &Llama,
    optimizer: &mut Optimizer,
) -> Result<TrainerState> {
    let state_path = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::caused(Area::Checkpoint, state_path.display().to_string(), e))?;
    load_adapter(dir, model)?;
    let opt_path = dir.join(OPTIMIZER_STATE);
    let mut tensors = if opt_path.exists() {
        candle_core::safetensors::load(&opt_path, &model.device)?
    } else {
        HashMap::new()
    };
    let names: Vec<String> = model.lora_vars().into_iter().map(|(n, _)| n).collect();
    optimizer.load_state(&names, &mut tensors, state.step)?;
    Ok(state)
}

/// Checkpoint folders `checkpoint-{step}` under `output_dir`, by step.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            e.path()
                .join(TRAINER_STATE)
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

pub(crate) fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(checkpoint_dir_name(step))
}

/// `checkpoint-{step}`: the folder name of a checkpoint under a run's output folder.
pub(crate) fn checkpoint_dir_name(step: u64) -> String {
    format!("{CHECKPOINT_PREFIX}{step}")
}
