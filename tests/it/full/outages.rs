//! Outages of the parts qtune stands on, made on purpose while jobs run on a scaled-out
//! deployment (two API replicas, two workers, PostgreSQL, an S3 server): the database stopped
//! as in a crash for longer than the lease, with a worker killed meanwhile. Every job must
//! succeed exactly once with every step once in its history, live streams must carry on, and
//! requests made during the outage must be answered (503, Retry-After) rather than hang.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::scale::{history, loss_curve_steps, Deployment, Parts};
use crate::helpers::faults::{Fault, FaultProxy};
use crate::helpers::postgres;
use crate::helpers::process::ServeProcess;

/// Follows a job's SSE stream on its own thread; joined, it gives every event it read, in order.
fn follow(api: &ServeProcess, id: &str) -> std::thread::JoinHandle<Vec<(i64, String, Value)>> {
    let url = format!("{}/v1/jobs/{id}/events", api.base);
    std::thread::spawn(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap();
        let response = client.get(url).send().unwrap();
        assert_eq!(response.status(), 200);
        let mut text = String::new();
        for line in BufReader::new(response).lines() {
            text.push_str(&line.expect("the stream broke off"));
            text.push('\n');
        }
        crate::helpers::app::parse_sse(&text)
    })
}

/// A request during an outage: answered 503 with Retry-After, within seconds.
fn answered_unavailable(api: &ServeProcess, method: reqwest::Method, path: &str) -> f64 {
    let started = Instant::now();
    let mut request = api
        .client
        .request(method.clone(), format!("{}{path}", api.base))
        .timeout(Duration::from_secs(30));
    if method == reqwest::Method::POST {
        request = request.json(&serde_json::json!({}));
    }
    let response = request.send().unwrap();
    let took = started.elapsed().as_secs_f64();
    let status = response.status();
    let retry_after = response.headers().get("retry-after").cloned();
    let body = response.text().unwrap();
    assert_eq!(status, 503, "{method} {path} during the outage: {body}");
    assert!(retry_after.is_some(), "{method} {path}: no Retry-After");
    assert!(took < 10.0, "{method} {path} took {took:.1} s");
    took
}

/// Every job succeeded once, its loss curve has every step once, and its stored adapter is
/// the one the database recorded.
fn assert_each_ran_once(d: &Deployment, ids: &[String], steps: u64) {
    for id in ids {
        let job = d.api_b.wait_job(id, Duration::from_secs(300), |j| {
            j["status"] != "queued" && j["status"] != "running"
        });
        assert_eq!(job["status"], "succeeded", "{job}");
        let events = history(&d.api_b, id);
        let finals = events
            .iter()
            .filter(|(_, k, d)| k == "status" && d["status"] == "succeeded")
            .count();
        assert_eq!(finals, 1, "{id} succeeded exactly once");
        let curve = loss_curve_steps(&d.api_a, id);
        assert_eq!(curve, (1..=steps).collect::<Vec<u64>>(), "{id}");
        let bytes = d
            .api_a
            .client
            .get(format!(
                "{}/v1/jobs/{id}/adapter?file=adapter_model.safetensors",
                d.api_a.base
            ))
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let recorded = postgres::query(
            &d.db,
            &format!("SELECT adapter_files FROM jobs WHERE id = '{id}'"),
        );
        assert!(recorded.contains(&sha), "{id}: {recorded} vs {sha}");
    }
}

