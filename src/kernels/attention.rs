//! Causal grouped-query attention on the CPU, forward and backward, on plain float32 buffers
//! (the fused decoder layer calls it).
//!
//! The composite path (transpose to `(b, h, t, d)`, repeat the key/value heads, a batched matmul,
//! scale, mask, softmax, matmul, transpose back) writes about ten `(b, h, t, t)` or `(b, t, h·d)`
//! tensors per layer and keeps most of them for backward; candle's batched matmul also runs the
//! heads one after another on one core. Here the kernel reads q, k, v in the layout the projections
//! produce (`(b, t, heads, d)`, no copies), spreads `(segment, head)` pairs over candle's worker
//! threads (a segment is a row, or in packed rows one example: its cost and its probabilities
//! grow with its own length squared, not the row's), multiplies only the blocks at or below the
//! diagonal (under a sliding window, only from the first key a band can see), and keeps only the
//! attention probabilities for backward. Key/value heads are shared by reading them with
//! strides, not copied.
//!
//! Inner products go through the `gemm` crate (candle's own CPU matmul) with strides, one thread
//! per `(batch, head)` pair. With `bf16` products (a job's `compute_dtype: "bf16"`) the six
//! products run instead as batched bf16 multiplies through oneDNN (AMX or AVX-512 BF16,
//! accumulating in f32) on head-major bf16 copies, as PyTorch's CPU autocast runs them; softmax
//! and its gradient stay f32 (see `forward_bf16`).

/// Rows per block: the score matrix is computed in horizontal bands of this many rows, each only
/// as wide as the causal mask allows.
const BLOCK: usize = 64;

use super::cpu::{gemm, matmul_batched_bf16, par_blocks, Mat, SharedMut};
use super::elementwise::to_bf16;
use super::onednn::View;

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

    /// A `(b, t, heads, d)` buffer summed over each group of heads that shares a key/value
    /// head: `(b, t, kv_heads, d)`.
    fn sum_groups(&self, per_head: &[f32]) -> Vec<f32> {
        let g = self.group();
        if g == 1 {
            return per_head.to_vec();
        }
        let group_len = g * self.head_dim;
        let mut out = vec![0f32; per_head.len() / g];
        for (o, heads) in out
            .chunks_exact_mut(self.head_dim)
            .zip(per_head.chunks_exact(group_len))
        {
            for head in heads.chunks_exact(self.head_dim) {
                o.iter_mut().zip(head).for_each(|(o, x)| *o += x);
            }
        }
        out
    }
}

/// Which keys each query of packed rows sees: those of its own example, up to itself, less a
/// span of that example it may hide. A preference pair whose answers share their prompt is one
/// example laid out as prompt, chosen answer, rejected answer: the rejected answer's positions
/// hide the chosen answer's, and so see what they would see alone after the prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Packing {
    /// Per position (`b·t`, row-major), the column its example starts at.
    pub starts: Vec<u32>,
    /// Per position, the columns `[from, to)` it does not see, counted from its example's start
    /// (`from == to`: none); empty when no position hides any.
    pub hidden: Vec<[u32; 2]>,
}

impl Packing {
    /// The columns, counted from its example's start, that position `p` does not see.
    pub fn hidden_at(&self, p: usize) -> Option<(usize, usize)> {
        let [from, to] = *self.hidden.get(p)?;
        (from < to).then_some((from as usize, to as usize))
    }

    /// Position `p`'s place in its own sequence (its RoPE position), with rows `t` long: its
    /// distance from its example's start, less the columns it does not see.
    pub fn position(&self, p: usize, t: usize) -> usize {
        let hidden = self.hidden_at(p).map_or(0, |(from, to)| to - from);
        p % t - self.starts[p] as usize - hidden
    }
}

