//! Differentiable building blocks that candle lacks or gets wrong for training.
//!
//! candle's fast kernels (`softmax_last_dim`, `rms_norm`, `rope`) have no backward: they cut the
//! graph without an error. And stock `matmul` / broadcast ops compute gradients for frozen
//! operands (weights, masks) that nobody reads, doubling backward cost. Each op here pairs a fast
//! forward with a hand-written backward that returns only the gradients training needs.
//! All of them are checked against finite differences in the tests.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::timing::{self, Part};

/// `y = x · Wᵀ` for a frozen `W` (out, in): the backward returns the input gradient only.
struct FrozenMatmul {
    weight: Tensor,
}

/// `x · Wᵀ` on backend storage: `x` (…, k) contiguous, `W` (n, k).
pub(crate) fn matmul_xwt<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
) -> Result<(S, Shape)> {
    {
        let (n, k) = wl.shape().dims2()?;
        if xl.dims().last() != Some(&k) || !xl.is_contiguous() {
            candle_core::bail!(
                "frozen linear: input {:?} does not fit weight ({n}, {k})",
                xl.dims()
            )
        }
        let m = xl.shape().elem_count() / k;
        let lhs = Layout::contiguous_with_offset((m, k), xl.start_offset());
        let rhs = wl.transpose(0, 1)?;
        let y = x.matmul(w, (1, m, n, k), &lhs, &rhs)?;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok((y, Shape::from(dims)))
    }
}

/// Contiguous f32 data of a CPU storage as an `(rows × cols)` slice, when it is one.
pub(crate) fn f32_rows<'a>(s: &'a CpuStorage, l: &Layout, len: usize) -> Option<&'a [f32]> {
    match s {
        CpuStorage::F32(v) if l.is_contiguous() => v.get(l.start_offset()..l.start_offset() + len),
        _ => None,
    }
}

/// `x · Wᵀ` on the CPU: oneDNN when it is installed, candle's gemm otherwise.
pub(crate) fn cpu_xwt(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    timing::scope(Part::FrozenMatmul, || cpu_xwt_untimed(x, xl, w, wl))
}

/// Contiguous bf16 data of a CPU storage, when it is one.
fn bf16_rows<'a>(s: &'a CpuStorage, l: &Layout, len: usize) -> Option<&'a [half::bf16]> {
    match s {
        CpuStorage::BF16(v) if l.is_contiguous() => v.get(l.start_offset()..l.start_offset() + len),
        _ => None,
    }
}

/// f32 activations times a bf16 weight (a bf16 base on the CPU): the activations are rounded to
/// bf16 and multiplied with f32 accumulation, by oneDNN's bf16 kernels or, without oneDNN, by
/// candle's f32 gemm on the same rounded numbers. `w_transposed`: `w` is (n×k) and the product
/// is `a · wᵀ`; else `w` is (k×n).
fn mixed_bf16(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    w: &[half::bf16],
    w_transposed: bool,
) -> Result<Vec<f32>> {
    let a16 = crate::kernels::elementwise::to_bf16(a);
    if let Some(out) = crate::kernels::onednn::matmul_bf16(m, n, k, &a16, w, w_transposed) {
        return Ok(out);
    }
    let a32 = CpuStorage::F32(a16.iter().map(|v| v.to_f32()).collect());
    let w32 = CpuStorage::F32(w.iter().map(|v| v.to_f32()).collect());
    let lhs = Layout::contiguous((m, k));
    let rhs = if w_transposed {
        Layout::contiguous((n, k)).transpose(0, 1)?
    } else {
        Layout::contiguous((k, n))
    };
    match a32.matmul(&w32, (1, m, n, k), &lhs, &rhs)? {
        CpuStorage::F32(out) => Ok(out),
        _ => candle_core::bail!("f32 matmul returned another dtype"),
    }
}

