//! The OpenAI-compatible API driven by the official `openai` Python SDK (tests/openai/
//! sdk_flow.py), against this server over real HTTP: files, jobs with hyperparameters and the
//! `qtune` extra, paged events, checkpoints, results files, pause and resume, cancel, metadata
//! filters, idempotency keys and errors as the SDK's own exception classes. scripts/test.sh
//! installs the pinned SDK into a venv and names its Python in QTUNE_TEST_OPENAI_PYTHON.

use std::time::Duration;

use crate::helpers::app::spawn_app_with;

fn sdk_python() -> String {
    std::env::var("QTUNE_TEST_OPENAI_PYTHON").expect(
        "QTUNE_TEST_OPENAI_PYTHON names a Python with the pinned openai SDK: run the tests \
         through scripts/test.sh, which installs it",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_sdk_fine_tunes_through_qtune() {
    run_flow("sdk_flow.py", "flow passed").await;
}

/// DPO with OpenAI's preference file format, from a supervised job's model, as the SDK does it
/// (tests/openai/dpo_flow.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_sdk_trains_dpo_through_qtune() {
    run_flow("dpo_flow.py", "dpo flow passed").await;
}

/// Runs one of tests/openai/'s SDK scripts against a fresh server with two API keys.
async fn run_flow(script: &str, passed: &str) {
    let python = sdk_python();
    let app = spawn_app_with(|c| c.api_keys = vec!["key-a".into(), "key-b".into()]).await;
    let work = tempfile::tempdir().unwrap();
    let script = format!("{}/tests/openai/{script}", env!("CARGO_MANIFEST_DIR"));
    let run = tokio::process::Command::new(&python)
        .arg(script)
        .env("OPENAI_BASE_URL", app.url("/v1"))
        .env("QTUNE_KEY_A", "key-a")
        .env("QTUNE_KEY_B", "key-b")
        .env("QTUNE_MODEL", app.model.to_str().unwrap())
        .env("QTUNE_WORK", work.path())
        .env_remove("OPENAI_API_KEY")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the SDK flow finishes within 10 minutes")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the openai SDK flow failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(passed), "{stdout}");
    println!("{stdout}");
    app.shutdown().await;
}
