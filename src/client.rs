//! A client of the job API, for the CLI's remote commands (`qtune submit`, `follow`, ...) and the
//! quickstart. It speaks only HTTP: what it knows of the server is the OpenAPI contract.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::events::JobEvent;
use crate::job::{FileView, JobList, JobView, MetricsRow};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error; `body` is what it wrote, unchanged.
    #[error("the server answered {status}: {body}")]
    Server { status: StatusCode, body: String },
    #[error("cannot reach the qtune server at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{0}")]
    Local(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// One Server-Sent Event of `GET /v1/jobs/{id}/events`.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub id: i64,
    pub event: JobEvent,
}

pub struct Client {
    base: String,
    api_key: Option<String>,
    http: reqwest::Client,
}

fn local(e: impl std::fmt::Display) -> ClientError {
    ClientError::Local(e.to_string())
}

impl Client {
    pub fn new(server: &str, api_key: Option<String>) -> Client {
        Client {
            base: server.trim_end_matches('/').to_string(),
            api_key: api_key.filter(|k| !k.is_empty()),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("a TLS backend is compiled in"),
        }
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            message: error_chain(&e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(ClientError::Server { status, body })
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        self.send(req).await?.json().await.map_err(local)
    }

    /// Submits a job spec. A dataset given as a path that exists on this machine is uploaded
    /// first (`POST /v1/files`) and the spec then names the upload, so the server needs no
    /// access to the client's files. Each upload is reported through `note`.
    pub async fn submit(&self, mut spec: Value, note: &mut dyn FnMut(String)) -> Result<JobView> {
        for field in ["url", "validation_url"] {
            let Some(given) = spec["dataset"][field].as_str().map(str::to_string) else {
                continue;
            };
            if is_remote_reference(&given) || !Path::new(&given).is_file() {
                continue;
            }
            let file = self.upload(Path::new(&given)).await?;
            note(format!(
                "uploaded {given} ({} bytes) as {}",
                file.bytes, file.id
            ));
            spec["dataset"][field] = Value::String(file.id);
        }
        self.json(self.request(Method::POST, "/v1/jobs").json(&spec))
            .await
    }

    pub async fn upload(&self, path: &Path) -> Result<FileView> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| local(format!("{}: {e}", path.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        self.json(
            self.request(Method::POST, "/v1/files")
                .query(&[("filename", name)])
                .body(bytes),
        )
        .await
    }

    pub async fn jobs(&self, status: Option<&str>, limit: u32) -> Result<JobList> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(s) = status {
            query.push(("status", s.to_string()));
        }
        self.json(self.request(Method::GET, "/v1/jobs").query(&query))
            .await
    }

    pub async fn job(&self, id: &str) -> Result<JobView> {
        self.json(self.request(Method::GET, &format!("/v1/jobs/{id}")))
            .await
    }

    /// The job's loss curve (`GET /v1/jobs/{id}/metrics`).
    pub async fn metrics(&self, id: &str) -> Result<Vec<MetricsRow>> {
        #[derive(serde::Deserialize)]
        struct Rows {
            data: Vec<MetricsRow>,
        }
        let rows: Rows = self
            .json(self.request(Method::GET, &format!("/v1/jobs/{id}/metrics")))
            .await?;
        Ok(rows.data)
    }

    pub async fn cancel(&self, id: &str) -> Result<JobView> {
        self.json(self.request(Method::POST, &format!("/v1/jobs/{id}/cancel")))
            .await
    }

    pub async fn pause(&self, id: &str) -> Result<JobView> {
        self.json(self.request(Method::POST, &format!("/v1/jobs/{id}/pause")))
            .await
    }

    pub async fn resume(&self, id: &str) -> Result<JobView> {
        self.json(self.request(Method::POST, &format!("/v1/jobs/{id}/resume")))
            .await
    }

    /// Follows the job's event stream until the job finishes, calling `on_event` for each event
    /// (history first). A dropped connection is resumed with `Last-Event-ID`, so no event is seen
    /// twice or missed. Returns the finished job.
    pub async fn follow(
        &self,
        id: &str,
        on_event: &mut dyn FnMut(&StreamEvent),
    ) -> Result<JobView> {
        let mut last_id = 0i64;
        let mut reconnects = 0;
        loop {
            let mut req = self.request(Method::GET, &format!("/v1/jobs/{id}/events"));
            if last_id > 0 {
                req = req.header("Last-Event-ID", last_id.to_string());
            }
            let dropped = match self.send(req).await {
                Ok(resp) => {
                    let mut body = resp.bytes_stream();
                    let mut buffer = String::new();
                    let mut dropped = None;
                    while let Some(chunk) = body.next().await {
                        match chunk {
                            Ok(bytes) => buffer.push_str(&String::from_utf8_lossy(&bytes)),
                            Err(e) => {
                                dropped = Some(error_chain(&e));
                                break;
                            }
                        }
                        while let Some(end) = buffer.find("\n\n") {
                            let block: String = buffer.drain(..end + 2).collect();
                            if let Some(event) = parse_sse_block(&block) {
                                last_id = event.id.max(last_id);
                                reconnects = 0;
                                on_event(&event);
                            }
                        }
                    }
                    dropped
                }
                Err(ClientError::Unreachable { message, .. }) => Some(message),
                Err(e) => return Err(e),
            };
            // The server ends the stream once the job has finished; anything else is a drop.
            match self.job(id).await {
                Ok(job) if job.status.is_terminal() && dropped.is_none() => return Ok(job),
                Err(e @ ClientError::Server { .. }) => return Err(e),
                _ => {}
            }
            reconnects += 1;
            if reconnects > 10 {
                return Err(ClientError::Unreachable {
                    url: self.base.clone(),
                    message: dropped.unwrap_or_else(|| "the event stream keeps ending".into()),
                });
            }
            tokio::time::sleep(Duration::from_millis(500 * reconnects)).await;
        }
    }

    /// Downloads the final adapter (a tar of the PEFT folder), checks it against the server's
    /// sha256 ETag, and unpacks `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    pub async fn download(&self, id: &str, dir: &Path) -> Result<Vec<PathBuf>> {
        let resp = self
            .send(self.request(Method::GET, &format!("/v1/jobs/{id}/adapter")))
            .await?;
        let etag = resp
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_matches('"').to_string());
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            message: error_chain(&e),
        })?;
        if let Some(expected) = etag {
            let got: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if got != expected {
                return Err(local(format!(
                    "the adapter of job {id} arrived damaged (sha256 {got}, server says {expected})"
                )));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| local(format!("{}: {e}", dir.display())))?;
        let mut written = Vec::new();
        let mut archive = tar::Archive::new(std::io::Cursor::new(bytes));
        for entry in archive.entries().map_err(local)? {
            let mut entry = entry.map_err(local)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path().map_err(local)?.to_path_buf();
            // Only the folder's own files, by name: nothing in the archive chooses where it lands.
            let Some(name) = path.file_name() else {
                continue;
            };
            let dest = dir.join(name);
            entry
                .unpack(&dest)
                .map_err(|e| local(format!("{}: {e}", dest.display())))?;
            written.push(dest);
        }
        written.sort();
        Ok(written)
    }
}

/// Dataset references the server resolves itself: URLs and uploaded file ids.
fn is_remote_reference(s: &str) -> bool {
    s.starts_with("http://")
        || s.starts_with("https://")
        || s.starts_with("file://")
        || s.starts_with("file-")
}

fn parse_sse_block(block: &str) -> Option<StreamEvent> {
    let (mut id, mut kind, mut data) = (None, "message".to_string(), String::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("event:") {
            kind = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    Some(StreamEvent {
        id: id?,
        event: JobEvent::parse(&kind, &data).ok()?,
    })
}

/// reqwest's Display stops at the outermost error; the cause ("connection refused") is inside.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_blocks_parse_and_keepalives_are_skipped() {
        let e = parse_sse_block(
            "id: 7\nevent: eval\ndata: {\"step\":3,\"epoch\":1.0,\"eval_loss\":0.5}\n\n",
        )
        .unwrap();
        assert_eq!(e.id, 7);
        assert!(matches!(e.event, JobEvent::Eval(ref ev) if ev.step == 3 && ev.eval_loss == 0.5));
        assert!(parse_sse_block(":\n\n").is_none());
    }
}
