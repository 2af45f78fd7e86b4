//! What other processes write, brought into this one (PostgreSQL): a job's new events go to this
//! process's event bus (its SSE streams), a cancel raises the stop flag of a job running here, a
//! queued job wakes the idle workers. Streams drop an event they already sent (ids only grow), so
//! an event this process wrote itself and hears again does no harm.

use crate::db::notify::Notice;
use crate::events::StoredEvent;
use crate::job::JobId;
use crate::state::AppState;

/// Relays notifications until shutdown; returns at once on SQLite.
///
/// Notifications sent while the listening connection is down are lost (PostgreSQL keeps none
/// for an absent listener), so after any interruption the listener is rebuilt — with backoff,
/// through an outage of any length — and the streams told to read what they missed from the
/// database. A cancel or a queued job missed meanwhile needs no catch-up: the heartbeat reads
/// cancel requests and idle workers poll the queue.
pub async fn run(state: AppState) {
    let mut interrupted = false;
    let mut backoff = crate::retry::Backoff::new();
    loop {
        let mut listener = match state.db.listener().await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN to the database; retrying");
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = state.shutdown.cancelled() => return,
                }
                continue;
            }
        };
        if interrupted {
            tracing::info!("listening to the database again; streams catch up");
            state.events.missed_some();
        }
        backoff = crate::retry::Backoff::new();
        let lost = tokio::select! {
            lost = relay(&state, &mut listener) => lost,
            _ = state.shutdown.cancelled() => return,
        };
        tracing::warn!(error = %lost, "database notifications interrupted");
        interrupted = true;
    }
}

/// Relays until the listening connection is lost; answers why.
async fn relay(state: &AppState, listener: &mut crate::db::notify::Listener) -> crate::db::Error {
    loop {
        let notice = match listener.next().await {
            Ok(n) => n,
            Err(e) => return e,
        };
        match notice {
            Notice::Event { job_id, event_id } => match state.db.event(&job_id, event_id).await {
                Ok(Some(e)) => state.events.send(StoredEvent {
                    job_id,
                    id: e.id,
                    kind: e.kind,
                    data: e.data,
                }),
                Ok(None) => {} // deleted meanwhile
                Err(e) => {
                    // the stream that wanted it catches up when told
                    tracing::warn!(error = %e, "reading a notified event failed");
                    state.events.missed_some();
                }
            },
            Notice::CancelRequested { job_id } => {
                if let Some(id) = JobId::parse(&job_id) {
                    state.running.stop(&id);
                }
            }
            Notice::JobQueued => state.job_queued.notify_waiters(),
        }
    }
}
