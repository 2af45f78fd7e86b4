//! The job service end to end: the real server on an ephemeral port, a real SQLite file in a
//! temporary data dir, the tiny model, real HTTP.

use std::time::Duration;

use crate::helpers::app::{merge, spawn_app, spawn_app_with};
use crate::helpers::eventually;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_end_to_end_and_its_adapter_downloads() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.0, 200);
    // upload the dataset rather than pointing at a file
    let data = std::fs::read(crate::helpers::memorisable_chat(app.dir.path(), 8)).unwrap();
    let up: Value = app
        .client
        .post(app.url("/v1/files?filename=chat.jsonl"))
        .body(data)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file_id = up["id"].as_str().unwrap();
    assert!(file_id.starts_with("file-"));
    assert_eq!(up["filename"], "chat.jsonl");
    // the same dataset as a multipart form
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(std::fs::read(app.dir.path().join("chat.jsonl")).unwrap())
            .file_name("form.jsonl"),
    );
    let up2: Value = app
        .client
        .post(app.url("/v1/files"))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (up2["filename"].as_str(), &up2["sha256"]),
        (Some("form.jsonl"), &up["sha256"])
    );
    let body = app.job(json!({"dataset": {"url": file_id}, "checkpoint_every_steps": 4, "training": {"epochs": 3, "batch_size": 2}}));
    let (status, job) = app.post("/v1/jobs", &body).await;
    assert_eq!(status, 201, "{job}");
    // defaults are filled in and echoed
    assert_eq!(job["status"], "queued");
    assert_eq!(job["spec"]["lora"]["alpha"], 8.0);
    assert_eq!(job["spec"]["training"]["adam_beta2"], 0.999);
    let id = job["id"].as_str().unwrap().to_string();

    let events = app.events(&id, None).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(
        events.last().unwrap().2["status"],
        "succeeded",
        "{events:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "metrics").count(), 12);
    assert!(kinds.contains(&"checkpoint") && kinds.contains(&"data"));
    assert!(
        events.windows(2).all(|w| w[0].0 < w[1].0),
        "event ids increase"
    );
    // Last-Event-ID replays only what came after
    let tail = app.events(&id, Some(events[events.len() - 3].0)).await;
    assert_eq!(tail.len(), 2);

    let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["progress"]["step"], 12);
    assert_eq!(job["progress"]["total_steps"], 12);
    assert!(job["finished_at"].is_string() && job["started_at"].is_string());

    let (_, metrics) = app.get(&format!("/v1/jobs/{id}/metrics")).await;
    let losses: Vec<f64> = metrics["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["train_loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(losses[11] < 0.7 * losses[0], "loss falls: {losses:?}");
    let csv = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/metrics?format=csv")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        csv.starts_with(
            "step,epoch,train_loss,eval_loss,learning_rate,grad_norm,tokens_per_second,train_accuracy,eval_accuracy,\
             rewards/chosen,rewards/rejected,rewards/margins,rewards/accuracies,\
             eval_rewards/chosen,eval_rewards/rejected,eval_rewards/margins,eval_rewards/accuracies\n1,"
        ),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 13);

    let (_, ckpts) = app.get(&format!("/v1/jobs/{id}/checkpoints")).await;
    let steps: Vec<i64> = ckpts["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![4, 8, 12]);
    let file = &ckpts["data"][0]["files"][0];
    assert_eq!(file["name"], "adapter_model.safetensors");
    let resp = app
        .client
        .get(app.url(&format!(
            "/v1/jobs/{id}/checkpoints/4/adapter_model.safetensors"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(
        resp.headers()["content-length"].to_str().unwrap(),
        file["bytes"].to_string()
    );
    assert_eq!(
        resp.headers()["etag"].to_str().unwrap(),
        format!("\"{}\"", file["sha256"].as_str().unwrap())
    );
    let bytes = resp.bytes().await.unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = tensors.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    assert_eq!(names.len(), 2 * 7 * 2);
    assert_eq!(
        names[0],
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    );

    // the final adapter as one file, and as a tar of the PEFT folder
    let resp = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/adapter?file=adapter_config.json")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let cfg: Value = resp.json().await.unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    let tar_bytes = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/adapter")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let entries: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(
        entries.contains(&"adapter/adapter_model.safetensors".to_string()),
        "{entries:?}"
    );

    // a second job continues from the first one's checkpoint
    let follow = app
        .submit(
            &app.job(json!({"from_checkpoint": format!("{id}:8"), "training": {"max_steps": 2}})),
        )
        .await;
    app.wait_status(&follow, &["succeeded"], Duration::from_secs(60))
        .await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_and_running_jobs() {
    let app = spawn_app().await;
    // a long job occupies the single worker; the second one waits in the queue
    let running = app
        .submit(&app.job(json!({"training": {"max_steps": 100000}})))
        .await;
    let queued = app.submit(&app.job(json!({}))).await;
    eventually(
        Duration::from_secs(60),
        "the long job ran two steps",
        || async {
            let (_, j) = app.get(&format!("/v1/jobs/{running}")).await;
            match j["progress"]["step"].as_i64().unwrap_or(0) >= 2 {
                true => Ok(()),
                false => Err(j.to_string()),
            }
        },
    )
    .await;
    let (status, j) = app
        .post(&format!("/v1/jobs/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!((status, j["status"].as_str()), (200, Some("cancelled")));
    let (status, _) = app
        .post(&format!("/v1/jobs/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "cancel is idempotent");
    let (status, _) = app
        .post(&format!("/v1/jobs/{running}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let job = app
        .wait_status(&running, &["cancelled"], Duration::from_secs(30))
        .await;
    assert!(job["progress"]["step"].as_i64().unwrap() < 100000);
    let (_, queued_job) = app.get(&format!("/v1/jobs/{queued}")).await;
    assert_eq!(
        queued_job["started_at"],
        Value::Null,
        "a cancelled queued job never ran"
    );
    // cancelling a finished job is a conflict
    let done = app
        .submit(&app.job(json!({"training": {"max_steps": 1}})))
        .await;
    app.wait_status(&done, &["succeeded"], Duration::from_secs(30))
        .await;
    let (status, err) = app
        .post(&format!("/v1/jobs/{done}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["code"], "job_finished");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_naming_the_problem() {
    let app = spawn_app_with(|c| c.max_upload_mib = 1).await;
    let ok = app.job(json!({}));
    let with = |extra: Value| {
        let mut v = ok.clone();
        merge(&mut v, extra);
        v
    };
    let mut without_dataset = ok.clone();
    without_dataset.as_object_mut().unwrap().remove("dataset");
    // every field's own checks are the spec's unit tests (spec.rs); these are the ones that
    // need the service (uploads, egress), and one of each kind to show the 422 wiring
    let cases: Vec<(Value, u16, &str)> = vec![
        (with(json!({"lora": {"r": 0}})), 422, "lora.r"),
        (
            with(json!({"training": {"batch_size": "four"}})),
            422,
            "training.batch_size",
        ),
        (with(json!({"extra_field": 1})), 422, "extra_field"),
        (without_dataset, 422, "dataset"),
        (
            with(json!({"dataset": {"url": "ftp://example/x"}})),
            422,
            "dataset.url",
        ),
        (
            with(json!({"dataset": {"url": "file-doesnotexist"}})),
            422,
            "dataset.url",
        ),
        (
            with(json!({"from_checkpoint": "00000000-0000-0000-0000-000000000000"})),
            422,
            "from_checkpoint",
        ),
    ];
    for (i, (body, status, param)) in cases.into_iter().enumerate() {
        let (got, err) = app.post("/v1/jobs", &body).await;
        assert_eq!(got, status, "case {i}: {err}");
        assert_eq!(err["error"]["param"], param, "case {i}: {err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    // malformed bodies
    let r = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_json");
    // The server answers 413 as soon as it sees the length, and may close the connection while
    // the client is still sending: a reset on the client side is not an answer, so try again.
    let mut answered = None;
    for _ in 0..5 {
        let sent = app
            .client
            .post(app.url("/v1/jobs"))
            .body(vec![b' '; 2 * 1024 * 1024])
            .send()
            .await;
        if let Ok(r) = sent {
            answered = Some(r);
            break;
        }
    }
    let r = answered.expect("an answer to the oversized body");
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "body_too_large"
    );
    // unknown ids, routes and bad queries
    for (path, status) in [
        ("/v1/jobs/00000000-0000-0000-0000-000000000000", 404),
        ("/v1/jobs/nope", 404),
        ("/v1/jobs/00000000-0000-0000-0000-000000000000/events", 404),
        ("/v1/nothing", 404),
        ("/v1/jobs?limit=0", 422),
        ("/v1/jobs?status=sleeping", 422),
        ("/v1/jobs?limit=abc", 400),
    ] {
        let (got, err) = app.get(path).await;
        assert_eq!(got, status, "{path}: {err}");
        assert!(err["error"]["code"].is_string(), "{path}: {err}");
    }
    assert_eq!(app.get("/healthz").await.0, 200);
    assert_eq!(app.get("/readyz").await.0, 200);
    let (_, list) = app.get("/v1/jobs").await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        0,
        "nothing was queued"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_jobs_each_run_exactly_once() {
    let app = spawn_app_with(|c| c.devices = vec!["cpu".into(), "cpu".into()]).await;
    let body = app.job(json!({"training": {"max_steps": 1, "batch_size": 2}}));
    let submits = (0..30).map(|_| app.submit(&body));
    let ids: Vec<String> = futures_util::future::join_all(submits).await;
    for id in &ids {
        app.wait_status(id, &["succeeded"], Duration::from_secs(120))
            .await;
    }
    for id in &ids {
        let events = app.events(id, None).await;
        let running = events
            .iter()
            .filter(|e| {
                e.1 == "status" && e.2["status"] == "running" && e.2.get("attempt").is_some()
            })
            .count();
        let succeeded = events
            .iter()
            .filter(|e| e.1 == "status" && e.2["status"] == "succeeded")
            .count();
        assert_eq!((running, succeeded), (1, 1), "{id}: {events:?}");
        let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(job["attempt"], 1);
    }
    // pagination walks all 30, newest first, without repeats
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    // 30 jobs in pages of 7 are 5 pages: a page count past that is a paging loop
    for page_no in 0.. {
        assert!(page_no < 5, "paging did not end: {seen:?}");
        let q = match &after {
            Some(a) => format!("/v1/jobs?limit=7&after={a}"),
            None => "/v1/jobs?limit=7".into(),
        };
        let (_, page) = app.get(&q).await;
        for j in page["data"].as_array().unwrap() {
            seen.push(j["id"].as_str().unwrap().to_string());
        }
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        after = page["last_id"].as_str().map(str::to_string);
    }
    let (_, succeeded) = app.get("/v1/jobs?status=succeeded&limit=100").await;
    let all: Vec<String> = succeeded["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen, all, "pages concatenate to the full list");
    let mut sorted_seen = seen.clone();
    sorted_seen.sort();
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    assert_eq!(sorted_seen, sorted_ids);
    // Newest first. Concurrent submissions are listed in the order the database numbered
    // them, which may differ by microseconds from the order of their clocks; submissions one
    // after another are listed, and stamped, in order.
    let latest_concurrent = succeeded["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["created_at"].as_str().unwrap().to_string())
        .max()
        .unwrap();
    let first = app.submit(&body).await;
    let second = app.submit(&body).await;
    let (_, page) = app.get("/v1/jobs?limit=3").await;
    let listed: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        &listed[..2],
        &[second.as_str(), first.as_str()],
        "newest first"
    );
    let stamp = |i: usize| page["data"][i]["created_at"].as_str().unwrap().to_string();
    assert!(stamp(0) >= stamp(1) && stamp(1) >= latest_concurrent);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataset_url_failures_fail_the_job_with_the_url() {
    use axum::routing::get;
    // a local HTTP server with the failure modes
    let big = "x".repeat(2 * 1024 * 1024);
    let router = axum::Router::new()
        .route(
            "/ok.jsonl",
            get(|| async { "{\"text\": \"hello there\"}\n" }),
        )
        .route(
            "/missing.jsonl",
            get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }),
        )
        .route(
            "/page.html",
            get(|| async { "<html><body>not json lines</body></html>" }),
        )
        .route(
            "/big.jsonl",
            get(move || {
                let b = big.clone();
                async move { b }
            }),
        )
        .route(
            "/slow.jsonl",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                "late"
            }),
        )
        .route(
            "/flaky.jsonl",
            get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let origin = format!("http://127.0.0.1:{port}");
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let app = spawn_app_with(|c| {
        c.max_dataset_mib = 1;
        c.fetch_timeout_secs = 1;
        // the test's server is on loopback, which only an operator's allowance opens
        c.fetch_allow = vec![format!("127.0.0.1:{port}")];
    })
    .await;
    let ok = app
        .submit(&app.job(
            json!({"dataset": {"url": format!("{origin}/ok.jsonl")}, "training": {"max_steps": 1}}),
        ))
        .await;
    app.wait_status(&ok, &["succeeded"], Duration::from_secs(60))
        .await;
    for (path, expected) in [
        ("/missing.jsonl", "HTTP 404"),
        ("/page.html", "line 1: invalid JSON"),
        ("/big.jsonl", "dataset limit"),
        ("/slow.jsonl", "timed out"),
        ("/flaky.jsonl", "HTTP 503"),
    ] {
        let url = format!("{origin}{path}");
        let id = app.submit(&app.job(json!({"dataset": {"url": url}}))).await;
        let job = app
            .wait_status(&id, &["failed"], Duration::from_secs(60))
            .await;
        let msg = job["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(&url) && msg.contains(expected),
            "{path}: {msg}"
        );
    }
    // a local file outside the allowed directories
    let id = app
        .submit(&app.job(json!({"dataset": {"url": "file:///etc/hostname"}})))
        .await;
    let job = app
        .wait_status(&id, &["failed"], Duration::from_secs(30))
        .await;
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allow-file-dirs"),
        "{job}"
    );
    assert_eq!(app.get("/readyz").await.0, 200);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_v1_and_separate_owners() {
    let app = spawn_app_with(|c| c.api_keys = vec!["alpha".into(), "beta".into()]).await;
    let body = app.job(json!({"training": {"max_steps": 1}}));
    assert_eq!(app.post("/v1/jobs", &body).await.0, 401);
    assert_eq!(app.post_as("wrong", "/v1/jobs", &body).await.0, 401);
    let (status, job) = app.post_as("alpha", "/v1/jobs", &body).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap();
    let path = format!("/v1/jobs/{id}");
    assert_eq!(app.get_as("alpha", &path).await.0, 200);
    assert_eq!(app.get_as("beta", &path).await.0, 404);
    let (_, list) = app.get_as("beta", "/v1/jobs").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    assert_eq!(app.get("/healthz").await.0, 200, "health needs no key");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    let app = spawn_app().await;
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: std::collections::BTreeSet<String> =
        doc["paths"].as_object().unwrap().keys().cloned().collect();
    // the routes the router declares, read from its source: each resource module declares its
    // own (`routes()`), api/mod.rs the rest
    let mut source = String::new();
    let mut dirs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/api"
    ))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                source += &std::fs::read_to_string(&path).unwrap();
            }
        }
    }
    let served: std::collections::BTreeSet<String> = source
        .split(".route(")
        .skip(1)
        .map(|s| {
            s.trim_start()
                .trim_start_matches('"')
                .split('"')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(documented, served);
    // and every documented operation reaches a handler (not the 404/405 of the router)
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| *m != "parameters")
        {
            let concrete = path
                .replace("{id}", "00000000-0000-0000-0000-000000000000")
                .replace("{step}", "1")
                .replace("{file}", "adapter_config.json");
            let req = app
                .client
                .request(method.to_uppercase().parse().unwrap(), app.url(&concrete));
            let r = req.body("{}").send().await.unwrap();
            assert_ne!(r.status().as_u16(), 405, "{method} {path}");
            if r.status() == 404 {
                let e: Value = r.json().await.unwrap();
                assert_ne!(e["error"]["code"], "route_not_found", "{method} {path}");
            }
        }
    }
    // the service guide's example job validates against the document's JobSpec schema (required
    // fields and known keys, checked by the server's own parser too)
    let readme = include_str!("../../docs/src/service.md");
    let example = readme
        .split("```json\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let example: Value = serde_json::from_str(example).unwrap();
    let schema = &doc["components"]["schemas"]["JobSpec"];
    for key in example.as_object().unwrap().keys() {
        assert!(
            schema["properties"].get(key).is_some(),
            "the service guide's field {key} is not in the OpenAPI JobSpec"
        );
    }
    for key in schema["required"].as_array().unwrap() {
        assert!(example.get(key.as_str().unwrap()).is_some());
    }
    assert!(qtune::spec::JobSpec::from_json(&example.to_string()).is_ok());
    app.shutdown().await;
}

/// An `Idempotency-Key` makes a retried create answer with the job the first request made; the
/// same key with another request is refused naming the header; each API key has its own keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_make_a_retried_create_return_the_first_job() {
    let app = spawn_app_with(|c| {
        c.workers = Some(0);
        c.api_keys = vec!["alpha".into(), "beta".into()];
    })
    .await;
    let body = app.job(json!({}));
    let create = |key: &'static str, idem: &'static str, body: Value| {
        let req = app
            .client
            .post(app.url("/v1/jobs"))
            .bearer_auth(key)
            .header("Idempotency-Key", idem)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s1, first) = create("alpha", "retry-1", body.clone()).await;
    let (s2, again) = create("alpha", "retry-1", body.clone()).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first["id"], again["id"]);
    let mut other = body.clone();
    other["seed"] = json!(7);
    let (status, err) = create("alpha", "retry-1", other).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "Idempotency-Key");
    // another API key's same header value is its own
    let (status, theirs) = create("beta", "retry-1", body.clone()).await;
    assert_eq!(status, 201);
    assert_ne!(theirs["id"], first["id"]);
    // a request refused leaves the key free for its corrected retry
    let mut bad = body.clone();
    bad["lora"]["r"] = json!(0);
    let (status, _) = create("alpha", "retry-2", bad).await;
    assert_eq!(status, 422);
    let mut wrong_model = body.clone();
    wrong_model["base_model"] = json!("/nonexistent/model.gguf");
    let (status, _) = create("alpha", "retry-3", wrong_model).await;
    assert_eq!(status, 422);
    let (status, fixed) = create("alpha", "retry-3", body.clone()).await;
    assert_eq!(status, 201, "{fixed}");
    let list: Value = app
        .client
        .get(app.url("/v1/jobs"))
        .bearer_auth("alpha")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    app.shutdown().await;
}

/// A succeeded job's adapter exported through the API: `gguf-lora` and `gguf-q8_0` (GGUF files) and `merged`
/// (a tar of the base folder with merged weights), stored and downloadable; a job that has not
/// succeeded and an unknown format are refused naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_succeeded_jobs_adapter_exports_as_gguf_lora_gguf_and_merged() {
    let app = spawn_app().await;
    let id = app
        .submit(&app.job(json!({"training": {"max_steps": 300}})))
        .await;
    // paused (at once, or at its next step), it has no adapter to export yet
    app.post(&format!("/v1/jobs/{id}/pause"), &json!({})).await;
    app.wait_status(&id, &["paused"], Duration::from_secs(60))
        .await;
    let (status, err) = app
        .post(
            &format!("/v1/jobs/{id}/exports"),
            &json!({"format": "merged"}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("not_ready"))
    );
    app.post(&format!("/v1/jobs/{id}/resume"), &json!({})).await;
    app.wait_status(&id, &["succeeded"], Duration::from_secs(60))
        .await;
    let (status, err) = app
        .post(
            &format!("/v1/jobs/{id}/exports"),
            &json!({"format": "onnx"}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("format"))
    );
    let (status, _) = app.get(&format!("/v1/jobs/{id}/exports/gguf-q3_k")).await;
    assert_eq!(status, 422);
    for (format, magic) in [
        ("gguf-lora", &b"GGUF"[..]),
        ("gguf-q8_0", &b"GGUF"[..]),
        ("merged", &b"merged/"[..]),
    ] {
        let (status, made) = app
            .post(
                &format!("/v1/jobs/{id}/exports"),
                &json!({"format": format}),
            )
            .await;
        assert_eq!(status, 201, "{made}");
        let bytes = app
            .client
            .get(app.url(made["url"].as_str().unwrap()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(bytes.len() as u64, made["bytes"].as_u64().unwrap());
        assert!(bytes.starts_with(magic), "{format}");
    }
    // the merged archive holds the base's config and tokenizer beside the merged weights
    let tar = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/exports/merged")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut archive = tar::Archive::new(&tar[..]);
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    for want in [
        "merged/config.json",
        "merged/tokenizer.json",
        "merged/model.safetensors",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    app.shutdown().await;
}

/// `POST /v1/files/{id}/check` reads an upload through training's record checks: a bad line is
/// named and recorded as the file's status, a good file becomes `processed`; a wrong format
/// name is a 422 naming `format`, another key's file a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_checked_line_by_line_on_request() {
    let app = spawn_app_with(|c| {
        c.workers = Some(0);
        c.api_keys = vec!["k1".into(), "k2".into()];
    })
    .await;
    let upload = |body: &'static str| {
        app.client
            .post(app.url("/v1/files?filename=d.jsonl"))
            .bearer_auth("k1")
            .body(body)
            .send()
    };
    let good = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n";
    let bad = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n{\"messages\": [{\"role\": \"user\"}]}\n";
    let good: Value = upload(good).await.unwrap().json().await.unwrap();
    let bad: Value = upload(bad).await.unwrap().json().await.unwrap();
    assert_eq!(bad["status"], "uploaded", "not checked until asked");

    let (status, file) = app
        .post_as(
            "k1",
            &format!("/v1/files/{}/check", bad["id"].as_str().unwrap()),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["status"], "error");
    let details = file["status_details"].as_str().unwrap();
    assert!(
        details.contains("line 2") && details.contains("content"),
        "{details}"
    );
    let (_, again) = app
        .get_as("k1", &format!("/v1/files/{}", bad["id"].as_str().unwrap()))
        .await;
    assert_eq!(again["status_details"], file["status_details"], "recorded");

    let (status, file) = app
        .post_as(
            "k1",
            &format!(
                "/v1/files/{}/check?format=messages",
                good["id"].as_str().unwrap()
            ),
            &json!({}),
        )
        .await;
    assert_eq!(
        (status, file["status"].as_str()),
        (200, Some("processed")),
        "{file}"
    );

    let (status, e) = app
        .post_as(
            "k1",
            &format!(
                "/v1/files/{}/check?format=csv",
                good["id"].as_str().unwrap()
            ),
            &json!({}),
        )
        .await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (422, Some("format")),
        "{e}"
    );
    let (status, _) = app
        .post_as(
            "k2",
            &format!("/v1/files/{}/check", good["id"].as_str().unwrap()),
            &json!({}),
        )
        .await;
    assert_eq!(status, 404, "another key's file is not found");
    app.shutdown().await;
}
