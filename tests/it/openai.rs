//! The OpenAI-compatible API's own checks over real HTTP: adapters sharing one base, and
//! hostile requests to the compatible routes. The official SDK's whole flow is in the full tier
//! (`full/openai_sdk.rs`).

use std::time::Duration;

/// Adapters sit over one loaded base, least recently used first out of the memory budget; a
/// stream over plain HTTP is OpenAI's chunks ending with `data: [DONE]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapters_share_one_base_within_their_budget() {
    use serde_json::{json, Value};
    // room for one small adapter only
    let app = crate::helpers::app::spawn_app_with(|c| c.adapter_cache_mib = 0).await;
    let mut jobs = Vec::new();
    for seed in [1, 2] {
        let id = app
            .submit(&app.job(json!({"training": {"max_steps": 3}, "seed": seed})))
            .await;
        app.wait_status(&id, &["succeeded"], Duration::from_secs(60))
            .await;
        jobs.push(id);
    }
    let ask = |model: &str, stream: bool| {
        json!({"model": model, "messages": [{"role": "user", "content": "say 3"}],
               "max_tokens": 6, "temperature": 0, "stream": stream})
    };
    let mut answers = Vec::new();
    for id in jobs.iter().chain(jobs.iter()) {
        let (status, reply) = app.post("/v1/chat/completions", &ask(id, false)).await;
        assert_eq!(status, 200, "{reply}");
        answers.push(reply["choices"][0]["message"]["content"].clone());
        let (loaded, bytes) = app.state.models.adapters_loaded();
        assert_eq!(loaded, 1, "the budget keeps one adapter");
        assert!(bytes > 0);
    }
    // reloading an adapter that was dropped gives the same greedy answer
    assert_eq!(answers[0], answers[2]);
    assert_eq!(answers[1], answers[3]);
    let body = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&ask(&jobs[0], true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(Value::String(text), answers[0]);
    app.shutdown().await;
}

/// Hostile input to the compatible routes: a multipart upload whose purpose comes after its
/// file and is refused leaves nothing stored; an oversized prompt is refused before it is
/// tokenized; unknown parameters and malformed lists are 400s naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_to_the_compatible_routes_are_refused_cleanly() {
    use serde_json::{json, Value};
    let app = crate::helpers::app::spawn_app_with(|c| c.workers = Some(0)).await;
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"{\"text\": \"hi\"}\n".to_vec()).file_name("a.jsonl"),
        )
        .text("purpose", "batch");
    let r = app
        .client
        .post(app.url("/v1/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["param"], "purpose", "{err}");
    let (_, files) = app.get("/v1/files").await;
    assert_eq!(files["data"], json!([]), "nothing stored: {files}");
    let stored = std::fs::read_dir(app.data_dir.join("files"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, 0, "no file left in the store");

    let huge = "x".repeat(400 * 1024);
    let (status, err) = app
        .post(
            "/v1/chat/completions",
            &json!({"model": app.model, "messages": [{"role": "user", "content": huge}]}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("messages")),
        "{err}"
    );
    let (status, err) = app
        .post(
            "/v1/fine_tuning/jobs",
            &json!({"model": app.model, "training_file": "file-x", "learning_rate": 1}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("learning_rate")),
        "{err}"
    );
    let (status, err) = app.get("/v1/fine_tuning/jobs?limit=0").await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("limit")),
        "{err}"
    );
    let (status, err) = app.get("/v1/fine_tuning/jobs?sort=asc").await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("sort")),
        "{err}"
    );
    app.shutdown().await;
}

