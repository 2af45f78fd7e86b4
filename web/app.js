// qtune dashboard: jobs list, job page with live curves, job form with upload check and estimate,
// a playground that chats with a fine-tuned model beside its base, and a comparison of runs.
// Plain JS, no build step; served from the binary. It talks to the same /v1 API as curl and the
// CLI. The API key lives in sessionStorage (this tab, until it closes): never in a URL.
"use strict";

const KEY_STORE = "qtune.apiKey";
const keyStore = window.sessionStorage;
const main = () => document.getElementById("main");
let leaveView = () => {}; // stops the current view's timers and streams

// ---------- API ----------

function authHeaders(extra = {}) {
  const key = keyStore.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

/** Says in the header, once per answer, that the key is missing or wrong. */
function keyRefused(status) {
  if (status !== 401) return;
  const state = document.getElementById("key-state");
  const hasKey = !!keyStore.getItem(KEY_STORE);
  state.className = "key-error";
  state.textContent = hasKey
    ? "The server refused this API key (401). Check it and save it again."
    : "This server needs an API key (401): enter it here.";
  document.getElementById("api-key").setAttribute("aria-invalid", "true");
}

/** Calls the API; resolves to {status, body} with body parsed as JSON when it is JSON. */
async function api(method, path, body, contentType = "application/json") {
  const init = { method, headers: authHeaders() };
  if (body !== undefined) {
    init.body = contentType === "application/json" ? JSON.stringify(body) : body;
    init.headers["Content-Type"] = contentType;
  }
  const resp = await fetch(path, init);
  keyRefused(resp.status);
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
  keyRefused(resp.status);
  if (!resp.ok || !resp.body) throw new Error(`events: HTTP ${resp.status}`);
  await readEvents(resp, (kind, data) => onEvent(kind, JSON.parse(data)));
}

/** Calls `onEvent(kind, data)` for each event of an SSE response body, until it ends. */
async function readEvents(resp, onEvent) {
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
      if (data) onEvent(kind, data);
    }
  }
}