/// The attention kernels on plain buffers, for callers that keep their own activations (the
/// fused decoder layer).
pub(crate) fn kernels(
    (batch, time, heads, kv_heads, head_dim): (usize, usize, usize, usize, usize),
    scale: f64,
    window: usize,
    packing: Option<std::sync::Arc<Packing>>,
    bf16: bool,
) -> CausalAttention {
    CausalAttention {
        hidden: packing
            .as_ref()
            .filter(|p| !p.hidden.is_empty())
            .map(|p| (p.clone(), 0)),
        packing,
        bf16,
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
    /// Packed rows: a query attends to its own example's keys only, each example being a
    /// segment of its own.
    packing: Option<std::sync::Arc<Packing>>,
    /// The packing whose spans these rows hide, and where this view's first position is in it
    /// (a segment run [`CausalAttention::alone`] keeps its example's hidden spans).
    hidden: Option<(std::sync::Arc<Packing>, usize)>,
    /// The products in bf16 through oneDNN (when it is in use).
    bf16: bool,
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
        if let Some(packing) = &self.packing {
            let starts = &packing.starts;
            assert_eq!(
                starts.len(),
                rows,
                "attention: one example start per position"
            );
            assert!(
                packing.hidden.is_empty() || packing.hidden.len() == rows,
                "attention: one hidden span per position"
            );
            // a position hides only columns of its own example before itself
            for (p, &start) in starts.iter().enumerate() {
                if let Some((_, to)) = packing.hidden_at(p) {
                    assert!(
                        to <= p % d.time - start as usize,
                        "attention: position {p} hides columns after itself"
                    );
                }
            }
            // each example is a run of positions that all name the run's first column
            for row in starts.chunks_exact(d.time) {
                assert!(
                    row.iter()
                        .enumerate()
                        .all(|(i, &s)| (i > 0 && s == row[i - 1]) || s as usize == i),
                    "attention: example starts must be runs that each begin at their own column"
                );
            }
        }
    }

    /// The first key position `i` of a segment may attend to, counted within the segment.
    fn window_start(&self, i: usize) -> usize {
        (i + 1).saturating_sub(self.window)
    }

    /// The independent runs of positions, longest first (so that the work items the threads
    /// pick up in order finish together): each row whole, or in packed rows each example and
    /// the padding after the last one.
    fn segments(&self) -> Vec<Segment> {
        let (t, mut segments) = (self.dims.time, Vec::new());
        for b in 0..self.dims.batch {
            let mut start = 0;
            while start < t {
                let end = match &self.packing {
                    Some(p) => (start + 1..t)
                        .find(|&i| p.starts[b * t + i] as usize != start)
                        .unwrap_or(t),
                    None => t,
                };
                segments.push(Segment {
                    row: b * t + start,
                    len: end - start,
                    probs_at: 0,
                });
                start = end;
            }
        }
        segments.sort_by_key(|s| std::cmp::Reverse(s.len));
        let mut at = 0;
        for s in &mut segments {
            s.probs_at = at;
            at += self.dims.heads * s.len * s.len;
        }
        segments
    }

    /// Length of the probabilities [`CausalAttention::forward`] returns.
    fn probs_len(&self) -> usize {
        let heads = self.dims.heads;
        self.segments().iter().map(|s| heads * s.len * s.len).sum()
    }

    /// The kernels of a segment alone: one row as long as it, nothing packed but the spans its
    /// positions hide.
    fn alone(&self, seg: &Segment) -> CausalAttention {
        CausalAttention {
            dims: Dims {
                batch: 1,
                time: seg.len,
                ..self.dims
            },
            packing: None,
            hidden: self
                .hidden
                .as_ref()
                .map(|(p, at)| (p.clone(), at + seg.row)),
            ..*self
        }
    }

    /// Softmax of `row`, the scores of this view's position `p` (`row` its own example's, the
    /// example's first column at 0), over the keys `lo..hi` less those `p` hides.
    fn softmax(&self, row: &mut [f32], lo: usize, hi: usize, p: usize) {
        let hole = self.hidden.as_ref().and_then(|(h, at)| h.hidden_at(at + p));
        match hole {
            None => softmax_row(row, lo, hi),
            Some((from, to)) => {
                row[from..to].fill(f32::NEG_INFINITY);
                softmax_row(row, lo, hi);
                // exp's clamp leaves ~1e-38 there: hidden keys get exactly nothing
                row[from..to].fill(0.0);
            }
        }
    }

    /// `(probabilities, output (b, t, heads, d))`: the probabilities of each segment's heads,
    /// `len × len` each, in [`CausalAttention::segments`]' order (unpacked, `(b, heads, t, t)`).
    pub(crate) fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        self.check(q.len(), k.len(), v.len());
        if self.bf16 {
            return self.forward_bf16(q, k, v);
        }
        let d = self.dims;
        let segments = self.segments();
        let mut probs = vec![0f32; self.probs_len()];
        let mut out = vec![0f32; d.batch * d.time * d.q_row()];
        let (probs_ptr, out_ptr) = (SharedMut::new(&mut probs), SharedMut::new(&mut out));
        candle_core::utils::barrier_pool().execute_chunked(segments.len() * d.heads, |items| {
            for item in items {
                let (seg, h) = (segments[item / d.heads], item % d.heads);
                let (n, kv) = (seg.len, h / d.group());
                let qm = Mat(q.as_ptr(), d.q_row(), 1).at(seg.row, h * d.head_dim);
                let km = Mat(k.as_ptr(), d.kv_row(), 1).at(seg.row, kv * d.head_dim);
                let vm = Mat(v.as_ptr(), d.kv_row(), 1).at(seg.row, kv * d.head_dim);
                let p_at = seg.probs_at + h * n * n;
                // SAFETY: item (segment, h) owns its n×n probabilities and the h columns of
                // out's segment rows.
                let p = Mat(unsafe { probs_ptr.ptr().add(p_at) }, n, 1);
                let o = Mat(out_ptr.ptr(), d.q_row(), 1).at(seg.row, h * d.head_dim);
                // SAFETY: all within the (n×n) and (n×d) views above.
                unsafe { self.band_scores(n, p, qm, km, self.scale) };
                for i in 0..n {
                    // SAFETY: row i of this item's probabilities.
                    let row = unsafe { probs_ptr.slice(p_at + i * n, n) };
                    self.softmax(row, self.window_start(i), i + 1, seg.row + i);
                }
                // SAFETY: as above.
                unsafe { self.band_rows(n, o, p, vm) };
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
        assert_eq!(
            probs.len(),
            self.probs_len(),
            "attention: probabilities' length"
        );
        assert_eq!(go.len(), q.len(), "attention: output gradient's length");
        if self.bf16 {
            return self.backward_bf16(q, k, v, probs, go);
        }
        let d = self.dims;
        let segments = self.segments();
        let longest = segments.first().map_or(0, |s| s.len);
        // one item per (segment, head), each head's key and value gradients in its own columns
        // (laid out as q), summed over the group's heads afterwards: the threads share the
        // work evenly even when one segment holds most of it
        let mut dq = vec![0f32; q.len()];
        let mut dk_heads = vec![0f32; q.len()];
        let mut dv_heads = vec![0f32; q.len()];
        let ptrs = (
            SharedMut::new(&mut dq),
            SharedMut::new(&mut dk_heads),
            SharedMut::new(&mut dv_heads),
        );
        candle_core::utils::barrier_pool().execute_chunked(segments.len() * d.heads, |items| {
            let (dq_ptr, dk_ptr, dv_ptr) = ptrs;
            let mut ds = vec![0f32; longest * longest];
            for item in items {
                let (seg, h) = (segments[item / d.heads], item % d.heads);
                let (n, kv) = (seg.len, h / d.group());
                let at = |m: *const f32, row_len: usize, col: usize| {
                    Mat(m, row_len, 1).at(seg.row, col * d.head_dim)
                };
                let (km, vm) = (
                    at(k.as_ptr(), d.kv_row(), kv),
                    at(v.as_ptr(), d.kv_row(), kv),
                );
                let (qm, gom) = (at(q.as_ptr(), d.q_row(), h), at(go.as_ptr(), d.q_row(), h));
                let dqm = at(dq_ptr.ptr(), d.q_row(), h);
                let dkm = at(dk_ptr.ptr(), d.q_row(), h);
                let dvm = at(dv_ptr.ptr(), d.q_row(), h);
                let p_at = seg.probs_at + h * n * n;
                let pm = Mat(probs[p_at..].as_ptr(), n, 1);
                let dsm = Mat(ds.as_mut_ptr(), n, 1);
                // SAFETY for every gemm below: views stay inside their buffers; this item alone
                // writes the h columns of its segment's rows of dq, dk_heads, dv_heads, and its
                // own ds.
                // dP = dO · Vᵀ
                unsafe { self.band_scores(n, dsm, gom, vm, 1.0) };
                for i in 0..n {
                    let (c0, end) = (self.window_start(i - i % BLOCK), band_end(i, n));
                    let p = &probs[p_at + i * n + c0..p_at + i * n + end];
                    let row = &mut ds[i * n..i * n + end];
                    // columns before the band's first key hold an earlier item's numbers: the
                    // dK product below may read them, as zeros
                    row[..c0].fill(0.0);
                    // masked entries have P = 0
                    softmax_grad_row(&mut row[c0..], p, self.scale);
                }
                // dQ = dS · K
                unsafe { self.band_rows(n, dqm, dsm, km) };
                for r0 in (0..n).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(n);
                    // dK = dSᵀ · Q and dV = Pᵀ · dO over the rows at or below the band that see
                    // any of its keys
                    let q_end = (r1 - 1).saturating_add(self.window).min(n);
                    unsafe {
                        gemm(
                            (r1 - r0, d.head_dim, q_end - r0),
                            dkm.at(r0, 0),
                            false,
                            dsm.at(r0, r0).t(),
                            qm.at(r0, 0),
                            1.0,
                        );
                        gemm(
                            (r1 - r0, d.head_dim, q_end - r0),
                            dvm.at(r0, 0),
                            false,
                            pm.at(r0, r0).t(),
                            gom.at(r0, 0),
                            1.0,
                        );
                    }
                }
            }
        });
        (dq, d.sum_groups(&dk_heads), d.sum_groups(&dv_heads))
    }
}

/// The float32 products on causal bands: a band of `BLOCK` rows multiplies only from its first
/// row's first visible key to its last row (under a sliding window, the blocks no row of the band
/// can see are skipped).
impl CausalAttention {
    /// `scores (n × n) = alpha · a · bᵀ` on the bands, `a`, `b` `(n × d)`: Q·Kᵀ, dO·Vᵀ.
    ///
    /// # Safety
    /// Every view must be valid for its extent, and `scores` written by no other thread meanwhile.
    unsafe fn band_scores(&self, n: usize, scores: Mat, a: Mat, b: Mat, alpha: f32) {
        for r0 in (0..n).step_by(BLOCK) {
            let (r1, c0) = ((r0 + BLOCK).min(n), self.window_start(r0));
            let dims = (r1 - r0, r1 - c0, self.dims.head_dim);
            unsafe {
                gemm(
                    dims,
                    scores.at(r0, c0),
                    false,
                    a.at(r0, 0),
                    b.at(c0, 0).t(),
                    alpha,
                )
            };
        }
    }

    /// `out (n × d) = scores · m` on the bands, `m` `(n × d)`: P·V, dS·K.
    ///
    /// # Safety
    /// As [`CausalAttention::band_scores`], for `out`.
    unsafe fn band_rows(&self, n: usize, out: Mat, scores: Mat, m: Mat) {
        for r0 in (0..n).step_by(BLOCK) {
            let (r1, c0) = ((r0 + BLOCK).min(n), self.window_start(r0));
            let dims = (r1 - r0, self.dims.head_dim, r1 - c0);
            unsafe {
                gemm(
                    dims,
                    out.at(r0, 0),
                    false,
                    scores.at(r0, c0),
                    m.at(c0, 0),
                    1.0,
                )
            };
        }
    }
}

/// A run of one row's positions that attend only among themselves.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Its first position, as a row of the `(b·t, ·)` buffers.
    row: usize,
    len: usize,
    /// Where its heads' probabilities start.
    probs_at: usize,
}

