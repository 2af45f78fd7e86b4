//! One claimed job, start to end: fetch its datasets, run the engine on a blocking thread (in
//! the job's tracing span), pass the engine's events to the database and the streams, and say
//! how it ended. Writing that outcome is the caller's ([`super::record_outcome`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::capacity::{Misfit, WorkerDevice};
use super::fetch::{self, FetchError};
use super::lease;
use super::persist::Persister;
use crate::artifacts::Split;
use crate::db::{self, Claim, Lease};
use crate::events::{JobEvent, StatusChange};
use crate::job::{FileDigest, JobPhase, JobStatus};
use crate::spec::JobSpec;
use crate::state::AppState;
use crate::train::{self, Datasets, Event, Reporter};

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// With the digests of the final adapter's files, to be recorded, and why it ended before
    /// its last step when early stopping ended it.
    Succeeded {
        adapter: Vec<FileDigest>,
        note: Option<String>,
    },
    Failed {
        code: &'static str,
        message: String,
    },
    Cancelled,
    /// Stopped on request after checkpointing: paused, off the workers until resumed.
    Paused,
    /// Stopped because the server is shutting down: back to the queue, to resume from its last
    /// checkpoint.
    Interrupted,
    /// Another attempt holds the job now: nothing this one writes is kept.
    LeaseLost,
    /// Back to the queue before it started: its estimated peak memory does not fit this worker
    /// now, but another device in the pool is large enough.
    Waiting {
        reason: String,
    },
}

impl Outcome {
    pub(super) fn failed(code: &'static str, message: impl ToString) -> Outcome {
        Outcome::Failed {
            code,
            message: message.to_string(),
        }
    }
}

/// Engine events go through a channel to the async side, in order.
/// The channel is unbounded: while the database is unreachable the engine keeps training and
/// its events wait here, in order, for the persister to store them.
struct ChannelReporter {
    tx: mpsc::UnboundedSender<Event>,
    stop: Arc<AtomicBool>,
    lease: Arc<lease::LeaseHealth>,
}

