//! The LoRA branch of an adapted linear layer, `scale · dropout(x) · Aᵀ · Bᵀ`, and its dropout
//! masks.
//!
//! As composite candle ops the branch is about ten passes over `(tokens, in)` or `(tokens, out)`
//! buffers per layer and direction (mask, multiply, two matmuls through transposed views, scale,
//! and their gradients), while its arithmetic is a rank-r sliver: measured, the four q,k,v,o
//! branches cost more than the frozen multiplies they sit on. The kernels here (CPU, float32, used
//! by the fused decoder layer) add the branch into the frozen product's buffer and its input
//! gradient into the frozen input gradient; the dropped-out input is never stored (the mask is
//! kept as one bit per element), only the `(tokens, r)` product `dropout(x)·Aᵀ` is; and the work
//! goes to candle's worker threads in chunks of 64 rows that stay in cache through every step.

use super::cpu::{gemm, Mat, SharedMut};
use super::elementwise::multiversion;

/// Mask words (64 elements each) one worker draws at a time.
const MASK_WORDS: usize = 1 << 10;

/// Inverted dropout: each element kept with probability 1−p and scaled by 1/(1−p).
/// A counter-based SplitMix64 stream gives four 16-bit draws per counter (p resolved to 1/65536),
/// so any range of the mask can be drawn on its own, in parallel. The forward pass draws it once
/// as bits (one per element: 74 KB for a 1024 × 576 input) that backward reuses.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

/// Which elements a [`Dropout`] drops, one bit each (1 = dropped).
pub struct DropMask {
    bits: Vec<u64>,
    keep: f32,
    /// For each byte of mask bits, the eight multipliers (0 or 1/(1−p)) it stands for: applying
    /// the mask is then a multiply by a loaded row, which vectorises, instead of a bit test per
    /// element.
    factors: Box<[[f32; 8]; 256]>,
}

impl Dropout {
    /// The mask of `n` elements.
    pub fn draw(&self, n: usize) -> DropMask {
        let threshold = (self.p * 65536.0).round() as u64;
        let mut bits = vec![0u64; n.div_ceil(64)];
        let words = bits.len();
        let ptr = SharedMut::new(&mut bits);
        candle_core::utils::barrier_pool().execute_chunked(words.div_ceil(MASK_WORDS), |chunks| {
            for c in chunks {
                let (w0, w1) = (c * MASK_WORDS, ((c + 1) * MASK_WORDS).min(words));
                for w in w0..w1 {
                    let mut word = 0u64;
                    // Word w holds elements 64w .. 64w+63: counters 16w+1 .. 16w+16.
                    for q in 0..16u64 {
                        let counter = 16 * w as u64 + q + 1;
                        let mut z = self
                            .seed
                            .wrapping_add(counter.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                        z ^= z >> 31;
                        for lane in 0..4 {
                            let draw = (z >> (16 * lane)) & 0xffff;
                            word |= ((draw < threshold) as u64) << (4 * q + lane);
                        }
                    }
                    // SAFETY: this chunk alone writes words w0..w1.
                    unsafe { *ptr.ptr().add(w) = word };
                }
            }
        });
        let keep = 1.0 / (1.0 - self.p) as f32;
        let mut factors = Box::new([[0f32; 8]; 256]);
        for (byte, row) in factors.iter_mut().enumerate() {
            for (l, f) in row.iter_mut().enumerate() {
                *f = if (byte >> l) & 1 == 1 { 0.0 } else { keep };
            }
        }
        DropMask {
            bits,
            keep,
            factors,
        }
    }

    /// The mask of `n` elements as values 0 and 1/(1−p) (the composite path multiplies by it).
    pub fn mask_values(&self, n: usize) -> Vec<f32> {
        let mut mask = vec![1f32; n];
        self.draw(n).apply(&mut mask);
        mask
    }
}

impl DropMask {
    /// Whether element `i` is kept.
    fn kept(&self, i: usize) -> bool {
        (self.bits[i / 64] >> (i % 64)) & 1 == 0
    }

    /// The multipliers of elements `i .. i + 8`, `i` a multiple of 8.
    fn factors_at(&self, i: usize) -> &[f32; 8] {
        &self.factors[((self.bits[i / 64] >> (i % 64)) & 0xff) as usize]
    }