/// The fast CPU multiply by a frozen weight `W` (n, k) on float32 rows: `x · Wᵀ` (`forward`,
/// `x` is (m, k)) or `g · W` (`g` is (m, n)). A bf16 weight goes through [`mixed_bf16`], a float32
/// one through oneDNN; `None` when neither applies (no oneDNN, another dtype) and the caller
/// falls back to candle's gemm.
fn fast_frozen(x: &[f32], w: &CpuStorage, wl: &Layout, forward: bool) -> Result<Option<Vec<f32>>> {
    let (n, k) = wl.shape().dims2()?;
    let (inner, outer) = if forward { (k, n) } else { (n, k) };
    let m = x.len() / inner;
    if let Some(wb) = bf16_rows(w, wl, n * k) {
        return mixed_bf16((m, outer, inner), x, wb, forward).map(Some);
    }
    Ok(f32_rows(w, wl, n * k)
        .and_then(|wf| crate::kernels::onednn::matmul(m, outer, inner, x, wf, forward)))
}

/// [`fast_frozen`] on a storage `x` whose last dimension is `inner`; `None` when it does not apply.
fn fast_frozen_storage(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    forward: bool,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (n, k) = wl.shape().dims2()?;
    let (inner, outer) = if forward { (k, n) } else { (n, k) };
    if xl.dims().last() != Some(&inner) {
        return Ok(None);
    }
    let Some(xs) = f32_rows(x, xl, xl.shape().elem_count()) else {
        return Ok(None);
    };
    Ok(fast_frozen(xs, w, wl, forward)?.map(|out| {
        (
            CpuStorage::F32(out),
            Shape::from(with_last_dim(xl.dims(), outer)),
        )
    }))
}

fn cpu_xwt_untimed(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    match fast_frozen_storage(x, xl, w, wl, true)? {
        Some(out) => Ok(out),
        None => matmul_xwt(x, xl, w, wl),
    }
}

/// `x · Wᵀ` (`forward`, `x` is (m, k)) or `g · W` (the input gradient, `g` is (m, n)) for a
/// frozen dense CPU weight `W` (n, k) in float32 or bfloat16, on plain float32 buffers.
pub(crate) fn cpu_frozen(x: &[f32], w: &Tensor, forward: bool) -> Result<Vec<f32>> {
    timing::scope(Part::FrozenMatmul, || {
        let (ws, wl) = w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen linear: the weight is not on the CPU")
        };
        if let Some(out) = fast_frozen(x, ws, wl, forward)? {
            return Ok(out);
        }
        let (n, k) = wl.shape().dims2()?;
        let inner = if forward { k } else { n };
        let xs = CpuStorage::F32(x.to_vec());
        let xl = Layout::contiguous((x.len() / inner, inner));
        let (out, _) = if forward {
            matmul_xwt(&xs, &xl, ws, wl)?
        } else {
            matmul_xw(&xs, &xl, ws, wl)?
        };
        match out {
            CpuStorage::F32(v) => Ok(v),
            _ => candle_core::bail!("frozen linear: the weight must be float32 or bfloat16"),
        }
    })
}

/// `g · W` on backend storage: `g` (…, n) contiguous, `W` (n, k) contiguous.
fn matmul_xw<S: BackendStorage>(g: &S, gl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
    let (n, k) = wl.shape().dims2()?;
    if gl.dims().last() != Some(&n) || !gl.is_contiguous() || !wl.is_contiguous() {
        candle_core::bail!(
            "frozen linear backward: gradient {:?} does not fit weight ({n}, {k})",
            gl.dims()
        )
    }
    let m = gl.shape().elem_count() / n;
    let lhs = Layout::contiguous_with_offset((m, n), gl.start_offset());
    let y = g.matmul(w, (1, m, k, n), &lhs, wl)?;
    Ok((y, Shape::from(with_last_dim(gl.dims(), k))))
}

/// `g · W` for a frozen `W`: the input gradient of `x · Wᵀ` (and the vocabulary backward).
struct FrozenMatmulT {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        timing::scope(Part::FrozenMatmul, || self.cpu_fwd_untimed(s, l))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        match &*ws {
            candle_core::Storage::Cuda(ws) => matmul_xw(s, l, ws, wl),
            _ => candle_core::bail!("frozen linear: weight and input are on different devices"),
        }
    }
}

