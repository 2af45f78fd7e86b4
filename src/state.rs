//! What handlers and workers share: the database, the artifact store, the event bus, the stop
//! flags of running jobs. Cheap to clone. Imports neither `api` nor `worker`: both import it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::artifacts::ArtifactStore;
use crate::config::ServeConfig;
use crate::db::{Db, Lease};
use crate::egress::EgressPolicy;
use crate::events::{EventBus, JobEvent, StoredEvent};
use crate::job::JobId;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub artifacts: Arc<dyn ArtifactStore>,
    pub config: Arc<ServeConfig>,
    /// What dataset URLs may reach.
    pub egress: Arc<EgressPolicy>,
    pub events: EventBus,
    /// Wakes idle workers when a job is queued.
    pub(crate) job_queued: Arc<Notify>,
    /// Stop flags of the jobs running in this process.
    pub running: RunningJobs,
    pub(crate) workers_up: Arc<AtomicUsize>,
    /// Set when the server is shutting down: running jobs checkpoint and go back to the queue.
    pub shutdown: CancellationToken,
    /// Models loaded for chat and completions.
    pub models: Arc<crate::inference::Models>,
}

impl AppState {
    /// Records an event of the API's (no lease) and fans it out; returns its id.
    pub(crate) async fn publish(&self, job: &JobId, event: &JobEvent) -> crate::db::Result<i64> {
        let data = event.data_json();
        let id = self
            .db
            .insert_event(job.as_str(), event.kind(), &data)
            .await?;
        self.announce(job, id, event.kind(), data);
        Ok(id)
    }

    /// Records an event of the worker holding `lease` (refused once the lease is lost) and fans
    /// it out; returns its id.
    pub(crate) async fn publish_fenced(
        &self,
        lease: &Lease,
        event: &JobEvent,
    ) -> crate::db::Result<i64> {
        let data = event.data_json();
        let id = self
            .db
            .insert_event_fenced(lease, event.kind(), &data)
            .await?;
        self.announce(&lease.job, id, event.kind(), data);
        Ok(id)
    }

    /// The local folder of job `job`'s stored adapter (its final adapter, or its checkpoint at
    /// `step`), loaded from the store and checked against the digests recorded when it was
    /// written. The error's words are for the caller's client: they name the job and the file,
    /// never a path on this server (the full error goes to the log).
    pub(crate) async fn stored_adapter(
        &self,
        job: &crate::db::JobRow,
        step: Option<u64>,
    ) -> Result<std::path::PathBuf, StoredAdapterError> {
        let recorded = match step {
            Some(n) => {
                let rows = self.db.list_checkpoints(&job.id).await?;
                let Some(row) = rows.into_iter().find(|c| c.step as u64 == n) else {
                    return Err(StoredAdapterError::NoCheckpoint {
                        job: job.id.to_string(),
                        step: n,
                    });
                };
                row.files
            }
            None => job.adapter_files.clone().unwrap_or_default(),
        };
        let what = match step {
            Some(n) => format!("checkpoint {n} of job {}", job.id),
            None => format!("adapter of job {}", job.id),
        };
        self.artifacts
            .init_adapter_dir(&job.id, step, &recorded)
            .await
            .map_err(|e| {
                tracing::error!(job = %job.id, ?step, error = %e, "a stored adapter cannot be used");
                if e.kind() == std::io::ErrorKind::InvalidData {
                    StoredAdapterError::Damaged { what, why: e.to_string() }
                } else {
                    StoredAdapterError::Unreadable { what }
                }
            })
    }

    /// Fans out an event already stored (under `id`).
    pub(crate) fn announce(&self, job: &JobId, id: i64, kind: &str, data: String) {
        self.events.send(StoredEvent {
            job_id: job.to_string(),
            id,
            kind: kind.to_string(),
            data,
        });
    }
}

/// Why a stored adapter is not used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoredAdapterError {
    #[error("job {job} has no checkpoint at step {step}")]
    NoCheckpoint { job: String, step: u64 },
    #[error("the {what} is damaged ({why}); it is not used")]
    Damaged { what: String, why: String },
    #[error("the {what} could not be read from the artifact store")]
    Unreadable { what: String },
    #[error(transparent)]
    Db(#[from] crate::db::Error),
}

/// The stop flags of the jobs this process runs, by job id: the API raises one on cancel, the
/// worker's heartbeat on shutdown or a lost lease, and the engine checks it between steps.
#[derive(Clone, Default)]
pub struct RunningJobs(Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>);

impl RunningJobs {
    /// A fresh (lowered) flag for a job starting here.
    pub fn start(&self, job: &JobId) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.lock().insert(job.to_string(), flag.clone());
        flag
    }

    pub fn finish(&self, job: &JobId) {
        self.lock().remove(job.as_str());
    }

    /// Raises the job's flag if it runs here; whether it does.
    pub fn stop(&self, job: &JobId) -> bool {
        match self.lock().get(job.as_str()) {
            Some(flag) => {
                flag.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        // a panic while holding this lock leaves only whole inserts/removes behind
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
