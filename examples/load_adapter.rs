//! Loading a qtune (PEFT) adapter onto its base model in Rust, and answering one prompt:
//!
//!     cargo run --release --example load_adapter -- MODEL ADAPTER_DIR "What is the capital of Peru?"
//!
//! MODEL is what the job's `base_model` was: a Hub repo id, a local Hugging Face folder or a .gguf.

use std::path::Path;

use qtune::train::{checkpoint, generate, model};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base_model, adapter, prompt] = args.as_slice() else {
        anyhow::bail!("usage: load_adapter MODEL ADAPTER_DIR PROMPT");
    };
    let adapter = Path::new(adapter);
    // The base is built with LoRA slots of the adapter's shape, then the trained factors fill them.
    let lora = checkpoint::read_lora_spec(adapter)?;
    let device = candle_core::Device::Cpu;
    let base = model::load_base(base_model, None, &lora, None, 0, &device)?;
    checkpoint::load_adapter(adapter, &base.model)?;
    println!("{}", generate::chat(&base, prompt, 48)?);
    Ok(())
}