/// `logit_bias` steers the answer as OpenAI's does (100 on one token: every token is that one),
/// and sampling values that have no meaning or no bound are 400s naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_steers_the_answer_and_unbounded_sampling_is_refused() {
    use serde_json::json;
    let app = crate::helpers::app::spawn_app_with(|c| c.workers = Some(0)).await;
    let ask = |extra: serde_json::Value| {
        let mut body = json!({"model": app.model, "messages": [{"role": "user", "content": "say 3"}],
                              "max_tokens": 5, "temperature": 0});
        crate::helpers::app::merge(&mut body, extra);
        body
    };
    let (status, plain) = app.post("/v1/chat/completions", &ask(json!({}))).await;
    assert_eq!(status, 200, "{plain}");
    let (status, biased) = app
        .post(
            "/v1/chat/completions",
            &ask(json!({"logit_bias": {"100": 100}})),
        )
        .await;
    assert_eq!(status, 200, "{biased}");
    assert_eq!(biased["usage"]["completion_tokens"], 5, "{biased}");
    let text = biased["choices"][0]["message"]["content"].as_str().unwrap();
    let first = text.chars().next().expect("an answer");
    assert!(
        text.chars().all(|c| c == first),
        "one token over and over: {text:?}"
    );
    assert_ne!(
        plain["choices"][0]["message"]["content"],
        biased["choices"][0]["message"]["content"]
    );
    for (extra, param) in [
        (json!({"logit_bias": {"100": 101}}), "logit_bias"),
        (json!({"logit_bias": {"a": 1}}), "logit_bias"),
        (json!({"repetition_penalty": 1e30}), "repetition_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
    ] {
        let (status, err) = app.post("/v1/chat/completions", &ask(extra.clone())).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (400, Some(param)),
            "{extra}: {err}"
        );
    }
    app.shutdown().await;
}

/// The operator's `--models` catalogue: a base offered by name is listed, trained on and
/// chatted with by that name, and a fine-tune's `ft:` name carries the catalogue name, or of a
/// path only its last part, never where the server keeps the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalogue_name_names_the_base_everywhere_and_no_path_leaks() {
    use serde_json::json;
    let mut source = String::new();
    let app = crate::helpers::app::spawn_app_with(|c| {
        // the tiny model sits beside the data dir, as `model/`
        source = c
            .data_dir
            .parent()
            .unwrap()
            .join("model")
            .display()
            .to_string();
        c.models = vec![format!("tiny-llama={source}")];
    })
    .await;
    assert_eq!(source, app.model.display().to_string());
    let (_, models) = app.get("/v1/models").await;
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "tiny-llama"),
        "{models}"
    );
    let mut by_name = app.job(json!({"training": {"epochs": 1}}));
    by_name["base_model"] = json!("tiny-llama");
    let named = app.submit(&by_name).await;
    let by_path = app
        .submit(&app.job(json!({"training": {"epochs": 1}})))
        .await;
    for id in [&named, &by_path] {
        app.wait_status(id, &["succeeded"], std::time::Duration::from_secs(120))
            .await;
    }
    let (_, job) = app.get(&format!("/v1/fine_tuning/jobs/{named}")).await;
    assert_eq!(
        job["fine_tuned_model"],
        format!("ft:tiny-llama::{named}"),
        "{job}"
    );
    let (_, job) = app.get(&format!("/v1/fine_tuning/jobs/{by_path}")).await;
    let ft = job["fine_tuned_model"].as_str().unwrap().to_string();
    assert_eq!(ft, format!("ft:model::{by_path}"), "{job}");
    assert!(!ft.contains('/'), "{ft}");
    for model in ["tiny-llama", &format!("ft:tiny-llama::{named}"), &ft] {
        let (status, answer) = app
            .post(
                "/v1/chat/completions",
                &json!({"model": model, "messages": [{"role": "user", "content": "say 1"}],
                        "max_tokens": 3, "temperature": 0}),
            )
            .await;
        assert_eq!(status, 200, "{model}: {answer}");
    }
    let mut unknown = app.job(json!({}));
    unknown["base_model"] = json!("no-such-model");
    let (status, err) = app.post("/v1/jobs", &unknown).await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("base_model")),
        "{err}"
    );
    app.shutdown().await;
}
