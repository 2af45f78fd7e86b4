//! What other processes write, brought into this one (PostgreSQL): a job's new events go to this
//! process's event bus (its SSE streams), a cancel raises the stop flag of a job running here, a
//! queued job wakes the idle workers. Streams drop an event they already sent (ids only grow), so
//! an event this process wrote itself and hears again does no harm.

use std::time::Duration;

use crate::db::notify::Notice;
use crate::events::StoredEvent;
use crate::job::JobId;
use crate::state::AppState;

/// Relays notifications until shutdown; returns at once on SQLite.
pub async fn run(state: AppState) {
    let mut listener = loop {
        match state.db.listener().await {
            Ok(Some(l)) => break l,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN to the database; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    _ = state.shutdown.cancelled() => return,
                }
            }
        }
    };
    loop {
        let notice = tokio::select! {
            n = listener.next() => n,
            _ = state.shutdown.cancelled() => return,
        };
        match notice {
            Ok(Notice::Event { job_id, event_id }) => match state.db.event(&job_id, event_id).await
            {
                Ok(Some(e)) => state.events.send(StoredEvent {
                    job_id,
                    id: e.id,
                    kind: e.kind,
                    data: e.data,
                }),
                Ok(None) => {} // deleted meanwhile
                Err(e) => tracing::warn!(error = %e, "reading a notified event failed"),
            },
            Ok(Notice::CancelRequested { job_id }) => {
                if let Some(id) = JobId::parse(&job_id) {
                    state.running.stop(&id);
                }
            }
            Ok(Notice::JobQueued) => state.job_queued.notify_waiters(),
            Err(e) => {
                tracing::warn!(error = %e, "database notifications interrupted");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
