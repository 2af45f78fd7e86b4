//! Preference training against TRL itself: tests/fixtures/preference/ was made by
//! scripts/make-preference-fixtures.py (versions in its expected.json) on the tiny Llama of the
//! family fixtures, with a PEFT LoRA whose A and B are drawn, for one batch of four pairs: TRL's
//! loss, its reward metrics and every LoRA gradient for DPO (sigmoid, IPO, RPO) and ORPO, and
//! each pair's answer log-probabilities under the policy and the reference (the adapter off).
//! qtune's engine, on the same folder, adapter and token ids, must give the same numbers:
//! log-probabilities, losses and gradients within 1e-4 relative.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use qtune::spec::{DpoLoss, DpoSpec, Method, OrpoSpec};
use qtune::train::data::Example;
use qtune::train::model::ForwardMode;
use qtune::train::preference::{self, Pair, ReferenceLogps};
use qtune::train::{checkpoint, model};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preference")
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The fixture's pairs as the engine tokenizes them: prompt then answer, labels on the answer.
fn pairs(expected: &Value) -> Vec<Pair> {
    expected["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let prompt = ids(&p["prompt_ids"]);
            let example = |answer: &str| {
                let all: Vec<u32> = prompt.iter().copied().chain(ids(&p[answer])).collect();
                let labels = (0..all.len()).map(|i| i >= prompt.len()).collect();
                Example { ids: all, labels }
            };
            Pair {
                chosen: example("chosen_ids"),
                rejected: example("rejected_ids"),
                prompt_len: prompt.len(),
            }
        })
        .collect()
}

fn dpo(loss_type: DpoLoss, rpo_alpha: Option<f64>) -> Method {
    Method::Dpo(DpoSpec {
        beta: 0.1,
        label_smoothing: 0.0,
        loss_type,
        rpo_alpha,
    })
}

#[test]
fn dpo_ipo_rpo_and_orpo_match_trl() {
    let dir = dir();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let grads: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let base_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/llama");
    let adapter = dir.join("adapter");
    let lora = checkpoint::read_lora_spec(&adapter).unwrap();
    let base = model::load_base(
        base_dir.to_str().unwrap(),
        None,
        &lora,
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    checkpoint::load_adapter(&adapter, &base.model).unwrap();
    let pairs = pairs(&expected);

    // the reference is the base with the adapter off; the policy has it on
    for (mode, key) in [
        (ForwardMode::BASE, "reference"),
        (ForwardMode::EVAL, "policy"),
    ] {
        let got = preference::reference_logps(&base.model, &pairs, 3, true, 0, mode).unwrap();
        for (i, (g, w)) in got
            .iter()
            .zip(expected[key].as_array().unwrap())
            .enumerate()
        {
            for (side, value) in [("chosen", g.chosen), ("rejected", g.rejected)] {
                let want = w[side].as_f64().unwrap();
                assert!(
                    relative(value, want) <= 1e-4,
                    "{key} pair {i} {side}: {value} vs TRL's {want}"
                );
            }
        }
    }
    let reference: Vec<ReferenceLogps> =
        preference::reference_logps(&base.model, &pairs, 4, true, 0, ForwardMode::BASE).unwrap();

    let cases = [
        ("dpo_sigmoid", dpo(DpoLoss::Sigmoid, None)),
        ("dpo_ipo", dpo(DpoLoss::Ipo, None)),
        ("dpo_rpo", dpo(DpoLoss::Sigmoid, Some(0.5))),
        ("orpo", Method::Orpo(OrpoSpec { beta: 0.1 })),
    ];
    for (name, method) in cases {
        let case = &expected["cases"][name];
        // packed (the default) and one sequence per row give the same numbers
        for packing in [true, false] {
            let probe =
                preference::loss_and_gradients(&base.model, &method, &pairs, &reference, packing)
                    .unwrap();
            let want = case["loss"].as_f64().unwrap();
            assert!(
                relative(probe.loss, want) <= 1e-4,
                "{name}: loss {} vs TRL's {want}",
                probe.loss
            );
            let metrics = serde_json::to_value(probe.rewards).unwrap();
            for (metric, want) in case["metrics"].as_object().unwrap() {
                let (got, want) = (metrics[metric].as_f64().unwrap(), want.as_f64().unwrap());
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1e-2),
                    "{name}: {metric} {got} vs TRL's {want}"
                );
            }
            let names = base.model.lora_vars();
            assert_eq!(
                names.len(),
                grads.keys().filter(|k| k.starts_with(name)).count()
            );
            for ((var, _), grad) in names.iter().zip(&probe.grads) {
                let key = format!("{name}.grad.{}", checkpoint::peft_name(var));
                let reference = grads
                    .get(&key)
                    .unwrap_or_else(|| panic!("the fixture has no {key}"));
                let scale = reference
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let err = crate::helpers::max_abs_diff(grad, reference) / scale.max(1e-12);
                assert!(
                    err <= 1e-4,
                    "{name} (packing {packing}): {var} gradient off TRL's by {err} (relative)"
                );
            }
        }
    }
}
