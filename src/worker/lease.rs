//! Keeping a claim alive: a heartbeat renews the lease every few seconds and raises the job's
//! stop flag when the job is cancelled, the lease is lost, or the server shuts down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::db::{self, Lease};
use crate::state::AppState;

/// A claim is held this long without a heartbeat before another worker may take the job over.
pub const LEASE_SECS: i64 = 60;
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Renews `lease` until aborted (the job ended) or until it must stop the job.
pub fn spawn_heartbeat(
    state: AppState,
    lease: Lease,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT) => {}
                _ = state.shutdown.cancelled() => {
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
            }
            match state.db.heartbeat(&lease, LEASE_SECS).await {
                Ok(true) => stop.store(true, Ordering::SeqCst),
                Ok(false) => {}
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