impl FrozenMatmulT {
    fn cpu_fwd_untimed(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen linear: weight and input are on different devices")
        };
        match fast_frozen_storage(s, l, ws, wl, false)? {
            Some(out) => Ok(out),
            None => matmul_xw(s, l, ws, wl),
        }
    }
}

/// `g · W` with `W` frozen, outside the graph (used in backward passes).
pub fn frozen_matmul_t(g: &Tensor, weight: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op1_no_bwd(&FrozenMatmulT {
        weight: weight.contiguous()?,
    })
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        match &*ws {
            candle_core::Storage::Cpu(ws) => cpu_xwt(s, l, ws, wl),
            _ => candle_core::bail!("frozen linear: weight and input are on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        match &*ws {
            candle_core::Storage::Cuda(ws) => matmul_xwt(s, l, ws, wl),
            _ => candle_core::bail!("frozen linear: weight and input are on different devices"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(frozen_matmul_t(grad, &self.weight)?))
    }
}

fn with_last_dim(dims: &[usize], last: usize) -> Vec<usize> {
    let mut dims = dims.to_vec();
    *dims.last_mut().expect("rank >= 1") = last;
    dims
}

/// `x · Wᵀ` with `W` frozen. Without a tracked input there is nothing to differentiate and the
/// plain matmul is used.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = FrozenMatmul {
        weight: weight.contiguous()?,
    };
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

type BackwardFn = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// Graph node `(x, y_fast) -> y_fast` whose backward is `f(x, y, grad_y)` for `x` only.
struct AttachBackward {
    name: &'static str,
    backward: Box<BackwardFn>,
}

fn copy_storage<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if l.start_offset() != 0 || !l.is_contiguous() {
        candle_core::bail!("attach_backward: the fast output must be contiguous")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp2 for AttachBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_storage(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_storage(s, l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.backward)(x, y, grad)?), None))
    }
}

/// Makes `y_fast` (computed from `x` by an op with no backward) differentiable w.r.t. `x`.
pub fn attach_backward(
    name: &'static str,
    x: &Tensor,
    y_fast: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y_fast);
    }
    x.apply_op2(
        &y_fast.contiguous()?,
        AttachBackward {
            name,
            backward: Box::new(backward),
        },
    )
}

/// RMSNorm with a frozen weight: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == candle_core::DType::F64 {
        // candle's kernel has no f64; gradient checks run in f64 through the composite.
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
        return x.broadcast_div(&r)?.broadcast_mul(weight);
    }
    let y = candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)?;
    let weight = weight.clone();
    attach_backward("rms-norm", x, y, move |x, _y, g| {
        if fused_applies(x) {
            return rms_norm_backward(x, g, &weight, eps);
        }
        // r = 1/rms;  dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x)
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let gw = g.broadcast_mul(&weight)?;
        let dot = (&gw * x)?.mean_keepdim(D::Minus1)?;
        gw.broadcast_mul(&r)? - x.broadcast_mul(&(dot * r.powf(3.0)?)?)?
    })
}

/// Rotary position embedding in Hugging Face (rotate-half) layout on `(b, heads, t, head_dim)`.
/// A rotation's backward is the rotation by the opposite angle. The decoder runs `rope_thd`
/// (its own layout); this layout is kept for checking the op against candle's `rope_slow`.
#[cfg(test)]
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach_backward("rope", x, y, move |_x, _y, g| {
        candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)
    })
}