/** Downloads with the API key attached (a plain link cannot carry it). */
async function download(path, filename) {
  const resp = await fetch(path, { headers: authHeaders() });
  keyRefused(resp.status);
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
  const selected = new Set();
  const compare = el("button", { class: "secondary", id: "compare-selected", disabled: true,
    onclick: () => { location.hash = `#/compare?ids=${[...selected].join(",")}`; }, text: "Compare selected" });
  const showSelected = () => {
    compare.disabled = selected.size < 2;
    compare.textContent = selected.size ? `Compare selected (${selected.size})` : "Compare selected";
  };
  main().replaceChildren(
    el("div", { class: "page-head" }, el("h1", { text: "Jobs" }),
      el("div", { class: "actions" }, compare, el("a", { class: "button", href: "#/new", text: "New job" }))),
    el("div", { class: "table-wrap" },
      el("table", {},
        el("thead", {}, el("tr", {},
          el("th", { scope: "col" }, el("span", { class: "visually-hidden", text: "Compare" })),
          el("th", { scope: "col", text: "Job" }), el("th", { scope: "col", text: "Status" }),
          el("th", { scope: "col", text: "Base model" }), el("th", { scope: "col", text: "Progress" }),
          el("th", { scope: "col", text: "Loss" }), el("th", { scope: "col", class: "hide-narrow", text: "Created" }))),
        body)),
    note);
  async function refresh() {
    const res = await api("GET", "/v1/jobs?limit=100");
    if (!res.ok) { note.textContent = errorText(res); body.replaceChildren(); return; }
    note.textContent = res.body.data.length ? "" : "No jobs yet. Submit one from New job.";
    body.replaceChildren(...res.body.data.map((job) => {
      const p = job.progress;
      const total = p.total_steps || 0;
      const name = job.spec.suffix ? `${job.id.slice(0, 8)} · ${job.spec.suffix}` : job.id.slice(0, 8);
      const pick = el("input", { type: "checkbox", class: "pick", checked: selected.has(job.id),
        "aria-label": `Compare job ${name}`,
        onchange: (ev) => { if (ev.target.checked) selected.add(job.id); else selected.delete(job.id); showSelected(); } });
      return el("tr", { "data-job": job.id },
        el("td", {}, pick),
        el("td", { class: "mono" }, el("a", { href: `#/jobs/${job.id}`, text: name })),
        el("td", {}, statusBadge(job.status)),
        el("td", { class: "model", text: job.spec.base_model }),
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
  // margin, evalMargin: a preference job's reward margin (chosen − rejected), TRL's rewards/margins
  const curve = { train: new Map(), eval: new Map(), lr: new Map(), trainAcc: new Map(), evalAcc: new Map(),
    margin: new Map(), evalMargin: new Map() };
  let job = null, logScale = false, timer = null;

  const title = el("h1", { text: `Job ${id}` });
  const facts = el("dl", { class: "facts", "aria-live": "polite" });
  const errorBox = el("div");
  const actions = el("div", { class: "actions" });
  const logToggle = el("input", { type: "checkbox", id: "log-scale", onchange: () => { logScale = logToggle.checked; draw(); } });
  const chartBox = el("div");
  const lrBox = el("div");
  const accBox = el("div");
  const marginHead = el("h2", { text: "Reward margin", hidden: true });
  const marginBox = el("div");
  const checkpoints = el("div");
  const exportsBox = el("div", { id: "exports" });
  const events = el("ol", { class: "events", id: "events", reversed: true });
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
    marginHead, marginBox,
    el("h2", { text: "Learning rate" }), lrBox,
    el("h2", { text: "Checkpoints" }), checkpoints,
    el("h2", { text: "Export" }), exportsBox,
    el("h2", { text: "Events" }), events,
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
    const preference = curve.margin.size > 0;
    marginHead.hidden = !preference;
    marginBox.replaceChildren(...(preference ? [lineChart([
      { name: "train", points: [...curve.margin] },
      { name: "eval", points: [...curve.evalMargin], dots: true },
    ], { height: 160, label: "Reward margin (chosen − rejected) against step", id: "margin-chart" })] : []));
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
        job.status === "succeeded" ? el("button", { class: "secondary", id: "download-adapter",
          onclick: () => download(`/v1/jobs/${id}/adapter`, `adapter-${id}.tar`), text: "Download adapter (.tar)" }) : "",
        job.status === "succeeded" ? el("a", { class: "button", id: "open-playground", href: `#/playground?job=${id}`, text: "Try it in the playground" }) : "",
        el("a", { class: "button secondary", href: `#/compare?ids=${id}`, text: "Compare with…" }));
      exportsBox.replaceChildren(job.status === "succeeded" ? exportForm(id)
        : el("p", { class: "muted", text: "Exports are made from a succeeded job's adapter." }));
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
          if (typeof data["rewards/margins"] === "number") curve.margin.set(data.step, data["rewards/margins"]);
          drawSoon();
        } else if (kind === "eval") {
          curve.eval.set(data.step, data.eval_loss);
          if (typeof data.eval_accuracy === "number") curve.evalAcc.set(data.step, data.eval_accuracy);
          if (typeof data["rewards/margins"] === "number") curve.evalMargin.set(data.step, data["rewards/margins"]);
          drawSoon();
        } else if (kind === "checkpoint") {
          refreshCheckpoints();
        } else if (kind === "status") {
          refreshJob();
        }
        if (kind !== "metrics") events.prepend(el("li", {}, el("strong", { text: kind }), " ", eventSummary(kind, data)));
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

/** One line for the events list (the curves show the steps themselves). */
function eventSummary(kind, d) {
  if (kind === "status") {
    const parts = [d.status, d.phase && `phase ${d.phase}`, d.attempt && `attempt ${d.attempt}`, d.reason,
      d.error && `${d.error.code}: ${d.error.message}`];
    return parts.filter(Boolean).join(" · ");
  }
  if (kind === "eval") return `step ${d.step}: eval loss ${fmtLoss(d.eval_loss)}`;
  if (kind === "checkpoint") return `step ${d.step}: ${(d.files || []).map((f) => f.name).join(", ")}`;
  return Object.entries(d).map(([k, v]) => `${k.replace(/_/g, " ")} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ");
}

const EXPORT_FORMATS = [
  ["gguf-q8_0", "GGUF, Q8_0 (llama.cpp, Ollama)"], ["gguf-q4_k", "GGUF, Q4_K"], ["gguf-f16", "GGUF, F16"],
  ["gguf-f32", "GGUF, F32"], ["gguf-lora", "llama.cpp LoRA GGUF (the adapter alone)"],
  ["merged", "Merged Hugging Face folder (.tar)"],
];

/** Export a succeeded job (POST …/exports, which answers once the file is stored), then download it. */
function exportForm(id) {
  const format = el("select", { id: "export-format" }, EXPORT_FORMATS.map(([v, t]) => el("option", { value: v, text: t })));
  const state = el("p", { class: "muted", role: "status", id: "export-state" });
  const go = el("button", { type: "submit", id: "export", text: "Export" });
  return el("form", { class: "inline", onsubmit: async (ev) => {
    ev.preventDefault();
    go.disabled = true;
    state.textContent = `Exporting ${format.value}… (a merged model takes a while)`;
    const res = await api("POST", `/v1/jobs/${id}/exports`, { format: format.value });
    go.disabled = false;
    if (!res.ok) { state.textContent = errorText(res); return; }
    const name = `${id.slice(0, 8)}-${format.value}${format.value === "merged" ? ".tar" : ".gguf"}`;
    state.replaceChildren(`${format.value} is ready (${fmtBytes(res.body.bytes)}). `,
      el("button", { class: "secondary", id: "download-export", type: "button",
        onclick: () => download(res.body.url, name), text: `Download ${name}` }));
  } }, el("label", { for: "export-format", text: "Format" }), format, go, state);
}

const fmtBytes = (b) => (typeof b !== "number" ? "–" : b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(2)} GiB`
  : b >= 2 ** 20 ? `${(b / 2 ** 20).toFixed(1)} MiB` : `${(b / 1024).toFixed(0)} KiB`);

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
    // a series of the comparison has a palette colour (a class: the page's CSP allows no inline style)
    const look = { class: s.colour === undefined ? s.name : `series c${s.colour}${s.dots ? " dashed" : ""}` };
    add("polyline", { ...look, points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") });
    if (s.dots) for (const [x, y] of pts) add("circle", { ...look, cx: sx(x), cy: sy(y), r: 3.5 });
    summary.push(`${s.label || s.name} ${pts[0][1].toPrecision(4)} at step ${pts[0][0]} to ${pts[pts.length - 1][1].toPrecision(4)} at step ${pts[pts.length - 1][0]}`);
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
  const upload = el("input", { type: "file", id: "f-upload", accept: ".jsonl,.json,.txt", class: "visually-hidden" });
  const uploadState = el("p", { id: "upload-state", role: "status", class: "muted", text: "No file chosen." });
  const drop = el("div", { class: "drop", id: "drop" },
    el("label", { for: "f-upload" }, el("strong", { text: "Drop a JSONL file here" }), " or ", el("span", { class: "link", text: "choose one" })),
    upload, uploadState);
  const targets = el("div", { class: "checks", role: "group", "aria-label": "Target modules", id: "f-lora-target_modules", tabindex: "-1" },
    TARGETS.map((t) => el("label", {}, el("input", { type: "checkbox", value: t, checked: ["q_proj", "k_proj", "v_proj", "o_proj"].includes(t) }), ` ${t}`)));
  const targetsField = el("div", { class: "field", "data-field": "lora.target_modules" },
    el("span", { class: "label", text: "Target modules" }), targets,
    el("p", { class: "field-error", "data-error-for": "lora.target_modules", "aria-live": "polite" }));
  const advanced = el("textarea", { rows: 4, spellcheck: "false", placeholder: '{"training": {"packing": false}, "compute_dtype": "bf16"}' });
  const estimateBox = el("div", { class: "estimate", id: "estimate", "aria-live": "polite" },
    el("p", { class: "muted", text: "Fill in the base model and the dataset to see the memory and time this job needs." }));
  const submit = el("button", { type: "submit", text: "Submit job" });
  const form = el("form", { class: "job", novalidate: true },
    el("fieldset", {}, el("legend", { text: "Model and data" }), el("div", { class: "fields" },
      field("base_model", "Base model", text("", { required: true, placeholder: "HuggingFaceTB/SmolLM2-135M-Instruct" }), "Hub repo id, local folder or .gguf file on the server"),
      field("dataset.url", "Dataset", text("", { placeholder: "file-… (an upload), https://… or a path" }), "an upload's id, filled in when you drop a file"),
      field("dataset.format", "Format", select([["auto", "auto"], ["messages", "messages"], ["sharegpt", "sharegpt"], ["alpaca", "alpaca"], ["prompt_completion", "prompt_completion"], ["text", "text"]], "auto")),
      field("dataset.validation_split", "Validation split", num("", { min: 0, max: 1, placeholder: "none" }), "fraction held out for eval, e.g. 0.1")),
      drop),
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
    el("details", { class: "advanced" }, el("summary", { text: "Advanced: more of the spec as JSON" }),
      field("advanced", "JSON merged over the fields above", advanced,
        "any field of the job spec (see the job spec guide), e.g. gradient checkpointing, packing, bf16")),
    el("fieldset", {}, el("legend", { text: "Before you submit" }), estimateBox),
    formError,
    el("div", { class: "actions" }, submit));

  let uploading = null;  // the upload in flight: submit waits for it
  async function uploadAndCheck(file) {
    const urlInput = form.querySelector("#f-dataset-url");
    clearErrors(form, formError);
    drop.classList.remove("ok", "bad");
    uploadState.setAttribute("role", "status");
    uploadState.textContent = `Uploading ${file.name} (${fmtBytes(file.size)})…`;
    const up = await api("POST", `/v1/files?filename=${encodeURIComponent(file.name)}`, file, "application/octet-stream");
    if (!up.ok) { failUpload(`${file.name}: upload failed: ${errorText(up)}`); return; }
    uploadState.textContent = `Checking ${file.name} line by line…`;
    const format = form.querySelector("#f-dataset-format").value;
    const checked = await api("POST", `/v1/files/${up.body.id}/check?format=${encodeURIComponent(format)}`);
    if (!checked.ok) { failUpload(`${file.name}: ${errorText(checked)}`); return; }
    if (checked.body.status !== "processed") { failUpload(checked.body.status_details || `${file.name}: not training data`); return; }
    urlInput.value = up.body.id;
    drop.classList.add("ok");
    uploadState.textContent = `✓ ${file.name}: every line reads as training data. Uploaded as ${up.body.id}.`;
    estimateSoon();
  }
  function failUpload(message) {
    drop.classList.add("bad");
    uploadState.setAttribute("role", "alert");
    uploadState.textContent = message;
  }
  const startUpload = (file) => { if (file) uploading = uploadAndCheck(file).finally(() => { uploading = null; }); };
  upload.addEventListener("change", () => startUpload(upload.files[0]));
  for (const kind of ["dragenter", "dragover"]) drop.addEventListener(kind, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  for (const kind of ["dragleave", "drop"]) drop.addEventListener(kind, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); startUpload(ev.dataTransfer.files[0]); });

  let estimateTimer = null, estimateSeq = 0;
  function estimateSoon() { clearTimeout(estimateTimer); estimateTimer = setTimeout(estimate, 500); }
  async function estimate() {
    let spec;
    try { spec = specFromForm(form, targets, advanced.value); } catch (_) { return; }
    if (!spec.base_model || !spec.dataset.url) return;
    const seq = ++estimateSeq;
    estimateBox.setAttribute("aria-busy", "true");
    const res = await api("POST", "/v1/jobs/estimate", spec);
    if (seq !== estimateSeq) return;  // a newer estimate is on its way
    estimateBox.removeAttribute("aria-busy");
    estimateBox.replaceChildren(...(res.ok ? estimateLines(res.body)
      : [el("p", { class: "field-error", text: `No estimate: ${res.body && res.body.error ? res.body.error.message : errorText(res)}` })]));
  }
  form.addEventListener("input", (ev) => { if (ev.target !== upload) estimateSoon(); });
  form.addEventListener("change", (ev) => { if (ev.target !== upload) estimateSoon(); });

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form, formError);
    submit.disabled = true;
    try {
      if (uploading) await uploading;
      const spec = specFromForm(form, targets, advanced.value);
      const res = await api("POST", "/v1/jobs", spec);
      if (res.ok) { location.hash = `#/jobs/${res.body.id}`; return; }
      const e = res.body && res.body.error;
      showError(form, formError, e && e.param, e ? e.message : errorText(res));
    } catch (e) {
      showError(form, formError, e.param || null, e.message);
    } finally {
      submit.disabled = false;
    }
  });
  main().replaceChildren(el("h1", { text: "New job" }), form);
  return () => clearTimeout(estimateTimer);
}

/** The estimate's answer in words: peak memory by part, which workers can hold it, how long. */
function estimateLines(e) {
  const m = e.memory || {};
  const parts = [["weights", m.weights_bytes], ["adapter", m.adapter_bytes], ["activations", m.activations_bytes],
    ["workspace", m.workspace_bytes], ["runtime", m.runtime_bytes]].filter(([, b]) => typeof b === "number");
  const fits = e.fits === true ? "A worker can hold it."
    : e.fits === false ? "No worker has the memory for it: lower max_seq_len or batch_size, quantize the base, or turn on gradient checkpointing."
    : "No worker has reported in yet, so whether it fits is not known.";
  const time = typeof e.seconds_per_step === "number"
    // the estimate takes every row as max_seq_len tokens long: an upper bound for short examples
    ? `Up to about ${e.seconds_per_step.toFixed(2)} s a step` + (typeof e.total_seconds === "number" ? `, ${fmtDuration(e.total_seconds)} for ${e.total_steps} steps` : "")
      + " (rows of max_seq_len tokens; shorter examples take less)."
    : "";
  return [
    el("p", { id: "estimate-memory" }, el("strong", { text: `Peak memory ${fmtBytes(m.peak_bytes)}` }),
      ` (${parts.map(([n, b]) => `${n} ${fmtBytes(b)}`).join(", ")})`),
    el("p", { id: "estimate-fits", "data-fits": String(e.fits), class: e.fits === false ? "field-error" : "", text: fits }),
    time ? el("p", { id: "estimate-time", text: time }) : "",
  ];
}

function specFromForm(form, targets, advancedText = "") {
  const spec = { dataset: {}, lora: {}, training: {} };
  for (const input of form.querySelectorAll("[name]")) {
    const name = input.name, raw = input.value.trim();
    if (raw === "" || name === "advanced") continue;
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
  if (advancedText.trim()) {
    let extra;
    try { extra = JSON.parse(advancedText); } catch (e) {
      throw Object.assign(new Error(`not valid JSON: ${e.message}`), { param: "advanced" });
    }
    if (!extra || typeof extra !== "object" || Array.isArray(extra)) {
      throw Object.assign(new Error("must be a JSON object of spec fields"), { param: "advanced" });
    }
    mergeInto(spec, extra);
  }
  return spec;
}

/** Deep merge: objects field by field, anything else replaced. */
function mergeInto(target, extra) {
  for (const [k, v] of Object.entries(extra)) {
    if (v && typeof v === "object" && !Array.isArray(v) && target[k] && typeof target[k] === "object" && !Array.isArray(target[k])) mergeInto(target[k], v);
    else target[k] = v;
  }
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
  const folded = target.closest("details");
  if (folded) folded.open = true;
  target.querySelector(".field-error").textContent = message;
  const input = target.querySelector("input, select, textarea, [tabindex]");
  if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
}

// ---------- playground ----------

/** Succeeded jobs, newest first (what the playground can talk to). */
async function succeededJobs() {
  const res = await api("GET", "/v1/jobs?status=succeeded&limit=100");
  return res.ok ? res.body.data : [];
}

/**
 * Chat with a fine-tuned model and, beside it, with its base, on the same prompt: both streamed
 * from /v1/chat/completions. The server decodes one request at a time by default, so the second
 * column may wait for the first to finish; each says so.
 */
function playgroundView(jobId) {
  const controller = new AbortController();
  const pick = el("select", { id: "pg-job" }, el("option", { value: "", text: "loading…" }));
  const prompt = el("textarea", { id: "pg-prompt", rows: 3, placeholder: "Ask something your data taught it…" });
  const system = el("input", { id: "pg-system", type: "text", placeholder: "optional" });
  const temperature = num(0, { id: "pg-temperature", min: 0, max: 2 });
  const maxTokens = num(96, { id: "pg-max-tokens", min: 1, max: 2048, step: 1 });
  const send = el("button", { type: "submit", id: "pg-send", text: "Send to both" });
  const note = el("p", { class: "muted", role: "status" });
  const columns = el("div", { class: "columns" });
  let jobs = [];
  const chosen = () => jobs.find((j) => j.id === pick.value);
  const form = el("form", { class: "playground", onsubmit: (ev) => { ev.preventDefault(); run(); } },
    el("div", { class: "fields" },
      el("div", { class: "field" }, el("label", { for: "pg-job", text: "Fine-tuned model (a succeeded job)" }), pick),
      el("div", { class: "field" }, el("label", { for: "pg-system", text: "System prompt" }), system),
      el("div", { class: "field" }, el("label", { for: "pg-temperature", text: "Temperature" }), temperature),
      el("div", { class: "field" }, el("label", { for: "pg-max-tokens", text: "Max tokens" }), maxTokens)),
    el("div", { class: "field" }, el("label", { for: "pg-prompt", text: "Prompt" }), prompt),
    el("div", { class: "actions" }, send, note));
  prompt.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); run(); } });
  main().replaceChildren(el("h1", { text: "Playground" }),
    el("p", { class: "muted", text: "The same prompt to the fine-tuned model and to its base, answers streamed side by side. Ctrl+Enter sends." }),
    form, columns);

  (async () => {
    jobs = await succeededJobs();
    if (jobs.length && jobId && !jobs.some((j) => j.id === jobId)) {
      note.textContent = `Job ${jobId.slice(0, 8)} has no model to try (it has not succeeded).`;
    }
    pick.replaceChildren(...(jobs.length ? jobs.map((j) => el("option", { value: j.id, selected: j.id === jobId,
      text: `${j.id.slice(0, 8)}${j.spec.suffix ? " · " + j.spec.suffix : ""} · ${j.spec.base_model}` }))
      : [el("option", { value: "", text: "no succeeded job yet" })]));
    send.disabled = !jobs.length;
  })();

  function run() {
    const job = chosen();
    if (!job || !prompt.value.trim()) { note.textContent = job ? "Write a prompt first." : "Pick a job first."; return; }
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value.trim() });
    messages.push({ role: "user", content: prompt.value.trim() });
    const request = { messages, temperature: Number(temperature.value || 0), max_tokens: Number(maxTokens.value || 96), stream: true };
    columns.replaceChildren(
      answerColumn("fine-tuned", `Fine-tuned · job ${job.id.slice(0, 8)}`, { ...request, model: job.id }, controller.signal),
      answerColumn("base", `Base · ${job.spec.base_model}`, { ...request, model: job.spec.base_model }, controller.signal));
    note.textContent = "";
  }
  return () => controller.abort();
}

