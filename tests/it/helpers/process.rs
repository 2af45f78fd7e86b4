//! The real `qtune` binary as a server process, for tests that kill it, signal it or read its log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A port nobody listens on right now (for processes that must be told their port up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `qtune serve` on `port` with `data_dir`, reading `file://` datasets under `allow`. Its log
/// (tracing writes it to stdout) goes to `log` when given, else nowhere. Killed when dropped.
pub struct ServeProcess {
    pub child: Child,
    pub base: String,
    pub client: reqwest::blocking::Client,
}

impl ServeProcess {
    pub fn start(data_dir: &Path, allow: &Path, port: u16, log: Option<&PathBuf>) -> ServeProcess {
        let listen = format!("127.0.0.1:{port}");
        ServeProcess::spawn(
            &["serve", "--listen", &listen],
            data_dir,
            allow,
            port,
            &[],
            log,
        )
    }

    /// `qtune ARGS` with the data dir, allowed dirs and a short lease, plus `env`; ready when
    /// `/readyz` on `port` answers 200 (for `qtune worker`: pass `--health-listen` there).
    pub fn spawn(
        args: &[&str],
        data_dir: &Path,
        allow: &Path,
        port: u16,
        env: &[(&str, &str)],
        log: Option<&PathBuf>,
    ) -> ServeProcess {
        let stdout = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::null(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_qtune"))
            .args(args)
            .env("QTUNE_DATA_DIR", data_dir)
            .env("QTUNE_ALLOW_FILE_DIRS", allow)
            .env("QTUNE_ALLOW_MODEL_DIRS", allow)
            .env("QTUNE_LOG", "info")
            // a job left running by a killed process is taken over once its lease expires
            .env("QTUNE_LEASE_SECS", "3")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = ServeProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::blocking::Client::new(),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while self
            .client
            .get(format!("{}/readyz", self.base))
            .send()
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "server did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn job(&self, id: &str) -> Value {
        self.client
            .get(format!("{}/v1/jobs/{id}", self.base))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// Creates a job; returns its id.
    pub fn submit(&self, body: &Value) -> String {
        let created: Value = self
            .client
            .post(format!("{}/v1/jobs", self.base))
            .json(body)
            .send()
            .unwrap()
            .json()
            .unwrap();
        created["id"]
            .as_str()
            .unwrap_or_else(|| panic!("not created: {created}"))
            .to_string()
    }

    /// Polls the job until `done(job)` holds; panics after `within`.
    pub fn wait_job(&self, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let j = self.job(id);
            if done(&j) {
                return j;
            }
            assert!(
                start.elapsed() < within,
                "still waiting after {within:?}: {j}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and wait for it.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        // already dead after kill(); otherwise the test failed midway and the process must go
        if self.child.try_wait().ok().flatten().is_none() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}
