//! The CPU kernels: plain slices in, plain vectors out, no candle types (the graph ops that wrap
//! them live in `train::ops` and `train::model::layer`). They split work over candle's worker
//! threads (its pool is the only thing of candle's they use) and write through raw pointers only
//! into parts no other thread touches; every public entry checks the lengths of the buffers it
//! reads and writes against the dimensions it is given before any raw view is made, so no call
//! can reach outside them.
//!
//! `attention` (causal grouped-query attention, forward and backward, block-diagonal for packed
//! rows), `decode` (a decode step's queries against each sequence's cache), `lora` (the LoRA
//! branch and its dropout masks, and a decode step's rows each through its own adapter),
//! `elementwise` (RMSNorm, RoPE, SiLU·up, softmax with cross-entropy, bf16 rounding; AVX2 +
//! fallback), `unpack` (4-bit weights), `qdot` (GGUF weight blocks times a decode batch's rows,
//! each block unpacked once for the rows),
//! `onednn` (oneDNN's matmul primitive, loaded at run time), `cpu` (what they share: output
//! pointers for worker threads, strided views, the `gemm` crate's multiply).

pub mod attention;
pub(crate) mod cpu;
pub mod decode;
pub mod elementwise;
pub mod lora;
pub mod onednn;
pub mod qdot;
pub mod unpack;