/** One streamed answer: a heading, the text as it arrives, and its state. */
function answerColumn(kind, title, request, signal) {
  const text = el("div", { class: "answer-text", id: `answer-${kind}`, "data-state": "waiting" });
  const state = el("p", { class: "muted", role: "status", text: "waiting for its turn…" });
  const box = el("section", { class: "answer", "aria-label": title }, el("h2", { text: title }), text, state);
  (async () => {
    const started = performance.now();
    let tokens = 0, finish = "";
    try {
      const resp = await fetch("/v1/chat/completions", { method: "POST", signal,
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify({ ...request, stream_options: { include_usage: true } }) });
      keyRefused(resp.status);
      if (!resp.ok) {
        const body = await resp.json().catch(() => null);
        throw new Error(body && body.error ? `${body.error.message} (HTTP ${resp.status})` : `HTTP ${resp.status}`);
      }
      text.dataset.state = "streaming";
      state.textContent = "streaming…";
      await readEvents(resp, (_, data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) { text.append(choice.delta.content); text.dataset.chunks = Number(text.dataset.chunks || 0) + 1; }
        if (choice && choice.finish_reason) finish = choice.finish_reason;
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
      });
      text.dataset.state = "done";
      state.textContent = `${tokens} tokens in ${((performance.now() - started) / 1000).toFixed(1)} s${finish ? ` (${finish})` : ""}`;
    } catch (e) {
      if (signal.aborted) return;
      text.dataset.state = "error";
      state.setAttribute("role", "alert");
      state.className = "field-error";
      state.textContent = e.message;
    }
  })();
  return box;
}

