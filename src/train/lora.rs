//! The LoRA branch of an adapted linear layer, `scale · dropout(x) · Aᵀ · Bᵀ`, and its dropout
//! masks.
//!
//! As composite candle ops the branch is about ten passes over `(tokens, in)` or `(tokens, out)`
//! buffers per layer and direction (mask, multiply, two matmuls through transposed views, scale,
//! and their gradients), while its arithmetic is a rank-r sliver: measured, the four q,k,v,o
//! branches cost more than the frozen multiplies they sit on. The kernels here (CPU, float32, used
//! by the fused decoder layer) add the branch into the frozen product's buffer and its input
//! gradient into the frozen input gradient; the dropped-out input is never stored (the mask is
//! kept as one bit per element), only the `(tokens, r)` product `dropout(x)·Aᵀ` is; and every
//! multiply is split over candle's worker threads by independent output rows or columns.

use candle_core::{Device, Result, Tensor};

/// Rows (or columns) of an output one worker computes at a time.
const CHUNK: usize = 64;

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
}

impl Dropout {
    /// The mask of `n` elements.
    pub fn draw(&self, n: usize) -> DropMask {
        let threshold = (self.p * 65536.0).round() as u64;
        let mut bits = vec![0u64; n.div_ceil(64)];
        let words = bits.len();
        let ptr = SharedWords(bits.as_mut_ptr());
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
        DropMask {
            bits,
            keep: 1.0 / (1.0 - self.p) as f32,
        }
    }

    /// The mask of `n` elements as a tensor of 0 and 1/(1−p) (the composite path multiplies by it).
    pub fn mask(&self, n: usize, device: &Device) -> Result<Tensor> {
        let mut mask = vec![1f32; n];
        self.draw(n).apply(&mut mask);
        Tensor::from_vec(mask, n, device)
    }
}

impl DropMask {
    /// `x ⊙ mask` as a new buffer, in one parallel pass.
    pub fn masked_copy(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        self.combine(
            &mut out,
            x,
            |_, x, kept, keep| if kept { x * keep } else { 0.0 },
        );
        out
    }

    /// `dst += src ⊙ mask`, in one parallel pass.
    pub fn add_masked(&self, dst: &mut [f32], src: &[f32]) {
        self.combine(
            dst,
            src,
            |d, s, kept, keep| if kept { d + s * keep } else { d },
        );
    }

    /// `dst[i] = f(dst[i], src[i], kept(i), 1/(1−p))` over worker threads.
    fn combine(&self, dst: &mut [f32], src: &[f32], f: impl Fn(f32, f32, bool, f32) -> f32 + Sync) {
        let n = dst.len();
        let block = 64 * MASK_WORDS;
        let ptr = SharedMut(dst.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(block), |chunks| {
            for c in chunks {
                let (start, end) = (c * block, ((c + 1) * block).min(n));
                // SAFETY: chunk c alone touches dst[start..end].
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(ptr.ptr().add(start), end - start) };
                for (j, (d, &s)) in dst.iter_mut().zip(&src[start..end]).enumerate() {
                    let i = start + j;
                    let kept = (self.bits[i / 64] >> (i % 64)) & 1 == 0;
                    *d = f(*d, s, kept, self.keep);
                }
            }
        });
    }

    /// `data ⊙= mask`, in parallel.
    pub fn apply(&self, data: &mut [f32]) {
        let n = data.len();
        let block = 64 * MASK_WORDS;
        let ptr = SharedMut(data.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(block), |chunks| {
            for c in chunks {
                let (start, end) = (c * block, ((c + 1) * block).min(n));
                // SAFETY: chunk c alone touches data[start..end].
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(ptr.ptr().add(start), end - start) };
                for (j, v) in dst.iter_mut().enumerate() {
                    let i = start + j;
                    let dropped = (self.bits[i / 64] >> (i % 64)) & 1 == 1;
                    *v = if dropped { 0.0 } else { *v * self.keep };
                }
            }
        });
    }
}

#[derive(Clone, Copy)]
struct SharedWords(*mut u64);
unsafe impl Send for SharedWords {}
unsafe impl Sync for SharedWords {}

impl SharedWords {
    fn ptr(self) -> *mut u64 {
        self.0
    }
}

/// A raw pointer handed to the worker threads; each thread writes a disjoint part.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method, so that closures capture the wrapper (Sync) and not its raw field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Row-major matrix view: pointer, row stride, column stride (elements).
#[derive(Clone, Copy)]
struct Mat(*const f32, usize, usize);

impl Mat {
    fn at(self, row: usize, col: usize) -> Mat {
        // SAFETY (callers): offsets stay inside the buffer the view covers.
        Mat(
            unsafe { self.0.add(row * self.1 + col * self.2) },
            self.1,
            self.2,
        )
    }
    fn t(self) -> Mat {
        Mat(self.0, self.2, self.1)
    }
}

