"use strict";
// jetbatch's admin page. Reads the /v1 routes with the session cookie (or no key at all on an
// api without keys); every state-changing request carries the session's CSRF token.
// A batch's progress reaches the page only through its event stream
// (GET /v1/batches/{id}/events, EventSource): the list of batches only says which exist.

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const TERMINAL = new Set(["completed", "failed", "cancelled", "expired"]);
const MAX_STREAMS = 3; // HTTP/1.1 allows 6 connections per host: leave room for the rest
const REFRESH_MS = {batches: 3000, workers: 2000, queues: 3000, "dead-letters": 3000,
  webhooks: 4000, logs: 3000, usage: 10000};

// -- helpers ---------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function fmtInt(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en"); }
function fmtAgo(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, seconds);
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h ago";
}
function fmtTime(unix) {
  return unix ? new Date(unix * 1000).toLocaleString("en-GB", {hour12: false}) : "–";
}
function fmtDuration(s) {
  if (!isFinite(s) || s < 0) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(sec).padStart(2, "0");
}
function bar(fraction, label, level) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  const fill = el("span", {class: "fill " + (level || "")});
  fill.style.width = pct.toFixed(1) + "%";
  return el("span", {class: "bar", role: "progressbar", "aria-valuemin": "0",
    "aria-valuemax": "100", "aria-valuenow": pct.toFixed(0)}, fill,
  el("span", {class: "label"}, label));
}
function level(fraction, warn, high) {
  return fraction >= high ? "high" : fraction >= warn ? "warn" : "";
}
function badge(text, kind) { return el("span", {class: "badge " + (kind || text)}, text); }

function toast(message, kind) {
  const t = document.getElementById("toast");
  t.textContent = message;
  t.className = kind || "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 5000);
}

class SessionEnded extends Error {}

function sessionEnded() {
  if (sessionEnded.done) return;
  sessionEnded.done = true;
  for (const s of streams.values()) s.source.close();
  location.replace("/admin" + location.hash); // the login form
}

async function api(method, path) {
  const headers = {"Accept": "application/json"};
  if (method !== "GET") headers["X-CSRF-Token"] = CSRF;
  const response = await fetch(path, {method, headers, credentials: "same-origin"});
  if (response.status === 401) { sessionEnded(); throw new SessionEnded(); }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Error((body && body.error && body.error.message) || response.status + "");
  }
  return body;
}

async function act(method, path, done) {
  try {
    const body = await api(method, path);
    toast(done(body), "ok");
  } catch (e) {
    if (!(e instanceof SessionEnded)) toast(String(e.message || e), "error");
  }
  refresh(current());
}

// -- batches: the list says which exist; each open one's progress comes from its stream --------

const rows = new Map(); // batch id -> {tr, batch, samples, final}
const streams = new Map(); // batch id -> {source}
const waiting = []; // open batches without a stream yet

function batchRow(id) {
  let row = rows.get(id);
  if (!row) {
    const tr = el("tr", {dataset: {batchId: id}});
    row = {tr, batch: null, samples: [], final: false};
    rows.set(id, row);
  }
  return row;
}

function renderBatch(row) {
  const b = row.batch;
  const c = b.request_counts || {total: 0, completed: 0, failed: 0};
  const done = c.completed + c.failed;
  const fraction = c.total ? done / c.total : (b.status === "completed" ? 1 : 0);
  let rate = null, eta = null;
  if (row.samples.length >= 2) {
    const [t0, d0] = row.samples[0], [t1, d1] = row.samples[row.samples.length - 1];
    if (t1 > t0) rate = (d1 - d0) / ((t1 - t0) / 1000);
    if (rate > 0 && !TERMINAL.has(b.status)) eta = (c.total - done) / rate;
  }
  const label = fmtInt(done) + " / " + fmtInt(c.total) + (c.failed ? " (" + c.failed + " failed)" : "");
  const cancellable = !TERMINAL.has(b.status) && b.status !== "cancelling";
  row.tr.replaceChildren(
    el("td", {class: "mono"}, b.id),
    el("td", {}, b.model || "–"),
    el("td", {class: "status"}, badge(b.status)),
    el("td", {class: "progress"}, bar(fraction, label, b.status === "failed" ? "high" : "")),
    el("td", {class: "rate"}, rate === null ? "–" : rate.toFixed(1) + " lines/s"),
    el("td", {class: "eta"}, eta === null ? "–" : fmtDuration(eta)),
    el("td", {}, fmtTime(b.created_at)),
    el("td", {}, cancellable ? el("button", {type: "button", class: "danger",
      onclick: () => act("POST", "/v1/batches/" + encodeURIComponent(b.id) + "/cancel",
        (x) => "batch " + x.id + ": " + x.status)}, "Cancel") : ""),
  );
}