#[test]
fn jobs_come_through_a_database_crash_longer_than_the_lease_with_a_worker_killed_meanwhile() {
    const STEPS: u64 = 1200;
    let server = postgres::own_server();
    let parts = Parts {
        db: server.database(),
        artifacts: crate::helpers::s3_artifacts(),
        store_endpoint: None,
    };
    let mut d = Deployment::start_on(parts, 2);
    let ids: Vec<String> = (0..4).map(|_| d.api_a.submit(&d.job(STEPS, 100))).collect();
    // two running (one per worker), two queued
    let running: Vec<String> = {
        let started = Instant::now();
        loop {
            let now: Vec<String> = ids
                .iter()
                .filter(|id| d.api_a.job(id)["progress"]["step"].as_u64().unwrap_or(0) >= 15)
                .cloned()
                .collect();
            if now.len() == 2 {
                break now;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "{now:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // followed live through the replica the jobs were not submitted to
    let followers: Vec<_> = running.iter().map(|id| follow(&d.api_b, id)).collect();
    let victim = d.worker_of(&running[0]);
    std::thread::sleep(Duration::from_millis(500));

    let outage = Instant::now();
    server.stop_immediately();
    let mut waits = vec![
        answered_unavailable(
            &d.api_a,
            reqwest::Method::GET,
            &format!("/v1/jobs/{}", ids[0]),
        ),
        answered_unavailable(&d.api_b, reqwest::Method::GET, "/v1/jobs"),
        answered_unavailable(&d.api_b, reqwest::Method::GET, "/readyz"),
    ];
    let body = d.job(STEPS, 100);
    let started = Instant::now();
    let created = d
        .api_a
        .client
        .post(format!("{}/v1/jobs", d.api_a.base))
        .json(&body)
        .send()
        .unwrap();
    waits.push(started.elapsed().as_secs_f64());
    assert_eq!(created.status(), 503, "a submit during the outage");
    assert!(created.headers().contains_key("retry-after"));
    // a worker dies while the database is down: its job is taken over after it returns
    d.workers[victim].take().unwrap().kill();
    // longer than the 3-second lease, several times over
    let down_for = Duration::from_secs(12);
    std::thread::sleep(down_for.saturating_sub(outage.elapsed()));
    server.start_again();
    println!(
        "PostgreSQL down {:.1} s; requests meanwhile answered 503 in {waits:.2?} s",
        outage.elapsed().as_secs_f64()
    );

    assert_each_ran_once(&d, &ids, STEPS);
    for (id, follower) in running.iter().zip(followers) {
        let seen = follower.join().unwrap();
        let last = seen.last().unwrap();
        assert_eq!(
            last.2["status"], "succeeded",
            "{id}'s stream ends with its success"
        );
        let steps: Vec<u64> = seen
            .iter()
            .filter(|(_, k, _)| k == "metrics")
            .map(|(_, _, d)| d["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps.last(), Some(&STEPS), "{id}: {steps:?}");
        // ids only grow: nothing sent twice, nothing out of order
        assert!(seen.windows(2).all(|w| w[1].0 > w[0].0), "{id}");
    }
    // the replicas and the surviving worker are ready again without anyone's help
    for api in [&d.api_a, &d.api_b] {
        let r = api
            .client
            .get(format!("{}/readyz", api.base))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// Multipart uploads under `prefix` (of `s3://bucket/prefix`) that were started and neither
/// completed nor aborted: parts left behind.
fn open_multipart_uploads(artifacts: &str) -> Vec<String> {
    let (bucket, prefix) = artifacts
        .trim_start_matches("s3://")
        .split_once('/')
        .unwrap();
    let python = std::env::var("QTUNE_TEST_S3_PYTHON")
        .expect("QTUNE_TEST_S3_PYTHON: the S3 server's venv python (scripts/test.sh sets it)");
    let out = std::process::Command::new(python)
        .args(["-c", "import boto3, os, sys; r = boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL']).list_multipart_uploads(Bucket=sys.argv[1], Prefix=sys.argv[2]); print('\\n'.join(u['Key'] for u in r.get('Uploads', [])))"])
        .args([bucket, prefix])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn moto_address() -> std::net::SocketAddr {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("scripts/test.sh starts an S3 server");
    endpoint
        .trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|e| panic!("AWS_ENDPOINT_URL {endpoint}: {e}"))
}

#[test]
fn jobs_come_through_a_slow_then_frozen_then_stopped_store_and_a_broken_download_is_an_error() {
    const STEPS: u64 = 600;
    let proxy = FaultProxy::start(moto_address());
    let parts = Parts {
        db: postgres::database(),
        artifacts: crate::helpers::s3_artifacts(),
        store_endpoint: Some(proxy.url()),
    };
    let d = Deployment::start_on(parts.clone(), 2);

    // a download that loses the store mid-body ends in an error, not in a short file
    let big: Vec<u8> = (0..48u32 << 20).map(|i| (i % 251) as u8).collect();
    let file: Value = d
        .api_a
        .client
        .post(format!("{}/v1/files?filename=big.jsonl", d.api_a.base))
        .body(big.clone())
        .timeout(Duration::from_secs(120))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let file_id = file["id"].as_str().unwrap_or_else(|| panic!("{file}"));
    let mut download = d
        .api_b
        .client
        .get(format!("{}/v1/files/{file_id}/content", d.api_b.base))
        .timeout(Duration::from_secs(120))
        .send()
        .unwrap();
    assert_eq!(download.status(), 200);
    let mut first = vec![0u8; 1 << 20];
    std::io::Read::read_exact(&mut download, &mut first).unwrap();
    proxy.set(Fault::Refuse);
    let mut rest = Vec::new();
    let ended = std::io::Read::read_to_end(&mut download, &mut rest);
    assert!(
        ended.is_err(),
        "the download ended cleanly after {} of {} bytes",
        first.len() + rest.len(),
        big.len()
    );
    proxy.set(Fault::None);

    let ids: Vec<String> = (0..4).map(|_| d.api_a.submit(&d.job(STEPS, 100))).collect();
    d.api_a.wait_job(&ids[0], Duration::from_secs(120), |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 20
    });
    // slow (every request waits two seconds), then frozen, then gone, each past a minute
    // (but the slow spell)
    for (fault, spell) in [
        (Fault::Delay(Duration::from_secs(2)), 20),
        (Fault::Freeze, 65),
        (Fault::Refuse, 65),
    ] {
        proxy.set(fault);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(spell) {
            // the service answers meanwhile: what needs no store is served
            let r = d
                .api_b
                .client
                .get(format!("{}/v1/jobs/{}", d.api_b.base, ids[0]))
                .timeout(Duration::from_secs(10))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200, "{fault:?}");
            std::thread::sleep(Duration::from_secs(1));
        }
        let states: Vec<Value> = ids
            .iter()
            .map(|id| {
                let j = d.api_a.job(id);
                serde_json::json!([j["status"], j["progress"]["step"]])
            })
            .collect();
        println!("after {spell} s of {fault:?}: {states:?}");
    }
    proxy.set(Fault::None);

    assert_each_ran_once(&d, &ids, STEPS);
    // every aborted upload's parts are gone (the aborts are tried again until the store answers)
    let started = Instant::now();
    loop {
        let open = open_multipart_uploads(&parts.artifacts);
        if open.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "multipart uploads left open: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // the workers still take work
    let next = d.api_a.submit(&d.job(10, 5));
    let done = d.api_a.wait_job(&next, Duration::from_secs(60), |j| {
        j["status"] == "succeeded"
    });
    assert_eq!(done["attempt"], 1);
}

/// A size-limited tmpfs mounted for the test (needs root, as CI runs), unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: std::path::PathBuf, mib: u64) -> SmallDisk {
        std::fs::create_dir_all(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a {mib} MiB tmpfs as a worker's disk and needs root (CI runs as \
             root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { path }
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.flush();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[test]
fn a_full_disk_fails_the_job_that_filled_it_and_the_node_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::helpers::tiny_model(dir.path());
    let data = crate::helpers::memorisable_chat(dir.path(), 8);
    let disk = SmallDisk::mount(dir.path().join("disk"), 24);
    let port = crate::helpers::process::free_port();
    let listen = format!("127.0.0.1:{port}");
    let db = format!("sqlite://{}", dir.path().join("qtune.db").display());
    let server = ServeProcess::spawn(
        &["serve", "--devices", "cpu,cpu", "--listen", &listen],
        &disk.path.join("data"),
        dir.path(),
        port,
        &[("QTUNE_DATABASE", &db), ("QTUNE_MIN_FREE_DISK_MIB", "2")],
        None,
    );
    let job = |steps: u64, every: u64| {
        serde_json::json!({
            "base_model": model, "dataset": {"url": format!("file://{}", data.display())},
            "lora": {"r": 4, "dropout": 0.0}, "checkpoint_every_steps": every,
            "training": {"max_steps": steps, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64},
        })
    };
    // one job checkpoints often; the other writes nothing until its end
    let filling = server.submit(&job(100_000, 20));
    let quiet = server.submit(&job(4000, 100_000));
    for id in [&filling, &quiet] {
        server.wait_job(id, Duration::from_secs(60), |j| {
            j["progress"]["step"].as_u64().unwrap_or(0) >= 40
        });
    }
    let filler = disk.fill();

    let failed = server.wait_job(&filling, Duration::from_secs(60), |j| {
        j["status"] != "running"
    });
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "disk_full", "{failed}");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("checkpoint-") && message.contains("free"),
        "names the path and the space left: {message}"
    );
    // nothing half-written left behind
    let output = disk.path.join("data/jobs").join(&filling).join("output");
    let leftovers: Vec<String> = std::fs::read_dir(&output)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // the node says it is short of space: not ready, uploads refused with 507
    let ready = server
        .client
        .get(format!("{}/readyz", server.base))
        .send()
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().unwrap().contains("disk"));
    let upload = server
        .client
        .post(format!("{}/v1/files?filename=more.jsonl", server.base))
        .body(std::fs::read(&data).unwrap())
        .send()
        .unwrap();
    assert_eq!(upload.status(), 507);
    assert!(upload.headers().contains_key("retry-after"));
    // the other job trains on meanwhile
    assert_eq!(server.job(&quiet)["status"], "running");

    std::fs::remove_file(&filler).unwrap();
    let started = Instant::now();
    while server
        .client
        .get(format!("{}/readyz", server.base))
        .send()
        .unwrap()
        .status()
        != 200
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not ready again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = server.wait_job(&quiet, Duration::from_secs(300), |j| {
        j["status"] != "running"
    });
    assert_eq!(done["status"], "succeeded", "{done}");
    drop(server);
}
