//! The server's log names the job in every line its engine writes during that job.

use std::time::Duration;

use serde_json::json;

use crate::helpers::process::{free_port, ServeProcess};
use crate::helpers::{memorisable_chat, tiny_model};

#[test]
fn engine_log_lines_during_a_job_carry_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = memorisable_chat(dir.path(), 8);
    let log = dir.path().join("serve.log");
    let server = ServeProcess::start(
        &dir.path().join("data"),
        dir.path(),
        free_port(),
        Some(&log),
    );
    let id = server.submit(&json!({
        "base_model": model, "dataset": {"url": format!("file://{}", data.display())},
        "lora": {"r": 4, "dropout": 0.0}, "checkpoint_every_steps": 2,
        "training": {"max_steps": 4, "batch_size": 2, "max_seq_len": 64},
    }));
    let done = server.wait_job(&id, Duration::from_secs(120), |j| {
        j["status"] != "queued" && j["status"] != "running"
    });
    assert_eq!(done["status"], "succeeded", "{done}");
    // the worker logs the finish just after recording it: wait for the line before the kill
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("job finished")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no 'job finished' line"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();

    let text = std::fs::read_to_string(&log).unwrap();
    let engine: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("qtune::train"))
        .collect();
    for message in [
        "base model loaded",
        "data tokenized",
        "checkpoint written",
        "adapter saved",
    ] {
        assert!(
            engine.iter().any(|l| l.contains(message)),
            "the engine logged {message:?}:\n{text}"
        );
    }
    let tag = format!("job.id={id}");
    for line in &engine {
        assert!(
            line.contains(&tag),
            "engine line without the job id: {line}"
        );
    }
    // and the worker's own lines about the job carry it too
    assert!(text
        .lines()
        .any(|l| l.contains("job finished") && l.contains(&tag)));
}
