//! Exports of a trained adapter for serving stacks. `merged`: a Hugging Face folder whose linear
//! weights have the adapter folded in, `W + scale · B · A` (PEFT's `merge_and_unload`), in the
//! base's dtype, with the base's config, tokenizer and shard layout, so transformers, vLLM and
//! candle load it as they load the base.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::{read_lora_spec, ADAPTER_WEIGHTS};
use super::error::Area;
use super::{Error, Result};

/// What a merge did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MergeReport {
    /// Linear weights that received an adapter.
    pub merged: usize,
    /// Tensors copied as they were.
    pub copied: usize,
    /// The files written into the output folder.
    pub files: Vec<String>,
}

/// Folds the PEFT adapter in `adapter_dir` into the safetensors model folder `base_dir`,
/// writing the merged model into `out_dir` (created; the base's other files are copied).
/// Every adapter tensor must find its weight, with matching shapes.
pub fn merged(base_dir: &Path, adapter_dir: &Path, out_dir: &Path) -> Result<MergeReport> {
    if !base_dir.join("config.json").is_file() {
        return Err(Error::Model(format!(
            "{}: a merged export needs the base as a Hugging Face folder (config.json and \
             safetensors); a .gguf base cannot be merged into one",
            base_dir.display()
        )));
    }
    let lora = read_lora_spec(adapter_dir)?;
    let scale = lora.scale();
    let adapter_path = adapter_dir.join(ADAPTER_WEIGHTS);
    let mut adapter = candle_core::safetensors::load(&adapter_path, &Device::Cpu)
        .map_err(|e| Error::caused(Area::Checkpoint, adapter_path.display().to_string(), e))?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let shards = super::model::safetensors_files(base_dir)?;
    let mut report = MergeReport {
        merged: 0,
        copied: 0,
        files: Vec::new(),
    };
    for shard in &shards {
        let tensors = candle_core::safetensors::load(shard, &Device::Cpu)
            .map_err(|e| Error::caused(Area::Model, shard.display().to_string(), e))?;
        let mut out: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
        for (name, w) in tensors {
            // PEFT's names: base_model.model.{module}.lora_A.weight for {module}.weight
            let module = name.strip_suffix(".weight").unwrap_or(&name);
            let a = adapter.remove(&format!("base_model.model.{module}.lora_A.weight"));
            let b = adapter.remove(&format!("base_model.model.{module}.lora_B.weight"));
            let w = match (a, b) {
                (Some(a), Some(b)) => {
                    let delta =
                        (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
                    if delta.dims() != w.dims() {
                        return Err(Error::Checkpoint(format!(
                            "{module}: the adapter's B·A is {:?}, the weight {:?} (another base?)",
                            delta.dims(),
                            w.dims()
                        )));
                    }
                    report.merged += 1;
                    (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?
                }
                (None, None) => {
                    report.copied += 1;
                    w
                }
                _ => {
                    return Err(Error::Checkpoint(format!(
                        "{module}: the adapter has only one of lora_A and lora_B"
                    )))
                }
            };
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
        report.files.push(file);
    }
    if let Some(left) = adapter.keys().next() {
        return Err(Error::Checkpoint(format!(
            "the adapter's {left} names no weight of the base (another base?)"
        )));
    }
    // config, tokenizer, generation config, shard index: as the base has them
    let entries = std::fs::read_dir(base_dir).map_err(|e| Error::io(base_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(base_dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let is_weights = name.ends_with(".safetensors");
        if entry.path().is_file() && !is_weights {
            std::fs::copy(entry.path(), out_dir.join(&name))
                .map_err(|e| Error::io(entry.path(), e))?;
            report.files.push(name);
        }
    }
    report.files.sort();
    Ok(report)
}

/// The metadata llama.cpp's `convert_lora_to_gguf.py` writes for an adapter at its default
/// `--outtype f32`: `general.architecture`, `general.type = "adapter"` (its `set_type`),
/// `adapter.type = "lora"`, `adapter.lora.alpha` (its `set_gguf_parameters`), and the
/// `general.file_type` (0, ALL_F32) and `general.quantization_version` (2) every converted
/// file carries.
pub const GGUF_LORA_KEYS: [&str; 6] = [
    "general.architecture",
    "general.type",
    "adapter.type",
    "adapter.lora.alpha",
    "general.file_type",
    "general.quantization_version",
];

/// Writes the PEFT adapter in `adapter_dir`, trained on a model shaped `cfg`, as a llama.cpp
/// LoRA adapter (`llama-server --lora`, Ollama's `ADAPTER`): tensors
/// `blk.{N}.{attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down}.weight.lora_{a|b}` in
/// float32, A as `(r, in)` and B as `(out, r)` (GGUF lists dimensions the other way round), and
/// for the llama architecture the rows of q's and k's B in llama.cpp's RoPE order — the
/// permutation its converter applies to the base weights (`LlamaModel.permute`: rows as
/// `(heads, 2, head_dim / 2)`, the two inner axes swapped), which on a LoRA pair reaches B only.
/// Returns the tensors written.
pub fn gguf_lora(
    adapter_dir: &Path,
    cfg: &super::model::ModelConfig,
    out_file: &Path,
) -> Result<usize> {
    use super::model::Arch;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let lora = read_lora_spec(adapter_dir)?;
    let alpha = lora.alpha.unwrap_or(2.0 * lora.r as f64);
    if lora.use_rslora {
        return Err(Error::Checkpoint(
            "llama.cpp scales a LoRA by alpha / r; an rsLoRA adapter (alpha / √r) has no GGUF form"
                .into(),
        ));
    }
    let path = adapter_dir.join(ADAPTER_WEIGHTS);
    let adapter = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::caused(Area::Checkpoint, path.display().to_string(), e))?;
    // llama.cpp's converter writes mistral and llama models as `llama`
    let (arch, permuted) = match cfg.arch {
        Arch::Llama | Arch::Mistral => ("llama", true),
        Arch::Qwen2 => ("qwen2", false),
    };
    let mut names: Vec<&String> = adapter.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let t = &adapter[name];
        let module_weight = name
            .strip_prefix("base_model.model.")
            .and_then(|n| {
                n.strip_suffix(".lora_A.weight")
                    .map(|m| (m, "lora_a"))
                    .or_else(|| n.strip_suffix(".lora_B.weight").map(|m| (m, "lora_b")))
            })
            .ok_or_else(|| Error::Checkpoint(format!("{name}: not a PEFT LoRA tensor name")))?;
        let (module, part) = module_weight;
        let gguf =
            super::model::gguf_tensor_name(&format!("{module}.weight")).ok_or_else(|| {
                Error::Checkpoint(format!("{name}: no llama.cpp tensor for {module}"))
            })?;
        let mut t = t.to_dtype(DType::F32)?;
        let heads = if module.ends_with("q_proj") {
            Some(cfg.num_attention_heads)
        } else if module.ends_with("k_proj") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        if let (true, "lora_b", Some(heads)) = (permuted, part, heads) {
            let (out, r) = t.dims2()?;
            t = t
                .reshape((heads, 2, out / heads / 2, r))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((out, r))?;
        }
        let q = QTensor::quantize(&t, GgmlDType::F32)?;
        tensors.push((format!("{gguf}.{part}"), q));
    }
    let metadata: Vec<(&str, gguf_file::Value)> = vec![
        (
            "general.architecture",
            gguf_file::Value::String(arch.into()),
        ),
        ("general.type", gguf_file::Value::String("adapter".into())),
        ("adapter.type", gguf_file::Value::String("lora".into())),
        ("adapter.lora.alpha", gguf_file::Value::F32(alpha as f32)),
        ("general.file_type", gguf_file::Value::U32(0)),
        ("general.quantization_version", gguf_file::Value::U32(2)),
    ];
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(out_file).map_err(|e| Error::io(out_file, e))?;
    gguf_file::write(&mut file, &metadata, &tensor_refs)
        .map_err(|e| Error::caused(Area::Checkpoint, out_file.display().to_string(), e))?;
    Ok(tensors.len())
}
