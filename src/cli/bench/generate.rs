//! `qtune bench-generate`: decoding speed of the engine's generation path — time to first token
//! (the prompt's prefill) and decode tokens/s, for one stream and for N streams at once, on the
//! base and with an adapter attached — and the memory of one base with many adapters over it.

use std::sync::Arc;
use std::time::Instant;

use crate::spec::LoraSpec;

use crate::train::model::{self, Llama};
use crate::train::Result;

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateBenchOptions {
    /// The model: a .gguf file or a Hugging Face folder.
    #[arg(long)]
    pub model: String,
    /// Tokens decoded per stream.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Prompt tokens prefilled before the first one.
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Concurrent streams measured besides one.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Adapters attached over the one base for the memory figure.
    #[arg(long, default_value_t = 20)]
    pub adapters: usize,
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// One stream's (time to first token, decode seconds, tokens decoded).
fn one_stream(model: &Llama, prompt: &[u32], tokens: usize) -> Result<(f64, f64, usize)> {
    let t0 = Instant::now();
    let mut cache = model.new_cache();
    let mut logits = model.forward_cached(prompt, &mut cache)?;
    let ttft = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut decoded = 0;
    for _ in 0..tokens {
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        logits = model.forward_cached(&[next], &mut cache)?;
        decoded += 1;
    }
    Ok((ttft, t1.elapsed().as_secs_f64(), decoded))
}

pub fn run(opts: &GenerateBenchOptions) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "qtune bench-generate on {} ({threads} CPU threads): {}, {} prompt tokens, {} decoded per stream",
        cpu_name(),
        opts.model,
        opts.prompt_tokens,
        opts.tokens
    );
    let before = rss_mib();
    let loaded = model::load_for_decoding(&opts.model, &LoraSpec::default())?;
    let base = Arc::new(loaded.model.with_lora(None, 0)?);
    let base_mib = rss_mib() - before;
    // a fixed prompt of ordinary text tokens, within any vocabulary of a few thousand
    let vocab = base.cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..opts.prompt_tokens as u32)
        .map(|i| (200 + i * 37) % vocab.max(1))
        .collect();
    let adapter_spec = LoraSpec::new(
        16,
        Some(32.0),
        &["q_proj", "k_proj", "v_proj", "o_proj"],
        false,
    );
    let with_adapter = Arc::new(base.with_lora(Some(&adapter_spec), 1)?);
    // warm-up: first-touch page faults and thread start-up are not decode speed
    one_stream(&base, &prompt, 4)?;
    for (label, m) in [
        ("base", &base),
        ("base + adapter (r 16, q k v o)", &with_adapter),
    ] {
        let (ttft, secs, n) = one_stream(m, &prompt, opts.tokens)?;
        println!(
            "  {label}, 1 stream: time to first token {:.0} ms, decode {:.1} tokens/s",
            ttft * 1e3,
            n as f64 / secs
        );
        let t0 = Instant::now();
        let results: Vec<Result<(f64, f64, usize)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..opts.streams)
                .map(|_| {
                    let m = m.clone();
                    let prompt = prompt.clone();
                    s.spawn(move || one_stream(&m, &prompt, opts.tokens))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let mut total = 0;
        let mut ttfts = Vec::new();
        for r in results {
            let (ttft, _, n) = r?;
            total += n;
            ttfts.push(ttft);
        }
        ttfts.sort_by(f64::total_cmp);
        println!(
            "  {label}, {} streams at once: {:.1} tokens/s in all, median time to first token {:.0} ms",
            opts.streams,
            total as f64 / wall,
            ttfts[ttfts.len() / 2] * 1e3
        );
    }
    let before_adapters = rss_mib();
    let mut views = Vec::with_capacity(opts.adapters);
    for i in 0..opts.adapters {
        views.push(base.with_lora(Some(&adapter_spec), 100 + i as u64)?);
    }
    let factors: usize = views.iter().map(|v| v.lora_bytes()).sum();
    println!(
        "  memory: the base {:.0} MiB resident; {} adapters (r 16, q k v o) over it add {:.1} MiB ({:.1} MiB of LoRA factors)",
        base_mib,
        opts.adapters,
        rss_mib() - before_adapters,
        factors as f64 / (1 << 20) as f64
    );
    Ok(())
}
