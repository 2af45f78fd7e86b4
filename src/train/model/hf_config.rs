//! transformers' `config.json` (as transformers 4.x and 5.x write it), read through a serde
//! struct of the keys this engine uses and checked into a [`ModelConfig`]; and written back
//! (`to_hf_json`) for the random models of tests and benchmarks. Keys that would change the
//! model in ways the engine does not implement (soft-capping, partial RoPE, bidirectional
//! attention, RoPE kinds other than default / linear / llama3) are refused rather than ignored.

use serde::Deserialize;
use serde_json::Value;

use super::arch::Arch;
use super::config::{gemma3_local_layers, LocalAttention, ModelConfig};
use super::rope::RopeScaling;
use crate::train::error::{Area, Error};

/// The keys of a `config.json` this engine reads; any other key is ignored.
#[derive(Debug, Default, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    /// transformers 4's RoPE scaling block.
    rope_scaling: Option<RopeParams>,
    /// transformers 5's RoPE block (base and scaling), per layer kind for Gemma 3.
    rope_parameters: Option<RopeParameters>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_position_embeddings: Option<usize>,
    // Gemma 3
    query_pre_attn_scalar: Option<f64>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    hidden_activation: Option<String>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
}

/// A RoPE block: `rope_scaling` (transformers 4) or `rope_parameters` (5).
#[derive(Debug, Default, Clone, Deserialize)]
struct RopeParams {
    rope_type: Option<String>,
    /// transformers' older spelling of `rope_type`.
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    partial_rotary_factor: Option<f64>,
}

/// `rope_parameters`: one block, or one per layer kind (Gemma 3: `full_attention`,
/// `sliding_attention`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RopeParameters {
    PerLayerKind {
        full_attention: RopeParams,
        #[serde(default)]
        sliding_attention: Option<RopeParams>,
    },
    One(RopeParams),
}

impl RopeParameters {
    /// The block of the global (full-attention) layers.
    fn global(&self) -> &RopeParams {
        match self {
            RopeParameters::PerLayerKind { full_attention, .. } => full_attention,
            RopeParameters::One(p) => p,
        }
    }

    fn local(&self) -> Option<&RopeParams> {
        match self {
            RopeParameters::PerLayerKind {
                sliding_attention, ..
            } => sliding_attention.as_ref(),
            RopeParameters::One(_) => None,
        }
    }
}