impl Reporter for ChannelReporter {
    fn report(&mut self, event: &Event) {
        // the receiver lives until the engine returns; a closed channel means the job is being
        // torn down and its events no longer matter
        let _receiver_gone = self.tx.send(event.clone());
        if matches!(event, Event::Checkpoint { .. }) {
            self.hold_while_lease_in_doubt();
        }
    }
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

impl ChannelReporter {
    /// At a checkpoint, with the lease's renewal overdue: waits (on the engine's own thread)
    /// until a renewal gets through or the job must stop. Past its lease another worker may
    /// take the job over from its last recorded checkpoint; training on would be work thrown
    /// away, and this checkpoint is a safe place to wait.
    fn hold_while_lease_in_doubt(&self) {
        if !self.lease.in_doubt() {
            return;
        }
        tracing::warn!(
            "the lease could not be renewed; holding at this checkpoint until the database answers"
        );
        let started = std::time::Instant::now();
        while self.lease.in_doubt() && !self.should_stop() {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        tracing::info!(
            held_s = started.elapsed().as_secs_f64(),
            stopping = self.should_stop(),
            "done holding at the checkpoint"
        );
    }
}

/// Runs a claimed job to its end. Call within the job's tracing span: the engine's log lines
/// inherit it.
pub(crate) async fn run_one(state: &AppState, device: &WorkerDevice, claim: Claim) -> Outcome {
    let stop = state.running.start(&claim.lease.job);
    let outcome = run(state, device, &claim, stop).await;
    state.running.finish(&claim.lease.job);
    outcome
}

/// A fenced write's result: a lost lease ends the run; anything else is logged and the run
/// goes on (the job's own record is what suffers, not the training).
fn written<T>(result: db::Result<T>, what: &str) -> Result<(), Outcome> {
    match result {
        Ok(_) => Ok(()),
        Err(db::Error::LeaseLost { .. }) => Err(Outcome::LeaseLost),
        Err(e) => {
            tracing::error!(error = %e, "could not record {what}");
            Ok(())
        }
    }
}

async fn run(
    state: &AppState,
    device: &WorkerDevice,
    claim: &Claim,
    stop: Arc<AtomicBool>,
) -> Outcome {
    match try_run(state, device, claim, stop).await {
        Ok(outcome) | Err(outcome) => outcome,
    }
}

async fn try_run(
    state: &AppState,
    device: &WorkerDevice,
    claim: &Claim,
    stop: Arc<AtomicBool>,
) -> Result<Outcome, Outcome> {
    let lease = &claim.lease;
    let opts = prepare(state, device, claim).await?;
    // Engine events → database + stream, in order, on the async side.
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let persister = spawn_persister(state, lease, stop.clone(), rx);
    let over_time = Arc::new(AtomicBool::new(false));
    let health = lease::LeaseHealth::new(state);
    let heartbeat = lease::spawn_heartbeat(
        state.clone(),
        lease.clone(),
        stop.clone(),
        over_time.clone(),
        health.clone(),
    );
    // A cancel that arrived between the claim and the stop flag's creation raised no flag; the
    // database has it (the heartbeat would see it too, but only after its first interval).
    match state.db.heartbeat(lease, lease::lease_secs(state)).await {
        Ok(Some(_)) => stop.store(true, Ordering::SeqCst),
        Ok(None) => {}
        Err(db::Error::LeaseLost { .. }) => {
            heartbeat.abort();
            return Err(Outcome::LeaseLost);
        }
        Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
    }
    // spawn_blocking starts with no span: carry the job's in, so the engine's lines name the job
    let span = tracing::Span::current();
    let engine_stop = stop.clone();
    // a catalogue name runs as its source
    let spec = state.config.resolved(&claim.spec);
    let engine = tokio::task::spawn_blocking(move || {
        let _in_job = span.enter();
        let mut reporter = ChannelReporter {
            tx,
            stop: engine_stop,
            lease: health,
        };
        train::run(&spec, &opts, &mut reporter)
    });
    let result = engine.await;
    heartbeat.abort();
    let lease_lost = persister.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "the event writer panicked");
        false
    });
    if lease_lost {
        return Ok(Outcome::LeaseLost);
    }
    let outcome = outcome_of(state, lease, result, &over_time).await;
    if let Ok(Outcome::Failed {
        code: "disk_full", ..
    })
    | Err(Outcome::Failed {
        code: "disk_full", ..
    }) = &outcome
    {
        remove_partial_outputs(state, lease).await;
    }
    outcome
}

/// After a job filled the disk: what it wrote that nothing refers to (checkpoints never
/// recorded, a half-written adapter) goes, so that the room is there for the node's other jobs.
async fn remove_partial_outputs(state: &AppState, lease: &Lease) {
    let out = state.artifacts.job_output_dir(&lease.job);
    align_checkpoints_with_record(state, lease, &out).await;
    let adapter = state
        .artifacts
        .local_path(&crate::artifacts::Key::adapter_dir(&lease.job));
    let tar = state
        .artifacts
        .local_path(&crate::artifacts::Key::adapter_tar(&lease.job));
    for leftover in [adapter, tar] {
        let removed = if leftover.is_dir() {
            tokio::fs::remove_dir_all(&leftover).await
        } else {
            tokio::fs::remove_file(&leftover).await
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(error = %e, path = %leftover.display(), "could not remove a partial output")
            }
            _ => {}
        }
    }
}

