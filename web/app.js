// qtune dashboard: jobs list, job page with a live loss chart, job form. Plain JS, no build step;
// served from the binary. It talks to the same /v1 API as curl and the CLI.
"use strict";

const KEY_STORE = "qtune.apiKey";
const main = () => document.getElementById("main");
let leaveView = () => {}; // stops the current view's timers and streams

// ---------- API ----------

function authHeaders(extra = {}) {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

/** Calls the API; resolves to {status, body} with body parsed as JSON when it is JSON. */
async function api(method, path, body, contentType = "application/json") {
  const init = { method, headers: authHeaders() };
  if (body !== undefined) {
    init.body = contentType === "application/json" ? JSON.stringify(body) : body;
    init.headers["Content-Type"] = contentType;
  }
  const resp = await fetch(path, init);
  const text = await resp.text();
  let parsed = text;
  try { parsed = JSON.parse(text); } catch (_) { /* not JSON */ }
  return { status: resp.status, ok: resp.ok, body: parsed };
}

function errorText(res) {
  const e = res.body && res.body.error;
  return e ? `${e.message} (${e.code}, HTTP ${res.status})` : `HTTP ${res.status}`;
}

/** Reads a Server-Sent Events stream with fetch (EventSource cannot send an API key). */
async function followEvents(path, onEvent, signal) {
  const resp = await fetch(path, { headers: authHeaders({ Accept: "text/event-stream" }), signal });
  if (!resp.ok || !resp.body) throw new Error(`events: HTTP ${resp.status}`);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(kind, JSON.parse(data));
    }
  }
}

/** Downloads with the API key attached (a plain link cannot carry it). */
async function download(path, filename) {
  const resp = await fetch(path, { headers: authHeaders() });
  if (!resp.ok) { alert(`Download failed: HTTP ${resp.status}`); return; }
  const url = URL.createObjectURL(await resp.blob());
  const a = el("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---------- small DOM helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const fmtLoss = (v) => (typeof v === "number" ? v.toFixed(4) : "–");
const fmtAccuracy = (v) => (typeof v === "number" ? `${(100 * v).toFixed(1)} %` : "–");
/** The value at the highest step of a step → value map. */
const last = (m) => (m.size ? m.get(Math.max(...m.keys())) : undefined);
const fmtTime = (s) => (s ? new Date(s).toLocaleString() : "–");
function fmtDuration(secs) {
  if (typeof secs !== "number") return "–";
  const s = Math.round(secs);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m` : `${Math.floor(s / 60)}m ${s % 60}s`;
}
const statusBadge = (s) => el("span", { class: `status ${s}`, text: s });

// ---------- jobs page ----------

function jobsView() {
  const body = el("tbody");
  const note = el("p", { class: "muted", role: "status" });
  main().replaceChildren(
    el("h1", { text: "Jobs" }),
    el("div", { class: "table-wrap" },
      el("table", {},
        el("thead", {}, el("tr", {},
          el("th", { scope: "col", text: "Job" }), el("th", { scope: "col", text: "Status" }),
          el("th", { scope: "col", text: "Base model" }), el("th", { scope: "col", text: "Progress" }),
          el("th", { scope: "col", text: "Loss" }), el("th", { scope: "col", class: "hide-narrow", text: "Created" }))),
        body)),
    note);
  async function refresh() {
    const res = await api("GET", "/v1/jobs?limit=100");
    if (!res.ok) { note.textContent = errorText(res); return; }
    note.textContent = res.body.data.length ? "" : "No jobs yet. Submit one from New job.";
    body.replaceChildren(...res.body.data.map((job) => {
      const p = job.progress;
      const total = p.total_steps || 0;
      return el("tr", { "data-job": job.id },
        el("td", { class: "mono" }, el("a", { href: `#/jobs/${job.id}`, text: job.id.slice(0, 8) })),
        el("td", {}, statusBadge(job.status)),
        el("td", { text: job.spec.base_model }),
        el("td", { class: "num" },
          el("progress", { max: total || 1, value: total ? p.step : 0, "aria-label": `step ${p.step} of ${total || "?"}` }),
          ` ${p.step}/${total || "?"}`),
        el("td", { class: "num", text: fmtLoss(job.train_loss) }),
        el("td", { class: "num hide-narrow", text: fmtTime(job.created_at) }));
    }));
  }
  refresh();
  const timer = setInterval(refresh, 2000);
  return () => clearInterval(timer);
}