// ---------- comparing runs ----------

const PALETTE_SIZE = 8;  // colours c0…c7 in app.css

/** The loss curves of several jobs on one chart, with a table of what differs between them. */
function compareView(ids) {
  const chartBox = el("div");
  const table = el("div", { class: "table-wrap" });
  const picker = el("fieldset", { class: "picker" }, el("legend", { text: "Jobs to compare" }));
  const logToggle = el("input", { type: "checkbox", id: "cmp-log", onchange: () => draw() });
  const evalToggle = el("input", { type: "checkbox", id: "cmp-eval", onchange: () => draw() });
  main().replaceChildren(el("h1", { text: "Compare runs" }),
    el("div", { class: "chart-head" },
      el("label", {}, logToggle, " log scale"), el("label", {}, evalToggle, " eval loss instead of train loss")),
    chartBox, table, picker);
  let curves = [];

  function draw() {
    const which = evalToggle.checked ? "eval_loss" : "train_loss";
    const series = curves.map((c, i) => ({
      name: `job-${c.job.id.slice(0, 8)}`, label: c.label, colour: i % PALETTE_SIZE, dots: evalToggle.checked,
      points: c.rows.filter((r) => typeof r[which] === "number").map((r) => [r.step, r[which]]),
    }));
    const chart = lineChart(series, { log: logToggle.checked, height: 320, id: "compare-chart",
      label: `${evalToggle.checked ? "Eval" : "Train"} loss against step, ${curves.length} jobs` });
    chart.dataset.series = String(series.filter((s) => s.points.length).length);
    chartBox.replaceChildren(chart);
    table.replaceChildren(curves.length ? el("table", {},
      el("thead", {}, el("tr", {}, ["", "Job", "Status", "Base model", "LoRA", "LR", "Steps", "Train loss", "Eval loss"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, curves.map((c, i) => {
        const sp = c.job.spec;
        return el("tr", { "data-job": c.job.id },
          el("td", {}, el("span", { class: `swatch c${i % PALETTE_SIZE}`, "aria-hidden": "true" })),
          el("td", { class: "mono" }, el("a", { href: `#/jobs/${c.job.id}`, text: c.label })),
          el("td", {}, statusBadge(c.job.status)),
          el("td", { class: "model", text: sp.base_model }),
          el("td", { text: `r ${sp.lora.r}, ${sp.lora.target_modules.length} modules${sp.quantization ? ", " + (sp.quantization.type || "") : ""}` }),
          el("td", { class: "num", text: sp.training.learning_rate }),
          el("td", { class: "num", text: `${c.job.progress.step}/${c.job.progress.total_steps ?? "?"}` }),
          el("td", { class: "num", text: fmtLoss(c.job.train_loss) }),
          el("td", { class: "num", text: fmtLoss(c.job.eval_loss) }));
      })))
      : el("p", { class: "muted", text: "Pick two or more jobs below." }));
  }

  async function load() {
    const loaded = await Promise.all(ids.map(async (id) => {
      const [job, metrics] = await Promise.all([api("GET", `/v1/jobs/${id}`), api("GET", `/v1/jobs/${id}/metrics`)]);
      if (!job.ok) return null;
      const label = job.body.spec.suffix ? `${id.slice(0, 8)} · ${job.body.spec.suffix}` : id.slice(0, 8);
      return { job: job.body, label, rows: metrics.ok ? metrics.body.data : [] };
    }));
    curves = loaded.filter(Boolean);
    draw();
  }

  (async () => {
    const res = await api("GET", "/v1/jobs?limit=100");
    const all = res.ok ? res.body.data : [];
    picker.append(el("div", { class: "checks" }, all.map((j) => el("label", {},
      el("input", { type: "checkbox", value: j.id, checked: ids.includes(j.id), onchange: (ev) => {
        ids = ev.target.checked ? [...ids, j.id] : ids.filter((x) => x !== j.id);
        history.replaceState(null, "", `#/compare?ids=${ids.join(",")}`);
        load();
      } }),
      ` ${j.id.slice(0, 8)}${j.spec.suffix ? " · " + j.spec.suffix : ""} (${j.status})`))));
  })();
  load();
  const timer = setInterval(() => { if (curves.some((c) => ["queued", "running"].includes(c.job.status))) load(); }, 3000);
  return () => clearInterval(timer);
}

// ---------- API key, routing ----------

function setupKeyForm() {
  const input = document.getElementById("api-key");
  const state = document.getElementById("key-state");
  const show = () => {
    state.className = "";
    input.removeAttribute("aria-invalid");
    state.textContent = keyStore.getItem(KEY_STORE) ? "key saved for this tab" : "no key";
  };
  // keys saved by the first dashboard lived in localStorage: move them out of it
  if (localStorage.getItem(KEY_STORE)) {
    keyStore.setItem(KEY_STORE, localStorage.getItem(KEY_STORE));
    localStorage.removeItem(KEY_STORE);
  }
  input.value = keyStore.getItem(KEY_STORE) || "";
  document.getElementById("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (input.value.trim()) keyStore.setItem(KEY_STORE, input.value.trim());
    else keyStore.removeItem(KEY_STORE);
    show();
    route();
  });
  show();
}

/** The view for the location's hash: `#/`, `#/new`, `#/jobs/ID`, `#/playground?job=ID`, `#/compare?ids=A,B`. */
function route() {
  leaveView();
  const hash = location.hash || "#/";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const job = path.match(/^\/jobs\/([0-9a-f-]{36})$/);
  let title = "jobs";
  if (job) { leaveView = jobView(job[1]); title = `job ${job[1].slice(0, 8)}`; }
  else if (path === "/new") { leaveView = newJobView(); title = "new job"; }
  else if (path === "/playground") { leaveView = playgroundView(params.get("job")); title = "playground"; }
  else if (path === "/compare") { leaveView = compareView((params.get("ids") || "").split(",").filter(Boolean)); title = "compare"; }
  else leaveView = jobsView();
  document.title = `qtune · ${title}`;
  for (const a of document.querySelectorAll(".top nav a")) {
    const here = a.getAttribute("href") === "#" + path || (a.getAttribute("href") === "#/" && path === "/");
    if (here) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => { setupKeyForm(); route(); });