thread_local! {
    static FUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the fused CPU path (the decoder layer as one node with its own backward, RMSNorm
/// backward, cross-entropy) on or off for this thread; off, the same model runs through candle's
/// composite ops, the reference the tests compare with.
pub fn set_fused(enabled: bool) {
    FUSED.with(|f| f.set(enabled));
}

/// Whether the fused CPU kernel applies to `x`: float32 on the CPU with fused kernels enabled.
pub fn fused_applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && FUSED.with(|f| f.get())
}

/// SwiGLU's `silu(gate) · up`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Rotary position embedding on `(b, t, heads, head_dim)`.
pub fn rope_thd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach_backward("rope", x, y, move |_x, _y, g| {
        candle_nn::rotary_emb::rope_thd(&g.contiguous()?, &cos, &neg_sin)
    })
}

/// Causal grouped-query attention on `(b, t, heads, d)` queries and `(b, t, kv_heads, d)` keys and
/// values (rotary already applied) with composite ops; returns `(b, t, heads, d)`. `mask` `(t, t)`
/// is the additive causal (and sliding-window) mask.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let n_rep = q.dim(2)? / k.dim(2)?;
    let q = q.transpose(1, 2)?.contiguous()?; // (b, heads, t, d)
    let k = repeat_kv(&k.transpose(1, 2)?.contiguous()?, n_rep)?.contiguous()?;
    let v = repeat_kv(&v.transpose(1, 2)?.contiguous()?, n_rep)?.contiguous()?;
    let att = masked_softmax(&q.matmul(&k.t()?)?, mask, scale)?;
    att.matmul(&v)?.transpose(1, 2)?.contiguous()
}

/// `softmax(scores · scale + mask)` over the last dim, in one node: the constant additive mask
/// gets no gradient.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let z = (scores.detach() * scale)?.broadcast_add(mask)?;
    let y = candle_nn::ops::softmax_last_dim(&z)?;
    attach_backward("masked-softmax", scores, y, move |_x, y, g| {
        let gy = (g * y)?.sum_keepdim(D::Minus1)?;
        (y * g.broadcast_sub(&gy)?)? * scale
    })
}

/// Rows of logits computed at once by [`lm_head_cross_entropy`]: bounds the (rows, vocab)
/// buffers whatever the batch, and keeps one (25 MB at a 49,152 vocabulary) under glibc's 32 MB
/// mmap threshold so that it is reused instead of mapped and faulted in afresh for every chunk.
const LOGIT_ROWS_PER_CHUNK: usize = 128;

/// Sum over rows of the cross-entropy of `hidden · Wᵀ` (the vocabulary projection, `W` frozen)
/// against `targets`, without keeping any (rows, vocab) tensor alive.
///
/// Returns `(sum of losses, Σ|rows|)`. When `hidden` is tracked, the gradient w.r.t. `hidden` is
/// computed chunk by chunk during the forward pass (`(softmax − onehot) · W`) and handed out in
/// backward scaled by the upstream gradient: the vocabulary matmul then runs twice instead of
/// three times and no logits survive the call.
pub fn lm_head_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
) -> Result<LossSum> {
    timing::scope(Part::Loss, || {
        let rows = row_cross_entropy(hidden, weight, targets)?;
        let sum = rows.sum;
        let Some(grad_hidden) = rows.grad_hidden else {
            return Ok(LossSum {
                sum,
                correct: rows.correct,
            });
        };
        let sum = attach_backward("lm-head-xent", hidden, sum, move |_x, _y, g| {
            grad_hidden.broadcast_mul(&g.to_dtype(grad_hidden.dtype())?)
        })?;
        Ok(LossSum {
            sum,
            correct: rows.correct,
        })
    })
}

/// The cross-entropy of each row of `hidden · Wᵀ` against `targets` as a `(rows,)` tensor whose
/// backward scales each row's gradient by its own upstream gradient: what a loss over whole
/// sequences (DPO, ORPO) is built on. Same chunked computation as [`lm_head_cross_entropy`].
pub fn lm_head_token_losses(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
) -> Result<TokenLosses> {
    timing::scope(Part::Loss, || {
        let rows = row_cross_entropy(hidden, weight, targets)?;
        let Some(grad_hidden) = rows.grad_hidden else {
            return Ok(TokenLosses {
                losses: rows.losses,
                correct: rows.correct,
            });
        };
        let losses = attach_backward(
            "lm-head-xent-rows",
            hidden,
            rows.losses,
            move |_x, _y, g| {
                grad_hidden.broadcast_mul(&g.to_dtype(grad_hidden.dtype())?.unsqueeze(1)?)
            },
        )?;
        Ok(TokenLosses {
            losses,
            correct: rows.correct,
        })
    })
}

