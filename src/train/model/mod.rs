//! Base models: where they come from (local folder, Hub, GGUF) and the decoder itself.

pub mod config;
mod layer;
pub mod llama;
pub mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

pub use config::{Arch, ModelConfig, Proj};
pub use llama::{Llama, WeightSource};
pub use weights::{dropout_seed, mix_seed, Block, ForwardMode, FrozenWeight, Linear, LoraAdapter};

use super::tokenizer::TextTokenizer;
use candle_core::quantized::QTensor;

use crate::spec::{ComputeDtype, LoraSpec, QuantizationSpec};
use crate::train::error::{Area, Error, Result};

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
    load_base_in(base_model, revision, lora, quantization, dtype, seed, device)
}

/// [`load_base`] with the job's `compute_dtype` for the frozen base.
pub fn load_base_in(
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

/// The safetensors files of a folder: one `model.safetensors`, or the shards its index lists.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| {
        Error::Model(format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        ))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::caused(Area::Model, index.display().to_string(), e))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Model(format!("{}: no weight_map", index.display())))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// The tensors of a checkpoint's safetensors files, each read from disk when it is taken (a
/// positioned read of its bytes, nothing mapped): only the tensor being converted or quantized
/// is in memory besides the model built so far, so a base quantized on load never holds the
/// float32 file (a mapped file's pages count as the process's memory until it is unmapped).
struct SafetensorsSource {
    files: Vec<(PathBuf, std::fs::File)>,
    /// name → (file index, byte offset of the tensor's data in the file, its header entry)
    tensors: HashMap<String, (usize, u64, safetensors::tensor::TensorInfo)>,
}

impl SafetensorsSource {
    fn open(paths: &[PathBuf]) -> Result<SafetensorsSource> {
        use std::os::unix::fs::FileExt;
        let mut source = SafetensorsSource {
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for (index, path) in paths.iter().enumerate() {
            let bad = |what: String| Error::Model(format!("{}: {what}", path.display()));
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            let mut len = [0u8; 8];
            file.read_exact_at(&mut len, 0)
                .map_err(|_| bad("not a safetensors file (no header length)".into()))?;
            let header_len = u64::from_le_bytes(len);
            // the format caps the header at 100 MB
            if header_len > 100_000_000 || 8 + header_len > file_len {
                return Err(bad(format!("header length {header_len} is not plausible")));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| Error::io(path, e))?;
            let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
                .map_err(|e| bad(format!("safetensors header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                // checked: a hostile header may name shapes whose product overflows
                let bits = info
                    .shape
                    .iter()
                    .try_fold(info.dtype.bitsize(), |n, &d| n.checked_mul(d));
                if end < start
                    || data_start.saturating_add(end as u64) > file_len
                    || bits != (end - start).checked_mul(8)
                {
                    return Err(bad(format!(
                        "tensor {name}: offsets {start}..{end} do not hold its shape {:?} in \
                         the file's {file_len} bytes",
                        info.shape
                    )));
                }
                source
                    .tensors
                    .insert(name, (index, data_start + start as u64, info.clone()));
            }
            source.files.push((path.clone(), file));
        }
        Ok(source)
    }
}

impl WeightSource for SafetensorsSource {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        use safetensors::Dtype as St;
        use std::os::unix::fs::FileExt;
        let Some((index, offset, info)) = self.tensors.remove(name) else {
            return Ok(None);
        };
        let dtype = match info.dtype {
            St::F32 => DType::F32,
            St::F16 => DType::F16,
            St::BF16 => DType::BF16,
            St::F64 => DType::F64,
            other => {
                return Err(Error::Model(format!(
                    "tensor {name}: dtype {other:?} is not a float type"
                )))
            }
        };
        let (path, file) = &self.files[index];
        let mut bytes = vec![0u8; info.data_offsets.1 - info.data_offsets.0];
        file.read_exact_at(&mut bytes, offset)
            .map_err(|e| Error::io(path, e))?;
        Ok(Some(Tensor::from_raw_buffer(
            &bytes,
            dtype,
            &info.shape,
            &Device::Cpu,
        )?))
    }
}

impl WeightSource for HashMap<String, Tensor> {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.remove(name))
    }
}

