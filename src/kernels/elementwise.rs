//! Fused elementwise kernels for the CPU in float32: SwiGLU's `silu(gate)·up` with its backward,
//! RMSNorm's backward, and an `exp` that vectorises.
//!
//! Each replaces a chain of candle ops that would each read and write a full activation buffer
//! (RMSNorm's backward as composite ops is nine passes; here it is one pass per row). Work is split
//! over candle's worker threads, and the loops are compiled three times, for AVX-512, for AVX2 +
//! FMA and for the baseline, with the choice made at run time.

use super::cpu::{par_blocks, SharedMut};

/// Elements (or rows × width) one worker handles at a time.
const BLOCK: usize = 1 << 14;

/// Compiles `$body` (a function of `$args`) for AVX-512 (F, VL), for AVX2 + FMA and for the
/// baseline, and calls the best one the CPU has.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// `e^x` to about 2 ulp, for x clamped to [−87.3, 88] (the ends of float32's normal range), written so that loops
/// over it vectorise: range reduction `x = n·ln2 + r`, a degree-6 polynomial for `e^r`, and the
/// exponent bits set directly.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.0);
    // Round to nearest with the 1.5·2^23 trick (no SSE4.1 rounding instruction needed).
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67 + r * (0.041_666_5 + r * (0.008_333_6 + r * 0.001_394_3)))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Lanes of the partial maxima and sums below: independent accumulators let the loops
/// vectorise (a single float accumulator is a serial chain the compiler may not reorder).
const LANES: usize = 16;

#[inline(always)]
fn lanes_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

/// `row = exp(row − max)`; returns the sum.
#[inline(always)]
fn exp_in_place_sum(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp(*x - max);
            *a += *x;
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

multiversion! {
    fn silu_mul_block(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

multiversion! {
    fn silu_mul_grad_block(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
        for i in 0..gate.len() {
            let (g, u, dy) = (gate[i], up[i], grad[i]);
            let s = 1.0 / (1.0 + exp(-g));
            d_up[i] = dy * g * s;
            d_gate[i] = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

multiversion! {
    fn rms_norm_grad_rows(x: &[f32], grad: &[f32], weight: &[f32], eps: f32, dx: &mut [f32]) {
        let h = weight.len();
        for ((x, g), dx) in x.chunks_exact(h).zip(grad.chunks_exact(h)).zip(dx.chunks_exact_mut(h)) {
            let mut sq = 0f32;
            let mut dot = 0f32;
            for i in 0..h {
                sq += x[i] * x[i];
                dot += g[i] * weight[i] * x[i];
            }
            let r = 1.0 / (sq / h as f32 + eps).sqrt();
            let c = r * r * r * dot / h as f32;
            for i in 0..h {
                dx[i] = r * g[i] * weight[i] - c * x[i];
            }
        }
    }
}

multiversion! {
    fn softmax_row_block(row: &mut [f32]) {
        let max = lanes_max(row);
        let sum = exp_in_place_sum(row, max);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

multiversion! {
    fn to_bf16_block(src: &[f32], dst: &mut [half::bf16]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            // Round to nearest even on the upper 16 bits; NaN stays a (quiet) NaN.
            let bits = x.to_bits();
            let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
            *d = half::bf16::from_bits(if x.is_nan() { 0x7fc0 } else { rounded });
        }
    }
}

/// `src` rounded to bfloat16 (round to nearest even), in parallel.
pub fn to_bf16(src: &[f32]) -> Vec<half::bf16> {
    let mut out = vec![half::bf16::ZERO; src.len()];
    let ptr = SharedMut::new(&mut out);
    par_blocks(src.len(), BLOCK, |s, e| {
        // SAFETY: this block alone writes out[s..e].
        let dst = unsafe { ptr.slice(s, e - s) };
        to_bf16_block(&src[s..e], dst);
    });
    out
}

multiversion! {
    fn xent_rows_block(rows: &mut [f32], vocab: usize, targets: &[u32], losses: &mut [f64], hits: &mut [bool]) {
        for (((row, &t), loss), hit) in rows.chunks_exact_mut(vocab).zip(targets).zip(losses.iter_mut()).zip(hits.iter_mut()) {
            let max = lanes_max(row);
            let target_logit = row[t as usize];
            // the target is the argmax (a tie counts as a hit)
            *hit = target_logit >= max;
            let sum = exp_in_place_sum(row, max);
            *loss = (sum.ln() + max - target_logit) as f64;
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
            row[t as usize] -= 1.0;
        }
    }
}

/// The cross-entropy of each row of `(rows, vocab)` logits against `targets`, and how many rows
/// have their target as the argmax; the logits become the gradient of each row's loss
/// (`softmax − onehot`) in place. Rows in parallel.
pub fn softmax_cross_entropy_rows(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
) -> (Vec<f64>, usize) {
    let rows = targets.len();
    assert!(
        logits.len() >= rows * vocab,
        "cross-entropy: logits shorter than rows × vocab"
    );
    let mut losses = vec![0f64; rows];
    let mut hits = vec![false; rows];
    let (lp, sp, hp) = (
        SharedMut::new(logits),
        SharedMut::new(&mut losses),
        SharedMut::new(&mut hits),
    );
    par_blocks(rows, 4, |s, e| {
        // SAFETY: this block alone writes rows s..e of the three buffers, each long enough.
        let (rows, losses, hits) = unsafe {
            (
                lp.slice(s * vocab, (e - s) * vocab),
                sp.slice(s, e - s),
                hp.slice(s, e - s),
            )
        };
        xent_rows_block(rows, vocab, &targets[s..e], losses, hits);
    });
    let correct = hits.iter().filter(|&&h| h).count();
    (losses, correct)
}

/// In-place softmax of one row.
pub fn softmax_row(row: &mut [f32]) {
    softmax_row_block(row)
}

multiversion! {
    fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let h = weight.len();
        for (x, out) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let mut acc = [0f32; LANES];
            let mut chunks = x.chunks_exact(LANES);
            for c in &mut chunks {
                for (a, &v) in acc.iter_mut().zip(c) {
                    *a += v * v;
                }
            }
            let sq = acc.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>();
            let r = 1.0 / (sq / h as f32 + eps).sqrt();
            for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
                *o = v * r * w;
            }
        }
    }
}

multiversion! {
    fn rope_rows(x: &mut [f32], first: usize, heads: usize, time: usize, cos: &[f32], sin: &[f32], sign: f32) {
        let half = cos.len() / time;
        let d = 2 * half;
        for row in 0..x.len() / d {
            // Rows are (batch, position, head) in that order.
            let pos = ((first + row) / heads) % time;
            let (c, s) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
            let (lo, hi) = x[row * d..(row + 1) * d].split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c[i] - sign * b * s[i];
                hi[i] = b * c[i] + sign * a * s[i];
            }
        }
    }
}

/// Row-wise RMSNorm of `x` (rows, h) times `weight` (h).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let h = weight.len();
    let mut out = vec![0f32; x.len()];
    let ptr = SharedMut::new(&mut out);
    par_blocks(x.len() / h, (BLOCK / h).max(1), |s, e| {
        // SAFETY: this block alone writes rows s..e.
        let out = unsafe { ptr.slice(s * h, (e - s) * h) };
        rms_norm_rows(&x[s * h..e * h], weight, eps as f32, out);
    });
    out
}

/// Input gradient of [`rms_norm`] for the output gradient `dy`.
pub fn rms_norm_grad(x: &[f32], dy: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let h = weight.len();
    let mut dx = vec![0f32; x.len()];
    let ptr = SharedMut::new(&mut dx);
    par_blocks(x.len() / h, (BLOCK / h).max(1), |s, e| {
        // SAFETY: this block alone writes rows s..e.
        let dx = unsafe { ptr.slice(s * h, (e - s) * h) };
        rms_norm_grad_rows(&x[s * h..e * h], &dy[s * h..e * h], weight, eps as f32, dx);
    });
    dx
}

/// Rotary embedding (rotate-half layout) in place on `x` (b, t, heads, d) with `cos`, `sin`
/// (t, d/2); `inverse` rotates back (the backward pass).
pub fn rope(x: &mut [f32], heads: usize, time: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    let d = 2 * cos.len() / time;
    let rows = x.len() / d;
    let sign = if inverse { -1.0 } else { 1.0 };
    let ptr = SharedMut::new(x);
    par_blocks(rows, (BLOCK / d).max(1), |s, e| {
        // SAFETY: this block alone touches rows s..e.
        let x = unsafe { ptr.slice(s * d, (e - s) * d) };
        rope_rows(x, s, heads, time, cos, sin, sign);
    });
}

/// `silu(gate) · up` on slices.
pub fn silu_mul_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    let ptr = SharedMut::new(&mut out);
    par_blocks(gate.len(), BLOCK, |s, e| {
        // SAFETY: this block alone writes out[s..e].
        let out = unsafe { ptr.slice(s, e - s) };
        silu_mul_block(&gate[s..e], &up[s..e], out);
    });
    out
}

/// Gradients of [`silu_mul_forward`] w.r.t. gate and up.
pub fn silu_mul_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = gate.len();
    let (mut d_gate, mut d_up) = (vec![0f32; n], vec![0f32; n]);
    let (pg, pu) = (SharedMut::new(&mut d_gate), SharedMut::new(&mut d_up));
    par_blocks(n, BLOCK, |s, e| {
        // SAFETY: this block alone writes [s..e] of both outputs.
        let (dg, du) = unsafe { (pg.slice(s, e - s), pu.slice(s, e - s)) };
        silu_mul_grad_block(&gate[s..e], &up[s..e], &dy[s..e], dg, du);
    });
    (d_gate, d_up)
}

