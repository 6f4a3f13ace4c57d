// streamer dashboard: a snapshot each time the event stream (re)opens, then server-sent events.
// No dependencies. Every text from Redis (model output, user text) goes in with textContent only.
"use strict";

const MAX_ANSWERS = 100;
const MAX_WINDOWS_PER_ROUTE = 12;
const MAX_WINDOWS = 2000;           // results kept in memory across all routes
const MAX_DEAD_LETTERS = 15;
const CHART_SPAN_MS = 120_000;      // the charts show the last two minutes
const P50_SPAN_MS = 30_000;         // latency p50 over answers received in the last 30 s
const MAX_TYPING = 20;              // answers shown typing at once

const state = {
  answers: [],                      // {stream_id, answer}, newest first
  typing: new Map(),                // event id -> {id, route, seq, text}: answers being generated
  deadLetters: [],                  // {stream_id, error, dead_letter}, newest first
  windows: new Map(),               // window id -> result
  counters: {},
  late: {},
  lastTick: null,                   // the previous tick, for counter deltas
  throughput: [],                   // {t, v}: answers/s between two ticks (server time)
  latency: [],                      // {t, v}: p50 latency_ms, or null when no answer came
  recentLatencies: [],              // {at, ms}: at = when the answer reached this page (Date.now())
};

// --- helpers ------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const numberFormat = new Intl.NumberFormat("en");
const fmt = (n) => numberFormat.format(Math.round(Number(n) || 0));
const num = (value) => Number(value) || 0;

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}

function fmtTime(ms, withDate) {
  const iso = new Date(ms).toISOString();            // UTC, like the epoch-ms times it shows
  return withDate ? `${iso.slice(0, 10)} ${iso.slice(11, 19)}` : iso.slice(11, 19);
}

