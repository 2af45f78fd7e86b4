//! The dashboard in a real browser: Debian's headless Chromium driven through chromedriver (the
//! W3C WebDriver protocol, spoken here over HTTP), against a real server with API keys on: a
//! tiny job (the list, the charts, the form's errors, pause and resume), and the real SmolLM2
//! (upload and check, the estimate, a job started from the form, export, the playground
//! streaming the fine-tuned model beside its base, two runs compared, a phone's width).
//! scripts/test.sh installs `chromium` and `chromium-driver` when missing. Screenshots land in
//! target/tmp/dashboard-e2e/ (the guides' pictures in docs/src/images/ are taken from there).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use qtune::app::App;
use qtune::config::ServeConfig;
use serde_json::{json, Value};

use crate::helpers::process::free_port;

const KEY: &str = "dash-key";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

struct Browser {
    http: reqwest::blocking::Client,
    session: String,
    driver: Child,
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: apt-get install chromium chromium-driver (scripts/test.sh does)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver to start", Duration::from_secs(20), || {
            http.get(format!("{base}/status"))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true)
        });
        // The closed network here refuses Chromium's background connections; these flags keep
        // it from trying (see the machine notes), and a fresh profile keeps runs independent.
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let resp: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {resp}"))
            .to_string();
        Browser {
            http,
            session: format!("{base}/session/{session}"),
            driver,
        }
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().unwrap().json().unwrap();
        if v["value"].get("error").is_some() {
            panic!("webdriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })));
    }

    /// Runs a script in the page; `return` gives its value.
    fn js(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            reqwest::Method::POST,
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        );
    }

    /// Replaces an input's text by typing, as a user does.
    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/clear"),
            Some(json!({})),
        );
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Gives a file input a file, as choosing it in the file dialog does.
    fn choose_file(&self, css: &str, path: &Path) {
        let e = self.find(css);
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": path.to_str().unwrap() })),
        );
    }

    fn resize(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        );
    }

    fn wait_js(&self, what: &str, script: &str) -> Value {
        self.wait_js_for(what, script, Duration::from_secs(60))
    }

    fn wait_js_for(&self, what: &str, script: &str, within: Duration) -> Value {
        let mut last = Value::Null;
        wait_for(what, within, || {
            last = self.js(script);
            !(last.is_null() || last == false || last == "")
        });
        last
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        assert_eq!(&png[1..4], b"PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.http.delete(&self.session).send();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dashboard_shows_a_live_job_and_submits_one_through_its_form() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::helpers::tiny_model(dir.path());
    let data = crate::helpers::memorisable_chat(dir.path(), 12);
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-e2e");
    std::fs::create_dir_all(&shots).unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = ServeConfig::for_data_dir(dir.path().join("data"));
    config.allow_file_dirs = vec![dir.path().to_path_buf()];
    config.allow_model_dirs = vec![dir.path().to_path_buf()];
    config.api_keys = vec![KEY.into()];
    let app = runtime.block_on(App::build(config)).unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    // a job the dashboard will show, submitted with the same key the user will enter
    let api = reqwest::blocking::Client::new();
    let job: Value = api
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(KEY)
        .json(&json!({
            "base_model": model,
            "dataset": {"url": format!("file://{}", data.display()), "validation_split": 0.25},
            "lora": {"r": 4, "dropout": 0.0},
            "training": {"max_steps": 40, "batch_size": 2, "learning_rate": 0.01,
                         "lr_scheduler": "cosine", "warmup_steps": 4, "eval_every_steps": 5, "max_seq_len": 64},
            "checkpoint_every_steps": 10,
        }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();

    let browser = Browser::start(&dir.path().join("chromium-profile"));
    browser.goto(&format!("{base}/"));
    // without a key the list says why it is empty
    let note = browser.wait_js(
        "the 401 to show",
        "const p = document.querySelector('main p.muted'); return p && p.textContent",
    );
    assert!(note.as_str().unwrap().contains("401"), "{note}");
    // the key, entered once, is kept in local storage and used from then on
    browser.type_into("#api-key", KEY);
    browser.click("#key-form button");
    assert_eq!(
        browser.js("return sessionStorage.getItem('qtune.apiKey')"),
        KEY
    );
    assert_eq!(
        browser.js("return localStorage.getItem('qtune.apiKey')"),
        Value::Null,
        "the key lives in this tab's session only"
    );
    browser.wait_js(
        "the job to be listed as succeeded",
        &format!("const r = document.querySelector('tr[data-job=\"{id}\"]'); return r && r.textContent.includes('succeeded')"),
    );
    browser.goto(&format!("{base}/"));
    browser.wait_js(
        "the list after a reload, with the stored key",
        &format!("return document.querySelector('tr[data-job=\"{id}\"]')"),
    );
    browser.click(&format!("tr[data-job=\"{id}\"] a"));

    // the job page: the curve has every step, eval points, status, checkpoints, the spec
    // the page draws the replayed stream as it arrives: wait for the last step and eval, then
    // check that nothing is missing or drawn twice
    let points = browser.wait_js(
        "the chart to reach step 40 and its last eval, and the job to read succeeded",
        "const s = document.querySelector('svg.chart'); const st = document.querySelector('#job-status');
         return s && st && st.dataset.status === 'succeeded' && Number(s.dataset.trainPoints) >= 40
                && Number(s.dataset.evalPoints) >= 8
                && [Number(s.dataset.trainPoints), Number(s.dataset.evalPoints)]",
    );
    assert_eq!(points, json!([40, 8]), "train and eval points");
    let page = browser.js("return document.querySelector('main').innerText");
    let page = page.as_str().unwrap();
    assert!(page.contains("\"max_steps\": 40"), "spec shown: {page}");
    assert!(
        page.contains("adapter_model.safetensors"),
        "checkpoint files listed"
    );
    let polyline = browser.js("return document.querySelector('svg.chart polyline.train').getAttribute('points').split(' ').length");
    assert_eq!(polyline, 40);
    browser.click("#log-scale");
    let label = browser.js("return document.querySelector('svg.chart').getAttribute('aria-label')");
    assert!(label.as_str().unwrap().contains("(log scale)"), "{label}");
    browser.click("#log-scale");
    // x ticks sit on whole steps, evenly spaced (40 steps: every 10)
    let ticks = browser.js("return document.querySelector('svg.chart').dataset.xTicks");
    assert_eq!(ticks, "10 20 30 40");
    // token accuracy: its own chart, every step, and the last values among the facts
    let accuracy = browser.js("const s = document.querySelector('#accuracy-chart');
         return [Number(s.dataset.trainPoints), Number(s.dataset.evalPoints),
                 document.querySelector('#train-accuracy dd').textContent,
                 document.querySelector('#eval-accuracy dd').textContent]");
    assert_eq!(accuracy[0], 40, "{accuracy}");
    assert_eq!(accuracy[1], 8, "{accuracy}");
    for shown in [&accuracy[2], &accuracy[3]] {
        let pct: f64 = shown
            .as_str()
            .unwrap()
            .trim_end_matches(" %")
            .parse()
            .unwrap();
        assert!((0.0..=100.0).contains(&pct), "{accuracy}");
    }
    browser.screenshot(&shots.join("job.png"));
    // no reward chart for a supervised job
    assert_eq!(
        browser.js("return document.querySelector('#margin-chart') === null"),
        true
    );

    // a DPO job's page charts its reward margin, every step and every evaluation
    let pairs = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| {
            json!({"prompt": format!("say {}", i % 4), "chosen": format!(" ok {}", i % 4),
                   "rejected": format!(" no {}", (i + 1) % 4)})
            .to_string()
        })
        .collect();
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let dpo: Value = api
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(KEY)
        .json(&json!({
            "base_model": model,
            "method": {"type": "dpo"},
            "dataset": {"url": format!("file://{}", pairs.display()), "validation_split": 0.25},
            "lora": {"r": 4, "dropout": 0.0},
            "training": {"max_steps": 6, "batch_size": 2, "learning_rate": 0.01, "eval_every_steps": 3,
                         "max_seq_len": 64},
        }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let dpo_id = dpo["id"].as_str().unwrap();
    browser.goto(&format!("{base}/#/jobs/{dpo_id}"));
    let margins = browser.wait_js(
        "the reward margin chart to reach step 6 and its last evaluation",
        "const s = document.querySelector('#margin-chart');
         return s && Number(s.dataset.trainPoints) >= 6 && Number(s.dataset.evalPoints) >= 2
                && [Number(s.dataset.trainPoints), Number(s.dataset.evalPoints)]",
    );
    assert_eq!(margins, json!([6, 2]), "margin points");

    // pause and resume from the job page
    let long: Value = api
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(KEY)
        .json(&json!({
            "base_model": model,
            "dataset": {"url": format!("file://{}", data.display())},
            "lora": {"r": 4, "dropout": 0.0},
            "training": {"max_steps": 100000, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64},
        }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let long = long["id"].as_str().unwrap().to_string();
    browser.goto(&format!("{base}/#/jobs/{long}"));
    browser.wait_js(
        "the long job running on its page",
        "const st = document.querySelector('#job-status'); return st && st.dataset.status === 'running'
         && Number(document.querySelector('svg.chart').dataset.trainPoints) >= 2",
    );
    browser.click("#pause");
    browser.wait_js(
        "the job paused, with a resume button",
        "const st = document.querySelector('#job-status'); return st && st.dataset.status === 'paused'
         && document.querySelector('#resume') && !document.querySelector('#pause')",
    );
    let badge = browser.js("return document.querySelector('#job-status .status').textContent");
    assert_eq!(badge, "paused");
    browser.screenshot(&shots.join("job-paused.png"));
    browser.click("#resume");
    browser.wait_js(
        "the job running again",
        "const st = document.querySelector('#job-status'); return st && ['queued', 'running'].includes(st.dataset.status)
         && document.querySelector('#pause')",
    );
    browser.click("#cancel");
    browser.wait_js(
        "the job cancelled",
        "const st = document.querySelector('#job-status'); return st && st.dataset.status === 'cancelled'",
    );

    // the form: one validation error from the server, shown next to its field; then a good job
    browser.goto(&format!("{base}/#/new"));
    browser.wait_js("the form", "return document.querySelector('#f-base_model')");
    browser.type_into("#f-base_model", model.to_str().unwrap());
    browser.type_into("#f-dataset-url", &format!("file://{}", data.display()));
    browser.type_into("#f-training-max_steps", "6");
    browser.type_into("#f-training-learning_rate", "-1");
    browser.click("form.job button[type=submit]");
    let error = browser.wait_js(
        "the learning-rate error",
        "const e = document.querySelector('[data-error-for=\"training.learning_rate\"]'); return e && e.textContent",
    );
    assert!(
        error.as_str().unwrap().contains("training.learning_rate"),
        "{error}"
    );
    assert_eq!(
        browser.js("return document.querySelector('#f-training-learning_rate').getAttribute('aria-invalid')"),
        "true"
    );
    assert_eq!(
        browser.js("return document.activeElement.id"),
        "f-training-learning_rate",
        "focus moves to the field at fault"
    );
    browser.screenshot(&shots.join("form-error.png"));
    browser.type_into("#f-training-learning_rate", "0.01");
    browser.click("form.job button[type=submit]");
    let hash = browser.wait_js(
        "the new job's page",
        "return location.hash.startsWith('#/jobs/') && location.hash",
    );
    let new_id = hash
        .as_str()
        .unwrap()
        .trim_start_matches("#/jobs/")
        .to_string();
    assert_ne!(new_id, id);
    let created: Value = api
        .get(format!("{base}/v1/jobs/{new_id}"))
        .bearer_auth(KEY)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(created["spec"]["base_model"], model.to_str().unwrap());
    assert_eq!(created["spec"]["training"]["learning_rate"], 0.01);
    assert_eq!(created["spec"]["training"]["max_steps"], 6);
    assert_eq!(
        created["spec"]["lora"]["target_modules"],
        json!(["q_proj", "k_proj", "v_proj", "o_proj"])
    );
    browser.wait_js(
        "the form's job to succeed on its page",
        "const st = document.querySelector('#job-status'); return st && st.dataset.status === 'succeeded'",
    );
    // a 6-step job: a tick on each step, never a fraction
    let ticks = browser.wait_js(
        "the 6-step chart",
        "const s = document.querySelector('svg.chart'); return Number(s.dataset.trainPoints) === 6 && s.dataset.xTicks",
    );
    assert_eq!(ticks, "1 2 3 4 5 6");
    drop(browser);
    let _ = stop.send(());
}

/// What a page falls short of: form controls with no accessible name, and text whose contrast
/// with its background is under WCAG AA's 4.5:1 (3:1 for large text), each named. Empty: none.
const ACCESSIBILITY: &str = r#"
const problems = [];
for (const c of document.querySelectorAll('input, select, textarea, button')) {
  if (c.type === 'hidden' || c.closest('[hidden]')) continue;
  const named = c.getAttribute('aria-label') || c.getAttribute('aria-labelledby') || c.closest('label')
    || (c.id && document.querySelector(`label[for="${c.id}"]`)) || (c.tagName === 'BUTTON' && c.textContent.trim());
  if (!named) problems.push(`no label: ${c.outerHTML.slice(0, 80)}`);
}
const rgb = (s) => (s.match(/[\d.]+/g) || []).map(Number);
const lum = ([r, g, b]) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
const background = (e) => { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor);
  if (c.length === 3 || c[3] > 0) return c.slice(0, 3); } return [255, 255, 255]; };
for (const e of document.querySelectorAll('body *')) {
  if (![...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
  const st = getComputedStyle(e);
  if (st.visibility === 'hidden' || st.display === 'none' || e.getClientRects().length === 0) continue;
  if (e.closest('svg') || e.closest('.skip') || e.closest('.visually-hidden')) continue;
  const fg = rgb(st.color), bg = background(e);
  const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
  const ratio = (hi + 0.05) / (lo + 0.05);
  const large = parseFloat(st.fontSize) >= 24 || (parseFloat(st.fontSize) >= 18.66 && Number(st.fontWeight) >= 700);
  const dim = e.closest('button:disabled') ? 0 : 1;  // disabled controls are exempt in WCAG
  if (dim && ratio < (large ? 3 : 4.5)) problems.push(`contrast ${ratio.toFixed(2)}: "${e.textContent.trim().slice(0, 40)}"`);
}
return problems;
"#;

/// Whether the page fits the window's width (nothing to scroll sideways).
const FITS_WIDTH: &str =
    "return document.documentElement.scrollWidth <= window.innerWidth + 1 || [document.documentElement.scrollWidth, window.innerWidth]";

/// Round two, on the real SmolLM2-135M and a `qtune serve` process with API keys: a wrong key
/// is named; a dropped file with a bad line is refused naming the line; the quickstart data is
/// uploaded and checked; the form shows the estimate and starts a 10-step job whose chart fills
/// live; the adapter exports; the playground streams the fine-tuned model and its base for one
/// prompt; two jobs' curves share one chart; every page fits a phone's width; and the key never
/// appears in a URL the page requested or in the server's log.
#[test]
fn dashboard_trains_exports_chats_and_compares_with_smollm2() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = root.join(".cache/test-models");
    let model = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.is_file(),
        "run scripts/fetch-test-models.sh first (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-e2e");
    std::fs::create_dir_all(&shots).unwrap();
    let log = dir.path().join("serve.log");
    let port = free_port();
    let server = crate::helpers::process::ServeProcess::spawn(
        &["serve", "--listen", &format!("127.0.0.1:{port}")],
        &dir.path().join("data"),
        &models,
        port,
        &[("QTUNE_API_KEYS", KEY)],
        Some(&log),
    );
    let base = server.base.clone();
    let api = reqwest::blocking::Client::new();

    let browser = Browser::start(&dir.path().join("chromium-profile"));
    browser.goto(&format!("{base}/"));
    let said = browser.wait_js(
        "the header to ask for a key",
        "return document.querySelector('#key-state.key-error')?.textContent",
    );
    assert!(
        said.as_str().unwrap().contains("needs an API key"),
        "{said}"
    );
    // a wrong key is named as wrong, in the header, with the field marked
    browser.type_into("#api-key", "not-the-key");
    browser.click("#key-form button");
    let said = browser.wait_js(
        "the wrong key to be refused",
        "return document.querySelector('#key-state.key-error')?.textContent",
    );
    assert!(
        said.as_str().unwrap().contains("refused this API key"),
        "{said}"
    );
    assert_eq!(
        browser.js("return document.querySelector('#api-key').getAttribute('aria-invalid')"),
        "true"
    );
    browser.type_into("#api-key", KEY);
    browser.click("#key-form button");
    browser.wait_js(
        "the list with the right key",
        "const s = document.querySelector('#key-state'); return s && !s.classList.contains('key-error') && document.querySelector('main p.muted')?.textContent.includes('No jobs yet')",
    );
    browser.screenshot(&shots.join("smollm2-jobs-empty.png"));

    // the form: a dropped file with a bad second line is refused naming the line
    browser.goto(&format!("{base}/#/new"));
    browser.wait_js("the form", "return document.querySelector('#drop')");
    browser.type_into("#f-base_model", model.to_str().unwrap());
    browser.js(r#"const good = JSON.stringify({messages: [{role: "user", content: "Hi"}, {role: "assistant", content: "Hello"}]});
        const dt = new DataTransfer();
        dt.items.add(new File([good + "\n" + '{"messages": [{"role": "user"}]}' + "\n"], "broken.jsonl"));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        return true"#);
    let refused = browser.wait_js(
        "the dropped file's bad line",
        "const s = document.querySelector('#upload-state'); return s.getAttribute('role') === 'alert' && s.textContent",
    );
    let refused = refused.as_str().unwrap();
    assert!(
        refused.contains("line 2") && refused.contains("content"),
        "{refused}"
    );
    assert_eq!(
        browser.js("return document.querySelector('#f-dataset-url').value"),
        ""
    );
    browser.screenshot(&shots.join("smollm2-upload-refused.png"));

    // the quickstart data, chosen with the file input: uploaded, checked, its id filled in
    browser.choose_file("#f-upload", &root.join("examples/quickstart.jsonl"));
    let file_id = browser.wait_js(
        "the quickstart data checked",
        "const v = document.querySelector('#f-dataset-url').value; return v.startsWith('file-') && v",
    );
    let state = browser.js("return document.querySelector('#upload-state').textContent");
    assert!(
        state
            .as_str()
            .unwrap()
            .contains("every line reads as training data"),
        "{state}"
    );
    let file: Value = api
        .get(format!("{base}/v1/files/{}", file_id.as_str().unwrap()))
        .bearer_auth(KEY)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(file["status"], "processed", "{file}");
    assert_eq!(
        file["bytes"],
        std::fs::metadata(root.join("examples/quickstart.jsonl"))
            .unwrap()
            .len()
    );

    // a 10-step job, the estimate shown before it is submitted, one field through the JSON box
    browser.type_into("#f-training-max_steps", "10");
    browser.type_into("#f-training-max_seq_len", "256");
    browser.type_into("#f-training-learning_rate", "0.0003");
    browser.type_into("#f-training-eval_every_steps", "5");
    browser.type_into("#f-dataset-validation_split", "0.1");
    browser.click("details.advanced summary");
    browser.type_into(
        "#f-advanced",
        r#"{"suffix": "capitals", "training": {"lr_scheduler": "cosine"}}"#,
    );
    let fits = browser.wait_js_for(
        "the estimate, with a worker that can hold the job",
        "const m = document.querySelector('#estimate-memory'); const f = document.querySelector('#estimate-fits');
         return m && m.textContent.includes('Peak memory') && f && f.dataset.fits === 'true' && f.dataset.fits",
        Duration::from_secs(90),
    );
    assert_eq!(fits, "true");
    let time = browser.js("return document.querySelector('#estimate-time')?.textContent");
    assert!(
        time.as_str().unwrap_or("").contains("for 10 steps"),
        "{time}"
    );
    browser.screenshot(&shots.join("smollm2-new-job.png"));
    browser.click("form.job button[type=submit]");
    let hash = browser.wait_js(
        "the new job's page",
        "return location.hash.startsWith('#/jobs/') && location.hash",
    );
    let first = hash
        .as_str()
        .unwrap()
        .trim_start_matches("#/jobs/")
        .to_string();
    let created: Value = api
        .get(format!("{base}/v1/jobs/{first}"))
        .bearer_auth(KEY)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(created["spec"]["suffix"], "capitals");
    assert_eq!(created["spec"]["training"]["lr_scheduler"], "cosine");
    assert_eq!(created["spec"]["training"]["max_steps"], 10);
    assert_eq!(created["spec"]["dataset"]["url"], file_id);

    // the chart fills while the job runs: seen part-way, then whole
    browser.wait_js_for(
        "the chart part-way through the run",
        "const s = document.querySelector('svg.chart'); const n = s && Number(s.dataset.trainPoints);
         return n >= 1 && n < 10 && document.querySelector('#job-status').dataset.status === 'running' && n",
        Duration::from_secs(120),
    );
    browser.screenshot(&shots.join("smollm2-job-running.png"));
    browser.wait_js_for(
        "the job to succeed with every point drawn",
        "const s = document.querySelector('svg.chart');
         return document.querySelector('#job-status').dataset.status === 'succeeded'
                && Number(s.dataset.trainPoints) === 10 && Number(s.dataset.evalPoints) >= 2",
        Duration::from_secs(180),
    );
    let events = browser.js(
        "return [...document.querySelectorAll('#events li')].map(li => li.textContent).join('\\n')",
    );
    let events = events.as_str().unwrap();
    assert!(
        events.contains("succeeded") && events.contains("eval loss"),
        "{events}"
    );
    browser.screenshot(&shots.join("smollm2-job.png"));

    // export the adapter as llama.cpp's LoRA GGUF from the job page
    browser.js(
        "const s = document.querySelector('#export-format'); s.value = 'gguf-lora'; return true",
    );
    browser.click("#export");
    let ready = browser.wait_js_for(
        "the export",
        "return document.querySelector('#download-export') && document.querySelector('#export-state').textContent",
        Duration::from_secs(120),
    );
    assert!(
        ready.as_str().unwrap().contains("gguf-lora is ready"),
        "{ready}"
    );
    let exported = api
        .get(format!("{base}/v1/jobs/{first}/exports/gguf-lora"))
        .bearer_auth(KEY)
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(&exported[..4], b"GGUF");

    // the playground: one prompt, both answers streamed
    browser.click("#open-playground");
    browser.wait_js(
        "the playground with the job chosen",
        &format!("return document.querySelector('#pg-job')?.value === '{first}'"),
    );
    browser.type_into("#pg-prompt", "What is the capital of Peru?");
    browser.type_into("#pg-max-tokens", "24");
    browser.click("#pg-send");
    let answers = browser.wait_js_for(
        "both answers streamed to the end",
        "const a = ['fine-tuned', 'base'].map(k => document.querySelector('#answer-' + k));
         return a.every(x => x && x.dataset.state === 'done')
                && a.map(x => [x.textContent, Number(x.dataset.chunks || 0)])",
        Duration::from_secs(120),
    );
    for (which, answer) in ["fine-tuned", "base"]
        .iter()
        .zip(answers.as_array().unwrap())
    {
        let text = answer[0].as_str().unwrap();
        assert!(!text.trim().is_empty(), "{which} answered nothing");
        assert!(
            answer[1].as_u64().unwrap() > 1,
            "{which} came in one piece, not streamed: {answer}"
        );
    }
    let headings =
        browser.js("return [...document.querySelectorAll('.answer h2')].map(h => h.textContent)");
    assert!(
        headings[1]
            .as_str()
            .unwrap()
            .contains("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{headings}"
    );
    browser.screenshot(&shots.join("smollm2-playground.png"));

    // a second run with another learning rate, then both compared from the jobs list
    let second: Value = api
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(KEY)
        .json(&json!({
            "base_model": model, "dataset": {"url": file_id, "validation_split": 0.1},
            "training": {"max_steps": 6, "learning_rate": 0.001, "max_seq_len": 256, "eval_every_steps": 3},
            "suffix": "faster",
        }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let second = second["id"].as_str().unwrap().to_string();
    browser.goto(&format!("{base}/#/"));
    browser.wait_js_for(
        "the second job to succeed in the list",
        &format!("const r = document.querySelector('tr[data-job=\"{second}\"]'); return r && r.textContent.includes('succeeded')"),
        Duration::from_secs(180),
    );
    for id in [&first, &second] {
        browser.click(&format!("tr[data-job=\"{id}\"] input.pick"));
    }
    browser.screenshot(&shots.join("smollm2-jobs.png"));
    browser.click("#compare-selected");
    let counts = browser.wait_js(
        "both curves on one chart",
        &format!("const s = document.querySelector('#compare-chart');
          return s && s.dataset.series === '2'
                 && [Number(s.getAttribute('data-job-{}-points')), Number(s.getAttribute('data-job-{}-points'))]",
            &first[..8], &second[..8]),
    );
    assert_eq!(counts, json!([10, 6]), "every step of each run");
    // each drawn in its own colour (a stroke the page's CSP lets through)
    let strokes = browser.js("return [...document.querySelectorAll('#compare-chart polyline.series')].map(p => getComputedStyle(p).stroke)");
    let strokes: Vec<&str> = strokes
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(strokes.len(), 2);
    assert!(
        strokes.iter().all(|s| s.starts_with("rgb(")) && strokes[0] != strokes[1],
        "{strokes:?}"
    );
    browser.click("#cmp-eval");
    let evals =
        browser.js("return document.querySelectorAll('#compare-chart circle.series').length");
    assert!(
        evals.as_u64().unwrap() >= 4,
        "eval points of both runs: {evals}"
    );
    browser.click("#cmp-eval");
    browser.screenshot(&shots.join("smollm2-compare.png"));

    // a phone's width: every page reflows, nothing scrolls sideways
    browser.resize(390, 844);
    for page in [
        "#/",
        "#/new",
        &format!("#/jobs/{first}"),
        &format!("#/playground?job={first}"),
        &format!("#/compare?ids={first},{second}"),
    ] {
        browser.goto(&format!("{base}/{page}"));
        browser.wait_js("the page", "return document.querySelector('main h1')");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(browser.js(FITS_WIDTH), true, "{page} is wider than a phone");
        assert_eq!(browser.js(ACCESSIBILITY), json!([]), "{page}");
    }
    browser.screenshot(&shots.join("smollm2-phone-compare.png"));

    // the key went in headers only: no URL the page requested holds it, nor the server's log
    let urls = browser.js(
        "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])",
    );
    let urls = urls.to_string();
    assert!(urls.contains("/v1/jobs"), "{urls}");
    assert!(!urls.contains(KEY), "{urls}");
    drop(browser);
    drop(server);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("authentication failed") && logged.contains("key_given=true"),
        "the wrong key was logged as a refusal: {logged}"
    );
    for key in [KEY, "not-the-key"] {
        assert!(!logged.contains(key), "{key} is in the server's log");
    }
}
