//! A job's events, typed: what the worker and the API record in the event log, what
//! `GET /v1/jobs/{id}/events` streams (the SSE event name is [`JobEvent::kind`], its data
//! [`JobEvent::data_json`]), and what the client reads back ([`JobEvent::parse`]). The bus fans
//! stored events out to live SSE subscribers.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::job::{
    with_legacy_loss, EvalMetrics, FileDigest, JobErrorView, JobPhase, JobStatus, StepMetrics,
};
use crate::train::data::DataSummary;

/// A change of status or phase. Only the fields that apply are sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    pub status: JobStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobErrorView>,
}

impl StatusChange {
    pub fn to(status: JobStatus) -> StatusChange {
        StatusChange {
            status,
            phase: None,
            attempt: None,
            reason: None,
            error: None,
        }
    }

    /// Running, now in `phase`.
    pub fn phase(phase: JobPhase) -> StatusChange {
        StatusChange {
            phase: Some(phase),
            ..StatusChange::to(JobStatus::Running)
        }
    }
}

/// A checkpoint was written and recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointWritten {
    pub step: u64,
    pub files: Vec<FileDigest>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Status(StatusChange),
    /// The datasets are tokenized: sizes, the step count, the trainable parameters.
    Data(DataSummary),
    Metrics(StepMetrics),
    Eval(EvalMetrics),
    Checkpoint(CheckpointWritten),
}

impl JobEvent {
    /// The SSE event name, also the `kind` column of the event log.
    pub fn kind(&self) -> &'static str {
        match self {
            JobEvent::Status(_) => "status",
            JobEvent::Data(_) => "data",
            JobEvent::Metrics(_) => "metrics",
            JobEvent::Eval(_) => "eval",
            JobEvent::Checkpoint(_) => "checkpoint",
        }
    }

    /// The SSE data, also the `data` column of the event log.
    pub fn data_json(&self) -> String {
        let value = match self {
            JobEvent::Status(s) => serde_json::to_value(s),
            JobEvent::Data(d) => serde_json::to_value(d),
            JobEvent::Metrics(m) => serde_json::to_value(m).map(with_legacy_loss),
            JobEvent::Eval(e) => serde_json::to_value(e),
            JobEvent::Checkpoint(c) => serde_json::to_value(c),
        };
        value.expect("event types serialize").to_string()
    }

    /// Reads back an event from its kind and data (the log, or an SSE stream).
    pub fn parse(kind: &str, data: &str) -> Result<JobEvent, String> {
        let bad = |e: serde_json::Error| format!("{kind} event: {e}");
        Ok(match kind {
            "status" => JobEvent::Status(serde_json::from_str(data).map_err(bad)?),
            "data" => JobEvent::Data(serde_json::from_str(data).map_err(bad)?),
            "metrics" => JobEvent::Metrics(serde_json::from_str(data).map_err(bad)?),
            "eval" => JobEvent::Eval(serde_json::from_str(data).map_err(bad)?),
            "checkpoint" => JobEvent::Checkpoint(serde_json::from_str(data).map_err(bad)?),
            other => return Err(format!("unknown event kind {other:?}")),
        })
    }

    /// Whether the job has finished with this event (the stream ends after it).
    pub(crate) fn is_terminal(&self) -> bool {
        matches!(self, JobEvent::Status(s) if s.status.is_terminal())
    }
}

/// An event as stored: its id in the log is the SSE event id.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub job_id: String,
    pub id: i64,
    pub kind: String,
    pub data: String,
}

impl StoredEvent {
    pub(crate) fn is_terminal(&self) -> bool {
        self.kind == "status"
            && JobEvent::parse(&self.kind, &self.data).is_ok_and(|e| e.is_terminal())
    }
}

/// Fans stored events out to live subscribers (SSE streams). Stored first, sent second: a
/// subscriber that falls behind catches up from the log.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<StoredEvent>,
    /// Bumped when events may have been written that never came through `tx` (the relay's
    /// database connection was lost and re-established): streams then read what they missed.
    resync: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl EventBus {
    pub fn new(capacity: usize) -> EventBus {
        EventBus {
            tx: broadcast::channel(capacity).0,
            resync: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Told of every [`EventBus::missed_some`] from now on.
    pub fn resyncs(&self) -> tokio::sync::watch::Receiver<u64> {
        self.resync.subscribe()
    }

    /// Tells streams to catch up from the database: events may have been missed.
    pub fn missed_some(&self) {
        self.resync.send_modify(|n| *n += 1);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StoredEvent> {
        self.tx.subscribe()
    }

    /// Sends to whoever listens; nobody listening is normal (no open streams), not an error.
    pub fn send(&self, event: StoredEvent) {
        let _no_subscribers_is_fine = self.tx.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_metrics_keep_the_old_loss_name() {
        let m = StepMetrics {
            step: 3,
            total_steps: 10,
            epoch: 0.5,
            train_loss: 1.25,
            train_accuracy: None,
            learning_rate: 1e-3,
            grad_norm: 0.5,
            tokens: 100,
            tokens_seen: 300,
            tokens_per_second: 50.0,
            elapsed_seconds: 2.0,
            rewards: None,
        };
        let e = JobEvent::Metrics(m.clone());
        let data: serde_json::Value = serde_json::from_str(&e.data_json()).unwrap();
        assert_eq!(data["train_loss"], 1.25);
        assert_eq!(data["loss"], 1.25);
        assert!(data.get("rewards/chosen").is_none());
        assert_eq!(JobEvent::parse("metrics", &e.data_json()).unwrap(), e);
        // a preference step carries TRL's reward names, and reads back with them
        let rewards = crate::job::RewardMetrics {
            chosen: 0.25,
            rejected: -0.5,
            margins: 0.75,
            accuracies: 1.0,
        };
        let preferred = JobEvent::Metrics(StepMetrics {
            rewards: Some(rewards),
            ..m
        });
        let data: serde_json::Value = serde_json::from_str(&preferred.data_json()).unwrap();
        assert_eq!(data["rewards/margins"], 0.75);
        assert_eq!(
            JobEvent::parse("metrics", &preferred.data_json()).unwrap(),
            preferred
        );
        // an event stored by 0.1, with `loss` only, still reads
        let old = r#"{"step":3,"total_steps":10,"epoch":0.5,"loss":1.25,"learning_rate":0.001,"grad_norm":0.5,"tokens":100,"tokens_seen":300,"tokens_per_second":50.0,"elapsed_seconds":2.0}"#;
        assert_eq!(JobEvent::parse("metrics", old).unwrap(), e);
        let done = JobEvent::Status(StatusChange::to(JobStatus::Succeeded));
        assert_eq!(done.data_json(), r#"{"status":"succeeded"}"#);
        assert!(done.is_terminal());
        assert!(!JobEvent::Status(StatusChange::to(JobStatus::Running)).is_terminal());
    }
}
