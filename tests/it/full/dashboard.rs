//! The dashboard in a real browser: Debian's headless Chromium driven through chromedriver (the
//! W3C WebDriver protocol, spoken here over HTTP), against a real server with API keys on, running
//! a real tiny job. scripts/test.sh installs `chromium` and `chromium-driver` when missing.
//! Screenshots land in target/tmp/dashboard-e2e/.

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

    fn wait_js(&self, what: &str, script: &str) -> Value {
        let mut last = Value::Null;
        wait_for(what, Duration::from_secs(60), || {
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
        browser.js("return localStorage.getItem('qtune.apiKey')"),
        KEY
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
