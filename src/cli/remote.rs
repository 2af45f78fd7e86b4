//! The client commands: `qtune submit`, `jobs`, `status`, `follow`, `cancel`, `download`.
//! They talk to a running `qtune serve` over HTTP, through [`crate::client::Client`].

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::client::{Client, StreamEvent};

/// Where the server is and who is calling.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The qtune server's base URL.
    #[arg(long, env = "QTUNE_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Sent as `Authorization: Bearer <key>` when the server has API keys.
    #[arg(long, env = "QTUNE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl Remote {
    pub fn client(&self) -> Client {
        Client::new(&self.server, self.api_key.clone())
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `qtune submit`: prints the new job's id, then follows and downloads when asked.
pub fn submit(
    remote: &Remote,
    spec_path: &Path,
    follow_it: bool,
    download_to: Option<&Path>,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(spec_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", spec_path.display()))?;
    let spec: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", spec_path.display()))?;
    runtime()?.block_on(async {
        let client = remote.client();
        let job = client.submit(spec, &mut |note| eprintln!("{note}")).await?;
        let id = job["id"].as_str().unwrap_or_default().to_string();
        println!("{id}");
        if follow_it || download_to.is_some() {
            follow_job(&client, &id).await?;
        }
        if let Some(dir) = download_to {
            download_adapter(&client, &id, dir).await?;
        }
        Ok(())
    })
}

pub fn jobs(remote: &Remote, status: Option<&str>, limit: u32) -> anyhow::Result<()> {
    let page = runtime()?.block_on(remote.client().jobs(status, limit))?;
    println!(
        "{:<36}  {:<9}  {:>11}  {:>8}  {:<20}  BASE MODEL",
        "ID", "STATUS", "STEP", "LOSS", "CREATED"
    );
    for job in page["data"].as_array().into_iter().flatten() {
        let p = &job["progress"];
        let step = match p["total_steps"].as_i64() {
            Some(total) => format!("{}/{total}", p["step"].as_i64().unwrap_or(0)),
            None => "-".into(),
        };
        println!(
            "{:<36}  {:<9}  {:>11}  {:>8}  {:<20}  {}",
            job["id"].as_str().unwrap_or(""),
            job["status"].as_str().unwrap_or(""),
            step,
            fmt_loss(&job["train_loss"]),
            job["created_at"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(19)
                .collect::<String>(),
            job["spec"]["base_model"].as_str().unwrap_or(""),
        );
    }
    if page["has_more"].as_bool() == Some(true) {
        println!("(more: --limit or --status to narrow)");
    }
    Ok(())
}

pub fn status(remote: &Remote, id: &str, json: bool) -> anyhow::Result<()> {
    let job = runtime()?.block_on(remote.client().job(id))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
        return Ok(());
    }
    let p = &job["progress"];
    println!("job       {}", job["id"].as_str().unwrap_or(""));
    println!(
        "status    {}{}",
        job["status"].as_str().unwrap_or(""),
        job["phase"]
            .as_str()
            .map(|ph| format!(" ({ph})"))
            .unwrap_or_default()
    );
    println!(
        "model     {}",
        job["spec"]["base_model"].as_str().unwrap_or("")
    );
    if let Some(total) = p["total_steps"].as_i64() {
        println!(
            "step      {}/{total}  epoch {:.2}  tokens {}",
            p["step"].as_i64().unwrap_or(0),
            p["epoch"].as_f64().unwrap_or(0.0),
            p["tokens_seen"].as_i64().unwrap_or(0)
        );
    }
    println!(
        "loss      train {}  eval {}",
        fmt_loss(&job["train_loss"]),
        fmt_loss(&job["eval_loss"])
    );
    if let Some(eta) = p["eta_seconds"].as_f64() {
        println!("eta       {}", fmt_duration(eta));
    }
    if let Some(e) = job["error"].as_object() {
        println!(
            "error     {}: {}",
            e.get("code").and_then(Value::as_str).unwrap_or(""),
            e.get("message").and_then(Value::as_str).unwrap_or("")
        );
    }
    println!("created   {}", job["created_at"].as_str().unwrap_or(""));
    if let Some(t) = job["finished_at"].as_str() {
        println!("finished  {t}");
    }
    Ok(())
}

pub fn follow(remote: &Remote, id: &str) -> anyhow::Result<()> {
    runtime()?.block_on(follow_job(&remote.client(), id))
}

pub fn cancel(remote: &Remote, id: &str) -> anyhow::Result<()> {
    let job = runtime()?.block_on(remote.client().cancel(id))?;
    let status = job["status"].as_str().unwrap_or("");
    if status == "running" {
        println!("{id}: cancel requested; the job stops at its next step");
    } else {
        println!("{id}: {status}");
    }
    Ok(())
}

pub fn download(remote: &Remote, id: &str, dir: &Path) -> anyhow::Result<()> {
    runtime()?.block_on(download_adapter(&remote.client(), id, dir))
}

pub async fn download_adapter(client: &Client, id: &str, dir: &Path) -> anyhow::Result<()> {
    let files = client.download(id, dir).await?;
    for f in &files {
        let bytes = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        eprintln!("saved {} ({bytes} bytes)", f.display());
    }
    Ok(())
}

/// Follows a job to its end with a progress bar (or one line per event when stdout is not a
/// terminal). Errors when the job did not succeed, so the exit status says how it ended.
pub async fn follow_job(client: &Client, id: &str) -> anyhow::Result<()> {
    let mut view = FollowView::new();
    let job = client.follow(id, &mut |e| view.show(e)).await?;
    view.finish();
    match job["status"].as_str() {
        Some("succeeded") => {
            println!(
                "job {id} succeeded: train loss {}, eval loss {}",
                fmt_loss(&job["train_loss"]),
                fmt_loss(&job["eval_loss"])
            );
            Ok(())
        }
        Some(status) => {
            let detail = job["error"]
                .as_object()
                .map(|e| {
                    format!(
                        ": {}: {}",
                        e.get("code").and_then(Value::as_str).unwrap_or(""),
                        e.get("message").and_then(Value::as_str).unwrap_or("")
                    )
                })
                .unwrap_or_default();
            anyhow::bail!("job {id} {status}{detail}")
        }
        None => anyhow::bail!("job {id}: the server sent no status"),
    }
}

/// Renders a job's event stream: a bar with step, loss and ETA on a terminal, text lines otherwise.
struct FollowView {
    bar: Option<ProgressBar>,
    train_loss: Option<f64>,
    eval_loss: Option<f64>,
}

impl FollowView {
    fn new() -> FollowView {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} (eta {eta})",
                )
                .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        FollowView {
            bar,
            train_loss: None,
            eval_loss: None,
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn losses(&self) -> String {
        let mut s = format!("loss {}", fmt_loss(&self.train_loss.into()));
        if self.eval_loss.is_some() {
            s.push_str(&format!("  eval {}", fmt_loss(&self.eval_loss.into())));
        }
        s
    }

    fn show(&mut self, e: &StreamEvent) {
        let d = &e.data;
        match e.kind.as_str() {
            "status" => {
                let mut text = format!("status: {}", d["status"].as_str().unwrap_or(""));
                if let Some(phase) = d["phase"].as_str() {
                    text.push_str(&format!(" ({phase})"));
                }
                if let Some(reason) = d["reason"].as_str() {
                    text.push_str(&format!(": {reason}"));
                }
                if let Some(err) = d["error"].as_object() {
                    text.push_str(&format!(
                        ": {}",
                        err.get("message").and_then(Value::as_str).unwrap_or("")
                    ));
                }
                self.line(text);
            }
            "data" => {
                let total = d["total_steps"].as_u64().unwrap_or(0);
                if let Some(bar) = &self.bar {
                    bar.set_length(total);
                }
                let t = &d["train"];
                self.line(format!(
                    "data: {} examples, {} tokens; {total} steps, {} trainable parameters",
                    t["examples"].as_u64().unwrap_or(0),
                    t["tokens"].as_u64().unwrap_or(0),
                    d["trainable_parameters"].as_u64().unwrap_or(0)
                ));
            }
            "metrics" => {
                let (step, total) = (
                    d["step"].as_u64().unwrap_or(0),
                    d["total_steps"].as_u64().unwrap_or(0),
                );
                self.train_loss = d["loss"].as_f64();
                match &self.bar {
                    Some(bar) => {
                        bar.set_length(total);
                        bar.set_position(step);
                        bar.set_message(self.losses());
                    }
                    None => {
                        let elapsed = d["elapsed_seconds"].as_f64().unwrap_or(0.0);
                        let eta = if step > 0 {
                            elapsed / step as f64 * total.saturating_sub(step) as f64
                        } else {
                            0.0
                        };
                        println!(
                            "step {step}/{total}  {}  lr {:.2e}  {:.0} tok/s  eta {}",
                            self.losses(),
                            d["learning_rate"].as_f64().unwrap_or(0.0),
                            d["tokens_per_second"].as_f64().unwrap_or(0.0),
                            fmt_duration(eta)
                        );
                    }
                }
            }
            "eval" => {
                self.eval_loss = d["eval_loss"].as_f64();
                self.line(format!(
                    "eval at step {}: eval loss {}",
                    d["step"].as_u64().unwrap_or(0),
                    fmt_loss(&d["eval_loss"])
                ));
                if let Some(bar) = &self.bar {
                    bar.set_message(self.losses());
                }
            }
            "checkpoint" => self.line(format!(
                "checkpoint at step {}",
                d["step"].as_u64().unwrap_or(0)
            )),
            _ => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn fmt_loss(v: &Value) -> String {
    v.as_f64()
        .map(|l| format!("{l:.4}"))
        .unwrap_or_else(|| "-".into())
}

fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