/// The summed loss of a batch's label tokens (differentiable) and how many of those tokens the
/// model ranks first (its argmax is the label): the token accuracy's numerator.
pub struct LossSum {
    pub sum: Tensor,
    pub correct: usize,
}

/// Each label token's loss `(rows,)` (differentiable) and how many the model ranks first.
pub struct TokenLosses {
    pub losses: Tensor,
    pub correct: usize,
}

/// What the chunked cross-entropy computed: each row's loss (not tracked), their sum (summed in
/// f64 on the CPU), the argmax hits, and when `hidden` is tracked the gradient of each row's loss
/// w.r.t. its hidden state.
struct RowCrossEntropy {
    losses: Tensor,
    sum: Tensor,
    correct: usize,
    grad_hidden: Option<Tensor>,
}

fn row_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
) -> Result<RowCrossEntropy> {
    let (rows, _h) = hidden.dims2()?;
    let want_grad = hidden.track_op();
    let hidden_d = hidden.detach();
    if fused_applies(hidden) && weight.device().is_cpu() {
        return row_cross_entropy_cpu(hidden, weight, targets);
    }
    // The loss is accumulated in at least f32 (f64 stays f64 for gradient checks).
    let acc = match weight.dtype() {
        candle_core::DType::F64 => candle_core::DType::F64,
        _ => candle_core::DType::F32,
    };
    let mut loss_chunks = Vec::new();
    let mut correct = 0usize;
    let mut grad_chunks = Vec::new();
    let mut start = 0;
    while start < rows {
        let n = LOGIT_ROWS_PER_CHUNK.min(rows - start);
        let h = hidden_d.narrow(0, start, n)?;
        let t = targets.narrow(0, start, n)?;
        let logits = frozen_matmul(&h, weight)?.to_dtype(acc)?;
        let max = logits.max_keepdim(1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let exp = shifted.exp()?;
        let sum_exp = exp.sum_keepdim(1)?;
        let picked = shifted.gather(&t.unsqueeze(1)?, 1)?;
        // a hit when the target's logit is the row's largest (a tie counts), as on the CPU path
        correct += picked
            .ge(&Tensor::zeros_like(&picked)?)?
            .to_dtype(candle_core::DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        loss_chunks.push((sum_exp.log()? - picked)?.squeeze(1)?);
        if want_grad {
            let softmax = exp.broadcast_div(&sum_exp)?;
            let minus_one = Tensor::full(-1f32, (n, 1), hidden.device())?.to_dtype(acc)?;
            let d_logits = softmax.scatter_add(&t.unsqueeze(1)?, &minus_one, 1)?;
            let d_hidden = frozen_matmul_t(&d_logits.to_dtype(weight.dtype())?, weight)?;
            grad_chunks.push(d_hidden.to_dtype(hidden.dtype())?);
        }
        start += n;
    }
    let losses = match loss_chunks.is_empty() {
        true => Tensor::zeros(0, acc, hidden.device())?,
        false => Tensor::cat(&loss_chunks, 0)?,
    };
    let sum = losses.sum_all()?;
    let grad_hidden = match want_grad {
        true => Some(Tensor::cat(&grad_chunks, 0)?),
        false => None,
    };
    Ok(RowCrossEntropy {
        losses,
        sum,
        correct,
        grad_hidden,
    })
}

/// [`row_cross_entropy`] on the CPU in float32: each chunk's logits buffer becomes its own
/// gradient (`softmax − onehot`) in place, one row at a time, so a chunk costs one
/// `(rows, vocab)` buffer instead of six.
fn row_cross_entropy_cpu(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
) -> Result<RowCrossEntropy> {
    let (rows, _h) = hidden.dims2()?;
    let vocab = weight.dim(0)?;
    let want_grad = hidden.track_op();
    let hidden_d = hidden.detach();
    let targets: Vec<u32> = targets.to_dtype(candle_core::DType::U32)?.to_vec1()?;
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross-entropy: target {t} is outside the vocabulary ({vocab})")
    }
    let weight = weight.contiguous()?;
    let (mut losses, mut correct) = (Vec::with_capacity(rows), 0usize);
    let mut grad_chunks = Vec::new();
    let mut start = 0;
    while start < rows {
        let n = LOGIT_ROWS_PER_CHUNK.min(rows - start);
        let h = hidden_d.narrow(0, start, n)?.contiguous()?;
        let mut logits = {
            let (hs, hl) = h.storage_and_layout();
            let (ws, wl) = weight.storage_and_layout();
            let (candle_core::Storage::Cpu(hs), candle_core::Storage::Cpu(ws)) = (&*hs, &*ws)
            else {
                candle_core::bail!("cross-entropy: hidden states and weight must be on the CPU")
            };
            match cpu_xwt(hs, hl, ws, wl)?.0 {
                CpuStorage::F32(v) => v,
                _ => candle_core::bail!("cross-entropy: logits must be float32"),
            }
        };
        let (chunk_losses, chunk_correct) = crate::kernels::elementwise::softmax_cross_entropy_rows(
            &mut logits,
            vocab,
            &targets[start..start + n],
        );
        losses.extend(chunk_losses);
        correct += chunk_correct;
        if want_grad {
            let d_logits = Tensor::from_vec(logits, (n, vocab), hidden.device())?;
            grad_chunks.push(frozen_matmul_t(&d_logits, &weight)?);
        }
        start += n;
    }
    let sum = Tensor::new(losses.iter().sum::<f64>() as f32, hidden.device())?;
    let losses: Vec<f32> = losses.iter().map(|&l| l as f32).collect();
    let grad_hidden = match want_grad {
        true => Some(Tensor::cat(&grad_chunks, 0)?),
        false => None,
    };
    Ok(RowCrossEntropy {
        losses: Tensor::from_vec(losses, rows, hidden.device())?,
        sum,
        correct,
        grad_hidden,
    })
}

/// Grouped-query attention: repeat each key/value head `n_rep` times, `(b, kv, t, d)` →
/// `(b, kv·n_rep, t, d)`.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))
}

