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
    // pausing the waiting jobs does not make room: paused jobs wait too
    let (_, listed) = app.get_as(KEY_A, "/v1/jobs").await;
    for job in listed["data"].as_array().unwrap() {
        let id = job["id"].as_str().unwrap();
        let (status, paused) = app
            .post_as(KEY_A, &format!("/v1/jobs/{id}/pause"), &json!({}))
            .await;
        assert_eq!(status, 200, "{paused}");
    }
    let (status, e) = app.post_as(KEY_A, "/v1/jobs", &app.job(json!({}))).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (429, Some("quota_exceeded")),
        "{e}"
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

const MIB: usize = 1 << 20;

/// The largest upload the server takes now (found by trying, each kept one deleted again): what
/// is left of the caller's stored-bytes quota, seen from outside.
async fn room_left(app: &crate::helpers::app::TestApp) -> usize {
    let (mut fits, mut refused) = (0usize, MIB + 1);
    while refused - fits > 1 {
        let n = (fits + refused) / 2;
        let r = app
            .client
            .post(app.url("/v1/files?filename=probe.jsonl"))
            .body(vec![b'x'; n])
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            201 => {
                let id = r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let gone = app
                    .client
                    .delete(app.url(&format!("/v1/files/{id}")))
                    .send()
                    .await;
                assert_eq!(gone.unwrap().status(), 200);
                fits = n;
            }
            429 => refused = n,
            other => panic!("an upload of {n} bytes answered {other}"),
        }
    }
    fits
}

/// A job's checkpoints (every file, the optimizer state too) and its exports count in its
/// owner's stored bytes (uploads alone did): each takes its size from what the key may still
/// upload; at the quota, new jobs and exports are refused; deleting the job gives it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_exports_count_in_the_stored_bytes_quota() {
    let app = spawn_app_with(|c| c.max_stored_mib_per_key = 1).await;
    assert_eq!(room_left(&app).await, MIB);
    let id = app
        .submit(&app.job(json!({"checkpoint_every_steps": 1, "training": {"max_steps": 3}})))
        .await;
    let done = app
        .wait_status(&id, &["succeeded", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, listed) = app.get(&format!("/v1/jobs/{id}/checkpoints")).await;
    let listed_bytes: usize = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["files"].as_array().unwrap().clone())
        .map(|f| f["bytes"].as_u64().unwrap() as usize)
        .sum();
    assert!(listed_bytes > 0, "{listed}");
    let after_job = room_left(&app).await;
    // the downloadable files and the resume state beside them
    assert!(
        MIB - after_job > listed_bytes,
        "checkpoints take {} bytes of the quota; their adapters alone are {listed_bytes}",
        MIB - after_job
    );
    let (status, export) = app
        .post(
            &format!("/v1/jobs/{id}/exports"),
            &json!({"format": "gguf-lora"}),
        )
        .await;
    assert_eq!(status, 201, "{export}");
    let exported = export["bytes"].as_u64().unwrap() as usize;
    assert_eq!(
        after_job - room_left(&app).await,
        exported,
        "the export counts"
    );
    // a re-export replaces the first: counted once
    let (status, _) = app
        .post(
            &format!("/v1/jobs/{id}/exports"),
            &json!({"format": "gguf-lora"}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(after_job - room_left(&app).await, exported);
    // at the quota: no new job, no export
    let r = app
        .client
        .post(app.url("/v1/files?filename=fill.jsonl"))
        .body(vec![b'x'; after_job - exported])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "exactly the room left");
    let (status, e) = app.post("/v1/jobs", &app.job(json!({}))).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (429, Some("quota_exceeded")),
        "{e}"
    );
    let (status, e) = app
        .post(
            &format!("/v1/jobs/{id}/exports"),
            &json!({"format": "gguf-f32"}),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (429, Some("quota_exceeded")),
        "{e}"
    );
    // deleting the job gives its checkpoints' and exports' room back
    let r = app
        .client
        .delete(app.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(room_left(&app).await, MIB - (after_job - exported));
    app.shutdown().await;
}

