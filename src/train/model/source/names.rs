//! Tensor names: Hugging Face's (`model.layers.N.self_attn.q_proj.weight`) and llama.cpp's
//! GGUF names (`blk.N.attn_q.weight`), one table each way, per family.

use super::super::Arch;

/// Hugging Face module names of a decoder layer and llama.cpp's names for them
/// (`gguf-py/gguf/tensor_mapping.py`: `blk.{N}.attn_q` …).
pub(crate) const LAYER_NAMES: [(&str, &str); 11] = [
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
pub(crate) const GEMMA3_NORM_NAMES: [(&str, &str); 3] = [
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// A family's layer module names, Hugging Face's and GGUF's.
pub(crate) fn layer_names(arch: Arch) -> Vec<(&'static str, &'static str)> {
    let mut names = LAYER_NAMES.to_vec();
    if arch.has_sandwich_norms() {
        names.retain(|(hf, _)| *hf != "post_attention_layernorm");
        names.extend(GEMMA3_NORM_NAMES);
    }
    names
}

/// Tensors outside the layers, Hugging Face name and GGUF name.
pub(crate) const MODEL_NAMES: [(&str, &str); 3] = [
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
