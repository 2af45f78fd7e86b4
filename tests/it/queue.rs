//! The queue under contention and failure, on a real SQLite file: claims race, leases expire and
//! are taken over, and every write of a worker whose lease was taken is refused.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::helpers::LEASE_SECS;
use qtune::db::{self, Db, Lease};
use qtune::events::{JobEvent, StatusChange};
use qtune::job::{JobId, JobPhase, JobStatus, StepMetrics};
use qtune::spec::JobSpec;
use qtune::worker::{record_outcome, Outcome};

use crate::helpers::app::spawn_app_with;

fn spec() -> JobSpec {
    JobSpec::from_json(
        r#"{"base_model": "m", "dataset": {"url": "https://example.invalid/d.jsonl"}}"#,
    )
    .unwrap()
}

fn step(n: u64) -> StepMetrics {
    StepMetrics {
        step: n,
        total_steps: 10,
        epoch: n as f64 / 10.0,
        train_loss: 1.0 / n as f64,
        train_accuracy: Some(0.5),
        learning_rate: 1e-3,
        grad_norm: 0.5,
        tokens: 100,
        tokens_seen: 100 * n,
        tokens_per_second: 1000.0,
        elapsed_seconds: n as f64,
        rewards: None,
    }
}

fn is_lease_lost<T: std::fmt::Debug>(r: db::Result<T>) -> bool {
    matches!(r, Err(db::Error::LeaseLost { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_race_for_one_job_and_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    // two pools on one database: two processes, as far as the database can tell
    let url = crate::helpers::test_database(dir.path());
    let (a, b) = (
        Db::connect(&url, 4).await.unwrap(),
        Db::connect(&url, 4).await.unwrap(),
    );
    let mut wins = HashMap::from([("worker-a", 0), ("worker-b", 0)]);
    for _ in 0..30 {
        let id = JobId::new();
        a.insert_job(&id, None, &spec(), None).await.unwrap();
        // both ask at the same moment, each on its own runtime thread
        let (ca, cb) = tokio::join!(
            tokio::spawn({
                let a = a.clone();
                async move {
                    a.claim_next("worker-a", LEASE_SECS, u64::MAX)
                        .await
                        .unwrap()
                }
            }),
            tokio::spawn({
                let b = b.clone();
                async move {
                    b.claim_next("worker-b", LEASE_SECS, u64::MAX)
                        .await
                        .unwrap()
                }
            }),
        );
        let winners: Vec<(&str, Lease)> = [("worker-a", ca.unwrap()), ("worker-b", cb.unwrap())]
            .into_iter()
            .filter_map(|(name, c)| Some((name, c?.lease)))
            .collect();
        assert_eq!(winners.len(), 1, "exactly one claim wins");
        let (name, lease) = &winners[0];
        assert_eq!((lease.job.clone(), lease.attempt), (id.clone(), 1));
        *wins.get_mut(name).unwrap() += 1;
        // the job is done with before the next round
        let done = JobEvent::Status(StatusChange::to(JobStatus::Succeeded)).data_json();
        a.finish(lease, JobStatus::Succeeded, None, None, &done)
            .await
            .unwrap();
    }
    println!("claims won: {wins:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_draining_a_queue_claim_each_job_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::helpers::test_database(dir.path());
    let a = Db::connect(&url, 4).await.unwrap();
    const JOBS: usize = 120;
    for _ in 0..JOBS {
        a.insert_job(&JobId::new(), None, &spec(), None)
            .await
            .unwrap();
    }
    // eight workers, each connecting on its own (as separate processes would) while the others
    // already claim, each finishing what it claims
    let drain = |n: usize| {
        let url = url.clone();
        tokio::spawn(async move {
            let db = Db::connect(&url, 1).await.unwrap();
            let name = format!("worker-{n}");
            let mut won = Vec::new();
            while let Some(claim) = db.claim_next(&name, LEASE_SECS, u64::MAX).await.unwrap() {
                db.finish(&claim.lease, JobStatus::Succeeded, None, None, "{}")
                    .await
                    .unwrap();
                won.push(claim.lease.job);
            }
            won
        })
    };
    let racers: Vec<_> = (0..8).map(drain).collect();
    let mut claims: HashMap<JobId, usize> = HashMap::new();
    for racer in racers {
        for id in racer.await.unwrap() {
            *claims.entry(id).or_default() += 1;
        }
    }
    assert_eq!(claims.len(), JOBS, "every job was claimed");
    assert!(claims.values().all(|&n| n == 1), "no job claimed twice");
    for id in claims.keys() {
        let row = a.get_job(id, None).await.unwrap().unwrap();
        assert_eq!((row.status, row.attempt), (JobStatus::Succeeded, 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_the_first_workers_late_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&crate::helpers::test_database(dir.path()), 4)
        .await
        .unwrap();
    let id = JobId::new();
    db.insert_job(&id, None, &spec(), None).await.unwrap();

    let first = db
        .claim_next("worker-a", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    let a: Lease = first.lease;
    assert_eq!((a.job.clone(), a.attempt), (id.clone(), 1));
    // while it holds the lease, its writes land; another worker finds nothing to claim
    assert_eq!(db.heartbeat(&a, LEASE_SECS).await.unwrap(), None);
    db.set_progress(&a, &step(1)).await.unwrap();
    db.insert_checkpoint(&a, 1, "[]", 0).await.unwrap();
    assert!(db
        .claim_next("worker-b", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .is_none());

    // worker A goes silent: its lease runs out and worker B takes the job over
    db.set_lease_expiry(&a, -5).await.unwrap();
    let second = db
        .claim_next("worker-b", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    let b = second.lease;
    assert_eq!((b.job.clone(), b.attempt), (id.clone(), 2));

    // every late write of A is refused
    assert!(is_lease_lost(db.heartbeat(&a, LEASE_SECS).await));
    assert!(is_lease_lost(db.set_phase(&a, JobPhase::Training).await));
    assert!(is_lease_lost(db.set_progress(&a, &step(7)).await));
    assert!(is_lease_lost(db.set_total_steps(&a, 99).await));
    assert!(is_lease_lost(db.set_eval_loss(&a, 9.0).await));
    assert!(is_lease_lost(
        db.insert_event_fenced(&a, "metrics", "{}").await
    ));
    assert!(is_lease_lost(db.insert_checkpoint(&a, 7, "[]", 0).await));
    let done = JobEvent::Status(StatusChange::to(JobStatus::Succeeded)).data_json();
    assert!(is_lease_lost(
        db.finish(&a, JobStatus::Succeeded, None, None, &done).await
    ));
    assert!(is_lease_lost(db.requeue(&a, JobStatus::Queued, "{}").await));

    // B's writes land, and the job shows B's work only
    db.set_progress(&b, &step(2)).await.unwrap();
    db.insert_event_fenced(&b, "metrics", "{}").await.unwrap();
    db.insert_checkpoint(&b, 2, "[]", 0).await.unwrap();
    let row = db.get_job(&id, None).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.step, row.tokens_seen),
        (JobStatus::Running, 2, 200)
    );
    assert_eq!(
        row.total_steps,
        Some(10),
        "A's set_total_steps(99) did not land"
    );
    assert_eq!(row.eval_loss, None);
    let steps: Vec<i64> = db
        .list_checkpoints(&id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, [1, 2], "A's late checkpoint 7 is not recorded");
    assert_eq!(db.events_after(id.as_str(), 0).await.unwrap().len(), 1);
    db.finish(&b, JobStatus::Succeeded, None, None, &done)
        .await
        .unwrap();
    let row = db.get_job(&id, None).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requeue_at_shutdown_is_written_and_its_failure_surfaces() {
    // no workers: the test plays the worker, through the service's own state and outcome writer
    let app = spawn_app_with(|c| c.devices.clear()).await;
    let state = &app.state;
    let id = JobId::new();
    state.db.insert_job(&id, None, &spec(), None).await.unwrap();
    let mut live = state.events.subscribe();

    let claim = state
        .db
        .claim_next("test", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    record_outcome(state, &claim.lease, &Outcome::Interrupted)
        .await
        .expect("a requeue by the lease holder is written");
    let row = state.db.get_job(&id, None).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempt), (JobStatus::Queued, 1));
    let announced = live.recv().await.unwrap();
    let stored = state.db.events_after(id.as_str(), 0).await.unwrap();
    assert_eq!(
        stored.last().unwrap().id,
        announced.id,
        "stored, then announced"
    );
    match JobEvent::parse(&announced.kind, &announced.data).unwrap() {
        JobEvent::Status(s) => {
            assert_eq!(s.status, JobStatus::Queued);
            assert!(s.reason.unwrap().contains("shutting down"));
        }
        other => panic!("{other:?}"),
    }

    // a requeue whose lease was taken over is refused, and the caller hears why
    let second = state
        .db
        .claim_next("test", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.lease.attempt, 2, "the requeued job is claimed again");
    state.db.set_lease_expiry(&second.lease, -1).await.unwrap();
    let third = state
        .db
        .claim_next("other", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    let err = record_outcome(state, &second.lease, &Outcome::Interrupted)
        .await
        .expect_err("the lease is gone");
    assert!(
        matches!(err, db::Error::LeaseLost { attempt: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(id.as_str()), "{err}");
    let row = state.db.get_job(&id, None).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempt), (JobStatus::Running, 3));

    // the same for a finish: the taken-over attempt's result is not written
    let err = record_outcome(
        state,
        &second.lease,
        &Outcome::Succeeded {
            adapter: vec![],
            note: None,
        },
    )
    .await
    .expect_err("the lease is gone");
    assert!(matches!(err, db::Error::LeaseLost { .. }));
    record_outcome(state, &third.lease, &Outcome::Cancelled)
        .await
        .unwrap();
    let row = state.db.get_job(&id, None).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Cancelled);
    app.shutdown().await;
}

#[tokio::test]
async fn the_status_list_is_the_one_the_schema_allows() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&crate::helpers::test_database(dir.path()), 4)
        .await
        .unwrap();
    let allowed = db.allowed_statuses().await.unwrap();
    let ours: Vec<String> = JobStatus::ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(allowed, ours);
}

/// Each takeover of an expired lease counts as a failover (a graceful requeue does not); a worker
/// that claims a job past `--max-failovers` fails it, naming the count, instead of running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_losing_its_worker_fails_with_too_many_failovers() {
    let app = spawn_app_with(|c| {
        c.workers = Some(0);
        c.max_failovers = 2;
    })
    .await;
    let id = app.submit(&app.job(json!({}))).await;
    let db = &app.state.db;
    let mut failovers = Vec::new();
    for worker in ["w1", "w2", "w3"] {
        let claim = db
            .claim_next(worker, LEASE_SECS, u64::MAX)
            .await
            .unwrap()
            .unwrap();
        failovers.push(claim.failovers);
        // the worker dies: its lease runs out
        db.set_lease_expiry(&claim.lease, -1).await.unwrap();
    }
    assert_eq!(failovers, [0, 1, 2]);
    // a graceful requeue is no failover
    let claim = db
        .claim_next("w4", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.failovers, 3);
    db.requeue(&claim.lease, JobStatus::Queued, "{}")
        .await
        .unwrap();
    let claim = db
        .claim_next("w5", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.failovers, 3);
    db.set_lease_expiry(&claim.lease, -1).await.unwrap();

    // a real worker takes it over once more (4 > 2) and fails it
    let worker = tokio::spawn(qtune::worker::run(app.state.clone(), "cpu".into()));
    let job = app
        .wait_status(&id, &["failed"], Duration::from_secs(30))
        .await;
    assert_eq!(job["error"]["code"], "too_many_failovers", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("4 times") && message.contains("--max-failovers 2"),
        "{message}"
    );
    app.state.shutdown.cancel();
    worker.await.unwrap();
}

/// A database made by an earlier qtune (migrations 1 to 4) upgrades in place: its jobs, events
/// and checkpoints stay, and the rebuilt jobs table takes `paused`.
#[tokio::test]
async fn an_older_sqlite_database_upgrades_with_its_jobs() {
    use sqlx::Executor;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("old.db").display());
    sqlx::any::install_default_drivers();
    {
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        pool.execute("PRAGMA foreign_keys = ON").await.unwrap();
        let migrations = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite");
        let mut old = sqlx::migrate::Migrator::new(std::path::Path::new(migrations))
            .await
            .unwrap();
        old.migrations = old
            .migrations
            .iter()
            .filter(|m| m.version <= 4)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        old.run(&pool).await.unwrap();
        // a resolved spec as an earlier qtune stored it, without fields added later
        // (compute_dtype, packing, gradient_checkpointing, eval_every_steps, metadata)
        const OLD_SPEC: &str = r#"{"base_model":"m","revision":null,"dataset":{"url":"d.jsonl","format":"auto","validation_url":null,"validation_split":null},"lora":{"r":8,"alpha":16.0,"dropout":0.05,"target_modules":["q_proj","k_proj","v_proj","o_proj"],"use_rslora":false},"quantization":null,"training":{"epochs":3,"max_steps":null,"batch_size":4,"gradient_accumulation_steps":1,"learning_rate":0.0002,"lr_scheduler":"linear","warmup_steps":0,"warmup_ratio":0.0,"optimizer":"adamw","weight_decay":0.0,"adam_beta1":0.9,"adam_beta2":0.999,"adam_epsilon":1e-8,"momentum":0.0,"max_grad_norm":1.0,"max_seq_len":1024,"train_on_inputs":false},"checkpoint_every_steps":null,"suffix":null,"seed":42,"from_checkpoint":null}"#;
        pool.execute(
            &*"INSERT INTO jobs (id, owner, status, spec, created_at, step, attempt, failovers)
             VALUES ('00000000-0000-4000-8000-000000000001', 'k', 'succeeded', '{OLD_SPEC}',
                     '2026-01-01T00:00:00.000000Z', 4, 1, 0);
             INSERT INTO jobs (id, owner, status, spec, created_at, step, attempt, failovers)
             VALUES ('00000000-0000-4000-8000-000000000002', 'k', 'failed', '{}',
                     '2026-01-01T00:00:02.000000Z', 0, 1, 0);
             INSERT INTO job_events (job_id, kind, data, created_at)
             VALUES ('00000000-0000-4000-8000-000000000001', 'status', '{\"status\":\"queued\"}',
                     '2026-01-01T00:00:00.000000Z');
             INSERT INTO checkpoints (job_id, step, created_at, files)
             VALUES ('00000000-0000-4000-8000-000000000001', 2, '2026-01-01T00:00:01.000000Z', '[]');"
                .replace("{OLD_SPEC}", OLD_SPEC),
        )
        .await
        .unwrap();
        pool.close().await;
    }
    let db = Db::connect(&url, 2).await.unwrap();
    let allowed = db.allowed_statuses().await.unwrap();
    assert!(allowed.contains(&"paused".to_string()), "{allowed:?}");
    let id = JobId::parse("00000000-0000-4000-8000-000000000001").unwrap();
    let job = db
        .get_job(&id, Some("k"))
        .await
        .unwrap()
        .expect("the job survived");
    assert_eq!((job.status, job.step), (JobStatus::Succeeded, 4));
    // the fields it lacks read back as their defaults
    assert!(job.spec.training.packing);
    assert_eq!(job.spec.lora.target_modules.len(), 4);
    // a row whose spec no longer reads (edited by hand) is an error when read alone, and is
    // left out of a listing rather than hiding the owner's other jobs
    let broken = JobId::parse("00000000-0000-4000-8000-000000000002").unwrap();
    let e = db.get_job(&broken, Some("k")).await.unwrap_err();
    assert!(e.to_string().contains("spec"), "{e}");
    let listed = db.list_jobs(Some("k"), None, None, 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        vec![id.clone()]
    );
    assert_eq!(db.events_after(id.as_str(), 0).await.unwrap().len(), 1);
    assert_eq!(db.list_checkpoints(&id).await.unwrap().len(), 1);
    // foreign keys still hold: deleting the job takes its events and checkpoints with it
    assert!(matches!(
        db.delete_job(&id, Some("k")).await.unwrap(),
        db::DeleteOutcome::Deleted
    ));
    assert!(db.events_after(id.as_str(), 0).await.unwrap().is_empty());
    assert!(db.list_checkpoints(&id).await.unwrap().is_empty());
    // and a second start finds nothing to do
    drop(db);
    Db::connect(&url, 2).await.unwrap();
}

/// A worker that dies after being asked to pause or cancel leaves its job `running` with a stop
/// request no claim will take; once its lease has expired the job is ended as asked.
#[tokio::test]
async fn a_stop_request_outlives_the_worker_it_was_sent_to() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&crate::helpers::test_database(dir.path()), 4)
        .await
        .unwrap();
    let (pausing, cancelling) = (JobId::new(), JobId::new());
    for id in [&pausing, &cancelling] {
        db.insert_job(id, None, &spec(), None).await.unwrap();
        let claim = db
            .claim_next("w", LEASE_SECS, u64::MAX)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&claim.lease.job, id);
    }
    assert!(matches!(
        db.request_pause(&pausing, None).await.unwrap(),
        db::PauseOutcome::Requested
    ));
    assert!(matches!(
        db.request_cancel(&cancelling, None).await.unwrap(),
        db::CancelOutcome::Requested
    ));
    // leases still live: nothing to settle, and no claim takes them
    assert!(db
        .settle_stopped_orphans("{}", "{}")
        .await
        .unwrap()
        .is_empty());
    for (id, attempt) in [(&pausing, 1), (&cancelling, 1)] {
        let lease = Lease {
            job: id.clone(),
            attempt,
        };
        db.set_lease_expiry(&lease, -1).await.unwrap();
    }
    assert!(db
        .claim_next("w2", LEASE_SECS, u64::MAX)
        .await
        .unwrap()
        .is_none());
    let mut settled = db
        .settle_stopped_orphans(r#"{"status":"paused"}"#, r#"{"status":"cancelled"}"#)
        .await
        .unwrap();
    settled.sort_by_key(|s| s.2);
    assert_eq!(settled.len(), 2);
    let status = |id: &JobId| {
        let db = db.clone();
        let id = id.clone();
        async move { db.get_job(&id, None).await.unwrap().unwrap().status }
    };
    assert_eq!(status(&pausing).await, JobStatus::Paused);
    assert_eq!(status(&cancelling).await, JobStatus::Cancelled);
    // the paused one resumes like any other
    let (outcome, _) = db.resume(&pausing, None, "{}").await.unwrap();
    assert!(matches!(outcome, db::ResumeOutcome::Resumed));
    assert_eq!(
        db.claim_next("w2", LEASE_SECS, u64::MAX)
            .await
            .unwrap()
            .unwrap()
            .lease
            .job,
        pausing
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_skips_a_job_whose_estimated_peak_exceeds_the_workers_free_memory() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&crate::helpers::test_database(dir.path()), 4)
        .await
        .unwrap();
    let id = JobId::new();
    db.insert_job(&id, None, &spec(), None).await.unwrap();
    // unknown needs: any worker may claim it; its estimate is recorded and it goes back
    let first = db
        .claim_next("small", LEASE_SECS, 1000)
        .await
        .unwrap()
        .unwrap();
    db.set_job_memory(&first.lease, 5000).await.unwrap();
    db.requeue(&first.lease, JobStatus::Queued, "{}")
        .await
        .unwrap();
    // a late estimate of that attempt is refused
    assert!(is_lease_lost(db.set_job_memory(&first.lease, 1).await));
    assert!(db
        .claim_next("small", LEASE_SECS, 4999)
        .await
        .unwrap()
        .is_none());
    let second = db
        .claim_next("large", LEASE_SECS, 5000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((second.lease.job, second.lease.attempt), (id, 2));

    // the pool as workers report it: one row each, rewritten, largest device first
    db.report_worker("w-small", "cpu", 1 << 30, 1 << 29, Some(100.0))
        .await
        .unwrap();
    db.report_worker("w-large", "cuda:0", 80 << 30, 70 << 30, None)
        .await
        .unwrap();
    db.report_worker("w-small", "cpu", 2 << 30, 1 << 30, Some(120.0))
        .await
        .unwrap();
    let pool = db.live_workers().await.unwrap();
    let seen: Vec<(&str, i64, i64, Option<f64>)> = pool
        .iter()
        .map(|w| (w.id.as_str(), w.total_bytes, w.free_bytes, w.gflops))
        .collect();
    assert_eq!(
        seen,
        [
            ("w-large", 80 << 30, 70 << 30, None),
            ("w-small", 2 << 30, 1 << 30, Some(120.0))
        ]
    );
    db.remove_worker("w-large").await.unwrap();
    assert_eq!(db.live_workers().await.unwrap().len(), 1);
}
