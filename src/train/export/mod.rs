//! Exports of a trained adapter for serving stacks.
//! - `merged`: a Hugging Face folder whose linear weights have the adapter folded in,
//!   `W + scale · B · A` (PEFT's `merge_and_unload`), so transformers, vLLM and candle load it as
//!   they load the base. From a folder base: the base's dtype, config, tokenizer and shard layout.
//!   From a `.gguf` base: float32 weights (a quantized base has no float dtype of its own), with
//!   config.json and tokenizer files written from the GGUF's metadata.
//! - `gguf` ([`gguf_model`]): the merged model as a llama.cpp GGUF file (F32, F16, Q8_0, Q4_K).
//! - `gguf-lora` ([`gguf_lora`]): the adapter alone in llama.cpp's LoRA format.

mod gguf;
mod llama_pre;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

pub(crate) use gguf::gguf_lora;
pub use gguf::{gguf_model, llama_cpp_pre_name, GgufType, GGUF_LORA_KEYS};

use super::checkpoint::{read_lora_spec, ADAPTER_WEIGHTS};
use super::error::Area;
use super::model::GgufBase;
use super::{Error, Result};

/// What an export did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MergeReport {
    /// Linear weights that received an adapter.
    pub merged: usize,
    /// Tensors copied as they were.
    pub copied: usize,
    /// The files written (for a folder) or the GGUF tensor types used, with counts.
    pub files: Vec<String>,
}

/// A PEFT adapter's factors, folded one by one into the weights they adapt.
pub(crate) struct Fold {
    /// PEFT's names: `base_model.model.{module}.lora_A.weight` for `{module}.weight`.
    factors: HashMap<String, Tensor>,
    scale: f64,
    merged: usize,
    copied: usize,
}

impl Fold {
    pub fn read(adapter_dir: &Path) -> Result<Fold> {
        let lora = read_lora_spec(adapter_dir)?;
        let path = adapter_dir.join(ADAPTER_WEIGHTS);
        let factors = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| Error::caused(Area::Checkpoint, path.display().to_string(), e))?;
        Ok(Fold {
            factors,
            scale: lora.scale(),
            merged: 0,
            copied: 0,
        })
    }

    /// `w`, the base tensor `name` (Hugging Face name and row order), with its adapter folded
    /// in if it has one: computed in float32, returned in `w`'s dtype.
    pub(crate) fn apply(&mut self, name: &str, w: Tensor) -> Result<Tensor> {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let a = self
            .factors
            .remove(&format!("base_model.model.{module}.lora_A.weight"));
        let b = self
            .factors
            .remove(&format!("base_model.model.{module}.lora_B.weight"));
        match (a, b) {
            (Some(a), Some(b)) => {
                let delta =
                    (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * self.scale)?;
                if delta.dims() != w.dims() {
                    return Err(Error::Checkpoint(format!(
                        "{module}: the adapter's B·A is {:?}, the weight {:?} (another base?)",
                        delta.dims(),
                        w.dims()
                    )));
                }
                self.merged += 1;
                Ok((w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?)
            }
            (None, None) => {
                self.copied += 1;
                Ok(w)
            }
            _ => Err(Error::Checkpoint(format!(
                "{module}: the adapter has only one of lora_A and lora_B"
            ))),
        }
    }

    /// Every factor must have found its weight.
    pub fn finish(self, files: Vec<String>) -> Result<MergeReport> {
        if let Some(left) = self.factors.keys().next() {
            return Err(Error::Checkpoint(format!(
                "the adapter's {left} names no weight of the base (another base?)"
            )));
        }
        Ok(MergeReport {
            merged: self.merged,
            copied: self.copied,
            files,
        })
    }
}

/// Folds the PEFT adapter in `adapter_dir` into the base `base` (a Hugging Face folder or a
/// `.gguf` file), writing the merged model as a Hugging Face folder `out_dir` (created).
/// Every adapter tensor must find its weight, with matching shapes.
pub fn merged(base: &Path, adapter_dir: &Path, out_dir: &Path) -> Result<MergeReport> {
    let mut fold = Fold::read(adapter_dir)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    if super::model::is_gguf_path(base) {
        return merged_from_gguf(base, fold, out_dir);
    }
    if !base.join("config.json").is_file() {
        return Err(Error::Model(format!(
            "{}: the base is neither a Hugging Face folder (config.json and safetensors) nor a \
             .gguf file",
            base.display()
        )));
    }
    let mut files = Vec::new();
    for shard in &super::model::safetensors_files(base)? {
        let tensors = candle_core::safetensors::load(shard, &Device::Cpu)
            .map_err(|e| Error::caused(Area::Model, shard.display().to_string(), e))?;
        let mut out: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
        for (name, w) in tensors {
            let w = fold.apply(&name, w)?;
            out.insert(name, w);
        }
        let file = shard
            .file_name()
            .expect("a shard path names a file")
            .to_string_lossy()
            .to_string();
        let target = out_dir.join(&file);
        candle_core::safetensors::save(&out, &target)
            .map_err(|e| Error::caused(Area::Checkpoint, target.display().to_string(), e))?;
        files.push(file);
    }
    // config, tokenizer, generation config, shard index: as the base has them
    let entries = std::fs::read_dir(base).map_err(|e| Error::io(base, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(base, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if entry.path().is_file() && !name.ends_with(".safetensors") {
            std::fs::copy(entry.path(), out_dir.join(&name))
                .map_err(|e| Error::io(entry.path(), e))?;
            files.push(name);
        }
    }
    files.sort();
    fold.finish(files)
}

/// [`merged`] from a `.gguf` base: the weights dequantized to float32 and merged, in one
/// `model.safetensors`; config.json, tokenizer.json, tokenizer_config.json and
/// generation_config.json from the GGUF's metadata.
fn merged_from_gguf(base: &Path, mut fold: Fold, out_dir: &Path) -> Result<MergeReport> {
    let mut gguf = GgufBase::open(base)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in gguf.tensor_names.clone() {
        let (hf, w) = gguf.dense(&name)?;
        let w = fold.apply(&hf, w)?;
        tensors.insert(hf, w);
    }
    let write = |file: &str, bytes: Vec<u8>| -> Result<String> {
        let path = out_dir.join(file);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        Ok(file.to_string())
    };
    let weights = out_dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)
        .map_err(|e| Error::caused(Area::Checkpoint, weights.display().to_string(), e))?;
    drop(tensors);
    let tok = &gguf.tokenizer;
    let id = |key: &str| gguf.metadata.get(key).and_then(|v| v.to_u32().ok());
    let (bos_id, eos_id) = (
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
    );
    let mut config = gguf.cfg.to_hf_json();
    config["bos_token_id"] = json!(bos_id);
    config["eos_token_id"] = json!(eos_id);
    let tokenizer_json = tok
        .inner
        .to_string(false)
        .map_err(|e| Error::caused(Area::Tokenizer, "tokenizer.json", e))?;
    let add_bos = gguf
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "add_bos_token": add_bos,
        "chat_template": tok.chat_template,
        "model_max_length": gguf.cfg.max_position_embeddings,
    });
    let generation_config = json!({"bos_token_id": bos_id, "eos_token_id": eos_id});
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON values print");
    let mut files = vec![
        "model.safetensors".to_string(),
        write("config.json", pretty(&config))?,
        write("tokenizer.json", tokenizer_json.into_bytes())?,
        write("tokenizer_config.json", pretty(&tokenizer_config))?,
        write("generation_config.json", pretty(&generation_config))?,
    ];
    files.sort();
    fold.finish(files)
}
