//! Plumbing shared by the CPU kernels (attention, LoRA, elementwise, 4-bit unpacking): output
//! pointers handed to candle's worker threads, strided matrix views, and the `gemm` crate's
//! single-threaded multiply on them (the kernels split work across threads themselves).

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
