//! GGUF weights multiplied as llama.cpp multiplies them when decoding: the activations
//! quantized to 8 bits per block of 32 (ggml's `q8_1`: a scale and the scaled sum of the codes),
//! integer dot products per block, one scale (and minimum) per block of the weight. Unlike
//! candle's matrix-vector products, which load and unpack every weight block again for each
//! activation row, a block here is loaded and unpacked once for up to [`ROWS`] rows of a decode
//! batch; what is left per row is the integer products themselves.
//!
//! The weights are repacked at load into two forms that cover the 4- and 8-bit GGML types:
//! unsigned 4-bit codes with a float32 scale and minimum per 32 values (`value = scale·q + min`:
//! Q4_0, Q4_1, and Q4_K's 32-value sub-blocks, exactly), and signed 8-bit codes with a float32
//! scale (Q8_0, exactly). Block layouts: ggml's `ggml-common.h`.
//!
//! Each row's arithmetic is the same whatever the other rows of the batch are (rows never share
//! an accumulator), so a sequence decodes to the same numbers alone or batched.

use half::f16;

use super::cpu::SharedMut;

/// Values per block.
pub const BLOCK: usize = 32;
/// Activation rows one weight block is unpacked for.
pub const ROWS: usize = 8;

/// A weight repacked for [`PackedWeight::matmul`].
#[derive(Debug, Clone)]
pub struct PackedWeight {
    /// Output features (the weight's rows).
    rows: usize,
    /// Input features, a multiple of [`BLOCK`].
    cols: usize,
    codes: Codes,
    /// One per block, row-major.
    scales: Vec<f32>,
}

#[derive(Debug, Clone)]
enum Codes {
    /// 16 bytes per block: byte `i` holds value `i` (low nibble) and value `i + 16` (high), as
    /// Q4_0 and Q4_1 store them; with each block's minimum.
    Unsigned4 { packed: Vec<u8>, mins: Vec<f32> },
    /// 32 signed bytes per block.
    Signed8 { codes: Vec<i8> },
}

/// The GGML block types [`PackedWeight::from_ggml`] repacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlBlocks {
    Q4_0,
    Q4_1,
    Q4K,
    Q8_0,
}

impl GgmlBlocks {
    /// Bytes of one stored block and the values it holds.
    fn block(self) -> (usize, usize) {
        match self {
            GgmlBlocks::Q4_0 => (18, 32),
            GgmlBlocks::Q4_1 => (20, 32),
            GgmlBlocks::Q4K => (144, 256),
            GgmlBlocks::Q8_0 => (34, 32),
        }
    }
}

fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Q4_K's 6-bit scale and minimum of sub-block `j` (0 to 7) from its 12 packed bytes.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

impl PackedWeight {
    /// `rows × cols` values stored as `kind`'s blocks, row after row, in `bytes`.
    pub fn from_ggml(kind: GgmlBlocks, bytes: &[u8], rows: usize, cols: usize) -> PackedWeight {
        let (size, per) = kind.block();
        assert!(
            cols.is_multiple_of(per),
            "{kind:?} weight: {cols} columns are not whole blocks of {per}"
        );
        assert_eq!(
            bytes.len(),
            rows * cols / per * size,
            "{kind:?} weight: bytes for {rows} x {cols}"
        );
        let blocks = rows * cols / BLOCK;
        let mut scales = Vec::with_capacity(blocks);
        let codes = match kind {
            GgmlBlocks::Q8_0 => {
                let mut codes = Vec::with_capacity(blocks * BLOCK);
                for b in bytes.chunks_exact(size) {
                    scales.push(half(b, 0));
                    codes.extend(b[2..].iter().map(|&c| c as i8));
                }
                Codes::Signed8 { codes }
            }
            GgmlBlocks::Q4_0 | GgmlBlocks::Q4_1 => {
                let (mut packed, mut mins) = (Vec::with_capacity(blocks * 16), Vec::new());
                for b in bytes.chunks_exact(size) {
                    let d = half(b, 0);
                    scales.push(d);
                    // Q4_0 is centred on 8: value = d·(q − 8)
                    mins.push(if kind == GgmlBlocks::Q4_1 {
                        half(b, 2)
                    } else {
                        -8.0 * d
                    });
                    packed.extend_from_slice(&b[size - 16..]);
                }
                Codes::Unsigned4 { packed, mins }
            }
            GgmlBlocks::Q4K => {
                let (mut packed, mut mins) = (Vec::with_capacity(blocks * 16), Vec::new());
                for b in bytes.chunks_exact(size) {
                    let (d, dmin, s, qs) = (half(b, 0), half(b, 2), &b[4..16], &b[16..]);
                    // 64 values per 32 bytes: sub-block 2j in the low nibbles, 2j + 1 in the high
                    for j in 0..4 {
                        let q = &qs[32 * j..32 * j + 32];
                        for (sub, shift) in [(2 * j, 0), (2 * j + 1, 4)] {
                            let (sc, m) = q4k_scale_min(sub, s);
                            scales.push(d * sc as f32);
                            mins.push(-(dmin * m as f32));
                            let nibble = |i: usize| (q[i] >> shift) & 0xF;
                            packed.extend((0..16).map(|i| nibble(i) | (nibble(i + 16) << 4)));
                        }
                    }
                }
                Codes::Unsigned4 { packed, mins }
            }
        };
        PackedWeight {
            rows,
            cols,
            codes,
            scales,
        }
    }