/// bf16 products. oneDNN's fast bf16 kernels (brgemm) take dense matrices only, so each product
/// runs on whole `t × t` score matrices of head-major copies (`(b, heads, t, d)`; in packed rows
/// one segment's at a time), not on the causal bands the f32 path multiplies: about twice the
/// arithmetic, at the bf16 kernels' rate.
/// Grouped heads share their key/value head by a broadcast batch dimension in the forward
/// products, and are summed in the backward ones by multiplying along the group: the group's
/// transposed score gradients side by side (`t × group·t`) times its queries stacked
/// (`group·t × d`). Softmax and its gradient stay f32, rounded to bf16 afterwards in one
/// vectorised pass.
impl CausalAttention {
    /// [`CausalAttention::forward`] with its products in bf16: the rows at once, or in packed
    /// rows each segment on its own (its own length's products; they vary, and oneDNN keeps
    /// the primitives it made).
    fn forward_bf16(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        if self.packing.is_none() {
            return self.forward_bf16_rows(q, k, v);
        }
        let (qw, kw) = (self.dims.q_row(), self.dims.kv_row());
        let mut probs = Vec::with_capacity(self.probs_len());
        let mut out = vec![0f32; q.len()];
        // in probs_at order: each segment's probabilities follow the previous one's
        for seg in self.segments() {
            let span = |width: usize| seg.row * width..(seg.row + seg.len) * width;
            let (p, o) =
                self.alone(&seg)
                    .forward_bf16_rows(&q[span(qw)], &k[span(kw)], &v[span(kw)]);
            debug_assert_eq!(probs.len(), seg.probs_at);
            probs.extend_from_slice(&p);
            out[span(qw)].copy_from_slice(&o);
        }
        (probs, out)
    }

