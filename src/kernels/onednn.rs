//! The frozen-weight matrix multiplies on the CPU, and bf16 attention's batched products, through
//! oneDNN's matmul primitive, when the library is installed (Debian: `libdnnl2`, oneDNN 2.x). It
//! is loaded at run time, so qtune builds and runs without it; without it (or when its
//! self-check fails) every caller falls back to candle's own gemm. Measured here (2 cores):
//! oneDNN f32 ≈ 460 GFLOP/s on the model's linear shapes against candle's ≈ 250.
//!
//! Every multiply is stated as dimensions and strides (`dnnl_memory_desc_init_by_strides`):
//! plain and transposed matrices, and batches of them with a broadcast weights dimension. Which
//! kernel oneDNN picks for each is logged at debug level (`brg:` kernels need dense matrices).
//!
//! Only oneDNN's v2 C API is spoken (`libdnnl.so.2`); its descriptors are treated as opaque
//! buffers filled by the library, so no struct layout is copied here. `QTUNE_ONEDNN=0` turns it off.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

type Status = c_int;
type Handle = *mut c_void;

// Values of oneDNN 2.x's enums (dnnl_types.h), checked by the self-test below.
const DNNL_SUCCESS: Status = 0;
const DNNL_BF16: c_int = 2;
const DNNL_F32: c_int = 3;
const DNNL_CPU: c_int = 1;
const ARG_SRC: c_int = 1;
const ARG_DST: c_int = 17;
const ARG_WEIGHTS: c_int = 33;
const QUERY_IMPL_INFO_STR: c_int = 8;
const STREAM_IN_ORDER: u32 = 1;

/// Room for `dnnl_memory_desc_t` (696 bytes in 2.6) and `dnnl_matmul_desc_t` (2,800).
#[repr(C, align(64))]
struct Opaque<const N: usize>([u8; N]);

impl<const N: usize> Opaque<N> {
    fn zeroed() -> Box<Self> {
        Box::new(Opaque([0; N]))
    }
    fn ptr(&mut self) -> *mut c_void {
        self.0.as_mut_ptr().cast()
    }
}

#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

type MdInit = unsafe extern "C" fn(*mut c_void, c_int, *const i64, c_int, *const i64) -> Status;
type MatmulInit = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    *const c_void,
    *const c_void,
    *const c_void,
) -> Status;
type PdCreate = unsafe extern "C" fn(
    *mut Handle,
    *const c_void,
    *const c_void,
    Handle,
    *const c_void,
) -> Status;
type PdQuery = unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status;
type Destroy = unsafe extern "C" fn(Handle) -> Status;
type PrimCreate = unsafe extern "C" fn(*mut Handle, Handle) -> Status;
type MemCreate = unsafe extern "C" fn(*mut Handle, *const c_void, Handle, *mut c_void) -> Status;
type Execute = unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status;
type Wait = unsafe extern "C" fn(Handle) -> Status;
type EngineCreate = unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status;
type StreamCreate = unsafe extern "C" fn(*mut Handle, Handle, u32) -> Status;

struct Api {
    _lib: libloading::Library,
    md_init: MdInit,
    matmul_init: MatmulInit,
    pd_create: PdCreate,
    pd_query: PdQuery,
    pd_destroy: Destroy,
    prim_create: PrimCreate,
    prim_destroy: Destroy,
    mem_create: MemCreate,
    mem_destroy: Destroy,
    execute: Execute,
    wait: Wait,
}

/// One prepared matmul: created once per shape, reused (creation costs far more than a call).
struct Primitive {
    handle: Handle,
    mds: [Box<Opaque<1024>>; 3],
}

struct OneDnn {
    api: Api,
    engine: Handle,
    stream: Handle,
    primitives: HashMap<Problem, Primitive>,
    implementation: String,
}

// oneDNN engines, streams and primitives may be used from any thread; the mutex below keeps one
// call at a time on the one stream.
unsafe impl Send for OneDnn {}

