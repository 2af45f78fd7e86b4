//! The engine's events, in order, into the database (fenced by the worker's lease) and out to
//! the job's live streams.

use crate::artifacts::{digest_file, Key, DOWNLOADABLE};
use crate::db::{self, Lease};
use crate::events::{CheckpointWritten, JobEvent, StatusChange};
use crate::job::JobPhase;
use crate::state::AppState;
use crate::train::{self, Event};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Db(#[from] db::Error),
    #[error("checkpoint file {}: {source}", .path.display())]
    Digest {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl PersistError {
    /// The worker's claim is gone: nothing more it writes will be kept.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, PersistError::Db(db::Error::LeaseLost { .. }))
    }

    /// The database or the artifact store did not answer: the same write may succeed later.
    fn is_transient(&self) -> bool {
        match self {
            PersistError::Db(e) => e.is_unavailable(),
            // the checkpoint's upload (the store's own retries exhausted) or its digest
            PersistError::Digest { source, .. } => source.kind() != std::io::ErrorKind::NotFound,
        }
    }
}

/// How long one event is tried again through an outage before it is given up (logged): an
/// hour, longer than any outage a job should sit through. The lease decides meanwhile whether
/// this worker still owns the job.
const OUTAGE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3600);

pub struct Persister {
    state: AppState,
    lease: Lease,
}

impl Persister {
    pub fn new(state: AppState, lease: Lease) -> Persister {
        Persister { state, lease }
    }

    /// [`Persister::record`], tried again with backoff and jitter while the failure is
    /// transient, until it succeeds, the lease is lost, the server shuts down or
    /// [`OUTAGE_PATIENCE`] runs out.
    pub async fn record_through_outages(&mut self, event: &Event) -> Result<(), PersistError> {
        let started = std::time::Instant::now();
        let mut backoff = crate::retry::Backoff::new();
        loop {
            match self.record(event).await {
                Err(e)
                    if e.is_transient()
                        && started.elapsed() < OUTAGE_PATIENCE
                        && !self.state.shutdown.is_cancelled() =>
                {
                    tracing::warn!(error = %e, "storing a job event failed; trying again");
                    backoff.wait().await;
                }
                result => return result,
            }
        }
    }

    pub async fn record(&mut self, event: &Event) -> Result<(), PersistError> {
        let (state, lease) = (&self.state, &self.lease);
        match event {
            Event::Phase(phase) => {
                let phase = job_phase(*phase);
                state.db.set_phase(lease, phase).await?;
                state
                    .publish_fenced(lease, &JobEvent::Status(StatusChange::phase(phase)))
                    .await?;
            }
            Event::Data(summary) => {
                state
                    .db
                    .set_total_steps(lease, summary.total_steps as i64)
                    .await?;
                state
                    .publish_fenced(lease, &JobEvent::Data(summary.clone()))
                    .await?;
            }
            Event::Step(m) => {
                state.db.set_progress(lease, m).await?;
                state
                    .publish_fenced(lease, &JobEvent::Metrics(m.clone()))
                    .await?;
            }
            Event::Eval(e) => {
                state.db.set_eval_loss(lease, e.eval_loss).await?;
                state
                    .publish_fenced(lease, &JobEvent::Eval(e.clone()))
                    .await?;
            }
            Event::Checkpoint { step, path } => {
                // in the store before it is recorded: a worker taking the job over resumes only
                // from a checkpoint that is both
                state
                    .artifacts
                    .save_dir(&Key::checkpoint_dir(&lease.job, *step))
                    .await
                    .map_err(|source| PersistError::Digest {
                        path: path.clone(),
                        source,
                    })?;
                let mut files = Vec::new();
                for name in DOWNLOADABLE {
                    let file = path.join(name);
                    let digest = digest_file(&file)
                        .await
                        .map_err(|source| PersistError::Digest { path: file, source })?;
                    files.push(digest);
                }
                let listed = serde_json::to_string(&files).expect("digests serialize");
                // every file, the resume state too: what the owner's quota counts
                let bytes =
                    crate::artifacts::dir_bytes(path).map_err(|source| PersistError::Digest {
                        path: path.clone(),
                        source,
                    })?;
                state
                    .db
                    .insert_checkpoint(lease, *step as i64, &listed, bytes)
                    .await?;
                state
                    .publish_fenced(
                        lease,
                        &JobEvent::Checkpoint(CheckpointWritten { step: *step, files }),
                    )
                    .await?;
                prune_checkpoints(state, lease).await?;
            }
            Event::Best { step } => state.db.set_best_step(lease, *step as i64).await?,
        }
        Ok(())
    }
}

/// Checkpoints a job keeps: its last three (as OpenAI's fine-tuning keeps), so that a job
/// checkpointing every step cannot fill the store; the last one is what a takeover or a resume
/// needs.
pub(crate) const KEEP_CHECKPOINTS: usize = 3;

/// Forgets, then removes, the job's checkpoints older than the last [`KEEP_CHECKPOINTS`], all
/// but early stopping's best (the adapter to be). The record goes first: a takeover never
/// resumes from a checkpoint whose files are being removed.
async fn prune_checkpoints(state: &AppState, lease: &Lease) -> Result<(), PersistError> {
    let best = match state.db.get_job(&lease.job, None).await? {
        Some(row) => row.best_step,
        None => None,
    };
    let steps: Vec<i64> = state
        .db
        .list_checkpoints(&lease.job)
        .await?
        .iter()
        .map(|c| c.step)
        .filter(|&s| Some(s) != best)
        .collect();
    let old = steps.len().saturating_sub(KEEP_CHECKPOINTS);
    for &step in &steps[..old] {
        state.db.delete_checkpoint(lease, step).await?;
        let key = Key::checkpoint_dir(&lease.job, step as u64);
        if let Err(e) = state.artifacts.delete_dir(&key).await {
            tracing::warn!(step, error = %e, "could not remove a pruned checkpoint's files");
        }
    }
    Ok(())
}

fn job_phase(phase: train::Phase) -> JobPhase {
    match phase {
        train::Phase::LoadingModel => JobPhase::LoadingModel,
        train::Phase::Tokenizing => JobPhase::Tokenizing,
        train::Phase::Training => JobPhase::Training,
        train::Phase::Saving => JobPhase::Saving,
    }
}
