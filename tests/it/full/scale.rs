//! Scaled out: API replicas and `qtune worker` processes, each its own process with a data dir of
//! its own (nothing shared on disk, as on separate hosts), sharing one real PostgreSQL database
//! (the queue and every record) and one real S3 API server (every artifact). Jobs run once each;
//! a killed worker's job is taken over from its last checkpoint once its lease expires; a
//! stopped-then-resumed worker finds its writes refused; SSE and cancel work through a replica
//! other than the one the job was submitted to.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::app::parse_sse;
use crate::helpers::postgres;
use crate::helpers::process::{free_port, ServeProcess};

pub(super) struct Deployment {
    pub db: String,
    pub artifacts: String,
    pub dir: tempfile::TempDir,
    model: PathBuf,
    /// The training data, uploaded through replica A: its workers read it from the store.
    data: String,
    pub api_a: ServeProcess,
    pub api_b: ServeProcess,
    /// (process, pid) of each worker, in start order.
    pub workers: Vec<Option<ServeProcess>>,
}

/// Where the deployment's processes find the database and the store.
#[derive(Clone)]
pub(super) struct Parts {
    pub db: String,
    pub artifacts: String,
    /// The S3 server's address as the processes are told it (a fault proxy's, when the test
    /// breaks it); the test's own environment's otherwise.
    pub store_endpoint: Option<String>,
}

impl Parts {
    /// What every process of the deployment is told.
    fn env(&self) -> Vec<(&str, &str)> {
        let mut env = vec![
            ("QTUNE_DATABASE", self.db.as_str()),
            ("QTUNE_ARTIFACTS", self.artifacts.as_str()),
            ("QTUNE_DB_POOL_SIZE", "4"),
        ];
        if let Some(endpoint) = &self.store_endpoint {
            env.push(("AWS_ENDPOINT_URL", endpoint));
        }
        env
    }
}

/// A data dir of its own for each process.
fn own_dir(root: &Path) -> PathBuf {
    root.join(format!("host-{}", uuid::Uuid::new_v4().simple()))
}

/// Where a process's log goes: `$QTUNE_TEST_LOGS/<role>-<port>.log` when that is set (to read
/// what a failing run's processes said), else nowhere.
fn log_of(role: &str, port: u16) -> Option<PathBuf> {
    let dir = std::env::var_os("QTUNE_TEST_LOGS")?;
    std::fs::create_dir_all(&dir).ok()?;
    Some(Path::new(&dir).join(format!("{role}-{port}.log")))
}

fn api(parts: &Parts, root: &Path) -> ServeProcess {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    ServeProcess::spawn(
        &["serve", "--workers", "0", "--listen", &listen],
        &own_dir(root),
        root,
        port,
        &parts.env(),
        log_of("api", port).as_ref(),
    )
}

pub(super) fn worker(parts: &Parts, root: &Path) -> ServeProcess {
    let port = free_port();
    let health = format!("127.0.0.1:{port}");
    ServeProcess::spawn(
        &["worker", "--devices", "cpu", "--health-listen", &health],
        &own_dir(root),
        root,
        port,
        &parts.env(),
        log_of("worker", port).as_ref(),
    )
}

impl Deployment {
    fn start(workers: usize) -> Deployment {
        let parts = Parts {
            db: postgres::database(),
            artifacts: crate::helpers::s3_artifacts(),
            store_endpoint: None,
        };
        Deployment::start_on(parts, workers)
    }

    /// Two API replicas and `workers` workers on `parts`.
    pub(super) fn start_on(parts: Parts, workers: usize) -> Deployment {
        let (db, artifacts) = (parts.db.clone(), parts.artifacts.clone());
        let dir = tempfile::tempdir().unwrap();
        let model = crate::helpers::tiny_model(dir.path());
        let data_file = crate::helpers::memorisable_chat(dir.path(), 8);
        let api_a = api(&parts, dir.path());
        let api_b = api(&parts, dir.path());
        let workers = (0..workers)
            .map(|_| Some(worker(&parts, dir.path())))
            .collect();
        let uploaded: Value = api_a
            .client
            .post(format!("{}/v1/files?filename=chat.jsonl", api_a.base))
            .body(std::fs::read(&data_file).unwrap())
            .send()
            .unwrap()
            .json()
            .unwrap();
        let data = uploaded["id"].as_str().unwrap().to_string();
        Deployment {
            db,
            artifacts,
            dir,
            model,
            data,
            api_a,
            api_b,
            workers,
        }
    }

    pub(super) fn job(&self, max_steps: u64, checkpoint_every: u64) -> Value {
        json!({
            "base_model": self.model, "dataset": {"url": self.data},
            "lora": {"r": 4, "dropout": 0.0}, "checkpoint_every_steps": checkpoint_every,
            "training": {"max_steps": max_steps, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64},
        })
    }