/// Loads a local Hugging Face model folder.
pub fn load_hf_dir(
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
/// stored blocks as llama.cpp does; types whose CPU dot products candle leaves unvectorised
/// (Q4_1, Q5_0, Q5_1) are requantized to Q8_0, which is vectorised and closer to the float
/// weights. Other bases load in float32.
pub fn load_for_decoding(base_model: &str, lora: &LoraSpec) -> Result<BaseModel> {
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
    use crate::train::quant::QuantizedWeight;
    use candle_core::quantized::GgmlDType;
    for block in &mut loaded.model.blocks {
        for proj in Proj::ALL {
            let linear = block.linear_mut(proj);
            let FrozenWeight::Quantized(q) = &linear.weight else {
                continue;
            };
            let QuantizedWeight::Ggml(t) = q.as_ref() else {
                continue;
            };
            if matches!(
                t.dtype(),
                GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
            ) {
                let dense = t.dequantize(&device)?;
                let requantized = QTensor::quantize(&dense, GgmlDType::Q8_0)?;
                linear.weight = FrozenWeight::Quantized(std::sync::Arc::new(
                    QuantizedWeight::Ggml(std::sync::Arc::new(requantized)),
                ));
            }
        }
    }
    let head = loaded.model.lm_head_weight();
    if head.dim(1)?.is_multiple_of(GgmlDType::Q8_0.block_size()) {
        loaded.model.decode_head = Some(std::sync::Arc::new(QTensor::quantize(
            &head.to_dtype(DType::F32)?,
            GgmlDType::Q8_0,
        )?));
    }
    Ok(loaded)
}

/// Loads a llama.cpp GGUF file, dequantized to float32, in Hugging Face tensor order.
pub fn load_gguf(
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

/// Reads tensors of a GGUF file on demand, by Hugging Face name.
struct GgufSource<'a> {
    content: &'a gguf_file::Content,
    file: std::fs::File,
    arch: Arch,
    /// Head counts for un-permuting q/k rows (0: the file is not permuted).
    heads: usize,
    kv_heads: usize,
}

impl GgufSource<'_> {
    fn read(&mut self, hf_name: &str) -> Result<Option<QTensor>> {
        let Some(gguf) = gguf_tensor_name(self.arch, hf_name) else {
            return Ok(None);
        };
        if !self.content.tensor_infos.contains_key(&gguf) {
            return Ok(None);
        }
        Ok(Some(self.content.tensor(
            &mut self.file,
            &gguf,
            &Device::Cpu,
        )?))
    }

    /// Heads whose rows are permuted in this tensor, if any.
    fn permuted_heads(&self, hf_name: &str) -> Option<usize> {
        let heads = if hf_name.ends_with("q_proj.weight") {
            self.heads
        } else if hf_name.ends_with("k_proj.weight") {
            self.kv_heads
        } else {
            0
        };
        (heads > 0).then_some(heads)
    }
}

impl WeightSource for GgufSource<'_> {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some(q) = self.read(name)? else {
            return Ok(None);
        };
        let t = q.dequantize(&Device::Cpu)?;
        Ok(Some(match self.permuted_heads(name) {
            Some(h) => unpermute_rows(&t, h)?,
            // llama.cpp's converter stores Gemma's norms as 1 + w (its RMSNorm multiplies by the
            // weight as it is); back to the checkpoint's w, as transformers reads them
            None if self.arch.norm_adds_one() && name.ends_with("norm.weight") => (t - 1.0)?,
            None => t,
        }))
    }

    fn take_quantized(&mut self, name: &str) -> Result<Option<QTensor>> {
        let Some(q) = self.read(name)? else {
            return Ok(None);
        };
        let Some(heads) = self.permuted_heads(name) else {
            return Ok(Some(q));
        };
        // Rows are quantized independently (blocks run along a row), so moving whole rows of
        // bytes un-permutes the tensor exactly, without dequantizing it.
        let (out, inp) = q.shape().dims2()?;
        let dtype = q.dtype();
        let row_bytes = inp / dtype.block_size() * dtype.type_size();
        let data = q.data()?;
        let mut rows = vec![0u8; data.len()];
        for (hf_row, gguf_row) in unpermuted_row_order(out, heads).into_iter().enumerate() {
            rows[hf_row * row_bytes..(hf_row + 1) * row_bytes]
                .copy_from_slice(&data[gguf_row * row_bytes..(gguf_row + 1) * row_bytes]);
        }
        Ok(Some(candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &rows,
            vec![out, inp],
            &Device::Cpu,
        )?))
    }
}

