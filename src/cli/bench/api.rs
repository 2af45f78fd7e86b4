//! `qtune bench-api`: request rate and latency percentiles of the job API under load, with the
//! database holding many jobs, first idle and then while training jobs run on the same machine;
//! then the queue's claim throughput with eight workers racing. SQLite in a temporary directory,
//! or the PostgreSQL database `--database` names.
//!
//! The server runs in this process on its own runtime; the load generator is a second runtime
//! with its own threads, issuing requests over loopback from `connections` concurrent tasks.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::app::App;
use crate::config::ServeConfig;

pub struct ApiBenchOptions {
    pub jobs: usize,
    pub connections: usize,
    pub seconds: u64,
    /// Base model of the training job run during the second measurement.
    pub train_model: Option<String>,
    /// `postgres://…` to measure on (it gets the benchmark's jobs); SQLite in a temp dir if None.
    pub database: Option<String>,
    /// Workers (and training jobs) during the second measurement.
    pub workers: usize,
}

struct Stats {
    requests: usize,
    errors: usize,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `connections` tasks, each looping over `paths` for `seconds`.
fn load(base: &str, paths: &[String], connections: usize, seconds: u64) -> Stats {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let tasks: Vec<_> = (0..connections)
            .map(|c| {
                let client = client.clone();
                let urls: Vec<String> = paths.iter().map(|p| format!("{base}{p}")).collect();
                tokio::spawn(async move {
                    let (mut lat, mut errors, mut i) = (Vec::new(), 0usize, c);
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        let ok = match client.get(&urls[i % urls.len()]).send().await {
                            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                            Err(_) => false,
                        };
                        lat.push(t0.elapsed().as_secs_f64() * 1e3);
                        errors += usize::from(!ok);
                        i += 1;
                    }
                    (lat, errors)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.expect("load task");
            all.extend(l);
            errors += e;
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Stats {
            requests: all.len(),
            errors,
            rps: all.len() as f64 / elapsed,
            p50_ms: percentile(&all, 0.50),
            p90_ms: percentile(&all, 0.90),
            p99_ms: percentile(&all, 0.99),
            max_ms: all.last().copied().unwrap_or(f64::NAN),
        }
    })
}

fn print(label: &str, s: &Stats) {
    println!(
        "  {label:<44} {:>8} req {:>4} err {:>9.0} req/s   p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.1} ms",
        s.requests, s.errors, s.rps, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
    );
}

pub fn run(opts: &ApiBenchOptions) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut config = ServeConfig::for_data_dir(dir.join("data"));
    config.database = opts.database.clone();
    config.devices = vec!["cpu".into(); opts.workers.max(1)];
    config.allow_file_dirs = vec![dir.clone()];
    config.allow_model_dirs = vec![dir.clone()];
    if let Some(parent) = opts
        .train_model
        .as_deref()
        .and_then(|m| std::path::Path::new(m).parent())
    {
        config.allow_model_dirs.push(parent.to_path_buf());
    }
    let (base, state) = server_rt.block_on(async {
        let app = App::build(config).await?;
        let base = format!("http://127.0.0.1:{}", app.port());
        let state = app.state();
        tokio::spawn(app.run_until_stopped(std::future::pending()));
        anyhow::Ok((base, state))
    })?;
    // Fill the database: jobs created through the db layer, then cancelled, so the worker
    // leaves them alone.
    let ids: Vec<String> = server_rt.block_on(async {
        let mut ids = Vec::new();
        for i in 0..opts.jobs {
            let id = crate::job::JobId::new();
            let spec = serde_json::json!({"base_model": format!("model-{i}"), "dataset": {"url": "https://example.invalid/d.jsonl"}});
            let spec = crate::spec::JobSpec::from_json(&spec.to_string())?;
            state.db.insert_job(&id, None, &spec, None).await?;
            state.db.request_cancel(&id, None).await?;
            ids.push(id.to_string());
        }
        anyhow::Ok(ids)
    })?;
    let one: Vec<String> = ids
        .iter()
        .step_by((ids.len() / 100).max(1))
        .map(|id| format!("/v1/jobs/{id}"))
        .collect();
    let list = vec!["/v1/jobs?limit=50".to_string()];
    println!(
        "qtune bench-api on {}: {} jobs in the database, {} concurrent connections, {} s per measurement, {} CPU threads",
        crate::db::redact(&config_url(opts, &dir)),
        opts.jobs,
        opts.connections,
        opts.seconds,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let idle_one = load(&base, &one, opts.connections, opts.seconds);
    print("idle: GET /v1/jobs/{id}", &idle_one);
    let idle_list = load(&base, &list, opts.connections, opts.seconds);
    print("idle: GET /v1/jobs?limit=50", &idle_list);

    // Now with a training job running on the same machine.
    let model = match &opts.train_model {
        Some(m) => m.clone(),
        None => {
            let path = dir.join("model");
            let mut cfg = super::random_model::tiny_config();
            (
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_hidden_layers,
                cfg.head_dim,
            ) = (256, 768, 8, 64);
            super::random_model::write_model_dir(&path, &cfg, 0)?;
            path.display().to_string()
        }
    };
    let data = dir.join("data.jsonl");
    std::fs::write(&data, (0..64).map(|i| format!("{{\"text\": \"sample number {i} with some words to train on, repeated a few times over\"}}\n")).collect::<String>())?;
    let job = serde_json::json!({
        "base_model": model, "dataset": {"url": format!("file://{}", data.display())},
        "training": {"max_steps": 100000, "batch_size": 8, "max_seq_len": 128},
    });
    let client = reqwest::blocking::Client::new();
    let mut job_ids = Vec::new();
    for _ in 0..opts.workers.max(1) {
        let created: serde_json::Value = client
            .post(format!("{base}/v1/jobs"))
            .json(&job)
            .send()?
            .json()?;
        job_ids.push(created["id"].as_str().unwrap_or_default().to_string());
    }
    let started = Instant::now();
    for job_id in &job_ids {
        loop {
            let j: serde_json::Value = client
                .get(format!("{base}/v1/jobs/{job_id}"))
                .send()?
                .json()?;
            if j["progress"]["step"].as_i64().unwrap_or(0) >= 1 {
                break;
            }
            if j["status"] == "failed" || started.elapsed() > Duration::from_secs(300) {
                anyhow::bail!("the training job did not start: {j}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let job_id = job_ids[0].clone();
    println!(
        "  ({} training job(s) on {model} running, one per worker)",
        job_ids.len()
    );
    let busy_one = load(&base, &one, opts.connections, opts.seconds);
    print("training: GET /v1/jobs/{id}", &busy_one);
    let busy_list = load(&base, &list, opts.connections, opts.seconds);
    print("training: GET /v1/jobs?limit=50", &busy_list);
    let j: serde_json::Value = client
        .get(format!("{base}/v1/jobs/{job_id}"))
        .send()?
        .json()?;
    println!(
        "  (training advanced to step {} meanwhile)",
        j["progress"]["step"]
    );
    for job_id in &job_ids {
        client
            .post(format!("{base}/v1/jobs/{job_id}/cancel"))
            .send()?;
    }
    state.shutdown.cancel();
    server_rt.block_on(claim_race(&config_url(opts, &dir), 8, 1000))?;
    drop(server_rt);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn config_url(opts: &ApiBenchOptions, dir: &std::path::Path) -> String {
    let mut config = ServeConfig::for_data_dir(dir.join("data"));
    config.database = opts.database.clone();
    config.database_url()
}

/// `jobs` queued jobs claimed by `workers` racing, each on its own connection, each finishing
/// what it claims at once: claims per second, and a check that no job was claimed twice.
async fn claim_race(url: &str, workers: usize, jobs: usize) -> anyhow::Result<()> {
    use anyhow::Context;
    let db = crate::db::Db::connect(url, 2).await.context("connect")?;
    let spec = crate::spec::JobSpec::from_json(r#"{"base_model": "m", "dataset": {"url": "d"}}"#)?;
    for _ in 0..jobs {
        db.insert_job(&crate::job::JobId::new(), None, &spec, None)
            .await
            .context("insert")?;
    }
    let started = Instant::now();
    let racers: Vec<_> = (0..workers)
        .map(|w| {
            let url = url.to_string();
            tokio::spawn(async move {
                let db = crate::db::Db::connect(&url, 1).await.context("connect")?;
                let (mut claimed, mut refused) = (Vec::new(), 0usize);
                // SQLite has one write lock, which its waiters take in no order: under eight
                // writers in a tight loop one can wait past its busy timeout and be refused
                // ("database is locked"). A refused claim or finish is retried, as the worker
                // loop retries, and counted.
                let locked = |e: &crate::db::Error| e.to_string().contains("database is locked");
                loop {
                    let claim = match db.claim_next(&format!("bench-{w}"), 60, u64::MAX).await {
                        Ok(Some(claim)) => claim,
                        Ok(None) => break,
                        Err(e) if locked(&e) && refused < 1000 => {
                            refused += 1;
                            continue;
                        }
                        Err(e) => return Err(e).context("claim"),
                    };
                    loop {
                        match db
                            .finish(
                                &claim.lease,
                                crate::job::JobStatus::Succeeded,
                                None,
                                None,
                                "{}",
                            )
                            .await
                        {
                            Ok(_) => break,
                            Err(e) if locked(&e) && refused < 1000 => refused += 1,
                            Err(e) => return Err(e).context("finish"),
                        }
                    }
                    claimed.push(claim.lease.job.to_string());
                }
                anyhow::Ok((claimed, refused))
            })
        })
        .collect();
    let (mut all, mut refused) = (Vec::new(), 0);
    for r in racers {
        let (claimed, n) = r.await??;
        all.extend(claimed);
        refused += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    let unique: std::collections::HashSet<&String> = all.iter().collect();
    println!(
        "  claim race: {} jobs claimed and finished by {workers} workers in {seconds:.2} s: {:.0} claims/s ({} claimed twice, {refused} claims refused as locked and retried)",
        all.len(),
        all.len() as f64 / seconds,
        all.len() - unique.len()
    );
    anyhow::ensure!(unique.len() == all.len(), "a job was claimed twice");
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("qtune-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