    /// `dst[j] = f(dst[j], src[j], multiplier of element start + j)` for all j.
    #[inline(always)]
    fn each(&self, start: usize, dst: &mut [f32], src: &[f32], f: impl Fn(&mut f32, f32, f32)) {
        let n = dst.len().min(src.len());
        let mut j = 0;
        while j < n && !(start + j).is_multiple_of(8) {
            f(
                &mut dst[j],
                src[j],
                if self.kept(start + j) { self.keep } else { 0.0 },
            );
            j += 1;
        }
        while j + 8 <= n {
            let m = self.factors_at(start + j);
            for ((d, &s), &m) in dst[j..j + 8].iter_mut().zip(&src[j..j + 8]).zip(m) {
                f(d, s, m);
            }
            j += 8;
        }
        while j < n {
            f(
                &mut dst[j],
                src[j],
                if self.kept(start + j) { self.keep } else { 0.0 },
            );
            j += 1;
        }
    }

    /// `dst = src ⊙ mask` for the elements `start .. start + src.len()`.
    fn copy_masked(&self, start: usize, src: &[f32], dst: &mut [f32]) {
        self.each(start, dst, src, |d, s, m| *d = s * m);
    }

    /// `dst += src ⊙ mask` for the elements `start .. start + src.len()`.
    fn add_masked(&self, start: usize, dst: &mut [f32], src: &[f32]) {
        self.each(start, dst, src, |d, s, m| *d += s * m);
    }

    /// `data ⊙= mask`, in parallel.
    pub fn apply(&self, data: &mut [f32]) {
        let n = data.len();
        let block = 64 * MASK_WORDS;
        let ptr = SharedMut::new(data);
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(block), |chunks| {
            for c in chunks {
                let (start, end) = (c * block, ((c + 1) * block).min(n));
                // SAFETY: chunk c alone touches data[start..end].
                let dst = unsafe { ptr.slice(start, end - start) };
                for (j, v) in dst.iter_mut().enumerate() {
                    let i = start + j;
                    let dropped = (self.bits[i / 64] >> (i % 64)) & 1 == 1;
                    *v = if dropped { 0.0 } else { *v * self.keep };
                }
            }
        });
    }
}

/// Shapes of one LoRA pair: A is (rank, inputs), B is (outputs, rank).
#[derive(Debug, Clone, Copy)]
pub struct LoraDims {
    pub rank: usize,
    pub inputs: usize,
    pub outputs: usize,
}

/// What the backward pass needs from the forward pass.
pub struct LoraSaved {
    /// `dropout(x)·Aᵀ`, (tokens, rank).
    xa: Vec<f32>,
    mask: Option<DropMask>,
}

/// Rows of `x` (and of `y`, the gradients) one work item takes through the whole branch: a
/// chunk stays in cache between the steps, so each big buffer is read (or updated) once.
const ROWS: usize = 64;

/// `y += scale · dropout(x)·Aᵀ·Bᵀ` for `x` (tokens, inputs) and `y` (tokens, outputs).
pub fn forward_into(
    y: &mut [f32],
    x: &[f32],
    (a, b): (&[f32], &[f32]),
    d: LoraDims,
    scale: f32,
    dropout: Option<Dropout>,
) -> LoraSaved {
    let m = x.len() / d.inputs;
    // the multiplies below read and write through raw strided views sized from `d`: every
    // buffer is checked against it here, so no call can reach outside them
    assert_eq!(x.len(), m * d.inputs, "LoRA: input buffer size");
    assert_eq!(y.len(), m * d.outputs, "LoRA: output buffer size");
    assert_eq!(a.len(), d.rank * d.inputs, "LoRA: A's size");
    assert_eq!(b.len(), d.outputs * d.rank, "LoRA: B's size");
    let mask = dropout.map(|p| p.draw(x.len()));
    let mut xa = vec![0f32; m * d.rank];
    let (xa_ptr, y_ptr) = (SharedMut::new(&mut xa), SharedMut::new(y));
    candle_core::utils::barrier_pool().execute_chunked(m.div_ceil(ROWS), |chunks| {
        let mut dropped = Vec::new();
        for c in chunks {
            let (r0, r1) = (c * ROWS, ((c + 1) * ROWS).min(m));
            let xs = &x[r0 * d.inputs..r1 * d.inputs];
            let lhs = match &mask {
                None => xs,
                Some(mask) => {
                    dropped.resize(xs.len(), 0.0);
                    mask.copy_masked(r0 * d.inputs, xs, &mut dropped);
                    &dropped[..]
                }
            };
            let xa_rows = Mat(xa_ptr.ptr(), d.rank, 1).at(r0, 0);
            // SAFETY: rows r0..r1 of xa and y belong to this chunk; A, B are (rank, in), (out, rank).
            unsafe {
                gemm(
                    (r1 - r0, d.rank, d.inputs),
                    xa_rows,
                    false,
                    Mat(lhs.as_ptr(), d.inputs, 1),
                    Mat(a.as_ptr(), d.inputs, 1).t(),
                    1.0,
                );
                gemm(
                    (r1 - r0, d.outputs, d.rank),
                    Mat(y_ptr.ptr(), d.outputs, 1).at(r0, 0),
                    true,
                    xa_rows,
                    Mat(b.as_ptr(), d.rank, 1).t(),
                    scale,
                );
            }
        }
    });
    LoraSaved { xa, mask }
}