/// For each Hugging Face row, the GGUF row that holds it (inverse of llama.cpp's q/k permutation).
fn unpermuted_row_order(out: usize, heads: usize) -> Vec<usize> {
    let half = out / heads / 2;
    // HF row (h, j, i) with i < half the pair index and j ∈ {0, 1} the half sits in GGUF row (h, i, j).
    let mut order = Vec::with_capacity(out);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order.push(h * 2 * half + i * 2 + j);
            }
        }
    }
    order
}

/// `(heads·hd, in)` rows from Hugging Face's rotate-half order to llama.cpp's pair-interleaved
/// order: its converter's `LlamaModel.permute` (rows as `(heads, 2, head_dim / 2)`, the two inner
/// axes swapped).
pub fn permute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, 2, half, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// `(heads·hd, in)` rows from llama.cpp's pair-interleaved order back to rotate-half order.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// The model shape a GGUF file's metadata and tensor list describe.
fn gguf_model_config(content: &gguf_file::Content) -> Result<ModelConfig> {
    let md = &content.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| Error::Model("GGUF metadata has no general.architecture".into()))?;
    let arch = Arch::parse(&arch_name)?;
    if arch == Arch::Phi3 {
        return Err(Error::Model(
            "Phi-3 GGUF files are not supported (llama.cpp fuses its q/k/v and gate/up \
             differently); load Phi-3 from a Hugging Face folder"
                .into(),
        ));
    }
    let num = |key: &str| -> Result<usize> {
        md.get(&format!("{arch_name}.{key}"))
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .map(|v| v as usize)
            .ok_or_else(|| Error::Model(format!("GGUF metadata has no {arch_name}.{key}")))
    };
    let float = |key: &str| -> Option<f64> {
        md.get(&format!("{arch_name}.{key}"))
            .and_then(|v| v.to_f32().ok().map(f64::from))
    };
    let hidden_size = num("embedding_length")?;
    let heads = num("attention.head_count")?;
    let kv_heads = num("attention.head_count_kv").unwrap_or(heads);
    let has_output = content.tensor_infos.contains_key("output.weight");
    let vocab_size = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| Error::Model("GGUF has no token_embd.weight".into()))?;
    let num_hidden_layers = num("block_count")?;
    let head_dim = num("attention.key_length").unwrap_or(hidden_size / heads);
    let rope_scaling = match md
        .get(&format!("{arch_name}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok().cloned())
        .as_deref()
    {
        None | Some("none") => None,
        Some("linear") => Some(config::RopeScaling::Linear {
            factor: float("rope.scaling.factor").unwrap_or(1.0),
        }),
        Some(other) => {
            return Err(Error::Model(format!(
                "GGUF RoPE scaling {other:?} is not supported (supported: none, linear)"
            )))
        }
    };
    // Gemma 3's local layers, as llama.cpp sets them for the architecture: every sixth layer
    // global, the others within `attention.sliding_window` with RoPE base 10,000; attention
    // scaled by head_dim^-½, except the 27B model (62 layers), scaled by (hidden / heads)^-½.
    let (query_pre_attn_scalar, local_attention) = if arch == Arch::Gemma3 {
        let scalar = if num_hidden_layers == 62 {
            hidden_size / heads
        } else {
            head_dim
        };
        let local = config::LocalAttention {
            window: num("attention.sliding_window")?,
            rope_theta: 10_000.0,
            layers: config::gemma3_local_layers(num_hidden_layers, 6),
        };
        (Some(scalar as f64), Some(local))
    } else {
        (None, None)
    };
    let cfg = ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: num("feed_forward_length")?,
        num_hidden_layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").ok_or_else(|| {
            Error::Model(format!(
                "GGUF metadata has no {arch_name}.attention.layer_norm_rms_epsilon"
            ))
        })?,
        // llama.cpp's own default when the key is absent.
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling,
        tie_word_embeddings: !has_output,
        attention_bias: arch == Arch::Qwen2,
        sliding_window: None,
        query_pre_attn_scalar,
        local_attention,
        max_position_embeddings: num("context_length").unwrap_or(4096),
    };
    Ok(cfg)
}

