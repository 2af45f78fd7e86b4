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
    /// Gemma 3's text decoder (`gemma3_text`): embeddings scaled by √hidden, RMSNorms scaling by
    /// (1 + w), q/k norms, a norm after attention and after the MLP as well as before each,
    /// GeGLU, sliding-window layers with their own RoPE base between global ones.
    Gemma3,
    /// Phi-3: the llama layout with q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj`.
    Phi3,
}

/// A linear module as the checkpoint and PEFT name it, and the projections it computes (more
/// than one where the family fuses them: the module's output rows are theirs, in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraModule {
    pub name: &'static str,
    pub projs: &'static [Proj],
}

impl LoraModule {
    /// The submodule it sits in: `self_attn` or `mlp`.
    pub fn group(&self) -> &'static str {
        self.projs[0].group()
    }
}

const SEPARATE_MODULES: [LoraModule; 7] = [
    LoraModule {
        name: "q_proj",
        projs: &[Proj::Q],
    },
    LoraModule {
        name: "k_proj",
        projs: &[Proj::K],
    },
    LoraModule {
        name: "v_proj",
        projs: &[Proj::V],
    },
    LoraModule {
        name: "o_proj",
        projs: &[Proj::O],
    },
    LoraModule {
        name: "gate_proj",
        projs: &[Proj::Gate],
    },
    LoraModule {
        name: "up_proj",
        projs: &[Proj::Up],
    },
    LoraModule {
        name: "down_proj",
        projs: &[Proj::Down],
    },
];

const PHI3_MODULES: [LoraModule; 4] = [
    LoraModule {
        name: "qkv_proj",
        projs: &[Proj::Q, Proj::K, Proj::V],
    },
    LoraModule {
        name: "o_proj",
        projs: &[Proj::O],
    },
    LoraModule {
        name: "gate_up_proj",
        projs: &[Proj::Gate, Proj::Up],
    },
    LoraModule {
        name: "down_proj",
        projs: &[Proj::Down],
    },
];

