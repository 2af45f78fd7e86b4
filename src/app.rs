//! The service assembled: database, event fan-out, worker pool and HTTP server.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::ServeConfig;
use crate::db::Db;

/// One stored job event, as it is fanned out to SSE subscribers.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub job_id: String,
    /// The row id in `job_events`: the SSE event id.
    pub id: i64,
    pub kind: String,
    pub data: String,
}

/// Shared by handlers and workers; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub config: Arc<ServeConfig>,
    pub events: broadcast::Sender<JobEvent>,
    /// Wakes idle workers when a job is queued.
    pub job_queued: Arc<Notify>,
    /// Stop flags of the jobs running in this process, by job id.
    pub running: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    pub workers_up: Arc<AtomicUsize>,
    /// Set when the server is shutting down: running jobs checkpoint and go back to the queue.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Stores an event and fans it out; returns its id.
    pub async fn publish(
        &self,
        job_id: &str,
        kind: &str,
        data: &serde_json::Value,
    ) -> crate::db::Result<i64> {
        let text = data.to_string();
        let id = self.db.insert_event(job_id, kind, &text).await?;
        let _ = self.events.send(JobEvent {
            job_id: job_id.to_string(),
            id,
            kind: kind.to_string(),
            data: text,
        });
        Ok(id)
    }
}

pub struct App {
    listener: TcpListener,
    state: AppState,
}

impl App {
    /// Opens the database (migrating it), requeues jobs a crash left running, and binds the
    /// listener. Nothing runs until [`App::run_until_stopped`].
    pub async fn build(mut config: ServeConfig) -> anyhow::Result<App> {
        // `QTUNE_API_KEYS=` (set but empty, as compose files pass it) means no keys, not one
        // empty key that nobody can send.
        config.api_keys = config
            .api_keys
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        std::fs::create_dir_all(&config.data_dir)?;
        std::fs::create_dir_all(config.files_dir())?;
        let db = Db::open(&config.db_path()).await?;
        for id in db.requeue_running().await? {
            tracing::warn!(job.id = %id, "job was left running by a previous process; requeued to resume from its last checkpoint");
        }
        let listener = TcpListener::bind(config.listen).await?;
        let (events, _) = broadcast::channel(4096);
        let state = AppState {
            db,
            config: Arc::new(config),
            events,
            job_queued: Arc::new(Notify::new()),
            running: Arc::new(Mutex::new(HashMap::new())),
            workers_up: Arc::new(AtomicUsize::new(0)),
            shutdown: CancellationToken::new(),
        };
        Ok(App { listener, state })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until `stop` resolves, then stops taking jobs, lets running jobs checkpoint and
    /// requeue themselves, and returns.
    pub async fn run_until_stopped(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state;
        let mut workers = Vec::new();
        for device in state.config.devices.clone() {
            workers.push(tokio::spawn(crate::worker::run(state.clone(), device)));
        }
        let router = crate::api::router(state.clone());
        let shutdown = state.shutdown.clone();
        tokio::spawn(async move {
            stop.await;
            tracing::info!("shutting down: no new jobs; running jobs checkpoint and requeue");
            shutdown.cancel();
        });
        let http_shutdown = state.shutdown.clone();
        axum::serve(self.listener, router)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await?;
        for w in workers {
            let _ = w.await;
        }
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// The id of the running job's stop flag, shared with the engine's reporter.
pub fn stop_flag(state: &AppState, job_id: &str) -> Arc<AtomicBool> {
    state
        .running
        .lock()
        .expect("stop-flag map poisoned")
        .entry(job_id.to_string())
        .or_default()
        .clone()
}
