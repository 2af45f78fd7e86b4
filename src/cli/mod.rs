//! The `qtune` command line: the service (`serve`), the engine run locally (`train`, `generate`,
//! `bench`), the HTTP client commands (`submit`, `jobs`, `status`, `follow`, `cancel`, `pause`, `resume`,
//! `download`) and `quickstart`, which is all of it in one go.

pub mod bench;
pub mod docs;
mod local;
mod quickstart;
mod remote;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::train;

#[derive(Parser)]
#[command(
    name = "qtune",
    version,
    about = "LoRA / QLoRA fine-tuning in one binary"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// parsed once at start-up: the size of the serve settings does not matter
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Run the job service: HTTP API, the queue (SQLite, or PostgreSQL shared with other
    /// processes), one worker per device (--workers 0: the API only).
    Serve(crate::config::ServeConfig),
    /// Run workers only, on the database and artifact store that `qtune serve` uses (the same
    /// settings; the API's are ignored): more machines for one queue.
    Worker {
        #[command(flatten)]
        config: crate::config::ServeConfig,
        /// Serve /healthz and /readyz here (for an orchestrator's checks).
        #[arg(long, env = "QTUNE_HEALTH_LISTEN")]
        health_listen: Option<std::net::SocketAddr>,
    },
    /// Print a documentation page generated from this binary (docs/src/configuration.md,
    /// docs/src/api-reference.md).
    #[command(hide = true)]
    Docs { page: docs::Page },
    /// Start the service here, submit examples/quickstart.json, watch it train, save the adapter.
    Quickstart(quickstart::QuickstartArgs),
    /// Submit a job spec to a server; prints the job id. A local dataset path is uploaded first.
    Submit {
        spec: PathBuf,
        /// Show the job's progress until it finishes.
        #[arg(long)]
        follow: bool,
        /// Once it has succeeded, save the adapter into this folder (implies --follow).
        #[arg(long)]
        download: Option<PathBuf>,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// List jobs, newest first.
    Jobs {
        /// Only jobs in this status: queued, running, paused, succeeded, failed, cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Show one job: status, phase, progress, losses, error.
    Status {
        id: String,
        /// The job as the server returns it (JSON).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Follow a job's live progress (step, loss, ETA) until it finishes.
    Follow {
        id: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Cancel a job: a queued one at once, a running one at its next step.
    Cancel {
        id: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Pause a job: a running one checkpoints at its next step and leaves its worker.
    Pause {
        id: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Resume a paused job from its last checkpoint.
    Resume {
        id: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Save a succeeded job's adapter (PEFT folder) into DIR.
    Download {
        id: String,
        dir: PathBuf,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Export an adapter for serving: `merged` writes a Hugging Face folder with the adapter
    /// folded into the weights (W + scale·B·A); `gguf` writes that merged model as one llama.cpp
    /// GGUF file; `gguf-lora` writes the adapter alone as a llama.cpp LoRA file.
    Export {
        /// The base model: its Hugging Face folder (config.json + safetensors) or `.gguf` file.
        #[arg(long)]
        model: PathBuf,
        /// The PEFT adapter folder (a job's download, or `adapter/` of `qtune train`).
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// `gguf` only: the type of the 2-D weights (norms stay f32).
        #[arg(long = "type", default_value = "f16", value_parser = ["f32", "f16", "q8_0", "q4_k"])]
        gguf_type: String,
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Fine-tune a model as a job spec says; checkpoints, adapter/ and metrics.jsonl go into --output.
    Train {
        /// The job spec (JSON), as the HTTP API takes it.
        spec: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        /// Continue from the latest checkpoint in --output.
        #[arg(long)]
        resume: bool,
        /// Start from an existing PEFT adapter folder.
        #[arg(long)]
        init_adapter: Option<PathBuf>,
        /// `cpu` or `cuda:N` (needs a build with --features cuda).
        #[arg(long, default_value = "cpu", env = "QTUNE_DEVICE")]
        device: String,
    },
    /// Measure a training step at one of SmolLM2's shapes (random weights): tokens/s, peak RSS.
    Bench(bench::BenchOptions),
    /// Time generation: time to first token and decode tokens/s (1 and N streams, base and with
    /// an adapter), and the memory of one base with many adapters.
    BenchGenerate(bench::generate::GenerateBenchOptions),
    /// Load-test the job API: requests/s and latency percentiles, idle and while training.
    BenchApi {
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Base model of the concurrent training jobs (default: a small random model).
        #[arg(long)]
        train_model: Option<String>,
        /// Measure on this database (`postgres://…`; it gets the benchmark's jobs) instead of
        /// SQLite in a temporary directory.
        #[arg(long)]
        database: Option<String>,
        /// Workers, each training one job, during the second measurement.
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
    /// Answer one prompt with greedy decoding through the chat template (optionally with an adapter).
    Generate {
        /// .gguf file, model folder or Hub repo id.
        #[arg(long)]
        model: String,
        /// A PEFT adapter folder trained on this model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 decodes greedily; above it, samples.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Sample among the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop before this text (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f64,
        /// Continue the prompt as raw text instead of rendering it as a user message through the
        /// chat template (base models, which have none).
        #[arg(long)]
        no_chat_template: bool,
    },
    /// The token-weighted mean loss and token accuracy of a model (optionally with an adapter)
    /// on a dataset, labelled as training and validation label it: compare a fine-tune with its base.
    Eval {
        /// .gguf file, model folder or Hub repo id.
        #[arg(long)]
        model: String,
        /// A PEFT adapter folder trained on this model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A JSON Lines dataset file, in any format training reads.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        format: EvalFormat,
        /// Longer examples are cut to this many tokens, as training cuts them.
        #[arg(long, default_value_t = 2048)]
        max_seq_len: usize,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Print one JSON object instead of a line of text.
        #[arg(long)]
        json: bool,
    },
}

/// The dataset formats, as `dataset.format` names them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EvalFormat {
    Auto,
    Messages,
    Alpaca,
    Sharegpt,
    PromptCompletion,
    Text,
}

impl From<EvalFormat> for crate::spec::DatasetFormat {
    fn from(f: EvalFormat) -> Self {
        use crate::spec::DatasetFormat as D;
        match f {
            EvalFormat::Auto => D::Auto,
            EvalFormat::Messages => D::Messages,
            EvalFormat::Alpaca => D::Alpaca,
            EvalFormat::Sharegpt => D::Sharegpt,
            EvalFormat::PromptCompletion => D::PromptCompletion,
            EvalFormat::Text => D::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// A Hugging Face folder with the adapter merged into the weights.
    Merged,
    /// The merged model as a llama.cpp GGUF file (`llama-cli -m`, Ollama's `FROM`).
    Gguf,
    /// The adapter as a llama.cpp LoRA GGUF file (`llama-server --lora`, Ollama's `ADAPTER`).
    GgufLora,
}

pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(config) => serve(config, None),
        Command::Worker {
            config,
            health_listen,
        } => serve(config, Some(health_listen)),
        Command::Quickstart(args) => quickstart::run(args),
        Command::Docs { page } => {
            print!("{}", page.render());
            Ok(())
        }
        Command::Submit {
            spec,
            follow,
            download,
            remote,
        } => remote::submit(&remote, &spec, follow, download.as_deref()),
        Command::Jobs {
            status,
            limit,
            remote,
        } => remote::jobs(&remote, status.as_deref(), limit),
        Command::Status { id, json, remote } => remote::status(&remote, &id, json),
        Command::Follow { id, remote } => remote::follow(&remote, &id),
        Command::Cancel { id, remote } => remote::cancel(&remote, &id),
        Command::Pause { id, remote } => remote::pause(&remote, &id),
        Command::Resume { id, remote } => remote::resume(&remote, &id),
        Command::Download { id, dir, remote } => remote::download(&remote, &id, &dir),
        Command::Train {
            spec,
            output,
            resume,
            init_adapter,
            device,
        } => local::train(&spec, output, resume, init_adapter, &device),
        Command::Bench(opts) => Ok(bench::run(&opts)?),
        Command::BenchGenerate(opts) => Ok(bench::generate::run(&opts)?),
        Command::BenchApi {
            jobs,
            connections,
            seconds,
            train_model,
            database,
            workers,
        } => bench::api::run(&bench::api::ApiBenchOptions {
            database,
            workers,
            jobs,
            connections,
            seconds,
            train_model,
        }),
        Command::Export {
            model,
            adapter,
            format,
            gguf_type,
            output,
        } => local::export(&model, &adapter, format, &gguf_type, &output),
        Command::Generate {
            model,
            adapter,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            repetition_penalty,
            no_chat_template,
        } => {
            let sampling = train::generate::Sampling {
                max_tokens: max_new_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
                repetition_penalty,
                ..Default::default()
            };
            local::generate(
                &model,
                adapter.as_deref(),
                &prompt,
                &sampling,
                no_chat_template,
            )
        }
        Command::Eval {
            model,
            adapter,
            data,
            format,
            max_seq_len,
            batch_size,
            json,
        } => local::eval(
            &model,
            adapter.as_deref(),
            &data,
            format,
            max_seq_len,
            batch_size,
            json,
        ),
    }
}

/// `worker`: `None` runs `qtune serve`; `Some(health_listen)` runs `qtune worker`.
fn serve(
    config: crate::config::ServeConfig,
    worker: Option<Option<std::net::SocketAddr>>,
) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QTUNE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // colour only on a terminal: `docker logs` and log collectors get plain text
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let database = crate::db::redact(&config.database_url());
        let app = match worker {
            None => {
                tracing::info!(listen = %config.listen, data_dir = %config.data_dir.display(), %database, devices = ?config.worker_devices(), api_keys = config.api_keys.len(), "starting qtune serve");
                crate::app::App::build(config).await?
            }
            Some(health_listen) => {
                tracing::info!(data_dir = %config.data_dir.display(), %database, devices = ?config.worker_devices(), "starting qtune worker");
                crate::app::App::build_worker(config, health_listen).await?
            }
        };
        tracing::info!(port = app.port(), "listening");
        app.run_until_stopped(crate::app::shutdown_signal()).await
    })
}
