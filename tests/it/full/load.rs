//! Serving under load, on the real `qtune serve` process and SmolLM2's GGUF: 64 concurrent
//! chat requests with long prompts, a quarter of whose clients hang up and a quarter of whose
//! streams nobody reads. The key/value caches stay within `--kv-cache-mib`, the excess is
//! answered 429 with Retry-After, `/healthz` stays quick throughout, and everything reserved
//! is given back; one prompt at the context limit peaks under 1.5 GB.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::process::{free_port, ServeProcess};

const KV_MIB: u64 = 192;
const SENTENCE: &str = "The quick brown fox jumps over the lazy dog near the river bank. ";

/// `VmRSS` or `VmHWM` of process `pid`, in bytes.
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

fn metric(server: &ServeProcess, name: &str) -> f64 {
    let text = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn serve(dir: &Path, model_dir: &Path, extra: &[&str]) -> ServeProcess {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["serve", "--listen", &listen, "--workers", "0"];
    args.extend_from_slice(extra);
    ServeProcess::spawn(&args, dir, model_dir, port, &[], None)
}

fn chat(model: &str, prompt: String, max_tokens: usize, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": prompt}],
           "max_tokens": max_tokens, "temperature": 0, "stream": stream})
}

/// What one client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Answered,
    Busy,
    HungUp,
    StreamLeftUnread,
}