/// The float32 values of a contiguous CPU storage; `what` names the operand in the error.
pub(crate) fn f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::CpuStorage::F32(v) if l.is_contiguous() => {
            Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
        }
        _ => candle_core::bail!("{what} must be contiguous float32 on the CPU"),
    }
}

/// The input gradient of `rms_norm(x) · weight` (weight frozen), float32 on the CPU:
/// `r·(g⊙w) − x·r³·mean(g⊙w⊙x)` with `r = 1/rms(x)`, one pass per row.
pub(crate) fn rms_norm_backward(
    x: &Tensor,
    grad: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    timing::scope(Part::Elementwise, || {
        rms_norm_backward_untimed(x, grad, weight, eps)
    })
}

fn rms_norm_backward_untimed(
    x: &Tensor,
    grad: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (x, grad, weight) = (x.contiguous()?, grad.contiguous()?, weight.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = grad.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let (
        candle_core::Storage::Cpu(xs),
        candle_core::Storage::Cpu(gs),
        candle_core::Storage::Cpu(ws),
    ) = (&*xs, &*gs, &*ws)
    else {
        candle_core::bail!("RMSNorm backward: the fused kernel runs on the CPU only")
    };
    let dx = crate::kernels::elementwise::rms_norm_grad(
        f32_slice(xs, xl, "RMSNorm input")?,
        f32_slice(gs, gl, "RMSNorm gradient")?,
        f32_slice(ws, wl, "RMSNorm weight")?,
        eps,
    );
    Tensor::from_vec(dx, x.shape(), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::train::testing::max_abs_diff;

    /// Each custom op's backward against candle's autograd of the same function built from
    /// stock ops (moved here from tests/it/engine.rs).
    #[test]
    fn custom_backward_ops_match_stock_autograd() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let grad_of = |f: &dyn Fn(&Tensor) -> Tensor| -> Tensor {
            let y = f(x.as_tensor());
            let l = (y * &probe).unwrap().sum_all().unwrap();
            l.backward().unwrap().get(&x).unwrap().clone()
        };
        // rms_norm
        let fast = grad_of(&|x| rms_norm(x, &w, 1e-5).unwrap());
        let slow = grad_of(&|x| {
            let r = (x.sqr().unwrap().mean_keepdim(3).unwrap() + 1e-5)
                .unwrap()
                .sqrt()
                .unwrap();
            x.broadcast_div(&r).unwrap().broadcast_mul(&w).unwrap()
        });
        assert!(max_abs_diff(&fast, &slow) < 1e-4, "rms_norm");
        // rope
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let fast = grad_of(&|x| rope(x, &cos, &sin).unwrap());
        let slow = grad_of(&|x| candle_nn::rotary_emb::rope_slow(x, &cos, &sin).unwrap());
        assert!(max_abs_diff(&fast, &slow) < 1e-4, "rope");
        // masked softmax
        let mask = Tensor::from_vec(
            (0..64)
                .map(|i| {
                    if i % 8 > i / 8 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect::<Vec<f32>>(),
            (8, 8),
            &dev,
        )
        .unwrap();
        let probe8 = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let xs = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap()).unwrap();
        let g = |fast: bool| {
            let y = if fast {
                masked_softmax(xs.as_tensor(), &mask, 0.5).unwrap()
            } else {
                candle_nn::ops::softmax(
                    &(xs.as_tensor() * 0.5)
                        .unwrap()
                        .broadcast_add(&mask)
                        .unwrap(),
                    3,
                )
                .unwrap()
            };
            let l = (y.narrow(2, 0, 5).unwrap() * &probe8)
                .unwrap()
                .sum_all()
                .unwrap();
            l.backward().unwrap().get(&xs).unwrap().clone()
        };
        assert!(max_abs_diff(&g(true), &g(false)) < 1e-5, "masked softmax");
        // frozen matmul + fused lm-head cross-entropy against stock matmul + candle's cross_entropy
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (300, 8), &dev).unwrap()).unwrap();
        let wv = Tensor::randn(0f32, 1.0, (50, 8), &dev).unwrap();
        let logits = h.as_tensor().matmul(&wv.t().unwrap()).unwrap();
        // every third row's target is its argmax, the others mostly are not
        let argmax: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        let wanted: Vec<u32> = (0..300u32)
            .map(|i| {
                if i % 3 == 0 {
                    argmax[i as usize]
                } else {
                    i * 7 % 50
                }
            })
            .collect();
        let hits = argmax.iter().zip(&wanted).filter(|(a, t)| a == t).count();
        assert!((100..300).contains(&hits));
        let targets = Tensor::from_vec(wanted, 300, &dev).unwrap();
        let fused = lm_head_cross_entropy(h.as_tensor(), &wv, &targets).unwrap();
        assert_eq!(fused.correct, hits, "token accuracy counts argmax hits");
        let fused = fused.sum;
        let stock = (candle_nn::loss::cross_entropy(&logits, &targets).unwrap() * 300.0).unwrap();
        let (lf, ls) = (
            fused.to_scalar::<f32>().unwrap(),
            stock.to_scalar::<f32>().unwrap(),
        );
        assert!((lf - ls).abs() / ls < 1e-5, "{lf} vs {ls}");
        let gf = fused.backward().unwrap().get(&h).unwrap().clone();
        let gs = stock.backward().unwrap().get(&h).unwrap().clone();
        assert!(
            max_abs_diff(&gf, &gs) < 1e-4,
            "fused cross-entropy gradient"
        );
    }
}