static ONEDNN: OnceLock<Option<Mutex<OneDnn>>> = OnceLock::new();
thread_local! {
    /// Per thread, so that a test comparing both paths does not switch other tests' path.
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Routes this thread's frozen matmuls through oneDNN (when loadable) or candle's gemm.
pub fn set_enabled(on: bool) {
    ENABLED.with(|e| e.set(on));
}

fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Whether oneDNN is installed, loads and passed its self-check.
pub fn available() -> bool {
    instance().is_some()
}

fn instance() -> Option<&'static Mutex<OneDnn>> {
    ONEDNN
        .get_or_init(|| {
            if std::env::var("QTUNE_ONEDNN").is_ok_and(|v| v == "0") {
                return None;
            }
            // OMP_WAIT_POLICY=passive, which libgomp reads as it loads just below, is set by
            // `crate::tune_process` at start-up (setting the environment here, on a training
            // thread, would race with other threads reading it).
            match OneDnn::load() {
                Ok(d) => Some(Mutex::new(d)),
                Err(e) => {
                    tracing::debug!("oneDNN not used: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// Whether the frozen matmuls run through oneDNN, and which of its kernels: for reports.
pub fn describe() -> String {
    match instance().filter(|_| enabled()) {
        Some(d) => format!(
            "oneDNN matmul ({})",
            d.lock()
                .map(|d| d.implementation.clone())
                .unwrap_or_default()
        ),
        None => "candle gemm".to_string(),
    }
}

/// `a (m×k) · B` into a new row-major (m×n) buffer, `b` holding `Bᵀ` (n×k) when `b_transposed`;
/// `None` when oneDNN is not in use. The buffer is not zero-filled first (oneDNN writes every
/// element; filling 6 MB per call would cost a tenth of the call).
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_transposed: bool,
) -> Option<Vec<f32>> {
    assert!(a.len() >= m * k && b.len() >= n * k);
    // SAFETY: the slices hold the m·k and n·k elements the problem states.
    unsafe {
        matmul_into_new(
            Problem::plain((m, n, k), b_transposed, false),
            a.as_ptr().cast(),
            b.as_ptr().cast(),
        )
    }
}

/// As [`matmul`] with bf16 inputs (f32 accumulation and output): AVX-512 BF16 / AMX kernels
/// where the CPU has them.
pub fn matmul_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: &[half::bf16],
    b: &[half::bf16],
    b_transposed: bool,
) -> Option<Vec<f32>> {
    assert!(a.len() >= m * k && b.len() >= n * k);
    // SAFETY: as above; bf16 is a transparent u16, what oneDNN's bf16 reads.
    unsafe {
        matmul_into_new(
            Problem::plain((m, n, k), b_transposed, true),
            a.as_ptr().cast(),
            b.as_ptr().cast(),
        )
    }
}

/// A strided view of a buffer: element `(i₀, i₁, …)` is at `offset + Σ iⱼ·strides[j]`. The last
/// two dimensions are a matrix's rows and columns, any before them batch dimensions.
#[derive(Clone, Debug)]
pub struct View {
    pub offset: usize,
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
}

impl View {
    /// One past the furthest element the view reaches (its offset when it is empty).
    /// Saturating: a view too large to address reaches past any buffer.
    fn end(&self) -> usize {
        if self.dims.contains(&0) {
            return self.offset;
        }
        self.dims
            .iter()
            .zip(&self.strides)
            .fold(self.offset.saturating_add(1), |end, (d, s)| {
                end.saturating_add((d - 1).saturating_mul(*s))
            })
    }
}

/// The dimensions of `src · weights` for two views (the last two dimensions of each a matrix,
/// any before them batch dimensions, a weights batch dimension of size 1 shared by every src
/// index along it): src's batch dimensions, then m × n.
///
/// Panics when the views do not describe one multiply or reach outside their buffers.
pub fn batched_product_dims(
    src: (&[half::bf16], &View),
    weights: (&[half::bf16], &View),
) -> Vec<usize> {
    let (s, w) = (src.1, weights.1);
    let nd = s.dims.len();
    assert!(
        (2..=12).contains(&nd)
            && [&s.strides, &w.dims, &w.strides]
                .iter()
                .all(|v| v.len() == nd),
        "batched matmul: both views need the same 2 to 12 dimensions and strides"
    );
    assert!(
        w.dims[nd - 2] == s.dims[nd - 1]
            && (0..nd - 2).all(|i| w.dims[i] == s.dims[i] || w.dims[i] == 1),
        "batched matmul: {:?} · {:?}",
        s.dims,
        w.dims
    );
    assert!(
        s.end() <= src.0.len() && w.end() <= weights.0.len(),
        "batched matmul: a view reaches outside its buffer"
    );
    let mut dims = s.dims.clone();
    dims[nd - 1] = w.dims[nd - 1];
    dims
}

/// `src · weights` (see [`batched_product_dims`]), bf16 inputs accumulated in f32, into a new
/// dense row-major buffer; `None` when oneDNN is not in use.
pub fn matmul_batched_bf16(
    src: (&[half::bf16], &View),
    weights: (&[half::bf16], &View),
) -> Option<Vec<f32>> {
    let dims = batched_product_dims(src, weights);
    let (s, w) = (src.1, weights.1);
    let nd = dims.len();
    let mut strides = vec![1usize; nd];
    for i in (0..nd - 1).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    if dims.contains(&0) || s.dims[nd - 1] == 0 {
        // oneDNN rejects empty problems: the product is zeros
        return (enabled() && available()).then(|| vec![0f32; dims.iter().product()]);
    }
    let i64s = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
    let problem = Problem {
        dims: [i64s(&s.dims), i64s(&w.dims), i64s(&dims)],
        strides: [i64s(&s.strides), i64s(&w.strides), i64s(&strides)],
        bf16: true,
    };
    // SAFETY: both views were checked to lie inside their buffers.
    unsafe {
        matmul_into_new(
            problem,
            src.0.as_ptr().add(s.offset).cast(),
            weights.0.as_ptr().add(w.offset).cast(),
        )
    }
}

/// One multiply as oneDNN states it: dimensions and strides (in elements) of src, weights and
/// dst, and whether the inputs are bf16 (the output is f32 either way).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Problem {
    dims: [Vec<i64>; 3],
    strides: [Vec<i64>; 3],
    bf16: bool,
}

impl Problem {
    /// Row-major `(m×k) · (k×n)`, the weights stored as `(n×k)` when transposed.
    fn plain((m, n, k): (usize, usize, usize), b_transposed: bool, bf16: bool) -> Problem {
        let (m, n, k) = (m as i64, n as i64, k as i64);
        Problem {
            dims: [vec![m, k], vec![k, n], vec![m, n]],
            strides: [
                vec![k, 1],
                if b_transposed { vec![1, k] } else { vec![n, 1] },
                vec![n, 1],
            ],
            bf16,
        }
    }

    /// Elements of the (dense) output.
    fn dst_len(&self) -> usize {
        self.dims[2].iter().product::<i64>() as usize
    }
}

/// Runs one multiply into a fresh f32 buffer, which `problem`'s output must fill (dense).
///
/// # Safety
/// `a` and `b` must point to the elements `problem` states, of its input dtype.
unsafe fn matmul_into_new(
    problem: Problem,
    a: *const c_void,
    b: *const c_void,
) -> Option<Vec<f32>> {
    if !enabled() {
        return None;
    }
    let mut d = instance()?.lock().ok()?;
    let len = problem.dst_len();
    let mut out: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(len);
    // MaybeUninit needs no initialisation.
    out.set_len(len);
    d.run(&problem, [a, b, out.as_mut_ptr().cast()]).ok()?;
    let mut out = std::mem::ManuallyDrop::new(out);
    // oneDNN wrote every element of the dense output; MaybeUninit<f32> has f32's layout.
    Some(Vec::from_raw_parts(
        out.as_mut_ptr().cast(),
        out.len(),
        out.capacity(),
    ))
}

impl OneDnn {
    fn load() -> Result<OneDnn, String> {
        // SAFETY: loading a shared library runs its initialisers; oneDNN's are benign.
        let lib = unsafe { libloading::Library::new("libdnnl.so.2") }.map_err(|e| e.to_string())?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol has the C signature of oneDNN 2.x's dnnl.h.
                *unsafe { lib.get($name) }.map_err(|e| format!("{e}"))?
            };
        }
        let engine_create: EngineCreate = sym!(b"dnnl_engine_create\0");
        let stream_create: StreamCreate = sym!(b"dnnl_stream_create\0");
        let api = Api {
            md_init: sym!(b"dnnl_memory_desc_init_by_strides\0"),
            matmul_init: sym!(b"dnnl_matmul_desc_init\0"),
            pd_create: sym!(b"dnnl_primitive_desc_create\0"),
            pd_query: sym!(b"dnnl_primitive_desc_query\0"),
            pd_destroy: sym!(b"dnnl_primitive_desc_destroy\0"),
            prim_create: sym!(b"dnnl_primitive_create\0"),
            prim_destroy: sym!(b"dnnl_primitive_destroy\0"),
            mem_create: sym!(b"dnnl_memory_create\0"),
            mem_destroy: sym!(b"dnnl_memory_destroy\0"),
            execute: sym!(b"dnnl_primitive_execute\0"),
            wait: sym!(b"dnnl_stream_wait\0"),
            _lib: lib,
        };
        let (mut engine, mut stream) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: out-pointers to locals.
        unsafe {
            check(engine_create(&mut engine, DNNL_CPU, 0), "engine")?;
            check(
                stream_create(&mut stream, engine, STREAM_IN_ORDER),
                "stream",
            )?;
        }
        let mut d = OneDnn {
            api,
            engine,
            stream,
            primitives: HashMap::new(),
            implementation: String::new(),
        };
        d.self_check()?;
        Ok(d)
    }

    /// Multiplies small known matrices both ways and compares with the plain sum: a library
    /// whose enum values or layout conventions differ from what this file assumes is not used.
    fn self_check(&mut self) -> Result<(), String> {
        let (m, n, k) = (3, 5, 4);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 - 3.0).collect(); // n×k
        for transposed in [true, false] {
            let mut out = vec![0f32; m * n];
            // as (k×n) when not transposed: reinterpret the same numbers
            // SAFETY: sizes as stated.
            unsafe {
                self.run(
                    &Problem::plain((m, n, k), transposed, false),
                    [
                        a.as_ptr().cast(),
                        w.as_ptr().cast(),
                        out.as_mut_ptr().cast(),
                    ],
                )?
            };
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k)
                        .map(|p| {
                            a[i * k + p]
                                * if transposed {
                                    w[j * k + p]
                                } else {
                                    w[p * n + j]
                                }
                        })
                        .sum();
                    if (out[i * n + j] - want).abs() > 1e-4 {
                        return Err(format!(
                            "self-check failed (transposed {transposed}): {} vs {want}",
                            out[i * n + j]
                        ));
                    }
                }
            }
        }
        self.forget_primitives();
        Ok(())
    }

    fn forget_primitives(&mut self) {
        for (_, p) in self.primitives.drain() {
            // SAFETY: created by prim_create and no longer referenced.
            unsafe { (self.api.prim_destroy)(p.handle) };
        }
    }

    /// # Safety
    /// The pointers (src, weights, dst) must reach every element `problem` states.
    unsafe fn run(&mut self, problem: &Problem, ptrs: [*const c_void; 3]) -> Result<(), String> {
        if self.primitives.len() > 512 {
            // shapes vary with batch padding; bound the cache instead of tracking use
            self.forget_primitives();
        }
        if !self.primitives.contains_key(problem) {
            let p = self.create(problem)?;
            self.primitives.insert(problem.clone(), p);
        }
        let api = &self.api;
        let p = self.primitives.get_mut(problem).expect("inserted above");
        let mut mems = [std::ptr::null_mut(); 3];
        let mut result = Ok(());
        for i in 0..3 {
            if let Err(e) = check(
                (api.mem_create)(
                    &mut mems[i],
                    p.mds[i].ptr(),
                    self.engine,
                    ptrs[i] as *mut c_void,
                ),
                "memory",
            ) {
                result = Err(e);
            }
        }
        if result.is_ok() {
            let args = [
                ExecArg {
                    arg: ARG_SRC,
                    memory: mems[0],
                },
                ExecArg {
                    arg: ARG_WEIGHTS,
                    memory: mems[1],
                },
                ExecArg {
                    arg: ARG_DST,
                    memory: mems[2],
                },
            ];
            result = check(
                (api.execute)(p.handle, self.stream, 3, args.as_ptr()),
                "execute",
            )
            .and_then(|_| check((api.wait)(self.stream), "wait"));
        }
        for mem in mems.into_iter().filter(|m| !m.is_null()) {
            (api.mem_destroy)(mem);
        }
        result
    }

    unsafe fn create(&mut self, problem: &Problem) -> Result<Primitive, String> {
        let api = &self.api;
        let mut mds = [Opaque::<1024>::zeroed(), Opaque::zeroed(), Opaque::zeroed()];
        // bf16 inputs accumulate and come out in f32
        let input = if problem.bf16 { DNNL_BF16 } else { DNNL_F32 };
        let dtypes = [input, input, DNNL_F32];
        for i in 0..3 {
            // dnnl_dims_t is a fixed array of 12
            let (mut dims, mut strides) = ([0i64; 12], [0i64; 12]);
            let nd = problem.dims[i].len();
            dims[..nd].copy_from_slice(&problem.dims[i]);
            strides[..nd].copy_from_slice(&problem.strides[i]);
            check(
                (api.md_init)(
                    mds[i].ptr(),
                    nd as c_int,
                    dims.as_ptr(),
                    dtypes[i],
                    strides.as_ptr(),
                ),
                "memory desc",
            )?;
        }
        let mut desc = Opaque::<4096>::zeroed();
        check(
            (api.matmul_init)(
                desc.ptr(),
                mds[0].ptr(),
                mds[1].ptr(),
                std::ptr::null(),
                mds[2].ptr(),
            ),
            "matmul desc",
        )?;
        let mut pd = std::ptr::null_mut();
        check(
            (api.pd_create)(
                &mut pd,
                desc.ptr(),
                std::ptr::null(),
                self.engine,
                std::ptr::null(),
            ),
            "primitive desc",
        )?;
        let mut name: *const c_char = std::ptr::null();
        let implementation = if (api.pd_query)(
            pd,
            QUERY_IMPL_INFO_STR,
            0,
            (&mut name as *mut *const c_char).cast(),
        ) == DNNL_SUCCESS
            && !name.is_null()
        {
            std::ffi::CStr::from_ptr(name).to_string_lossy().to_string()
        } else {
            String::new()
        };
        tracing::debug!(?problem, %implementation, "oneDNN matmul");
        if self.implementation.is_empty() {
            self.implementation = implementation;
        }
        let mut handle = std::ptr::null_mut();
        let created = check((api.prim_create)(&mut handle, pd), "primitive");
        (api.pd_destroy)(pd);
        created?;
        Ok(Primitive { handle, mds })
    }
}

