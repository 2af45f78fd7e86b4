//! Causal grouped-query attention on the CPU, forward and backward, on plain float32 buffers
//! (the fused decoder layer calls it).
//!
//! The composite path (transpose to `(b, h, t, d)`, repeat the key/value heads, a batched matmul,
//! scale, mask, softmax, matmul, transpose back) writes about ten `(b, h, t, t)` or `(b, t, h·d)`
//! tensors per layer and keeps most of them for backward; candle's batched matmul also runs the
//! heads one after another on one core. Here the kernel reads q, k, v in the layout the projections
//! produce (`(b, t, heads, d)`, no copies), spreads `(batch, head)` pairs over candle's worker
//! threads, multiplies only the blocks at or below the diagonal, and keeps only the attention
//! probabilities for backward. Key/value heads are shared by reading them with strides, not copied.
//!
//! Inner products go through the `gemm` crate (candle's own CPU matmul) with strides, one thread
//! per `(batch, head)` pair.

/// Rows per block: the score matrix is computed in horizontal bands of this many rows, each only
/// as wide as the causal mask allows.
const BLOCK: usize = 64;

use super::cpu::{gemm, Mat, SharedMut};

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    time: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn q_row(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_row(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// The attention kernels on plain buffers, for callers that keep their own activations (the
/// fused decoder layer).
pub(crate) fn kernels(
    (batch, time, heads, kv_heads, head_dim): (usize, usize, usize, usize, usize),
    scale: f64,
    window: usize,
    example_starts: Option<std::sync::Arc<Vec<u32>>>,
) -> CausalAttention {
    CausalAttention {
        example_starts,
        dims: Dims {
            batch,
            time,
            heads,
            kv_heads,
            head_dim,
        },
        scale: scale as f32,
        window,
    }
}

pub(crate) struct CausalAttention {
    dims: Dims,
    scale: f32,
    window: usize,
    /// Packed rows: per position (b·t), the column its example starts at; a query attends to
    /// its own example's keys only. Keys before that start get probability 0, which the
    /// backward's products then carry as zeros.
    example_starts: Option<std::sync::Arc<Vec<u32>>>,
}

/// End of the row band that holds row `i`: the columns a band multiplies.
fn band_end(i: usize, time: usize) -> usize {
    ((i / BLOCK + 1) * BLOCK).min(time)
}

impl CausalAttention {
    /// Checks the buffers against the dimensions before any kernel reads them through raw
    /// pointers: with these lengths every strided view below stays inside its buffer, so no
    /// call of a safe entry can read or write out of bounds.
    fn check(&self, q: usize, k: usize, v: usize) {
        let d = self.dims;
        assert!(
            d.kv_heads > 0 && d.heads.is_multiple_of(d.kv_heads),
            "attention: {} heads over {} key/value heads",
            d.heads,
            d.kv_heads
        );
        let rows = d.batch * d.time;
        assert_eq!(q, rows * d.q_row(), "attention: q has the wrong length");
        assert_eq!(k, rows * d.kv_row(), "attention: k has the wrong length");
        assert_eq!(v, rows * d.kv_row(), "attention: v has the wrong length");
        if let Some(starts) = &self.example_starts {
            assert_eq!(
                starts.len(),
                rows,
                "attention: one example start per position"
            );
        }
    }

    /// The first key row `i` of batch row `b` may attend to.
    fn first_key(&self, b: usize, i: usize) -> usize {
        let start = self
            .example_starts
            .as_ref()
            .map_or(0, |s| s[b * self.dims.time + i] as usize);
        (i + 1).saturating_sub(self.window).max(start)
    }

    /// `(probabilities (b, heads, t, t), output (b, t, heads, d))`.
    pub(crate) fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        self.check(q.len(), k.len(), v.len());
        let d = self.dims;
        let t = d.time;
        let mut probs = vec![0f32; d.batch * d.heads * t * t];
        let mut out = vec![0f32; d.batch * t * d.q_row()];
        let (probs_ptr, out_ptr) = (SharedMut::new(&mut probs), SharedMut::new(&mut out));
        candle_core::utils::barrier_pool().execute_chunked(d.batch * d.heads, |items| {
            for item in items {
                let (b, h) = (item / d.heads, item % d.heads);
                let kv = h / d.group();
                let qm = Mat(q.as_ptr(), d.q_row(), 1).at(b * t, h * d.head_dim);
                let km = Mat(k.as_ptr(), d.kv_row(), 1).at(b * t, kv * d.head_dim);
                let vm = Mat(v.as_ptr(), d.kv_row(), 1).at(b * t, kv * d.head_dim);
                // SAFETY: item (b, h) owns probs[item] and the h columns of out's batch b.
                let p = Mat(unsafe { probs_ptr.ptr().add(item * t * t) }, t, 1);
                let o = Mat(out_ptr.ptr(), d.q_row(), 1).at(b * t, h * d.head_dim);
                for r0 in (0..t).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(t);
                    // SAFETY: all within the (t×t) and (t×d) views above.
                    unsafe {
                        gemm(
                            (r1 - r0, r1, d.head_dim),
                            p.at(r0, 0),
                            false,
                            qm.at(r0, 0),
                            km.t(),
                            self.scale,
                        )
                    };
                }
                for i in 0..t {
                    // SAFETY: row i of this item's probabilities.
                    let row = unsafe { probs_ptr.slice(item * t * t + i * t, t) };
                    softmax_row(row, self.first_key(b, i), i + 1);
                }
                for r0 in (0..t).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(t);
                    // SAFETY: as above.
                    unsafe {
                        gemm(
                            (r1 - r0, d.head_dim, r1),
                            o.at(r0, 0),
                            false,
                            p.at(r0, 0),
                            vm,
                            1.0,
                        )
                    };
                }
            }
        });
        (probs, out)
    }

    /// Gradients of q, k, v given the output gradient `go` `(b, t, heads, d)`.
    pub(crate) fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        probs: &[f32],
        go: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        self.check(q.len(), k.len(), v.len());
        let (batch, heads, time) = (self.dims.batch, self.dims.heads, self.dims.time);
        assert_eq!(
            probs.len(),
            batch * heads * time * time,
            "attention: probabilities' length"
        );
        assert_eq!(go.len(), q.len(), "attention: output gradient's length");
        let d = self.dims;
        let t = d.time;
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        let ptrs = (
            SharedMut::new(&mut dq),
            SharedMut::new(&mut dk),
            SharedMut::new(&mut dv),
        );
        // One item per (batch, key/value head): the heads sharing it add into the same dk, dv.
        candle_core::utils::barrier_pool().execute_chunked(d.batch * d.kv_heads, |items| {
            let (dq_ptr, dk_ptr, dv_ptr) = ptrs;
            let mut ds = vec![0f32; t * t];
            for item in items {
                let (b, kv) = (item / d.kv_heads, item % d.kv_heads);
                let km = Mat(k.as_ptr(), d.kv_row(), 1).at(b * t, kv * d.head_dim);
                let vm = Mat(v.as_ptr(), d.kv_row(), 1).at(b * t, kv * d.head_dim);
                let dkm = Mat(dk_ptr.ptr(), d.kv_row(), 1).at(b * t, kv * d.head_dim);
                let dvm = Mat(dv_ptr.ptr(), d.kv_row(), 1).at(b * t, kv * d.head_dim);
                let dsm = Mat(ds.as_mut_ptr(), t, 1);
                for h in kv * d.group()..(kv + 1) * d.group() {
                    let qm = Mat(q.as_ptr(), d.q_row(), 1).at(b * t, h * d.head_dim);
                    let gom = Mat(go.as_ptr(), d.q_row(), 1).at(b * t, h * d.head_dim);
                    let dqm = Mat(dq_ptr.ptr(), d.q_row(), 1).at(b * t, h * d.head_dim);
                    let p_off = (b * d.heads + h) * t * t;
                    let pm = Mat(probs[p_off..].as_ptr(), t, 1);
                    // SAFETY for every gemm below: views stay inside their buffers; this item
                    // alone writes dk, dv of (b, kv), dq of its heads, and its own ds.
                    for r0 in (0..t).step_by(BLOCK) {
                        let r1 = (r0 + BLOCK).min(t);
                        // dP = dO · Vᵀ
                        unsafe {
                            gemm(
                                (r1 - r0, r1, d.head_dim),
                                dsm.at(r0, 0),
                                false,
                                gom.at(r0, 0),
                                vm.t(),
                                1.0,
                            )
                        };
                    }
                    for i in 0..t {
                        let end = band_end(i, t);
                        let p = &probs[p_off + i * t..p_off + i * t + end];
                        let row = &mut ds[i * t..i * t + end];
                        // dS = P ⊙ (dP − Σⱼ P·dP) · scale; masked entries have P = 0.
                        let dot: f32 = p.iter().zip(row.iter()).map(|(p, g)| p * g).sum();
                        for (g, p) in row.iter_mut().zip(p) {
                            *g = p * (*g - dot) * self.scale;
                        }
                    }
                    for r0 in (0..t).step_by(BLOCK) {
                        let r1 = (r0 + BLOCK).min(t);
                        // dQ = dS · K
                        unsafe {
                            gemm(
                                (r1 - r0, d.head_dim, r1),
                                dqm.at(r0, 0),
                                false,
                                dsm.at(r0, 0),
                                km,
                                1.0,
                            )
                        };
                        // dK += dSᵀ · Q and dV += Pᵀ · dO over the rows at or below the band.
                        unsafe {
                            gemm(
                                (r1 - r0, d.head_dim, t - r0),
                                dkm.at(r0, 0),
                                true,
                                dsm.at(r0, r0).t(),
                                qm.at(r0, 0),
                                1.0,
                            );
                            gemm(
                                (r1 - r0, d.head_dim, t - r0),
                                dvm.at(r0, 0),
                                true,
                                pm.at(r0, r0).t(),
                                gom.at(r0, 0),
                                1.0,
                            );
                        }
                    }
                }
            }
        });
        (dq, dk, dv)
    }
}

/// In-place softmax of `row[lo..hi]`; the rest of the row becomes 0.
fn softmax_row(row: &mut [f32], lo: usize, hi: usize) {
    super::elementwise::softmax_row(&mut row[lo..hi]);
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}