    /// The worker process running job `id` now (by the pid in the job's `worker` column).
    pub(super) fn worker_of(&self, id: &str) -> usize {
        let worker = postgres::query(
            &self.db,
            &format!("SELECT worker FROM jobs WHERE id = '{id}'"),
        );
        let pid: u32 = worker
            .split(':')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("job {id} has worker {worker:?}"));
        self.workers
            .iter()
            .position(|w| w.as_ref().is_some_and(|w| w.child.id() == pid))
            .unwrap_or_else(|| panic!("no worker of ours has pid {pid}"))
    }

    fn signal(&self, worker: usize, signal: &str) {
        let pid = self.workers[worker].as_ref().unwrap().child.id();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

/// A finished job's whole event history, read through `api`'s SSE route.
pub(super) fn history(api: &ServeProcess, id: &str) -> Vec<(i64, String, Value)> {
    let body = api
        .client
        .get(format!("{}/v1/jobs/{id}/events", api.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    parse_sse(&body)
}

/// The steps of a job's loss curve (its metrics rows with a training loss), in order.
pub(super) fn loss_curve_steps(api: &ServeProcess, id: &str) -> Vec<u64> {
    let metrics: Value = api
        .client
        .get(format!("{}/v1/jobs/{id}/metrics", api.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    metrics["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["train_loss"].is_number())
        .map(|r| r["step"].as_u64().unwrap())
        .collect()
}

/// The steps of the metrics events of attempt `attempt`: after the status event that starts it
/// (the one naming it; phase changes name none), up to the one that starts another attempt.
pub(super) fn steps_of_attempt(events: &[(i64, String, Value)], attempt: i64) -> Vec<u64> {
    let starts = |data: &Value| data["status"] == "running" && data["attempt"].is_i64();
    let start = events
        .iter()
        .position(|(_, kind, data)| kind == "status" && starts(data) && data["attempt"] == attempt)
        .unwrap_or_else(|| panic!("no running event of attempt {attempt}: {events:?}"));
    events[start + 1..]
        .iter()
        .take_while(|(_, kind, data)| !(kind == "status" && starts(data)))
        .filter(|(_, kind, _)| kind == "metrics")
        .map(|(_, _, d)| d["step"].as_u64().unwrap())
        .collect()
}

fn checkpoint_steps(api: &ServeProcess, id: &str) -> Vec<u64> {
    let list: Value = api
        .client
        .get(format!("{}/v1/jobs/{id}/checkpoints", api.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn two_workers_run_each_job_once_and_take_over_a_killed_workers_job_from_its_checkpoint() {
    let mut d = Deployment::start(2);
    let victim = d.api_a.submit(&d.job(300, 10));
    let small: Vec<String> = (0..5).map(|_| d.api_a.submit(&d.job(6, 3))).collect();

    // the victim's worker dies after a checkpoint was recorded
    let running = d.api_b.wait_job(&victim, Duration::from_secs(60), |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 25
    });
    let attempt_before = running["attempt"].as_i64().unwrap();
    let killed = d.worker_of(&victim);
    d.workers[killed].take().unwrap().kill();
    let recorded_at_kill = checkpoint_steps(&d.api_b, &victim);
    assert!(!recorded_at_kill.is_empty());

    // everything finishes; the survivor took the victim over once the lease (3 s) ran out
    let started = Instant::now();
    for id in small.iter().chain([&victim]) {
        let done = d.api_b.wait_job(id, Duration::from_secs(180), |j| {
            j["status"] != "queued" && j["status"] != "running"
        });
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    println!(
        "all six jobs done {:.1} s after the kill",
        started.elapsed().as_secs_f64()
    );

    for id in &small {
        let events = history(&d.api_b, id);
        let finals = events
            .iter()
            .filter(|(_, k, d)| k == "status" && d["status"] == "succeeded")
            .count();
        assert_eq!(finals, 1, "{id} succeeded once");
        // claimed once (a job the killed worker held would have a second attempt only if it was
        // taken over; its steps of the second attempt continue from a checkpoint either way)
        let job = d.api_a.job(id);
        let attempts = job["attempt"].as_i64().unwrap();
        for attempt in 1..=attempts {
            let steps = steps_of_attempt(&events, attempt);
            assert!(
                steps.windows(2).all(|w| w[1] == w[0] + 1),
                "{id} attempt {attempt}: {steps:?}"
            );
        }
    }

    let job = d.api_a.job(&victim);
    assert_eq!(job["attempt"], attempt_before + 1, "taken over once: {job}");
    assert_eq!(job["progress"]["step"], 300);
    let events = history(&d.api_b, &victim);
    let resumed = steps_of_attempt(&events, attempt_before + 1);
    let first = resumed[0];
    assert!(
        recorded_at_kill.contains(&(first - 1)),
        "resumed at step {first}, after a recorded checkpoint ({recorded_at_kill:?})"
    );
    assert_eq!(*resumed.last().unwrap(), 300);
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
    // the loss curve: every step once, no gap
    let curve = loss_curve_steps(&d.api_b, &victim);
    assert_eq!(curve, (1..=300).collect::<Vec<u64>>());

    // its adapter through the other replica: the digest recorded when it succeeded
    let response = d
        .api_b
        .client
        .get(format!(
            "{}/v1/jobs/{victim}/adapter?file=adapter_model.safetensors",
            d.api_b.base
        ))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let etag = response.headers()["etag"].to_str().unwrap().to_string();
    let bytes = response.bytes().unwrap();
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(etag.trim_matches('"'), sha);
    let recorded = postgres::query(
        &d.db,
        &format!("SELECT adapter_files FROM jobs WHERE id = '{victim}'"),
    );
    assert!(recorded.contains(&sha), "{recorded}");
    // a Range request through the other replica reads from the store
    let part = d
        .api_a
        .client
        .get(format!(
            "{}/v1/jobs/{victim}/adapter?file=adapter_model.safetensors",
            d.api_a.base
        ))
        .header("Range", "bytes=8-23")
        .send()
        .unwrap();
    let status = part.status();
    let got = part.bytes().unwrap();
    assert_eq!(status, 206, "{}", String::from_utf8_lossy(&got));
    assert_eq!(&got[..], &bytes[8..24]);
    assert!(d.artifacts.starts_with("s3://"));
    drop(d.dir);
}

#[test]
fn sse_and_cancel_through_another_replica_and_a_stale_worker_is_fenced() {
    let mut d = Deployment::start(2);

    // live events of a job submitted to A, followed on B; a cancel sent to B stops it
    let long = d.api_a.submit(&d.job(100_000, 1000));
    let stream = d
        .api_b
        .client
        .get(format!("{}/v1/jobs/{long}/events", d.api_b.base))
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let mut seen_metrics = 0;
    while seen_metrics < 3 {
        let line = lines.next().expect("the stream ended early").unwrap();
        if line == "event: metrics" {
            seen_metrics += 1;
        }
    }
    let cancelled_at = Instant::now();
    let r = d
        .api_b
        .client
        .post(format!("{}/v1/jobs/{long}/cancel", d.api_b.base))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let rest = rest.join("\n");
    assert!(
        rest.contains("\"status\":\"cancelled\""),
        "B's stream ends with the cancel: {rest}"
    );
    println!(
        "cancel through B reached the worker and came back on B's stream in {:.2} s",
        cancelled_at.elapsed().as_secs_f64()
    );
    assert_eq!(d.api_a.job(&long)["status"], "cancelled");

    // a worker stopped (SIGSTOP) past its lease: the other takes the job over; resumed
    // (SIGCONT), its writes are refused and it drops the job
    let job = d.api_a.submit(&d.job(400, 10));
    d.api_a.wait_job(&job, Duration::from_secs(60), |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 25
    });
    let attempt_before = d.api_a.job(&job)["attempt"].as_i64().unwrap();
    let stale = d.worker_of(&job);
    d.signal(stale, "STOP");
    d.api_a.wait_job(&job, Duration::from_secs(60), |j| {
        j["attempt"].as_i64().unwrap() > attempt_before
            && j["progress"]["step"].as_u64().unwrap_or(0) > 0
    });
    assert_ne!(d.worker_of(&job), stale);
    d.signal(stale, "CONT");
    let done = d.api_b.wait_job(&job, Duration::from_secs(120), |j| {
        j["status"] != "running" && j["status"] != "queued"
    });
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], attempt_before + 1);
    let events = history(&d.api_b, &job);
    // after the takeover only the new attempt's steps, in order: nothing of the stale one
    let second = steps_of_attempt(&events, attempt_before + 1);
    assert!(second.windows(2).all(|w| w[1] == w[0] + 1), "{second:?}");
    assert_eq!(*second.last().unwrap(), 400);
    let finals = events
        .iter()
        .filter(|(_, k, d)| k == "status" && d["status"] == "succeeded")
        .count();
    assert_eq!(finals, 1);
    // the stale worker lives on and takes new work
    assert!(d.workers[stale]
        .as_mut()
        .unwrap()
        .child
        .try_wait()
        .unwrap()
        .is_none());
    let next = d.api_a.submit(&d.job(4, 2));
    let done = d.api_a.wait_job(&next, Duration::from_secs(60), |j| {
        j["status"] == "succeeded"
    });
    assert_eq!(done["attempt"], 1);
}
