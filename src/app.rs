//! The service assembled: config → database + artifact store + event bus + workers + HTTP
//! router (`qtune serve`), or the same without the API (`qtune worker`). Nothing else lives here;
//! what handlers and workers share is in `state`.

use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::artifacts::s3::S3Artifacts;
use crate::artifacts::{ArtifactStore, LocalArtifacts};
use crate::config::ServeConfig;
use crate::db::Db;
use crate::egress::EgressPolicy;
use crate::events::EventBus;
use crate::state::{AppState, RunningJobs};

pub struct App {
    listener: Option<TcpListener>,
    /// Whether the listener serves the API (`qtune serve`) or only health checks (`qtune worker`).
    api: bool,
    state: AppState,
}

impl App {
    /// `qtune serve`: opens the database (migrating it) and binds the API's listener. Nothing
    /// runs until [`App::run_until_stopped`]. Jobs a crashed process left running are taken over
    /// by a worker once their lease expires.
    pub async fn build(config: ServeConfig) -> anyhow::Result<App> {
        let state = shared_state(config).await?;
        // Without keys every caller sees everything: refused while the database holds what keys
        // own, unless the operator says so (a restart that forgot QTUNE_API_KEYS would otherwise
        // open every tenant's jobs and adapters to anyone who can reach the port).
        if state.config.api_keys.is_empty() && state.db.holds_owned_data().await? {
            if state.config.allow_keyless {
                tracing::warn!("starting without API keys over jobs and files that keys own (--allow-keyless): every caller sees all of them");
            } else {
                anyhow::bail!(
                    "{} holds jobs or files created with API keys; start with the same QTUNE_API_KEYS, \
                     or pass --allow-keyless (QTUNE_ALLOW_KEYLESS=true) to let every caller see them",
                    crate::db::redact(&state.config.database_url())
                );
            }
        }
        let listener = TcpListener::bind(state.config.listen).await?;
        Ok(App {
            listener: Some(listener),
            api: true,
            state,
        })
    }

    /// `qtune worker`: workers only, on the shared database and store; `/healthz` and `/readyz`
    /// on `health_listen` when given.
    pub(crate) async fn build_worker(
        config: ServeConfig,
        health_listen: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<App> {
        let state = shared_state(config).await?;
        let listener = match health_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(App {
            listener,
            api: false,
            state,
        })
    }

    /// The bound port (0 when this process listens nowhere).
    pub fn port(&self) -> u16 {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
            .unwrap_or(0)
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
        for device in state.config.worker_devices().to_vec() {
            workers.push(tokio::spawn(crate::worker::run(state.clone(), device)));
        }
        if self.api && state.config.retention_days > 0.0 {
            workers.push(tokio::spawn(crate::worker::retention::run(state.clone())));
        }
        // what other processes write reaches this one's streams and workers (PostgreSQL)
        workers.push(tokio::spawn(crate::relay::run(state.clone())));
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
            idle_timeout: std::time::Duration::from_secs(state.config.idle_timeout_secs.max(1)),
        };
        match self.listener {
            Some(listener) => {
                let router = if self.api {
                    crate::api::router(state.clone(), listener.local_addr()?)
                } else {
                    crate::api::health_router(state.clone())
                };
                crate::http::serve(listener, router, limits, state.shutdown.clone()).await?
            }
            None => state.shutdown.cancelled().await,
        }
        for w in workers {
            if let Err(e) = w.await {
                tracing::error!(error = %e, "a worker ended abnormally");
            }
        }
        Ok(())
    }
}

/// What every process builds from its config: database (migrated), artifact store, event bus.
async fn shared_state(mut config: ServeConfig) -> anyhow::Result<AppState> {
    // `QTUNE_API_KEYS=` (set but empty, as compose files pass it) means no keys, not one
    // empty key that nobody can send.
    config.api_keys = config
        .api_keys
        .iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    std::fs::create_dir_all(&config.data_dir)?;
    let artifacts: Arc<dyn ArtifactStore> = match config.artifacts.as_deref().map(str::trim) {
        Some(url) if url.starts_with("s3://") => {
            Arc::new(S3Artifacts::from_url(url, &config.data_dir)?)
        }
        Some(dir) if !dir.is_empty() => Arc::new(LocalArtifacts::new(dir)?),
        _ => Arc::new(LocalArtifacts::new(&config.data_dir)?),
    };
    let db = Db::connect(&config.database_url(), config.db_pool_size)
        .await?
        .limit_running_per_owner(config.max_running_per_key);
    if !(config.retention_days.is_finite() && config.retention_days >= 0.0) {
        anyhow::bail!("--retention-days must be a number of days, 0 or more");
    }
    if !(config.max_job_hours.is_finite() && config.max_job_hours > 0.0) {
        anyhow::bail!("--max-job-hours must be a positive number of hours");
    }
    config.parse_catalogue().map_err(anyhow::Error::msg)?;
    let egress = EgressPolicy::parse(&config.fetch_allow)
        .map_err(|e| anyhow::anyhow!("--fetch-allow: {e}"))?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let models = Arc::new(crate::inference::Models::new(&config, metrics));
    Ok(AppState {
        db,
        artifacts,
        config: Arc::new(config),
        egress: Arc::new(egress),
        events: EventBus::new(4096),
        job_queued: Arc::new(Notify::new()),
        running: RunningJobs::default(),
        workers_up: Arc::new(AtomicUsize::new(0)),
        shutdown: CancellationToken::new(),
        models,
    })
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
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