// ---------- job page ----------

function jobView(id) {
  const controller = new AbortController();
  const curve = { train: new Map(), eval: new Map(), lr: new Map(), trainAcc: new Map(), evalAcc: new Map() };
  let job = null, logScale = false, timer = null;

  const title = el("h1", { text: `Job ${id}` });
  const facts = el("dl", { class: "facts", "aria-live": "polite" });
  const errorBox = el("div");
  const actions = el("div", { class: "actions" });
  const logToggle = el("input", { type: "checkbox", id: "log-scale", onchange: () => { logScale = logToggle.checked; draw(); } });
  const chartBox = el("div");
  const lrBox = el("div");
  const accBox = el("div");
  const checkpoints = el("div");
  const spec = el("pre", { "aria-label": "Job spec" });
  main().replaceChildren(title, facts, errorBox, actions,
    el("h2", { text: "Loss" }),
    el("div", { class: "chart-head" },
      el("div", { class: "legend" }, el("span", { class: "train", text: "train loss" }), el("span", { class: "eval", text: "eval loss" })),
      el("label", {}, logToggle, " log scale")),
    chartBox,
    el("h2", { text: "Token accuracy" }),
    el("div", { class: "chart-head" },
      el("div", { class: "legend" }, el("span", { class: "train", text: "train accuracy" }), el("span", { class: "eval", text: "eval accuracy" }))),
    accBox,
    el("h2", { text: "Learning rate" }), lrBox,
    el("h2", { text: "Checkpoints" }), checkpoints,
    el("h2", { text: "Spec (defaults filled in)" }), spec);

  function draw() {
    chartBox.replaceChildren(lineChart([
      { name: "train", points: [...curve.train] },
      { name: "eval", points: [...curve.eval], dots: true },
    ], { log: logScale, height: 300, label: "Loss against step" }));
    accBox.replaceChildren(lineChart([
      { name: "train", points: [...curve.trainAcc] },
      { name: "eval", points: [...curve.evalAcc], dots: true },
    ], { height: 160, label: "Token accuracy against step", id: "accuracy-chart" }));
    lrBox.replaceChildren(lineChart([{ name: "lr", points: [...curve.lr] }], { height: 120, label: "Learning rate against step" }));
  }

  function render() {
    if (!job) return;
    const p = job.progress;
    const fact = (name, value, attrs = {}) => el("div", attrs, el("dt", { text: name }), el("dd", {}, value));
    facts.replaceChildren(
      fact("Status", statusBadge(job.status), { id: "job-status", "data-status": job.status }),
      fact("Phase", job.phase || "–"),
      fact("Step", `${p.step} / ${p.total_steps ?? "?"}`),
      fact("Epoch", typeof p.epoch === "number" ? p.epoch.toFixed(2) : "–"),
      fact("Train loss", fmtLoss(job.train_loss)),
      fact("Eval loss", fmtLoss(job.eval_loss)),
      fact("Train accuracy", fmtAccuracy(last(curve.trainAcc)), { id: "train-accuracy" }),
      fact("Eval accuracy", fmtAccuracy(last(curve.evalAcc)), { id: "eval-accuracy" }),
      fact("ETA", job.status === "running" ? fmtDuration(p.eta_seconds) : "–"),
      fact("Base model", job.spec.base_model, { class: "wide" }));
    errorBox.replaceChildren(job.error
      ? el("p", { class: "error-box", role: "alert" }, el("strong", { text: `${job.error.code}: ` }), job.error.message || "")
      : "");
    // the buttons are rebuilt only when what they offer changes, so that one being clicked is
    // never replaced under the pointer by a progress refresh
    const offer = `${job.status}/${job.cancel_requested}`;
    if (actions.dataset.offer !== offer) {
      actions.dataset.offer = offer;
      const cancellable = ["queued", "running", "paused"].includes(job.status);
      const pausable = job.status === "queued" || job.status === "running";
      actions.replaceChildren(
        pausable ? el("button", { class: "secondary", id: "pause", disabled: job.cancel_requested,
          onclick: () => act("pause"), text: "Pause" }) : "",
        job.status === "paused" ? el("button", { id: "resume", onclick: () => act("resume"), text: "Resume" }) : "",
        cancellable ? el("button", { class: "danger", id: "cancel", disabled: job.cancel_requested, onclick: () => act("cancel"),
          text: job.cancel_requested ? "Stopping…" : "Cancel job" }) : "",
        job.status === "succeeded" ? el("button", { class: "secondary",
          onclick: () => download(`/v1/jobs/${id}/adapter`, `adapter-${id}.tar`), text: "Download adapter (.tar)" }) : "");
    }
    spec.textContent = JSON.stringify(job.spec, null, 2);
  }

  function showAccuracy() {
    for (const [id, m] of [["train-accuracy", curve.trainAcc], ["eval-accuracy", curve.evalAcc]]) {
      const dd = document.querySelector(`#${id} dd`);
      if (dd) dd.textContent = fmtAccuracy(last(m));
    }
  }

  /** Cancel, pause or resume; a running job stops at its next step (its button says so). */
  async function act(verb) {
    const res = await api("POST", `/v1/jobs/${id}/${verb}`);
    if (!res.ok) alert(errorText(res));
    await refreshJob();
  }

  async function refreshJob() {
    const res = await api("GET", `/v1/jobs/${id}`);
    if (!res.ok) {
      main().replaceChildren(el("h1", { text: "Job not found" }), el("p", { class: "error-box", role: "alert", text: errorText(res) }));
      return false;
    }
    job = res.body;
    render();
    return true;
  }

  async function refreshCheckpoints() {
    const res = await api("GET", `/v1/jobs/${id}/checkpoints`);
    if (!res.ok) return;
    const rows = res.body.data || [];
    if (!rows.length) { checkpoints.replaceChildren(el("p", { class: "muted", text: "None yet." })); return; }
    checkpoints.replaceChildren(el("div", { class: "table-wrap" }, el("table", {},
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Step" }), el("th", { scope: "col", text: "Files" }))),
      el("tbody", {}, rows.map((c) => el("tr", {},
        el("td", { class: "num", text: c.step }),
        el("td", {}, (c.files || []).map((f) => el("button", {
          class: "secondary", "aria-label": `Download ${f.name} of step ${c.step}`,
          onclick: () => download(`/v1/jobs/${id}/checkpoints/${c.step}/${f.name}`, `step-${c.step}-${f.name}`),
          text: `${f.name} (${(f.bytes / 1024).toFixed(0)} KiB)`,
        })))))))));
  }

  (async () => {
    if (!(await refreshJob())) return;
    draw();
    refreshCheckpoints();
    // progress and ETA come from the job row; the curve and status changes from the event stream
    timer = setInterval(() => { if (job && (job.status === "running" || job.status === "queued")) refreshJob(); }, 3000);
    try {
      await followEvents(`/v1/jobs/${id}/events`, (kind, data) => {
        if (kind === "metrics") {
          curve.train.set(data.step, data.train_loss ?? data.loss);  // events stored by 0.1 say `loss`
          curve.lr.set(data.step, data.learning_rate);
          if (typeof data.train_accuracy === "number") curve.trainAcc.set(data.step, data.train_accuracy);
          drawSoon();
        } else if (kind === "eval") {
          curve.eval.set(data.step, data.eval_loss);
          if (typeof data.eval_accuracy === "number") curve.evalAcc.set(data.step, data.eval_accuracy);
          drawSoon();
        } else if (kind === "checkpoint") {
          refreshCheckpoints();
        } else if (kind === "status") {
          refreshJob();
        }
      }, controller.signal);
    } catch (e) {
      if (!controller.signal.aborted) errorBox.append(el("p", { class: "muted", text: `Live updates stopped: ${e.message}` }));
    }
    if (!controller.signal.aborted) { await refreshJob(); refreshCheckpoints(); draw(); }
  })();

  let pending = false;
  function drawSoon() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); showAccuracy(); });
  }

  return () => { controller.abort(); clearInterval(timer); };
}

