//! Where a base model's weights come from: Hugging Face safetensors ([`safetensors`]), a
//! llama.cpp GGUF file ([`gguf`]), the Hub's cache ([`hub`]), with the tensor-name maps between
//! the two naming schemes ([`names`]). Each source hands the loader one tensor at a time by its
//! Hugging Face name.

pub(crate) mod gguf;
pub(crate) mod hub;
pub(crate) mod names;
pub(crate) mod safetensors;

use std::collections::HashMap;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use crate::train::Result;

pub(crate) use gguf::{is_gguf_path, GgufBase, GgufSource};
pub(crate) use names::{gguf_tensor_name, hf_tensor_name};
pub(crate) use safetensors::{safetensors_files, SafetensorsSource};

/// Source of named base weights in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>>;
    /// The weight in its stored quantized type, for sources that have one (GGUF).
    fn take_quantized(&mut self, _name: &str) -> Result<Option<QTensor>> {
        Ok(None)
    }
}

impl WeightSource for HashMap<String, Tensor> {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.remove(name))
    }
}