impl Arch {
    pub fn parse(name: &str) -> Result<Arch, Error> {
        match name {
            "llama" => Ok(Arch::Llama),
            "mistral" => Ok(Arch::Mistral),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            // `gemma3_text` in config.json, `gemma3` in GGUF metadata
            "gemma3_text" | "gemma3" => Ok(Arch::Gemma3),
            "phi3" => Ok(Arch::Phi3),
            other => Err(Error::Model(format!(
                "unsupported architecture {other:?} (supported: llama, mistral, qwen2, qwen3, \
                 gemma3_text, phi3)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// The `model_type` transformers writes in config.json.
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Arch::Gemma3 => "gemma3_text",
            other => other.as_str(),
        }
    }

    /// The class transformers builds for it (config.json's `architectures`).
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// Whether each head of q and k is RMS-normalised before RoPE (`self_attn.q_norm`,
    /// `self_attn.k_norm`).
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Gemma's RMSNorms scale by `1 + w`; the checkpoint stores `w`.
    pub fn norm_adds_one(self) -> bool {
        self == Arch::Gemma3
    }

    /// Gemma multiplies the embeddings by √hidden before the first layer.
    pub fn scales_embeddings(self) -> bool {
        self == Arch::Gemma3
    }

    /// Gemma's "sandwich": a norm on the attention's and on the MLP's output before each
    /// residual add (`post_attention_layernorm`, `post_feedforward_layernorm`), the MLP's input
    /// norm then being `pre_feedforward_layernorm`.
    pub fn has_sandwich_norms(self) -> bool {
        self == Arch::Gemma3
    }

    /// The MLP's gate activation: tanh-approximated GELU (GeGLU) for Gemma, SiLU (SwiGLU) else.
    pub fn gelu_gate(self) -> bool {
        self == Arch::Gemma3
    }

    /// Whether the fused CPU layer (`layer.rs`) computes this family: the plain pre-norm SwiGLU
    /// layer with one LoRA per projection. Others run the composite graph.
    pub fn fused_layer_applies(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral | Arch::Qwen2)
    }

    /// The linear modules of a layer as its checkpoints (and PEFT's `target_modules`) name them.
    pub fn lora_modules(self) -> &'static [LoraModule] {
        match self {
            Arch::Phi3 => &PHI3_MODULES,
            _ => &SEPARATE_MODULES,
        }
    }

    /// The modules a LoRA spec's `target_modules` adapts in this family. On a family that fuses
    /// projections, naming one of them (q_proj, or the default q/k/v/o) adapts the fused module
    /// it is part of, so one spec works across families; a fused name on a family without it is
    /// an error that names it.
    pub fn lora_targets(self, names: &[String]) -> Result<Vec<LoraModule>, Error> {
        let modules = self.lora_modules();
        if let Some(bad) = names.iter().find(|n| {
            !modules.iter().any(|m| m.name == n.as_str())
                && !modules
                    .iter()
                    .any(|m| m.projs.iter().any(|p| p.name() == n.as_str()))
        }) {
            return Err(Error::Model(format!(
                "lora.target_modules: {bad:?} is not a module of {} (its modules: {})",
                self.as_str(),
                modules
                    .iter()
                    .map(|m| m.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(modules
            .iter()
            .filter(|m| {
                names
                    .iter()
                    .any(|n| n == m.name || m.projs.iter().any(|p| p.name() == n.as_str()))
            })
            .copied()
            .collect())
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
    /// Attention scores are scaled by `query_pre_attn_scalar^-½` where set (Gemma), by
    /// `head_dim^-½` otherwise.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3's local layers, where the family has them.
    #[serde(default)]
    pub local_attention: Option<LocalAttention>,
}

/// Layers that attend only within a window of recent positions, with a RoPE of their own
/// (Gemma 3: five local layers to each global one). Global layers use the model's
/// `rope_theta` / `rope_scaling` and see every earlier position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalAttention {
    /// A key is seen when `query position − key position < window`.
    pub window: usize,
    /// The local layers' RoPE base (unscaled).
    pub rope_theta: f64,
    /// Per layer: local (true) or global.
    pub layers: Vec<bool>,
}

/// Gemma 3's layer kinds when a config lists none: every `pattern`-th layer global (as
/// transformers' `sliding_window_pattern` and llama.cpp's `set_swa_pattern(6)`).
pub fn gemma3_local_layers(num_layers: usize, pattern: usize) -> Vec<bool> {
    (0..num_layers)
        .map(|i| !(i + 1).is_multiple_of(pattern))
        .collect()
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
        if model_type == "gemma3" {
            return Err(Error::Model(
                "config.json: model_type \"gemma3\" is Gemma 3's image-and-text model; only its \
                 text decoder (model_type \"gemma3_text\", as in gemma-3-270m and gemma-3-1b) is \
                 supported"
                    .into(),
            ));
        }
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
        // transformers 5 moves rope_theta (and the scaling) under `rope_parameters`, per layer
        // kind for Gemma 3 (`full_attention`, `sliding_attention`).
        let rope_params = v.get("rope_parameters").map(|p| {
            if arch == Arch::Gemma3 {
                p.get("full_attention").unwrap_or(p)
            } else {
                p
            }
        });
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
            // transformers' Phi3Attention passes config.sliding_window to every layer
            Arch::Phi3 => v.get("sliding_window").and_then(Value::as_u64),
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
        let num_hidden_layers = get_usize(&v, "num_hidden_layers")?;
        let (query_pre_attn_scalar, local_attention) = if arch == Arch::Gemma3 {
            gemma3_attention(&v, num_hidden_layers)?
        } else {
            (None, None)
        };
        if arch == Arch::Phi3 {
            let partial = rope_params
                .and_then(|p| p.get("partial_rotary_factor"))
                .or_else(|| v.get("partial_rotary_factor"))
                .and_then(Value::as_f64)
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
            vocab_size: get_usize(&v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(&v, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .ok_or_else(|| Error::Model("config.json: missing \"rms_norm_eps\"".into()))?,
            rope_theta,
            rope_scaling,
            // transformers' default differs per architecture: llama/mistral/phi3 untied,
            // qwen2 and gemma3 tied.
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(matches!(arch, Arch::Qwen2 | Arch::Gemma3)),
            attention_bias,
            sliding_window,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(4096) as usize,
            query_pre_attn_scalar,
            local_attention,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// The scale of the attention scores.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// Whether `layer` attends within Gemma 3's local window.
    pub fn is_local_layer(&self, layer: usize) -> bool {
        self.local_attention
            .as_ref()
            .is_some_and(|l| l.layers.get(layer).copied().unwrap_or(false))
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
        if let Some(local) = &self.local_attention {
            if local.layers.len() != self.num_hidden_layers || local.window == 0 {
                return Err(Error::Model(format!(
                    "local attention: {} layer kinds for {} layers, window {}",
                    local.layers.len(),
                    self.num_hidden_layers,
                    local.window
                )));
            }
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

    /// Inverse RoPE frequencies, one per pair of head dimensions, with scaling applied, of the
    /// global layers.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling.as_ref())
    }

    /// Those of `layer` (Gemma 3's local layers have their own base, unscaled).
    pub fn layer_rope_inv_freq(&self, layer: usize) -> Vec<f32> {
        match &self.local_attention {
            Some(l) if self.is_local_layer(layer) => {
                rope_inv_freq(self.head_dim, l.rope_theta, None)
            }
            _ => self.rope_inv_freq(),
        }
    }
}

fn rope_inv_freq(d: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    (0..d / 2)
        .map(|i| {
            let f = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
            let f = match scaling {
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

/// Gemma 3's attention settings from its config.json (transformers 4.5x or 5.x spelling):
/// `query_pre_attn_scalar`, and its local layers (`layer_types` or `sliding_window_pattern`,
/// `sliding_window`, the local RoPE base). Soft-capping and bidirectional attention, which the
/// released text models do not use, are refused rather than ignored.
fn gemma3_attention(
    v: &Value,
    num_layers: usize,
) -> Result<(Option<f64>, Option<LocalAttention>), Error> {
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if v.get(key).is_some_and(|x| !x.is_null()) {
            return Err(Error::Model(format!(
                "config.json: {key} is not supported (Gemma 3 does not use it)"
            )));
        }
    }
    if v.get("use_bidirectional_attention")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return Err(Error::Model(
            "config.json: use_bidirectional_attention is not supported (a decoder attends causally)"
                .into(),
        ));
    }
    if let Some(act) = v.get("hidden_activation").and_then(Value::as_str) {
        if act != "gelu_pytorch_tanh" {
            return Err(Error::Model(format!(
                "config.json: hidden_activation {act:?} is not supported (gelu_pytorch_tanh)"
            )));
        }
    }
    let layers = match v.get("layer_types").and_then(Value::as_array) {
        Some(kinds) => kinds
            .iter()
            .enumerate()
            .map(|(i, k)| match k.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(Error::Model(format!(
                    "config.json: layer_types[{i}] is {k}, not sliding_attention or full_attention"
                ))),
            })
            .collect::<Result<Vec<bool>, Error>>()?,
        None => {
            let pattern = v
                .get("sliding_window_pattern")
                .and_then(Value::as_u64)
                .unwrap_or(6) as usize;
            gemma3_local_layers(num_layers, pattern.max(1))
        }
    };
    let local_params = v
        .get("rope_parameters")
        .and_then(|p| p.get("sliding_attention"));
    if let Some(p) = local_params {
        let kind = p
            .get("rope_type")
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(Error::Model(format!(
                "config.json: RoPE scaling {kind:?} on the sliding layers is not supported"
            )));
        }
    }
    let local_theta = local_params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| v.get("rope_local_base_freq"))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0);
    let window = v
        .get("sliding_window")
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::Model("config.json: gemma3_text needs \"sliding_window\"".into()))?;
    let scalar = v
        .get("query_pre_attn_scalar")
        .and_then(Value::as_f64)
        .unwrap_or(256.0);
    Ok((
        Some(scalar),
        Some(LocalAttention {
            window: window as usize,
            rope_theta: local_theta,
            layers,
        }),
    ))
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
    fn lora_targets_follow_the_familys_modules() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let phi3 = Arch::Phi3
            .lora_targets(&names(&["q_proj", "k_proj", "v_proj", "o_proj"]))
            .unwrap();
        assert_eq!(
            phi3.iter().map(|m| m.name).collect::<Vec<_>>(),
            ["qkv_proj", "o_proj"]
        );
        let all = Arch::Phi3
            .lora_targets(&names(&crate::spec::ALL_LINEAR))
            .unwrap();
        assert_eq!(all.len(), 4);
        let e = Arch::Llama.lora_targets(&names(&["qkv_proj"])).unwrap_err();
        assert!(
            e.to_string()
                .contains("\"qkv_proj\" is not a module of llama"),
            "{e}"
        );
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
