//! What a job needs before it runs: `POST /v1/jobs/estimate` against the peak `qtune train`
//! really reaches on the CPU, and workers that claim only what fits them (a job too large for
//! every device fails naming its estimate; one too large for this worker waits for another).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qtune::cli::bench::random_model as synthetic;
use qtune::train::model::Arch;
use serde_json::{json, Value};

use crate::helpers::app::{merge, spawn_app_with};
use crate::helpers::eventually;

/// SmolLM2-135M's shape with 6 of its 30 layers (random weights, the byte tokenizer), as `arch`
/// (llama runs the CPU's fused layer, qwen3 the composite graph other devices run): big enough
/// that the model and its activations, not the process, make the peak.
fn small_smollm2(dir: &Path, arch: Arch) -> std::path::PathBuf {
    let path = dir.join(format!("smollm2-6-{}", arch.as_str()));
    let cfg = qtune::train::model::ModelConfig {
        num_hidden_layers: 6,
        arch,
        ..synthetic::smollm2_135m_config()
    };
    synthetic::write_model_dir(&path, &cfg, 3).unwrap();
    path
}

/// Text examples longer than any max_seq_len here, so that every row of a step is full: the
/// case the estimate is for.
fn long_texts(dir: &Path) -> std::path::PathBuf {
    let lines: Vec<String> = (0..16)
        .map(|i| json!({"text": format!("{i} {}", "the quick brown fox jumps over the lazy dog ".repeat(30))}).to_string())
        .collect();
    crate::helpers::write(dir, "long.jsonl", &lines.join("\n"))
}

/// Preference pairs whose answers fill max_seq_len: a DPO micro-batch holds two sequences per
/// pair (less their shared prompt).
fn long_pairs(dir: &Path) -> std::path::PathBuf {
    let lines: Vec<String> = (0..16)
        .map(|i| {
            json!({
                "prompt": format!("Question {i}: say something long."),
                "chosen": "the quick brown fox jumps over the lazy dog ".repeat(12),
                "rejected": "a slow red hen walks under the busy cat ".repeat(12),
            })
            .to_string()
        })
        .collect();
    crate::helpers::write(dir, "pairs.jsonl", &lines.join("\n"))
}

fn spec(model: &Path, data: &Path, extra: Value) -> Value {
    let mut v = json!({
        "base_model": model.to_str().unwrap(),
        "dataset": {"url": format!("file://{}", data.display()), "format": "text"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"max_steps": 2, "batch_size": 4, "max_seq_len": 256, "learning_rate": 1e-4},
        "checkpoint_every_steps": 1000,
    });
    merge(&mut v, extra);
    v
}

