//! Crash recovery: `qtune serve` is killed with SIGKILL mid-training; started again on the same
//! data dir, it requeues the job and resumes it from its last checkpoint.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::app::parse_sse;
use crate::helpers::process::{free_port, ServeProcess};

#[test]
fn a_killed_server_resumes_the_job_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::helpers::tiny_model(dir.path());
    let data = crate::helpers::memorisable_chat(dir.path(), 8);
    let data_dir = dir.path().join("data");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();

    let server = ServeProcess::start(&data_dir, dir.path(), port, None);
    let body = json!({
        "base_model": model, "dataset": {"url": format!("file://{}", data.display())},
        "lora": {"r": 4, "dropout": 0.0}, "checkpoint_every_steps": 10,
        "training": {"max_steps": 300, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64},
    });
    let created: Value = client
        .post(format!("{base}/v1/jobs"))
        .json(&body)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let start_wait = Instant::now();
    loop {
        let j = server.job(&id);
        if j["progress"]["step"].as_i64().unwrap_or(0) >= 25 {
            break;
        }
        assert!(start_wait.elapsed() < Duration::from_secs(60), "{j}");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill(); // SIGKILL

    let server = ServeProcess::start(&data_dir, dir.path(), port, None);
    let start_wait = Instant::now();
    let done = loop {
        let j = server.job(&id);
        if j["status"] == "succeeded" || j["status"] == "failed" {
            break j;
        }
        assert!(start_wait.elapsed() < Duration::from_secs(120), "{j}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 2, "claimed once per server life");
    assert_eq!(done["progress"]["step"], 300);

    // the event log shows the second attempt starting right after a checkpoint, not at step 1
    let log = client
        .get(format!("{base}/v1/jobs/{id}/events"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let events: Vec<Value> = parse_sse(&log)
        .into_iter()
        .map(|(_, _, data)| data)
        .collect();
    let second = events
        .iter()
        .position(|e| e["attempt"] == 2)
        .expect("a second attempt");
    let resumed_at = events[second..]
        .iter()
        .find_map(|e| e["train_loss"].as_f64().and(e["step"].as_i64()))
        .unwrap();
    assert_eq!(
        (resumed_at - 1) % 10,
        0,
        "resumed right after a checkpoint: first step {resumed_at}"
    );
    assert!(
        resumed_at > 10,
        "resumed from a checkpoint, not from scratch: {resumed_at}"
    );
    // and the loss curve reads as one run: steps 1..=300, once each
    let metrics: Value = client
        .get(format!("{base}/v1/jobs/{id}/metrics"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let steps: Vec<i64> = metrics["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["train_loss"].is_null())
        .map(|r| r["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, (1..=300).collect::<Vec<i64>>());
    server.kill();
}

#[test]
fn sigterm_checkpoints_the_running_job_and_a_restart_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::helpers::tiny_model(dir.path());
    let data = crate::helpers::memorisable_chat(dir.path(), 8);
    let data_dir = dir.path().join("data");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();

    let mut server = ServeProcess::start(&data_dir, dir.path(), port, None);
    let body = json!({
        "base_model": model, "dataset": {"url": format!("file://{}", data.display())},
        "lora": {"r": 4, "dropout": 0.0},
        "training": {"max_steps": 3000, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64},
    });
    let created: Value = client
        .post(format!("{base}/v1/jobs"))
        .json(&body)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let start_wait = Instant::now();
    while server.job(&id)["progress"]["step"].as_i64().unwrap_or(0) < 15 {
        assert!(start_wait.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    let term = Command::new("sh") // the shell's own kill builtin: no procps needed
        .args(["-c", &format!("kill -TERM {}", server.child.id())])
        .status()
        .unwrap();
    assert!(term.success());
    let start_wait = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start_wait.elapsed() < Duration::from_secs(30),
            "server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    // the job was checkpointed where it stopped (no checkpoint_every_steps was asked for)
    let ckpts: Vec<_> = std::fs::read_dir(data_dir.join("jobs").join(&id).join("output"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse::<u64>()
                .ok()
        })
        .collect();
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    let stopped_at = ckpts[0];
    assert!((15..3000).contains(&stopped_at));

    let server = ServeProcess::start(&data_dir, dir.path(), port, None);
    let start_wait = Instant::now();
    let done = loop {
        let j = server.job(&id);
        if j["status"] != "queued" && j["status"] != "running" {
            break j;
        }
        assert!(start_wait.elapsed() < Duration::from_secs(120), "{j}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    // the raw event log: every step exactly once, nothing lost, nothing repeated
    let log = client
        .get(format!("{base}/v1/jobs/{id}/events"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(log.matches("event: metrics").count(), 3000);
    server.kill();
}

/// `qtune pause` stops a running job at a checkpoint and frees its worker; the job stays paused
/// across a restart of the server (no worker takes it); `qtune resume` queues it again and it
/// finishes from that checkpoint, its loss curve (with token accuracy) one run of steps 1..=N.
#[test]
fn a_paused_job_stays_paused_across_a_restart_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::helpers::tiny_model(dir.path());
    let data = crate::helpers::memorisable_chat(dir.path(), 8);
    let data_dir = dir.path().join("data");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();
    let cli = |verb: &str, id: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_qtune"))
            .args([verb, id, "--server", &base])
            .output()
            .unwrap();
        assert!(out.status.success(), "qtune {verb}: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    let server = ServeProcess::start(&data_dir, dir.path(), port, None);
    let steps = 600;
    let id = server.submit(&json!({
        "base_model": model, "dataset": {"url": format!("file://{}", data.display())},
        "lora": {"r": 4, "dropout": 0.0},
        "training": {"max_steps": steps, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64},
    }));
    server.wait_job(&id, Duration::from_secs(60), |j| {
        j["progress"]["step"].as_i64().unwrap_or(0) >= 3
    });
    let said = cli("pause", &id);
    assert!(said.contains("pause"), "{said}");
    let paused = server.wait_job(&id, Duration::from_secs(60), |j| j["status"] != "running");
    assert_eq!(paused["status"], "paused", "{paused}");
    let stopped_at = paused["progress"]["step"].as_i64().unwrap();
    assert!(stopped_at > 0 && stopped_at < steps, "{paused}");
    let checkpoints: Value = client
        .get(format!("{base}/v1/jobs/{id}/checkpoints"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(checkpoints["data"][0]["step"], stopped_at, "{checkpoints}");
    server.kill();

    let server = ServeProcess::start(&data_dir, dir.path(), port, None);
    std::thread::sleep(Duration::from_millis(1500));
    let still = server.job(&id);
    assert_eq!(
        still["status"], "paused",
        "a restart leaves it paused: {still}"
    );
    assert_eq!(still["attempt"], 1, "{still}");
    cli("resume", &id);
    let done = server.wait_job(&id, Duration::from_secs(120), |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    });
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
    let csv = client
        .get(format!("{base}/v1/jobs/{id}/metrics?format=csv"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (step, accuracy) = (col("step"), col("train_accuracy"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let seen: Vec<i64> = rows.iter().map(|r| r[step].parse().unwrap()).collect();
    assert_eq!(seen, (1..=steps).collect::<Vec<i64>>());
    for r in &rows {
        let a: f64 = r[accuracy].parse().unwrap();
        assert!((0.0..=1.0).contains(&a), "{r:?}");
    }
    // a job this small is memorised: the last steps predict most label tokens
    let last: f64 = rows.last().unwrap()[accuracy].parse().unwrap();
    assert!(last > 0.5, "token accuracy at the end: {last}");
    server.kill();
}