#[test]
fn sixty_four_clients_with_long_prompts_stay_within_the_cache_budget() {
    let gguf = crate::helpers::test_model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = gguf.to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let kv = KV_MIB.to_string();
    let server = Arc::new(serve(
        dir.path(),
        gguf.parent().unwrap(),
        &[
            "--kv-cache-mib",
            &kv,
            "--max-concurrent-generations",
            "8",
            "--max-waiting-generations",
            "16",
        ],
    ));
    let pid = server.child.id();
    let url = format!("{}/v1/chat/completions", server.base);
    // the model loaded: what the process holds before the caches
    let first = server
        .client
        .post(&url)
        .json(&chat(&model, "hi".into(), 2, false))
        .send()
        .unwrap();
    assert_eq!(first.status(), 200);
    let baseline = memory(pid, "VmRSS");

    let stop = Arc::new(AtomicBool::new(false));
    let health = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut took = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let ok = server
                    .client
                    .get(format!("{}/healthz", server.base))
                    .send()
                    .is_ok_and(|r| r.status() == 200);
                assert!(ok, "/healthz answered");
                took.push(start.elapsed().as_secs_f64());
                std::thread::sleep(Duration::from_millis(20));
            }
            took
        })
    };
    let peak_cache = Arc::new(Mutex::new(0f64));
    let sampler = {
        let (server, stop, peak_cache) = (server.clone(), stop.clone(), peak_cache.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let used = metric(&server, "qtune_kv_cache_bytes");
                let mut peak = peak_cache.lock().unwrap();
                *peak = peak.max(used);
                drop(peak);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let clients: Vec<_> = (0..64)
        .map(|i| {
            let (url, model) = (url.clone(), model.clone());
            std::thread::spawn(move || {
                let prompt = format!("Story {i}. {}", SENTENCE.repeat(70));
                let client = reqwest::blocking::Client::builder()
                    .timeout(if i % 4 == 0 {
                        Duration::from_millis(700)
                    } else {
                        Duration::from_secs(600)
                    })
                    .build()
                    .unwrap();
                let sent = client
                    .post(&url)
                    .json(&chat(&model, prompt, 16, i % 4 == 1))
                    .send();
                let mut answer = match sent {
                    Err(e) if i % 4 == 0 && e.is_timeout() => return Outcome::HungUp,
                    Err(e) => panic!("client {i}: {e}"),
                    Ok(a) => a,
                };
                if answer.status() == 429 {
                    let retry = answer.headers().get("retry-after").map(|v| v.to_owned());
                    assert!(retry.is_some(), "client {i}: a 429 says when to retry");
                    return Outcome::Busy;
                }
                assert_eq!(answer.status(), 200, "client {i}");
                match i % 4 {
                    // the stream is open and nobody reads it; then the client goes
                    1 => {
                        std::thread::sleep(Duration::from_secs(3));
                        Outcome::StreamLeftUnread
                    }
                    0 => {
                        // an answer within the hang-up timeout still counts as one
                        let mut body = String::new();
                        match answer.read_to_string(&mut body) {
                            Ok(_) => Outcome::Answered,
                            Err(_) => Outcome::HungUp,
                        }
                    }
                    _ => {
                        let body: Value = answer.json().unwrap();
                        assert_eq!(body["usage"]["completion_tokens"], 16, "{body}");
                        Outcome::Answered
                    }
                }
            })
        })
        .collect();
    let outcomes: Vec<Outcome> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let peak_rss = memory(pid, "VmHWM");

    // everything reserved is given back once the hung-up requests have left the batch
    let settle = Instant::now();
    while metric(&server, "qtune_generations_running") > 0.0
        || metric(&server, "qtune_kv_cache_bytes") > 0.0
    {
        assert!(
            settle.elapsed() < Duration::from_secs(120),
            "the batch empties"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let mut took = health.join().unwrap();
    sampler.join().unwrap();
    took.sort_by(f64::total_cmp);
    let p99 = took[(took.len() * 99 / 100).min(took.len() - 1)];
    let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count();
    let budget = (KV_MIB << 20) as f64;
    let peak_cache = *peak_cache.lock().unwrap();
    let grew = peak_rss.saturating_sub(baseline) as f64;
    println!(
        "64 clients: {} answered, {} busy (429), {} hung up, {} streams left unread; \
         KV cache peak {:.0} MiB of {KV_MIB}; RSS {:.0} MiB after loading, peak {:.0} MiB \
         (+{:.0} MiB); /healthz p99 {:.1} ms over {} probes",
        count(Outcome::Answered),
        count(Outcome::Busy),
        count(Outcome::HungUp),
        count(Outcome::StreamLeftUnread),
        peak_cache / 1048576.0,
        baseline as f64 / 1048576.0,
        peak_rss as f64 / 1048576.0,
        grew / 1048576.0,
        p99 * 1e3,
        took.len()
    );
    assert!(count(Outcome::Busy) > 0, "the excess was refused");
    assert!(count(Outcome::Answered) >= 4, "{outcomes:?}");
    assert!(peak_cache <= budget && peak_cache > 0.0, "{peak_cache}");
    // the caches, plus what a prefill chunk and the allocator hold for a while
    assert!(
        grew <= budget + (256 << 20) as f64,
        "the process grew {:.0} MiB over a {KV_MIB} MiB cache budget",
        grew / 1048576.0
    );
    assert!(p99 < 0.05, "/healthz p99 {:.1} ms", p99 * 1e3);
    // a request whose cache alone passes the budget is refused up front, naming the field
    let too_long = server
        .client
        .post(&url)
        .json(&chat(&model, SENTENCE.repeat(400), 16, false))
        .send()
        .unwrap();
    assert_eq!(too_long.status(), 400);
    let err: Value = too_long.json().unwrap();
    assert_eq!(err["error"]["param"], "max_tokens", "{err}");
    drop(server);

    // one prompt at the context limit (SmolLM2's 8192) on a server with the default budget
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), gguf.parent().unwrap(), &[]);
    let complete = |text: String, max_tokens: usize| -> Value {
        let body = json!({"model": model, "prompt": text, "max_tokens": max_tokens,
                          "temperature": 0});
        let answer = server
            .client
            .post(format!("{}/v1/completions", server.base))
            .timeout(Duration::from_secs(600))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(answer.status(), 200);
        answer.json().unwrap()
    };
    let tokens = |reps: usize| {
        complete(SENTENCE.repeat(reps), 1)["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap() as usize
    };
    let (ten, twenty) = (tokens(10), tokens(20));
    let per = (twenty - ten) / 10;
    let reps = (8192 - 8 - (ten - 10 * per)) / per;
    let before = memory(server.child.id(), "VmRSS");
    let start = Instant::now();
    let long = complete(SENTENCE.repeat(reps), 8);
    let prompt_tokens = long["usage"]["prompt_tokens"].as_u64().unwrap();
    let peak = memory(server.child.id(), "VmHWM");
    println!(
        "one prompt of {prompt_tokens} tokens: {:.1} s, RSS {:.0} MiB before, peak {:.0} MiB",
        start.elapsed().as_secs_f64(),
        before as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    assert!(prompt_tokens > 8100, "{long}");
    assert!(peak < 1_500_000_000, "peak {peak} bytes");
}