    /// (rows, cols): output and input features.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * self.scales.len()
            + match &self.codes {
                Codes::Unsigned4 { packed, mins } => packed.len() + 4 * mins.len(),
                Codes::Signed8 { codes } => codes.len(),
            }
    }

    /// The float32 values, `rows × cols` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (b, &d) in self.scales.iter().enumerate() {
            match &self.codes {
                Codes::Unsigned4 { packed, mins } => {
                    let q = &packed[16 * b..16 * b + 16];
                    out.extend(q.iter().map(|&c| d * (c & 0xF) as f32 + mins[b]));
                    out.extend(q.iter().map(|&c| d * (c >> 4) as f32 + mins[b]));
                }
                Codes::Signed8 { codes } => out.extend(
                    codes[BLOCK * b..BLOCK * (b + 1)]
                        .iter()
                        .map(|&c| d * c as f32),
                ),
            }
        }
        out
    }

    /// `x · Wᵀ` for `x` of `m` rows of `cols` values: `m × rows` values, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "quantized matmul: x's length");
        let a = Activations::quantize(x, m, self.cols);
        let (n, nb) = (self.rows, self.cols / BLOCK);
        let mut out = vec![0f32; m * n];
        let dst = SharedMut::new(&mut out);
        let simd = avx2();
        // a few dozen weight rows per work item: enough to amortise the hand-off, small enough
        // that two threads share a 576-row projection evenly
        super::cpu::par_blocks(n, 16, |start, end| {
            let mut sums = [0f32; ROWS];
            for col in start..end {
                let w = self.row(col, nb);
                for first in (0..m).step_by(ROWS) {
                    let r = (m - first).min(ROWS);
                    if simd {
                        // SAFETY: AVX2 and FMA are present (checked above).
                        unsafe { w.dot_avx2(&a, first, &mut sums[..r]) }
                    } else {
                        w.dot_scalar(&a, first, &mut sums[..r])
                    }
                    for (i, s) in sums[..r].iter().enumerate() {
                        // SAFETY: (row first + i, column col) is written by this item alone.
                        unsafe { *dst.ptr().add((first + i) * n + col) = *s };
                    }
                }
            }
        });
        out
    }

    /// Weight row `col`'s blocks.
    fn row(&self, col: usize, nb: usize) -> Row<'_> {
        let at = col * nb;
        Row {
            scales: &self.scales[at..at + nb],
            codes: match &self.codes {
                Codes::Unsigned4 { packed, mins } => RowCodes::Unsigned4 {
                    packed: &packed[16 * at..16 * (at + nb)],
                    mins: &mins[at..at + nb],
                },
                Codes::Signed8 { codes } => RowCodes::Signed8 {
                    codes: &codes[BLOCK * at..BLOCK * (at + nb)],
                },
            },
        }
    }
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows of activations quantized as ggml's `q8_1`: per block of 32, `d = max|x| / 127`, codes
/// `round(x / d)`, and `s = d · Σ codes` (what a weight block's minimum multiplies), the `s`
/// of each block kept for [`ROWS`] rows side by side (zeros past the last row), so that the
/// minimums' share of [`ROWS`] rows is one multiply-add per block.
struct Activations {
    codes: Vec<i8>,
    d: Vec<f32>,
    /// `(blocks, padded rows)`: block `b`'s `s` of row `r` at `b · padded + r`.
    s_by_block: Vec<f32>,
    padded: usize,
    nb: usize,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, cols: usize) -> Activations {
        let nb = cols / BLOCK;
        let padded = m.div_ceil(ROWS) * ROWS;
        let mut a = Activations {
            codes: Vec::with_capacity(m * cols),
            d: Vec::with_capacity(m * nb),
            // eight more: the minimums' share loads eight rows' values from a group's first
            s_by_block: vec![0.0; nb * padded + 8],
            padded,
            nb,
        };
        a.codes.resize(m * cols, 0);
        let simd = avx2();
        for (i, (block, codes)) in x
            .chunks_exact(BLOCK)
            .zip(a.codes.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let (d, sum) = if simd {
                // SAFETY: AVX2 is present; both blocks hold BLOCK values.
                unsafe { quantize_block_avx2(block, codes) }
            } else {
                quantize_block(block, codes)
            };
            a.d.push(d);
            let (row, b) = (i / nb, i % nb);
            a.s_by_block[b * padded + row] = d * sum as f32;
        }
        a
    }
}

