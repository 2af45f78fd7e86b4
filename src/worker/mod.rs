//! The worker pool: one worker per device claims queued jobs from the database under a lease
//! (`lease.rs`), runs each (`runner.rs`: fetch with `fetch.rs`, the engine on a blocking
//! thread, its events stored by `persist.rs`) and records how it ended. `capacity.rs` is the
//! worker's device as the pool sees it (memory, rate) and the memory check a claimed job passes
//! first: a job is claimed only by a worker whose free memory holds its estimated peak, and fails
//! with the estimate when no device in the pool could ever hold it. `retention.rs` removes
//! finished jobs' artifacts once they are older than the operator keeps them.

mod capacity;
mod fetch;
mod lease;
mod persist;
pub(crate) mod retention;
mod runner;

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::Instrument;

pub(crate) use runner::run_one;
pub use runner::Outcome;

use crate::db::{self, Lease};
use crate::events::{JobEvent, StatusChange};
use crate::job::{JobErrorView, JobStatus};
use crate::state::AppState;
use capacity::WorkerDevice;

/// Runs one worker until the server shuts down.
pub async fn run(state: AppState, device_name: String) {
    // unique among this process's workers too (`--devices cpu,cpu`, or two services in one
    // process): the number counts the workers this process started
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, Ordering::SeqCst);
    let worker_id = format!("{}:{}:{n}:{device_name}", hostname(), std::process::id());
    let device = match crate::train::device::parse(&device_name) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(device = %device_name, error = %e, "worker not started");
            return;
        }
    };
    let cap = state.config.worker_memory_mib.map(|mib| mib << 20);
    let device = std::sync::Arc::new(WorkerDevice::new(
        worker_id.clone(),
        device_name.clone(),
        device,
        cap,
    ));
    let reporting = tokio::spawn(capacity::keep_reporting(state.clone(), device.clone()));
    state.workers_up.fetch_add(1, Ordering::SeqCst);
    tracing::info!(worker = %worker_id, "worker up");
    while !state.shutdown.is_cancelled() {
        settle_stopped_orphans(&state).await;
        if let Some(free) = crate::disk::short_of_space(&state.config) {
            // a job claimed now would fail at its first write; others' workers take it
            tracing::warn!(
                free_bytes = free,
                "the data dir's disk is short of space; claiming no job"
            );
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = state.shutdown.cancelled() => {}
            }
            continue;
        }
        // what this worker could give a job now: a job known to need more is left for others
        let free = device.memory().map_or(u64::MAX, |m| m.free);
        let claim = match state
            .db
            .claim_next(&worker_id, lease::lease_secs(&state), free)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "claiming a job failed");
                None
            }
        };
        match claim {
            Some(claim) => {
                let lease = claim.lease.clone();
                let span = tracing::info_span!("job", job.id = %lease.job, attempt = lease.attempt);
                async {
                    if claim.failovers > 0 {
                        tracing::warn!(
                            failovers = claim.failovers,
                            "took the job over from a worker whose lease expired"
                        );
                    }
                    let outcome = if claim.failovers > i64::from(state.config.max_failovers) {
                        Outcome::failed(
                            "too_many_failovers",
                            format!(
                                "the job lost its worker {} times over attempts 1 to {}, more \
                                 than --max-failovers {} allows: something in it may be bringing \
                                 its workers down",
                                claim.failovers, lease.attempt, state.config.max_failovers
                            ),
                        )
                    } else {
                        run_one(&state, &device, claim).await
                    };
                    record_outcome_through_outages(&state, &lease, &outcome).await;
                    crate::release_freed_memory();
                }
                .instrument(span)
                .await;
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
    if let Err(e) = reporting.await {
        tracing::error!(error = %e, "the worker's reporting task ended abnormally");
    }
}

/// Writes how a run ended — finished (succeeded, failed, cancelled), paused, or back in the
/// queue (interrupted by shutdown) — with its status event, fenced by the run's lease. An error means
/// the job's record did not change: a lost lease (another attempt owns it) or the database.
pub async fn record_outcome(state: &AppState, lease: &Lease, outcome: &Outcome) -> db::Result<()> {
    let (status, error) = match outcome {
        Outcome::LeaseLost => {
            tracing::warn!(
                "job was taken over by another worker; this attempt's result is dropped"
            );
            return Ok(());
        }
        Outcome::Interrupted | Outcome::Paused | Outcome::Waiting { .. } => {
            let (to, reason) = match outcome {
                Outcome::Paused => (
                    JobStatus::Paused,
                    "paused on request; resuming continues from its last checkpoint",
                ),
                Outcome::Waiting { reason } => (JobStatus::Queued, reason.as_str()),
                _ => (
                    JobStatus::Queued,
                    "server shutting down; resumes from its last checkpoint",
                ),
            };
            let event = JobEvent::Status(StatusChange {
                reason: Some(reason.into()),
                ..StatusChange::to(to)
            });
            let data = event.data_json();
            let id = state.db.requeue(lease, to, &data).await?;
            state.announce(&lease.job, id, event.kind(), data);
            tracing::info!(status = %to, "job taken off its worker");
            return Ok(());
        }
        Outcome::Succeeded { .. } => (JobStatus::Succeeded, None),
        Outcome::Cancelled => (JobStatus::Cancelled, None),
        Outcome::Failed { code, message } => (JobStatus::Failed, Some((*code, message.as_str()))),
    };
    let (adapter, note) = match outcome {
        Outcome::Succeeded { adapter, note } => (
            Some(serde_json::to_string(adapter).expect("digests serialize")),
            note.clone(),
        ),
        _ => (None, None),
    };
    let event = JobEvent::Status(StatusChange {
        error: error.map(|(code, message)| JobErrorView {
            code: code.to_string(),
            message: Some(message.to_string()),
        }),
        reason: note,
        ..StatusChange::to(status)
    });
    let data = event.data_json();
    let id = state
        .db
        .finish(lease, status, error, adapter.as_deref(), &data)
        .await?;
    state.announce(&lease.job, id, event.kind(), data);
    tracing::info!(%status, "job finished");
    Ok(())
}

/// [`record_outcome`], tried again while the database is unreachable: a job that trained to
/// its end is recorded as such when the database returns, not run again by another worker
/// after its lease expired. Gives up at shutdown (the lease then expires and the job is taken
/// over from its last checkpoint).
async fn record_outcome_through_outages(state: &AppState, lease: &Lease, outcome: &Outcome) {
    let mut backoff = crate::retry::Backoff::new();
    loop {
        match record_outcome(state, lease, outcome).await {
            Ok(()) => return,
            Err(e) if e.is_unavailable() && !state.shutdown.is_cancelled() => {
                tracing::warn!(error = %e, "recording how the job ended failed; trying again");
                backoff.wait().await;
            }
            Err(e) => {
                tracing::error!(error = %e, ?outcome, "could not record how the job ended");
                return;
            }
        }
    }
}

/// Jobs asked to pause or cancel whose worker died before it could: ended as asked (a claim
/// never takes a job with a stop request on it).
async fn settle_stopped_orphans(state: &AppState) {
    let paused = JobEvent::Status(StatusChange {
        reason: Some("its worker stopped answering while pausing; resuming continues from its last checkpoint".into()),
        ..StatusChange::to(JobStatus::Paused)
    });
    let cancelled = JobEvent::Status(StatusChange {
        reason: Some("its worker stopped answering while cancelling".into()),
        ..StatusChange::to(JobStatus::Cancelled)
    });
    let (paused, cancelled) = (paused.data_json(), cancelled.data_json());
    match state.db.settle_stopped_orphans(&paused, &cancelled).await {
        Ok(settled) => {
            for (id, event, status) in settled {
                let data = if status == "paused" {
                    &paused
                } else {
                    &cancelled
                };
                if let Some(job) = crate::job::JobId::parse(&id) {
                    state.announce(&job, event, "status", data.clone());
                }
                tracing::warn!(job.id = %id, status, "settled a job whose worker died while stopping it");
            }
        }
        Err(e) => tracing::warn!(error = %e, "settling orphaned stop requests failed"),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
