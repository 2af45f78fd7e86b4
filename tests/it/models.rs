//! Model variants the loader must handle: sharded safetensors, qwen2 (q/k/v bias), untied
//! lm_head, mistral's sliding window.

use crate::helpers::*;
use candle_core::{Device, Tensor};
use qtune::cli::bench::random_model as synthetic;
use qtune::spec::LoraSpec;
use qtune::train::model::{self, Arch};
use qtune::train::{self, Silent};

fn logits_of(dir: &std::path::Path) -> Tensor {
    let base = model::load_base(
        dir.to_str().unwrap(),
        None,
        &LoraSpec::default(),
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    base.model
        .logits(&Tensor::new(&[[1u32, 7, 8, 9, 10, 2]], &Device::Cpu).unwrap())
        .unwrap()
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let single = tiny_model(dir.path());
    let sharded = dir.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(single.join(f), sharded.join(f)).unwrap();
    }
    let weights =
        candle_core::safetensors::load(single.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    );
    let mut map = serde_json::Map::new();
    for (name, t) in weights {
        let file = if name.contains("layers.1.") || name.contains("norm") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert(name.clone(), file.into());
        if file.starts_with("model-00001") {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    candle_core::safetensors::save(&a, sharded.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, sharded.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    assert_eq!(max_abs_diff(&logits_of(&single), &logits_of(&sharded)), 0.0);
}

fn variant(
    dir: &std::path::Path,
    f: impl Fn(&mut qtune::train::model::ModelConfig),
) -> std::path::PathBuf {
    let mut cfg = synthetic::tiny_config();
    f(&mut cfg);
    let path = dir.join("variant");
    synthetic::write_model_dir(&path, &cfg, 5).unwrap();
    path
}

fn trains(dir: &std::path::Path, model: &std::path::Path) {
    let data = memorisable_chat(dir, 8);
    let s = spec(
        model,
        &data,
        serde_json::json!({"lora": {"target_modules": "all-linear"}, "training": {"epochs": 6, "batch_size": 4}}),
    );
    let out = dir.join("out");
    train::run(&s, &crate::helpers::run_options(&out), &mut Silent).unwrap();
    let l = train_losses(&out);
    assert!(l.last().unwrap().1 < 0.8 * l[0].1, "{l:?}");
}

#[test]
fn qwen2_with_qkv_bias_loads_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let m = variant(dir.path(), |c| {
        c.arch = Arch::Qwen2;
        c.attention_bias = true;
    });
    let w = candle_core::safetensors::load(m.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.contains_key("model.layers.0.self_attn.q_proj.bias"));
    let base = model::load_base(
        m.to_str().unwrap(),
        None,
        &LoraSpec::default(),
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert!(base.model.blocks[0].q_proj.bias.is_some());
    trains(dir.path(), &m);
}

#[test]
fn untied_lm_head_and_mistral_sliding_window() {
    let dir = tempfile::tempdir().unwrap();
    let m = variant(dir.path(), |c| {
        c.arch = Arch::Mistral;
        c.tie_word_embeddings = false;
    });
    // sliding_window comes from config.json for mistral
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["sliding_window"] = 3.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let base = model::load_base(
        m.to_str().unwrap(),
        None,
        &LoraSpec::default(),
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert!(base.model.lm_head.is_some());
    assert_eq!(base.model.cfg.sliding_window, Some(3));
    // window 3, two layers: position 5 sees positions 3..=5, which saw 1..=5; token 0 is out of reach
    let a = base
        .model
        .logits(&Tensor::new(&[[1u32, 7, 8, 9, 10, 11]], &Device::Cpu).unwrap())
        .unwrap();
    let b = base
        .model
        .logits(&Tensor::new(&[[5u32, 7, 8, 9, 10, 11]], &Device::Cpu).unwrap())
        .unwrap();
    let at = |t: &Tensor, p: usize| t.squeeze(0).unwrap().get(p).unwrap();
    let seen = max_abs_diff(&at(&a, 3), &at(&b, 3));
    assert!(seen > 1e-4, "position 3 does see token 0 through layer 0");
    let last = |t: &Tensor| t.squeeze(0).unwrap().get(5).unwrap();
    let d = max_abs_diff(&last(&a), &last(&b));
    assert!(d < 1e-5, "window ignored: {d}");
    trains(dir.path(), &m);
}