/** An SVG line chart of [step, value] series, with axes and ticks. */
function lineChart(series, { log = false, height = 240, label = "", id = "" }) {
  const W = 800, H = height, L = 58, R = 12, T = 10, B = 26;
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  const tf = (v) => (log ? Math.log10(v) : v);
  const all = series.flatMap((s) => s.points).filter(([, v]) => typeof v === "number" && (!log || v > 0));
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  if (id) svg.setAttribute("id", id);
  svg.setAttribute("role", "img");
  const counts = Object.fromEntries(series.map((s) => [s.name, s.points.length]));
  for (const [name, n] of Object.entries(counts)) svg.setAttribute(`data-${name}-points`, n);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  if (!all.length) {
    svg.setAttribute("aria-label", `${label}: no data yet`);
    add("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for the first step…");
    return svg;
  }
  const xs = all.map(([x]) => x), ys = all.map(([, y]) => tf(y));
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  // losses and learning rates are never negative: the padding must not invent a negative axis
  y0 = !log && y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad;
  y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (tf(y) - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4, y = T + (1 - i / 4) * (H - T - B);
    add("line", { class: "grid", x1: L, x2: W - R, y1: y, y2: y });
    const shown = log ? 10 ** v : v;
    add("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, shown === 0 ? "0" : Math.abs(shown) < 0.01 ? shown.toExponential(1) : shown.toPrecision(3));
  }
  // x ticks on whole steps, evenly spaced: a step of 1, 2 or 5 × 10ⁿ that gives at most 6
  const ticks = [];
  const raw = Math.max(1, (x1 - x0) / 6);
  const unit = 10 ** Math.floor(Math.log10(raw));
  const every = [1, 2, 5, 10].map((m) => m * unit).find((d) => d >= raw && Number.isInteger(d)) || Math.ceil(raw);
  for (let x = Math.ceil(x0 / every) * every; x <= x1; x += every) {
    ticks.push(x);
    add("text", { x: sx(x), y: H - 8, "text-anchor": "middle" }, x);
  }
  svg.setAttribute("data-x-ticks", ticks.join(" "));
  add("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B });
  add("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B });
  const summary = [];
  for (const s of series) {
    const pts = s.points.filter(([, v]) => typeof v === "number" && (!log || v > 0)).sort((a, b) => a[0] - b[0]);
    if (!pts.length) continue;
    add("polyline", { class: s.name, points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") });
    if (s.dots) for (const [x, y] of pts) add("circle", { class: s.name, cx: sx(x), cy: sy(y), r: 3.5 });
    summary.push(`${s.name} ${pts[0][1].toPrecision(4)} at step ${pts[0][0]} to ${pts[pts.length - 1][1].toPrecision(4)} at step ${pts[pts.length - 1][0]}`);
  }
  svg.setAttribute("aria-label", `${label}${log ? " (log scale)" : ""}: ${summary.join("; ")}`);
  return svg;
}

// ---------- new job form ----------

const TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

function field(name, labelText, input, hint) {
  const id = "f-" + name.replace(/\./g, "-");
  input.id = id;
  input.name = name;
  const error = el("p", { class: "field-error", id: id + "-error", "data-error-for": name, "aria-live": "polite" });
  input.setAttribute("aria-describedby", id + "-error" + (hint ? ` ${id}-hint` : ""));
  return el("div", { class: "field", "data-field": name },
    el("label", { for: id, text: labelText }), input,
    hint ? el("span", { class: "hint", id: id + "-hint", text: hint }) : null, error);
}
const num = (value, attrs = {}) => el("input", { type: "number", value, step: "any", ...attrs });
const text = (value = "", attrs = {}) => el("input", { type: "text", value, ...attrs });
function select(options, chosen) {
  return el("select", {}, options.map(([v, t]) => el("option", { value: v, selected: v === chosen, text: t })));
}

function newJobView() {
  const formError = el("div", { role: "alert" });
  const upload = el("input", { type: "file", id: "f-upload", accept: ".jsonl,.json,.txt" });
  const targets = el("div", { class: "checks", role: "group", "aria-label": "Target modules", id: "f-lora-target_modules", tabindex: "-1" },
    TARGETS.map((t) => el("label", {}, el("input", { type: "checkbox", value: t, checked: ["q_proj", "k_proj", "v_proj", "o_proj"].includes(t) }), ` ${t}`)));
  const targetsField = el("div", { class: "field", "data-field": "lora.target_modules" },
    el("span", { class: "label", text: "Target modules" }), targets,
    el("p", { class: "field-error", "data-error-for": "lora.target_modules", "aria-live": "polite" }));
  const submit = el("button", { type: "submit", text: "Submit job" });
  const form = el("form", { class: "job", novalidate: true },
    el("fieldset", {}, el("legend", { text: "Model and data" }), el("div", { class: "fields" },
      field("base_model", "Base model", text("", { required: true, placeholder: "HuggingFaceTB/SmolLM2-135M-Instruct" }), "Hub repo id, local folder or .gguf file on the server"),
      field("dataset.url", "Dataset URL", text("", { placeholder: "https://… or file-… or a path" }), "or upload a JSONL file below"),
      el("div", { class: "field" }, el("label", { for: "f-upload", text: "Upload dataset" }), upload),
      field("dataset.format", "Format", select([["auto", "auto"], ["messages", "messages"], ["sharegpt", "sharegpt"], ["alpaca", "alpaca"], ["prompt_completion", "prompt_completion"], ["text", "text"]], "auto")),
      field("dataset.validation_split", "Validation split", num("", { min: 0, max: 1, placeholder: "none" }), "fraction held out for eval, e.g. 0.1"))),
    el("fieldset", {}, el("legend", { text: "LoRA / QLoRA" }), el("div", { class: "fields" },
      field("lora.r", "Rank r", num(8, { min: 1, step: 1 })),
      field("lora.alpha", "Alpha", num("", { placeholder: "2·r" }), "scale is alpha / r"),
      field("lora.dropout", "Dropout", num(0.05, { min: 0, max: 1 })),
      field("quantization", "Quantized base", select([["", "none (float32)"], ["nf4", "NF4 4-bit + double quant"], ["fp4", "FP4 4-bit"], ["int8", "INT8"], ["gguf", "GGUF's own types"]], "")),
      targetsField)),
    el("fieldset", {}, el("legend", { text: "Training" }), el("div", { class: "fields" },
      field("training.epochs", "Epochs", num(3, { min: 1, step: 1 })),
      field("training.max_steps", "Max steps", num("", { min: 1, step: 1, placeholder: "from epochs" }), "overrides epochs"),
      field("training.batch_size", "Batch size", num(4, { min: 1, step: 1 })),
      field("training.gradient_accumulation_steps", "Gradient accumulation", num(1, { min: 1, step: 1 })),
      field("training.learning_rate", "Learning rate", num(0.0002)),
      field("training.lr_scheduler", "LR schedule", select([["linear", "linear"], ["cosine", "cosine"], ["constant", "constant"]], "linear")),
      field("training.warmup_steps", "Warmup steps", num(0, { min: 0, step: 1 })),
      field("training.max_seq_len", "Max sequence length", num(1024, { min: 2, step: 1 })),
      field("training.eval_every_steps", "Eval every N steps", num("", { min: 1, step: 1, placeholder: "at the end" })),
      field("checkpoint_every_steps", "Checkpoint every N steps", num("", { min: 1, step: 1, placeholder: "at the end" })),
      field("seed", "Seed", num(42, { min: 0, step: 1 })))),
    formError,
    el("div", { class: "actions" }, submit));

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form, formError);
    submit.disabled = true;
    try {
      const spec = specFromForm(form, targets);
      if (upload.files.length) {
        const file = upload.files[0];
        const up = await api("POST", `/v1/files?filename=${encodeURIComponent(file.name)}`, file, "application/octet-stream");
        if (!up.ok) { showError(form, formError, "dataset.url", `Upload failed: ${errorText(up)}`); return; }
        spec.dataset.url = up.body.id;
      }
      const res = await api("POST", "/v1/jobs", spec);
      if (res.ok) { location.hash = `#/jobs/${res.body.id}`; return; }
      const e = res.body && res.body.error;
      showError(form, formError, e && e.param, e ? e.message : errorText(res));
    } catch (e) {
      showError(form, formError, null, e.message);
    } finally {
      submit.disabled = false;
    }
  });
  main().replaceChildren(el("h1", { text: "New job" }), form);
  return () => {};
}

function specFromForm(form, targets) {
  const spec = { dataset: {}, lora: {}, training: {} };
  for (const input of form.querySelectorAll("[name]")) {
    const name = input.name, raw = input.value.trim();
    if (raw === "") continue;
    if (name === "quantization") {
      spec.quantization = { nf4: { bits: 4, type: "nf4", double_quant: true }, fp4: { bits: 4, type: "fp4" }, int8: { bits: 8, type: "int8" }, gguf: { type: "gguf" } }[raw];
      continue;
    }
    const value = input.type === "number" ? Number(raw) : raw;
    const path = name.split(".");
    let obj = spec;
    for (const p of path.slice(0, -1)) obj = obj[p] ??= {};
    obj[path[path.length - 1]] = value;
  }
  spec.lora.target_modules = [...targets.querySelectorAll("input:checked")].map((c) => c.value);
  return spec;
}

function clearErrors(form, formError) {
  formError.replaceChildren();
  for (const p of form.querySelectorAll(".field-error")) p.textContent = "";
  for (const f of form.querySelectorAll(".field.invalid")) f.classList.remove("invalid");
  for (const i of form.querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
}

/** Puts the server's message next to the field its `param` names (or the nearest enclosing one). */
function showError(form, formError, param, message) {
  let name = param || "";
  let target = null;
  while (name && !(target = form.querySelector(`.field[data-field="${CSS.escape(name)}"]`))) {
    name = name.includes(".") ? name.slice(0, name.lastIndexOf(".")) : "";
  }
  if (!target) {
    formError.replaceChildren(el("p", { class: "error-box", text: message }));
    return;
  }
  target.classList.add("invalid");
  target.querySelector(".field-error").textContent = message;
  const input = target.querySelector("input, select, [tabindex]");
  if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
}

// ---------- API key, routing ----------

function setupKeyForm() {
  const input = document.getElementById("api-key");
  const state = document.getElementById("key-state");
  const show = () => { state.textContent = localStorage.getItem(KEY_STORE) ? "key saved" : "no key"; };
  input.value = localStorage.getItem(KEY_STORE) || "";
  document.getElementById("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (input.value.trim()) localStorage.setItem(KEY_STORE, input.value.trim());
    else localStorage.removeItem(KEY_STORE);
    show();
    route();
  });
  show();
}

function route() {
  leaveView();
  const hash = location.hash || "#/";
  const job = hash.match(/^#\/jobs\/([0-9a-f-]{36})$/);
  if (job) leaveView = jobView(job[1]);
  else if (hash === "#/new") leaveView = newJobView();
  else leaveView = jobsView();
  document.title = job ? `qtune · job ${job[1].slice(0, 8)}` : hash === "#/new" ? "qtune · new job" : "qtune · jobs";
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => { setupKeyForm(); route(); });
