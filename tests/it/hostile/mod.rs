//! Hostile tenants, huge inputs and a bad day on the host, each through the real server: every
//! hostile request gets its clear 4xx (or its job fails saying why) and the server stays healthy.

mod tenants;

use std::io::{Read, Write};
use std::time::Duration;

use qtune::app::App;
use qtune::config::ServeConfig;
use qtune::job::JobId;
use serde_json::{json, Value};

use crate::helpers::app::{spawn_app, spawn_app_with};
use crate::helpers::process::{free_port, ServeProcess};
use crate::helpers::{memorisable_chat, tiny_model};

/// Peak resident memory of a process, in MiB (Linux `VmHWM`).
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

#[test]
fn one_huge_record_fails_its_job_by_line_and_the_server_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let server = ServeProcess::start(&dir.path().join("data"), dir.path(), free_port(), None);
    // one 50 MB chat record, then a normal one
    let huge = json!({"messages": [
        {"role": "user", "content": "x".repeat(50 * 1024 * 1024)},
        {"role": "assistant", "content": "ok"},
    ]});
    let body = format!(
        "{huge}\n{}\n",
        json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    );
    let file: Value = server
        .client
        .post(format!("{}/v1/files?filename=huge.jsonl", server.base))
        .body(body)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = server.submit(&json!({
        "base_model": model, "dataset": {"url": file["id"]},
        "lora": {"r": 4}, "training": {"max_steps": 2, "max_seq_len": 64},
    }));
    let done = server.wait_job(&id, Duration::from_secs(120), |j| {
        j["status"] != "queued" && j["status"] != "running"
    });
    let peak = peak_rss_mib(server.child.id());
    println!("peak RSS of the server after a 50 MB record: {peak:.0} MiB");
    assert_eq!(done["status"], "failed", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("line 1") && message.contains("over 1048576 bytes"),
        "{message}"
    );
    assert!(!message.contains("xxxx"), "the record is not quoted");
    assert!(peak < 400.0, "peak RSS {peak:.0} MiB");
    // and the server goes on serving and training
    let data = memorisable_chat(dir.path(), 8);
    let ok = server.submit(&json!({
        "base_model": model, "dataset": {"url": format!("file://{}", data.display())},
        "lora": {"r": 4}, "training": {"max_steps": 2, "max_seq_len": 64},
    }));
    let done = server.wait_job(&ok, Duration::from_secs(120), |j| {
        j["status"] != "queued" && j["status"] != "running"
    });
    assert_eq!(done["status"], "succeeded", "{done}");
    server.kill();
}

/// Chat bodies are parsed straight into the request's fields: eight concurrent 7 MiB bodies
/// whose bulk is a field the server does not read (millions of tiny JSON values, a tree of
/// them many times the body's size) cost the server about their own size, and each is answered.
#[test]
fn chat_bodies_cost_their_size_not_a_tree_of_values() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let server = ServeProcess::start(&dir.path().join("data"), dir.path(), free_port(), None);
    let before = peak_rss_mib(server.child.id());
    let junk = vec!["0"; 3_500_000].join(",");
    let body = format!(
        r#"{{"model": {:?}, "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 1, "metadata_of_mine": [{junk}]}}"#,
        model.to_str().unwrap()
    );
    assert!(body.len() > 6 << 20);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let sent: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    server
                        .client
                        .post(format!("{}/v1/chat/completions", server.base))
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        sent.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let peak = peak_rss_mib(server.child.id());
    println!("peak RSS: {before:.0} MiB before, {peak:.0} MiB after eight 7 MiB chat bodies");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // the bodies themselves (8 x 7 MiB, perhaps twice while read) and a model: a tree of
    // 3.5 million values per body would be over 100 MiB each
    assert!(
        peak - before < 300.0,
        "peak RSS grew by {:.0} MiB",
        peak - before
    );
    server.kill();
}

/// Current resident memory of a process, in MiB (Linux `VmRSS`).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

