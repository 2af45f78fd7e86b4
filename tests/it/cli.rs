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
}
