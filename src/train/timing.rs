//! Where a training step's time goes, for the benchmark's breakdown and `qtune train`'s summary.
//!
//! The engine's own kernels time themselves into a few counters (an atomic add per call; nothing
//! reads them during training). Times are exclusive: a scope nested in another on the same thread
//! (the vocabulary matmul inside the loss, a matmul after dequantization) counts only for itself.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The parts of a step that are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Multiplies by frozen base weights (forward, input gradient, vocabulary projection).
    FrozenMatmul,
    /// Unpacking quantized base weights before they are multiplied.
    Dequantize,
    /// The fused causal attention op, forward and backward.
    Attention,
    /// The fused LoRA branches, forward and backward.
    Lora,
    /// Fused elementwise kernels (SiLU·up, RMSNorm backward).
    Elementwise,
    /// Softmax and cross-entropy over the vocabulary (its matmuls are `FrozenMatmul`).
    Loss,
}

pub const PARTS: [Part; 6] = [
    Part::FrozenMatmul,
    Part::Dequantize,
    Part::Attention,
    Part::Lora,
    Part::Elementwise,
    Part::Loss,
];

static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

thread_local! {
    /// Nanoseconds spent in timed scopes nested in the current one, on this thread.
    static NESTED: Cell<u64> = const { Cell::new(0) };
}

/// Runs `f`, adding its time (less that of timed scopes inside it) to `part`.
pub fn scope<T>(part: Part, f: impl FnOnce() -> T) -> T {
    let outer = NESTED.with(|n| n.replace(0));
    let t0 = Instant::now();
    let out = f();
    let total = t0.elapsed().as_nanos() as u64;
    let inner = NESTED.with(|n| n.get());
    NANOS[part as usize].fetch_add(total.saturating_sub(inner), Ordering::Relaxed);
    NESTED.with(|n| n.set(outer + total));
    out
}

/// Seconds per part since the last call, in [`PARTS`] order; resets the counters.
pub fn take() -> [f64; 6] {
    PARTS.map(|p| NANOS[p as usize].swap(0, Ordering::Relaxed) as f64 * 1e-9)
}

/// Human name of a part, as the benchmark prints it.
pub fn label(part: Part) -> &'static str {
    match part {
        Part::FrozenMatmul => "frozen matmuls",
        Part::Dequantize => "dequantize",
        Part::Attention => "attention",
        Part::Lora => "LoRA branches",
        Part::Elementwise => "fused elementwise",
        Part::Loss => "loss softmax + cross-entropy",
    }
}

/// A part's name as a JSON key (`bench --json`'s `breakdown_seconds`, `qtune train`'s
/// `seconds_by_part`).
pub fn key(part: Part) -> &'static str {
    match part {
        Part::FrozenMatmul => "frozen_matmul",
        Part::Dequantize => "dequantize",
        Part::Attention => "attention",
        Part::Lora => "lora",
        Part::Elementwise => "elementwise",
        Part::Loss => "loss",
    }
}

/// Seconds per part (in [`PARTS`] order) as a JSON object keyed by [`key`].
pub fn seconds_by_part(seconds: &[f64]) -> serde_json::Map<String, serde_json::Value> {
    PARTS
        .iter()
        .zip(seconds)
        .map(|(&p, &s)| (key(p).to_string(), s.into()))
        .collect()
}

/// CPU seconds this process has spent in the kernel (page faults, thread wake-ups, allocation
/// system calls), all threads together; Linux only (0 elsewhere).
pub fn kernel_cpu_seconds() -> f64 {
    // /proc/self/stat: field 15 is stime in clock ticks (100 per second on Linux).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after_name = &s[s.rfind(')')? + 2..];
            after_name.split_whitespace().nth(12)?.parse::<f64>().ok()
        })
        .map(|ticks| ticks / 100.0)
        .unwrap_or(0.0)
}
