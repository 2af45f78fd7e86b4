//! A bad day on the host: the server is SIGKILLed at random (seeded) moments while ten jobs run
//! and is started again each time; every job still ends `succeeded` exactly once, with every
//! step in its history once and the right token count.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::helpers::app::parse_sse;
use crate::helpers::process::{free_port, ServeProcess};
use crate::helpers::{memorisable_chat, tiny_model};

/// Steps of each job: the ten jobs take about 25 s here, so every kill lands in the middle of
/// work even on a machine several times faster.
const STEPS: u64 = 1500;

#[test]
fn ten_jobs_survive_five_kills() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = memorisable_chat(dir.path(), 8);
    let data_dir = dir.path().join("data");
    let port = free_port();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
    let mut server = ServeProcess::start(&data_dir, dir.path(), port, None);
    let ids: Vec<String> = (0..10)
        .map(|i| {
            server.submit(&json!({
                "base_model": model, "dataset": {"url": format!("file://{}", data.display())},
                "lora": {"r": 4, "dropout": 0.1}, "checkpoint_every_steps": 37, "seed": i,
                "training": {"max_steps": STEPS, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64},
            }))
        })
        .collect();
    for kill in 0..5 {
        std::thread::sleep(Duration::from_millis(rng.random_range(100..900)));
        let reached = steps(&server, &ids);
        println!("kill {} after the jobs reached {reached:?}", kill + 1);
        assert!(
            reached.iter().any(|&s| s < STEPS as i64),
            "the kill must interrupt work: make the jobs longer"
        );
        server.kill();
        server = ServeProcess::start(&data_dir, dir.path(), port, None);
    }
    let start = Instant::now();
    while !ids.iter().all(|id| server.job(id)["status"] == "succeeded") {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "not all succeeded: {:?}",
            ids.iter()
                .map(|id| server.job(id)["status"].clone())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for id in &ids {
        let job = server.job(id);
        let log = server
            .client
            .get(format!("{}/v1/jobs/{id}/events", server.base))
            .send()
            .unwrap()
            .text()
            .unwrap();
        let events = parse_sse(&log);
        let finished: Vec<&Value> = events
            .iter()
            .filter(|(_, kind, d)| kind == "status" && d["status"] == "succeeded")
            .map(|(_, _, d)| d)
            .collect();
        assert_eq!(finished.len(), 1, "{id} succeeded exactly once");
        // the loss curve reads as one run: every step once, in order
        let metrics: Value = server
            .client
            .get(format!("{}/v1/jobs/{id}/metrics", server.base))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let rows: Vec<&Value> = metrics["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| !r["train_loss"].is_null())
            .collect();
        let steps: Vec<i64> = rows.iter().map(|r| r["step"].as_i64().unwrap()).collect();
        assert_eq!(steps, (1..=STEPS as i64).collect::<Vec<_>>(), "{id}");
        // tokens_seen: the last attempt's count of every step, redone ones not counted twice
        let last_by_step = events.iter().fold(
            std::collections::BTreeMap::new(),
            |mut by_step, (_, kind, d)| {
                if kind == "metrics" {
                    by_step.insert(d["step"].as_u64().unwrap(), d["tokens"].as_u64().unwrap());
                }
                by_step
            },
        );
        let expected: u64 = last_by_step.values().sum();
        assert_eq!(job["progress"]["tokens_seen"], expected, "{id}: {job}");
    }
    server.kill();
}

fn steps(server: &ServeProcess, ids: &[String]) -> Vec<i64> {
    ids.iter()
        .map(|id| server.job(id)["progress"]["step"].as_i64().unwrap_or(0))
        .collect()
}
