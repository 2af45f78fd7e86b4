//! Frozen quantized base weights for QLoRA: NF4 and FP4 (4-bit, blocks of 64, optional double
//! quantization of the block constants), INT8 (blocks of 64), and GGUF's own GGML types.
//!
//! The layouts follow bitsandbytes bit for bit (checked against a fixture it produced): codes are
//! 4-bit indices into a 16-value table, two per byte with the even element in the high nibble; a
//! block's scale is its absmax; double quantization stores (absmax − mean) as 8-bit indices into
//! bitsandbytes' dynamic map, in blocks of 256 with a float32 scale each.
//!
//! Dequantization uses only device-generic tensor ops (table lookups and broadcasts), so it runs
//! wherever candle does. A quantized linear dequantizes in its forward and again in its backward:
//! no dense copy of the weight lives between the two.

use crate::train::timing::{self, Part};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::kernels::qdot::{GgmlBlocks, PackedWeight};
use crate::train::{ops, Result};

/// NormalFloat-4 (QLoRA paper; bitsandbytes `get_4bit_type("nf4")`), code 0 … 15, written as
/// bitsandbytes prints them (each parses to the exact float32).
#[allow(clippy::excessive_precision)]
pub const NF4: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' FP4 (sign, 2 exponent bits, 1 mantissa bit), scaled to a maximum of 1:
/// `[0, 0.0625, 8, 12, 4, 6, 2, 3, −0, −0.0625, −8, −12, −4, −6, −2, −3] / 12`.
pub const FP4: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), sorted: the code
/// of double-quantized block constants. Exact float32 values, hence the long literals.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
pub const DYNAMIC_MAP: [f32; 256] = [
    -0.992968738079071,
    -0.9789062738418579,
    -0.96484375,
    -0.9507812261581421,
    -0.936718761920929,
    -0.922656238079071,
    -0.9085937738418579,
    -0.89453125,
    -0.8804687261581421,
    -0.866406261920929,
    -0.852343738079071,
    -0.8382812738418579,
    -0.82421875,
    -0.8101562261581421,
    -0.796093761920929,
    -0.782031238079071,
    -0.7679687738418579,
    -0.75390625,
    -0.7398437261581421,
    -0.725781261920929,
    -0.7117187976837158,
    -0.6976562738418579,
    -0.68359375,
    -0.6695312261581421,
    -0.655468761920929,
    -0.6414062976837158,
    -0.6273437738418579,
    -0.61328125,
    -0.5992187261581421,
    -0.585156261920929,
    -0.5710937976837158,
    -0.5570312738418579,
    -0.54296875,
    -0.5289062261581421,
    -0.5148437023162842,
    -0.500781238079071,
    -0.48671871423721313,
    -0.47265625,
    -0.4585937261581421,
    -0.44453126192092896,
    -0.43046873807907104,
    -0.4164062440395355,
    -0.40234375,
    -0.3882812261581421,
    -0.37421876192092896,
    -0.36015623807907104,
    -0.3460937440395355,
    -0.33203125,
    -0.3179687261581421,
    -0.30390626192092896,
    -0.28984373807907104,
    -0.2757812738418579,
    -0.26171875,
    -0.24765624105930328,
    -0.23359374701976776,
    -0.21953125298023224,
    -0.20546874403953552,
    -0.19140625,
    -0.17734375596046448,
    -0.16328124701976776,
    -0.14921875298023224,
    -0.13515624403953552,
    -0.12109375,
    -0.10703125596046448,
    -0.09859374910593033,
    -0.09578125923871994,
    -0.09296875447034836,
    -0.09015624970197678,
    -0.08734375238418579,
    -0.08453124761581421,
    -0.08171875774860382,
    -0.07890625298023224,
    -0.07609374821186066,
    -0.07328125089406967,
    -0.07046874612569809,
    -0.0676562562584877,
    -0.06484375149011612,
    -0.062031250447034836,
    -0.05921875312924385,
    -0.05640624836087227,
    -0.053593751043081284,
    -0.05078125,
    -0.047968748956918716,
    -0.04515625163912773,
    -0.04234374687075615,
    -0.039531249552965164,
    -0.03671875223517418,
    -0.033906251192092896,
    -0.031093750149011612,
    -0.028281250968575478,
    -0.025468749925494194,
    -0.02265625074505806,
    -0.019843751564621925,
    -0.017031250521540642,
    -0.014218750409781933,
    -0.011406250298023224,
    -0.009718749672174454,
    -0.009156249463558197,
    -0.008593750186264515,
    -0.008031249977648258,
    -0.0074687497690320015,
    -0.006906250026077032,
    -0.006343749817460775,
    -0.005781250074505806,
    -0.0052187503315508366,
    -0.0046562496572732925,
    -0.004093749914318323,
    -0.0035312497057020664,
    -0.002968749962747097,
    -0.002406249986961484,
    -0.001843750011175871,
    -0.001281249918974936,
    -0.0009437500848434865,
    -0.0008312499849125743,
    -0.0007187500596046448,
    -0.0006062500760890543,
    -0.000493750034365803,
    -0.0003812500217463821,
    -0.0002687500382307917,
    -0.00015625001105945557,
    -8.874999912222847e-05,
    -6.625000241911039e-05,
    -4.374999844003469e-05,
    -2.1249998098937795e-05,
    -7.749999895168003e-06,
    -3.250000190746505e-06,
    -5.500000384017767e-07,
    0.0,
    5.500000384017767e-07,
    3.250000190746505e-06,
    7.749999895168003e-06,
    2.1249998098937795e-05,
    4.374999844003469e-05,
    6.625000241911039e-05,
    8.874999912222847e-05,
    0.00015625001105945557,
    0.0002687500382307917,
    0.0003812500217463821,
    0.000493750034365803,
    0.0006062500760890543,
    0.0007187500596046448,
    0.0008312499849125743,
    0.0009437500848434865,
    0.001281249918974936,
    0.001843750011175871,
    0.002406249986961484,
    0.002968749962747097,
    0.0035312497057020664,
    0.004093749914318323,
    0.0046562496572732925,
    0.0052187503315508366,
    0.005781250074505806,
    0.006343749817460775,
    0.006906250026077032,
    0.0074687497690320015,
    0.008031249977648258,
    0.008593750186264515,
    0.009156249463558197,
    0.009718749672174454,
    0.011406250298023224,
    0.014218750409781933,
    0.017031250521540642,
    0.019843751564621925,
    0.02265625074505806,
    0.025468749925494194,
    0.028281250968575478,
    0.031093750149011612,
    0.033906251192092896,
    0.03671875223517418,
    0.039531249552965164,
    0.04234374687075615,
    0.04515625163912773,
    0.047968748956918716,
    0.05078125,
    0.053593751043081284,
    0.05640624836087227,
    0.05921875312924385,
    0.062031250447034836,
    0.06484375149011612,
    0.0676562562584877,
    0.07046874612569809,
    0.07328125089406967,
    0.07609374821186066,
    0.07890625298023224,
    0.08171875774860382,
    0.08453124761581421,
    0.08734375238418579,
    0.09015624970197678,
    0.09296875447034836,
    0.09578125923871994,
    0.09859374910593033,
    0.10703125596046448,
    0.12109375,
    0.13515624403953552,
    0.14921875298023224,
    0.16328124701976776,
    0.17734375596046448,
    0.19140625,
    0.20546874403953552,
    0.21953125298023224,
    0.23359374701976776,
    0.24765624105930328,
    0.26171875,
    0.2757812738418579,
    0.28984373807907104,
    0.30390626192092896,
    0.3179687261581421,
    0.33203125,
    0.3460937440395355,
    0.36015623807907104,
    0.37421876192092896,
    0.3882812261581421,
    0.40234375,
    0.4164062440395355,
    0.43046873807907104,
    0.44453126192092896,
    0.4585937261581421,
    0.47265625,
    0.48671871423721313,
    0.500781238079071,
    0.5148437023162842,
    0.5289062261581421,
    0.54296875,
    0.5570312738418579,
    0.5710937976837158,
    0.585156261920929,
    0.5992187261581421,
    0.61328125,
    0.6273437738418579,
    0.6414062976837158,
    0.655468761920929,
    0.6695312261581421,
    0.68359375,
    0.6976562738418579,
    0.7117187976837158,
    0.725781261920929,
    0.7398437261581421,
    0.75390625,
    0.7679687738418579,
    0.782031238079071,
    0.796093761920929,
    0.8101562261581421,
    0.82421875,
    0.8382812738418579,
    0.852343738079071,
    0.866406261920929,
    0.8804687261581421,
    0.89453125,
    0.9085937738418579,
    0.922656238079071,
    0.936718761920929,
    0.9507812261581421,
    0.96484375,
    0.9789062738418579,
    0.992968738079071,
    1.0,
];

