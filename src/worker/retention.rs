//! Retention: a finished job's artifacts (checkpoints, adapter, fetched datasets) are removed
//! `--retention-days` after it finished; its record, events and loss curve stay, and downloads
//! answer 410.

use std::time::Duration;

use crate::job::JobId;
use crate::state::AppState;

/// Sweeps until the server shuts down, a few times per retention period (at most hourly).
pub async fn run(state: AppState) {
    let keep = Duration::from_secs_f64(state.config.retention_days * 86_400.0);
    let every = (keep / 4).clamp(Duration::from_millis(200), Duration::from_secs(3600));
    loop {
        if let Err(e) = sweep(&state, keep).await {
            tracing::error!(error = %e, "retention sweep failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
}

/// Removes the artifacts of jobs that finished more than `keep` ago; returns how many.
pub async fn sweep(state: &AppState, keep: Duration) -> anyhow::Result<usize> {
    let cutoff = time::OffsetDateTime::now_utc() - keep;
    let cutoff = crate::db::format_time(cutoff);
    let expired = state.db.expired_jobs(&cutoff).await?;
    for id in &expired {
        let Some(job) = JobId::parse(id) else {
            continue;
        };
        state.artifacts.delete_job(&job).await?;
        state.db.mark_artifacts_removed(&job).await?;
        tracing::info!(job.id = %job, "artifacts removed (retention)");
    }
    Ok(expired.len())
}
