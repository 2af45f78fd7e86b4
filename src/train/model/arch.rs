//! The families and their modules: the seven projections of a decoder layer ([`Proj`]), the
//! architectures ([`Arch`]) and what differs between them (norms, activation, fused checkpoint
//! modules, which modules LoRA may target).

use serde::{Deserialize, Serialize};

use crate::train::error::Error;

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
    pub(crate) fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The submodule it sits in: `self_attn` or `mlp`.
    pub(crate) fn group(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// q, k or v: the projections that carry a bias where the config says `attention_bias`.
    pub(crate) fn is_qkv(self) -> bool {
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
    pub(crate) projs: &'static [Proj],
}

impl LoraModule {
    /// The submodule it sits in: `self_attn` or `mlp`.
    pub(crate) fn group(&self) -> &'static str {
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
    pub(crate) fn hf_model_type(self) -> &'static str {
        match self {
            Arch::Gemma3 => "gemma3_text",
            other => other.as_str(),
        }
    }

    /// The class transformers builds for it (config.json's `architectures`).
    pub(crate) fn hf_class(self) -> &'static str {
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
    pub(crate) fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Gemma's RMSNorms scale by `1 + w`; the checkpoint stores `w`.
    pub(crate) fn norm_adds_one(self) -> bool {
        self == Arch::Gemma3
    }

    /// Gemma multiplies the embeddings by √hidden before the first layer.
    pub(crate) fn scales_embeddings(self) -> bool {
        self == Arch::Gemma3
    }

    /// Gemma's "sandwich": a norm on the attention's and on the MLP's output before each
    /// residual add (`post_attention_layernorm`, `post_feedforward_layernorm`), the MLP's input
    /// norm then being `pre_feedforward_layernorm`.
    pub(crate) fn has_sandwich_norms(self) -> bool {
        self == Arch::Gemma3
    }

    /// The MLP's gate activation: tanh-approximated GELU (GeGLU) for Gemma, SiLU (SwiGLU) else.
    pub(crate) fn gelu_gate(self) -> bool {
        self == Arch::Gemma3
    }

    /// Whether the fused CPU layer (`layer.rs`) computes this family: the plain pre-norm SwiGLU
    /// layer with one LoRA per projection. Others run the composite graph.
    pub(crate) fn fused_layer_applies(self) -> bool {
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
    pub(crate) fn lora_targets(self, names: &[String]) -> Result<Vec<LoraModule>, Error> {
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
    pub(crate) fn llama_cpp_permutes_qk(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