/// `qtune train` in its own process; its summary's peak resident memory.
fn measured_peak(dir: &Path, name: &str, spec: &Value) -> u64 {
    let spec_path = crate::helpers::write(dir, &format!("{name}.json"), &spec.to_string());
    let out = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(["train", spec_path.to_str().unwrap(), "--output"])
        .arg(dir.join(format!("{name}-out")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let summary: Value = serde_json::from_str(&stdout[stdout.rfind("\n{").map_or(0, |i| i + 1)..])
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    // every configuration here multiplies by frozen weights through the timed kernels
    let matmul_s = summary["seconds_by_part"]["frozen_matmul"].as_f64();
    assert!(matmul_s.is_some_and(|s| s > 0.0), "{summary}");
    summary["peak_rss_bytes"].as_u64().unwrap()
}

/// The estimate of `body` once `n` workers have reported (a worker reports as it starts).
async fn pool_of(app: &crate::helpers::app::TestApp, body: &Value, n: usize) -> Value {
    eventually(
        Duration::from_secs(30),
        "the pool's workers reported",
        || async {
            let (status, estimate) = app.post("/v1/jobs/estimate", body).await;
            assert_eq!(status, 200, "{estimate}");
            match estimate["workers"].as_array().unwrap().len() == n {
                true => Ok(estimate),
                false => Err(estimate.to_string()),
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estimate_is_within_a_quarter_of_the_measured_peak_on_the_cpu() {
    let app = spawn_app_with(|_| {}).await;
    let dir = app.dir.path();
    let (model, data) = (small_smollm2(dir, Arch::Llama), long_texts(dir));
    let pairs = format!("file://{}", long_pairs(dir).display());
    let composite = small_smollm2(dir, Arch::Qwen3);
    let cases = [
        ("float32", &model, json!({})),
        (
            "nf4-checkpointing",
            &model,
            json!({"quantization": {"type": "nf4"}, "training": {"gradient_checkpointing": true}}),
        ),
        (
            "all-linear-512",
            &model,
            json!({"lora": {"target_modules": "all-linear"}, "training": {"batch_size": 2, "max_seq_len": 512}}),
        ),
        (
            "dpo",
            &model,
            json!({"method": {"type": "dpo"}, "dataset": {"url": pairs, "format": "auto"}}),
        ),
        ("composite-graph", &composite, json!({})),
        (
            "composite-graph-checkpointing",
            &composite,
            json!({"training": {"gradient_checkpointing": true}}),
        ),
    ];
    for (name, base, extra) in cases {
        let spec = spec(base, &data, extra);
        let (status, estimate) = app.post("/v1/jobs/estimate", &spec).await;
        assert_eq!(status, 200, "{estimate}");
        assert_eq!(estimate["object"], "fine_tuning.job.estimate");
        assert_eq!(estimate["model"]["layers"], 6);
        let memory = &estimate["memory"];
        let parts: u64 = [
            "weights_bytes",
            "adapter_bytes",
            "activations_bytes",
            "workspace_bytes",
            "runtime_bytes",
        ]
        .iter()
        .map(|k| memory[k].as_u64().unwrap())
        .sum();
        assert_eq!(
            parts,
            memory["training_bytes"].as_u64().unwrap(),
            "{memory}"
        );
        let predicted = memory["peak_bytes"].as_u64().unwrap();
        assert_eq!(
            predicted,
            parts.max(memory["loading_bytes"].as_u64().unwrap()),
            "{memory}"
        );
        let measured = measured_peak(dir, name, &spec);
        let ratio = predicted as f64 / measured as f64;
        eprintln!("{name}: estimated {predicted} bytes, measured {measured}: {ratio:.3}");
        assert!(
            (0.75..=1.25).contains(&ratio),
            "{name}: estimated {predicted} bytes against a measured peak of {measured} ({ratio:.3}x): {memory}"
        );
    }
    // this process's worker reported its device: the estimate says where the job fits and how
    // long a step takes from the measured rate
    let estimate = pool_of(&app, &spec(&model, &data, json!({})), 1).await;
    let workers = estimate["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{estimate}");
    assert_eq!(workers[0]["device"], "cpu");
    assert_eq!(estimate["fits"], true);
    assert!(estimate["seconds_per_step"].as_f64().unwrap() > 0.0);
    // two steps; compared within a part in 10¹²: serde_json's default float parsing may land one
    // unit in the last place away from the number the server printed
    let (total, per_step) = (
        estimate["total_seconds"].as_f64().unwrap(),
        estimate["seconds_per_step"].as_f64().unwrap(),
    );
    assert!(
        (total - 2.0 * per_step).abs() <= 1e-12 * total,
        "{estimate}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estimate_refuses_what_it_cannot_read() {
    let app = spawn_app_with(|_| {}).await;
    // a folder under the allowed dirs without a config.json
    let empty = app.dir.path().join("not-a-model");
    std::fs::create_dir_all(&empty).unwrap();
    let (status, body) = app
        .post(
            "/v1/jobs/estimate",
            &app.job(json!({"base_model": empty.to_str().unwrap()})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "model_unavailable");
    assert_eq!(body["error"]["param"], "base_model");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("config.json"),
        "{body}"
    );
    // a base outside the allowed dirs is refused as at submission, naming nothing about it
    let (status, body) = app
        .post("/v1/jobs/estimate", &app.job(json!({"base_model": "/etc"})))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["param"], "base_model");
    // a bad spec names its field; nothing was queued by any of this
    let (status, body) = app
        .post(
            "/v1/jobs/estimate",
            &app.job(json!({"training": {"batch_size": 0}})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["param"], "training.batch_size");
    let (_, list) = app.get("/v1/jobs").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_worker_could_hold_fails_naming_its_estimate() {
    // a worker that may plan for 16 MiB: less than the process alone needs
    let app = spawn_app_with(|c| c.worker_memory_mib = Some(16)).await;
    let body = app.job(json!({}));
    let estimate = pool_of(&app, &body, 1).await;
    assert_eq!(estimate["fits"], false, "{estimate}");
    assert_eq!(estimate["workers"][0]["total_bytes"], 16 << 20);
    let id = app.submit(&body).await;
    let job = app
        .wait_status(&id, &["failed"], Duration::from_secs(30))
        .await;
    assert_eq!(job["error"]["code"], "insufficient_memory", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    let peak = estimate["memory"]["peak_bytes"].as_u64().unwrap();
    let gib = format!("{:.2} GiB", peak as f64 / (1u64 << 30) as f64);
    assert!(
        message.contains(&gib) && message.contains("(the largest: 0.02 GiB)"),
        "{message}"
    );
    assert!(message.contains("training.max_seq_len"), "{message}");
    // the server goes on: a job that fits a worker with room runs
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_too_large_for_one_worker_waits_for_another_with_room() {
    // worker A (this process) may plan for 16 MiB; worker B (`qtune worker`, another process
    // on the same database) for what its host has
    let app = spawn_app_with(|c| c.worker_memory_mib = Some(16)).await;
    let mut worker_b = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(["worker", "--devices", "cpu"])
        .env("QTUNE_DATA_DIR", &app.data_dir)
        .env("QTUNE_ALLOW_FILE_DIRS", app.dir.path())
        .env("QTUNE_ALLOW_MODEL_DIRS", app.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let body = app.job(json!({}));
    let pool = pool_of(&app, &body, 2).await;
    assert_eq!(pool["fits"], true, "{pool}");
    let fits: Vec<bool> = pool["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["fits"].as_bool().unwrap())
        .collect();
    assert_eq!(fits, [true, false], "largest first: {pool}");

    // B stops taking work for a while (SIGSTOP): its device is still in the pool
    let pid = worker_b.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let id = app.submit(&body).await;
    // A claims it, finds it too large for itself, and puts it back for a worker with room
    let waited = eventually(
        Duration::from_secs(120),
        "worker A put the job back for a worker with room",
        || async {
            let (_, events) = app
                .get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=50"))
                .await;
            let messages: Vec<String> = events["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["message"].as_str().unwrap_or("").to_string())
                .collect();
            match messages.iter().find(|m| m.contains("worker with room")) {
                Some(m) => Ok(m.clone()),
                None => Err(format!("{messages:?}")),
            }
        },
    )
    .await;
    assert!(
        waited.contains("GiB at its peak") && waited.contains("0.02 GiB free"),
        "{waited}"
    );
    // and does not take it again
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_i64()),
        (Some("queued"), Some(1)),
        "{job}"
    );

    // B resumes and runs it
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let job = app
        .wait_status(&id, &["succeeded", "failed"], Duration::from_secs(120))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    worker_b.kill().unwrap();
    worker_b.wait().unwrap();
    app.shutdown().await;
}