    /// [`CausalAttention::forward_bf16`] of whole rows.
    fn forward_bf16_rows(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let d = self.dims;
        let t = d.time;
        let (qh, kh) = (
            heads_major_bf16(q, d, d.heads),
            heads_major_bf16(k, d, d.kv_heads),
        );
        // S = Q·Kᵀ
        let mut probs = d.times_shared(&qh, &kh, true);
        drop((qh, kh));
        let probs_ptr = SharedMut::new(&mut probs);
        candle_core::utils::barrier_pool().execute_chunked(d.batch * d.heads, |items| {
            for item in items {
                for i in 0..t {
                    // SAFETY: item (b, h) alone touches its t×t probabilities.
                    let row = unsafe { probs_ptr.slice(item * t * t + i * t, t) };
                    let lo = self.window_start(i);
                    row[lo..=i].iter_mut().for_each(|s| *s *= self.scale);
                    self.softmax(row, lo, i + 1, item / d.heads * t + i);
                }
            }
        });
        let p16 = to_bf16(&probs);
        // O = P·V, head-major, then back to (b, t, heads, d)
        let vh = heads_major_bf16(v, d, d.kv_heads);
        let out = d.times_shared(&p16, &vh, false);
        (probs, heads_minor(&out, d, d.heads))
    }

