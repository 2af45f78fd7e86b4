//! The worker pool: one worker per device claims queued jobs from the database, runs the engine
//! on a blocking thread, and turns the engine's events into database rows and stream events.

mod fetch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::app::{stop_flag, AppState};
use crate::spec::JobSpec;
use crate::train::{self, Event, Reporter};

/// A claim is held this long without a heartbeat before another worker may take the job over.
const LEASE_SECS: i64 = 60;
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Runs one worker until the server shuts down.
pub async fn run(state: AppState, device_name: String) {
    let worker_id = format!("{}:{}:{}", hostname(), std::process::id(), device_name);
    let device = match crate::cli::parse_device(&device_name) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(device = %device_name, error = %e, "worker not started");
            return;
        }
    };
    state.workers_up.fetch_add(1, Ordering::SeqCst);
    tracing::info!(worker = %worker_id, "worker up");
    while !state.shutdown.is_cancelled() {
        let claim = match state.db.claim_next(&worker_id, LEASE_SECS).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "claiming a job failed");
                None
            }
        };
        match claim {
            Some(claim) => {
                let span = tracing::info_span!("job", job.id = %claim.id, attempt = claim.attempt);
                run_job(&state, &device, claim).instrument(span).await;
            }
            None => {
                let notified = state.job_queued.notified();
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = state.shutdown.cancelled() => {}
                }
            }
        }
    }
    state.workers_up.fetch_sub(1, Ordering::SeqCst);
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Engine events go through a channel to the async side, in order.
struct ChannelReporter {
    tx: mpsc::UnboundedSender<Event>,
    stop: Arc<AtomicBool>,
}

