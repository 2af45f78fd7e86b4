//! Weights and config from a llama.cpp GGUF file: its tensors (dense or kept in their GGML
//! types), its metadata as a [`ModelConfig`], and the q/k row order llama.cpp permutes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};

use super::names::{gguf_tensor_name, hf_tensor_name};
use super::WeightSource;
use crate::train::error::{Area, Error, Result};
use crate::train::model::{config, Arch, ModelConfig};
use crate::train::tokenizer::TextTokenizer;

/// Reads tensors of a GGUF file on demand, by Hugging Face name.
pub(crate) struct GgufSource<'a> {
    pub(crate) content: &'a gguf_file::Content,
    pub(crate) file: std::fs::File,
    pub(crate) arch: Arch,
    /// Head counts for un-permuting q/k rows (0: the file is not permuted).
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
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
pub(crate) fn unpermuted_row_order(out: usize, heads: usize) -> Vec<usize> {
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
pub(crate) fn gguf_model_config(content: &gguf_file::Content) -> Result<ModelConfig> {
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
        Some("linear") => Some(crate::train::model::RopeScaling::Linear {
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
pub(crate) fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content)> {
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
