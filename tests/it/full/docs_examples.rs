//! The README's and the getting-started guide's shell blocks, run as a reader runs them: in
//! order, in one bash per page, from a checkout (a temporary folder holding the repository's
//! `examples/`, `scripts/` and `.cache/`), with `qtune` the binary under test and a real
//! `qtune serve` started by the page itself. A renamed flag, field or route fails here.
//!
//! What the runner changes, and only this:
//! - `cargo build --release` is `true` and `target/release/qtune` is the binary under test (it is
//!   built already); `cargo run --release --` is `qtune`.
//! - The line `./scripts/test.sh` is left out: it is the run this test belongs to.
//! - `127.0.0.1:8080` is a free port (also in `QTUNE_LISTEN` and `QTUNE_SERVER`, for the commands
//!   that use the default address), so that runs in parallel do not meet.
//! - `curl` gets `--fail-with-body`: an HTTP error fails the block (the pages leave it out to
//!   show readers the error's body).
//! - The Hub is offline (`HF_HUB_OFFLINE=1`): the quickstart falls back to the GGUF test model.

use std::path::Path;
use std::process::Command;

use crate::helpers::process::free_port;

const TEST_COMMAND: &str = "./scripts/test.sh";

/// A fenced block of a Markdown page that is run: its info string's first word is `bash`.
struct Block {
    line: usize,
    code: String,
}

fn bash_blocks(page: &str) -> (Vec<Block>, Vec<usize>) {
    let (mut run, mut other) = (Vec::new(), Vec::new());
    let mut open: Option<(usize, bool, String)> = None;
    for (i, line) in page.lines().enumerate() {
        if let Some(info) = line.strip_prefix("```") {
            match open.take() {
                None => {
                    let is_bash = info.split([' ', ',']).next() == Some("bash");
                    open = Some((i + 1, is_bash, String::new()));
                }
                Some((start, true, code)) => run.push(Block { line: start, code }),
                Some((start, false, _)) => other.push(start),
            }
            continue;
        }
        if let Some((_, _, code)) = open.as_mut() {
            code.push_str(line);
            code.push('\n');
        }
    }
    (run, other)
}

/// The page's blocks as one script; each block announces itself so a failure names it.
fn script(page_name: &str, blocks: &[Block], port: u16) -> String {
    let mut s = String::from(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n\
         curl() { command curl --fail-with-body \"$@\"; }\n",
    );
    for b in blocks {
        let code = b
            .code
            .lines()
            .filter(|l| l.split_whitespace().next() != Some(TEST_COMMAND))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("cargo build --release", "true")
            .replace("cargo run --release --", "qtune")
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        s.push_str(&format!(
            "echo '>>> {page_name}, the block at line {}' >&2\n{code}\n",
            b.line
        ));
    }
    s.push_str("echo '>>> all blocks ran' >&2\n");
    s
}

/// Runs a page's blocks in a fresh checkout-like folder; returns the folder and the output.
fn run_page(rel: &str) -> (tempfile::TempDir, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join(".cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf")
            .is_file(),
        "run scripts/fetch-test-models.sh first (scripts/test.sh does)"
    );
    let page = std::fs::read_to_string(root.join(rel)).unwrap();
    let (blocks, not_run) = bash_blocks(&page);
    assert!(
        blocks.len() >= 3,
        "{rel}: only {} bash blocks",
        blocks.len()
    );
    eprintln!(
        "{rel}: running {} bash blocks; not shell, so not run: the blocks at lines {not_run:?}",
        blocks.len()
    );
    let dir = tempfile::tempdir().unwrap();
    for name in ["examples", "scripts", ".cache"] {
        std::os::unix::fs::symlink(root.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::create_dir_all(dir.path().join("target/release")).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_qtune"),
        dir.path().join("target/release/qtune"),
    )
    .unwrap();
    let port = free_port();
    let out = Command::new("bash")
        .arg("-c")
        .arg(script(rel, &blocks, port))
        .current_dir(dir.path())
        .env("PATH", path_with_qtune(dir.path()))
        .env("QTUNE_LISTEN", format!("127.0.0.1:{port}"))
        .env("QTUNE_SERVER", format!("http://127.0.0.1:{port}"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.path().join("hf"))
        .env("QTUNE_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed_in = stderr
        .lines()
        .rfind(|l| l.starts_with(">>> "))
        .unwrap_or("before the first block");
    assert!(
        out.status.success() && failed_in == ">>> all blocks ran",
        "{rel} failed {failed_in}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    (dir, stdout)
}

/// `qtune` is found on the PATH, as after `cargo install` (the README exports
/// target/release too, which is the same binary here).
fn path_with_qtune(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.join("target/release").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn assert_peft_folder(dir: &Path) {
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter_config.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display())),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        tensors.names().len(),
        30 * 4 * 2,
        "r 16 on q,k,v,o of 30 layers"
    );
}

#[test]
fn the_readme_runs() {
    let (dir, stdout) = run_page("README.md");
    // the quickstart, the CLI's job and the curl job each went through
    assert!(stdout.contains("succeeded: train loss "), "{stdout}");
    assert_peft_folder(&dir.path().join("runs/quickstart/adapter"));
    assert_peft_folder(&dir.path().join("my-adapter"));
    assert!(stdout.contains("\"status\": \"queued\""), "{stdout}");
    // the chat answered something
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap();
    assert!(!last.contains("null"), "{stdout}");
}

#[test]
fn the_getting_started_guide_runs() {
    let (dir, stdout) = run_page("docs/src/getting-started.md");
    assert!(stdout.contains("file-"), "the upload's id: {stdout}");
    assert!(stdout.contains("\"fits\": true"), "{stdout}");
    assert!(stdout.contains("\"status\": \"succeeded\""), "{stdout}");
    assert!(
        stdout.contains("step,epoch,train_loss,eval_loss"),
        "the CSV header: {stdout}"
    );
    assert_peft_folder(&dir.path().join("adapter"));
    let gguf = std::fs::read(dir.path().join("capitals.gguf")).unwrap();
    assert_eq!(&gguf[..4], b"GGUF");
}