pub const BLOCK_4BIT: usize = 64;
pub const BLOCK_INT8: usize = 64;
pub const BLOCK_DOUBLE_QUANT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind4 {
    Nf4,
    Fp4,
}

impl Kind4 {
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            Kind4::Nf4 => &NF4,
            Kind4::Fp4 => &FP4,
        }
    }
}

/// Index of the table value nearest to `x`; on a tie the earlier index wins (for NF4, whose
/// table is sorted, that is the lower code, as bitsandbytes does).
fn nearest(table: &[f32], x: f32) -> u8 {
    let mut best = 0;
    let mut best_d = f32::INFINITY;
    for (i, &c) in table.iter().enumerate() {
        let d = (x - c).abs();
        if d < best_d {
            best = i;
            best_d = d;
        }
    }
    best as u8
}

/// Block-wise absmax 4-bit quantization of row-major `data`: (one code per element, packed
/// bytes, absmax per block). The last block may be partial.
pub fn quantize_4bit(data: &[f32], kind: Kind4) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let table = kind.table();
    let mut codes = Vec::with_capacity(data.len());
    let mut absmax = Vec::with_capacity(data.len().div_ceil(BLOCK_4BIT));
    for block in data.chunks(BLOCK_4BIT) {
        let m = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        absmax.push(m);
        let scale = if m > 0.0 { 1.0 / m } else { 0.0 };
        codes.extend(
            block
                .iter()
                .map(|&x| nearest(table, (x * scale).clamp(-1.0, 1.0))),
        );
    }
    let packed = codes
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
        .collect();
    (codes, packed, absmax)
}