    /// [`CausalAttention::backward`] with its products in bf16, as the forward ran them.
    fn backward_bf16(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        probs: &[f32],
        go: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        if self.packing.is_none() {
            return self.backward_bf16_rows(q, k, v, probs, go);
        }
        let (qw, kw, heads) = (self.dims.q_row(), self.dims.kv_row(), self.dims.heads);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        for seg in self.segments() {
            let span = |width: usize| seg.row * width..(seg.row + seg.len) * width;
            let (sq, sk, sv) = self.alone(&seg).backward_bf16_rows(
                &q[span(qw)],
                &k[span(kw)],
                &v[span(kw)],
                &probs[seg.probs_at..seg.probs_at + heads * seg.len * seg.len],
                &go[span(qw)],
            );
            dq[span(qw)].copy_from_slice(&sq);
            dk[span(kw)].copy_from_slice(&sk);
            dv[span(kw)].copy_from_slice(&sv);
        }
        (dq, dk, dv)
    }

    /// [`CausalAttention::backward_bf16`] of whole rows.
    fn backward_bf16_rows(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        probs: &[f32],
        go: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = self.dims;
        let (t, g) = (d.time, d.group());
        let (goh, vh) = (
            heads_major_bf16(go, d, d.heads),
            heads_major_bf16(v, d, d.kv_heads),
        );
        // dP = dO·Vᵀ
        let mut ds = d.times_shared(&goh, &vh, true);
        drop(vh);
        // dS = P ⊙ (dP − Σⱼ P·dP) · scale in f32, then in bf16 for the products
        let ds_ptr = SharedMut::new(&mut ds);
        candle_core::utils::barrier_pool().execute_chunked(d.batch * d.heads, |items| {
            for item in items {
                for i in 0..t {
                    let start = item * t * t + i * t;
                    let (lo, p) = (self.window_start(i), &probs[start..start + t]);
                    // SAFETY: item (b, h) alone touches its t×t block of ds.
                    let row = unsafe { ds_ptr.slice(start, t) };
                    softmax_grad_row(&mut row[lo..=i], &p[lo..=i], self.scale);
                    // masked: P is 0 there, dP is not
                    row[..lo].fill(0.0);
                    row[i + 1..].fill(0.0);
                }
            }
        });
        let ds16 = to_bf16(&ds);
        drop(ds);
        // dQ = dS·K
        let kh = heads_major_bf16(k, d, d.kv_heads);
        let dqh = d.times_shared(&ds16, &kh, false);
        drop(kh);
        // dK = dSᵀ·Q and dV = Pᵀ·dO, summed over each group's heads along the inner dimension:
        // a group's score matrices are adjacent, (group·t × t), so their transposes side by
        // side are a transposed view of it
        let (qh, p16) = (heads_major_bf16(q, d, d.heads), to_bf16(probs));
        let transposed_group = View {
            offset: 0,
            dims: vec![d.batch * d.kv_heads, t, g * t],
            strides: vec![g * t * t, 1, t],
        };
        let stacked_group = View {
            offset: 0,
            dims: vec![d.batch * d.kv_heads, g * t, d.head_dim],
            strides: vec![g * t * d.head_dim, d.head_dim, 1],
        };
        let dkh = matmul_batched_bf16((&ds16, &transposed_group), (&qh, &stacked_group));
        drop((ds16, qh));
        let dvh = matmul_batched_bf16((&p16, &transposed_group), (&goh, &stacked_group));
        (
            heads_minor(&dqh, d, d.heads),
            heads_minor(&dkh, d, d.kv_heads),
            heads_minor(&dvh, d, d.kv_heads),
        )
    }
}

