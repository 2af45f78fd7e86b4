//! Loading a base model as a job names it: a local Hugging Face folder, a `.gguf` file or a Hub
//! repo id, in the job's compute dtype, with fresh LoRA factors; and its shape alone, for the
//! memory estimate.

use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device};

use super::source::gguf::{gguf_model_config, open_gguf};
use super::source::{hub, is_gguf_path, safetensors_files, GgufSource, SafetensorsSource};
use super::{FrozenWeight, Llama, ModelConfig, Proj};
use crate::spec::{ComputeDtype, LoraSpec, QuantizationSpec};
use crate::train::error::{Error, Result};
use crate::train::tokenizer::TextTokenizer;

/// A loaded base model with fresh LoRA factors, and its tokenizer.
pub struct BaseModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    /// What `adapter_config.json` records as `base_model_name_or_path`.
    pub name: String,
}

/// Loads `base_model` (a `.gguf` file, a local Hugging Face folder, or a Hub repo id) on `device`,
/// with the LoRA adapters that `lora` asks for, in float32 (or the quantization's compute dtype).
pub fn load_base(
    base_model: &str,
    revision: Option<&str>,
    lora: &LoraSpec,
    quantization: Option<&QuantizationSpec>,
    seed: u64,
    device: &Device,
) -> Result<BaseModel> {
    let dtype = quantization.map_or(ComputeDtype::F32, |q| q.compute_dtype);
    load_base_in(
        base_model,
        revision,
        lora,
        quantization,
        dtype,
        seed,
        device,
    )
}

/// [`load_base`] with the job's `compute_dtype` for the frozen base.
pub(crate) fn load_base_in(
    base_model: &str,
    revision: Option<&str>,
    lora: &LoraSpec,
    quantization: Option<&QuantizationSpec>,
    compute_dtype: ComputeDtype,
    seed: u64,
    device: &Device,
) -> Result<BaseModel> {
    let dtype = match compute_dtype {
        ComputeDtype::F32 => DType::F32,
        // On the CPU: dense linear weights in bf16, multiplied by oneDNN's bf16 kernels (see
        // Llama::load); a quantized base is dequantized to f32 there.
        ComputeDtype::Bf16 if device.is_cpu() && quantization.is_some() => {
            return Err(Error::Model(
                "quantization.compute_dtype bf16 needs a CUDA device (on the CPU a quantized base \
                 is dequantized to f32; a dense base can use compute_dtype bf16)"
                    .into(),
            ))
        }
        ComputeDtype::Bf16 => DType::BF16,
        ComputeDtype::F16 if device.is_cpu() => {
            return Err(Error::Model(
                "compute_dtype f16 needs a CUDA device; on CPU use f32 or bf16".into(),
            ))
        }
        ComputeDtype::F16 => DType::F16,
    };
    let path = Path::new(base_model);
    if base_model.ends_with(".gguf") {
        if !path.is_file() {
            return Err(Error::Model(format!(
                "GGUF file {base_model:?} does not exist"
            )));
        }
        return load_gguf(path, lora, quantization, seed, dtype, device);
    }
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if looks_like_repo_id(base_model) {
        hub::fetch(base_model, revision)?
    } else {
        return Err(Error::Model(format!(
            "base_model {base_model:?} is neither a .gguf file, a local model folder, nor a Hub repo id (owner/name)"
        )));
    };
    load_hf_dir(&dir, base_model, lora, quantization, seed, dtype, device)
}

fn looks_like_repo_id(s: &str) -> bool {
    crate::model_access::is_repo_id(s)
}