function onProgress(id, data) {
  const row = batchRow(id);
  row.batch = JSON.parse(data);
  const c = row.batch.request_counts || {completed: 0, failed: 0};
  row.samples.push([Date.now(), c.completed + c.failed]);
  const cutoff = Date.now() - 30000;
  while (row.samples.length > 2 && row.samples[0][0] < cutoff) row.samples.shift();
  renderBatch(row);
}

function openStream(id) {
  const source = new EventSource("/v1/batches/" + encodeURIComponent(id) + "/events");
  streams.set(id, {source});
  source.addEventListener("progress", (e) => onProgress(id, e.data));
  source.addEventListener("done", (e) => {
    onProgress(id, e.data);
    batchRow(id).final = true;
    closeStream(id);
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself (with Last-Event-ID); a stream refused for good
    // (401, 404) is CLOSED: find out whether the session ended.
    if (source.readyState === EventSource.CLOSED) {
      closeStream(id);
      api("GET", "/v1/batches?limit=1").catch(() => {});
    }
  });
}

function closeStream(id) {
  const s = streams.get(id);
  if (s) { s.source.close(); streams.delete(id); }
  while (streams.size < MAX_STREAMS && waiting.length) {
    const next = waiting.shift();
    if (!batchRow(next).final) openStream(next);
  }
}

async function loadBatches() {
  const list = await api("GET", "/v1/batches?limit=20");
  const tbody = document.getElementById("batches");
  const order = [];
  for (const b of list.data) {
    const known = rows.has(b.id);
    const row = batchRow(b.id);
    order.push(row.tr);
    if (known) continue;
    if (TERMINAL.has(b.status)) { // finished before the page saw it: nothing will move
      row.batch = b;
      row.final = true;
      renderBatch(row);
    } else {
      row.batch = {id: b.id, model: b.model, status: "…", created_at: b.created_at,
        request_counts: {total: 0, completed: 0, failed: 0}};
      renderBatch(row);
      if (streams.size < MAX_STREAMS) openStream(b.id); else waiting.push(b.id);
    }
  }
  if (!list.data.length) order.push(el("tr", {}, el("td", {colspan: "8", class: "empty"}, "No batches yet.")));
  tbody.replaceChildren(...order);
}

// -- workers -----------------------------------------------------------------------------------

function workerCard(w) {
  const state = w.state || "running";
  const id = w.worker_id, control = w.control_id || w.worker_id;
  // The state is the worker's own (its heartbeat); the command is what was last ordered.
  const stopping = w.command === "drain" || w.command === "restart";
  const command = (verb) => () => act("POST", "/v1/workers/" + encodeURIComponent(control) + "/" + verb,
    () => "worker " + id + ": " + verb + " ordered");
  const mem = w.gpu_memory_total_mb ? w.gpu_memory_used_mb / w.gpu_memory_total_mb : null;
  const gauges = w.gpu_name === null && mem === null && w.gpu_temperature_c === null
    ? [el("p", {class: "muted"}, "no GPU reported")]
    : [
      el("div", {class: "gauge"}, el("span", {}, "GPU memory"), bar(mem,
        mem === null ? "–" : fmtInt(w.gpu_memory_used_mb) + " / " + fmtInt(w.gpu_memory_total_mb) + " MB",
        level(mem || 0, 0.8, 0.95))),
      el("div", {class: "gauge"}, el("span", {}, "temperature"), bar((w.gpu_temperature_c || 0) / 100,
        w.gpu_temperature_c === null ? "–" : w.gpu_temperature_c + " °C",
        level((w.gpu_temperature_c || 0) / 100, 0.75, 0.85))),
      el("div", {class: "gauge"}, el("span", {}, "utilisation"), bar((w.gpu_utilization_pct || 0) / 100,
        w.gpu_utilization_pct === null ? "–" : w.gpu_utilization_pct + " %")),
    ];
  return el("article", {class: "card worker", dataset: {workerId: id, state}},
    el("h3", {}, id, " ", badge(state, "state-" + state),
      w.command && w.command !== "resume" && w.command !== state.replace(/ed$|ing$/, "")
        ? badge("ordered: " + w.command, "warn") : "",
      w.stale ? badge("stale", "high") : w.healthy ? badge("healthy", "ok") : badge("unhealthy", "high")),
    el("p", {class: "muted"}, w.model, " · ", w.engine, " · ", w.host, " pid ", w.pid,
      w.gpu_name ? " · GPU " + w.gpu_index + " " + w.gpu_name : ""),
    el("div", {class: "gauge"}, el("span", {}, "capacity"), bar(w.capacity ? w.in_flight / w.capacity : 0,
      w.in_flight + " / " + w.capacity + " in flight", level(w.capacity ? w.in_flight / w.capacity : 0, 0.9, 1.01))),
    ...gauges,
    el("p", {class: "heartbeat"}, "heartbeat ", fmtAgo(w.age_s), " · ", fmtInt(w.completed), " done · ",
      (w.tokens_per_s || 0).toFixed(1), " tokens/s"),
    el("div", {class: "actions"},
      state === "running" && !stopping
        ? el("button", {type: "button", class: "drain", onclick: command("drain")}, "Drain")
        : el("button", {type: "button", class: "resume", onclick: command("resume")}, "Resume"),
      el("button", {type: "button", class: "quiet restart", onclick: command("restart")}, "Restart")),
  );
}