impl Dims {
    /// Each head's matrix of the head-major `per_head` times its key/value head's of `kv`
    /// (`(b, kv, t, d)`), transposed or not: `(t × d)·(d × t)` scores (Q·Kᵀ, dO·Vᵀ) or
    /// `(t × t)·(t × d)` rows (P·V, dS·K).
    fn times_shared(
        &self,
        per_head: &[half::bf16],
        kv: &[half::bf16],
        transposed: bool,
    ) -> Vec<f32> {
        let (t, hd) = (self.time, self.head_dim);
        let cols = if transposed { hd } else { t };
        matmul_batched_bf16(
            (per_head, &self.grouped(t, cols)),
            (kv, &self.shared(t, hd, transposed)),
        )
    }

    /// A head-major `(b, heads, t, ·)` buffer of `rows × cols` matrices as `[b, kv, group,
    /// rows, cols]`.
    fn grouped(&self, rows: usize, cols: usize) -> View {
        let g = self.group();
        View {
            offset: 0,
            dims: vec![self.batch, self.kv_heads, g, rows, cols],
            strides: vec![
                self.heads * rows * cols,
                g * rows * cols,
                rows * cols,
                cols,
                1,
            ],
        }
    }

    /// A head-major `(b, kv, rows, cols)` buffer as `[b, kv, 1, rows, cols]`, the batch
    /// dimension of size 1 shared by the group's heads; `transposed`: `[b, kv, 1, cols, rows]`.
    fn shared(&self, rows: usize, cols: usize, transposed: bool) -> View {
        let (dims, inner) = if transposed {
            ([cols, rows], [1, cols])
        } else {
            ([rows, cols], [cols, 1])
        };
        View {
            offset: 0,
            dims: vec![self.batch, self.kv_heads, 1, dims[0], dims[1]],
            strides: vec![
                self.kv_heads * rows * cols,
                rows * cols,
                rows * cols,
                inner[0],
                inner[1],
            ],
        }
    }
}

/// A `(b, t, heads, d)` buffer rounded to bf16 and laid out head-major, `(b, heads, t, d)`.
fn heads_major_bf16(x: &[f32], d: Dims, heads: usize) -> Vec<half::bf16> {
    let (t, hd) = (d.time, d.head_dim);
    assert_eq!(
        x.len(),
        d.batch * t * heads * hd,
        "attention: buffer length"
    );
    let mut out = vec![half::bf16::ZERO; x.len()];
    let ptr = SharedMut::new(&mut out);
    par_blocks(d.batch * heads, 1, |start, end| {
        for item in start..end {
            let (b, h) = (item / heads, item % heads);
            // SAFETY: item (b, h) alone writes its t×d matrix.
            let dst = unsafe { ptr.slice(item * t * hd, t * hd) };
            for (i, dst) in dst.chunks_exact_mut(hd).enumerate() {
                let src = &x[((b * t + i) * heads + h) * hd..][..hd];
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(o, &v)| *o = half::bf16::from_f32(v));
            }
        }
    });
    out
}

