//! Serving many requests at once: a base's continuous batch (`qtune::inference::batch`)
//! against each request decoded alone.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use qtune::config::ServeConfig;
use qtune::inference::Models;
use qtune::train::generate::{self, Sampling};
use qtune::train::{checkpoint, model};

/// Writes a PEFT adapter over `base_dir` whose B factors are drawn from `seed` (a fresh adapter's
/// B is zero: it would decode what the base does).
fn drawn_adapter(base_dir: &std::path::Path, dir: &std::path::Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let data = crate::helpers::memorisable_chat(dir, 2);
    let spec = crate::helpers::spec(
        base_dir,
        &data,
        serde_json::json!({"lora": {"r": 4, "alpha": 32, "target_modules": "all-linear"}}),
    );
    let base = model::load_base(
        base_dir.to_str().unwrap(),
        None,
        &spec.lora,
        None,
        seed,
        &Device::Cpu,
    )
    .unwrap();
    for (i, (name, var)) in base.model.lora_vars().into_iter().enumerate() {
        if name.ends_with("lora_B") {
            let (o, r) = var.dims2().unwrap();
            let values: Vec<f32> = (0..o * r)
                .map(|k| {
                    let h = (k as u64 * 2654435761 + seed * 7919 + i as u64) % 1000;
                    (h as f32 / 1000.0 - 0.5) * 0.6
                })
                .collect();
            var.set(&Tensor::from_vec(values, (o, r), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    checkpoint::save_adapter(&dir.join("adapter"), &base.model, &spec, "tiny").unwrap();
}

/// Eight requests decoded together in one batch, over the base and three adapters, with prompts
/// from 3 to 300 tokens (the longest prefilled in two chunks while the others decode), give
/// greedily what each gives decoded alone, token for token; and they were batched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_mixed_adapters_decodes_what_each_request_decodes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = crate::helpers::tiny_model(dir.path());
    batch_decodes_what_each_request_decodes_alone(dir.path(), &base_dir).await;
}

/// The comparison above on the base at `base_dir` (a model folder or a `.gguf` file), with
/// adapters drawn for it under `dir`.
pub async fn batch_decodes_what_each_request_decodes_alone(
    dir: &std::path::Path,
    base_dir: &std::path::Path,
) {
    let base_name = base_dir.to_str().unwrap();
    let models = Models::new(
        &ServeConfig::for_data_dir(dir.join("data")),
        Default::default(),
    );
    let mut served = vec![models.base(base_name).await.unwrap()];
    // the same folder spelled another way is the same loaded base, not a second copy
    let respelled = base_dir
        .parent()
        .unwrap()
        .join(".")
        .join(base_dir.file_name().unwrap());
    let again = models.base(respelled.to_str().unwrap()).await.unwrap();
    assert!(Arc::ptr_eq(&served[0], &again), "one base per file");
    for k in 0..3u64 {
        let adapter_dir = dir.join(format!("adapter-{k}"));
        drawn_adapter(base_dir, &adapter_dir, k + 1);
        let view = models
            .load_adapter(&format!("job-{k}"), base_name, &adapter_dir.join("adapter"))
            .await
            .unwrap();
        served.push(view);
    }
    let tok = served[0].tokenizer();
    // a prompt longer than a prefill chunk in this model's tokens
    let long = (1..)
        .map(|n| "jumps over the lazy dog ".repeat(n))
        .find(|t| tok.encode(t).unwrap().len() > 256)
        .unwrap();
    let texts = [
        "hi",
        "say 1",
        "the quick brown fox",
        &long,
        "ok",
        "what is two and two",
        "a",
        "tell me a story about a cat",
    ];
    let requests: Vec<(Arc<qtune::inference::Served>, Vec<u32>)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (served[i % 4].clone(), tok.encode(t).unwrap()))
        .collect();
    assert!(
        requests[3].1.len() > 256,
        "a prompt longer than a prefill chunk"
    );
    let sampling = Sampling {
        max_tokens: 24,
        ..Sampling::default()
    };
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|(s, prompt)| {
            generate::generate(s.model(), s.tokenizer(), prompt, &sampling, &mut |_, _| {
                true
            })
            .unwrap()
            .tokens
        })
        .collect();
    // each adapter changes what is decoded: the comparison can tell a row's adapter apart
    for (i, (s, prompt)) in requests.iter().enumerate().filter(|(i, _)| i % 4 != 0) {
        let base = generate::generate(
            served[0].model(),
            s.tokenizer(),
            prompt,
            &sampling,
            &mut |_, _| true,
        );
        assert_ne!(
            base.unwrap().tokens,
            alone[i],
            "request {i}: the adapter changes nothing"
        );
    }
    let together = futures_util::future::join_all(requests.iter().map(|(s, prompt)| {
        let ticket = models
            .ticket(s, prompt.len(), sampling.max_tokens, None)
            .unwrap();
        models.generate(
            s.clone(),
            prompt.clone(),
            sampling.clone(),
            None,
            ticket,
            Box::new(|_, _| true),
        )
    }))
    .await;
    for (i, (got, want)) in together.into_iter().zip(&alone).enumerate() {
        assert_eq!(&got.unwrap().tokens, want, "request {i}");
    }
    let peak = models.largest_batch();
    assert!(peak >= 4, "the requests were decoded {peak} at a time");
}

/// Chat `logprobs` over HTTP are the log-softmax of the model's own logits (the evaluation
/// forward over prompt and answer at once) for the tokens the answer has, with the likeliest
/// alternatives in order; a completion's come as OpenAI's parallel lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_the_log_softmax_of_the_models_own_logits() {
    use qtune::train::tokenizer::Message;
    use serde_json::json;
    let app = crate::helpers::app::spawn_app_with(|c| c.workers = Some(0)).await;
    let (status, body) = app
        .post(
            "/v1/chat/completions",
            &json!({"model": app.model, "messages": [{"role": "user", "content": "tell me a story"}],
                    "max_tokens": 16, "temperature": 2.0, "seed": 11, "logprobs": true,
                    "top_logprobs": 4}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        content.len(),
        body["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    let base = model::load_for_decoding(app.model.to_str().unwrap(), &Default::default()).unwrap();
    let tok = &base.tokenizer;
    let vocabulary = qtune::inference::structured::Vocabulary::new(tok).unwrap();
    let by_bytes: std::collections::HashMap<Vec<u8>, u32> = (0..tok.inner.get_vocab_size(true)
        as u32)
        .rev()
        .map(|id| (vocabulary.bytes(id), id))
        .collect();
    let bytes = |v: &serde_json::Value| -> Vec<u8> {
        v["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect()
    };
    let rendered = tok
        .render_chat(&[Message::new("user", "tell me a story")], true)
        .unwrap();
    let mut ids = tok.encode(&rendered).unwrap();
    let prompt_len = ids.len();
    ids.extend(content.iter().map(|t| by_bytes[&bytes(t)]));
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = base
        .model
        .with_lora(None, 0)
        .unwrap()
        .logits(&input)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&logits.squeeze(0).unwrap(), 1).unwrap();
    let logp: Vec<Vec<f32>> = logp.to_vec2().unwrap();
    let mut sampled_below_top = 0;
    for (k, t) in content.iter().enumerate() {
        let row = &logp[prompt_len - 1 + k];
        let id = ids[prompt_len + k];
        let got = t["logprob"].as_f64().unwrap() as f32;
        assert!(
            (got - row[id as usize]).abs() < 1e-4,
            "token {k}: {got} vs {}",
            row[id as usize]
        );
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 4);
        for (alt, &want) in top.iter().zip(&order) {
            assert_eq!(bytes(alt), vocabulary.bytes(want as u32), "token {k}");
            let got = alt["logprob"].as_f64().unwrap() as f32;
            assert!(
                (got - row[want]).abs() < 1e-4,
                "token {k}: {got} vs {}",
                row[want]
            );
        }
        sampled_below_top += usize::from(id as usize != order[0]);
    }
    assert!(
        sampled_below_top > 0,
        "sampling picked some token not the likeliest: {body}"
    );
    let (status, plain) = app
        .post(
            "/v1/completions",
            &json!({"model": app.model, "prompt": "once upon", "max_tokens": 6, "logprobs": 2,
                    "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{plain}");
    let lp = &plain["choices"][0]["logprobs"];
    let n = plain["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    for list in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[list].as_array().unwrap().len(), n, "{list}: {plain}");
    }
    assert!(
        lp["top_logprobs"][0].as_object().unwrap().len() <= 2,
        "{plain}"
    );
    for (extra, param) in [
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"logprobs": 3}), "logprobs"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
    ] {
        let mut req = json!({"model": app.model, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 2});
        crate::helpers::app::merge(&mut req, extra.clone());
        let (status, err) = app.post("/v1/chat/completions", &req).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (400, Some(param)),
            "{extra}: {err}"
        );
    }
    app.shutdown().await;
}

/// A JSON schema constrains a sampled answer of the tiny model (whose free answers are never
/// JSON) to a document the schema accepts; `json_object` to an object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_constrains_every_sampled_answer() {
    use serde_json::{json, Value};
    let app = crate::helpers::app::spawn_app_with(|c| c.workers = Some(0)).await;
    let schema = json!({"type": "object", "properties": {
        "answer": {"type": "integer", "minimum": 0, "maximum": 99},
        "word": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer", "word"], "additionalProperties": false});
    for seed in 0..8 {
        let (status, body) = app
            .post(
                "/v1/chat/completions",
                &json!({"model": app.model, "messages": [{"role": "user", "content": "a number"}],
                        "max_tokens": 40, "temperature": 1.0, "seed": seed,
                        "response_format": {"type": "json_schema",
                                            "json_schema": {"name": "n", "schema": schema}}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["answer", "word"], "{text}");
        assert!(
            v["answer"].as_u64().unwrap() <= 99
                && ["yes", "no"].contains(&v["word"].as_str().unwrap()),
            "{text}"
        );
    }
    let (status, body) = app
        .post(
            "/v1/completions",
            &json!({"model": app.model, "prompt": "data:", "max_tokens": 60, "temperature": 0.8,
                    "seed": 2, "response_format": {"type": "json_object"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    if body["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
    app.shutdown().await;
}

/// `/metrics` after a few generations: `promtool check metrics` (Debian's `prometheus`
/// package, which scripts/test.sh installs) finds nothing wrong with it, and a real Prometheus
/// server scrapes it and answers queries over what it counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_a_real_prometheus_scrapes_them() {
    use serde_json::json;
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let app = crate::helpers::app::spawn_app().await;
    for stream in [false, true] {
        let (status, _) = app
            .post(
                "/v1/chat/completions",
                &json!({"model": app.model, "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 6, "temperature": 0, "stream": stream}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let client = reqwest::Client::new();
    let scraped = client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = scraped.text().await.unwrap();
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("qtune_generated_tokens_total ") >= 2.0, "{text}");
    assert_eq!(
        value("qtune_time_to_first_token_seconds_count "),
        2.0,
        "{text}"
    );
    assert!(value("qtune_prompt_tokens_total ") > 2.0, "{text}");
    assert!(value("qtune_decode_batch_rows_count ") >= 1.0, "{text}");
    assert_eq!(value("qtune_generations_running "), 0.0, "{text}");
    assert!(text.contains("qtune_worker_running_jobs{worker="), "{text}");
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let checked = promtool.wait_with_output().await.unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // a real Prometheus scraping the server every second
    let dir = tempfile::tempdir().unwrap();
    let target = app
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: qtune\n    static_configs: [{{targets: ['{target}']}}]\n"
        ),
    )
    .unwrap();
    let port = crate::helpers::process::free_port();
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian's prometheus package)");
    let query = |q: &str| {
        let client = client.clone();
        let url = format!("http://127.0.0.1:{port}/api/v1/query");
        let q = q.to_string();
        async move {
            let answer = client.get(url).query(&[("query", q)]).send().await.ok()?;
            let body: serde_json::Value = answer.json().await.ok()?;
            let v = body["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()?;
            Some(v)
        }
    };
    let start = std::time::Instant::now();
    let tokens = loop {
        if let (Some(1.0), Some(tokens)) = (
            query("up{job=\"qtune\"}").await,
            query("qtune_generated_tokens_total").await,
        ) {
            break tokens;
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "Prometheus scraped nothing in a minute"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert_eq!(tokens, value("qtune_generated_tokens_total "));
    let p50 = query("histogram_quantile(0.5, qtune_time_to_first_token_seconds_bucket)").await;
    assert!(p50.is_some_and(|s| s > 0.0), "{p50:?}");
    app.shutdown().await;
}

/// A tenant that sends many requests at once does not keep another's out of the batch: with
/// room for two, six requests of one tenant then one of another, the other's joins as soon as
/// the first place frees (first come first served would run it last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_is_shared_fairly_between_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = crate::helpers::tiny_model(dir.path());
    let mut config = ServeConfig::for_data_dir(dir.path().join("data"));
    config.max_concurrent_generations = 2;
    let models = Models::new(&config, Default::default());
    let served = models.base(base_dir.to_str().unwrap()).await.unwrap();
    let prompt = served.tokenizer().encode("hello there").unwrap();
    let sampling = Sampling {
        max_tokens: 24,
        ignore_eos: true,
        ..Sampling::default()
    };
    let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tenants = ["a", "a", "a", "a", "a", "a", "b"];
    let requests = tenants.iter().enumerate().map(|(i, &tenant)| {
        let ticket = models
            .ticket(&served, prompt.len(), sampling.max_tokens, Some(tenant))
            .unwrap();
        let answer = models.generate(
            served.clone(),
            prompt.clone(),
            sampling.clone(),
            None,
            ticket,
            Box::new(|_, _| true),
        );
        let finished = finished.clone();
        async move {
            answer.await.unwrap();
            finished.lock().unwrap().push(i);
        }
    });
    futures_util::future::join_all(requests).await;
    let order = finished.lock().unwrap().clone();
    let b = order.iter().position(|&i| i == 6).unwrap();
    assert!(b <= 3, "tenant b's request finished {b}th: {order:?}");
}
