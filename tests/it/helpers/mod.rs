//! What the tests share: the service in this process (`app`), the binary as a process
//! (`process`), a tiny random model folder, small datasets and specs.

/// The lease the tests' direct claims take: long enough never to expire by accident.
pub const LEASE_SECS: i64 = 60;

/// A database for a test: a new PostgreSQL database when the run selects that backend
/// (`QTUNE_TEST_BACKEND=postgres`), else an SQLite file in `dir`.
pub fn test_database(dir: &std::path::Path) -> String {
    if postgres::selected() {
        postgres::database()
    } else {
        format!("sqlite://{}", dir.join("qtune.db").display())
    }
}

pub mod app;
pub mod faults;
pub mod postgres;
pub mod process;

/// Polls `probe` until it answers `Ok`, and returns that; fails the test once `within` has
/// passed, with `what` and the last `Err` the probe gave (the state it was waiting to change).
/// Every wait in the tests has a deadline: a wait that cannot end can only hang, never fail.
pub async fn eventually<T, F, Fut>(within: std::time::Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = std::time::Instant::now();
    loop {
        match probe().await {
            Ok(done) => return done,
            Err(last) if start.elapsed() > within => {
                panic!("{what}: not within {within:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

use std::path::{Path, PathBuf};

use qtune::cli::bench::random_model as synthetic;
use qtune::spec::JobSpec;

/// A tiny Llama folder (2 layers, hidden 32, byte tokenizer, ChatML template) in `dir/model`.
/// A real pretrained model file that scripts/fetch-test-models.sh caches (in
/// `$QTUNE_TEST_MODELS`, or `.cache/test-models`).
pub fn test_model(file: &str) -> PathBuf {
    let dir = std::env::var("QTUNE_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/test-models"));
    let path = dir.join(file);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-test-models.sh",
        path.display()
    );
    path
}

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

use app::merge;

/// The `train_loss` values of metrics.jsonl, by step.
pub fn train_losses(output: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| !v["train_loss"].is_null())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["train_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Asks the engine to stop after `n` steps (a pause, as the worker's sink asks for one).
pub struct StopAfter {
    pub n: u64,
    pub seen: u64,
}

impl qtune::train::Reporter for StopAfter {
    fn report(&mut self, e: &qtune::train::Event) {
        if let qtune::train::Event::Step(m) = e {
            self.seen = m.step;
        }
    }
    fn should_stop(&self) -> bool {
        self.seen >= self.n
    }
}

pub fn run_options(out: &Path) -> qtune::train::RunOptions {
    qtune::train::RunOptions {
        output_dir: out.to_path_buf(),
        device: candle_core::Device::Cpu,
        resume: false,
        init_adapter: None,
        datasets: None,
        max_record_bytes: qtune::train::data::DEFAULT_MAX_RECORD_BYTES,
        max_total_steps: None,
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

/// A dataset file named by its path, as `qtune train` names a local file.
pub fn dataset_file(path: &Path) -> qtune::train::DatasetFile {
    qtune::train::DatasetFile {
        path: path.to_path_buf(),
        name: path.display().to_string(),
    }
}

/// The S3 store the tests put artifacts in: `QTUNE_TEST_S3` (`s3://bucket`), with the server's
/// address and keys in the `AWS_*` variables that qtune reads. scripts/test.sh starts the server
/// (rclone's `serve s3`) and sets them; each caller gets a prefix of its own.
pub fn s3_artifacts() -> String {
    let bucket = std::env::var("QTUNE_TEST_S3").expect(
        "QTUNE_TEST_S3 and the AWS_* variables name the S3 server these tests need: \
         run them through scripts/test.sh, which starts one",
    );
    format!(
        "{}/t-{}",
        bucket.trim_end_matches('/'),
        uuid::Uuid::new_v4().simple()
    )
}