/// Gradients of A and B for the output gradient `g` (tokens, outputs); adds the input gradient
/// into `dx` (tokens, inputs) when one is wanted. Each thread sums its own row chunks' share of
/// the A and B gradients (chunks dealt out round-robin, so the sums are the same every run on a
/// machine) and the shares are added in thread order.
pub fn backward(
    g: &[f32],
    x: &[f32],
    saved: &LoraSaved,
    (a, b): (&[f32], &[f32]),
    d: LoraDims,
    scale: f32,
    dx: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let m = x.len() / d.inputs;
    // as in forward_into: the raw views below are sized from `d`, so every buffer is checked
    assert_eq!(x.len(), m * d.inputs, "LoRA backward: input buffer size");
    assert_eq!(
        g.len(),
        m * d.outputs,
        "LoRA backward: output gradient size"
    );
    assert_eq!(saved.xa.len(), m * d.rank, "LoRA backward: saved x·A size");
    assert_eq!(a.len(), d.rank * d.inputs, "LoRA backward: A's size");
    assert_eq!(b.len(), d.outputs * d.rank, "LoRA backward: B's size");
    if let Some(dx) = &dx {
        assert_eq!(dx.len(), m * d.inputs, "LoRA backward: input gradient size");
    }
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    let (da_len, db_len) = (d.rank * d.inputs, d.outputs * d.rank);
    let mut da_parts = vec![0f32; threads * da_len];
    let mut db_parts = vec![0f32; threads * db_len];
    let dx_ptr = dx.map(SharedMut::new);
    let (da_ptr, db_ptr) = (SharedMut::new(&mut da_parts), SharedMut::new(&mut db_parts));
    let chunks = m.div_ceil(ROWS);
    pool.execute(|tid| {
        let mut gb = vec![0f32; ROWS * d.rank];
        let (mut dropped, mut t) = (Vec::new(), Vec::new());
        // SAFETY: thread tid alone writes its share of the partial sums.
        let da = Mat(unsafe { da_ptr.ptr().add(tid * da_len) }, d.inputs, 1);
        let db = Mat(unsafe { db_ptr.ptr().add(tid * db_len) }, d.rank, 1);
        for c in (tid..chunks).step_by(threads) {
            let (r0, r1) = (c * ROWS, ((c + 1) * ROWS).min(m));
            let rows = r1 - r0;
            let gm = Mat(g.as_ptr(), d.outputs, 1).at(r0, 0);
            let gbm = Mat(gb.as_mut_ptr(), d.rank, 1);
            let xs = &x[r0 * d.inputs..r1 * d.inputs];
            let xd = match &saved.mask {
                None => xs,
                Some(mask) => {
                    dropped.resize(xs.len(), 0.0);
                    mask.copy_masked(r0 * d.inputs, xs, &mut dropped);
                    &dropped[..]
                }
            };
            // SAFETY for the multiplies: views stay inside g, x, xa, A, B and this thread's own
            // buffers; rows r0..r1 of dx belong to this chunk.
            unsafe {
                // gb = g · B
                gemm(
                    (rows, d.rank, d.outputs),
                    gbm,
                    false,
                    gm,
                    Mat(b.as_ptr(), d.rank, 1),
                    1.0,
                );
                // dB += scale · gᵀ · (dropout(x)·Aᵀ)
                let xa = Mat(saved.xa.as_ptr(), d.rank, 1).at(r0, 0);
                gemm((d.outputs, d.rank, rows), db, true, gm.t(), xa, scale);
                // dA += scale · gbᵀ · dropout(x)
                let xdm = Mat(xd.as_ptr(), d.inputs, 1);
                gemm((d.rank, d.inputs, rows), da, true, gbm.t(), xdm, scale);
            }
            let Some(dx_ptr) = dx_ptr else {
                continue;
            };
            // dx += scale · (gb · A) ⊙ mask
            let am = Mat(a.as_ptr(), d.inputs, 1);
            let dx_rows = Mat(dx_ptr.ptr(), d.inputs, 1).at(r0, 0);
            match &saved.mask {
                None => unsafe { gemm((rows, d.inputs, d.rank), dx_rows, true, gbm, am, scale) },
                Some(mask) => {
                    t.resize(rows * d.inputs, 0.0);
                    let tm = Mat(t.as_mut_ptr(), d.inputs, 1);
                    unsafe { gemm((rows, d.inputs, d.rank), tm, false, gbm, am, scale) };
                    // SAFETY: rows r0..r1 of dx belong to this chunk.
                    let dst = unsafe { dx_ptr.slice(r0 * d.inputs, rows * d.inputs) };
                    mask.add_masked(r0 * d.inputs, dst, &t);
                }
            }
        }
    });
    let sum = |parts: Vec<f32>, len: usize| {
        let mut total = parts[..len].to_vec();
        for part in parts[len..].chunks_exact(len) {
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
        }
        total
    };
    (sum(da_parts, da_len), sum(db_parts, db_len))
}

