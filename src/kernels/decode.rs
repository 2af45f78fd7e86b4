//! Decode-step attention: one new query position per sequence against that sequence's cached
//! keys and values, every sequence and head of a batch in one parallel pass. Per row it is a
//! handful of dot products over the cache; run as graph ops (narrow, append, transpose, repeat,
//! matmul, softmax, matmul) per row and layer, the ops' own overhead costs more than the
//! arithmetic and grows with the batch.

use super::cpu::SharedMut;

/// A sequence's cached keys and values of one layer, `(len, kv_heads, head_dim)` row-major each.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

/// `heads`, `kv_heads` and `head_dim` of the attention, its score scale, and the window of
/// keys a query sees (`usize::MAX`: all before it).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: usize,
}

/// Each row's query `(heads, head_dim)` (rows one after another in `q`), at the last position
/// of its cache (its own key and value already appended), attends to that cache's keys within
/// the window; returns the outputs `(rows, heads, head_dim)`.
pub fn decode_attention(q: &[f32], caches: &[&LayerCache], s: Shape) -> Vec<f32> {
    let (d, kv_row) = (s.head_dim, s.kv_heads * s.head_dim);
    let q_row = s.heads * d;
    assert!(s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads));
    assert_eq!(
        q.len(),
        caches.len() * q_row,
        "decode attention: q's length"
    );
    for c in caches {
        assert!(
            c.keys.len() == c.values.len() && c.keys.len().is_multiple_of(kv_row),
            "decode attention: a cache's keys and values"
        );
        assert!(!c.keys.is_empty(), "decode attention: an empty cache");
    }
    let group = s.heads / s.kv_heads;
    let mut out = vec![0f32; q.len()];
    let out_ptr = SharedMut::new(&mut out);
    let items = caches.len() * s.heads;
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        let mut scores = Vec::new();
        for item in range {
            let (row, h) = (item / s.heads, item % s.heads);
            let cache = caches[row];
            let len = cache.keys.len() / kv_row;
            let first = len.saturating_sub(s.window);
            let query = &q[row * q_row + h * d..row * q_row + (h + 1) * d];
            let at = (h / group) * d;
            scores.clear();
            scores.extend((first..len).map(|j| {
                let key = &cache.keys[j * kv_row + at..j * kv_row + at + d];
                query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * s.scale
            }));
            super::elementwise::softmax_row(&mut scores);
            // SAFETY: item (row, h) alone writes these d outputs, inside `out`.
            let o = unsafe { out_ptr.slice(row * q_row + h * d, d) };
            for (j, p) in (first..len).zip(&scores) {
                let value = &cache.values[j * kv_row + at..j * kv_row + at + d];
                o.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the plain formula in f64, for grouped heads, rows of different lengths and a
    /// window shorter than some of them.
    #[test]
    fn matches_the_formula() {
        let (heads, kv_heads, d) = (6, 2, 8);
        let mut z = 1u64;
        let mut value = || {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let lens = [1usize, 7, 40];
        let caches: Vec<LayerCache> = lens
            .iter()
            .map(|&n| LayerCache {
                keys: (0..n * kv_heads * d).map(|_| value()).collect(),
                values: (0..n * kv_heads * d).map(|_| value()).collect(),
            })
            .collect();
        let q: Vec<f32> = (0..lens.len() * heads * d).map(|_| value()).collect();
        for window in [usize::MAX, 5] {
            let s = Shape {
                heads,
                kv_heads,
                head_dim: d,
                scale: 0.35,
                window,
            };
            let refs: Vec<&LayerCache> = caches.iter().collect();
            let got = decode_attention(&q, &refs, s);
            for (row, c) in caches.iter().enumerate() {
                let n = lens[row];
                for h in 0..heads {
                    let at = (h / (heads / kv_heads)) * d;
                    let qh = &q[(row * heads + h) * d..(row * heads + h + 1) * d];
                    let keys: Vec<usize> = (n.saturating_sub(window)..n).collect();
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            let k = &c.keys[j * kv_heads * d + at..][..d];
                            qh.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() * 0.35
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                    for i in 0..d {
                        let want: f64 = keys
                            .iter()
                            .zip(&scores)
                            .map(|(&j, x)| {
                                (x - max).exp() / sum * c.values[j * kv_heads * d + at + i] as f64
                            })
                            .sum();
                        let have = got[(row * heads + h) * d + i] as f64;
                        assert!(
                            (have - want).abs() < 1e-5,
                            "row {row} head {h} window {window}"
                        );
                    }
                }
            }
        }
    }
}