/// Double quantization of block constants: (8-bit indices into [`DYNAMIC_MAP`], offset = their
/// mean, one float32 scale per block of 256).
pub fn double_quantize(absmax: &[f32]) -> (Vec<u8>, f32, Vec<f32>) {
    let offset =
        (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let mut q = Vec::with_capacity(absmax.len());
    let mut scales = Vec::new();
    for block in absmax.chunks(BLOCK_DOUBLE_QUANT) {
        let centered: Vec<f32> = block.iter().map(|a| a - offset).collect();
        let m = centered.iter().fold(0f32, |m, x| m.max(x.abs()));
        scales.push(m);
        let scale = if m > 0.0 { 1.0 / m } else { 0.0 };
        q.extend(
            centered
                .iter()
                .map(|&x| nearest_sorted(&DYNAMIC_MAP, (x * scale).clamp(-1.0, 1.0))),
        );
    }
    (q, offset, scales)
}

/// Nearest entry of a sorted table by binary search (ties to the lower entry).
fn nearest_sorted(table: &[f32], x: f32) -> u8 {
    let hi = table.partition_point(|&c| c < x).min(table.len() - 1);
    let lo = hi.saturating_sub(1);
    if (x - table[lo]).abs() <= (table[hi] - x).abs() {
        lo as u8
    } else {
        hi as u8
    }
}

/// Dequantized double-quantized constants: `DYNAMIC_MAP[q] · scale[block] + offset`. The
/// kernels restore them inline; this is the reference their test checks against bitsandbytes.
#[cfg(test)]
pub fn restore_absmax(q: &[u8], offset: f32, scales: &[f32]) -> Vec<f32> {
    q.iter()
        .enumerate()
        .map(|(i, &c)| DYNAMIC_MAP[c as usize] * scales[i / BLOCK_DOUBLE_QUANT] + offset)
        .collect()
}

/// Block scales of a 4-bit weight, as stored.
pub enum Scales {
    F32(Tensor),
    Double {
        q: Tensor,
        offset: f32,
        scales: Tensor,
        map: Tensor,
    },
}

/// A frozen weight in a quantized layout, kept on its device.
pub enum QuantizedWeight {
    FourBit {
        kind: Kind4,
        /// (256, 2): the two values a packed byte stands for.
        pairs: Tensor,
        /// Packed codes, padded to whole blocks.
        packed: Tensor,
        scales: Scales,
        shape: (usize, usize),
    },
    Int8 {
        /// `q + 128` as u8; value = (q / 127) · absmax.
        q: Tensor,
        absmax: Tensor,
        shape: (usize, usize),
    },
    /// A GGUF tensor in its own GGML type.
    Ggml(Arc<QTensor>),
    /// A GGUF tensor repacked for decoding on the CPU ([`QuantizedWeight::for_decoding`]).
    Packed(PackedWeight),
}

impl QuantizedWeight {
    /// Quantizes a dense (out, in) weight to 4 bits.
    pub fn four_bit(w: &Tensor, kind: Kind4, double_quant: bool) -> Result<QuantizedWeight> {
        let shape = w.dims2()?;
        let device = w.device().clone();
        let mut data: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let n = data.len();
        data.resize(n.div_ceil(BLOCK_4BIT) * BLOCK_4BIT, 0.0);
        let (_, packed, absmax) = quantize_4bit(&data, kind);
        let table = kind.table();
        let pairs: Vec<f32> = (0..256)
            .flat_map(|b| [table[b >> 4], table[b & 15]])
            .collect();
        let scales = if double_quant {
            let (q, offset, s) = double_quantize(&absmax);
            Scales::Double {
                q: Tensor::from_vec(q, absmax.len(), &device)?,
                offset,
                scales: Tensor::from_vec(s, absmax.len().div_ceil(BLOCK_DOUBLE_QUANT), &device)?,
                map: Tensor::new(&DYNAMIC_MAP, &device)?,
            }
        } else {
            Scales::F32(Tensor::from_vec(absmax, data.len() / BLOCK_4BIT, &device)?)
        };
        Ok(QuantizedWeight::FourBit {
            kind,
            pairs: Tensor::from_vec(pairs, (256, 2), &device)?,
            packed: Tensor::from_vec(packed.clone(), packed.len(), &device)?,
            scales,
            shape,
        })
    }

    /// Block-wise absmax INT8.
    pub fn int8(w: &Tensor) -> Result<QuantizedWeight> {
        let shape = w.dims2()?;
        let device = w.device().clone();
        let mut data: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        data.resize(data.len().div_ceil(BLOCK_INT8) * BLOCK_INT8, 0.0);
        let mut q = Vec::with_capacity(data.len());
        let mut absmax = Vec::with_capacity(data.len() / BLOCK_INT8);
        for block in data.chunks(BLOCK_INT8) {
            let m = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            absmax.push(m);
            let scale = if m > 0.0 { 127.0 / m } else { 0.0 };
            q.extend(
                block
                    .iter()
                    .map(|&x| ((x * scale).round().clamp(-127.0, 127.0) as i32 + 128) as u8),
            );
        }
        Ok(QuantizedWeight::Int8 {
            q: Tensor::from_vec(q, data.len(), &device)?,
            absmax: Tensor::from_vec(absmax, data.len() / BLOCK_INT8, &device)?,
            shape,
        })
    }

    /// A GGUF tensor as decoding on the CPU reads it fastest: the 4- and 8-bit block types
    /// repacked for [`crate::kernels::qdot`], whose dot products unpack each block once for
    /// a whole decode batch; Q5_0 and Q5_1, which it does not read, requantized to Q8_0 first
    /// (nearer the float weights than 4 bits); other types left to candle as they are.
    pub fn for_decoding(q: &Arc<QTensor>) -> Result<QuantizedWeight> {
        use candle_core::quantized::GgmlDType as G;
        let requantized;
        let stored = match q.dtype() {
            G::Q5_0 | G::Q5_1 => {
                requantized = QTensor::quantize(&q.dequantize(&Device::Cpu)?, G::Q8_0)?;
                &requantized
            }
            _ => q.as_ref(),
        };
        let kind = match stored.dtype() {
            G::Q4_0 => GgmlBlocks::Q4_0,
            G::Q4_1 => GgmlBlocks::Q4_1,
            G::Q4K => GgmlBlocks::Q4K,
            G::Q8_0 => GgmlBlocks::Q8_0,
            _ => return Ok(QuantizedWeight::Ggml(q.clone())),
        };
        let (rows, cols) = stored.shape().dims2()?;
        let bytes = stored.data()?;
        Ok(QuantizedWeight::Packed(PackedWeight::from_ggml(
            kind, &bytes, rows, cols,
        )))
    }

    pub fn shape(&self) -> (usize, usize) {
        match self {
            QuantizedWeight::FourBit { shape, .. } | QuantizedWeight::Int8 { shape, .. } => *shape,
            QuantizedWeight::Ggml(q) => q.shape().dims2().unwrap_or((0, 0)),
            QuantizedWeight::Packed(p) => p.shape(),
        }
    }

    /// Bytes this weight holds (codes and constants; the shared 256-entry tables excluded).
    pub fn bytes(&self) -> usize {
        match self {
            QuantizedWeight::FourBit { packed, scales, .. } => {
                packed.elem_count()
                    + match scales {
                        Scales::F32(a) => 4 * a.elem_count(),
                        Scales::Double { q, scales, .. } => {
                            q.elem_count() + 4 * scales.elem_count() + 4
                        }
                    }
            }
            QuantizedWeight::Int8 { q, absmax, .. } => q.elem_count() + 4 * absmax.elem_count(),
            QuantizedWeight::Ggml(q) => q.storage_size_in_bytes(),
            QuantizedWeight::Packed(p) => p.bytes(),
        }
    }

    /// The block constants of a 4-bit weight, restored to float32 (n_blocks,).
    fn absmax(scales: &Scales) -> Result<Tensor> {
        Ok(match scales {
            Scales::F32(a) => a.clone(),
            Scales::Double {
                q,
                offset,
                scales,
                map,
            } => {
                let n = q.elem_count();
                let values = map.index_select(&q.to_dtype(DType::U32)?, 0)?;
                let per_block = scales
                    .unsqueeze(1)?
                    .broadcast_as((scales.elem_count(), BLOCK_DOUBLE_QUANT))?
                    .flatten_all()?
                    .narrow(0, 0, n)?;
                ((values * per_block)? + *offset as f64)?
            }
        })
    }

    /// The dense (out, in) weight in `dtype`, on `device`.
    pub fn dequantize(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        self.unpack(device, dtype, device.is_cpu())
    }

    /// [`QuantizedWeight::dequantize`] through candle's tensor ops alone, on the device the weight
    /// lives on: the path a GPU takes, which the tests compare with the CPU kernels on any device.
    pub fn dequantize_with_tensor_ops(&self, dtype: DType) -> Result<Tensor> {
        let device = match self {
            QuantizedWeight::FourBit { packed, .. } => packed.device().clone(),
            QuantizedWeight::Int8 { q, .. } => q.device().clone(),
            QuantizedWeight::Ggml(q) => q.device(),
            QuantizedWeight::Packed(_) => Device::Cpu,
        };
        self.unpack(&device, dtype, false)
    }

    fn unpack(&self, device: &Device, dtype: DType, cpu_kernels: bool) -> Result<Tensor> {
        let (out, inp) = self.shape();
        let n = out * inp;
        let dense = match self {
            QuantizedWeight::FourBit {
                pairs,
                packed,
                scales,
                ..
            } if cpu_kernels && packed.device().is_cpu() => {
                let absmax = Self::absmax(scales)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                let pairs = pairs.flatten_all()?.to_vec1::<f32>()?;
                let packed = packed.to_vec1::<u8>()?;
                Tensor::from_vec(
                    crate::kernels::unpack::four_bit(&packed, &pairs, &absmax, n, BLOCK_4BIT),
                    (out, inp),
                    device,
                )?
            }
            QuantizedWeight::FourBit {
                pairs,
                packed,
                scales,
                ..
            } => {
                // u32 indices: candle's u8 index_select loses index 255 (measured: every 0xFF
                // byte dequantized to zeros)
                let values = pairs
                    .index_select(&packed.to_dtype(DType::U32)?, 0)?
                    .flatten_all()?; // (padded n,)
                let absmax = Self::absmax(scales)?;
                let blocks = absmax.elem_count();
                values
                    .reshape((blocks, BLOCK_4BIT))?
                    .broadcast_mul(&absmax.unsqueeze(1)?)?
                    .flatten_all()?
                    .narrow(0, 0, n)?
                    .reshape((out, inp))?
            }
            QuantizedWeight::Int8 { q, absmax, .. } => {
                let blocks = absmax.elem_count();
                ((q.to_dtype(DType::F32)? - 128.0)? / 127.0)?
                    .reshape((blocks, BLOCK_INT8))?
                    .broadcast_mul(&absmax.unsqueeze(1)?)?
                    .flatten_all()?
                    .narrow(0, 0, n)?
                    .reshape((out, inp))?
            }
            QuantizedWeight::Ggml(q) => q.dequantize(device)?,
            QuantizedWeight::Packed(p) => Tensor::from_vec(p.dequantize(), (out, inp), device)?,
        };
        Ok(dense.to_dtype(dtype)?)
    }

    pub fn describe(&self) -> String {
        match self {
            QuantizedWeight::FourBit { kind, scales, .. } => format!(
                "{}{}",
                match kind {
                    Kind4::Nf4 => "nf4",
                    Kind4::Fp4 => "fp4",
                },
                if matches!(scales, Scales::Double { .. }) {
                    "+dq"
                } else {
                    ""
                }
            ),
            QuantizedWeight::Int8 { .. } => "int8".into(),
            QuantizedWeight::Ggml(q) => format!("{:?}", q.dtype()),
            QuantizedWeight::Packed(_) => "ggml blocks, repacked".into(),
        }
    }
}

/// `y = x · Wᵀ` for a frozen quantized `W`, as one graph node: the forward dequantizes into a
/// temporary and multiplies straight into the output, the backward dequantizes again and
/// returns the input gradient only. Nothing dense outlives either call.
struct QuantizedMatmul {
    weight: Arc<QuantizedWeight>,
}

impl QuantizedMatmul {
    fn dense(&self, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
        timing::scope(Part::Dequantize, || {
            self.weight
                .dequantize(device, dtype)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
    }
}

impl candle_core::CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let w = self.dense(&Device::Cpu, s.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            candle_core::Storage::Cpu(ws) => ops::cpu_xwt(s, l, ws, wl),
            _ => candle_core::bail!("quantized linear: dequantized weight is not on the cpu"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let device = Device::Cuda(s.device().clone());
        let w = self.dense(&device, s.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            candle_core::Storage::Cuda(ws) => ops::matmul_xwt(s, l, ws, wl),
            _ => candle_core::bail!("quantized linear: dequantized weight is not on the gpu"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.dense(g.device(), g.dtype())?;
        Ok(Some(ops::frozen_matmul_t(g, &w)?))
    }
}

/// [`quantized_matmul`] of the rows of a batched decode step (one per sequence): on a GGUF
/// weight's stored blocks whatever the number of rows, as for one row; the rows' numbers are
/// each what that row alone would give.
pub fn decode_matmul(x: &Tensor, w: &Arc<QuantizedWeight>) -> Result<Tensor> {
    match w.as_ref() {
        QuantizedWeight::Ggml(q) if x.device().is_cpu() && x.dtype() == DType::F32 => {
            Ok(x.contiguous()?.apply_op1_no_bwd(q.as_ref())?)
        }
        QuantizedWeight::Packed(p) if x.device().is_cpu() && x.dtype() == DType::F32 => {
            packed_matmul(x, p)
        }
        _ => quantized_matmul(x, w),
    }
}

/// `x · Wᵀ` on a repacked weight's blocks (the activations quantized per block of 32).
fn packed_matmul(x: &Tensor, p: &PackedWeight) -> Result<Tensor> {
    let (out, inp) = p.shape();
    let rows = x.elem_count() / inp.max(1);
    let flat: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("a matrix") = out;
    Ok(Tensor::from_vec(p.matmul(&flat, rows), dims, x.device())?)
}

/// `x · Wᵀ` for a frozen quantized `W` (see [`QuantizedMatmul`]).
pub fn quantized_matmul(x: &Tensor, w: &Arc<QuantizedWeight>) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.track_op() {
        return Ok(x.apply_op1(QuantizedMatmul { weight: w.clone() })?);
    }
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        // One row is a decode step: a matrix-vector product on the stored blocks (the
        // activation quantized to the type's dot-product partner, as llama.cpp decodes),
        // reading a quarter to an eighth of the bytes a float32 weight would take. A prompt's
        // rows too, on repacked blocks (as fast as a dense copy of the weight and a float32
        // product, and a row's numbers the same however its prompt is cut into chunks).
        match w.as_ref() {
            QuantizedWeight::Ggml(q) if rows == 1 => return Ok(x.apply_op1_no_bwd(q.as_ref())?),
            QuantizedWeight::Packed(p) => return packed_matmul(&x, p),
            _ => {}
        }
    }
    let dense = w.dequantize(x.device(), x.dtype())?;
    Ok(ops::frozen_matmul(&x, &dense)?)
}

#[cfg(test)]
mod tests;