/// `dst (m×n) = alpha · lhs (m×k) · rhs (k×n)`, single-threaded.
///
/// # Safety
/// Every view must be valid for its extent, and `dst` written by no other thread.
unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: Mat,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.0 as *mut f32,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `out (m×n) = alpha · lhs · rhs`, the m rows split over candle's worker threads.
fn par_rows(m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, alpha: f32) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    par_rows_into(&mut out, false, (m, n, k), lhs, rhs, alpha);
    out
}

/// `dst (m×n) [+]= alpha · lhs · rhs`, the m rows split over candle's worker threads.
fn par_rows_into(
    dst: &mut [f32],
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    assert_eq!(dst.len(), m * n, "LoRA: output buffer size");
    let ptr = SharedMut(dst.as_mut_ptr());
    let (lhs, rhs) = (SendMat(lhs), SendMat(rhs));
    candle_core::utils::barrier_pool().execute_chunked(m.div_ceil(CHUNK), |chunks| {
        let (lhs, rhs) = (lhs.get(), rhs.get());
        for c in chunks {
            let (r0, r1) = (c * CHUNK, ((c + 1) * CHUNK).min(m));
            let dst = Mat(ptr.ptr(), n, 1);
            // SAFETY: rows r0..r1 of dst belong to this chunk; lhs rows r0..r1 exist.
            unsafe {
                gemm(
                    (r1 - r0, n, k),
                    dst.at(r0, 0),
                    accumulate,
                    lhs.at(r0, 0),
                    rhs,
                    alpha,
                )
            };
        }
    });
}

/// `out (m×n) = alpha · lhs · rhs`, the n columns split over candle's worker threads (for
/// outputs with few rows and a long inner dimension).
fn par_cols(m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, alpha: f32) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let ptr = SharedMut(out.as_mut_ptr());
    let (lhs, rhs) = (SendMat(lhs), SendMat(rhs));
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(CHUNK), |chunks| {
        let (lhs, rhs) = (lhs.get(), rhs.get());
        for c in chunks {
            let (c0, c1) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            let dst = Mat(ptr.ptr(), n, 1);
            // SAFETY: columns c0..c1 of out belong to this chunk; rhs columns c0..c1 exist.
            unsafe {
                gemm(
                    (m, c1 - c0, k),
                    dst.at(0, c0),
                    false,
                    lhs,
                    rhs.at(0, c0),
                    alpha,
                )
            };
        }
    });
    out
}

/// A read-only view handed to the worker threads.
#[derive(Clone, Copy)]
struct SendMat(Mat);
unsafe impl Send for SendMat {}
unsafe impl Sync for SendMat {}

impl SendMat {
    fn get(self) -> Mat {
        self.0
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
    let mask = dropout.map(|p| p.draw(x.len()));
    let dropped = mask.as_ref().map(|mask| mask.masked_copy(x));
    let xd = dropped.as_deref().unwrap_or(x);
    let xa = par_rows(
        m,
        d.rank,
        d.inputs,
        Mat(xd.as_ptr(), d.inputs, 1),
        Mat(a.as_ptr(), d.inputs, 1).t(),
        1.0,
    );
    par_rows_into(
        y,
        true,
        (m, d.outputs, d.rank),
        Mat(xa.as_ptr(), d.rank, 1),
        Mat(b.as_ptr(), d.rank, 1).t(),
        scale,
    );
    LoraSaved { xa, mask }
}

/// Gradients of A and B for the output gradient `g` (tokens, outputs); adds the input gradient
/// into `dx` (tokens, inputs) when one is wanted.
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
    // gb = g · B (tokens, rank)
    let gb = par_rows(
        m,
        d.rank,
        d.outputs,
        Mat(g.as_ptr(), d.outputs, 1),
        Mat(b.as_ptr(), d.rank, 1),
        1.0,
    );
    // dB = scale · gᵀ · (dropout(x)·Aᵀ)
    let db = par_rows(
        d.outputs,
        d.rank,
        m,
        Mat(g.as_ptr(), d.outputs, 1).t(),
        Mat(saved.xa.as_ptr(), d.rank, 1),
        scale,
    );
    // dA = scale · gbᵀ · dropout(x)
    let dropped = saved.mask.as_ref().map(|mask| mask.masked_copy(x));
    let xd = dropped.as_deref().unwrap_or(x);
    let da = par_cols(
        d.rank,
        d.inputs,
        m,
        Mat(gb.as_ptr(), d.rank, 1).t(),
        Mat(xd.as_ptr(), d.inputs, 1),
        scale,
    );
    drop(dropped);
    // dx += scale · (gb · A) ⊙ mask
    if let Some(dx) = dx {
        let (gb_m, a_m) = (Mat(gb.as_ptr(), d.rank, 1), Mat(a.as_ptr(), d.inputs, 1));
        match &saved.mask {
            None => par_rows_into(dx, true, (m, d.inputs, d.rank), gb_m, a_m, scale),
            Some(mask) => {
                let t = par_rows(m, d.inputs, d.rank, gb_m, a_m, scale);
                mask.add_masked(dx, &t);
            }
        }
    }
    (da, db)
}
