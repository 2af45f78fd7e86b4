//! Dataset references → local files: uploaded `file-<id>`, `file://` and local paths (only under
//! the directories the operator allows), and http(s) with a timeout, a size cap, bounded
//! redirects and retries on transient failures. Every error names the URL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::config::ServeConfig;

const ATTEMPTS: u32 = 3;

/// Resolves `url` to a readable local file, downloading into `dest` if it is remote.
pub async fn fetch_dataset(
    config: &ServeConfig,
    url: &str,
    dest: &Path,
) -> Result<PathBuf, String> {
    if url.starts_with("file-") {
        let path = config.files_dir().join(url);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{url}: uploaded file not found"))
        };
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return download(config, url, dest).await;
    }
    let local = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    let canonical = local.canonicalize().map_err(|e| format!("{url}: {e}"))?;
    let allowed = config
        .allow_file_dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| canonical.starts_with(d));
    if !allowed {
        return Err(format!(
            "{url}: local files are only read from the directories in --allow-file-dirs (QTUNE_ALLOW_FILE_DIRS); upload it with POST /v1/files instead"
        ));
    }
    Ok(canonical)
}

async fn download(config: &ServeConfig, url: &str, dest: &Path) -> Result<PathBuf, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(config.fetch_timeout_secs))
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::limited(5))
        .build()
        .map_err(|e| format!("{url}: {e}"))?;
    let cap = config.max_dataset_mib * 1024 * 1024;
    let mut last_error = String::new();
    for attempt in 1..=ATTEMPTS {
        match download_once(&client, url, dest, cap).await {
            Ok(p) => return Ok(p),
            Err((msg, transient)) => {
                last_error = msg;
                if !transient || attempt == ATTEMPTS {
                    break;
                }
                tracing::warn!(%url, attempt, error = %last_error, "dataset download failed; retrying");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
        }
    }
    Err(last_error)
}

/// `Err((message, transient))`.
async fn download_once(
    client: &reqwest::Client,
    url: &str,
    dest: &Path,
    cap: u64,
) -> Result<PathBuf, (String, bool)> {
    let resp = client.get(url).send().await.map_err(|e| {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_redirect() {
            "too many redirects"
        } else {
            "request failed"
        };
        (format!("{url}: {what}: {e}"), !e.is_redirect())
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err((
            format!("{url}: HTTP {status}"),
            status.is_server_error() || status.as_u16() == 429,
        ));
    }
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err((
            format!(
                "{url}: {} bytes is over the {} MiB dataset limit",
                resp.content_length().unwrap_or(0),
                cap >> 20
            ),
            false,
        ));
    }
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| (format!("{}: {e}", dir.display()), false))?;
    }
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| (format!("{}: {e}", dest.display()), false))?;
    let mut total = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| (format!("{url}: download interrupted: {e}"), true))?;
        total += chunk.len() as u64;
        if total > cap {
            return Err((
                format!("{url}: over the {} MiB dataset limit", cap >> 20),
                false,
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| (format!("{}: {e}", dest.display()), false))?;
    }
    file.flush()
        .await
        .map_err(|e| (format!("{}: {e}", dest.display()), false))?;
    Ok(dest.to_path_buf())
}
