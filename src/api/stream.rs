//! `GET /v1/jobs/{id}/events`: Server-Sent Events. Replays the stored history (after
//! `Last-Event-ID` when given), then follows live events, and ends once the job has finished.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Extension;
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;

use super::{jobs, ApiError, Owner};
use crate::events::StoredEvent;
use crate::state::AppState;

pub async fn events(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    jobs::load(&state, &id, &owner).await?;
    let last_seen: i64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // Subscribe before reading history, so nothing falls between the two.
    let live = state.events.subscribe();
    let resyncs = state.events.resyncs();
    let history = state.db.events_after(&id, last_seen).await?;
    let stream = event_stream(state, id, last_seen, history, (live, resyncs));
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The bus's events, and its word that some were missed (see [`crate::events::EventBus`]).
type Live = (
    tokio::sync::broadcast::Receiver<StoredEvent>,
    tokio::sync::watch::Receiver<u64>,
);

/// Where a stream stands: history still to send, the live receiver, the last id sent.
struct Cursor {
    state: AppState,
    id: String,
    last: i64,
    history: std::vec::IntoIter<crate::db::EventRow>,
    live: Live,
    done: bool,
}

impl Cursor {
    /// Records an event as sent and makes its SSE form.
    fn send(&mut self, e: StoredEvent) -> Event {
        self.last = e.id;
        self.done = e.is_terminal();
        Event::default()
            .id(e.id.to_string())
            .event(e.kind)
            .data(e.data)
    }
}

/// History first, then live events of this job (ids only ever increase), until a terminal
/// status or server shutdown.
fn event_stream(
    state: AppState,
    id: String,
    last_seen: i64,
    history: Vec<crate::db::EventRow>,
    live: Live,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let init = Cursor {
        state,
        id,
        last: last_seen,
        history: history.into_iter(),
        live,
        done: false,
    };
    futures_util::stream::unfold(init, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            if let Some(e) = s.history.next() {
                let ev = s.send(StoredEvent {
                    job_id: s.id.clone(),
                    id: e.id,
                    kind: e.kind,
                    data: e.data,
                });
                return Some((Ok(ev), s));
            }
            let next = tokio::select! {
                r = s.live.0.recv() => r,
                changed = s.live.1.changed() => match changed {
                    Ok(()) => Err(RecvError::Lagged(0)),
                    Err(_) => Err(RecvError::Closed),
                },
                _ = s.state.shutdown.cancelled() => return None,
            };
            match next {
                Ok(e) if e.job_id == s.id && e.id > s.last => {
                    let ev = s.send(e);
                    return Some((Ok(ev), s));
                }
                Ok(_) => continue,
                // Fell behind the broadcast, or the relay missed notifications: catch up from
                // the database, waiting for it through an outage (the client keeps its stream).
                Err(RecvError::Lagged(_)) => s.history = catch_up(&s).await?.into_iter(),
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

/// The job's events after the last one sent, read again until the database answers; `None` on
/// shutdown.
async fn catch_up(s: &Cursor) -> Option<Vec<crate::db::EventRow>> {
    let mut backoff = crate::retry::Backoff::new();
    loop {
        match s.state.db.events_after(&s.id, s.last).await {
            Ok(rows) => return Some(rows),
            Err(e) => {
                tracing::warn!(job.id = %s.id, error = %e, "catching a stream up failed; retrying")
            }
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = s.state.shutdown.cancelled() => return None,
        }
    }
}

pub(super) fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/jobs/{id}/events", axum::routing::get(events))
}