/// Everything before the engine starts: the start announced, the base model and the job's
/// memory checked against this worker, the datasets fetched, the adapter it starts from and its
/// output folder made ready. An `Err` is how the run ends without training.
async fn prepare(
    state: &AppState,
    device: &WorkerDevice,
    claim: &Claim,
) -> Result<train::RunOptions, Outcome> {
    let lease = &claim.lease;
    tracing::info!("job started");
    let started = StatusChange {
        attempt: Some(lease.attempt),
        ..StatusChange::to(JobStatus::Running)
    };
    written(
        state
            .publish_fenced(lease, &JobEvent::Status(started))
            .await,
        "the start",
    )?;
    // checked at submission too; the operator's lists may have changed since
    crate::model_access::check_base_model(&state.config, &claim.spec.base_model)
        .map_err(|m| Outcome::failed("model_not_allowed", format!("base_model: {m}")))?;
    let resolved = state.config.resolved(&claim.spec);
    let spec = &resolved;
    super::capacity::check_fit(state, device, lease, spec)
        .await
        .map_err(|misfit| match misfit {
            Misfit::LeaseLost => Outcome::LeaseLost,
            Misfit::Waiting(reason) => Outcome::Waiting { reason },
            Misfit::NeverFits(message) => Outcome::failed("insufficient_memory", message),
        })?;
    let fetching = JobPhase::FetchingDataset;
    written(state.db.set_phase(lease, fetching).await, "the phase")?;
    let phase = JobEvent::Status(StatusChange::phase(fetching));
    written(state.publish_fenced(lease, &phase).await, "the phase")?;
    let datasets = fetch_datasets(state, lease, spec)
        .await
        .map_err(|e| Outcome::failed("dataset_fetch_failed", e))?;
    let init_adapter = match &spec.from_checkpoint {
        None => None,
        Some(named) => {
            let failed = |e: &dyn std::fmt::Display| {
                Outcome::failed("io_error", format!("from_checkpoint {named}: {e}"))
            };
            // the job it names was checked at submission to be the same owner's
            let source = state
                .db
                .get_job(&named.job, None)
                .await
                .map_err(|e| failed(&e))?
                .ok_or_else(|| failed(&"the job no longer exists"))?;
            Some(
                state
                    .stored_adapter(&source, named.step)
                    .await
                    .map_err(|e| failed(&e))?,
            )
        }
    };
    let out = state.artifacts.job_output_dir(&lease.job);
    align_checkpoints_with_record(state, lease, &out).await;
    Ok(train::RunOptions {
        output_dir: out,
        device: device.device.clone(),
        resume: true,
        init_adapter,
        datasets: Some(datasets),
        max_record_bytes: (state.config.max_record_kib * 1024) as usize,
        max_total_steps: Some(state.config.max_job_steps),
    })
}