function fmtSpan(ms) {
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000} h`;
  if (ms % 60_000 === 0) return `${ms / 60_000} min`;
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

// Stream ids are "ms-seq"; compare them numerically, newest first.
function byStreamIdDesc(a, b) {
  const [am, as] = a.stream_id.split("-").map(Number);
  const [bm, bs] = b.stream_id.split("-").map(Number);
  return bm - am || bs - as;
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

// Renders at most once per frame, whatever the event rate.
const dirty = new Set();
let frame = 0;
function schedule(...parts) {
  parts.forEach((p) => dirty.add(p));
  if (!frame) frame = requestAnimationFrame(render);
}

// --- merging what arrives -----------------------------------------------------------------------

function mergeStream(list, items, max) {
  const seen = new Set(list.map((x) => x.stream_id));
  for (const item of items) if (!seen.has(item.stream_id)) { list.push(item); seen.add(item.stream_id); }
  list.sort(byStreamIdDesc);
  list.length = Math.min(list.length, max);
}

// An answer typing: its deltas in order; another run (a replay) starts over, at seq 0 or later where its
// first deltas were dropped. It leaves when its answer
// arrives, or at its final marker when it ended without one (a dead letter).
function addPartial(p) {
  if (state.answers.some(({ answer }) => answer.id === p.id)) return;  // its final marker came after the answer
  const typing = state.typing.get(p.id);
  if (p.seq === 0 || !typing || p.run !== typing.run) {
    state.typing.set(p.id, { id: p.id, route: p.route, run: p.run, seq: p.seq, text: p.delta });
  }
  else if (p.seq > typing.seq) Object.assign(typing, { seq: p.seq, text: typing.text + p.delta });
  if (p.final && p.error) state.typing.delete(p.id);
  while (state.typing.size > MAX_TYPING) state.typing.delete(state.typing.keys().next().value);
  schedule("answers");
}

function addAnswers(items, arrivedAt) {
  mergeStream(state.answers, items, MAX_ANSWERS);
  for (const { answer } of items) {
    state.typing.delete(answer.id);
    // Snapshot answers count as arrived when they were produced (ts_out, server clock vs page clock).
    const at = arrivedAt ?? Date.now() - Math.max(0, state.snapshotNow - num(answer.ts_out));
    if (Number.isFinite(answer.latency_ms)) state.recentLatencies.push({ at, ms: answer.latency_ms });
  }
  schedule("answers");
}

// A final result is never replaced by a provisional one; otherwise the latest emitted wins.
function addWindow(result) {
  if (!result || !result.id) return;
  const known = state.windows.get(result.id);
  if (known && (known.final && !result.final || (known.final === result.final && known.emitted_at > result.emitted_at))) return;
  state.windows.set(result.id, result);
  if (state.windows.size > MAX_WINDOWS) {
    const oldest = [...state.windows.values()].sort((a, b) => a.window.end - b.window.end);
    for (const w of oldest.slice(0, state.windows.size - MAX_WINDOWS)) state.windows.delete(w.id);
  }
  schedule("windows");
}

function onTick(tick) {
  state.counters = tick.counters;
  state.late = tick.late;
  const prev = state.lastTick;
  if (prev && tick.t > prev.t) {
    const rate = (num(tick.counters.answers) - num(prev.counters.answers)) * 1000 / (tick.t - prev.t);
    pushPoint(state.throughput, { t: tick.t, v: Math.max(0, rate) });
  }
  state.lastTick = tick;
  const since = Date.now() - P50_SPAN_MS;
  state.recentLatencies = state.recentLatencies.filter((x) => x.at >= since);
  const p50 = state.recentLatencies.length ? median(state.recentLatencies.map((x) => x.ms)) : null;
  pushPoint(state.latency, { t: tick.t, v: p50 });
  schedule("counters", "charts", "problems");
}

function pushPoint(series, point) {
  series.push(point);
  while (series.length && series[0].t < point.t - CHART_SPAN_MS) series.shift();
}

function applySnapshot(snap) {
  state.snapshotNow = snap.now;
  document.getElementById("prefix").textContent = `· ${snap.prefix}`;
  state.counters = snap.counters;
  state.late = snap.late;
  addAnswers(snap.answers);
  mergeStream(state.deadLetters, snap.dead_letters, MAX_DEAD_LETTERS);
  for (const w of [...snap.windows.recent, ...snap.windows.latest]) addWindow(w);
  schedule("counters", "problems", "windows");
}

// --- rendering ----------------------------------------------------------------------------------

function render() {
  frame = 0;
  if (dirty.has("counters")) renderCounters();
  if (dirty.has("answers")) renderAnswers();
  if (dirty.has("windows")) renderWindows();
  if (dirty.has("charts")) renderCharts();
  if (dirty.has("problems")) renderProblems();
  dirty.clear();
}

function renderCounters() {
  const c = state.counters;
  const late = Object.values(state.late).reduce((a, b) => a + num(b), 0);
  document.getElementById("counter-events").textContent = fmt(c.events);
  document.getElementById("counter-answers").textContent = fmt(c.answers);
  document.getElementById("counter-dead-letters").textContent = fmt(c.dead_letters);
  document.getElementById("counter-late").textContent = fmt(late);
  document.getElementById("counter-windows").textContent = fmt(c.windows);
  document.getElementById("counter-tokens").textContent = `${fmt(c.tokens_in)} / ${fmt(c.tokens_out)}`;
}

function renderAnswers() {
  const typing = [...state.typing.values()].reverse().map((t) =>
    el("li", { class: "typing", "data-id": t.id },
      el("div", { class: "meta" },
        el("span", { class: "id" }, t.id),
        el("span", { class: "task" }, t.route),
        el("span", { class: "muted" }, "typing…")),
      el("p", { class: "output" }, t.text)));
  const answered = state.answers.map(({ stream_id, answer: a }) =>
    el("li", { "data-id": a.id, "data-stream-id": stream_id },
      el("div", { class: "meta" },
        el("span", { class: "id" }, a.id),
        a.key !== null && a.key !== undefined ? el("span", { class: "key" }, a.key) : null,
        el("span", { class: "task" }, a.task),
        el("span", { class: "latency", title: `queued ${fmtMs(a.queued_ms)}` }, fmtMs(a.latency_ms)),
        el("span", { class: "muted" }, `${a.tokens_out} tok`)),
      el("p", { class: "output" }, typeof a.output === "string" ? a.output : JSON.stringify(a.output))));
  const items = [...typing, ...answered];
  document.getElementById("answers").replaceChildren(...items);
  document.getElementById("answers-empty").hidden = items.length > 0;
}

function labelBars(labels) {
  const entries = Object.entries(labels).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  const total = entries.reduce((sum, [, n]) => sum + n, 0) || 1;
  return el("div", { class: "bars" }, ...entries.map(([label, n]) => bar(label, n, n / total)));
}

function bar(label, value, fraction) {
  const fill = el("span", { class: "fill" });
  fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  return el("div", { class: "bar", "data-label": label },
    el("span", { class: "name" }, label), el("span", { class: "track" }, fill), el("span", { class: "n" }, fmt(value)));
}

function windowCard(w) {
  const bounds = w.window;
  return el("article", {
      class: `window ${w.final ? "final" : "open"}`, "data-window-id": w.id, "data-final": String(w.final),
      "data-route": w.route, "data-key": w.key ?? "*", "data-count": w.count },
    el("div", { class: "meta" },
      el("span", { class: "key" }, w.key ?? "all keys"),
      el("span", { class: "badge" }, w.final ? "closed" : "open"),
      el("span", { class: "muted" }, `${bounds.kind} ${fmtSpan(bounds.end - bounds.start)}`),
      el("span", { class: "count" }, `${fmt(w.count)} event${w.count === 1 ? "" : "s"}`)),
    el("div", { class: "time muted" }, `${fmtTime(bounds.start, true)} → ${fmtTime(bounds.end)} UTC`),
    w.summary ? el("p", { class: "summary" }, w.summary) : null,
    w.labels && Object.keys(w.labels).length ? labelBars(w.labels) : null,
    w.stats ? el("div", { class: "stats muted" },
      `chars ${w.stats.chars_min}–${w.stats.chars_max} (mean ${w.stats.chars_mean.toFixed(1)}), ` +
      `${fmt(w.stats.tokens_total)} tokens, ${w.stats.distinct_keys} key${w.stats.distinct_keys === 1 ? "" : "s"}`) : null);
}

function renderWindows() {
  const byRoute = new Map();
  for (const w of state.windows.values()) {
    if (!byRoute.has(w.route)) byRoute.set(w.route, []);
    byRoute.get(w.route).push(w);
  }
  const sections = [...byRoute.keys()].sort().map((route) => {
    const windows = byRoute.get(route)
      .sort((a, b) => b.window.end - a.window.end || String(a.key).localeCompare(String(b.key)))
      .slice(0, MAX_WINDOWS_PER_ROUTE);
    const open = windows.filter((w) => !w.final).length;
    return el("section", { class: "route", "data-route": route },
      el("h3", {}, route, el("span", { class: "muted" },
        ` ${open} open · ${fmt(state.late[route])} late`)),
      el("div", { class: "cards" }, ...windows.map(windowCard)));
  });
  document.getElementById("windows").replaceChildren(...sections);
  document.getElementById("windows-empty").hidden = sections.length > 0;
}

function renderProblems() {
  const codes = Object.entries(state.counters)
    .filter(([name]) => name.startsWith("dead_letters:"))
    .map(([name, n]) => [name.slice("dead_letters:".length), n])
    .sort((a, b) => b[1] - a[1]);
  const maxCode = Math.max(1, ...codes.map(([, n]) => n));
  document.getElementById("dead-letter-codes").replaceChildren(
    ...(codes.length ? codes.map(([code, n]) => bar(code, n, n / maxCode)) : [el("p", { class: "muted" }, "None.")]));
  document.getElementById("dead-letters").replaceChildren(...state.deadLetters.map(({ stream_id, error, dead_letter: d }) =>
    el("li", { "data-stream-id": stream_id, "data-error": error },
      el("span", { class: "code" }, error), el("span", { class: "id" }, d.id ?? "(no id)"),
      el("span", { class: "muted" }, d.source ? `${d.source.topic}[${d.source.partition}]@${d.source.offset}`
                                                : "a window result"),
      el("span", { class: "detail" }, d.detail))));
  const routes = Object.entries(state.late).sort((a, b) => b[1] - a[1]);
  const maxLate = Math.max(1, ...routes.map(([, n]) => n));
  document.getElementById("late-routes").replaceChildren(
    ...(routes.length ? routes.map(([route, n]) => bar(route, n, n / maxLate)) : [el("p", { class: "muted" }, "None.")]));
}

const SVG = "http://www.w3.org/2000/svg";

function renderCharts() {
  drawChart("chart-throughput", state.throughput, 1, (v) => `${v.toFixed(v < 10 ? 1 : 0)}/s`);
  drawChart("chart-latency", state.latency, 10, fmtMs);
}

// A line over the last CHART_SPAN_MS in a 300x80 viewBox; a null value breaks the line.
function drawChart(id, series, minTop, label) {
  const figure = document.getElementById(id);
  const svg = figure.querySelector("svg");
  const values = series.filter((p) => p.v !== null).map((p) => p.v);
  const top = Math.max(minTop, ...values) * 1.1;
  const end = series.length ? series[series.length - 1].t : 0;
  const x = (t) => (300 * (t - (end - CHART_SPAN_MS)) / CHART_SPAN_MS).toFixed(1);
  const y = (v) => (78 - 76 * v / top).toFixed(1);
  const runs = [[]];
  for (const p of series) {
    if (p.v === null) { if (runs[runs.length - 1].length) runs.push([]); continue; }
    runs[runs.length - 1].push(`${x(p.t)},${y(p.v)}`);
  }
  const shapes = [];
  for (const run of runs.filter((r) => r.length)) {
    const points = run.length === 1 ? [run[0], `${(Number(run[0].split(",")[0]) + 2).toFixed(1)},${run[0].split(",")[1]}`] : run;
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("vector-effect", "non-scaling-stroke");
    shapes.push(line);
  }
  svg.replaceChildren(...shapes);
  const last = series.length ? series[series.length - 1].v : null;
  figure.querySelector(".now").textContent = last === null ? "–" : label(last);
  figure.querySelector(".scale").textContent = values.length ? `max ${label(Math.max(...values))}` : "waiting for data";
}

// --- the connection -----------------------------------------------------------------------------

function setStatus(stateName, text) {
  document.getElementById("status").dataset.state = stateName;
  document.getElementById("status-text").textContent = text;
  document.body.dataset.live = String(stateName === "live");
}

// The snapshot is (re)loaded each time the stream opens; until it is in, the page is not "live".
let snapshot = "missing";           // missing | loading | loaded

function loadSnapshot() {
  snapshot = "loading";
  fetch("api/snapshot", { cache: "no-store" })
    .then(async (response) => {
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || response.statusText);
      applySnapshot(body);
      snapshot = "loaded";
      setStatus("live", `live · ${fmtTime(Date.now())} UTC`);
    })
    .catch((err) => {
      snapshot = "missing";         // the next tick tries again
      setStatus("problem", `snapshot failed: ${err.message}`);
    });
}

function connect() {
  const events = new EventSource("api/events");
  const on = (name, handle) => events.addEventListener(name, (e) => handle(JSON.parse(e.data)));
  // The server fixed where its stream starts before this fires: the snapshot overlaps it, never misses.
  events.addEventListener("open", loadSnapshot);
  events.addEventListener("error", () => {
    snapshot = "missing";
    setStatus("connecting", "disconnected, reconnecting…");
    // EventSource retries a dropped stream by itself, but gives up after an HTTP error (Redis down).
    if (events.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
  });
  on("answer", (item) => addAnswers([item], Date.now()));
  on("partial", addPartial);
  on("dead_letter", (item) => { mergeStream(state.deadLetters, [item], MAX_DEAD_LETTERS); schedule("problems"); });
  on("window", addWindow);
  on("tick", (tick) => {
    onTick(tick);
    if (snapshot === "missing") loadSnapshot();
    else if (snapshot === "loaded") setStatus("live", `live · ${fmtTime(tick.t)} UTC`);
  });
  on("problem", (p) => setStatus("problem", p.detail));
}

connect();
