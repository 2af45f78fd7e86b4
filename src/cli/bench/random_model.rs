//! Random-weight models of any Llama shape, with a small byte-level tokenizer: what the
//! benchmarks measure (`qtune bench` at SmolLM2-135M's shape, the API benchmark's background
//! job) and what the tests train (nothing is downloaded). Not part of the engine: it only
//! writes files and weights the engine loads like any other.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::train::model::{Arch, ModelConfig, Proj, WeightSource};
use crate::train::{Error, Result};

/// Special tokens of the byte-level test tokenizer, ids 0, 1, 2; the 256 byte tokens follow.
pub(crate) const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, as SmolLM2 and Qwen2 use it.
pub(crate) const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A tiny Llama shape that trains in milliseconds (vocabulary = the byte tokenizer's 259).
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 259,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        tie_word_embeddings: true,
        attention_bias: false,
        sliding_window: None,
        max_position_embeddings: 2048,
        query_pre_attn_scalar: None,
        local_attention: None,
    }
}

/// SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, intermediate 1536, vocab 49152).
pub fn smollm2_135m_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rope_theta: 100_000.0,
        max_position_embeddings: 8192,
        ..tiny_config()
    }
}

/// SmolLM2-360M's shape (32 layers, hidden 960, 15 heads, 5 KV heads, intermediate 2560).
pub(crate) fn smollm2_360m_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 960,
        intermediate_size: 2560,
        num_hidden_layers: 32,
        num_attention_heads: 15,
        num_key_value_heads: 5,
        ..smollm2_135m_config()
    }
}

/// SmolLM2-1.7B's shape (24 layers, hidden 2048, 32 heads and 32 KV heads, intermediate 8192).
pub(crate) fn smollm2_1_7b_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 2048,
        intermediate_size: 8192,
        num_hidden_layers: 24,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        rope_theta: 130_000.0,
        ..smollm2_135m_config()
    }
}

fn normal(shape: (usize, usize), std: f32, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let dist = Normal::new(0.0f32, std).expect("valid std");
    let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| dist.sample(rng)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Random base weights in Hugging Face naming: linears N(0, 0.02), embeddings N(0, 3/√hidden), norms 1.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = HashMap::new();
    let h = cfg.hidden_size;
    // Embedding rows large enough (norm ≈ 3) that tied logits can become confident: with the
    // usual 0.02 a tiny model's logits stay within ±1 and no loss can fall far.
    let embed_std = 3.0 / (h as f32).sqrt();
    let ones = Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?;
    w.insert(
        "model.embed_tokens.weight".into(),
        normal((cfg.vocab_size, h), embed_std, &mut rng)?,
    );
    for layer in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        for proj in Proj::ALL {
            let (group, module) = (proj.group(), proj.name());
            let shape = cfg.linear_shape(proj);
            w.insert(
                format!("{p}.{group}.{module}.weight"),
                normal(shape, 0.02, &mut rng)?,
            );
            if cfg.attention_bias && proj.is_qkv() {
                let b = normal((1, shape.0), 0.02, &mut rng)?.squeeze(0)?;
                w.insert(format!("{p}.{group}.{module}.bias"), b);
            }
        }
        w.insert(format!("{p}.input_layernorm.weight"), ones.clone());
        w.insert(format!("{p}.post_attention_layernorm.weight"), ones.clone());
        if cfg.arch.has_qk_norm() {
            let per_head = Tensor::ones(cfg.head_dim, candle_core::DType::F32, &Device::Cpu)?;
            w.insert(format!("{p}.self_attn.q_norm.weight"), per_head.clone());
            w.insert(format!("{p}.self_attn.k_norm.weight"), per_head);
        }
    }
    w.insert("model.norm.weight".into(), ones);
    if !cfg.tie_word_embeddings {
        w.insert(
            "lm_head.weight".into(),
            normal((cfg.vocab_size, h), embed_std, &mut rng)?,
        );
    }
    Ok(w)
}

/// The byte-level tokenizer of the tiny models: 3 special tokens, then one token per byte.
pub(crate) fn byte_tokenizer() -> Result<Tokenizer> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: tokenizers::models::bpe::Vocab = SPECIAL_TOKENS
        .iter()
        .map(|t| t.to_string())
        .chain(alphabet.iter().map(|c| c.to_string()))
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevel::default()));
    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    tk.add_special_tokens(special)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(tk)
}

/// Writes a complete Hugging Face model folder: config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json (ChatML template, `<|im_end|>` as EOS).
pub fn write_model_dir(dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg.to_hf_json()).expect("json"),
    )?;
    let weights = random_weights(cfg, seed)?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    byte_tokenizer()?
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&serde_json::json!({
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "chat_template": CHATML_TEMPLATE,
        }))
        .expect("json"),
    )?;
    Ok(())
}

/// Random weights made when the loader asks for each one, so that only one dense tensor exists
/// at a time (what the benchmark needs to measure a quantized model's real peak memory). Same
/// distributions as [`random_weights`], seeded per tensor name.
pub(crate) struct RandomSource {
    pub cfg: ModelConfig,
    pub seed: u64,
}

impl WeightSource for RandomSource {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        // FNV-1a of the name: a stable per-tensor stream
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ name_hash);
        let embed_std = 3.0 / (h as f32).sqrt();
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            return Ok(Some(normal((cfg.vocab_size, h), embed_std, &mut rng)?));
        }
        if name.ends_with("norm.weight") {
            return Ok(Some(Tensor::ones(
                h,
                candle_core::DType::F32,
                &Device::Cpu,
            )?));
        }
        let Some(proj) = Proj::ALL.into_iter().find(|p| name.contains(p.name())) else {
            return Ok(None);
        };
        let shape = cfg.linear_shape(proj);
        Ok(Some(if name.ends_with(".bias") {
            normal((1, shape.0), 0.02, &mut rng)?.squeeze(0)?
        } else {
            normal(shape, 0.02, &mut rng)?
        }))
    }
}
