//! Adapters brought from outside: one trained by PEFT itself (tests/fixtures/peft-adapter, made
//! by scripts/make-peft-adapter-fixture.py over the tiny Llama of tests/fixtures/families/llama)
//! uploaded, served by name and answering what transformers + PEFT answer greedily; vLLM's
//! load/unload routes, OpenAI's `DELETE /v1/models/{id}`, owner scoping, and each way an upload
//! can be wrong refused naming its field.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// An upload's files: (form field, bytes).
type Files = Vec<(&'static str, Vec<u8>)>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The multipart form of an upload: `name`, `base_model`, and `files` as (field, bytes).
fn form(name: &str, base: &Path, files: Files) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new()
        .text("name", name.to_string())
        .text("base_model", base.to_str().unwrap().to_string());
    for (field, bytes) in files {
        form = form.part(
            field,
            reqwest::multipart::Part::bytes(bytes).file_name(field),
        );
    }
    form
}

async fn upload(
    app: &crate::helpers::app::TestApp,
    key: &str,
    form: reqwest::multipart::Form,
) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/v1/adapters"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peft_adapter_uploaded_answers_what_transformers_and_peft_answer() {
    let app = crate::helpers::app::spawn_app_with(|c| {
        c.workers = Some(0);
        c.api_keys = vec!["key-a".into(), "key-b".into()];
    })
    .await;
    let base = app.dir.path().join("peft-base");
    copy_dir(&fixture("families/llama"), &base);
    let adapter = fixture("peft-adapter");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("expected.json")).unwrap())
            .unwrap();
    let config = std::fs::read(adapter.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let files = || {
        vec![
            ("adapter_config", config.clone()),
            ("adapter_model", weights.clone()),
        ]
    };

    let (status, made) = upload(&app, "key-a", form("peft-cat", &base, files())).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["id"], "peft-cat");
    let complete = |model: &str| {
        json!({"model": model, "prompt": expected["prompt"], "max_tokens": expected["max_tokens"],
               "temperature": 0})
    };
    let (status, answer) = app
        .post_as("key-a", "/v1/completions", &complete("peft-cat"))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["text"], expected["with_adapter"]["text"],
        "{answer}"
    );
    assert_eq!(answer["usage"]["completion_tokens"], expected["max_tokens"]);
    // the base alone answers what transformers answers without the adapter
    let (_, plain) = app
        .post_as(
            "key-a",
            "/v1/completions",
            &complete(base.to_str().unwrap()),
        )
        .await;
    assert_eq!(
        plain["choices"][0]["text"], expected["base"]["text"],
        "{plain}"
    );
    // another key sees no such model
    let (status, _) = app
        .post_as("key-b", "/v1/completions", &complete("peft-cat"))
        .await;
    assert_eq!(status, 404);
    let (_, models) = app.get_as("key-a", "/v1/models").await;
    let listed = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "peft-cat")
        .cloned();
    assert_eq!(
        listed.unwrap()["parent"],
        base.to_str().unwrap(),
        "{models}"
    );
    let (status, again) = upload(&app, "key-a", form("peft-cat", &base, files())).await;
    assert_eq!(
        (status, again["error"]["param"].as_str()),
        (409, Some("name")),
        "{again}"
    );

    // the same adapter as one tar, as `tar cf` of the folder makes it
    let mut tar = tar::Builder::new(Vec::new());
    for (name, bytes) in [
        ("adapter_config.json", &config),
        ("adapter_model.safetensors", &weights),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("my-adapter/{name}"), bytes.as_slice())
            .unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let (status, made) = upload(
        &app,
        "key-a",
        form("peft-tar", &base, vec![("adapter", tar)]),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let (_, answer) = app
        .post_as("key-a", "/v1/completions", &complete("peft-tar"))
        .await;
    assert_eq!(
        answer["choices"][0]["text"], expected["with_adapter"]["text"],
        "{answer}"
    );

    // each way an upload can be wrong, refused naming the field, nothing recorded
    let cfg: Value = serde_json::from_slice(&config).unwrap();
    let with = |change: &dyn Fn(&mut Value)| {
        let mut c = cfg.clone();
        change(&mut c);
        vec![
            ("adapter_config", serde_json::to_vec(&c).unwrap()),
            ("adapter_model", weights.clone()),
        ]
    };
    let cases: Vec<(&str, PathBuf, Files, &str)> = vec![
        (
            "dora",
            base.clone(),
            with(&|c| c["use_dora"] = json!(true)),
            "adapter_config",
        ),
        (
            "ranks",
            base.clone(),
            with(&|c| c["rank_pattern"] = json!({"q_proj": 8})),
            "adapter_config",
        ),
        (
            "huge-r",
            base.clone(),
            with(&|c| c["r"] = json!(1 << 30)),
            "adapter_config",
        ),
        (
            "lm-head",
            base.clone(),
            with(&|c| c["target_modules"] = json!(["q_proj", "lm_head"])),
            "adapter_config",
        ),
        // the factors do not fit what the config says (rank 8, the file's are rank 4)
        (
            "shapes",
            base.clone(),
            with(&|c| c["r"] = json!(8)),
            "adapter_model",
        ),
        // a module the file has factors for is missing from the config
        (
            "fewer",
            base.clone(),
            with(&|c| c["target_modules"] = json!(["q_proj", "v_proj"])),
            "adapter_model",
        ),
        (
            "no-weights",
            base.clone(),
            vec![("adapter_config", config.clone())],
            "adapter_model",
        ),
        ("../x", base.clone(), files(), "name"),
        ("elsewhere", PathBuf::from("/etc"), files(), "base_model"),
    ];
    for (name, base_model, files, param) in cases {
        let (status, err) = upload(&app, "key-a", form(name, &base_model, files)).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (400, Some(param)),
            "{name}: {err}"
        );
    }
    let (_, listed) = app.get_as("key-a", "/v1/adapters").await;
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["peft-tar", "peft-cat"], "{listed}");

    // vLLM's routes: a folder of the server's, then unloaded
    let folder = app.dir.path().join("peft-adapter");
    copy_dir(&adapter, &folder);
    let load = |body: Value| {
        app.client
            .post(app.url("/v1/load_lora_adapter"))
            .bearer_auth("key-b")
            .json(&body)
            .send()
    };
    let r = load(json!({"lora_name": "from-disk", "lora_path": folder, "base_model": base}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("added successfully"));
    let (_, answer) = app
        .post_as("key-b", "/v1/completions", &complete("from-disk"))
        .await;
    assert_eq!(
        answer["choices"][0]["text"], expected["with_adapter"]["text"],
        "{answer}"
    );
    let r = load(json!({"lora_name": "outside", "lora_path": "/etc", "base_model": base}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["param"], "lora_path", "{err}");
    let r = app
        .client
        .post(app.url("/v1/unload_lora_adapter"))
        .bearer_auth("key-b")
        .json(&json!({"lora_name": "from-disk"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, _) = app
        .post_as("key-b", "/v1/completions", &complete("from-disk"))
        .await;
    assert_eq!(status, 404);

    // OpenAI's model deletion: another key's is not found; the owner's goes
    let del = |key: &str, model: &str| {
        app.client
            .delete(app.url(&format!("/v1/models/{model}")))
            .bearer_auth(key.to_string())
            .send()
    };
    assert_eq!(del("key-b", "peft-cat").await.unwrap().status(), 404);
    let r = del("key-a", "peft-cat").await.unwrap();
    assert_eq!(r.status(), 200);
    let gone: Value = r.json().await.unwrap();
    assert_eq!(
        gone,
        json!({"id": "peft-cat", "object": "model", "deleted": true})
    );
    let (status, _) = app
        .post_as("key-a", "/v1/completions", &complete("peft-cat"))
        .await;
    assert_eq!(status, 404);
    let (_, listed) = app.get_as("key-a", "/v1/adapters").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    app.shutdown().await;
}
