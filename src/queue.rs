//! The service's operations on jobs that more than one statement makes: submitting (with the
//! checks a spec's references need), cancelling, pausing and resuming. Handlers call these and stay thin; the
//! workers' side of the queue is in `worker`.

use crate::db::{self, CancelOutcome, DeleteOutcome, JobRow, PauseOutcome, ResumeOutcome};
use crate::events::{JobEvent, StatusChange};
use crate::job::{JobId, JobStatus};
use crate::spec::JobSpec;
use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The request names something that does not exist or cannot be used; `param` is its field.
    #[error("{param}: {message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    #[error("job {0} not found")]
    NotFound(JobId),
    /// Cancelling a job that has already finished.
    #[error("job {id} already {status}; nothing to cancel")]
    Finished { id: JobId, status: JobStatus },
    /// Pausing a job that has finished, or resuming one that is not paused.
    #[error("job {id} is {status}; {what}")]
    WrongStatus {
        id: JobId,
        status: JobStatus,
        what: &'static str,
    },
    /// Deleting a running job: it is being cancelled, and can be deleted once it has stopped.
    #[error("job {0} is running; it is being cancelled: delete it again once it has stopped")]
    Running(JobId),
    /// A per-key limit is reached; trying again after `retry_after` seconds may succeed.
    #[error("{message}")]
    Quota { message: String, retry_after: u64 },
    #[error(transparent)]
    Db(#[from] db::Error),
    #[error("removing stored files: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(param: &'static str, message: impl Into<String>) -> QueueError {
    QueueError::Invalid {
        param,
        message: message.into(),
    }
}

/// Checks what the spec points at, stores the job as queued under `id` (chosen by the caller,
/// bound to an idempotency key beforehand), announces it and wakes a worker.
pub async fn submit_as(
    state: &AppState,
    id: &JobId,
    spec: &JobSpec,
    owner: Option<&str>,
) -> Result<JobRow, QueueError> {
    check_references(state, spec, owner).await?;
    let stored_cap = state.config.max_stored_mib_per_key;
    // a job's checkpoints count in its owner's stored bytes: a key at its quota starts no more
    if stored_cap > 0 && state.db.stored_bytes(owner).await? >= stored_cap * 1024 * 1024 {
        return Err(QueueError::Quota {
            message: format!(
                "this key stores its {stored_cap} MiB (uploads, checkpoints, exports); delete files or jobs it no longer needs (a job's checkpoints and exports go with it) before submitting more"
            ),
            retry_after: 3600,
        });
    }
    let cap = state.config.max_queued_per_key;
    let Some(row) = state
        .db
        .insert_job(id, owner, spec, (cap > 0).then_some(cap))
        .await?
    else {
        return Err(QueueError::Quota {
            message: format!(
                "this key already has {cap} jobs waiting (queued or paused), the most it may; submit more once some have started"
            ),
            retry_after: 60,
        });
    };
    state
        .publish(id, &JobEvent::Status(StatusChange::to(JobStatus::Queued)))
        .await?;
    state.job_queued.notify_waiters();
    tracing::info!(job.id = %id, base_model = %spec.base_model, "job queued");
    Ok(row)
}

/// What a spec points at that can be checked before queueing: uploaded files (the caller's
/// own) and the job a `from_checkpoint` names (the caller's own, with that checkpoint).
async fn check_references(
    state: &AppState,
    spec: &JobSpec,
    owner: Option<&str>,
) -> Result<(), QueueError> {
    crate::model_access::check_base_model(&state.config, &spec.base_model)
        .map_err(|m| invalid("base_model", m))?;
    let datasets = [
        ("dataset.url", Some(&spec.dataset.url)),
        (
            "dataset.validation_url",
            spec.dataset.validation_url.as_ref(),
        ),
    ];
    for (param, url) in datasets {
        let Some(url) = url else { continue };
        if url.starts_with("file-") {
            if state.db.get_file(url, owner).await?.is_none() {
                return Err(invalid(param, format!("no uploaded file {url:?}")));
            }
        } else if url.starts_with("http://") || url.starts_with("https://") {
            // what can be told without a DNS lookup is told now; names are checked at fetch
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| invalid(param, format!("not a valid URL: {e}")))?;
            state
                .egress
                .check_url(&parsed)
                .map_err(|reason| invalid(param, format!("{url}: {reason}")))?;
        } else if !(url.starts_with("file://") || url.starts_with('/')) {
            return Err(invalid(
                param,
                format!("{url:?} is not a dataset URL: use http(s)://, file:// (allowed directories only) or file-<id> from POST /v1/files"),
            ));
        }
    }
    let Some(named) = &spec.from_checkpoint else {
        return Ok(());
    };
    let job = &named.job;
    let Some(row) = state.db.get_job(job, owner).await? else {
        return Err(invalid(
            "from_checkpoint",
            format!("no job {:?}", job.as_str()),
        ));
    };
    match named.step {
        Some(step) => {
            let recorded = state.db.list_checkpoints(job).await?;
            if !recorded.iter().any(|c| c.step as u64 == step) {
                return Err(invalid(
                    "from_checkpoint",
                    format!("job {job} has no checkpoint at step {step}"),
                ));
            }
        }
        None if row.status != JobStatus::Succeeded => {
            return Err(invalid(
                "from_checkpoint",
                format!(
                    "job {job} has not succeeded (it is {}), so it has no final adapter",
                    row.status
                ),
            ));
        }
        None => {}
    }
    Ok(())
}