#[test]
fn six_concurrent_large_uploads_do_not_gather_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProcess::start(&dir.path().join("data"), dir.path(), free_port(), None);
    let before = peak_rss_mib(server.child.id());
    let uploads: Vec<_> = (0..6)
        .map(|i| {
            let url = format!("{}/v1/files?filename=big-{i}.jsonl", server.base);
            std::thread::spawn(move || {
                let line = format!("{}\n", json!({"text": "y".repeat(1000)}));
                let body = line.repeat(60 * 1024 * 1024 / line.len());
                reqwest::blocking::Client::new()
                    .post(url)
                    .body(body)
                    .send()
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for u in uploads {
        assert_eq!(u.join().unwrap(), 201);
    }
    let peak = peak_rss_mib(server.child.id());
    println!("peak RSS of the server: {before:.0} MiB before, {peak:.0} MiB after six 60 MB uploads at once");
    assert!(
        peak < 150.0,
        "uploads are streamed to disk, not held: peak {peak:.0} MiB"
    );
    server.kill();
}

#[test]
fn memory_a_job_used_is_handed_back_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // records just under the 1 MiB cap: tokenizing each takes a few hundred MB for a moment
    let record = json!({"messages": [
        {"role": "user", "content": "z ".repeat(450 * 1024)},
        {"role": "assistant", "content": "ok"},
    ]});
    let data = dir.path().join("long.jsonl");
    std::fs::write(&data, format!("{record}\n").repeat(3)).unwrap();
    let server = ServeProcess::start(&dir.path().join("data"), dir.path(), free_port(), None);
    let id = server.submit(&json!({
        "base_model": model, "dataset": {"url": format!("file://{}", data.display())},
        "lora": {"r": 4}, "training": {"max_steps": 1, "max_seq_len": 64, "train_on_inputs": true},
    }));
    let done = server.wait_job(&id, Duration::from_secs(120), |j| {
        j["status"] != "queued" && j["status"] != "running"
    });
    assert_eq!(done["status"], "succeeded", "{done}");
    std::thread::sleep(Duration::from_millis(300));
    let (peak, now) = (peak_rss_mib(server.child.id()), rss_mib(server.child.id()));
    println!("server RSS: peak {peak:.0} MiB during the job, {now:.0} MiB after it");
    assert!(peak > 100.0, "the job did use memory (peak {peak:.0} MiB)");
    assert!(
        now < peak / 2.0,
        "most of it was handed back: {now:.0} of {peak:.0} MiB still held"
    );
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataset_urls_cannot_reach_internal_addresses() {
    use axum::routing::get;
    // an "internal" service the server must not reach, and one the operator allowed
    let secret = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let secret_port = secret.local_addr().unwrap().port();
    tokio::spawn(async move {
        let router =
            axum::Router::new().route("/secret", get(|| async { "{\"text\": \"TOP SECRET\"}\n" }));
        axum::serve(secret, router).await.unwrap()
    });
    let allowed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    tokio::spawn(async move {
        let to_secret = format!("http://127.0.0.1:{secret_port}/secret");
        let to_localhost = format!("http://localhost:{secret_port}/secret");
        let router = axum::Router::new()
            .route(
                "/hop",
                get(move || async move { axum::response::Redirect::temporary(&to_secret) }),
            )
            .route(
                "/hop-by-name",
                get(move || async move { axum::response::Redirect::temporary(&to_localhost) }),
            )
            .route(
                "/credentials",
                get(|| async {
                    "{\"AccessKeyId\": \"AKIA1\", \"SecretAccessKey\": \"s3cr3t\", \"Token\": \"t\"}\n"
                }),
            );
        axum::serve(allowed, router).await.unwrap()
    });
    let app = spawn_app_with(|c| c.fetch_allow = vec![format!("127.0.0.1:{allowed_port}")]).await;

    // refused at submission: every internal spelling, credentials in the URL
    for url in [
        format!("http://127.0.0.1:{secret_port}/secret"),
        format!("http://localhost:{secret_port}/secret"),
        format!("http://0x7f000001:{secret_port}/secret"),
        format!("http://2130706433:{secret_port}/secret"),
        format!("http://[::1]:{secret_port}/secret"),
        format!("http://[::ffff:127.0.0.1]:{secret_port}/secret"),
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/".to_string(),
        "http://10.0.0.1/data.jsonl".to_string(),
        "http://user:pass@example.com/data.jsonl".to_string(),
    ] {
        let (status, e) = app
            .post("/v1/jobs", &app.job(json!({"dataset": {"url": url}})))
            .await;
        assert_eq!(status, 422, "{url}: {e}");
        assert_eq!(e["error"]["param"], "dataset.url", "{url}: {e}");
    }
    // an allowed host that redirects inward: refused at the redirect, nothing fetched
    for path in ["/hop", "/hop-by-name"] {
        let id =
            app.submit(&app.job(
                json!({"dataset": {"url": format!("http://127.0.0.1:{allowed_port}{path}")}}),
            ))
            .await;
        let job = app
            .wait_status(&id, &["failed"], Duration::from_secs(60))
            .await;
        let message = job["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("not a public address"),
            "{path}: {message}"
        );
        assert!(!message.contains("SECRET"), "{message}");
    }
    // fetched bytes are never echoed, even when the job fails on them
    let id = app
        .submit(&app.job(
            json!({"dataset": {"url": format!("http://127.0.0.1:{allowed_port}/credentials")}}),
        ))
        .await;
    let job = app
        .wait_status(&id, &["failed"], Duration::from_secs(60))
        .await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("line 1"), "{message}");
    for leaked in ["AccessKeyId", "SecretAccessKey", "s3cr3t", "AKIA1"] {
        assert!(!message.contains(leaked), "{message}");
    }
    assert_eq!(app.get("/readyz").await.0, 200);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_cannot_write_across_origins_or_through_other_host_names() {
    let app = spawn_app().await;
    let body = app.job(json!({"training": {"max_steps": 1}}));
    let post = |content_type: &'static str, extra: Vec<(&'static str, String)>| {
        let mut req = app
            .client
            .post(app.url("/v1/jobs"))
            .header("content-type", content_type)
            .body(body.to_string());
        for (k, v) in extra {
            req = req.header(k, v);
        }
        req.send()
    };
    // a form on a foreign page can send text/plain without asking: refused
    let r = post("text/plain", vec![]).await.unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "unsupported_media_type"
    );
    let r = post(
        "application/json",
        vec![("origin", "http://evil.example".into())],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = post(
        "application/json",
        vec![("sec-fetch-site", "cross-site".into())],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    // DNS rebinding: the page's own name pointed at 127.0.0.1
    let port = app.base.rsplit(':').next().unwrap().to_string();
    let r = post(
        "application/json",
        vec![("host", format!("evil.example:{port}"))],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 421);
    let r = app
        .client
        .get(app.url("/v1/jobs"))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    // the same request from the dashboard's own origin is fine
    let origin = app.base.clone();
    let r = post("application/json; charset=utf-8", vec![("origin", origin)])
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // headers on the dashboard and on every response
    let r = app.client.get(app.url("/")).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    let r = app.client.get(app.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_data_dir_does_not_start_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut keyed = ServeConfig::for_data_dir(data_dir.clone());
    keyed.api_keys = vec!["k1".into()];
    keyed.devices.clear();
    let app = App::build(keyed).await.unwrap();
    let state = app.state();
    state
        .db
        .insert_job(&JobId::new(), Some("owner-of-k1"), &tiny_spec(), None)
        .await
        .unwrap();
    drop(app);
    drop(state);

    let mut keyless = ServeConfig::for_data_dir(data_dir.clone());
    keyless.devices.clear();
    let err = App::build(keyless.clone()).await.err().expect("refused");
    assert!(err.to_string().contains("QTUNE_API_KEYS"), "{err}");
    keyless.allow_keyless = true;
    assert!(App::build(keyless).await.is_ok(), "the operator may insist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_jobs_are_refused_and_the_operators_limits_hold() {
    let app = spawn_app_with(|c| {
        c.max_job_steps = 10_000;
        c.max_job_hours = 0.5 / 3600.0;
    })
    .await;
    for (extra, param) in [
        (
            json!({"training": {"max_steps": 1_000_000_000_000i64}}),
            "training.max_steps",
        ),
        (
            json!({"training": {"batch_size": 100_000_000}}),
            "training.batch_size",
        ),
        (
            json!({"training": {"gradient_accumulation_steps": 1_000_000_000}}),
            "training.gradient_accumulation_steps",
        ),
        (
            json!({"training": {"epochs": 1_000_000_000}}),
            "training.epochs",
        ),
        (json!({"lora": {"alpha": 1e308}}), "lora.alpha"),
        // long, and under the 1 MiB a JSON body may hold (past it: 413 before parsing)
        (json!({"suffix": "s".repeat(1 << 16)}), "suffix"),
        (json!({"base_model": "m".repeat(1 << 16)}), "base_model"),
    ] {
        let (status, e) = app.post("/v1/jobs", &app.job(extra.clone())).await;
        assert_eq!(status, 422, "{extra}: {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    // over the operator's step limit: the job fails before training, saying so
    // (8 examples in batches of 4: 2 steps an epoch, 20,000 steps in all)
    let id = app
        .submit(&app.job(json!({"training": {"epochs": 10_000}})))
        .await;
    let job = app
        .wait_status(&id, &["failed"], Duration::from_secs(60))
        .await;
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 10000"),
        "{job}"
    );
    // past the time limit (half a second; 8,000 steps take over ten): stopped, checkpointed,
    // failed with its own code
    let id = app
        .submit(&app.job(json!({"training": {"max_steps": 8000, "batch_size": 1}})))
        .await;
    let job = app
        .wait_status(&id, &["failed", "succeeded"], Duration::from_secs(60))
        .await;
    assert_eq!(job["error"]["code"], "time_limit_exceeded", "{job}");
    let (_, checkpoints) = app.get(&format!("/v1/jobs/{id}/checkpoints")).await;
    assert_eq!(
        checkpoints["data"].as_array().unwrap().len(),
        1,
        "{checkpoints}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_take_turns_at_the_queue() {
    use crate::helpers::LEASE_SECS;
    let app = spawn_app_with(|c| c.devices.clear()).await;
    let db = &app.state.db;
    let spec = &tiny_spec();
    let mut a_jobs = Vec::new();
    for _ in 0..3 {
        let id = JobId::new();
        db.insert_job(&id, Some("tenant-a"), spec, None)
            .await
            .unwrap();
        a_jobs.push(id);
    }
    let b_job = JobId::new();
    db.insert_job(&b_job, Some("tenant-b"), spec, None)
        .await
        .unwrap();
    let first = db
        .claim_next("w1", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.lease.job, a_jobs[0], "the oldest job first");
    let second = db
        .claim_next("w2", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        second.lease.job, b_job,
        "tenant b's only job before tenant a's second, though it came later"
    );
    let third = db
        .claim_next("w3", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.lease.job, a_jobs[1]);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_stream_to_disk_and_oversized_ones_are_refused_before_reading() {
    // the local directory, whatever the run's backend: what is on disk is under test
    let app = spawn_app_with(|c| {
        c.max_upload_mib = 1;
        c.artifacts = None;
    })
    .await;
    // announced as 1 GB: answered 413 before a byte of the body is sent
    let addr = app.base.trim_start_matches("http://").to_string();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1000000000\r\n\r\n"
        )
        .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    // over the limit without announcing it: refused, and nothing is left on disk. The server
    // answers while the client is still sending and closes: a reset seen by the client before
    // it reads the answer is not an answer, so it tries again.
    let mut answered = None;
    for _ in 0..5 {
        let sent = reqwest::Client::new()
            .post(app.url("/v1/files"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                (0..20).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 100 * 1024])),
            )))
            .send()
            .await;
        if let Ok(r) = sent {
            answered = Some(r);
            break;
        }
    }
    assert_eq!(answered.expect("an answer").status(), 413);
    let files: Vec<_> = std::fs::read_dir(app.data_dir.join("files"))
        .unwrap()
        .collect();
    assert!(files.is_empty(), "{files:?}");
    // within the limit: stored with its sha256 (on a new connection: the server closed the one
    // it refused mid-body, and a pooled client could try to reuse it)
    let data = std::fs::read(memorisable_chat(app.dir.path(), 8)).unwrap();
    let r = reqwest::Client::new()
        .post(app.url("/v1/files?filename=chat.jsonl"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let file: Value = r.json().await.unwrap();
    use sha2::Digest;
    let expected: String = sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(file["sha256"], expected.as_str());
    assert_eq!(file["bytes"], data.len());
    app.shutdown().await;
}

#[tokio::test]
async fn an_upload_cut_off_by_a_crash_is_removed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(data_dir.join("files")).unwrap();
    let part = data_dir.join("files/file-0123456789abcdef0123456789abcdef.part");
    std::fs::write(&part, b"half an upload").unwrap();
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(&part)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    // another process sharing the directory is writing this one now
    let live = data_dir.join("files/file-fedcba9876543210fedcba9876543210.part");
    std::fs::write(&live, b"an upload in progress").unwrap();
    let mut config = ServeConfig::for_data_dir(data_dir);
    config.devices.clear();
    let _app = App::build(config).await.unwrap();
    assert!(!part.exists());
    assert!(live.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_are_served_under_their_recorded_digest_and_corruption_is_caught() {
    let app = spawn_app().await;
    let id = app
        .submit(&app.job(json!({"training": {"max_steps": 2}})))
        .await;
    app.wait_status(&id, &["succeeded"], Duration::from_secs(60))
        .await;
    let row = app
        .state
        .db
        .get_job(&JobId::parse(&id).unwrap(), None)
        .await
        .unwrap()
        .unwrap();
    let recorded = row.adapter_files.unwrap();
    let tar_digest = recorded.iter().find(|d| d.name == "adapter.tar").unwrap();
    let url = app.url(&format!("/v1/jobs/{id}/adapter"));
    let r = app.client.get(&url).send().await.unwrap();
    assert_eq!(
        r.headers()["etag"].to_str().unwrap(),
        format!("\"{}\"", tar_digest.sha256)
    );
    let whole = r.bytes().await.unwrap();
    // a range
    let r = app
        .client
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!("bytes 10-19/{}", whole.len())
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &whole[10..20]);
    let r = app
        .client
        .get(&url)
        .header("range", format!("bytes={}-", whole.len() + 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    // a flipped byte in the store (a directory or S3): the download does not arrive whole
    let key = qtune::artifacts::Key::adapter_tar(&JobId::parse(&id).unwrap());
    let overwrite = |bytes: Vec<u8>| {
        let stream = futures_util::stream::iter([Ok::<_, String>(bytes::Bytes::from(bytes))]);
        app.state
            .artifacts
            .put_stream(&key, Box::pin(stream), u64::MAX)
    };
    let mut bytes = whole.to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    overwrite(bytes.clone()).await.unwrap();
    // (the server may break off before or after the headers go out: either way no whole body)
    let downloaded = match reqwest::Client::new().get(&url).send().await {
        Ok(r) => r.bytes().await.ok(),
        Err(_) => None,
    };
    assert!(
        downloaded.is_none(),
        "a corrupted file must not download cleanly"
    );
    // a truncated one is refused before anything is sent
    overwrite(bytes[..100].to_vec()).await.unwrap();
    let (status, e) = app.get(&format!("/v1/jobs/{id}/adapter")).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (500, Some("artifact_corrupt"))
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_wrecks_the_model_fails_instead_of_succeeding() {
    let app = spawn_app().await;
    let id = app
        .submit(
            &app.job(
                json!({"training": {"max_steps": 30, "learning_rate": 1e6, "max_grad_norm": 0}}),
            ),
        )
        .await;
    let job = app
        .wait_status(&id, &["failed", "succeeded"], Duration::from_secs(60))
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "diverged", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("learning_rate"), "{message}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_ones_authentication_errors_and_checkpoint_references() {
    let app = spawn_app_with(|c| c.api_keys = vec!["k-one".into()]).await;
    // any case of the scheme; 401 says how to authenticate
    let r = app
        .client
        .get(app.url("/v1/jobs"))
        .header("authorization", "bEaReR k-one")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app.client.get(app.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    // every error in the JSON shape: a method not allowed, a bad path parameter
    let r = app
        .client
        .delete(app.url("/v1/jobs"))
        .bearer_auth("k-one")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );
    let id = JobId::new();
    let r = app
        .client
        .get(app.url(&format!(
            "/v1/jobs/{id}/checkpoints/not-a-step/adapter_config.json"
        )))
        .bearer_auth("k-one")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    // wrong keys, again and again: answered 429 with Retry-After after a while
    let mut limited = None;
    for _ in 0..40 {
        let r = app
            .client
            .get(app.url("/v1/jobs"))
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 401);
    }
    let limited = limited.expect("rate-limited");
    assert!(limited.headers().contains_key("retry-after"));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_models_only_from_allowed_folders_and_well_formed_repo_ids() {
    let app = spawn_app().await;
    // a real model, outside the allowed folder
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = tiny_model(elsewhere.path());
    let mut answers = Vec::new();
    for base in [
        outside.to_str().unwrap().to_string(),
        "/etc".to_string(),
        "/nonexistent/model.gguf".to_string(),
        format!("{}/../../etc", app.dir.path().display()),
        "../secrets".to_string(),
        "owner/..".to_string(),
        "owner/name%2F..".to_string(),
        // well formed, but the Hub is closed unless the operator lists repos (--allow-hub)
        "HuggingFaceTB/SmolLM2-135M-Instruct".to_string(),
    ] {
        let (status, e) = app
            .post("/v1/jobs", &app.job(json!({"base_model": base})))
            .await;
        assert_eq!(status, 422, "{base}: {e}");
        assert_eq!(e["error"]["param"], "base_model", "{e}");
        answers.push(e["error"]["message"].as_str().unwrap().to_string());
    }
    // one answer for missing and forbidden alike: nothing tells what exists
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    let (status, e) = app
        .post(
            "/v1/jobs",
            &app.job(json!({"revision": "../../../etc/passwd"})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (422, Some("revision"))
    );
    // the allowed folder works
    let id = app
        .submit(&app.job(json!({"training": {"max_steps": 1}})))
        .await;
    app.wait_status(&id, &["succeeded"], Duration::from_secs(60))
        .await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_list_and_delete_their_own_files_and_jobs() {
    let app = spawn_app_with(|c| c.api_keys = vec!["k-a".into(), "k-b".into()]).await;
    let send = |method: reqwest::Method, path: String, key: &'static str| {
        app.client
            .request(method, app.url(&path))
            .bearer_auth(key)
            .send()
    };
    let data = std::fs::read(memorisable_chat(app.dir.path(), 8)).unwrap();
    let file: Value = app
        .client
        .post(app.url("/v1/files?filename=chat.jsonl"))
        .bearer_auth("k-a")
        .body(data)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file_id = file["id"].as_str().unwrap().to_string();
    let listed: Value = send(reqwest::Method::GET, "/v1/files".into(), "k-a")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"][0]["id"], file_id.as_str());
    let theirs: Value = send(reqwest::Method::GET, "/v1/files".into(), "k-b")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        theirs["data"].as_array().unwrap().len(),
        0,
        "b sees none of a's files"
    );
    // a job on the upload
    let mut body = app.job(json!({"training": {"max_steps": 2}}));
    body["dataset"]["url"] = json!(file_id);
    let (_, job) = app.post_as("k-a", "/v1/jobs", &body).await;
    let id = job["id"].as_str().unwrap().to_string();
    crate::helpers::eventually(
        Duration::from_secs(60),
        "the job on the upload succeeded",
        || async {
            let (_, j) = app.get_as("k-a", &format!("/v1/jobs/{id}")).await;
            match j["status"] == "succeeded" {
                true => Ok(()),
                false => Err(j.to_string()),
            }
        },
    )
    .await;
    // another key can delete neither
    let r = send(reqwest::Method::DELETE, format!("/v1/jobs/{id}"), "k-b")
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = send(
        reqwest::Method::DELETE,
        format!("/v1/files/{file_id}"),
        "k-b",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    // the owner deletes both, and their files leave the disk
    let job_dir = app.data_dir.join("jobs").join(&id);
    assert!(job_dir.exists());
    let r = send(reqwest::Method::DELETE, format!("/v1/jobs/{id}"), "k-a")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!job_dir.exists());
    let r = send(reqwest::Method::GET, format!("/v1/jobs/{id}"), "k-a")
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = send(
        reqwest::Method::DELETE,
        format!("/v1/files/{file_id}"),
        "k-a",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!app.data_dir.join("files").join(&file_id).exists());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_and_idle_connections_make_room_at_the_cap() {
    let app = spawn_app_with(|c| {
        c.max_connections = 20;
        c.header_timeout_secs = 1;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_string();
    // twenty connections that send half a request line and then nothing
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /healthz HTTP/1.1\r\nHo")
            .await
            .unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // at the cap: one more connection gets in, in place of the idlest slow one, and is answered
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut extra, request.as_bytes())
        .await
        .ok();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut extra, &mut buf),
    )
    .await
    .expect("answered, not held")
    .unwrap_or(0);
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // the slow ones are cut off after the header timeout
    for s in &mut slow {
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(s, &mut buf),
        )
        .await
        .expect("the server closes a connection that stalls in its headers");
        // hyper may answer 408 before closing, or just close
        if let Ok(n) = n {
            assert!(
                n == 0 || buf.starts_with(b"HTTP/1.1 408"),
                "{:?}",
                &buf[..n]
            );
        }
    }
    drop(slow);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // their slots are free again
    assert_eq!(app.get("/healthz").await.0, 200);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_quotas_answer_429_with_retry_after() {
    let app = spawn_app_with(|c| {
        c.api_keys = vec!["k-a".into(), "k-b".into()];
        c.devices.clear(); // nothing starts: jobs stay queued
        c.max_queued_per_key = 2;
        c.max_stored_mib_per_key = 1;
    })
    .await;
    let submit = |key: &'static str| {
        app.client
            .post(app.url("/v1/jobs"))
            .bearer_auth(key)
            .json(&app.job(json!({})))
            .send()
    };
    assert_eq!(submit("k-a").await.unwrap().status(), 201);
    assert_eq!(submit("k-a").await.unwrap().status(), 201);
    let r = submit("k-a").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "quota_exceeded"
    );
    // another key is not held back by it
    assert_eq!(submit("k-b").await.unwrap().status(), 201);
    // storage: 1 MiB per key
    let upload = |key: &'static str, bytes: usize| {
        app.client
            .post(app.url("/v1/files"))
            .bearer_auth(key)
            .body(vec![b'x'; bytes])
            .send()
    };
    assert_eq!(upload("k-a", 700 * 1024).await.unwrap().status(), 201);
    let r = upload("k-a", 700 * 1024).await.unwrap();
    assert_eq!(r.status(), 429, "past the key's storage");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(upload("k-b", 700 * 1024).await.unwrap().status(), 201);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_cannot_hold_every_worker() {
    use crate::helpers::LEASE_SECS;
    let app = spawn_app_with(|c| {
        c.devices.clear();
        c.max_running_per_key = 1;
    })
    .await;
    let db = &app.state.db;
    let spec = &tiny_spec();
    for _ in 0..3 {
        db.insert_job(&JobId::new(), Some("a"), spec, None)
            .await
            .unwrap();
    }
    assert!(db
        .claim_next("w1", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .is_some());
    assert!(
        db.claim_next("w2", LEASE_SECS, u64::MAX)
            .await
            .unwrap()
            .is_none(),
        "a's second job waits while its first runs"
    );
    db.insert_job(&JobId::new(), Some("b"), spec, None)
        .await
        .unwrap();
    let claim = db
        .claim_next("w2", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    let row = db.get_job(&claim.lease.job, None).await.unwrap().unwrap();
    assert_eq!(row.owner.as_deref(), Some("b"));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_artifacts_and_keeps_the_record() {
    let app = spawn_app_with(|c| c.retention_days = 1.0 / 86_400.0).await;
    let id = app
        .submit(&app.job(json!({"training": {"max_steps": 2}})))
        .await;
    app.wait_status(&id, &["succeeded"], Duration::from_secs(60))
        .await;
    let job_dir = app.data_dir.join("jobs").join(&id);
    let start = std::time::Instant::now();
    while job_dir.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "retention never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, e) = app.get(&format!("/v1/jobs/{id}/adapter")).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (410, Some("artifacts_removed"))
    );
    let (status, job) = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!((status, job["status"].as_str()), (200, Some("succeeded")));
    let (_, metrics) = app.get(&format!("/v1/jobs/{id}/metrics")).await;
    assert_eq!(
        metrics["data"].as_array().unwrap().len(),
        2,
        "the loss curve stays"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_beyond_the_concurrent_bound_wait_their_turn() {
    let app = spawn_app_with(|c| c.max_concurrent_uploads = 1).await;
    // one upload that trickles in and holds the only slot
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let slow = {
        let client = app.client.clone();
        let url = app.url("/v1/files");
        tokio::spawn(async move {
            client
                .post(url)
                .body(reqwest::Body::wrap_stream(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tx.send(Ok(b"{\"text\": \"a\"}\n".to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = app
        .client
        .post(app.url("/v1/files"))
        .body("{\"text\": \"b\"}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    drop(tx);
    assert_eq!(slow.await.unwrap(), 201);
    let r = app
        .client
        .post(app.url("/v1/files"))
        .body("{\"text\": \"b\"}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "the slot is free again");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_references_are_canonical_and_errors_name_no_server_path() {
    let app = spawn_app().await;
    let id = app
        .submit(&app.job(json!({"checkpoint_every_steps": 1, "training": {"max_steps": 2}})))
        .await;
    app.wait_status(&id, &["succeeded"], Duration::from_secs(60))
        .await;
    // "+1" is step 1, read as a number: the job starts from checkpoint-1
    let from = app
        .submit(
            &app.job(json!({"from_checkpoint": format!("{id}:+1"), "training": {"max_steps": 1}})),
        )
        .await;
    app.wait_status(&from, &["succeeded"], Duration::from_secs(60))
        .await;
    let data_dir = app.data_dir.display().to_string();
    for bad in [
        format!("{id}:7"),
        format!("{id}:-1"),
        format!("{id}:1/../../x"),
        "nope:1".into(),
    ] {
        let (status, e) = app
            .post("/v1/jobs", &app.job(json!({"from_checkpoint": bad})))
            .await;
        assert_eq!(
            (status, e["error"]["param"].as_str()),
            (422, Some("from_checkpoint")),
            "{bad}: {e}"
        );
        assert!(!e.to_string().contains(&data_dir), "{e}");
    }
    app.shutdown().await;
}

/// A valid spec for jobs inserted straight into the database.
fn tiny_spec() -> qtune::spec::JobSpec {
    qtune::spec::JobSpec::from_json(
        r#"{"base_model": "m", "dataset": {"url": "https://example.com/d.jsonl"}}"#,
    )
    .unwrap()
}
