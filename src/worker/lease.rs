//! Keeping a claim alive: a heartbeat renews the lease every few seconds and raises the job's
//! stop flag when the job is cancelled or paused, the lease is lost, or the server shuts down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Renews `lease` until aborted (the job ended) or until it must stop the job; raises
/// `over_time` too when the job has run past the operator's time limit.
pub fn spawn_heartbeat(
    state: AppState,
    lease: Lease,
    stop: Arc<AtomicBool>,
    over_time: Arc<AtomicBool>,
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
                Ok(Some(_)) => stop.store(true, Ordering::SeqCst),
                Ok(None) => {}
                Err(e @ db::Error::LeaseLost { .. }) => {
                    tracing::warn!(error = %e, "stopping the job");
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
                // the lease has time left: the next beat may get through
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    })
}