/// A head-major `(b, heads, t, d)` buffer laid out as `(b, t, heads, d)`.
fn heads_minor(x: &[f32], d: Dims, heads: usize) -> Vec<f32> {
    let (t, hd) = (d.time, d.head_dim);
    assert_eq!(
        x.len(),
        d.batch * t * heads * hd,
        "attention: buffer length"
    );
    let mut out = vec![0f32; x.len()];
    let ptr = SharedMut::new(&mut out);
    par_blocks(d.batch * t, 64, |start, end| {
        // SAFETY: this block alone writes positions start..end.
        let dst = unsafe { ptr.slice(start * heads * hd, (end - start) * heads * hd) };
        for (pos, dst) in (start..end).zip(dst.chunks_exact_mut(heads * hd)) {
            let (b, i) = (pos / t, pos % t);
            for (h, dst) in dst.chunks_exact_mut(hd).enumerate() {
                dst.copy_from_slice(&x[((b * heads + h) * t + i) * hd..][..hd]);
            }
        }
    });
    out
}

/// The score gradient from the probability gradient, in place: `dS = P ⊙ (dP − Σⱼ P·dP) · scale`.
fn softmax_grad_row(row: &mut [f32], p: &[f32], scale: f32) {
    let dot: f32 = p.iter().zip(row.iter()).map(|(p, g)| p * g).sum();
    for (g, p) in row.iter_mut().zip(p) {
        *g = p * (*g - dot) * scale;
    }
}

