//! 4-bit weights (NF4, FP4) unpacked to float32 on the CPU: what a quantized base's frozen
//! multiply reads twice per layer and step.

use super::cpu::SharedMut;

/// The first `n` values of 4-bit codes in one parallel pass: byte `j` holds elements `2j`
/// (`pairs[2·byte]`) and `2j + 1` (`pairs[2·byte + 1]`), each times the absmax of its block of
/// `block` values.
/// (The tensor-op path is several full passes; per step this runs twice per quantized layer.)
pub fn four_bit(packed: &[u8], pairs: &[f32], absmax: &[f32], n: usize, block: usize) -> Vec<f32> {
    // reads are checked slices; these make a mismatch fail here, naming the buffer
    assert!(
        block > 0 && block.is_multiple_of(2),
        "4-bit unpacking: block size {block}"
    );
    assert_eq!(pairs.len(), 512, "4-bit unpacking: the pair table");
    assert!(
        packed.len() * 2 >= n,
        "4-bit unpacking: {} packed bytes for {n} values",
        packed.len()
    );
    assert!(
        absmax.len() >= n.div_ceil(block),
        "4-bit unpacking: {} block constants for {n} values",
        absmax.len()
    );
    let mut out = vec![0f32; n];
    let ptr = SharedMut::new(&mut out);
    // Whole 4-bit blocks per work item, so each item reads one absmax run.
    let per_item = block * 256;
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(per_item), |items| {
        for item in items {
            let (start, end) = (item * per_item, ((item + 1) * per_item).min(n));
            // SAFETY: this item alone writes out[start..end].
            let dst = unsafe { ptr.slice(start, end - start) };
            for (b, dst) in dst.chunks_mut(block).enumerate() {
                let first = start + b * block;
                let scale = absmax[first / block];
                for (pair, dst) in dst.chunks_mut(2).enumerate() {
                    let byte = packed[first / 2 + pair] as usize;
                    for (k, v) in dst.iter_mut().enumerate() {
                        *v = pairs[2 * byte + k] * scale;
                    }
                }
            }
        }
    });
    out
}