/// A GGUF file opened and its header (metadata and tensor list) read.
fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| {
        Error::caused(
            Area::Model,
            format!("{}: not a readable GGUF file", path.display()),
            e,
        )
    })?;
    Ok((file, content))
}

/// Whether a base model path names a GGUF file (as `load_base` decides: by its extension).
pub(crate) fn is_gguf_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
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
pub struct StoredBase {
    pub gguf_linear_bytes: Option<u64>,
}

/// The shape of `base_model` as a job names it (a `.gguf` file, a local folder, or a Hub repo
/// id, of which only `config.json` is fetched), and for a GGUF file the bytes its decoder
/// layers' linear weights take: what [`crate::train::cost`] estimates from.
pub fn base_shape(
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

/// Hugging Face module names of a decoder layer and llama.cpp's names for them
/// (`gguf-py/gguf/tensor_mapping.py`: `blk.{N}.attn_q` …).
const LAYER_NAMES: [(&str, &str); 11] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// Gemma 3's four layer norms (`LLM_ARCH_GEMMA3` in llama.cpp): its `ffn_norm` is the norm
/// before the MLP, and `post_attention_layernorm` a norm of the attention's output.
const GEMMA3_NORM_NAMES: [(&str, &str); 3] = [
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// A family's layer module names, Hugging Face's and GGUF's.
fn layer_names(arch: Arch) -> Vec<(&'static str, &'static str)> {
    let mut names = LAYER_NAMES.to_vec();
    if arch.has_sandwich_norms() {
        names.retain(|(hf, _)| *hf != "post_attention_layernorm");
        names.extend(GEMMA3_NORM_NAMES);
    }
    names
}

/// Tensors outside the layers, Hugging Face name and GGUF name.
const MODEL_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Hugging Face tensor name → GGUF name.
pub(crate) fn gguf_tensor_name(arch: Arch, hf: &str) -> Option<String> {
    if let Some((_, gguf)) = MODEL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(gguf.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let (_, gguf) = layer_names(arch).into_iter().find(|(h, _)| *h == module)?;
    Some(format!("blk.{layer}.{gguf}.{kind}"))
}

/// GGUF tensor name → Hugging Face name (the inverse of [`gguf_tensor_name`]).
pub(crate) fn hf_tensor_name(arch: Arch, gguf: &str) -> Option<String> {
    if let Some((hf, _)) = MODEL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let (hf, _) = layer_names(arch).into_iter().find(|(_, g)| *g == module)?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// A `.gguf` base read for export: its shape, tokenizer and metadata, and every tensor
/// dense in float32 under its Hugging Face name, q/k rows in Hugging Face order.
pub(crate) struct GgufBase {
    pub cfg: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub metadata: HashMap<String, gguf_file::Value>,
    /// GGUF names in file order.
    pub tensor_names: Vec<String>,
    content: gguf_file::Content,
    file: std::fs::File,
}

impl GgufBase {
    pub fn open(path: &Path) -> Result<GgufBase> {
        let (file, content) = open_gguf(path)?;
        let cfg = gguf_model_config(&content)?;
        cfg.check()?;
        let tokenizer = TextTokenizer::from_gguf(&content.metadata)?;
        let mut infos: Vec<(&String, u64)> = content
            .tensor_infos
            .iter()
            .map(|(n, i)| (n, i.offset))
            .collect();
        infos.sort_by_key(|(_, offset)| *offset);
        let tensor_names = infos.into_iter().map(|(n, _)| n.clone()).collect();
        Ok(GgufBase {
            cfg,
            tokenizer,
            metadata: content.metadata.clone(),
            tensor_names,
            content,
            file,
        })
    }

    /// Whether llama.cpp stores this model's q/k rows permuted (its `llama` architecture).
    pub fn permuted(&self) -> bool {
        self.cfg.arch.llama_cpp_permutes_qk()
    }

    /// The tensor `gguf_name` dense, with its Hugging Face name.
    pub fn dense(&mut self, gguf_name: &str) -> Result<(String, Tensor)> {
        let hf = hf_tensor_name(self.cfg.arch, gguf_name).ok_or_else(|| {
            Error::Model(format!("GGUF tensor {gguf_name} has no Hugging Face name"))
        })?;
        let (heads, kv_heads) = if self.permuted() {
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads)
        } else {
            (0, 0)
        };
        let mut source = GgufSource {
            arch: self.cfg.arch,
            content: &self.content,
            file: self
                .file
                .try_clone()
                .map_err(|e| Error::Model(e.to_string()))?,
            heads,
            kv_heads,
        };
        let t = source
            .take(&hf)?
            .ok_or_else(|| Error::Model(format!("GGUF tensor {gguf_name} vanished")))?;
        Ok((hf, t))
    }

    /// The tensor `gguf_name` as the file stores it (for tensors without a Hugging Face name,
    /// such as llama 3's `rope_freqs.weight`, which an export copies as they are).
    pub fn stored(&mut self, gguf_name: &str) -> Result<QTensor> {
        Ok(self
            .content
            .tensor(&mut self.file, gguf_name, &Device::Cpu)?)
    }
}

/// Models by Hub repo id, through `hf-hub` and its cache (`HF_HOME`; `HF_HUB_OFFLINE=1`).
mod hub {
    use super::*;
    use hf_hub::{Cache, Repo, RepoType};

    const FILES: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];

    /// The snapshot folder holding `config.json` of `repo_id` (from the cache, or that one file
    /// downloaded).
    pub fn fetch_config(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
        let revision = revision.unwrap_or("main").to_string();
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.clone());
        let cache = Cache::from_env();
        let config = match cache.repo(repo.clone()).get("config.json") {
            Some(cached) => cached,
            None if offline() => {
                return Err(Error::Model(format!(
                    "HF_HUB_OFFLINE=1 and {repo_id} (revision {revision}) is not in the Hugging Face cache at {}",
                    cache.path().display()
                )))
            }
            None => hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| Error::caused(Area::Model, "Hugging Face Hub client", e))?
                .repo(repo)
                .get("config.json")
                .map_err(|e| {
                    Error::Model(format!(
                        "could not download config.json of {repo_id} (revision {revision}) from the Hub: {e}"
                    ))
                })?,
        };
        Ok(config
            .parent()
            .expect("a cached file lives in a snapshot folder")
            .to_path_buf())
    }

    fn offline() -> bool {
        std::env::var("HF_HUB_OFFLINE")
            .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
            .unwrap_or(false)
    }

    pub fn fetch(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
        let revision = revision.unwrap_or("main").to_string();
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.clone());
        let cache = Cache::from_env();
        let config = if offline() {
            let cached = cache.repo(repo.clone());
            let config = cached.get("config.json").ok_or_else(|| {
                Error::Model(format!(
                    "HF_HUB_OFFLINE=1 and {repo_id} (revision {revision}) is not in the Hugging Face cache at {}",
                    cache.path().display()
                ))
            })?;
            if cached.get("tokenizer.json").is_none() {
                return Err(Error::Model(format!(
                    "HF_HUB_OFFLINE=1 and tokenizer.json of {repo_id} is not in the cache at {}",
                    cache.path().display()
                )));
            }
            config
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| Error::caused(Area::Model, "Hugging Face Hub client", e))?;
            let r = api.repo(repo);
            let get = |f: &str| {
                r.get(f).map_err(|e| {
                    Error::Model(format!(
                        "could not download {f} of {repo_id} (revision {revision}) from the Hub: {e}; \
                         set HF_HUB_OFFLINE=1 to use the cache at {}",
                        cache.path().display()
                    ))
                })
            };
            let config = get(FILES[0])?;
            get(FILES[1])?;
            let _ = r.get(FILES[2]);
            let _ = r.get("chat_template.jinja");
            if r.get("model.safetensors").is_err() {
                let index = get("model.safetensors.index.json")?;
                let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::caused(Area::Model, index.display().to_string(), e))?;
                let mut shards: Vec<String> = v["weight_map"]
                    .as_object()
                    .map(|m| {
                        m.values()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                for s in shards {
                    get(&s)?;
                }
            }
            config
        };
        Ok(config
            .parent()
            .expect("a cached file lives in a snapshot folder")
            .to_path_buf())
    }
}
