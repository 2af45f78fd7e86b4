//! What a job trains for: supervised fine-tuning, or preference training on chosen/rejected
//! pairs — DPO (Rafailov et al. 2023) against the starting model as reference, or ORPO (Hong et
//! al. 2024), which needs no reference. Hyper-parameters mean what TRL's `DPOConfig` and
//! `ORPOConfig` (1.16) mean by the same names.

use serde::{Deserialize, Serialize};

use super::{err, SpecError};

/// `method` as the caller wrote it: `{"type": "sft" | "dpo" | "orpo", ...}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMethod {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) beta: Option<f64>,
    #[serde(default)]
    pub(crate) label_smoothing: Option<f64>,
    #[serde(default)]
    pub(crate) loss_type: Option<DpoLoss>,
    #[serde(default)]
    pub(crate) rpo_alpha: Option<f64>,
}

/// The training method, resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Method {
    /// Supervised fine-tuning: cross-entropy on the answer tokens.
    #[default]
    Sft,
    Dpo(DpoSpec),
    Orpo(OrpoSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DpoSpec {
    /// How far the policy may move from the reference (higher: less); IPO's τ.
    pub beta: f64,
    /// cDPO's ε: the chance a preference label is wrong; the sigmoid loss becomes
    /// `−(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)` (TRL's sigmoid loss until it moved this to `robust`).
    pub label_smoothing: f64,
    pub loss_type: DpoLoss,
    /// The weight of the chosen answers' mean negative log-likelihood added to the loss (RPO;
    /// TRL 1.16 writes it `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, rpo_alpha]`).
    pub rpo_alpha: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// `−log σ(β·Δ)`, Δ the chosen answer's log-ratio to the reference less the rejected one's.
    Sigmoid,
    /// `(Δ̄ − 1/(2β))²`, Δ̄ from log-ratios averaged over each answer's tokens (as TRL does).
    Ipo,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrpoSpec {
    /// λ, the weight of the odds-ratio term against the chosen sequence's NLL.
    pub beta: f64,
}

pub(crate) const DEFAULT_BETA: f64 = 0.1;

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo(_) => "dpo",
            Method::Orpo(_) => "orpo",
        }
    }

    /// Whether the job trains on chosen/rejected pairs.
    pub fn is_preference(&self) -> bool {
        !matches!(self, Method::Sft)
    }
}

impl RawMethod {
    pub(crate) fn resolve(self) -> Result<Method, SpecError> {
        let beta = match self.beta {
            None => DEFAULT_BETA,
            Some(b) if b.is_finite() && b > 0.0 && b <= 1e3 => b,
            Some(b) => {
                return Err(err(
                    "method.beta",
                    format!("must be > 0 and at most 1000, got {b}"),
                ))
            }
        };
        let only_for = |field: &str, present: bool, method: &str| {
            if present {
                Err(err(
                    &format!("method.{field}"),
                    format!("applies to method dpo, not {method}"),
                ))
            } else {
                Ok(())
            }
        };
        match self.kind.as_str() {
            "sft" | "supervised" => {
                for (field, present) in [
                    ("beta", self.beta.is_some()),
                    ("label_smoothing", self.label_smoothing.is_some()),
                    ("loss_type", self.loss_type.is_some()),
                    ("rpo_alpha", self.rpo_alpha.is_some()),
                ] {
                    if present {
                        return Err(err(
                            &format!("method.{field}"),
                            "applies to the preference methods (dpo, orpo), not sft",
                        ));
                    }
                }
                Ok(Method::Sft)
            }
            "dpo" => {
                let label_smoothing = self.label_smoothing.unwrap_or(0.0);
                if !(0.0..0.5).contains(&label_smoothing) {
                    return Err(err(
                        "method.label_smoothing",
                        format!("must be in [0, 0.5), got {label_smoothing}"),
                    ));
                }
                let loss_type = self.loss_type.unwrap_or(DpoLoss::Sigmoid);
                if loss_type == DpoLoss::Ipo && label_smoothing != 0.0 {
                    return Err(err(
                        "method.label_smoothing",
                        "applies to the sigmoid loss, not ipo",
                    ));
                }
                if let Some(a) = self.rpo_alpha {
                    if !(a.is_finite() && (0.0..=1e3).contains(&a)) {
                        return Err(err(
                            "method.rpo_alpha",
                            format!("must be between 0 and 1000, got {a}"),
                        ));
                    }
                }
                Ok(Method::Dpo(DpoSpec {
                    beta,
                    label_smoothing,
                    loss_type,
                    rpo_alpha: self.rpo_alpha,
                }))
            }
            "orpo" => {
                only_for("label_smoothing", self.label_smoothing.is_some(), "orpo")?;
                only_for("loss_type", self.loss_type.is_some(), "orpo")?;
                only_for("rpo_alpha", self.rpo_alpha.is_some(), "orpo")?;
                Ok(Method::Orpo(OrpoSpec { beta }))
            }
            "reinforcement" => Err(err(
                "method.type",
                "reinforcement fine-tuning is not supported; qtune trains sft, dpo and orpo",
            )),
            other => Err(err(
                "method.type",
                format!("unknown method {other:?} (sft, dpo or orpo)"),
            )),
        }
    }
}

/// `early_stopping` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEarlyStopping {
    #[serde(default)]
    pub(crate) patience: Option<i64>,
    #[serde(default)]
    pub(crate) min_delta: Option<f64>,
    #[serde(default)]
    pub(crate) metric: Option<String>,
}

/// Stop a run once its evaluation metric has not improved by more than `min_delta` for
/// `patience` evaluations in a row (transformers' `EarlyStoppingCallback`: patience counted in
/// evaluations, an improvement is a change beyond the threshold); the best evaluation's
/// checkpoint becomes the job's adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStoppingSpec {
    pub patience: u32,
    pub min_delta: f64,
    /// `eval_loss` (lower is better): the method's own loss on the validation data.
    pub metric: String,
}

impl RawEarlyStopping {
    pub(crate) fn resolve(self) -> Result<EarlyStoppingSpec, SpecError> {
        let patience = self.patience.unwrap_or(3);
        if !(1..=10_000).contains(&patience) {
            return Err(err(
                "early_stopping.patience",
                format!("must be between 1 and 10000 evaluations, got {patience}"),
            ));
        }
        let min_delta = self.min_delta.unwrap_or(0.0);
        if !(min_delta.is_finite() && min_delta >= 0.0) {
            return Err(err("early_stopping.min_delta", "must be >= 0"));
        }
        let metric = self.metric.unwrap_or_else(|| "eval_loss".into());
        if metric != "eval_loss" {
            return Err(err(
                "early_stopping.metric",
                format!("unknown metric {metric:?} (eval_loss)"),
            ));
        }
        Ok(EarlyStoppingSpec {
            patience: patience as u32,
            min_delta,
            metric,
        })
    }
}
