//! The CLI client (`qtune submit/jobs/status/follow/cancel/download`), run as the real binary
//! against a real server on an ephemeral port with a real SQLite file and the tiny model.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::app::{spawn_app_with, TestApp};

/// The server reads no client files: datasets reach it only as uploads (no allowed file dirs).
async fn spawn_server(api_keys: &[&str]) -> TestApp {
    spawn_app_with(|config| {
        config.api_keys = api_keys.iter().map(|k| k.to_string()).collect();
        config.allow_file_dirs.clear();
    })
    .await
}

/// A spec file for the tiny model naming a local dataset (the client uploads it).
fn spec_file(server: &TestApp, name: &str, training: Value) -> PathBuf {
    let data = crate::helpers::memorisable_chat(server.dir.path(), 8);
    let spec = json!({
        "base_model": server.model,
        "dataset": {"url": data, "validation_split": 0.25},
        "lora": {"r": 4, "dropout": 0.0},
        "training": training,
        "checkpoint_every_steps": 5,
    });
    crate::helpers::write(server.dir.path(), name, &spec.to_string())
}

/// Runs the real binary as a client of `server`.
async fn qtune(server: &TestApp, args: &[&str]) -> Output {
    qtune_env(server, args, &[]).await
}

async fn qtune_env(server: &TestApp, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_qtune"));
    cmd.args(args)
        .env("QTUNE_SERVER", &server.base)
        .env_remove("QTUNE_API_KEY")
        .current_dir(server.dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the command finishes")
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn first_line(out: &Output) -> String {
    text(out).0.lines().next().unwrap_or("").trim().to_string()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follows_to_the_end_and_downloads_the_adapter() {
    let server = spawn_server(&[]).await;
    let spec = spec_file(
        &server,
        "job.json",
        json!({"max_steps": 12, "batch_size": 2, "learning_rate": 0.01, "eval_every_steps": 4, "max_seq_len": 64}),
    );
    let out = qtune(
        &server,
        &[
            "submit",
            spec.to_str().unwrap(),
            "--follow",
            "--download",
            "adapter-out",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let id = first_line(&out);
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "first line is the id: {stdout}"
    );
    // the local dataset went up as an upload, and the job names the upload
    assert!(
        stderr.contains("uploaded ") && stderr.contains(" as file-"),
        "{stderr}"
    );
    let job = server.get(&format!("/v1/jobs/{id}")).await.1;
    assert!(job["spec"]["dataset"]["url"]
        .as_str()
        .unwrap()
        .starts_with("file-"));
    // stdout is not a terminal here: one line per step, every step, then the outcome
    for step in 1..=12 {
        assert!(
            stdout.contains(&format!("step {step}/12  loss ")),
            "step {step} missing:\n{stdout}"
        );
    }
    assert!(stdout.contains("eval at step 4: eval loss "), "{stdout}");
    assert!(stdout.contains("checkpoint at step 5"), "{stdout}");
    assert!(
        stdout.contains(&format!("job {id} succeeded: train loss ")),
        "{stdout}"
    );
    assert_eq!(job["status"], "succeeded");

    // the downloaded adapter is the server's, byte for byte, and a loadable safetensors file
    let got = server.dir.path().join("adapter-out");
    assert_eq!(
        files_in(&got),
        ["adapter_config.json", "adapter_model.safetensors"]
    );
    let served = server
        .data_dir
        .join("jobs")
        .join(&id)
        .join("output/adapter/adapter_model.safetensors");
    let bytes = std::fs::read(got.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes, std::fs::read(served).unwrap());
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(tensors.names().iter().any(|n| n.ends_with("lora_A.weight")));

    // jobs, status and download on their own
    let out = qtune(&server, &["jobs"]).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .expect("job listed");
    assert!(row.contains("succeeded") && row.contains("12/12"), "{row}");

    let out = qtune(&server, &["status", &id]).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.contains("status    succeeded"), "{stdout}");
    assert!(stdout.contains("step      12/12"), "{stdout}");

    let out = qtune(&server, &["status", &id, "--json"]).await;
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["progress"]["step"], 12);

    let out = qtune(&server, &["download", &id, "again"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        std::fs::read(server.dir.path().join("again/adapter_model.safetensors")).unwrap(),
        bytes
    );

    // following a finished job replays its history and ends at once
    let out = qtune(&server, &["follow", &id]).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.contains("step 12/12"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_server_errors_reach_the_user_with_a_failing_exit() {
    let server = spawn_server(&[]).await;
    let spec = spec_file(
        &server,
        "long.json",
        json!({"max_steps": 100000, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64}),
    );
    let out = qtune(&server, &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let id = first_line(&out);
    let started = Instant::now();
    while server.get(&format!("/v1/jobs/{id}")).await.1["progress"]["step"]
        .as_i64()
        .unwrap_or(0)
        < 2
    {
        assert!(started.elapsed() < Duration::from_secs(60), "job never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // follow in the background; cancel; follow ends, failing, saying how the job ended
    let follower = {
        let (base, id) = (server.base.clone(), id.clone());
        tokio::spawn(async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_qtune"))
                .args(["follow", &id])
                .env("QTUNE_SERVER", base)
                .output()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = qtune(&server, &["cancel", &id]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("cancel"), "{stdout}");
    let followed = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (stdout, stderr) = text(&followed);
    assert!(!followed.status.success(), "{stdout}");
    assert!(stdout.contains("step 1/100000"), "{stdout}");
    assert!(stderr.contains(&format!("job {id} cancelled")), "{stderr}");
    assert_eq!(
        server.get(&format!("/v1/jobs/{id}")).await.1["status"],
        "cancelled"
    );

    // cancelling again is idempotent
    let out = qtune(&server, &["cancel", &id]).await;
    assert!(out.status.success());
    assert_eq!(first_line(&out), format!("{id}: cancelled"));

    // cancelling a job that succeeded: the server's 409 body, as it wrote it, and exit 1
    let short = spec_file(
        &server,
        "short.json",
        json!({"max_steps": 2, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64}),
    );
    let out = qtune(&server, &["submit", short.to_str().unwrap(), "--follow"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let id = first_line(&out);
    let direct = reqwest::Client::new()
        .post(format!("{}/v1/jobs/{id}/cancel", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 409);
    let body = direct.text().await.unwrap();
    let out = qtune(&server, &["cancel", &id]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("409"), "{stderr}");
    assert!(stderr.contains(&body), "server body {body} not in {stderr}");

    // an invalid spec: refused, the field named, nothing queued
    let bad = spec_file(&server, "bad.json", json!({"learning_rate": -1}));
    let out = qtune(&server, &["submit", bad.to_str().unwrap()]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stderr.contains("training.learning_rate"), "{stderr}");
    assert!(stdout.is_empty(), "no job id for a refused spec: {stdout}");

    // an unknown job, a spec file that is not JSON, and no server at all
    let out = qtune(&server, &["status", "00000000-0000-4000-8000-000000000000"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("404"), "{:?}", text(&out));
    let junk = crate::helpers::write(server.dir.path(), "junk.json", "{not json");
    let out = qtune(&server, &["submit", junk.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("junk.json: not valid JSON"),
        "{:?}",
        text(&out)
    );
    let out = qtune(&server, &["jobs", "--server", "http://127.0.0.1:9"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out)
            .1
            .contains("cannot reach the qtune server at http://127.0.0.1:9"),
        "{:?}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_from_the_environment_or_the_flag() {
    let server = spawn_server(&["k-one"]).await;
    let out = qtune(&server, &["jobs"]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("401"), "{stderr}");
    let out = qtune_env(&server, &["jobs"], &[("QTUNE_API_KEY", "k-one")]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let out = qtune(&server, &["jobs", "--api-key", "k-one"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let out = qtune(&server, &["jobs", "--api-key", "wrong"]).await;
    assert_eq!(out.status.code(), Some(1));
}