/// Deletes a job and everything it stored. A running job is cancelled first and refused for
/// now (its worker is still writing).
pub async fn delete(state: &AppState, id: &JobId, owner: Option<&str>) -> Result<(), QueueError> {
    match state.db.delete_job(id, owner).await? {
        DeleteOutcome::NotFound => Err(QueueError::NotFound(id.clone())),
        DeleteOutcome::Running => {
            cancel(state, id, owner).await?;
            Err(QueueError::Running(id.clone()))
        }
        DeleteOutcome::Deleted => {
            state.artifacts.delete_job(id).await?;
            tracing::info!(job.id = %id, "job deleted");
            Ok(())
        }
    }
}

/// Cancels a job: a queued one at once; a running one at its next step (its worker's flag is
/// raised here if it runs in this process, and its heartbeat sees the request otherwise).
/// Cancelling a cancelled job is a no-op; a finished one is refused.
pub async fn cancel(state: &AppState, id: &JobId, owner: Option<&str>) -> Result<(), QueueError> {
    match state.db.request_cancel(id, owner).await? {
        CancelOutcome::NotFound => Err(QueueError::NotFound(id.clone())),
        CancelOutcome::Finished(status) => Err(QueueError::Finished {
            id: id.clone(),
            status,
        }),
        CancelOutcome::Cancelled => {
            state
                .publish(
                    id,
                    &JobEvent::Status(StatusChange::to(JobStatus::Cancelled)),
                )
                .await?;
            Ok(())
        }
        CancelOutcome::Requested => {
            state.running.stop(id);
            Ok(())
        }
        CancelOutcome::AlreadyCancelled => Ok(()),
    }
}

/// Pauses a job: a queued one at once; a running one checkpoints at its next step and leaves its
/// worker (its stop flag is raised here if it runs in this process, by its heartbeat or the
/// database's notice otherwise). Pausing a paused job is a no-op; a finished one is refused.
pub async fn pause(state: &AppState, id: &JobId, owner: Option<&str>) -> Result<(), QueueError> {
    match state.db.request_pause(id, owner).await? {
        PauseOutcome::NotFound => Err(QueueError::NotFound(id.clone())),
        PauseOutcome::Finished(status) => Err(QueueError::WrongStatus {
            id: id.clone(),
            status,
            what: "only queued or running jobs pause",
        }),
        PauseOutcome::Paused => {
            state
                .publish(id, &JobEvent::Status(StatusChange::to(JobStatus::Paused)))
                .await?;
            Ok(())
        }
        PauseOutcome::Requested => {
            state.running.stop(id);
            Ok(())
        }
        PauseOutcome::Unchanged(_) => Ok(()),
    }
}

/// Resumes a paused job: back in the queue, to continue from its last checkpoint. A queued or
/// running job is left as it is; a finished one is refused.
pub async fn resume(state: &AppState, id: &JobId, owner: Option<&str>) -> Result<(), QueueError> {
    let event = JobEvent::Status(StatusChange {
        reason: Some("resumed; continues from its last checkpoint".into()),
        ..StatusChange::to(JobStatus::Queued)
    });
    let data = event.data_json();
    match state.db.resume(id, owner, &data).await? {
        (ResumeOutcome::Resumed, Some(event_id)) => {
            state.announce(id, event_id, event.kind(), data);
            state.job_queued.notify_waiters();
            tracing::info!(job.id = %id, "job resumed");
            Ok(())
        }
        (ResumeOutcome::NotFound, _) => Err(QueueError::NotFound(id.clone())),
        (ResumeOutcome::NotPaused(status), _) if status.is_terminal() => {
            Err(QueueError::WrongStatus {
                id: id.clone(),
                status,
                what: "only paused jobs resume",
            })
        }
        _ => Ok(()),
    }
}

/// What a caller may ask of a job's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Cancel,
    Pause,
    Resume,
}

/// [`cancel`], [`pause`] or [`resume`], as `what` says.
pub async fn control(
    state: &AppState,
    id: &JobId,
    owner: Option<&str>,
    what: Control,
) -> Result<(), QueueError> {
    match what {
        Control::Cancel => cancel(state, id, owner).await,
        Control::Pause => pause(state, id, owner).await,
        Control::Resume => resume(state, id, owner).await,
    }
}