/// One row's LoRA factors in a decode step: `A` (rank, inputs), `B` (outputs, rank), the scale.
pub type RowFactors<'a> = Option<(&'a [f32], &'a [f32], f32)>;

/// `Σ a·b` in eight independent partial sums, which the compiler keeps in one vector register
/// (a single running sum is a chain of dependent additions, one at a time).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0f32;
    for (p, q) in ca.remainder().iter().zip(cb.remainder()) {
        tail += p * q;
    }
    for (pa, pb) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += pa[k] * pb[k];
        }
    }
    let l = lanes;
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])) + tail
}

/// `y[i] += scale · x[i]·Aᵢᵀ·Bᵢᵀ` for each row `i` of a decode step that has factors (each row
/// its own adapter, or none), `x` (rows, inputs), `y` (rows, outputs): the rows in parallel, a
/// few thousand multiply-adds each.
pub fn rows_forward_into(y: &mut [f32], x: &[f32], factors: &[RowFactors], inputs: usize) {
    let rows = factors.len();
    assert_eq!(x.len(), rows * inputs, "LoRA rows: input buffer size");
    assert!(
        y.len().is_multiple_of(rows.max(1)),
        "LoRA rows: output buffer size"
    );
    let outputs = y.len() / rows.max(1);
    for (a, b, _) in factors.iter().flatten() {
        let rank = a.len() / inputs.max(1);
        assert!(
            a.len() == rank * inputs && b.len() == outputs * rank,
            "LoRA rows: factors' sizes"
        );
    }
    let y_ptr = SharedMut::new(y);
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        for i in range {
            let Some((a, b, scale)) = factors[i] else {
                continue;
            };
            // SAFETY: row i of y belongs to this item alone.
            let yi = unsafe { y_ptr.slice(i * outputs, outputs) };
            lora_row(yi, &x[i * inputs..(i + 1) * inputs], a, b, scale);
        }
    });
}

multiversion! {
    fn lora_row(y: &mut [f32], x: &[f32], a: &[f32], b: &[f32], scale: f32) {
        // plain loops, not iterator adapters: a `collect` would be compiled once, outside the
        // vector instruction set this function is compiled for
        let mut xa = vec![0f32; a.len() / x.len().max(1)];
        for (v, row) in xa.iter_mut().zip(a.chunks_exact(x.len().max(1))) {
            *v = dot(row, x) * scale;
        }
        for (o, brow) in y.iter_mut().zip(b.chunks_exact(xa.len().max(1))) {
            *o += dot(brow, &xa);
        }
    }
}