/// One block of 32 activations to codes; returns its scale and the sum of its codes. Rounding
/// half away from zero, as ggml's `roundf`.
fn quantize_block(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (v, c) in x.iter().zip(codes) {
        *c = (v * id).round() as i8;
        sum += *c as i32;
    }
    (d, sum)
}

/// [`quantize_block`] with AVX2, to the same codes (`round` as LLVM lowers it: add ±0.49999997,
/// then truncate).
///
/// # Safety
/// The CPU must have AVX2; `x` and `codes` hold [`BLOCK`] values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(x.len() == BLOCK && codes.len() == BLOCK);
    let sign = _mm256_set1_ps(-0.0);
    let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(x.as_ptr().add(8 * j)));
    let abs = |v: __m256| _mm256_andnot_ps(sign, v);
    let m = _mm256_max_ps(
        _mm256_max_ps(abs(v[0]), abs(v[1])),
        _mm256_max_ps(abs(v[2]), abs(v[3])),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let half = _mm256_set1_ps(0.49999997);
    let q: [__m256i; 4] = std::array::from_fn(|j| {
        let s = _mm256_mul_ps(v[j], id);
        let r = _mm256_add_ps(s, _mm256_or_ps(half, _mm256_and_ps(s, sign)));
        _mm256_cvttps_epi32(r)
    });
    let total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let t = _mm_add_epi32(
        _mm256_castsi256_si128(total),
        _mm256_extracti128_si256(total, 1),
    );
    let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
    let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
    // i32 → i16 → i8 packs interleave the 128-bit lanes; the permute puts them back in order
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(codes.as_mut_ptr() as *mut __m256i, ordered);
    (d, _mm_cvtsi128_si32(t))
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_block_avx2(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
    quantize_block(x, codes)
}

struct Row<'a> {
    scales: &'a [f32],
    codes: RowCodes<'a>,
}

enum RowCodes<'a> {
    Unsigned4 { packed: &'a [u8], mins: &'a [f32] },
    Signed8 { codes: &'a [i8] },
}