impl Reporter for ChannelReporter {
    fn report(&mut self, event: &Event) {
        let _ = self.tx.send(event.clone());
    }
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

async fn run_job(state: &AppState, device: &candle_core::Device, claim: crate::db::Claim) {
    let id = claim.id.clone();
    let attempt = claim.attempt;
    tracing::info!("job started");
    let _ = state
        .publish(
            &id,
            "status",
            &json!({"status": "running", "attempt": attempt}),
        )
        .await;
    let stop = stop_flag(state, &id);
    stop.store(false, Ordering::SeqCst);
    let result = execute(state, device, &claim, stop.clone()).await;
    state.running.lock().expect("poisoned").remove(&id);
    let (status, error) = match result {
        Ok(()) => ("succeeded", None),
        Err(JobError::Stopped) if state.shutdown.is_cancelled() => {
            let _ = state.db.requeue(&id, attempt).await;
            let _ = state.publish(&id, "status", &json!({"status": "queued", "reason": "server shutting down; resumes from its last checkpoint"})).await;
            tracing::info!("job requeued for shutdown");
            return;
        }
        Err(JobError::Stopped) => ("cancelled", None),
        Err(JobError::Failed(code, message)) => ("failed", Some((code, message))),
    };
    let owned = state
        .db
        .finish(
            &id,
            attempt,
            status,
            error.as_ref().map(|(c, m)| (*c, m.as_str())),
        )
        .await
        .unwrap_or(false);
    if owned {
        let mut data = json!({"status": status});
        if let Some((code, message)) = &error {
            data["error"] = json!({"code": code, "message": message});
        }
        let _ = state.publish(&id, "status", &data).await;
        tracing::info!(%status, "job finished");
    } else {
        tracing::warn!("job was taken over by another worker; result dropped");
    }
}

enum JobError {
    Stopped,
    Failed(&'static str, String),
}

async fn execute(
    state: &AppState,
    device: &candle_core::Device,
    claim: &crate::db::Claim,
    stop: Arc<AtomicBool>,
) -> Result<(), JobError> {
    let (id, attempt) = (claim.id.as_str(), claim.attempt);
    let mut spec: JobSpec = serde_json::from_str(&claim.spec)
        .map_err(|e| JobError::Failed("invalid_spec", e.to_string()))?;
    let job_dir = state.config.job_dir(id);
    let out = job_dir.join("output");

    let _ = state.db.set_phase(id, attempt, "fetching_dataset").await;
    let _ = state
        .publish(
            id,
            "status",
            &json!({"status": "running", "phase": "fetching_dataset"}),
        )
        .await;
    let mut url_of_path: Vec<(PathBuf, String)> = Vec::new();
    let train_path = fetch::fetch_dataset(
        &state.config,
        &spec.dataset.url,
        &job_dir.join("dataset/train.jsonl"),
    )
    .await
    .map_err(|m| JobError::Failed("dataset_fetch_failed", m))?;
    url_of_path.push((train_path.clone(), spec.dataset.url.clone()));
    spec.dataset.url = train_path.display().to_string();
    if let Some(v) = spec.dataset.validation_url.clone() {
        let p = fetch::fetch_dataset(&state.config, &v, &job_dir.join("dataset/validation.jsonl"))
            .await
            .map_err(|m| JobError::Failed("dataset_fetch_failed", m))?;
        url_of_path.push((p.clone(), v));
        spec.dataset.validation_url = Some(p.display().to_string());
    }
    let init_adapter = spec
        .from_checkpoint
        .as_deref()
        .map(|from| match from.split_once(':') {
            Some((job, step)) => state
                .config
                .job_dir(job)
                .join("output")
                .join(format!("checkpoint-{step}")),
            None => state.config.job_dir(from).join("output/adapter"),
        });

    // Engine events → database + stream, in order, on the async side.
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let persister = {
        let state = state.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            // a resumed job keeps counting from where its previous attempt got to
            let mut tokens_seen = match state.db.get_job(&id, None).await {
                Ok(Some(row)) => row.tokens_seen,
                _ => 0,
            };
            while let Some(event) = rx.recv().await {
                if let Err(e) = persist(&state, &id, attempt, &event, &mut tokens_seen).await {
                    tracing::error!(error = %e, "could not store a job event");
                }
            }
        })
    };
    let heartbeat = {
        let state = state.clone();
        let id = id.to_string();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                    _ = state.shutdown.cancelled() => { stop.store(true, Ordering::SeqCst); return; }
                }
                match state.db.heartbeat(&id, attempt, LEASE_SECS).await {
                    Ok(Some(cancel)) if cancel => stop.store(true, Ordering::SeqCst),
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        stop.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        })
    };
    // A cancel that arrived between claim and now.
    if let Ok(Some(row)) = state.db.get_job(id, None).await {
        if row.cancel_requested != 0 {
            stop.store(true, Ordering::SeqCst);
        }
    }
    forget_unrecorded_checkpoints(state, id, &out).await;
    let opts = train::RunOptions {
        output_dir: out.clone(),
        device: device.clone(),
        resume: true,
        init_adapter,
    };
    let engine = tokio::task::spawn_blocking(move || {
        let mut reporter = ChannelReporter { tx, stop };
        let span = tracing::info_span!("engine");
        let _enter = span.enter();
        train::run(&spec, &opts, &mut reporter)
    });
    let result = engine.await;
    heartbeat.abort();
    let _ = persister.await;
    match result {
        Ok(Ok(_)) => {
            let _ = state.db.set_phase(id, attempt, "saving").await;
            let tar = out.join("adapter.tar");
            let adapter = out.join("adapter");
            tokio::task::spawn_blocking(move || write_tar(&adapter, &tar))
                .await
                .map_err(|e| JobError::Failed("internal_error", e.to_string()))?
                .map_err(|e| JobError::Failed("io_error", e.to_string()))?;
            Ok(())
        }
        Ok(Err(train::Error::Cancelled)) => Err(JobError::Stopped),
        Ok(Err(e)) => {
            let mut message = e.to_string();
            for (path, url) in &url_of_path {
                message = message.replace(&path.display().to_string(), url);
            }
            Err(JobError::Failed(e.code(), message))
        }
        Err(panic) => Err(JobError::Failed(
            "internal_error",
            format!("the training thread panicked: {panic}"),
        )),
    }
}