async function loadWorkers() {
  const list = await api("GET", "/v1/workers");
  const cards = list.data.map(workerCard);
  document.getElementById("workers").replaceChildren(
    ...(cards.length ? cards : [el("p", {class: "empty"}, "No worker has sent a heartbeat.")]));
}

// -- queues: /metrics (the fleet's queue figures) and /v1/stats --------------------------------

function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = /^(jetbatch_queue_\w+)\{([^}]*)\}\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    out.push({name: m[1], labels, value: Number(m[3])});
  }
  return out;
}

async function loadQueues() {
  const [metrics, stats] = await Promise.all([
    fetch("/metrics", {credentials: "same-origin"}).then((r) => r.text()),
    api("GET", "/v1/stats"),
  ]);
  const models = new Map();
  const get = (m) => {
    if (!models.has(m)) models.set(m, {depth: 0, undelivered: null, unacked: null, pending: 0, active: 0});
    return models.get(m);
  };
  for (const s of parseMetrics(metrics)) {
    const q = get(s.labels.model || "?");
    if (s.name === "jetbatch_queue_depth") q.depth += s.value;
    if (s.name === "jetbatch_queue_undelivered") q.undelivered = s.value;
    if (s.name === "jetbatch_queue_unacked") q.unacked = s.value;
  }
  for (const g of stats.models) {
    const q = get(g.key || "?");
    q.pending = g.lines_pending;
    q.active = g.batches_active;
  }
  const trs = [...models.entries()].sort().map(([m, q]) => el("tr", {dataset: {model: m}},
    el("td", {}, m), el("td", {class: "num"}, fmtInt(q.depth)), el("td", {class: "num"}, fmtInt(q.undelivered)),
    el("td", {class: "num"}, fmtInt(q.unacked)), el("td", {class: "num"}, fmtInt(q.pending)),
    el("td", {class: "num"}, fmtInt(q.active))));
  document.getElementById("queues").replaceChildren(
    ...(trs.length ? trs : [el("tr", {}, el("td", {colspan: "6", class: "empty"}, "No queues."))]));
}

// -- dead letters, webhook deliveries ------------------------------------------------------------

async function loadDeadLetters() {
  const list = await api("GET", "/v1/dead_letters?limit=50");
  const trs = list.data.map((d) => el("tr", {dataset: {deadLetterId: d.id}},
    el("td", {}, d.id), el("td", {}, fmtTime(d.created_at)), el("td", {}, d.source || "–"),
    el("td", {class: "mono"}, d.subject), el("td", {class: "mono"}, d.batch_id || "–",
      d.custom_id ? " / " + d.custom_id : ""),
    el("td", {class: "error-text"}, d.error), el("td", {class: "num"}, d.deliveries),
    el("td", {class: "replayed"}, d.replay_count ? d.replay_count + "× " + fmtTime(d.replayed_at) : "–"),
    el("td", {}, el("button", {type: "button", class: "replay",
      onclick: () => act("POST", "/v1/dead_letters/" + d.id + "/replay",
        (x) => "dead letter " + x.id + " replayed (" + x.replay_count + "×)")}, "Replay"))));
  document.getElementById("dead-letters").replaceChildren(
    ...(trs.length ? trs : [el("tr", {}, el("td", {colspan: "9", class: "empty"}, "No dead letters."))]));
}

async function loadWebhooks() {
  const list = await api("GET", "/v1/webhook_deliveries?limit=50");
  const trs = list.data.map((d) => el("tr", {dataset: {deliveryId: d.id}},
    el("td", {class: "mono"}, d.id), el("td", {}, d.event_type), el("td", {class: "mono"}, d.batch_id),
    el("td", {class: "mono"}, d.url), el("td", {}, badge(d.status)), el("td", {class: "num"}, d.attempts),
    el("td", {}, d.last_status_code || d.last_error || "–"),
    el("td", {}, d.status === "pending" ? "" : el("button", {type: "button", class: "resend",
      onclick: () => act("POST", "/v1/webhook_deliveries/" + encodeURIComponent(d.id) + "/resend",
        (x) => "delivery " + x.id + " re-sent")}, "Resend"))));
  document.getElementById("webhooks").replaceChildren(
    ...(trs.length ? trs : [el("tr", {}, el("td", {colspan: "8", class: "empty"}, "No webhook deliveries."))]));
}

