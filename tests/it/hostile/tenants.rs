//! Hostile tenants, round two: ways one client could starve the others that a probe of the
//! service found — idle sockets, huge JSON, trickled uploads, wrong keys from a shared address,
//! racing past quotas. Each through the real server; each failed on the code before its fix.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::app::spawn_app_with;

const KEY_A: &str = "tenant-a-0123456789";
const KEY_B: &str = "tenant-b-9876543210";

/// Whether the server closed `s` within `within` (a read gives end of file or an error).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // an answer (a 408) before the close
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_lock_out_health_checks_or_keyed_clients() {
    let app = spawn_app_with(|c| {
        c.max_connections = 32;
        c.header_timeout_secs = 2;
        c.api_keys = vec![KEY_A.into()];
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_string();
    // more sockets than the limit: most send nothing, some only HTTP/2's preface
    let mut idle = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        if i % 4 == 0 {
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
        }
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // health checks and a client with a key still get through, at once
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let health = client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let jobs = client
        .get(app.url("/v1/jobs"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(jobs.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    // the idle sockets are closed once the header timeout passes without a request
    let mut closed = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_secs(6)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        idle.len(),
        "every idle socket is closed by the server"
    );
    // and the server serves everyone again
    assert_eq!(app.get("/healthz").await.0, 200);
    app.shutdown().await;
}

/// POSTs a JSON body of `len` bytes (sent by a task of its own, which stops when the server
/// stops reading); the server's answer as text.
async fn post_body_of(base: &str, path: &str, len: usize) -> String {
    let addr = base.trim_start_matches("http://");
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = s.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    let sender = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        let mut body = vec![b' '; len];
        body[0] = b'{';
        write.write_all(&body).await?;
        std::io::Result::Ok(write)
    });
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), read.read(&mut answer))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    sender.abort();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_and_form_fields_are_capped_before_they_are_parsed() {
    let app = spawn_app_with(|_| {}).await;
    // a JSON body of 4 MiB: refused for its size, never read into a JSON document
    for path in ["/v1/jobs", "/v1/fine_tuning/jobs", "/v1/jobs/estimate"] {
        let answer = post_body_of(&app.base, path, 4 << 20).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains("body_too_large"), "{path}: {answer}");
    }
    // chat takes more (long conversations), and still has a bound
    let answer = post_body_of(&app.base, "/v1/chat/completions", 4 << 20).await;
    assert!(!answer.starts_with("HTTP/1.1 413"), "{answer}");
    let answer = post_body_of(&app.base, "/v1/chat/completions", 16 << 20).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // a multipart form whose small field is large: refused, naming it
    let form = reqwest::multipart::Form::new()
        .text("purpose", "x".repeat(1 << 20))
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"{}\n".to_vec()).file_name("a.jsonl"),
        );
    let r = app
        .client
        .post(app.url("/v1/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["param"], "purpose");
    // uploads keep their own (large) limit
    let big = vec![b'x'; 3 << 20];
    let r = app
        .client
        .post(app.url("/v1/files?filename=big.jsonl"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_from_a_shared_address_do_not_lock_out_valid_keys() {
    let app = spawn_app_with(|c| c.api_keys = vec![KEY_A.into(), KEY_B.into()]).await;
    // one tenant behind the shared address tries wrong keys until it is held back
    let mut last = 0;
    for i in 0..25 {
        let (status, _) = app
            .get_as(&format!("wrongkey-{i:04}-guess"), "/v1/jobs")
            .await;
        last = status;
    }
    assert_eq!(last, 429, "the guesser is held back");
    // the others at that address are not
    assert_eq!(app.get_as(KEY_A, "/v1/jobs").await.0, 200);
    assert_eq!(app.get_as(KEY_B, "/v1/jobs").await.0, 200);
    // a key that differs from the guesser's is told it is wrong, not held back
    assert_eq!(app.get_as("otherprefix-key", "/v1/jobs").await.0, 401);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_under_concurrent_requests() {
    let app = spawn_app_with(|c| {
        c.api_keys = vec![KEY_A.into(), KEY_B.into()];
        c.devices.clear(); // nothing starts: jobs stay queued
        c.max_queued_per_key = 3;
        c.max_stored_mib_per_key = 1;
        c.max_concurrent_uploads = 64;
    })
    .await;
    let submits = (0..30).map(|_| {
        app.client
            .post(app.url("/v1/jobs"))
            .bearer_auth(KEY_A)
            .json(&app.job(json!({})))
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(submits)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    let created = statuses.iter().filter(|s| **s == 201).count();
    assert_eq!(created, 3, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 429),
        "{statuses:?}"
    );
    // eight concurrent uploads of 300 KiB against 1 MiB: at most three are kept
    let uploads = (0..8).map(|_| {
        app.client
            .post(app.url("/v1/files?filename=part.jsonl"))
            .bearer_auth(KEY_A)
            .body(vec![b'x'; 300 << 10])
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(uploads)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    let kept = statuses.iter().filter(|s| **s == 201).count();
    assert!(kept <= 3, "{statuses:?}");
    let (_, files) = app.get_as(KEY_A, "/v1/files").await;
    let stored: u64 = files["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["bytes"].as_u64().unwrap())
        .sum();
    assert!(
        stored <= 1 << 20,
        "{stored} bytes stored past a 1 MiB quota"
    );
    // nothing of the refused uploads is left in the store (the local one: its files are on disk
    // here; the PostgreSQL pass stores them in S3, removed through the same call)
    if app.state.config.artifacts.is_none() {
        let on_disk = std::fs::read_dir(app.data_dir.join("files"))
            .unwrap()
            .count();
        assert_eq!(on_disk, kept, "{statuses:?}");
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_trickling_uploads_cannot_take_every_upload_slot() {
    let app = spawn_app_with(|c| {
        c.api_keys = vec![KEY_A.into(), KEY_B.into()];
        c.max_concurrent_uploads = 8;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_string();
    // tenant A starts eight uploads that trickle (announced 1 MiB, a few bytes sent)
    let mut trickles = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/files?filename=slow.jsonl HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY_A}\r\nContent-Length: 1048576\r\n\r\n{{\"a\""
        );
        s.write_all(head.as_bytes()).await.unwrap();
        trickles.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // tenant B's upload is taken
    let r = app
        .client
        .post(app.url("/v1/files?filename=b.jsonl"))
        .bearer_auth(KEY_B)
        .body(b"{\"messages\": []}\n".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // A's trickles beyond its share were answered 429 at once
    let mut refused = 0;
    for s in &mut trickles {
        let mut buf = vec![0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await
        {
            if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 429") {
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 6, "eight trickles, two slots per key");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_names_are_file_names_not_paths_or_headers() {
    let app = spawn_app_with(|_| {}).await;
    let long = "n".repeat(300);
    for name in [
        "../../etc/passwd",
        "a%0D%0AX-Injected:%201",
        "a%00b",
        long.as_str(),
        "dir/x.jsonl",
    ] {
        let r = app
            .client
            .post(app.url(&format!("/v1/files?filename={name}")))
            .body(b"{\"text\": \"a\"}\n".to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"]["param"], "filename", "{name}: {body}");
    }
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"{\"text\": \"a\"}\n".to_vec()).file_name("../up.jsonl"),
    );
    let r = app
        .client
        .post(app.url("/v1/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // nothing of the refused uploads was kept
    let (_, files) = app.get("/v1/files").await;
    assert_eq!(files["data"].as_array().unwrap().len(), 0, "{files}");
    // an ordinary name is kept as given
    let r = app
        .client
        .post(app.url("/v1/files?filename=train%20set%20(v2).jsonl"))
        .body(b"{\"text\": \"a\"}\n".to_vec())
        .send()
        .await
        .unwrap();
    let file: Value = r.json().await.unwrap();
    assert_eq!(file["filename"], "train set (v2).jsonl");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataset_paths_do_not_tell_what_exists_outside_the_allowed_dirs() {
    let app = spawn_app_with(|_| {}).await;
    let mut messages = Vec::new();
    for path in [
        "file:///etc/hostname",
        "file:///etc/no-such-file-here",
        "file:///nope/../etc/passwd",
    ] {
        let mut spec = app.job(json!({}));
        spec["dataset"]["url"] = json!(path);
        let (status, job) = app.post("/v1/jobs", &spec).await;
        assert_eq!(status, 201, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        let done = app
            .wait_status(&id, &["failed", "succeeded"], Duration::from_secs(60))
            .await;
        assert_eq!(done["status"], "failed", "{done}");
        let message = done["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("--allow-file-dirs"), "{path}: {message}");
        messages.push(message.replace(path, "URL"));
    }
    assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_keeps_its_last_three_checkpoints() {
    let app = spawn_app_with(|_| {}).await;
    let id = app
        .submit(&app.job(json!({"checkpoint_every_steps": 2, "training": {"max_steps": 20}})))
        .await;
    let done = app
        .wait_status(&id, &["failed", "succeeded"], Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, checkpoints) = app.get(&format!("/v1/jobs/{id}/checkpoints")).await;
    let mut steps: Vec<u64> = checkpoints["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    steps.sort();
    assert_eq!(steps, vec![16, 18, 20], "{checkpoints}");
    // a pruned checkpoint's files are gone too, not just its record
    let (status, _) = app
        .get(&format!("/v1/jobs/{id}/checkpoints/2/adapter_config.json"))
        .await;
    assert_eq!(status, 404);
    if app.state.config.artifacts.is_none() {
        let output = app.data_dir.join("jobs").join(&id).join("output");
        let mut dirs: Vec<String> = std::fs::read_dir(&output)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("checkpoint-"))
            .collect();
        dirs.sort();
        assert_eq!(dirs.len(), 3, "{dirs:?}");
    }
    app.shutdown().await;
}
