//! The client commands: `qtune submit`, `jobs`, `status`, `follow`, `cancel`, `pause`,
//! `resume`, `download`.
//! They talk to a running `qtune serve` over HTTP, through [`crate::client::Client`].

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::client::{Client, StreamEvent};
use crate::events::JobEvent;
use crate::job::JobStatus;

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
        println!("{}", job.id);
        if follow_it || download_to.is_some() {
            follow_job(&client, &job.id).await?;
        }
        if let Some(dir) = download_to {
            download_adapter(&client, &job.id, dir).await?;
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
    for job in &page.data {
        let p = &job.progress;
        let step = match p.total_steps {
            Some(total) => format!("{}/{total}", p.step),
            None => "-".into(),
        };
        println!(
            "{:<36}  {:<9}  {:>11}  {:>8}  {:<20}  {}",
            job.id,
            job.status,
            step,
            fmt_loss(job.train_loss),
            job.created_at.chars().take(19).collect::<String>(),
            job.base_model(),
        );
    }
    if page.has_more {
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
    let p = &job.progress;
    println!("job       {}", job.id);
    println!(
        "status    {}{}",
        job.status,
        job.phase
            .as_deref()
            .map(|ph| format!(" ({ph})"))
            .unwrap_or_default()
    );
    println!("model     {}", job.base_model());
    if let Some(total) = p.total_steps {
        println!(
            "step      {}/{total}  epoch {:.2}  tokens {}",
            p.step,
            p.epoch.unwrap_or(0.0),
            p.tokens_seen
        );
    }
    println!(
        "loss      train {}  eval {}",
        fmt_loss(job.train_loss),
        fmt_loss(job.eval_loss)
    );
    if let Some(eta) = p.eta_seconds {
        println!("eta       {}", fmt_duration(eta));
    }
    if let Some(e) = &job.error {
        println!(
            "error     {}: {}",
            e.code,
            e.message.as_deref().unwrap_or("")
        );
    }
    println!("created   {}", job.created_at);
    if let Some(t) = &job.finished_at {
        println!("finished  {t}");
    }
    Ok(())
}

pub fn follow(remote: &Remote, id: &str) -> anyhow::Result<()> {
    runtime()?.block_on(follow_job(&remote.client(), id))
}

pub fn cancel(remote: &Remote, id: &str) -> anyhow::Result<()> {
    let job = runtime()?.block_on(remote.client().cancel(id))?;
    if job.status == JobStatus::Running {
        println!("{id}: cancel requested; the job stops at its next step");
    } else {
        println!("{id}: {}", job.status);
    }
    Ok(())
}

pub fn pause(remote: &Remote, id: &str) -> anyhow::Result<()> {
    let job = runtime()?.block_on(remote.client().pause(id))?;
    if job.status == JobStatus::Running {
        println!("{id}: pause requested; the job checkpoints and stops at its next step");
    } else {
        println!("{id}: {}", job.status);
    }
    Ok(())
}

pub fn resume(remote: &Remote, id: &str) -> anyhow::Result<()> {
    let job = runtime()?.block_on(remote.client().resume(id))?;
    println!("{id}: {}", job.status);
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
    if job.status == JobStatus::Succeeded {
        println!(
            "job {id} succeeded: train loss {}, eval loss {}",
            fmt_loss(job.train_loss),
            fmt_loss(job.eval_loss)
        );
        return Ok(());
    }
    let detail = job
        .error
        .map(|e| format!(": {}: {}", e.code, e.message.unwrap_or_default()))
        .unwrap_or_default();
    anyhow::bail!("job {id} {}{detail}", job.status)
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
        let mut s = format!("loss {}", fmt_loss(self.train_loss));
        if self.eval_loss.is_some() {
            s.push_str(&format!("  eval {}", fmt_loss(self.eval_loss)));
        }
        s
    }

    fn show(&mut self, e: &StreamEvent) {
        match &e.event {
            JobEvent::Status(change) => {
                let mut text = format!("status: {}", change.status);
                if let Some(phase) = change.phase {
                    text.push_str(&format!(" ({})", phase.as_str()));
                }
                if let Some(reason) = &change.reason {
                    text.push_str(&format!(": {reason}"));
                }
                if let Some(err) = &change.error {
                    text.push_str(&format!(": {}", err.message.as_deref().unwrap_or("")));
                }
                self.line(text);
            }
            JobEvent::Data(d) => {
                if let Some(bar) = &self.bar {
                    bar.set_length(d.total_steps);
                }
                self.line(format!(
                    "data: {} examples, {} tokens; {} steps, {} trainable parameters",
                    d.train.examples, d.train.tokens, d.total_steps, d.trainable_parameters
                ));
            }
            JobEvent::Metrics(m) => {
                self.train_loss = Some(m.train_loss);
                match &self.bar {
                    Some(bar) => {
                        bar.set_length(m.total_steps);
                        bar.set_position(m.step);
                        bar.set_message(self.losses());
                    }
                    None => {
                        let eta = if m.step > 0 {
                            m.elapsed_seconds / m.step as f64
                                * m.total_steps.saturating_sub(m.step) as f64
                        } else {
                            0.0
                        };
                        println!(
                            "step {}/{}  {}  lr {:.2e}  {:.0} tok/s  eta {}",
                            m.step,
                            m.total_steps,
                            self.losses(),
                            m.learning_rate,
                            m.tokens_per_second,
                            fmt_duration(eta)
                        );
                    }
                }
            }
            JobEvent::Eval(ev) => {
                self.eval_loss = Some(ev.eval_loss);
                let accuracy = ev
                    .eval_accuracy
                    .map(|a| format!("  token accuracy {a:.3}"))
                    .unwrap_or_default();
                self.line(format!(
                    "eval at step {}: eval loss {}{accuracy}",
                    ev.step,
                    fmt_loss(Some(ev.eval_loss))
                ));
                if let Some(bar) = &self.bar {
                    bar.set_message(self.losses());
                }
            }
            JobEvent::Checkpoint(c) => self.line(format!("checkpoint at step {}", c.step)),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn fmt_loss(v: Option<f64>) -> String {
    v.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into())
}

fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
