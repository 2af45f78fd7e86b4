//! Rotary position embeddings: the inverse frequencies of a head's dimension pairs, with the
//! scaling a config asks for (linear, Llama 3.1's), per layer (Gemma 3's local layers have their
//! own base).

use serde::{Deserialize, Serialize};

/// RoPE frequency scaling, for the kinds this engine implements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The inverse frequencies of a head of `d` dimensions with base `theta`, scaled.
pub(crate) fn inv_freq(d: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    (0..d / 2)
        .map(|i| {
            let f = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
            let f = match scaling {
                None => f,
                Some(RopeScaling::Linear { factor }) => f / factor,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: ctx,
                }) => {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let (low_wl, high_wl) = (ctx / low_freq_factor, ctx / high_freq_factor);
                    if wavelen < high_wl {
                        f
                    } else if wavelen > low_wl {
                        f / factor
                    } else {
                        let smooth = (ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                }
            };
            f as f32
        })
        .collect()
}
