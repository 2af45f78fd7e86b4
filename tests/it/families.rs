//! Every model family against transformers and PEFT themselves: the fixtures in
//! tests/fixtures/families/ were made by scripts/make-family-fixtures.py (versions in its
//! VERSIONS file): a tiny random checkpoint per family, transformers' logits and loss on a fixed
//! batch, and with a PEFT LoRA of fixed A and B on every linear, PEFT's loss and LoRA
//! gradients. qtune loads the same folder and adapter and must give the same numbers: logits
//! within 1e-4, losses and gradients within 1e-4 relative.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qtune::spec::LoraSpec;
use qtune::train::model::ForwardMode;
use qtune::train::{self, checkpoint, data, model};

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/families/{family}"))
}

/// `max |a − b| / max |b|`.
fn relative(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    crate::helpers::max_abs_diff(a, b) / scale.max(f32::MIN_POSITIVE)
}

fn check_family(family: &str) {
    let dir = fixture(family);
    let expected: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let labels: Vec<Vec<i64>> = expected["labels"].to_vec2().unwrap();
    let rows: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    // transformers' labels: the token itself where it counts, -100 where it does not
    let examples: Vec<data::Example> = rows
        .iter()
        .zip(&labels)
        .map(|(ids, labels)| data::Example {
            ids: ids.clone(),
            labels: labels.iter().map(|&l| l != -100).collect(),
        })
        .collect();
    let load = |lora: &LoraSpec| {
        model::load_base(dir.to_str().unwrap(), None, lora, None, 0, &Device::Cpu).unwrap()
    };

    let base = load(&LoraSpec::default());
    let logits = base.model.logits(&ids).unwrap();
    let diff = crate::helpers::max_abs_diff(&logits, &expected["logits"]);
    assert!(
        diff <= 1e-4,
        "{family}: logits differ from transformers' by {diff}"
    );
    // the cached decode (a prefill, then a token at a time, through local windows shorter than
    // the row) gives the full forward's logits
    let row = &rows[0];
    let mut cache = base.model.new_cache();
    let prefill = 9;
    let mut last = base
        .model
        .forward_cached(&row[..prefill], &mut cache)
        .unwrap();
    for t in prefill..row.len() {
        let want = logits.get(0).unwrap().get(t - 1).unwrap();
        let diff = crate::helpers::max_abs_diff(&last, &want);
        assert!(
            diff <= 1e-4,
            "{family}: cached decode at {t} differs by {diff}"
        );
        last = base
            .model
            .forward_cached(&row[t..t + 1], &mut cache)
            .unwrap();
    }
    let loss = train::evaluate(&base, &examples, examples.len())
        .unwrap()
        .loss;
    let want = expected["loss"].to_vec1::<f32>().unwrap()[0] as f64;
    assert!(
        ((loss - want) / want).abs() <= 1e-4,
        "{family}: loss {loss} vs transformers' {want}"
    );

    let adapter = dir.join("adapter");
    let lora = checkpoint::read_lora_spec(&adapter).unwrap();
    let mut adapted = load(&lora);
    checkpoint::load_adapter(&adapter, &adapted.model).unwrap();
    let refs: Vec<&data::Example> = examples.iter().collect();
    let batch = data::make_batch(&refs, 0, &Device::Cpu).unwrap();
    let mode = ForwardMode::train(0);
    // the adapter folded into the checkpoint's own weights (fused modules included) gives the
    // logits of base + adapter
    let merged = tempfile::tempdir().unwrap();
    train::export::merged(&dir, &adapter, merged.path()).unwrap();
    let plain = model::load_base(
        merged.path().to_str().unwrap(),
        None,
        &LoraSpec::default(),
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    let diff = crate::helpers::max_abs_diff(
        &plain.model.logits(&ids).unwrap(),
        &adapted.model.logits(&ids).unwrap(),
    );
    assert!(
        diff <= 1e-4,
        "{family}: merged export's logits differ by {diff}"
    );
    // the same numbers whether each layer keeps its graph or is recomputed in backward
    for checkpointing in [false, true] {
        adapted.model.gradient_checkpointing = checkpointing;
        let sum = adapted
            .model
            .loss_sum(&batch.ids, &batch.positions, &batch.targets, mode)
            .unwrap()
            .sum;
        let mean = (sum / batch.label_tokens as f64).unwrap();
        let got = mean.to_scalar::<f32>().unwrap() as f64;
        let want = expected["lora_loss"].to_vec1::<f32>().unwrap()[0] as f64;
        assert!(
            ((got - want) / want).abs() <= 1e-4,
            "{family} (checkpointing {checkpointing}): LoRA loss {got} vs PEFT's {want}"
        );
        let store = mean.backward().unwrap();
        let grads = adapted.model.lora_grads(&store).unwrap();
        let names = adapted.model.lora_vars();
        // every module PEFT adapted (all linears: seven, or Phi-3's four fused ones) has its pair
        let modules = adapted.model.cfg.arch.lora_modules().len();
        assert_eq!(
            names.len(),
            2 * modules * adapted.model.cfg.num_hidden_layers
        );
        assert_eq!(
            names.len(),
            expected.keys().filter(|k| k.starts_with("grad.")).count()
        );
        for ((name, _), grad) in names.iter().zip(&grads) {
            let key = format!("grad.{}", checkpoint::peft_name(name));
            let reference = expected
                .get(&key)
                .unwrap_or_else(|| panic!("{family}: the fixture has no {key}"));
            let err = relative(grad, reference);
            assert!(
                err <= 1e-4,
                "{family} (checkpointing {checkpointing}): {name} gradient off PEFT's by {err} \
                 (relative)"
            );
        }
    }
}

#[test]
fn llama_matches_transformers_and_peft() {
    check_family("llama");
}

#[test]
fn mistral_matches_transformers_and_peft() {
    check_family("mistral");
}

#[test]
fn qwen2_matches_transformers_and_peft() {
    check_family("qwen2");
}

#[test]
fn qwen3_matches_transformers_and_peft() {
    check_family("qwen3");
}

#[test]
fn gemma3_matches_transformers_and_peft() {
    check_family("gemma3");
}

#[test]
fn phi3_matches_transformers_and_peft() {
    check_family("phi3");
}

/// QLoRA on every family: the base re-quantized to NF4 and to INT8 loads, its loss on the
/// fixture batch stays near the float model's, and a training forward and backward reaches
/// every LoRA factor.
#[test]
fn every_family_loads_and_trains_quantized() {
    for family in ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"] {
        let dir = fixture(family);
        let expected: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let rows: Vec<Vec<u32>> = expected["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2()
            .unwrap();
        let examples: Vec<data::Example> = rows
            .iter()
            .map(|ids| data::Example {
                ids: ids.clone(),
                labels: vec![true; ids.len()],
            })
            .collect();
        let lora: LoraSpec = qtune::spec::JobSpec::from_json(
            r#"{"base_model": "m", "dataset": {"url": "d"},
                "lora": {"r": 4, "target_modules": "all-linear"}}"#,
        )
        .unwrap()
        .lora;
        let dense =
            model::load_base(dir.to_str().unwrap(), None, &lora, None, 0, &Device::Cpu).unwrap();
        let want = train::evaluate(&dense, &examples, 2).unwrap().loss;
        // 4 bits per weight move the loss by about 1% on these tiny random models, 8 by 0.1%
        for (kind, tolerance) in [("nf4", 0.03), ("int8", 0.005)] {
            let q: qtune::spec::QuantizationSpec = qtune::spec::JobSpec::from_json(&format!(
                r#"{{"base_model": "m", "dataset": {{"url": "d"}}, "quantization": {{"type": "{kind}"}}}}"#
            ))
            .unwrap()
            .quantization
            .unwrap();
            let base = model::load_base(
                dir.to_str().unwrap(),
                None,
                &lora,
                Some(&q),
                0,
                &Device::Cpu,
            )
            .unwrap();
            let loss = train::evaluate(&base, &examples, 2).unwrap().loss;
            eprintln!("{family} {kind}: loss {loss:.4}, float model {want:.4}");
            assert!(
                ((loss - want) / want).abs() < tolerance,
                "{family} {kind}: {loss} vs {want}"
            );
            let refs: Vec<&data::Example> = examples.iter().collect();
            let batch = data::make_batch(&refs, 0, &Device::Cpu).unwrap();
            let mode = ForwardMode::train(0);
            let sum = base
                .model
                .loss_sum(&batch.ids, &batch.positions, &batch.targets, mode)
                .unwrap()
                .sum;
            let grads = base.model.lora_grads(&sum.backward().unwrap()).unwrap();
            assert_eq!(grads.len(), base.model.lora_vars().len());
        }
    }
}