fn check(status: Status, what: &str) -> Result<(), String> {
    if status == DNNL_SUCCESS {
        Ok(())
    } else {
        Err(format!("oneDNN {what}: status {status}"))
    }
}

/// GFLOP/s of oneDNN's matmul on (m×k)·(k×n), the weight as stored (transposed), f32 or bf16
/// inputs: the ceiling a training step's matmul share is measured against.
pub fn matmul_gflops(m: usize, n: usize, k: usize, bf16: bool, runs: usize) -> Option<f64> {
    if !(enabled() && available()) {
        return None;
    }
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; n * k];
    let (a16, b16): (Vec<half::bf16>, Vec<half::bf16>) = if bf16 {
        (
            a.iter().map(|&v| half::bf16::from_f32(v)).collect(),
            b.iter().map(|&v| half::bf16::from_f32(v)).collect(),
        )
    } else {
        (vec![], vec![])
    };
    // The fastest of many runs: a ceiling, and robust to a neighbour stealing a core for a while
    // (a median of 12 read anywhere from 390 to 500 GFLOP/s on this shared machine).
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t0 = std::time::Instant::now();
        let out = if bf16 {
            matmul_bf16(m, n, k, &a16, &b16, true)
        } else {
            matmul(m, n, k, &a, &b, true)
        };
        times.push(t0.elapsed().as_secs_f64());
        out?;
    }
    let fastest = times.iter().copied().fold(f64::INFINITY, f64::min);
    Some(2.0 * (m * n * k) as f64 / fastest / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_the_plain_sum() {
        assert!(
            available(),
            "oneDNN (libdnnl.so.2) is not installed: apt-get install libdnnl2 (scripts/test.sh does)"
        );
        let (m, n, k) = (37, 19, 53);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5) % 11) as f32 / 11.0 - 0.5)
            .collect();
        let out = matmul(m, n, k, &a, &w, true).expect("oneDNN runs");
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * w[j * k + p]).sum();
                assert!((out[i * n + j] - want).abs() < 1e-4);
            }
        }
    }
}
