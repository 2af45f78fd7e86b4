//! Plumbing shared by the CPU kernels (attention, LoRA, elementwise, 4-bit unpacking): output
//! pointers handed to candle's worker threads, strided matrix views, the `gemm` crate's
//! single-threaded multiply on them (the kernels split work across threads themselves), and the
//! batched bf16 multiply (oneDNN, or the same numbers through `gemm`).

use super::onednn;

/// A raw pointer handed to candle's worker threads, each of which writes a disjoint part.
pub(crate) struct SharedMut<T>(*mut T);

// Derived Clone/Copy would require T: Copy; the pointer itself is always copyable.
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}

// SAFETY: the kernels only write through it to parts no other thread touches; the elements
// themselves must be safe to hand to another thread.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn new(data: &mut [T]) -> Self {
        SharedMut(data.as_mut_ptr())
    }

    /// A method, so that closures capture the wrapper (Sync) and not its raw field.
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }

    /// `len` elements from `start` as a slice.
    ///
    /// # Safety
    /// The range must lie in the buffer and no other thread may use it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Runs `f(start, end)` over `0..n` in blocks of `block`, on candle's worker threads.
pub(crate) fn par_blocks(n: usize, block: usize, f: impl Fn(usize, usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(block), |chunks| {
        for c in chunks {
            f(c * block, ((c + 1) * block).min(n));
        }
    });
}

/// Strided float32 matrix view: base pointer, row stride, column stride (elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat(pub(crate) *const f32, pub(crate) usize, pub(crate) usize);

impl Mat {
    /// The view starting at (`row`, `col`). Moving the pointer is plain arithmetic (never
    /// undefined, even past the buffer); reading or writing through it is `gemm`'s contract.
    pub(crate) fn at(self, row: usize, col: usize) -> Mat {
        Mat(
            self.0.wrapping_add(row * self.1 + col * self.2),
            self.1,
            self.2,
        )
    }

    /// The transposed view.
    pub(crate) fn t(self) -> Mat {
        Mat(self.0, self.2, self.1)
    }
}

/// `dst (m×n) = [dst +] alpha · lhs (m×k) · rhs (k×n)`, single-threaded.
///
/// # Safety
/// Every view must be valid for its extent, and `dst` written by no other thread meanwhile.
pub(crate) unsafe fn gemm(
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

/// `src · weights` with bf16 inputs accumulated in f32, batched over the leading dimensions,
/// into a new dense buffer ([`onednn::batched_product_dims`] says which): through oneDNN when
/// it is in use, else the same bf16 values widened to f32 through `gemm`, one batch item per
/// worker at a time, so that a bf16 run computes the same numbers either way.
pub(crate) fn matmul_batched_bf16(
    src: (&[half::bf16], &onednn::View),
    weights: (&[half::bf16], &onednn::View),
) -> Vec<f32> {
    if let Some(out) = onednn::matmul_batched_bf16(src, weights) {
        return out;
    }
    let dims = onednn::batched_product_dims(src, weights);
    let (s, w) = (src.1, weights.1);
    let nd = dims.len();
    let (m, n, k) = (dims[nd - 2], dims[nd - 1], s.dims[nd - 1]);
    let widen = |x: &[half::bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let (a, b) = (widen(src.0), widen(weights.0));
    let items: usize = dims[..nd - 2].iter().product();
    let mut out = vec![0f32; items * m * n];
    let ptr = SharedMut::new(&mut out);
    par_blocks(items, 1, |start, end| {
        for item in start..end {
            let (mut a_at, mut b_at, mut rest) = (s.offset, w.offset, item);
            for i in (0..nd - 2).rev() {
                let index = rest % dims[i];
                rest /= dims[i];
                a_at += index * s.strides[i];
                if w.dims[i] != 1 {
                    b_at += index * w.strides[i];
                }
            }
            // SAFETY: the views were checked to lie inside their buffers (a and b have the
            // buffers' lengths); item alone writes its m×n block of out.
            unsafe {
                gemm(
                    (m, n, k),
                    Mat(ptr.ptr().add(item * m * n), n, 1),
                    false,
                    Mat(a.as_ptr().add(a_at), s.strides[nd - 2], s.strides[nd - 1]),
                    Mat(b.as_ptr().add(b_at), w.strides[nd - 2], w.strides[nd - 1]),
                    1.0,
                )
            };
        }
    });
    out
}