/// A resume must start from a checkpoint the database has recorded. The engine writes a
/// checkpoint to disk before its events reach the database, so a server killed in between leaves
/// a folder whose preceding steps were never stored; resuming from it would leave a gap in the
/// job's loss curve and checkpoint list. Such folders are removed and those steps run again.
async fn forget_unrecorded_checkpoints(state: &AppState, id: &str, out: &Path) {
    let recorded: Vec<u64> = match state.db.list_checkpoints(id).await {
        Ok(rows) => rows.iter().map(|r| r.step as u64).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not list recorded checkpoints");
            return;
        }
    };
    for (step, dir) in train::checkpoint::list_checkpoints(out) {
        if !recorded.contains(&step) {
            tracing::info!(step, "removing a checkpoint the database never recorded");
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                tracing::warn!(error = %e, path = %dir.display(), "could not remove checkpoint");
            }
        }
    }
}

/// The PEFT folder as one tar archive, for `GET /v1/jobs/{id}/adapter`.
fn write_tar(dir: &Path, dest: &Path) -> std::io::Result<()> {
    let tmp = dest.with_extension("tar.part");
    let mut builder = tar::Builder::new(std::fs::File::create(&tmp)?);
    builder.append_dir_all("adapter", dir)?;
    builder.into_inner()?.sync_all()?;
    std::fs::rename(tmp, dest)
}

async fn persist(
    state: &AppState,
    id: &str,
    attempt: i64,
    event: &Event,
    tokens_seen: &mut i64,
) -> crate::db::Result<()> {
    match event {
        Event::Phase { phase } => {
            let name = match phase {
                train::Phase::LoadingModel => "loading_model",
                train::Phase::Tokenizing => "tokenizing",
                train::Phase::Training => "training",
                train::Phase::Saving => "saving",
            };
            state.db.set_phase(id, attempt, name).await?;
            state
                .publish(id, "status", &json!({"status": "running", "phase": name}))
                .await?;
        }
        Event::Data { total_steps, .. } => {
            state
                .db
                .set_total_steps(id, attempt, *total_steps as i64)
                .await?;
            state
                .publish(id, "data", &serde_json::to_value(event).unwrap_or_default())
                .await?;
        }
        Event::Step(m) => {
            *tokens_seen += m.tokens as i64;
            state
                .db
                .set_progress(
                    id,
                    attempt,
                    m.step as i64,
                    m.total_steps as i64,
                    m.epoch,
                    *tokens_seen,
                    m.elapsed_seconds,
                    m.loss,
                )
                .await?;
            state
                .publish(id, "metrics", &serde_json::to_value(m).unwrap_or_default())
                .await?;
        }
        Event::Eval {
            step,
            epoch,
            eval_loss,
        } => {
            state.db.set_eval_loss(id, attempt, *eval_loss).await?;
            state
                .publish(
                    id,
                    "eval",
                    &json!({"step": step, "epoch": epoch, "eval_loss": eval_loss}),
                )
                .await?;
        }
        Event::Checkpoint { step, path } => {
            let mut files = Vec::new();
            for name in [
                train::checkpoint::ADAPTER_WEIGHTS,
                train::checkpoint::ADAPTER_CONFIG,
            ] {
                let p = path.join(name);
                let bytes = tokio::fs::metadata(&p).await.map(|m| m.len()).unwrap_or(0);
                let sha = crate::api::sha256_file(&p).await.unwrap_or_default();
                files.push(json!({"name": name, "bytes": bytes, "sha256": sha}));
            }
            state
                .db
                .insert_checkpoint(
                    id,
                    *step as i64,
                    &serde_json::Value::Array(files.clone()).to_string(),
                )
                .await?;
            state
                .publish(id, "checkpoint", &json!({"step": step, "files": files}))
                .await?;
        }
    }
    Ok(())
}