// -- logs ----------------------------------------------------------------------------------------

async function loadLogs() {
  const form = document.getElementById("log-filter");
  const q = new URLSearchParams({level: form.level.value, limit: "100"});
  if (form.service.value) q.set("service", form.service.value);
  const list = await api("GET", "/v1/logs?" + q);
  const counts = list.counts || {error: 0, warning: 0};
  const summary = [badge(counts.error + " errors", counts.error ? "high" : "muted"),
    badge(counts.warning + " warnings", counts.warning ? "warn" : "muted")];
  document.getElementById("log-counts").replaceChildren(...summary);
  document.getElementById("log-badges").replaceChildren(
    ...(counts.error ? [badge(String(counts.error), "high")] : []));
  const trs = list.data.map((r) => el("tr", {class: "log-" + String(r.level).toLowerCase()},
    el("td", {class: "mono"}, r.time), el("td", {}, badge(r.level, String(r.level).toLowerCase() === "warning" ? "warn" : "high")),
    el("td", {}, r.service), el("td", {class: "mono"}, r.logger), el("td", {}, r.message),
    el("td", {class: "mono"}, r.batch_id || "–", r.custom_id ? " / " + r.custom_id : "")));
  document.getElementById("logs").replaceChildren(
    ...(trs.length ? trs : [el("tr", {}, el("td", {colspan: "6", class: "empty"}, "Nothing logged."))]));
}

// -- usage per project ---------------------------------------------------------------------------

async function loadUsage() {
  const day = 86400, start = Math.floor(Date.now() / 1000 / day) * day - 6 * day;
  const [usage, stats] = await Promise.all([
    api("GET", "/v1/organization/usage/completions?bucket_width=1d&limit=7&group_by=project_id&start_time=" + start),
    api("GET", "/v1/stats"),
  ]);
  const projects = new Map();
  const get = (p) => {
    if (!projects.has(p)) projects.set(p, {stats: null, requests: 0, input: 0, output: 0});
    return projects.get(p);
  };
  for (const bucket of usage.data) {
    for (const r of bucket.results) {
      const p = get(r.project_id || "?");
      p.requests += r.num_model_requests || 0;
      p.input += r.input_tokens || 0;
      p.output += r.output_tokens || 0;
    }
  }
  for (const g of stats.projects) get(g.key).stats = g;
  const trs = [...projects.entries()].sort().map(([id, p]) => el("tr", {dataset: {project: id}},
    el("td", {class: "mono"}, id), el("td", {class: "num"}, fmtInt(p.stats && p.stats.batches_created)),
    el("td", {class: "num"}, fmtInt(p.stats && p.stats.batches_active)),
    el("td", {class: "num"}, fmtInt(p.stats && p.stats.lines_completed)),
    el("td", {class: "num"}, fmtInt(p.stats && p.stats.lines_failed)),
    el("td", {class: "num"}, fmtInt(p.requests)), el("td", {class: "num"}, fmtInt(p.input)),
    el("td", {class: "num"}, fmtInt(p.output))));
  document.getElementById("usage").replaceChildren(
    ...(trs.length ? trs : [el("tr", {}, el("td", {colspan: "8", class: "empty"}, "No usage yet."))]));
}

// -- views and refreshing ------------------------------------------------------------------------

const LOADERS = {batches: loadBatches, workers: loadWorkers, queues: loadQueues,
  "dead-letters": loadDeadLetters, webhooks: loadWebhooks, logs: loadLogs, usage: loadUsage};
const inFlight = new Set();

function current() {
  const name = location.hash.slice(1);
  return LOADERS[name] ? name : "batches";
}

async function refresh(name) {
  if (inFlight.has(name) || sessionEnded.done) return;
  inFlight.add(name);
  const view = document.getElementById("view-" + name);
  try {
    await LOADERS[name]();
    view.classList.remove("failed");
    view.dataset.loaded = "true";
  } catch (e) {
    if (!(e instanceof SessionEnded)) {
      view.classList.add("failed");
      view.dataset.error = String(e.message || e);
    }
  } finally {
    inFlight.delete(name);
  }
}

let timer = null;
function show() {
  const name = current();
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + name;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === name);
  clearInterval(timer);
  refresh(name);
  timer = setInterval(() => {
    refresh(current());
    if (current() !== "batches") refresh("batches"); // new batches get their streams meanwhile
  }, REFRESH_MS[name]);
}

window.addEventListener("hashchange", show);
document.getElementById("log-filter").addEventListener("change", () => refresh("logs"));
document.getElementById("logout").addEventListener("click", async () => {
  try {
    await api("POST", "/admin/logout");
  } catch (e) { /* ended already */ }
  sessionEnded();
});
show();
