//! `qtune bench-generate`: decoding speed through the server's own path (`inference::Models`:
//! each base's continuous batch) — aggregate tokens/s, time to first token and the gap between
//! tokens (p50 and p99), at each number of concurrent streams, on the base, with one adapter for
//! every stream, and with a different adapter per stream — and the memory of one base with many
//! adapters over it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::ServeConfig;
use crate::inference::{Models, Served};
use crate::spec::LoraSpec;
use crate::train::generate::Sampling;
use crate::train::{Error, Result};

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
    /// Numbers of concurrent streams measured, each in one batch.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 4, 8, 16])]
    pub streams: Vec<usize>,
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

/// What one stream saw: tokens decoded, its time to first token, the gaps between its pieces.
struct Stream {
    tokens: usize,
    first: f64,
    gaps: Vec<f64>,
}

/// `streams` requests at once, the i-th through `served(i)`, each decoding `tokens` tokens.
fn measure(
    runtime: &tokio::runtime::Runtime,
    models: &Models,
    served: impl Fn(usize) -> Arc<Served>,
    prompt: &[u32],
    (streams, tokens): (usize, usize),
) -> Result<(f64, Vec<Stream>)> {
    let sampling = Sampling {
        max_tokens: tokens,
        ignore_eos: true,
        ..Sampling::default()
    };
    let start = Instant::now();
    let requests = (0..streams).map(|i| {
        let times = Arc::new(Mutex::new(Vec::new()));
        let seen = times.clone();
        let on_text = Box::new(move |_: &str, _: &[_]| {
            seen.lock()
                .expect("no panic holding it")
                .push(Instant::now());
            true
        });
        let served = served(i);
        let ticket = models
            .ticket(&served, prompt.len(), tokens, None)
            .map_err(|r| Error::Model(format!("no place for a stream: {r:?}")));
        let answer = ticket
            .map(|t| models.generate(served, prompt.to_vec(), sampling.clone(), None, t, on_text));
        async move {
            let answer = match answer {
                Ok(a) => a.await,
                Err(e) => Err(e),
            };
            (answer, times)
        }
    });
    let done = runtime.block_on(futures_util::future::join_all(requests));
    let wall = start.elapsed().as_secs_f64();
    let mut out = Vec::with_capacity(streams);
    for (answer, times) in done {
        let generation = answer?;
        let times = times.lock().expect("no panic holding it");
        let first = times.first().map_or(wall, |t| (*t - start).as_secs_f64());
        let gaps = times
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        out.push(Stream {
            tokens: generation.tokens.len(),
            first,
            gaps,
        });
    }
    Ok((wall, out))
}

/// Prints what `seen`, the streams of one measurement, saw in `wall` seconds (the rate also
/// against `one_stream`, one stream's on the base, once it is measured); returns their
/// tokens/s in all.
fn report(label: &str, seen: &[Stream], wall: f64, one_stream: Option<f64>) -> f64 {
    let tokens: usize = seen.iter().map(|s| s.tokens).sum();
    let rate = tokens as f64 / wall;
    let mut firsts: Vec<f64> = seen.iter().map(|s| s.first).collect();
    let mut gaps: Vec<f64> = seen.iter().flat_map(|s| s.gaps.iter().copied()).collect();
    println!(
        "  {label}, {} streams: {rate:.1} tokens/s in all ({}), time to first token p50 {:.0} ms p99 {:.0} ms, between tokens p50 {:.1} ms p99 {:.1} ms",
        seen.len(),
        one_stream.map_or("the one-stream reference".into(), |one| format!(
            "{:.2}x one stream on the base",
            rate / one
        )),
        quantile_ms(&mut firsts, 0.5),
        quantile_ms(&mut firsts, 0.99),
        quantile_ms(&mut gaps, 0.5),
        quantile_ms(&mut gaps, 0.99),
    );
    rate
}

/// The `q` quantile (0 to 1) of `values`, in milliseconds.
fn quantile_ms(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize] * 1e3
}

pub fn run(opts: &GenerateBenchOptions) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "qtune bench-generate on {} ({threads} CPU threads): {}, {} prompt tokens, {} decoded per stream, through the server's batch",
        cpu_name(),
        opts.model,
        opts.prompt_tokens,
        opts.tokens
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::train::Error::Model(format!("a runtime: {e}")))?;
    let most = opts.streams.iter().copied().max().unwrap_or(1).max(1);
    let mut config = ServeConfig::for_data_dir(std::env::temp_dir());
    config.max_concurrent_generations = most;
    let models = Models::new(&config, Default::default());
    let before = rss_mib();
    let base = runtime.block_on(models.base(&opts.model))?;
    let base_mib = rss_mib() - before;
    // a fixed prompt of ordinary text tokens, within any vocabulary of a few thousand
    let vocab = base.model().cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..opts.prompt_tokens as u32)
        .map(|i| (200 + i * 37) % vocab.max(1))
        .collect();
    let adapter_spec = LoraSpec::new(
        16,
        Some(32.0),
        &["q_proj", "k_proj", "v_proj", "o_proj"],
        false,
    );
    let views = (0..most)
        .map(|i| {
            let view = base
                .model()
                .with_lora(Some(&adapter_spec), 100 + i as u64)?;
            Ok(Served::adapter_view(&base, view))
        })
        .collect::<Result<Vec<_>>>()?;
    // warm-up: first-touch page faults and thread start-up are not decode speed
    measure(&runtime, &models, |_| base.clone(), &prompt, (1, 4))?;
    type Pick<'a> = Box<dyn Fn(usize) -> Arc<Served> + 'a>;
    let kinds: [(&str, Pick); 3] = [
        ("base", Box::new(|_| base.clone())),
        (
            "one adapter (r 16, q k v o)",
            Box::new(|_| views[0].clone()),
        ),
        ("an adapter per stream", Box::new(|i| views[i].clone())),
    ];
    let mut one_stream = None;
    for (label, pick) in &kinds {
        for &streams in &opts.streams {
            let (wall, seen) = measure(&runtime, &models, pick, &prompt, (streams, opts.tokens))?;
            let rate = report(label, &seen, wall, one_stream);
            if streams == 1 && *label == "base" {
                one_stream = Some(rate);
            }
        }
    }
    println!(
        "  the most streams one decode step ran: {}",
        models.largest_batch()
    );
    adapters_memory(base.model(), &adapter_spec, opts.adapters, base_mib)
}

/// Prints what `n` adapters of `spec` over `base` add to the resident memory.
fn adapters_memory(
    base: &crate::train::model::Llama,
    adapter_spec: &LoraSpec,
    n: usize,
    base_mib: f64,
) -> Result<()> {
    let before_adapters = rss_mib();
    let mut more = Vec::with_capacity(n);
    for i in 0..n {
        more.push(base.with_lora(Some(adapter_spec), 1000 + i as u64)?);
    }
    let factors: usize = more.iter().map(|v| v.lora_bytes()).sum();
    println!(
        "  memory: the base {:.0} MiB resident; {} adapters (r 16, q k v o) over it add {:.1} MiB ({:.1} MiB of LoRA factors)",
        base_mib,
        n,
        rss_mib() - before_adapters,
        factors as f64 / (1 << 20) as f64
    );
    Ok(())
}