/// Packing: examples of different lengths sharing rows (attention and RoPE positions kept within
/// each example) give the loss and every LoRA gradient of the same examples one per row, on the
/// fused CPU layer and on the composite graph, through sliding windows and Gemma's local layers.
#[test]
fn packed_batches_compute_what_one_example_per_row_does() {
    for family in ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"] {
        let dir = fixture(family);
        let adapter = dir.join("adapter");
        let lora = checkpoint::read_lora_spec(&adapter).unwrap();
        let mut adapted =
            model::load_base(dir.to_str().unwrap(), None, &lora, None, 0, &Device::Cpu).unwrap();
        checkpoint::load_adapter(&adapter, &adapted.model).unwrap();
        let vocab = adapted.model.cfg.vocab_size as u32;
        let examples: Vec<data::Example> = [16usize, 5, 9, 3, 12, 7, 4]
            .iter()
            .enumerate()
            .map(|(e, &n)| data::Example {
                ids: (0..n as u32)
                    .map(|i| (7 + 31 * i + 13 * e as u32) % vocab)
                    .collect(),
                // a prompt without loss, then the answer
                labels: (0..n).map(|i| i > 1).collect(),
            })
            .collect();
        let refs: Vec<&data::Example> = examples.iter().collect();
        let padded = data::make_batch(&refs, 0, &Device::Cpu).unwrap();
        let packed = data::make_packed_batch(&refs, 0, &Device::Cpu).unwrap();
        // lengths 15 11 8 6 4 3 2: 15 8 2 | 11 6 4 3 (25 wide), not four rows of 15
        assert_eq!(packed.ids.dims(), &[2, 25]);
        assert_eq!(packed.label_tokens, padded.label_tokens);
        assert_eq!(packed.tokens, padded.tokens);
        let mode = ForwardMode::train(0);
        for fused in [true, false] {
            train::use_fused_paths(fused);
            for checkpointing in [false, true] {
                adapted.model.gradient_checkpointing = checkpointing;
                let run = |batch: &data::Batch| {
                    let sum = adapted.model.batch_loss(batch, mode).unwrap().sum;
                    let mean = (sum / batch.label_tokens as f64).unwrap();
                    let grads = adapted.model.lora_grads(&mean.backward().unwrap()).unwrap();
                    (mean.to_scalar::<f32>().unwrap(), grads)
                };
                let (want, want_grads) = run(&padded);
                let (got, got_grads) = run(&packed);
                let what = format!("{family} (fused {fused}, checkpointing {checkpointing})");
                assert!(
                    ((got - want) / want).abs() <= 1e-5,
                    "{what}: packed loss {got} vs {want}"
                );
                for ((name, _), (g, w)) in adapted
                    .model
                    .lora_vars()
                    .iter()
                    .zip(got_grads.iter().zip(&want_grads))
                {
                    let err = relative(g, w);
                    assert!(err <= 1e-5, "{what}: {name} gradient off by {err}");
                }
            }
        }
        train::use_fused_paths(true);
    }
}