/// In-place softmax of `row[lo..hi]`; the rest of the row becomes 0.
fn softmax_row(row: &mut [f32], lo: usize, hi: usize) {
    super::elementwise::softmax_row(&mut row[lo..hi]);
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut z = seed;
        (0..n)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    fn relative_error(a: &[f32], b: &[f32]) -> f64 {
        let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (diff / norm).sqrt()
    }

    /// Forward output and q, k, v gradients.
    fn run(att: &CausalAttention, q: &[f32], k: &[f32], v: &[f32], go: &[f32]) -> [Vec<f32>; 4] {
        let (probs, out) = att.forward(q, k, v);
        let (dq, dk, dv) = att.backward(q, k, v, &probs, go);
        [out, dq, dk, dv]
    }

    /// The f32 kernel on a packed row (whose bands skip the keys before their first row's
    /// example) against each example alone; the bf16 products (whole score matrices, grouped
    /// heads summed along the inner dimension) against the f32 kernel, within bf16's precision,
    /// for grouped heads, packed rows, a sliding window and a length that is no multiple of the
    /// block; and the same bf16 numbers with oneDNN and through the `gemm` fallback.
    #[test]
    fn bf16_products_track_the_f32_kernel() {
        let (batch, time, heads, kv_heads, head_dim) = (2, 150, 6, 2, 16);
        let n_q = batch * time * heads * head_dim;
        let n_kv = batch * time * kv_heads * head_dim;
        let (q, k, v, go) = (
            values(n_q, 1),
            values(n_kv, 2),
            values(n_kv, 3),
            values(n_q, 4),
        );
        // row 0 holds examples of 40, 70 and 40 tokens; row 1 one of 150
        let starts: Vec<u32> = (0..batch * time)
            .map(|p| match (p / time, p % time) {
                (0, i) if i < 40 => 0,
                (0, i) if i < 110 => 40,
                (0, _) => 110,
                _ => 0,
            })
            .collect();
        let shape = (batch, time, heads, kv_heads, head_dim);
        let packing = Packing {
            starts,
            hidden: vec![],
        };
        for (window, packed) in [(usize::MAX, None), (64, Some(Arc::new(packing)))] {
            let kernels = |bf16| kernels(shape, 0.25, window, packed.clone(), bf16);
            let f32_run = run(&kernels(false), &q, &k, &v, &go);
            let bf16_run = run(&kernels(true), &q, &k, &v, &go);
            super::super::onednn::set_enabled(false);
            let fallback = run(&kernels(true), &q, &k, &v, &go);
            super::super::onednn::set_enabled(true);
            if packed.is_some() {
                // each example of row 0 alone gives what the packed row gives at its positions
                for (start, len) in [(0, 40), (40, 70), (110, 40)] {
                    let rows =
                        |x: &[f32], width: usize| x[start * width..(start + len) * width].to_vec();
                    let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
                    let alone = run(
                        &super::kernels(
                            (1, len, heads, kv_heads, head_dim),
                            0.25,
                            window,
                            None,
                            false,
                        ),
                        &rows(&q, qw),
                        &rows(&k, kw),
                        &rows(&v, kw),
                        &rows(&go, qw),
                    );
                    for (i, width) in [qw, qw, kw, kw].into_iter().enumerate() {
                        let err = relative_error(&rows(&f32_run[i], width), &alone[i]);
                        assert!(
                            err < 1e-5,
                            "example at {start}, buffer {i}: packed vs alone {err}"
                        );
                    }
                }
            }
            for (i, name) in ["output", "dq", "dk", "dv"].iter().enumerate() {
                let err = relative_error(&bf16_run[i], &f32_run[i]);
                assert!(err < 2e-2, "{name} (window {window}): bf16 vs f32 {err}");
                assert!(err > 0.0, "{name}: the bf16 path ran");
                let same = relative_error(&fallback[i], &bf16_run[i]);
                assert!(same < 1e-5, "{name}: oneDNN vs gemm on bf16 values {same}");
            }
        }
    }

    /// A pair laid out as prompt, chosen, rejected in one example (the rejected positions hiding
    /// the chosen ones) gives what each answer gives alone after the prompt: outputs, query
    /// gradients, and key/value gradients (the prompt's those of both branches less the prompt's
    /// own, which the tree counts once), f32 and bf16.
    #[test]
    fn a_shared_prompt_gives_what_each_branch_gives_alone() {
        let (heads, kv_heads, head_dim) = (4, 2, 8);
        // a row of 80: padding first (an example of 10), then prompt 30, chosen 25, rejected 15
        let (pad, p, c, r) = (10, 30, 25, 15);
        let time = pad + p + c + r;
        let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
        let (q, k, v, go) = (
            values(time * qw, 5),
            values(time * kw, 6),
            values(time * kw, 7),
            values(time * qw, 8),
        );
        let starts = (0..time)
            .map(|i| if i < pad { 0 } else { pad as u32 })
            .collect();
        let hidden = (0..time)
            .map(|i| match i >= pad + p + c {
                true => [p as u32, (p + c) as u32],
                false => [0, 0],
            })
            .collect();
        let packing = Arc::new(Packing { starts, hidden });
        for position in [pad, pad + p + c - 1, pad + p + c, time - 1] {
            let want = (position - pad) - if position >= pad + p + c { c } else { 0 };
            assert_eq!(packing.position(position, time), want);
        }
        let dims = |t| (1, t, heads, kv_heads, head_dim);
        for bf16 in [false, true] {
            let tree = run(
                &kernels(dims(time), 0.3, usize::MAX, Some(packing.clone()), bf16),
                &q,
                &k,
                &v,
                &go,
            );
            // each branch alone: the prompt's rows, then the answer's
            let branch = |answer: std::ops::Range<usize>| {
                let take = |x: &[f32], w: usize| {
                    let mut rows = x[(pad * w)..((pad + p) * w)].to_vec();
                    rows.extend_from_slice(&x[answer.start * w..answer.end * w]);
                    rows
                };
                let len = p + answer.len();
                let out = run(
                    &kernels(dims(len), 0.3, usize::MAX, None, bf16),
                    &take(&q, qw),
                    &take(&k, kw),
                    &take(&v, kw),
                    &take(&go, qw),
                );
                (answer, out)
            };
            let (chosen, rejected, prompt_alone) = (
                branch(pad + p..pad + p + c),
                branch(pad + p + c..time),
                branch(pad + p..pad + p).1,
            );
            let bound = if bf16 { 1e-2 } else { 1e-5 };
            for (i, w) in [qw, qw, kw, kw].into_iter().enumerate() {
                for (answer, alone) in [&chosen, &rejected] {
                    let got = &tree[i][answer.start * w..answer.end * w];
                    let err = relative_error(got, &alone[i][p * w..]);
                    assert!(
                        err < bound,
                        "bf16 {bf16}, buffer {i}, answer at {}: {err}",
                        answer.start
                    );
                }
                let prompt = &tree[i][(pad * w)..((pad + p) * w)];
                let want: Vec<f32> = match i {
                    // outputs and query gradients: what either branch computes for the prompt
                    0 | 1 => chosen.1[i][..p * w].to_vec(),
                    // key and value gradients: both branches' queries read the prompt's keys
                    _ => (0..p * w)
                        .map(|j| chosen.1[i][j] + rejected.1[i][j] - prompt_alone[i][j])
                        .collect(),
                };
                let err = relative_error(prompt, &want);
                assert!(err < bound, "bf16 {bf16}, buffer {i}, the prompt: {err}");
            }
        }
    }
}
