//! The service in this process, for tests that drive it over real HTTP.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use qtune::app::App;
use qtune::config::ServeConfig;
use qtune::state::AppState;
use serde_json::{json, Value};

/// `qtune serve` in this process: a real SQLite file and artifacts in a temporary data dir (or a
/// PostgreSQL database and an S3 prefix of its own: `QTUNE_TEST_BACKEND=postgres`), a real
/// listener on an ephemeral port, the tiny model beside it. Stopped when dropped.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub data_dir: PathBuf,
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// With the file dir of the test allowed for `file://` datasets; `f` changes the config.
pub async fn spawn_app_with(f: impl FnOnce(&mut ServeConfig)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let model = super::tiny_model(dir.path());
    let data_dir = dir.path().join("data");
    let mut config = ServeConfig::for_data_dir(data_dir.clone());
    config.allow_file_dirs = vec![dir.path().to_path_buf()];
    config.allow_model_dirs = vec![dir.path().to_path_buf()];
    if super::postgres::selected() {
        config.database = Some(super::postgres::database());
        config.artifacts = Some(super::s3_artifacts());
        config.db_pool_size = 4;
    }
    f(&mut config);
    let app = App::build(config).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let state = app.state();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _stopped_or_dropped = rx.await;
    }));
    TestApp {
        base,
        client: reqwest::Client::new(),
        dir,
        model,
        data_dir,
        state,
        stop: Some(tx),
        server: Some(server),
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A job body for the tiny model on a memorisable dataset in the allowed directory.
    pub fn job(&self, extra: Value) -> Value {
        let data = super::memorisable_chat(self.dir.path(), 8);
        let mut v = json!({
            "base_model": self.model.to_str().unwrap(),
            "dataset": {"url": format!("file://{}", data.display())},
            "lora": {"r": 4, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {"epochs": 4, "batch_size": 4, "learning_rate": 0.01, "lr_scheduler": "constant", "max_seq_len": 64},
        });
        merge(&mut v, extra);
        v
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(self.client.post(self.url(path)).json(body)).await
    }

    /// [`TestApp::post`] with an API key.
    pub async fn post_as(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        answer(self.client.post(self.url(path)).bearer_auth(key).json(body)).await
    }

    /// A GET with an API key.
    pub async fn get_as(&self, key: &str, path: &str) -> (u16, Value) {
        answer(self.client.get(self.url(path)).bearer_auth(key)).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        // A GET may land on a pooled connection the server just closed (after refusing an
        // oversized body); it is idempotent, so it is sent again on a fresh one.
        let mut tries = 0;
        let r = loop {
            match self.client.get(self.url(path)).send().await {
                Ok(r) => break r,
                Err(e) if tries < 2 && (e.is_connect() || e.is_request()) => tries += 1,
                Err(e) => panic!("GET {path}: {e}"),
            }
        };
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn submit(&self, body: &Value) -> String {
        let (status, job) = self.post("/v1/jobs", body).await;
        assert_eq!(status, 201, "{job}");
        job["id"].as_str().unwrap().to_string()
    }

    pub async fn wait_status(&self, id: &str, want: &[&str], within: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (_, job) = self.get(&format!("/v1/jobs/{id}")).await;
            if want.contains(&job["status"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(
                start.elapsed() < within,
                "job {id} still {} after {within:?}: {job}",
                job["status"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads the SSE stream to its end: (id, event, data) triples.
    pub async fn events(&self, id: &str, last_event_id: Option<i64>) -> Vec<(i64, String, Value)> {
        let mut req = self.client.get(self.url(&format!("/v1/jobs/{id}/events")));
        if let Some(l) = last_event_id {
            req = req.header("Last-Event-ID", l.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let mut body = String::new();
        let mut stream = resp.bytes_stream();
        let read = async {
            while let Some(chunk) = stream.next().await {
                body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            }
        };
        tokio::time::timeout(Duration::from_secs(120), read)
            .await
            .expect("the stream ends when the job ends");
        parse_sse(&body)
    }

    /// Stops the server the way a signal does and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).expect("the server is still running");
        }
        self.server.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // the server may have stopped already (its runtime ended with the test)
            let _gone = stop.send(());
        }
    }
}

/// Server-Sent Events in a body: (id, event, data) of each complete event; keep-alives skipped.
pub fn parse_sse(body: &str) -> Vec<(i64, String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let (mut id, mut event, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).ok();
                }
            }
            Some((id?, event?, data?))
        })
        .collect()
}

/// Merges JSON object `b` into `a`, recursively.
pub fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// A request's status and JSON body (`null` when the body is not JSON).
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}
