//! Base models, by concern:
//!
//! - [`arch`]: the families and their modules; [`config`]: a model's hyper-parameters;
//!   `hf_config`: transformers' `config.json` read and written; `rope`: rotary embeddings.
//! - `source`: where weights come from (safetensors, GGUF, the Hub) and the tensor-name maps;
//!   `load`: a base as a job names it, loaded in the job's dtype; `loader`: a [`Llama`] built
//!   from a source with fresh LoRA factors.
//! - `llama`: the decoder as a trainable candle graph; `weights`: the pieces both its forward
//!   paths share; `layer`: the fused CPU layer.
//!
//! This file only declares them and names what the rest of the engine uses.

pub mod arch;
pub mod config;
mod hf_config;
mod layer;
mod llama;
mod load;
mod loader;
mod rope;
pub(crate) mod source;
mod weights;

pub use crate::train::quant::{Kind4, QuantizedWeight};
pub use arch::Arch;
pub(crate) use arch::Proj;
pub use config::ModelConfig;
pub use llama::{DecodeRow, KvCache, Llama};
pub use load::{base_config, load_base, load_for_decoding};
pub(crate) use load::{base_shape, load_base_in};
pub(crate) use load::{BaseModel, StoredBase};
pub(crate) use rope::RopeScaling;
pub use source::gguf::{permute_rows, unpermute_rows};
pub(crate) use source::WeightSource;
pub(crate) use source::{
    gguf_tensor_name, hf_tensor_name, is_gguf_path, safetensors_files, GgufBase,
};
pub(crate) use weights::mix_seed;
pub use weights::{dropout_seed, ForwardMode, FrozenWeight};
