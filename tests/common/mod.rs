//! Helpers shared by the test binaries: a tiny random model folder and small datasets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use qtune::spec::JobSpec;
use qtune::train::model::synthetic;

/// A tiny Llama folder (2 layers, hidden 32, byte tokenizer, ChatML template) in `dir/model`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("model");
    synthetic::write_model_dir(&path, &synthetic::tiny_config(), 7).unwrap();
    path
}

/// A small chat dataset the tiny model can memorise.
pub fn memorisable_chat(dir: &Path, n: usize) -> PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("say {}", i % 4)},
                {"role": "assistant", "content": format!("ok {}{}", i % 4, "!".repeat(i % 3))},
            ]})
            .to_string()
        })
        .collect();
    let path = dir.join("chat.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A spec for the tiny model with fast settings; `extra` is merged over it (JSON objects).
pub fn spec(model: &Path, data: &Path, extra: serde_json::Value) -> JobSpec {
    let mut v = serde_json::json!({
        "base_model": model.to_str().unwrap(),
        "dataset": {"url": data.to_str().unwrap()},
        "lora": {"r": 4, "dropout": 0.0},
        "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.01, "lr_scheduler": "constant", "max_seq_len": 64},
        "seed": 3,
    });
    merge(&mut v, extra);
    JobSpec::from_json(&v.to_string()).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// The `loss` values of metrics.jsonl, by step.
pub fn train_losses(output: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| !v["loss"].is_null())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

pub fn run_options(out: &Path) -> qtune::train::RunOptions {
    qtune::train::RunOptions {
        output_dir: out.to_path_buf(),
        device: candle_core::Device::Cpu,
        resume: false,
        init_adapter: None,
    }
}

/// Largest elementwise |a − b|.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
