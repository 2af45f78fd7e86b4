//! Model hyper-parameters, read from a Hugging Face `config.json` (as transformers 4.x and 5.x
//! write it) or from GGUF metadata.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::train::error::{Area, Error};

/// The seven linear projections of a decoder layer, in the order of [`crate::spec::ALL_LINEAR`]
/// (the names PEFT's `target_modules` use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module's name in Hugging Face checkpoints and PEFT: `q_proj`, ...
    pub fn name(self) -> &'static str {
        crate::spec::ALL_LINEAR[self as usize]
    }

    /// A projection by its module name; `None` for anything else.
    pub fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The submodule it sits in: `self_attn` or `mlp`.
    pub fn group(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// q, k or v: the projections that carry a bias where the config says `attention_bias`.
    pub fn is_qkv(self) -> bool {
        matches!(self, Proj::Q | Proj::K | Proj::V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen2's layout without q/k/v biases, with an RMSNorm on each head of q and of k.
    Qwen3,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Arch, Error> {
        match name {
            "llama" => Ok(Arch::Llama),
            "mistral" => Ok(Arch::Mistral),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            other => Err(Error::Model(format!(
                "unsupported architecture {other:?} (supported: llama, mistral, qwen2, qwen3)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// Whether each head of q and k is RMS-normalised before RoPE (`self_attn.q_norm`,
    /// `self_attn.k_norm`).
    pub fn has_qk_norm(self) -> bool {
        self == Arch::Qwen3
    }

    /// Whether llama.cpp stores q's and k's rows permuted for its interleaved RoPE (its `llama`
    /// architecture); the qwen families use the rotate-half ("neox") RoPE and keep them as they are.
    pub fn llama_cpp_permutes_qk(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral)
    }
}

/// RoPE frequency scaling, for the kinds this engine implements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2).
    pub attention_bias: bool,
    /// Mistral's sliding attention window, when it is in use.
    pub sliding_window: Option<usize>,
    pub max_position_embeddings: usize,
}

fn get_usize(v: &Value, key: &str) -> Result<usize, Error> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::Model(format!("config.json: missing or invalid {key:?}")))
}

impl ModelConfig {
    /// Reads a transformers `config.json`.
    pub fn from_hf_json(text: &str) -> Result<ModelConfig, Error> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::caused(Area::Model, "config.json is not valid JSON", e))?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Model("config.json: missing \"model_type\"".into()))?;
        let arch = Arch::parse(model_type)?;
        let hidden_size = get_usize(&v, "hidden_size")?;
        let num_attention_heads = get_usize(&v, "num_attention_heads")?;
        let num_key_value_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads);
        // transformers 5 moves rope_theta (and the scaling) under `rope_parameters`.
        let rope_params = v.get("rope_parameters");
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .ok_or_else(|| {
                Error::Model(
                    "config.json: no rope_theta (neither top-level nor under rope_parameters); \
                     refusing to guess the RoPE base"
                        .into(),
                )
            })?;
        let scaling = v
            .get("rope_scaling")
            .filter(|s| !s.is_null())
            .or_else(|| rope_params.filter(|p| p.get("rope_type").is_some()));
        let rope_scaling = match scaling {
            None => None,
            Some(s) => parse_rope_scaling(s)?,
        };
        let sliding_window = match arch {
            Arch::Mistral => v.get("sliding_window").and_then(Value::as_u64),
            Arch::Qwen2 if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) => {
                v.get("sliding_window").and_then(Value::as_u64)
            }
            _ => None,
        }
        .map(|w| w as usize);
        let attention_bias = match arch {
            Arch::Qwen2 => true,
            _ => v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: get_usize(&v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(&v, "intermediate_size")?,
            num_hidden_layers: get_usize(&v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .ok_or_else(|| Error::Model("config.json: missing \"rms_norm_eps\"".into()))?,
            rope_theta,
            rope_scaling,
            // transformers' default differs per architecture: llama/mistral untied, qwen2 tied.
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(arch == Arch::Qwen2),
            attention_bias,
            sliding_window,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(4096) as usize,
        };
        cfg.check()?;
        Ok(cfg)
    }

    pub fn check(&self) -> Result<(), Error> {
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::Model(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Model(format!(
                "head_dim must be even for RoPE, got {}",
                self.head_dim
            )));
        }
        Ok(())
    }

    /// The config.json this engine would read back as the same model (used to write the random
    /// models of tests and benchmarks).
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": [match self.arch { Arch::Llama => "LlamaForCausalLM", Arch::Mistral => "MistralForCausalLM", Arch::Qwen2 => "Qwen2ForCausalLM", Arch::Qwen3 => "Qwen3ForCausalLM" }],
            "model_type": self.arch.as_str(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }

    /// (out, in) of a projection's weight.
    pub fn linear_shape(&self, proj: Proj) -> (usize, usize) {
        let (h, q, kv, ff) = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
            self.intermediate_size,
        );
        match proj {
            Proj::Q => (q, h),
            Proj::K | Proj::V => (kv, h),
            Proj::O => (h, q),
            Proj::Gate | Proj::Up => (ff, h),
            Proj::Down => (h, ff),
        }
    }

    /// Inverse RoPE frequencies, one per pair of head dimensions, with scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64);
                let f = match &self.rope_scaling {
                    None => f,
                    Some(RopeScaling::Linear { factor }) => f / factor,
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: ctx,
                    }) => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let (low_wl, high_wl) = (ctx / low_freq_factor, ctx / high_freq_factor);
                        if wavelen < high_wl {
                            f
                        } else if wavelen > low_wl {
                            f / factor
                        } else {
                            let smooth = (ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                };
                f as f32
            })
            .collect()
    }
}

