//! What one process tells the others through PostgreSQL's LISTEN/NOTIFY. The notifications come
//! from triggers (migrations/postgres/): a job's new event (the listener reads the row: the
//! database stays the source of truth), a cancel request, a job put in the queue. SQLite has no
//! such channel; its processes share one machine, where the in-process bus and the heartbeat's
//! cancel check do the work.

use sqlx::postgres::PgListener;

use super::{Backend, Db, Result};

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `job_events` row `event_id` of job `job_id` was written.
    Event { job_id: String, event_id: i64 },
    /// A cancel was requested for a running job.
    CancelRequested { job_id: String },
    /// A job entered the queue: idle workers may claim it.
    JobQueued,
}

pub struct Listener(PgListener);

const CHANNELS: [&str; 3] = ["qtune_events", "qtune_cancel", "qtune_jobs"];

impl Db {
    /// A listener on its own connection (PostgreSQL); `None` on SQLite.
    pub async fn listener(&self) -> Result<Option<Listener>> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let mut listener = PgListener::connect(&self.url).await?;
        listener.listen_all(CHANNELS).await?;
        Ok(Some(Listener(listener)))
    }
}

impl Listener {
    /// The next notification, or an error once the connection is lost: notifications sent
    /// while it was down are gone, and the caller must know (to catch up) rather than have the
    /// listener reconnect behind its back.
    pub async fn next(&mut self) -> Result<Notice> {
        loop {
            let Some(n) = self.0.try_recv().await? else {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the listening connection was lost",
                ))
                .into());
            };
            if let Some(notice) = parse(n.channel(), n.payload()) {
                return Ok(notice);
            }
        }
    }
}

fn parse(channel: &str, payload: &str) -> Option<Notice> {
    match channel {
        "qtune_events" => {
            let (job, id) = payload.split_once(' ')?;
            Some(Notice::Event {
                job_id: job.to_string(),
                event_id: id.parse().ok()?,
            })
        }
        "qtune_cancel" => Some(Notice::CancelRequested {
            job_id: payload.to_string(),
        }),
        "qtune_jobs" => Some(Notice::JobQueued),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse() {
        assert_eq!(
            parse("qtune_events", "0b9c 42"),
            Some(Notice::Event {
                job_id: "0b9c".into(),
                event_id: 42
            })
        );
        assert_eq!(parse("qtune_events", "no-id"), None);
        assert_eq!(parse("qtune_jobs", "x"), Some(Notice::JobQueued));
        assert_eq!(parse("other", "x"), None);
    }
}