impl Row<'_> {
    /// The minimums' share of row `row`'s dot product, `Σ_b min_b · s_b` (none for signed
    /// codes), added once the blocks' integer products are summed.
    fn min_term(&self, a: &Activations, row: usize) -> f32 {
        match self.codes {
            RowCodes::Unsigned4 { mins, .. } => mins
                .iter()
                .enumerate()
                .map(|(b, m)| m * a.s_by_block[b * a.padded + row])
                .sum(),
            RowCodes::Signed8 { .. } => 0.0,
        }
    }

    /// The dot products of this weight row with activation rows `first ..` (one per entry of
    /// `out`), in plain Rust: the reference the AVX2 path is tested against, and the path of
    /// CPUs without it.
    fn dot_scalar(&self, a: &Activations, first: usize, out: &mut [f32]) {
        let nb = a.nb;
        for (i, o) in out.iter_mut().enumerate() {
            let row = first + i;
            let mut acc = 0f32;
            for (b, &dw) in self.scales.iter().enumerate() {
                let xa = &a.codes[(row * nb + b) * BLOCK..(row * nb + b + 1) * BLOCK];
                let sumi: i32 = match self.codes {
                    RowCodes::Unsigned4 { packed, .. } => {
                        let q = &packed[16 * b..16 * b + 16];
                        (0..16)
                            .map(|j| {
                                (q[j] & 0xF) as i32 * xa[j] as i32
                                    + (q[j] >> 4) as i32 * xa[j + 16] as i32
                            })
                            .sum()
                    }
                    RowCodes::Signed8 { codes } => codes[BLOCK * b..BLOCK * (b + 1)]
                        .iter()
                        .zip(xa)
                        .map(|(&w, &x)| w as i32 * x as i32)
                        .sum(),
                };
                acc += dw * a.d[row * nb + b] * sumi as f32;
            }
            *o = acc + self.min_term(a, row);
        }
    }

    /// [`Row::dot_scalar`] with AVX2 (see [`Row::dot_avx2_rows`]).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(&self, a: &Activations, first: usize, out: &mut [f32]) {
        // a fixed count of rows, so that their accumulators stay in registers
        macro_rules! rows {
            ($($r:literal)*) => {
                match (out.len(), &self.codes) {
                    $(
                        ($r, RowCodes::Unsigned4 { .. }) => self.dot_avx2_rows::<$r, false>(a, first, out),
                        ($r, RowCodes::Signed8 { .. }) => self.dot_avx2_rows::<$r, true>(a, first, out),
                    )*
                    _ => unreachable!("at most ROWS rows at once"),
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8)
    }

    /// The dot products of this weight row with activation rows `first .. first + R`: each
    /// weight block loaded and unpacked once for the rows, 32 products per `maddubs` (unsigned
    /// weight codes times signed activation codes; signed weights move their sign over to the
    /// activations first), a float32 accumulator per row; the minimums' share of all the rows
    /// one multiply-add per block; the rows' accumulators summed across lanes together.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `out` holds `R` values; the codes are `SIGNED`'s.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot_avx2_rows<const R: usize, const SIGNED: bool>(
        &self,
        a: &Activations,
        first: usize,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let nb = a.nb;
        assert!(out.len() == R && R <= ROWS && (first + R) * nb <= a.d.len());
        assert!(first.is_multiple_of(ROWS) && a.s_by_block.len() == nb * a.padded + 8);
        let (packed, signed, mins) = match self.codes {
            RowCodes::Unsigned4 { packed, mins } => (packed.as_ptr(), std::ptr::null(), mins),
            RowCodes::Signed8 { codes } => (std::ptr::null(), codes.as_ptr(), &[][..]),
        };
        assert_eq!(SIGNED, packed.is_null());
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut min_share = _mm256_setzero_ps();
        let (xa, da) = (a.codes.as_ptr(), a.d.as_ptr());
        for b in 0..nb {
            let dw = _mm256_set1_ps(*self.scales.get_unchecked(b));
            // the weight block as 32 unsigned bytes (and, signed, its codes for their signs)
            let (w, q) = if SIGNED {
                let q = _mm256_loadu_si256(signed.add(BLOCK * b) as *const __m256i);
                (_mm256_sign_epi8(q, q), q)
            } else {
                let q = _mm_loadu_si128(packed.add(16 * b) as *const __m128i);
                let lo = _mm_and_si128(q, low);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                let s = _mm256_loadu_ps(a.s_by_block.as_ptr().add(b * a.padded + first));
                min_share = _mm256_fmadd_ps(_mm256_set1_ps(*mins.get_unchecked(b)), s, min_share);
                (_mm256_set_m128i(hi, lo), _mm256_setzero_si256())
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = (first + i) * nb + b;
                let mut x = _mm256_loadu_si256(xa.add(at * BLOCK) as *const __m256i);
                if SIGNED {
                    x = _mm256_sign_epi8(x, q);
                }
                let pairs = _mm256_maddubs_epi16(w, x);
                let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                let scale = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*da.add(at)));
                *acc = _mm256_fmadd_ps(sums, scale, *acc);
            }
        }
        // lane i: the sum of row i's accumulator
        let lane = |i: usize| if i < R { acc[i] } else { _mm256_setzero_ps() };
        let pair = |i: usize| _mm256_hadd_ps(lane(i), lane(i + 1));
        let (q0, q1) = (
            _mm256_hadd_ps(pair(0), pair(2)),
            _mm256_hadd_ps(pair(4), pair(6)),
        );
        let sums = _mm256_add_ps(
            _mm256_permute2f128_ps(q0, q1, 0x20),
            _mm256_permute2f128_ps(q0, q1, 0x31),
        );
        let mut all = [0f32; 8];
        _mm256_storeu_ps(all.as_mut_ptr(), _mm256_add_ps(sums, min_share));
        out.copy_from_slice(&all[..R]);
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn dot_avx2(&self, a: &Activations, first: usize, out: &mut [f32]) {
        self.dot_scalar(a, first, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random blocks of `kind` with sensible scales (f16 within range).
    fn random_blocks(kind: GgmlBlocks, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (size, per) = kind.block();
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / per {
            let mut b: Vec<u8> = (0..size).map(|_| rng.random()).collect();
            let scale = |rng: &mut rand_chacha::ChaCha8Rng| {
                f16::from_f32(rng.random_range(-0.05f32..0.05)).to_le_bytes()
            };
            b[..2].copy_from_slice(&scale(&mut rng));
            if matches!(kind, GgmlBlocks::Q4_1 | GgmlBlocks::Q4K) {
                b[2..4].copy_from_slice(&scale(&mut rng));
            }
            bytes.extend(b);
        }
        bytes
    }

    /// The vector quantization of activations gives the plain one's codes, ties included.
    #[test]
    fn activations_quantize_alike_on_both_paths() {
        if !avx2() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for round in 0..200 {
            let mut x: Vec<f32> = (0..BLOCK).map(|_| rng.random_range(-4f32..4.0)).collect();
            if round % 3 == 0 {
                // exact halves after scaling: max 127 makes d 1
                x[0] = 127.0;
                for (j, v) in x.iter_mut().enumerate().skip(1) {
                    *v = (j as f32 - 16.0) + 0.5;
                }
            }
            if round == 1 {
                x.iter_mut().for_each(|v| *v = 0.0);
            }
            let (mut plain, mut vector) = ([0i8; BLOCK], [0i8; BLOCK]);
            let p = quantize_block(&x, &mut plain);
            // SAFETY: AVX2 checked above.
            let v = unsafe { quantize_block_avx2(&x, &mut vector) };
            assert_eq!((p, plain), (v, vector), "round {round}");
        }
    }

    /// The weight's numbers against candle's own dequantization of the same GGML bytes.
    #[test]
    fn repacked_blocks_hold_what_ggml_stores() {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
        use candle_core::Device;
        for (kind, dtype) in [
            (GgmlBlocks::Q4_0, GgmlDType::Q4_0),
            (GgmlBlocks::Q4_1, GgmlDType::Q4_1),
            (GgmlBlocks::Q4K, GgmlDType::Q4K),
            (GgmlBlocks::Q8_0, GgmlDType::Q8_0),
        ] {
            let (rows, cols) = (6, 512);
            let bytes = random_blocks(kind, rows, cols, 7);
            let q = qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &Device::Cpu)
                .expect("candle reads the blocks");
            let reference: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all()?.to_vec1())
                .expect("candle dequantizes");
            let ours = PackedWeight::from_ggml(kind, &bytes, rows, cols).dequantize();
            for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "{kind:?} value {i}: {a} vs {b}"
                );
            }
        }
    }

    /// The products against the same quantized activations times the dequantized weight in f64
    /// (the only rounding left is float32 accumulation), on both paths, for row counts that
    /// fill a group of [`ROWS`] and leave part of one; each row's numbers the same bits whatever
    /// rows share its batch.
    #[test]
    fn products_are_the_blocks_dot_products_and_rows_do_not_mix() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for kind in [
            GgmlBlocks::Q4_0,
            GgmlBlocks::Q4_1,
            GgmlBlocks::Q4K,
            GgmlBlocks::Q8_0,
        ] {
            let (n, k) = (37, 768);
            let w = PackedWeight::from_ggml(kind, &random_blocks(kind, n, k, 11), n, k);
            let dense = w.dequantize();
            let m = 11;
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3f32..3.0)).collect();
            let a = Activations::quantize(&x, m, k);
            let y = w.matmul(&x, m);
            for row in 0..m {
                for col in 0..n {
                    let exact: f64 = (0..k)
                        .map(|j| {
                            let b = row * (k / BLOCK) + j / BLOCK;
                            a.codes[row * k + j] as f64 * a.d[b] as f64 * dense[col * k + j] as f64
                        })
                        .sum();
                    let got = y[row * n + col] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                        "{kind:?} ({row}, {col}): {got} vs {exact}"
                    );
                }
                let alone = w.matmul(&x[row * k..(row + 1) * k], 1);
                assert_eq!(
                    alone,
                    y[row * n..(row + 1) * n],
                    "{kind:?}: row {row} alone"
                );
            }
            // the plain path agrees with the vector one
            let mut scalar = vec![0f32; m];
            for col in 0..n {
                for first in (0..m).step_by(ROWS) {
                    let r = (m - first).min(ROWS);
                    w.row(col, k / BLOCK)
                        .dot_scalar(&a, first, &mut scalar[first..first + r]);
                }
                for row in 0..m {
                    let (s, v) = (scalar[row], y[row * n + col]);
                    assert!(
                        (s - v).abs() <= 1e-4 * (1.0 + s.abs()),
                        "{kind:?}: {s} vs {v}"
                    );
                }
            }
        }
    }
}
