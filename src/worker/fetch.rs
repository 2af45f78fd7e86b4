//! Dataset references → local files the engine reads: uploaded `file-<id>`, `file://` and local
//! paths (only under the directories the operator allows), and http(s) under the egress rules
//! (`crate::egress`: public addresses only, checked on every redirect, no credentials in URLs)
//! with a timeout, a size cap, bounded redirects and retries on transient failures. Every error
//! names the URL and the reason, never what the server answered.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::artifacts::{ArtifactStore, Key, Split};
use crate::config::ServeConfig;
use crate::egress::{EgressPolicy, Refused};
use crate::job::JobId;
use crate::train::DatasetFile;

const ATTEMPTS: u32 = 3;
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("{url}: uploaded file not found")]
    UploadMissing { url: String },
    #[error("{url}: local files are only read from the directories in --allow-file-dirs (QTUNE_ALLOW_FILE_DIRS); upload it with POST /v1/files instead")]
    NotAllowed { url: String },
    #[error("{url}: {source}")]
    Local { url: String, source: std::io::Error },
    #[error("{url}: {reason}")]
    Refused { url: String, reason: Refused },
    #[error("{url}: {what}: {source}")]
    Request {
        url: String,
        what: &'static str,
        source: reqwest::Error,
    },
    #[error("{url}: HTTP {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{url}: over the {limit_mib} MiB dataset limit{}", .announced.map(|n| format!(" ({n} bytes)")).unwrap_or_default())]
    TooLarge {
        url: String,
        limit_mib: u64,
        announced: Option<u64>,
    },
    #[error("{url}: download interrupted: {source}")]
    Interrupted { url: String, source: reqwest::Error },
    /// Reading it from, or keeping it in, the artifact store.
    #[error("{url}: artifact store: {source}")]
    Store { url: String, source: std::io::Error },
    #[error("{}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The egress refusal inside a reqwest error (from the redirect policy or the resolver).
fn refusal(e: &reqwest::Error) -> Option<Refused> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        source = s.source();
    }
    None
}

impl FetchError {
    /// Worth another try: the network or the server may do better next time.
    fn is_transient(&self) -> bool {
        match self {
            FetchError::Request { source, .. } => !source.is_redirect(),
            FetchError::Status { status, .. } => {
                status.is_server_error() || *status == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            FetchError::Interrupted { .. } => true,
            _ => false,
        }
    }
}

/// Resolves `url` to a local file, downloading it into the job's artifacts if it is remote.
/// The file keeps `url` as its name, so the engine's messages name what the user wrote.
pub(crate) async fn fetch_dataset(
    config: &ServeConfig,
    egress: &Arc<EgressPolicy>,
    artifacts: &dyn ArtifactStore,
    job: &JobId,
    split: Split,
    url: &str,
) -> Result<DatasetFile, FetchError> {
    let named = |path: PathBuf| DatasetFile {
        path,
        name: url.to_string(),
    };
    if url.starts_with("file-") {
        let missing = || FetchError::UploadMissing {
            url: url.to_string(),
        };
        let key = Key::upload(url).ok_or_else(missing)?;
        return match artifacts.load(&key).await {
            Ok(true) => Ok(named(artifacts.local_path(&key))),
            Ok(false) => Err(missing()),
            Err(source) => Err(FetchError::Store {
                url: url.to_string(),
                source,
            }),
        };
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let key = Key::dataset(job, split);
        let dest = artifacts.local_path(&key);
        download(config, egress, url, &dest).await?;
        // kept with the job's artifacts, so that a worker taking the job over reads the same data
        artifacts
            .save(&key)
            .await
            .map_err(|source| FetchError::Store {
                url: url.to_string(),
                source,
            })?;
        return Ok(named(dest));
    }
    let local = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    let allowed_dirs: Vec<PathBuf> = config
        .allow_file_dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .collect();
    let canonical = match local.canonicalize() {
        Ok(c) => c,
        // a missing path outside the allowed dirs gets the answer an existing one gets: what
        // exists elsewhere on the server is not for a tenant to learn
        Err(_) if !allowed_dirs.iter().any(|d| lexically_under(&local, d)) => {
            return Err(FetchError::NotAllowed {
                url: url.to_string(),
            })
        }
        Err(source) => {
            return Err(FetchError::Local {
                url: url.to_string(),
                source,
            })
        }
    };
    let allowed = allowed_dirs.iter().any(|d| canonical.starts_with(d));
    if !allowed {
        return Err(FetchError::NotAllowed {
            url: url.to_string(),
        });
    }
    Ok(named(canonical))
}

/// Whether `path`, its `.` and `..` resolved as text (no file system), lies under `dir`.
fn lexically_under(path: &std::path::Path, dir: &std::path::Path) -> bool {
    use std::path::Component;
    let mut parts: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if matches!(parts.last(), Some(Component::Normal(_))) {
                    parts.pop();
                }
            }
            other => parts.push(other),
        }
    }
    parts.iter().collect::<PathBuf>().starts_with(dir)
}

async fn download(
    config: &ServeConfig,
    egress: &Arc<EgressPolicy>,
    url: &str,
    dest: &std::path::Path,
) -> Result<(), FetchError> {
    let refused = |reason| FetchError::Refused {
        url: url.to_string(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|_| refused(Refused::NoHost))?;
    egress.check_url(&parsed).map_err(refused)?;
    let redirects = egress.clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(config.fetch_timeout_secs))
        .connect_timeout(Duration::from_secs(10))
        // a proxy would resolve names itself, past the checks below
        .no_proxy()
        .dns_resolver(egress.resolver())
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error("too many redirects");
            }
            match redirects.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(reason),
            }
        }))
        .build()
        .map_err(|source| FetchError::Request {
            url: url.to_string(),
            what: "cannot build an HTTP client",
            source,
        })?;
    let cap = config.max_dataset_mib * 1024 * 1024;
    let mut attempt = 1;
    loop {
        match download_once(&client, url, dest, cap).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                tracing::warn!(%url, attempt, error = %e, "dataset download failed; retrying");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn download_once(
    client: &reqwest::Client,
    url: &str,
    dest: &std::path::Path,
    cap: u64,
) -> Result<(), FetchError> {
    let resp = client.get(url).send().await.map_err(|source| {
        if let Some(reason) = refusal(&source) {
            return FetchError::Refused {
                url: url.to_string(),
                reason,
            };
        }
        let what = if source.is_timeout() {
            "timed out"
        } else if source.is_redirect() {
            "redirect refused"
        } else {
            "request failed"
        };
        FetchError::Request {
            url: url.to_string(),
            what,
            source,
        }
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            url: url.to_string(),
            status,
        });
    }
    let too_large = |announced| FetchError::TooLarge {
        url: url.to_string(),
        limit_mib: cap >> 20,
        announced,
    };
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(too_large(resp.content_length()));
    }
    let write_err = |source| FetchError::Write {
        path: dest.to_path_buf(),
        source,
    };
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(write_err)?;
    }
    let mut file = tokio::fs::File::create(dest).await.map_err(write_err)?;
    let mut total = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| FetchError::Interrupted {
            url: url.to_string(),
            source,
        })?;
        total += chunk.len() as u64;
        if total > cap {
            return Err(too_large(None));
        }
        file.write_all(&chunk).await.map_err(write_err)?;
    }
    file.flush().await.map_err(write_err)
}
