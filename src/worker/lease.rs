//! Keeping a claim alive: a heartbeat renews the lease every few seconds and raises the job's
//! stop flag when the job is cancelled or paused, the lease is lost, or the server shuts down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::{self, Lease};
use crate::state::AppState;

/// The lease a claim takes and each heartbeat renews (`--lease-secs`).
pub fn lease_secs(state: &AppState) -> i64 {
    state.config.lease_secs.clamp(1, 24 * 3600) as i64
}

/// Renewed three times per lease, so that one late or failed beat does not lose it.
fn heartbeat_interval(state: &AppState) -> Duration {
    Duration::from_secs_f64(lease_secs(state) as f64 / 3.0)
}

/// When the lease was last renewed, as the heartbeat saw it: the engine holds at a checkpoint
/// while a renewal is overdue (the database is unreachable), so that a worker cut off from the
/// database stops doing work that another worker may be about to redo from the same checkpoint.
pub struct LeaseHealth {
    renewed_at: Mutex<Instant>,
    interval: Duration,
}

impl LeaseHealth {
    pub fn new(state: &AppState) -> Arc<LeaseHealth> {
        Arc::new(LeaseHealth {
            renewed_at: Mutex::new(Instant::now()),
            interval: heartbeat_interval(state),
        })
    }

    fn renewed(&self) {
        *self.renewed_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// A beat was due and did not get through.
    pub fn in_doubt(&self) -> bool {
        let at = *self.renewed_at.lock().unwrap_or_else(|p| p.into_inner());
        at.elapsed() > self.interval + self.interval / 2
    }
}

/// Renews `lease` until aborted (the job ended) or until it must stop the job; raises
/// `over_time` too when the job has run past the operator's time limit.
pub fn spawn_heartbeat(
    state: AppState,
    lease: Lease,
    stop: Arc<AtomicBool>,
    over_time: Arc<AtomicBool>,
    health: Arc<LeaseHealth>,
) -> tokio::task::JoinHandle<()> {
    // checked finite and positive at start-up; ten years stands for "no limit"
    let hours = state.config.max_job_hours.clamp(0.0, 24.0 * 365.0 * 10.0);
    let limit = Duration::from_secs_f64(hours * 3600.0);
    let deadline = tokio::time::Instant::now() + limit;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(heartbeat_interval(&state)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(hours = state.config.max_job_hours, "the job reached the time limit; stopping it");
                    over_time.store(true, Ordering::SeqCst);
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
                _ = state.shutdown.cancelled() => {
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
            }
            match state.db.heartbeat(&lease, lease_secs(&state)).await {
                Ok(Some(_)) => {
                    health.renewed();
                    stop.store(true, Ordering::SeqCst)
                }
                Ok(None) => health.renewed(),
                Err(e @ db::Error::LeaseLost { .. }) => {
                    tracing::warn!(error = %e, "stopping the job");
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
                // the next beat may get through; the engine holds at its next checkpoint until
                // one does (or the lease turns out lost)
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    })
}