fn parse_rope_scaling(s: &Value) -> Result<Option<RopeScaling>, Error> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| {
        s.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::Model(format!("config.json: rope scaling {kind:?} needs {k:?}")))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        other => Err(Error::Model(format!(
            "unsupported RoPE scaling {other:?} (supported: default, linear, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5"#;

    #[test]
    fn rope_theta_top_level_or_nested() {
        let a = ModelConfig::from_hf_json(&format!("{{{BASE},\"rope_theta\":100000}}")).unwrap();
        assert_eq!(a.rope_theta, 100000.0);
        let b = ModelConfig::from_hf_json(&format!(
            "{{{BASE},\"rope_parameters\":{{\"rope_theta\":500000,\"rope_type\":\"default\"}}}}"
        ))
        .unwrap();
        assert_eq!(b.rope_theta, 500000.0);
        assert_eq!(b.rope_scaling, None);
        let e = ModelConfig::from_hf_json(&format!("{{{BASE}}}")).unwrap_err();
        assert!(e.to_string().contains("rope_theta"), "{e}");
    }

    #[test]
    fn unknown_architecture_is_an_error() {
        let e = ModelConfig::from_hf_json(r#"{"model_type":"gpt_neox"}"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("unsupported architecture \"gpt_neox\""),
            "{e}"
        );
    }

    #[test]
    fn llama3_scaling_parsed() {
        let c = ModelConfig::from_hf_json(&format!(
            "{{{BASE},\"rope_theta\":500000,\"rope_scaling\":{{\"rope_type\":\"llama3\",\"factor\":8.0,\
             \"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}}}}"
        ))
        .unwrap();
        let f = c.rope_inv_freq();
        assert_eq!(f[0], 1.0);
        assert!(f[f.len() - 1] < 1.0 / 500000f32.powf(30.0 / 32.0));
        let e = ModelConfig::from_hf_json(&format!(
            "{{{BASE},\"rope_theta\":1,\"rope_scaling\":{{\"type\":\"yarn\",\"factor\":2}}}}"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("yarn"));
    }
}