/// `dst += src`, in parallel.
pub fn add_in_place(dst: &mut [f32], src: &[f32]) {
    let ptr = SharedMut::new(dst);
    par_blocks(dst.len(), BLOCK, |s, e| {
        // SAFETY: this block alone writes dst[s..e].
        let dst = unsafe { ptr.slice(s, e - s) };
        dst.iter_mut().zip(&src[s..e]).for_each(|(d, s)| *d += s);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorising `exp` of the fused kernels against the standard library's.
    #[test]
    fn fused_exp_matches_std() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (fast, exact) = (exp(x), x.exp());
            worst = worst.max(((fast - exact) / exact).abs());
        }
        assert!(worst < 1e-6, "relative error {worst}");
        let tiny = exp(-200.0);
        assert!((0.0..1e-37).contains(&tiny), "exp(-200) = {tiny}");
    }

    /// The parallel float32 → bfloat16 rounding of the bf16 matmuls agrees with the `half` crate's,
    /// bit for bit (round to nearest even, infinities, subnormals; NaN stays NaN).
    #[test]
    fn bf16_rounding_matches_half() {
        let mut values: Vec<f32> = (0..200_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .collect();
        values.extend([
            0.0,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE / 3.0,
        ]);
        values.extend([f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)]); // ties
        let ours = to_bf16(&values);
        for (x, b) in values.iter().zip(&ours) {
            if x.is_nan() {
                assert!(b.is_nan(), "{x} -> {b}");
            } else {
                assert_eq!(b.to_bits(), half::bf16::from_f32(*x).to_bits(), "{x:e}");
            }
        }
    }
}