impl RopeParams {
    fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.kind.as_deref())
            .unwrap_or("default")
    }

    /// The scaling this block asks for; `None` for the default RoPE.
    fn scaling(&self) -> Result<Option<RopeScaling>, Error> {
        let kind = self.kind();
        let num = |v: Option<f64>, k: &str| {
            v.ok_or_else(|| Error::Model(format!("config.json: rope scaling {kind:?} needs {k:?}")))
        };
        match kind {
            "default" => Ok(None),
            "linear" => Ok(Some(RopeScaling::Linear {
                factor: num(self.factor, "factor")?,
            })),
            "llama3" => Ok(Some(RopeScaling::Llama3 {
                factor: num(self.factor, "factor")?,
                low_freq_factor: num(self.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: num(self.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: num(
                    self.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )?,
            })),
            other => Err(Error::Model(format!(
                "unsupported RoPE scaling {other:?} (supported: default, linear, llama3)"
            ))),
        }
    }
}

fn required<T>(v: Option<T>, key: &str) -> Result<T, Error> {
    v.ok_or_else(|| Error::Model(format!("config.json: missing or invalid {key:?}")))
}

impl ModelConfig {
    /// Reads a transformers `config.json`.
    pub fn from_hf_json(text: &str) -> Result<ModelConfig, Error> {
        let c: HfConfig = serde_json::from_str(text)
            .map_err(|e| Error::caused(Area::Model, "config.json is not valid", e))?;
        let model_type = c
            .model_type
            .as_deref()
            .ok_or_else(|| Error::Model("config.json: missing \"model_type\"".into()))?;
        if model_type == "gemma3" {
            return Err(Error::Model(
                "config.json: model_type \"gemma3\" is Gemma 3's image-and-text model; only its \
                 text decoder (model_type \"gemma3_text\", as in gemma-3-270m and gemma-3-1b) is \
                 supported"
                    .into(),
            ));
        }
        let arch = Arch::parse(model_type)?;
        let hidden_size = required(c.hidden_size, "hidden_size")?;
        let num_attention_heads = required(c.num_attention_heads, "num_attention_heads")?;
        let num_hidden_layers = required(c.num_hidden_layers, "num_hidden_layers")?;
        let global_rope = c.rope_parameters.as_ref().map(RopeParameters::global);
        let rope_theta = c
            .rope_theta
            .or_else(|| global_rope.and_then(|p| p.rope_theta))
            .ok_or_else(|| {
                Error::Model(
                    "config.json: no rope_theta (neither top-level nor under rope_parameters); \
                     refusing to guess the RoPE base"
                        .into(),
                )
            })?;
        let scaling = c
            .rope_scaling
            .as_ref()
            .or_else(|| global_rope.filter(|p| p.rope_type.is_some()));
        let rope_scaling = match scaling {
            None => None,
            Some(s) => s.scaling()?,
        };
        let (query_pre_attn_scalar, local_attention) = if arch == Arch::Gemma3 {
            gemma3_attention(&c, num_hidden_layers)?
        } else {
            (None, None)
        };
        if arch == Arch::Phi3 {
            let partial = global_rope
                .and_then(|p| p.partial_rotary_factor)
                .or(c.partial_rotary_factor)
                .unwrap_or(1.0);
            if partial != 1.0 {
                return Err(Error::Model(format!(
                    "config.json: partial_rotary_factor {partial} is not supported (RoPE on the \
                     whole head only)"
                )));
            }
        }
        let cfg = ModelConfig {
            arch,
            vocab_size: required(c.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: required(c.intermediate_size, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim: c
                .head_dim
                .unwrap_or(hidden_size / num_attention_heads.max(1)),
            rms_norm_eps: c
                .rms_norm_eps
                .ok_or_else(|| Error::Model("config.json: missing \"rms_norm_eps\"".into()))?,
            rope_theta,
            rope_scaling,
            // transformers' default differs per architecture: llama/mistral/phi3 untied,
            // qwen2 and gemma3 tied.
            tie_word_embeddings: c
                .tie_word_embeddings
                .unwrap_or(matches!(arch, Arch::Qwen2 | Arch::Gemma3)),
            attention_bias: arch == Arch::Qwen2 || c.attention_bias.unwrap_or(false),
            sliding_window: match arch {
                // transformers' Phi3Attention passes config.sliding_window to every layer
                Arch::Mistral | Arch::Phi3 => c.sliding_window,
                Arch::Qwen2 if c.use_sliding_window == Some(true) => c.sliding_window,
                _ => None,
            },
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
            query_pre_attn_scalar,
            local_attention,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// The config.json this engine would read back as the same model (used to write the random
    /// models of tests and benchmarks).
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.hf_model_type(),
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
        });
        let rope = |theta: f64, scaling: Option<&RopeScaling>| {
            let mut p = match scaling {
                Some(s) => serde_json::to_value(s).expect("serializable"),
                None => serde_json::json!({"rope_type": "default"}),
            };
            p["rope_theta"] = theta.into();
            p
        };
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::to_value(s).expect("serializable");
        }
        if let Some(w) = self.sliding_window {
            v["sliding_window"] = w.into();
            if self.arch == Arch::Qwen2 {
                v["use_sliding_window"] = true.into();
            }
        }
        if self.attention_bias && self.arch != Arch::Qwen2 {
            v["attention_bias"] = true.into();
        }
        if self.arch == Arch::Gemma3 {
            v["hidden_activation"] = "gelu_pytorch_tanh".into();
            v.as_object_mut().expect("an object").remove("hidden_act");
            v.as_object_mut().expect("an object").remove("rope_theta");
            v.as_object_mut().expect("an object").remove("rope_scaling");
            v["query_pre_attn_scalar"] = self.query_pre_attn_scalar.into();
            v["final_logit_softcapping"] = Value::Null;
            v["attn_logit_softcapping"] = Value::Null;
            let local = self.local_attention.as_ref();
            v["sliding_window"] = local.map(|l| l.window).into();
            v["layer_types"] = local
                .map(|l| {
                    l.layers
                        .iter()
                        .map(|&s| {
                            if s {
                                "sliding_attention"
                            } else {
                                "full_attention"
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .into();
            v["rope_parameters"] = serde_json::json!({
                "full_attention": rope(self.rope_theta, self.rope_scaling.as_ref()),
                "sliding_attention": rope(local.map_or(10_000.0, |l| l.rope_theta), None),
            });
        }
        v
    }
}

/// Gemma 3's attention settings (transformers 4.5x or 5.x spelling): `query_pre_attn_scalar`,
/// and its local layers (`layer_types` or `sliding_window_pattern`, `sliding_window`, the local
/// RoPE base). Soft-capping and bidirectional attention, which the released text models do not
/// use, are refused rather than ignored.
fn gemma3_attention(
    c: &HfConfig,
    num_layers: usize,
) -> Result<(Option<f64>, Option<LocalAttention>), Error> {
    for (key, set) in [
        ("final_logit_softcapping", c.final_logit_softcapping),
        ("attn_logit_softcapping", c.attn_logit_softcapping),
    ] {
        if set.is_some() {
            return Err(Error::Model(format!(
                "config.json: {key} is not supported (Gemma 3 does not use it)"
            )));
        }
    }
    if c.use_bidirectional_attention == Some(true) {
        return Err(Error::Model(
            "config.json: use_bidirectional_attention is not supported (a decoder attends causally)"
                .into(),
        ));
    }
    if let Some(act) = c.hidden_activation.as_deref() {
        if act != "gelu_pytorch_tanh" {
            return Err(Error::Model(format!(
                "config.json: hidden_activation {act:?} is not supported (gelu_pytorch_tanh)"
            )));
        }
    }
    let layers = match &c.layer_types {
        Some(kinds) => kinds
            .iter()
            .enumerate()
            .map(|(i, k)| match k.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                _ => Err(Error::Model(format!(
                    "config.json: layer_types[{i}] is {k:?}, not sliding_attention or full_attention"
                ))),
            })
            .collect::<Result<Vec<bool>, Error>>()?,
        None => {
            let pattern = c.sliding_window_pattern.unwrap_or(6);
            gemma3_local_layers(num_layers, pattern.max(1))
        }
    };
    let local_params = c.rope_parameters.as_ref().and_then(RopeParameters::local);
    if let Some(p) = local_params {
        if p.kind() != "default" {
            return Err(Error::Model(format!(
                "config.json: RoPE scaling {:?} on the sliding layers is not supported",
                p.kind()
            )));
        }
    }
    let local_theta = local_params
        .and_then(|p| p.rope_theta)
        .or(c.rope_local_base_freq)
        .unwrap_or(10_000.0);
    let window = c
        .sliding_window
        .ok_or_else(|| Error::Model("config.json: gemma3_text needs \"sliding_window\"".into()))?;
    Ok((
        Some(c.query_pre_attn_scalar.unwrap_or(256.0)),
        Some(LocalAttention {
            window,
            rope_theta: local_theta,
            layers,
        }),
    ))
}

#[cfg(test)]
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

    #[test]
    fn gemma3_config_round_trips_through_the_json_it_writes() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/families/gemma3/config.json"
        ))
        .unwrap();
        let cfg = ModelConfig::from_hf_json(&text).unwrap();
        assert_eq!(cfg.arch, Arch::Gemma3);
        assert_eq!(cfg.query_pre_attn_scalar, Some(12.0));
        assert_eq!(cfg.rope_theta, 1e6);
        assert_eq!(cfg.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        let local = cfg.local_attention.clone().unwrap();
        assert_eq!((local.window, local.rope_theta), (6, 10_000.0));
        assert_eq!(local.layers, vec![true, false]);
        assert!(cfg.tie_word_embeddings);
        let again = ModelConfig::from_hf_json(&cfg.to_hf_json().to_string()).unwrap();
        assert_eq!(again, cfg);
        // without layer_types: every sixth layer global
        assert_eq!(
            gemma3_local_layers(7, 6),
            vec![true, true, true, true, true, false, true]
        );
        let e = ModelConfig::from_hf_json(&text.replace(
            "\"final_logit_softcapping\": null",
            "\"final_logit_softcapping\": 30.0",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("final_logit_softcapping"), "{e}");
        let e = ModelConfig::from_hf_json(r#"{"model_type":"gemma3"}"#).unwrap_err();
        assert!(e.to_string().contains("gemma3_text"), "{e}");
    }

    #[test]
    fn phi3_keeps_its_sliding_window_and_refuses_partial_rope() {
        let phi3_config = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/families/phi3/config.json"
        ))
        .unwrap();
        let cfg = ModelConfig::from_hf_json(&phi3_config).unwrap();
        assert_eq!((cfg.arch, cfg.sliding_window), (Arch::Phi3, Some(6)));
        let e = ModelConfig::from_hf_json(&phi3_config.replace(
            "\"partial_rotary_factor\": 1.0",
            "\"partial_rotary_factor\": 0.5",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("partial_rotary_factor"), "{e}");
    }
}