/// Stores the engine's events as they come, fenced by the lease; a lost lease raises `stop`
/// (the engine stops at its next step) and the task answers `true`. An event that cannot be
/// stored because the database or the artifact store is unreachable is tried again, with
/// backoff, before the next one: the history keeps every step, in order, through an outage.
fn spawn_persister(
    state: &AppState,
    lease: &Lease,
    stop: Arc<AtomicBool>,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> tokio::task::JoinHandle<bool> {
    let mut persister = Persister::new(state.clone(), lease.clone());
    tokio::spawn(async move {
        let mut lease_lost = false;
        while let Some(event) = rx.recv().await {
            if lease_lost {
                continue;
            }
            match persister.record_through_outages(&event).await {
                Ok(()) => {}
                Err(e) if e.is_lease_lost() => {
                    tracing::warn!(error = %e, "stopping the job");
                    stop.store(true, Ordering::SeqCst);
                    lease_lost = true;
                }
                Err(e) => tracing::error!(error = %e, "could not store a job event"),
            }
        }
        lease_lost
    })
}

/// How the engine's run ended, as the run's outcome: a success packs the adapter; a stop is a
/// time limit, a shutdown, a lost lease, a pause or a cancel, as the database tells.
async fn outcome_of(
    state: &AppState,
    lease: &Lease,
    result: Result<train::Result<train::Outcome>, tokio::task::JoinError>,
    over_time: &AtomicBool,
) -> Result<Outcome, Outcome> {
    Ok(match result {
        Ok(Ok(run)) => {
            written(
                state.db.set_phase(lease, JobPhase::Saving).await,
                "the phase",
            )?;
            match state.artifacts.pack_adapter(&lease.job).await {
                Ok(adapter) => Outcome::Succeeded {
                    adapter,
                    note: run.stopped_early,
                },
                Err(e) if crate::disk::is_full(&e) => {
                    let dir = state.artifacts.job_output_dir(&lease.job);
                    let free = crate::disk::free_bytes(&dir).unwrap_or(0);
                    Outcome::failed(
                        "disk_full",
                        format!(
                            "packing the adapter in {}: no space left on the device ({} free)",
                            dir.display(),
                            crate::disk::human(free)
                        ),
                    )
                }
                Err(e) => Outcome::failed("io_error", format!("packing the adapter: {e}")),
            }
        }
        Ok(Err(train::Error::Cancelled)) if over_time.load(Ordering::SeqCst) => Outcome::failed(
            "time_limit_exceeded",
            format!(
                "the job trained longer than this server's limit of {} hours; it checkpointed \
                 where it stopped (from_checkpoint can continue from it)",
                state.config.max_job_hours
            ),
        ),
        Ok(Err(train::Error::Cancelled)) if state.shutdown.is_cancelled() => Outcome::Interrupted,
        Ok(Err(train::Error::Cancelled)) => {
            match state.db.heartbeat(lease, lease::lease_secs(state)).await {
                // stopped because the lease was lost, not because anyone cancelled
                Err(db::Error::LeaseLost { .. }) => Outcome::LeaseLost,
                Ok(Some(db::StopRequest::Pause)) => Outcome::Paused,
                _ => Outcome::Cancelled,
            }
        }
        Ok(Err(e)) => Outcome::failed(e.code(), e),
        Err(panic) => Outcome::failed(
            "internal_error",
            format!("the training thread panicked: {panic}"),
        ),
    })
}

async fn fetch_datasets(
    state: &AppState,
    lease: &Lease,
    spec: &JobSpec,
) -> Result<Datasets, FetchError> {
    let fetch = |split, url| {
        fetch::fetch_dataset(
            &state.config,
            &state.egress,
            state.artifacts.as_ref(),
            &lease.job,
            split,
            url,
        )
    };
    let train = fetch(Split::Train, &spec.dataset.url).await?;
    let validation = match &spec.dataset.validation_url {
        Some(url) => Some(fetch(Split::Validation, url).await?),
        None => None,
    };
    Ok(Datasets { train, validation })
}

/// A resume must start from a checkpoint the database has recorded. The engine writes a
/// checkpoint to disk before its events reach the database, so a worker killed in between leaves
/// a folder whose preceding steps were never stored; resuming from it would leave a gap in the
/// job's loss curve and checkpoint list. Such folders are removed and those steps run again. The
/// last recorded checkpoint is brought from the artifact store when this worker has no copy (the
/// job ran on another machine before).
async fn align_checkpoints_with_record(state: &AppState, lease: &Lease, out: &Path) {
    let recorded: Vec<u64> = match state.db.list_checkpoints(&lease.job).await {
        Ok(rows) => rows.iter().map(|r| r.step as u64).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not list recorded checkpoints");
            return;
        }
    };
    for (step, dir) in train::checkpoint::list_checkpoints(out) {
        if !recorded.contains(&step) {
            tracing::info!(step, "removing a checkpoint the database never recorded");
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                tracing::warn!(error = %e, path = %dir.display(), "could not remove checkpoint");
            }
        }
    }
    // the last to resume from; under early stopping, the best too (the adapter to be)
    let best = match state.db.get_job(&lease.job, None).await {
        Ok(row) => row.and_then(|r| r.best_step).map(|s| s as u64),
        Err(_) => None,
    };
    let wanted = recorded.iter().max().copied().into_iter().chain(best);
    for last in wanted.filter(|s| recorded.contains(s)) {
        if !train::checkpoint::checkpoint_dir(out, last).is_dir() {
            let key = crate::artifacts::Key::checkpoint_dir(&lease.job, last);
            match state.artifacts.load_dir(&key).await {
                Ok(true) => {
                    tracing::info!(step = last, "checkpoint loaded from the artifact store")
                }
                Ok(false) => tracing::warn!(
                    step = last,
                    "the recorded checkpoint is not in the artifact store; the job starts over"
                ),
                Err(e) => {
                    tracing::warn!(step = last, error = %e, "could not load the checkpoint; the job starts over")
                }
            }
        }
    }
}
