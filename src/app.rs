//! The service assembled: config → database + artifact store + event bus + workers + HTTP
//! router. Nothing else lives here; what handlers and workers share is in `state`.

use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::artifacts::LocalArtifacts;
use crate::config::ServeConfig;
use crate::db::Db;
use crate::egress::EgressPolicy;
use crate::events::EventBus;
use crate::state::{AppState, RunningJobs};

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
        let artifacts = Arc::new(LocalArtifacts::new(&config.data_dir)?);
        let db = Db::open(&config.db_path())
            .await?
            .limit_running_per_owner(config.max_running_per_key);
        // Without keys every caller sees everything: refused while the data dir holds what keys
        // own, unless the operator says so (a restart that forgot QTUNE_API_KEYS would otherwise
        // open every tenant's jobs and adapters to anyone who can reach the port).
        if config.api_keys.is_empty() && db.holds_owned_data().await? {
            if config.allow_keyless {
                tracing::warn!("starting without API keys over jobs and files that keys own (--allow-keyless): every caller sees all of them");
            } else {
                anyhow::bail!(
                    "{} holds jobs or files created with API keys; start with the same QTUNE_API_KEYS, \
                     or pass --allow-keyless (QTUNE_ALLOW_KEYLESS=true) to let every caller see them",
                    config.db_path().display()
                );
            }
        }
        for id in db.requeue_running().await? {
            tracing::warn!(job.id = %id, "job was left running by a previous process; requeued to resume from its last checkpoint");
        }
        if !(config.retention_days.is_finite() && config.retention_days >= 0.0) {
            anyhow::bail!("--retention-days must be a number of days, 0 or more");
        }
        if !(config.max_job_hours.is_finite() && config.max_job_hours > 0.0) {
            anyhow::bail!("--max-job-hours must be a positive number of hours");
        }
        let egress = EgressPolicy::parse(&config.fetch_allow)
            .map_err(|e| anyhow::anyhow!("--fetch-allow: {e}"))?;
        let listener = TcpListener::bind(config.listen).await?;
        let state = AppState {
            db,
            artifacts,
            config: Arc::new(config),
            egress: Arc::new(egress),
            events: EventBus::new(4096),
            job_queued: Arc::new(Notify::new()),
            running: RunningJobs::default(),
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
        if state.config.retention_days > 0.0 {
            workers.push(tokio::spawn(crate::worker::retention::run(state.clone())));
        }
        let bound = self.listener.local_addr()?;
        let router = crate::api::router(state.clone(), bound);
        let shutdown = state.shutdown.clone();
        tokio::spawn(async move {
            stop.await;
            tracing::info!("shutting down: no new jobs; running jobs checkpoint and requeue");
            shutdown.cancel();
        });
        let limits = crate::http::ConnectionLimits {
            max_connections: state.config.max_connections.max(1),
            header_read_timeout: std::time::Duration::from_secs(
                state.config.header_timeout_secs.max(1),
            ),
        };
        crate::http::serve(self.listener, router, limits, state.shutdown.clone()).await?;
        for w in workers {
            if let Err(e) = w.await {
                tracing::error!(error = %e, "a worker ended abnormally");
            }
        }
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
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
