//! `qtune quickstart` as the README runs it, from the repository's root, with the Hub unreachable
//! (HF_HUB_OFFLINE=1, an empty cache): it must fall back to the SmolLM2-135M GGUF test model that
//! scripts/fetch-test-models.sh put into .cache/, run a real QLoRA job through the HTTP API, and
//! save the adapter. A few steps only; the full run is the README's first command.

use std::path::Path;

#[test]
fn quickstart_falls_back_to_the_gguf_and_saves_an_adapter() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join(".cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf")
            .is_file(),
        "run scripts/fetch-test-models.sh first (scripts/test.sh does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qtune"))
        .current_dir(root)
        .args(["quickstart", "--max-steps", "2", "--data-dir"])
        .arg(tmp.path().join("data"))
        .arg("--output")
        .arg(tmp.path().join("adapter"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.path().join("hf"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("the Hugging Face Hub is unreachable (HF_HUB_OFFLINE=1)")
            && stdout.contains("from the GGUF test model .cache/test-models/"),
        "says it fell back: {stdout}"
    );
    assert!(
        stdout.contains("uploaded examples/quickstart.jsonl"),
        "{stdout}"
    );
    assert!(stdout.contains("step 1/2  loss ") && stdout.contains("step 2/2  loss "));
    assert!(stdout.contains("succeeded: train loss "), "{stdout}");

    // the adapter is a PEFT folder for the spec's LoRA (r 16 on q,k,v,o of 30 layers)
    let adapter = tmp.path().join("adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["r"], 16);
    assert_eq!(config["peft_type"], "LORA");
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(tensors.names().len(), 30 * 4 * 2);
    // the service it ran kept its database in the data dir
    assert!(tmp.path().join("data/qtune.db").is_file());
}