/// Loads a local Hugging Face model folder.
pub(crate) fn load_hf_dir(
    dir: &Path,
    name: &str,
    lora: &LoraSpec,
    quantization: Option<&QuantizationSpec>,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<BaseModel> {
    let cfg_path = dir.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = ModelConfig::from_hf_json(&cfg_text)?;
    let files = safetensors_files(dir)?;
    let mut source = SafetensorsSource::open(&files)?;
    let model = Llama::load(cfg, &mut source, lora, quantization, seed, dtype, device)?;
    let tokenizer = TextTokenizer::from_hf_dir(dir)?;
    Ok(BaseModel {
        model,
        tokenizer,
        name: name.to_string(),
    })
}

/// Loads `base_model` for generation, with the LoRA factors `lora` asks for (to be filled by
/// an adapter). A `.gguf` base keeps its linear weights quantized, so that decoding reads the
/// stored blocks as llama.cpp does, repacked for the decode kernel where it reads the type
/// ([`QuantizedWeight::for_decoding`]); the vocabulary head, kept in float32 for training,
/// is quantized to Q8_0 for decoding. Other bases load in float32.
pub fn load_for_decoding(base_model: &str, lora: &LoraSpec) -> Result<BaseModel> {
    use crate::train::quant::QuantizedWeight;
    use candle_core::quantized::GgmlDType;
    use std::sync::Arc;
    let device = Device::Cpu;
    if !base_model.ends_with(".gguf") {
        return load_base(base_model, None, lora, None, 0, &device);
    }
    let keep = QuantizationSpec {
        bits: None,
        kind: crate::spec::QuantType::Gguf,
        double_quant: false,
        compute_dtype: ComputeDtype::F32,
    };
    let mut loaded = load_base(base_model, None, lora, Some(&keep), 0, &device)?;
    for block in &mut loaded.model.blocks {
        for proj in Proj::ALL {
            let linear = block.linear_mut(proj);
            let FrozenWeight::Quantized(q) = &linear.weight else {
                continue;
            };
            let QuantizedWeight::Ggml(t) = q.as_ref() else {
                continue;
            };
            linear.weight = FrozenWeight::Quantized(Arc::new(QuantizedWeight::for_decoding(t)?));
        }
    }
    let head = loaded.model.lm_head_weight();
    if head.dim(1)?.is_multiple_of(GgmlDType::Q8_0.block_size()) {
        let q8 = QTensor::quantize(&head.to_dtype(DType::F32)?, GgmlDType::Q8_0)?;
        loaded.model.decode_head = Some(Arc::new(QuantizedWeight::for_decoding(&Arc::new(q8))?));
    }
    Ok(loaded)
}

/// Loads a llama.cpp GGUF file, dequantized to float32, in Hugging Face tensor order.
pub(crate) fn load_gguf(
    path: &Path,
    lora: &LoraSpec,
    quantization: Option<&QuantizationSpec>,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<BaseModel> {
    let (file, content) = open_gguf(path)?;
    let md = &content.metadata;
    let cfg = gguf_model_config(&content)?;
    let (arch, heads, kv_heads) = (cfg.arch, cfg.num_attention_heads, cfg.num_key_value_heads);
    cfg.check()?;
    // A GGUF file has no q/k row order of Hugging Face's: llama.cpp permutes llama-arch q/k rows
    // for its interleaved RoPE. The source undoes it (on dense tensors, or by moving whole rows
    // of quantized bytes) so the weights, and adapters trained on them, are in HF order.
    let permuted = arch.llama_cpp_permutes_qk();
    let mut weights = GgufSource {
        content: &content,
        file,
        arch,
        heads: if permuted { heads } else { 0 },
        kv_heads: if permuted { kv_heads } else { 0 },
    };
    let model = Llama::load(cfg, &mut weights, lora, quantization, seed, dtype, device)?;
    let tokenizer = TextTokenizer::from_gguf(md)?;
    let name = md
        .get("general.name")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(BaseModel {
        model,
        tokenizer,
        name,
    })
}

/// The shape of `base_model` (a `.gguf` file or a local folder with `config.json`) without
/// loading its weights.
pub fn base_config(base_model: &Path) -> Result<ModelConfig> {
    if is_gguf_path(base_model) {
        return gguf_model_config(&open_gguf(base_model)?.1);
    }
    let path = base_model.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    ModelConfig::from_hf_json(&text)
}

/// What the stored base is, when it matters for its size: the linear weights' bytes in a GGUF
/// file that a `{"type": "gguf"}` job keeps in their own types.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StoredBase {
    pub(crate) gguf_linear_bytes: Option<u64>,
}

/// The shape of `base_model` as a job names it (a `.gguf` file, a local folder, or a Hub repo
/// id, of which only `config.json` is fetched), and for a GGUF file the bytes its decoder
/// layers' linear weights take: what [`crate::train::cost`] estimates from.
pub(crate) fn base_shape(
    base_model: &str,
    revision: Option<&str>,
) -> Result<(ModelConfig, StoredBase)> {
    let path = Path::new(base_model);
    if is_gguf_path(path) {
        let (_, content) = open_gguf(path)?;
        let cfg = gguf_model_config(&content)?;
        let linear_bytes = content
            .tensor_infos
            .iter()
            .filter(|(name, info)| name.starts_with("blk.") && info.shape.dims().len() == 2)
            .map(|(_, info)| {
                let dtype = info.ggml_dtype;
                (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64
            })
            .sum();
        let stored = StoredBase {
            gguf_linear_bytes: Some(linear_bytes),
        };
        return Ok((cfg, stored));
    }
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if looks_like_repo_id(base_model) {
        hub::fetch_config(base_model, revision)?
    } else {
        return Err(Error::Model(format!(
            "base_model {base_model:?} is neither a .gguf file, a local model folder, nor a Hub repo id (owner/name)"
        )));
    };
    Ok((base_config(&dir)?, Default::default()))
}