/// Overwrites a stored file (in the store, and in the local working copy a remote store keeps).
async fn damage(app: &crate::helpers::app::TestApp, key: &qtune::artifacts::Key, bytes: Vec<u8>) {
    let stream = futures_util::stream::iter([Ok::<_, String>(bytes::Bytes::from(bytes.clone()))]);
    app.state
        .artifacts
        .put_stream(key, Box::pin(stream), u64::MAX)
        .await
        .unwrap();
    let local = app.state.artifacts.local_path(key);
    if local.exists() {
        std::fs::write(local, bytes).unwrap();
    }
}

async fn wait_as(app: &crate::helpers::app::TestApp, key: &str, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let (_, job) = app.get_as(key, &format!("/v1/jobs/{id}")).await;
        if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Exports are served only once recorded, under their recorded sha256 (a damaged one never
/// arrives whole, a truncated one is refused); a key makes one at a time, and concurrent
/// exports of one format do not write over each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_recorded_verified_and_one_per_key_at_a_time() {
    let app = spawn_app_with(|c| {
        c.api_keys = vec![KEY_A.into(), KEY_B.into()];
        c.max_concurrent_exports = 2;
    })
    .await;
    let mut ids = Vec::new();
    for key in [KEY_A, KEY_B] {
        let (status, job) = app
            .post_as(
                key,
                "/v1/jobs",
                &app.job(json!({"training": {"max_steps": 2}})),
            )
            .await;
        assert_eq!(status, 201, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for (key, id) in [KEY_A, KEY_B].iter().zip(&ids) {
        let done = wait_as(&app, key, id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let (a, b) = (&ids[0], &ids[1]);
    let export = |key: &'static str, id: String| {
        let req = app
            .client
            .post(app.url(&format!("/v1/jobs/{id}/exports")))
            .bearer_auth(key)
            .json(&json!({"format": "merged"}));
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // one key's concurrent exports: one at a time, the rest told to come back; the other key
    // is not held up by them
    let mut attempts: Vec<_> = (0..6).map(|_| export(KEY_A, a.clone())).collect();
    attempts.push(export(KEY_B, b.clone()));
    let answers = futures_util::future::join_all(attempts).await;
    let (b_status, b_made) = answers.last().unwrap().clone();
    assert_eq!(b_status, 201, "{b_made}");
    let a_answers = &answers[..6];
    let made: Vec<&Value> = a_answers
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, v)| v)
        .collect();
    assert!(!made.is_empty(), "{a_answers:?}");
    for (status, v) in a_answers.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(
            (*status, v["error"]["code"].as_str()),
            (429, Some("too_many_exports")),
            "{v}"
        );
    }
    assert!(
        a_answers.iter().any(|(s, _)| *s == 429),
        "six at once, one at a time: {a_answers:?}"
    );
    // the download is whole and is the newest export, under its recorded sha256
    let url = app.url(&format!("/v1/jobs/{a}/exports/merged"));
    let r = app
        .client
        .get(&url)
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    let body = r.bytes().await.unwrap();
    let sha = {
        use sha2::Digest;
        qtune_hex(&sha2::Sha256::digest(&body))
    };
    assert_eq!(sha, etag);
    assert!(
        made.iter().any(|m| m["sha256"] == etag.as_str()),
        "{made:?}"
    );
    // only one export's files are kept per format
    let job = qtune::job::JobId::parse(a).unwrap();
    let row = app
        .state
        .db
        .get_export(&job, "merged")
        .await
        .unwrap()
        .unwrap();
    if app.state.config.artifacts.is_none() {
        let kept: Vec<_> = std::fs::read_dir(app.data_dir.join("jobs").join(a).join("exports"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(kept, vec![row.export_id.clone()]);
    }
    // a flipped byte in the store: the download does not arrive whole
    let key = qtune::artifacts::Key::export(&job, &row.export_id, "merged.tar").unwrap();
    let mut bytes = body.to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    damage(&app, &key, bytes.clone()).await;
    let downloaded = match app.client.get(&url).bearer_auth(KEY_A).send().await {
        Ok(r) => r.bytes().await.ok(),
        Err(_) => None,
    };
    assert!(
        downloaded.is_none(),
        "a damaged export must not download cleanly"
    );
    // a truncated one (what a crash half-way through writing in place left) is refused
    damage(&app, &key, bytes[..1000].to_vec()).await;
    let (status, e) = app
        .get_as(KEY_A, &format!("/v1/jobs/{a}/exports/merged"))
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (500, Some("artifact_corrupt")),
        "{e}"
    );
    // not exported: nothing to serve
    let (status, _) = app
        .get_as(KEY_A, &format!("/v1/jobs/{a}/exports/gguf-lora"))
        .await;
    assert_eq!(status, 404);
    app.shutdown().await;
}

fn qtune_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An adapter whose stored file no longer matches its recorded digest is used by nothing:
/// chat, exports and a job continuing from it all refuse it, naming the file and not the
/// server's paths; an intact checkpoint of the same job still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_adapter_is_not_used_and_errors_name_no_server_path() {
    let app = spawn_app_with(|_| {}).await;
    let id = app
        .submit(&app.job(json!({"checkpoint_every_steps": 1, "training": {"max_steps": 2}})))
        .await;
    let done = app
        .wait_status(&id, &["succeeded", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let job = qtune::job::JobId::parse(&id).unwrap();
    let key = qtune::artifacts::Key::adapter_file(&job, "adapter_model.safetensors").unwrap();
    let local = app.state.artifacts.local_path(&key);
    let mut bytes = std::fs::read(&local).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    damage(&app, &key, bytes).await;
    let server_paths = [
        app.data_dir.display().to_string(),
        app.dir.path().display().to_string(),
    ];
    let names_no_path = |message: &str| {
        assert!(
            server_paths.iter().all(|p| !message.contains(p.as_str())),
            "a server path in {message:?}"
        );
    };
    let (status, e) = app
        .post(
            &format!("/v1/jobs/{id}/exports"),
            &json!({"format": "gguf-lora"}),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (500, Some("artifact_corrupt")),
        "{e}"
    );
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("adapter_model.safetensors"), "{message}");
    names_no_path(message);
    let ask = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "say 1"}], "max_tokens": 4, "temperature": 0});
    let (status, e) = app.post("/v1/chat/completions", &ask(&id)).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (500, Some("artifact_corrupt")),
        "{e}"
    );
    names_no_path(e["error"]["message"].as_str().unwrap());
    // a job continuing from it fails saying why; from the intact checkpoint 1 it trains
    let from_damaged = app
        .submit(&app.job(json!({"from_checkpoint": id, "training": {"max_steps": 1}})))
        .await;
    let failed = app
        .wait_status(
            &from_damaged,
            &["succeeded", "failed"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let message = failed["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("damaged"), "{failed}");
    names_no_path(message);
    let from_intact = app
        .submit(
            &app.job(json!({"from_checkpoint": format!("{id}:1"), "training": {"max_steps": 1}})),
        )
        .await;
    let ok = app
        .wait_status(
            &from_intact,
            &["succeeded", "failed"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    app.shutdown().await;
}

/// The leftovers of an upload cut off by a crash go while the server runs (as uploads begin),
/// not only at the next start; a live upload's file stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_uploads_are_swept_while_the_server_runs() {
    // the data dir's store (an S3 store streams uploads to the store: no local part files)
    let app = spawn_app_with(|c| c.artifacts = None).await;
    let files = app.data_dir.join("files");
    let stale = files.join("file-0123456789abcdef0123456789abcdef.part");
    let live = files.join("file-fedcba9876543210fedcba9876543210.part");
    std::fs::write(&stale, b"half an upload").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    std::fs::write(&live, b"an upload in progress").unwrap();
    // sweeps run at most every 10 seconds, as uploads begin
    tokio::time::sleep(Duration::from_secs(11)).await;
    let r = app
        .client
        .post(app.url("/v1/files?filename=d.jsonl"))
        .body("{}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let start = Instant::now();
    while stale.exists() && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!stale.exists());
    assert!(live.exists());
    app.shutdown().await;
}
