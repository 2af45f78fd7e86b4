//! `qtune bench`: tokens/s and peak memory of a LoRA training step at one of SmolLM2's shapes
//! (135M, 360M, 1.7B; random weights), timing the trainer's own step ([`trainer::optimizer_step`]). Comparisons
//! with PyTorch + PEFT are made side by side on one machine, with the reference scripts run in
//! the same sitting: figures from another machine are not a comparison, so none are printed here.
//! `qtune bench-api` (`api.rs`) loads the HTTP API.

pub(crate) mod api;
pub(crate) mod generate;
pub mod random_model;

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::spec::{LoraSpec, ALL_LINEAR};
use crate::train::model::{Llama, ModelConfig};
use crate::train::optim::Optimizer;
use crate::train::timing::{self, Part};
use crate::train::{data, trainer, Result};

/// The model shapes `qtune bench` measures (SmolLM2's sizes; random weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchShape {
    #[value(name = "135m")]
    Smollm2_135m,
    #[value(name = "360m")]
    Smollm2_360m,
    #[value(name = "1.7b")]
    Smollm2_1_7b,
}

impl BenchShape {
    pub fn config(self) -> ModelConfig {
        match self {
            BenchShape::Smollm2_135m => random_model::smollm2_135m_config(),
            BenchShape::Smollm2_360m => random_model::smollm2_360m_config(),
            BenchShape::Smollm2_1_7b => random_model::smollm2_1_7b_config(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            BenchShape::Smollm2_135m => "SmolLM2-135M",
            BenchShape::Smollm2_360m => "SmolLM2-360M",
            BenchShape::Smollm2_1_7b => "SmolLM2-1.7B",
        }
    }
}

/// `qtune bench`: one training step configuration at one of SmolLM2's shapes (random weights).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// The model's shape: SmolLM2-135M, -360M or -1.7B.
    #[arg(long, value_enum, default_value = "135m")]
    pub shape: BenchShape,
    /// LoRA on all seven linears instead of q,k,v,o.
    #[arg(long)]
    pub(crate) all_linear: bool,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: usize,
    /// Fewer layers for a quick look (default: all of the shape's layers).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Quantize the frozen base (QLoRA): nf4, fp4 or int8.
    #[arg(long)]
    pub quant: Option<String>,
    /// Also print one JSON object with the figures (targets, batch, seq, tokens_per_second,
    /// peak_rss_bytes, ceiling_gflops, ceiling_share, ...).
    #[arg(long)]
    pub json: bool,
    /// Recompute each layer in backward (training.gradient_checkpointing).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Frozen linear weights in bfloat16 (compute_dtype bf16; with --quant on CUDA, the dtype the
    /// base is dequantized to).
    #[arg(long)]
    pub bf16: bool,
    /// `cpu` or `cuda:N` (a build with --features cuda). On CUDA the peak device memory is
    /// sampled every 2 ms while the steps run.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The most device memory in use while it lived, sampled every 2 ms on a thread of its own (the
/// driver keeps no peak): CUDA only.
struct DeviceMemorySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl DeviceMemorySampler {
    fn start(device: &Device) -> Option<DeviceMemorySampler> {
        if device.is_cpu() {
            return None;
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, device) = (stop.clone(), device.clone());
        let thread = std::thread::spawn(move || {
            let mut peak = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(m) = crate::train::device::memory(&device) {
                    peak = peak.max(m.total.saturating_sub(m.free));
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        });
        Some(DeviceMemorySampler {
            stop,
            thread: Some(thread),
        })
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

/// Peak resident set size of this process so far, in GiB.
pub(crate) fn peak_rss_gib() -> f64 {
    crate::train::device::peak_rss_bytes() as f64 / (1u64 << 30) as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn run(opts: &BenchOptions) -> Result<()> {
    let device = crate::train::device::parse(&opts.device)?;
    if opts.bf16 && opts.quant.is_some() && device.is_cpu() {
        return Err(crate::train::Error::Model(
            "--bf16 with --quant needs a CUDA device (on the CPU a quantized base is dequantized \
             to f32)"
                .into(),
        ));
    }
    // Measured first, on an idle machine: right after the training steps candle's worker
    // threads are still spinning and the same multiply reads up to half as fast.
    let ceiling = crate::train::cost::measure_matmul_gflops(&device, 50)?;
    let bf16_ceiling = (opts.bf16 && device.is_cpu())
        .then(|| crate::kernels::onednn::matmul_gflops(1024, 1536, 576, true, 50))
        .flatten();
    let mut cfg = opts.shape.config();
    if let Some(l) = opts.layers {
        cfg.num_hidden_layers = l;
    }
    let targets = if opts.all_linear {
        &ALL_LINEAR[..]
    } else {
        &ALL_LINEAR[..4]
    };
    let lora = LoraSpec {
        dropout: 0.05,
        ..LoraSpec::new(16, Some(32.0), targets, false)
    };
    let names = lora.target_modules.clone();
    println!(
        "qtune bench on {}: {} shape ({} layers), random weights, base {}, LoRA r 16 on {}, batch {} x seq {}, AdamW, {} threads",
        opts.device,
        opts.shape.name(),
        cfg.num_hidden_layers,
        opts.quant
            .as_deref()
            .unwrap_or(if opts.bf16 { "bfloat16" } else { "float32" }),
        if opts.all_linear { "all linears" } else { "q,k,v,o" },
        opts.batch,
        opts.seq,
        candle_core::utils::get_num_threads()
    );
    let quantization = match &opts.quant {
        None => None,
        Some(kind) => Some(
            crate::spec::JobSpec::from_json(
                &serde_json::json!({"base_model": "bench", "dataset": {"url": "-"}, "quantization": {"type": kind}})
                    .to_string(),
            )?
            .quantization
            .expect("given"),
        ),
    };
    let mut weights = random_model::RandomSource {
        cfg: cfg.clone(),
        seed: 0,
    };
    let mut model = Llama::load(
        cfg.clone(),
        &mut weights,
        &lora,
        quantization.as_ref(),
        0,
        if opts.bf16 {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        },
        &device,
    )?;
    model.gradient_checkpointing = opts.gradient_checkpointing;
    let (linear_params, linear_bytes) = model
        .blocks
        .iter()
        .flat_map(|b| b.linears().map(|(_, l)| l))
        .fold((0usize, 0usize), |(p, b), l| {
            let (o, i) = match &l.weight {
                crate::train::model::FrozenWeight::Dense(w) => w.dims2().unwrap_or((0, 0)),
                crate::train::model::FrozenWeight::Quantized(q) => q.shape(),
            };
            (p + o * i, b + l.weight.bytes())
        });
    println!(
        "  base linear weights: {} ({:.3} bytes per parameter, {:.1} MiB); embeddings and norms stay float32; peak RSS after loading {:.2} GiB",
        opts.quant.as_deref().unwrap_or(if opts.bf16 { "bfloat16" } else { "float32" }),
        linear_bytes as f64 / linear_params as f64,
        linear_bytes as f64 / (1 << 20) as f64,
        peak_rss_gib()
    );
    let vars: Vec<candle_core::Var> = model.lora_vars().into_iter().map(|(_, v)| v).collect();
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let examples: Vec<data::Example> = (0..opts.batch)
        .map(|_| data::Example {
            ids: (0..=opts.seq)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect(),
            labels: vec![true; opts.seq + 1],
        })
        .collect();
    let refs: Vec<&data::Example> = examples.iter().collect();
    let batch = data::make_batch(&refs, 0, &device)?;
    let spec = crate::spec::TrainingSpec::default();
    let mut optimizer = Optimizer::new(&spec, vars.len());
    let (mut fwd, mut bwd, mut opt, mut step) = (vec![], vec![], vec![], vec![]);
    // Per measured step: seconds of each timed part, the rest, and kernel CPU time.
    let mut parts: Vec<[f64; 6]> = vec![];
    let (mut other, mut kernel) = (vec![], vec![]);
    let sampler = DeviceMemorySampler::start(&device);
    for i in 0..opts.warmup + opts.steps {
        timing::take();
        let kernel0 = timing::kernel_cpu_seconds();
        let out = trainer::optimizer_step(
            &model,
            &vars,
            &mut optimizer,
            std::slice::from_ref(&batch),
            0,
            i as u64,
            spec.learning_rate,
            spec.max_grad_norm,
        )?;
        let t = out.times;
        let total = t.forward + t.backward + t.optimizer;
        let tag = if i < opts.warmup { "warm-up" } else { "step" };
        println!(
            "  {tag} {:>2}: loss {:.4}  forward {:.2}s  backward {:.2}s  optimizer {:.3}s  total {:.2}s",
            i + 1,
            out.loss,
            t.forward,
            t.backward,
            t.optimizer,
            total
        );
        if i >= opts.warmup {
            fwd.push(t.forward);
            bwd.push(t.backward);
            opt.push(t.optimizer);
            step.push(total);
            let p = timing::take();
            other.push(total - p.iter().sum::<f64>() - t.optimizer);
            parts.push(p);
            kernel.push(timing::kernel_cpu_seconds() - kernel0);
        }
    }
    let peak_device = sampler.map(DeviceMemorySampler::peak);
    let step_s = median(&mut step);
    let tokens = (opts.batch * opts.seq) as f64;
    let tps = tokens / step_s;
    let fpt = crate::train::cost::flops_per_token(&cfg, opts.seq, &names, 16);
    let peak = peak_rss_gib();
    println!(
        "\nmedian of {} steps after {} warm-up:",
        opts.steps, opts.warmup
    );
    println!(
        "  forward {:.2}s  backward {:.2}s  optimizer {:.3}s  step {:.2}s",
        median(&mut fwd),
        median(&mut bwd),
        median(&mut opt),
        step_s
    );
    let part_s: Vec<f64> = (0..timing::PARTS.len())
        .map(|k| median(&mut parts.iter().map(|p| p[k]).collect::<Vec<_>>()))
        .collect();
    let (opt_s, rest, kernel_s) = (median(&mut opt), median(&mut other), median(&mut kernel));
    println!("  where a step goes (medians; each part timed on the thread that runs it):");
    for (part, secs) in timing::PARTS.iter().zip(&part_s) {
        if *part == Part::Dequantize && opts.quant.is_none() {
            continue;
        }
        let name = match part {
            Part::FrozenMatmul => format!(
                "{} ({})",
                timing::label(*part),
                crate::kernels::onednn::describe()
            ),
            _ => timing::label(*part).to_string(),
        };
        println!(
            "    {name:<58} {secs:>6.3}s {:>4.0}%",
            100.0 * secs / step_s
        );
    }
    println!(
        "    {:<58} {opt_s:>6.3}s {:>4.0}%",
        "optimizer (clipping + AdamW)",
        100.0 * opt_s / step_s
    );
    println!(
        "    {:<58} {rest:>6.3}s {:>4.0}%",
        "other (embedding, final norm, candle's graph)",
        100.0 * rest / step_s
    );
    println!(
        "    kernel CPU time, all threads (page faults, allocation, thread wake-ups): {kernel_s:.2}s"
    );
    println!("  trainable parameters {trainable}");
    if let Some(bytes) = peak_device {
        println!(
            "  peak device memory in use (sampled every 2 ms): {:.2} GiB",
            bytes as f64 / (1u64 << 30) as f64
        );
    }
    println!(
        "  {:<26} {:>10} {:>12} {:>22}",
        "", "tokens/s", "peak RSS", "share of f32 ceiling"
    );
    println!(
        "  {:<26} {:>10.0} {:>8.2} GiB {:>21.0}%",
        "qtune (this run)",
        tps,
        peak,
        100.0 * fpt * tps / (ceiling * 1e9)
    );
    println!(
        "  (PyTorch + PEFT: run bench/reference's scripts (scripts/compare-peft.py) at this shape in the same sitting, alternating with this command)"
    );
    println!(
        "  ({:.0} MFLOP/token; f32 matmul ceiling measured now with {}: {:.0} GFLOP/s on 1024x576x1536)",
        fpt / 1e6,
        crate::kernels::onednn::describe(),
        ceiling
    );
    if let Some(g) = bf16_ceiling {
        println!("  (bf16 matmul, same shape and library: {g:.0} GFLOP/s)");
    }
    if opts.json {
        let mut breakdown = timing::seconds_by_part(&part_s);
        breakdown.insert("optimizer".into(), opt_s.into());
        breakdown.insert("other".into(), rest.into());
        breakdown.insert("kernel_cpu".into(), kernel_s.into());
        println!(
            "{}",
            serde_json::json!({
                "shape": opts.shape.name(),
                "device": opts.device,
                "peak_device_bytes": peak_device,
                "targets": if opts.all_linear { "all-linear" } else { "q,k,v,o" },
                "batch": opts.batch,
                "seq": opts.seq,
                "quantization": opts.quant,
                "gradient_checkpointing": opts.gradient_checkpointing,
                "compute_dtype": if opts.bf16 { "bf16" } else { "f32" },
                "matmul": crate::kernels::onednn::describe(),
                "tokens_per_second": tps,
                "peak_rss_bytes": (peak * 1024.0 * 1024.0 * 1024.0) as u64,
                "ceiling_gflops": ceiling,
                "ceiling_share": fpt * tps / (ceiling * 1e9),
                "bf16_ceiling_gflops": bf16_ceiling,
                "forward_seconds": median(&mut fwd),
                "backward_seconds": median(&mut bwd),
                "optimizer_seconds": median(&mut opt),
                "breakdown_seconds": breakdown,
            })
        );
    }
    Ok(())
}
