// Live cluster view: server-sent events from /api/events.
"use strict";
const $ = id => document.getElementById(id);
const inFlight = new Map();            // device -> set of "request/stage/chunk"
const counts = {requests: 0, failed: 0, reassignments: 0, failures: 0};
const recent = [];                      // last request_done / request_failed events
const MAX_RECENT = 5;

function logLine(text, cls) {
  const box = $("log"), div = document.createElement("div");
  div.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  if (cls) div.className = cls;
  box.prepend(div);
  while (box.childNodes.length > 200) box.removeChild(box.lastChild);
}

function renderStatus(st) {
  const tbody = $("devices").querySelector("tbody");
  tbody.textContent = "";
  const labels = [];
  for (const b of st.backends || []) {
    labels.push(b.label);
    for (const d of b.devices || []) {
      const tr = document.createElement("tr");
      const live = (inFlight.get(d.name) || new Set()).size;
      const cells = [d.name, d.state || (d.alive ? "alive" : "DOWN"),
        d.cpu === null || d.cpu === undefined ? "–" : `${(100 * d.cpu).toFixed(0)} %`,
        d.bandwidth ? `${fmtBytes(d.bandwidth)}/s` : "–",
        d.in_flight === null || d.in_flight === undefined ? live : Math.max(live, d.in_flight),
        d.chunks_done ?? "–", `${b.backend} / ${b.model}`];
      for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
      if (!d.alive) tr.className = "dead";
      tr.dataset.device = d.name;
      tbody.appendChild(tr);
    }
    if (!b.healthy && b.detail) labels.push(`(${b.detail})`);
  }
  const banner = $("backend");
  banner.textContent = labels.length ? labels.join(" · ") :
    `backend: ${st.backend} — no model used yet; send a request from the recognise page`;
  banner.classList.toggle("local", st.backend === "reference");
}

function renderCounters() {
  $("counters").textContent = `requests ${counts.requests} (failed ${counts.failed}), ` +
    `reassignments ${counts.reassignments}, chunk failures ${counts.failures}`;
}

function renderRequests() {
  const box = $("requests");
  box.textContent = "";
  for (const ev of recent.slice().reverse()) {
    const div = document.createElement("div");
    div.className = "request";
    const h = document.createElement("div");
    if (ev.type === "request_failed") {
      h.innerHTML = `<b></b> <span class="dead"></span>`;
      h.querySelector("b").textContent = ev.id;
      h.querySelector("span").textContent = `${ev.error}: ${ev.message}`;
      div.appendChild(h);
    } else {
      h.innerHTML = `<b></b> <span class="muted"></span>`;
      h.querySelector("b").textContent = `${ev.id}: ${ev.top[0].label}`;
      h.querySelector("span").textContent = `${ev.model.key}, ${fmtMs(ev.latency_ms)}, ` +
        `${ev.trace.chunks.length} chunks on ${ev.trace.devices.length} device(s)`;
      div.appendChild(h);
      const tl = document.createElement("div");
      tl.className = "timeline-box";
      div.appendChild(tl);
      drawTimeline(tl, ev.trace);
    }
    box.appendChild(div);
  }
}

function addRequest(ev) {
  recent.push(ev);
  while (recent.length > MAX_RECENT) recent.shift();
  renderRequests();
}

const handlers = {
  snapshot(ev) {
    if (ev.status && ev.status.backends) renderStatus(ev.status);
    recent.length = 0;
    for (const r of ev.requests || []) {
      recent.push(r);
      logLine(r.type === "request_done" ? `${r.id} done earlier: ${r.top[0].label} in ${fmtMs(r.latency_ms)}`
                                        : `${r.id} FAILED earlier: ${r.error}`, r.type === "request_done" ? "" : "bad");
    }
    while (recent.length > MAX_RECENT) recent.shift();
    const c = ev.counters || {};
    counts.requests = (c.request_done || 0) + (c.request_failed || 0);
    counts.failed = c.request_failed || 0;
    counts.reassignments = c.reassignment || 0;
    counts.failures = c.failure || 0;
    renderRequests(); renderCounters();
  },
  status(ev) { renderStatus(ev); },
  request_start(ev) { logLine(`${ev.id} started (${ev.model} on ${ev.backend})`); },
  chunk(ev) {
    const key = `${ev.request}/${ev.stage}/${ev.chunk}`;
    if (!inFlight.has(ev.device)) inFlight.set(ev.device, new Set());
    if (ev.state === "start") inFlight.get(ev.device).add(key); else inFlight.get(ev.device).delete(key);
  },
  reassignment(ev) {
    counts.reassignments++; renderCounters();
    logLine(`${ev.request}: stage ${ev.stage} chunk ${ev.chunk} reassigned to ${ev.device} (attempt ${ev.retries})`, "re");
  },
  failure(ev) {
    counts.failures++; renderCounters();
    logLine(`${ev.request}: stage ${ev.stage} chunk ${ev.chunk} ${ev.status} on ${ev.device}`, "bad");
  },
  request_done(ev) {
    counts.requests++; renderCounters();
    for (const s of inFlight.values()) for (const k of [...s]) if (k.startsWith(ev.id + "/")) s.delete(k);
    logLine(`${ev.id} done: ${ev.top[0].label} in ${fmtMs(ev.latency_ms)}`);
    addRequest(ev);
  },
  request_failed(ev) {
    counts.requests++; counts.failed++; renderCounters();
    logLine(`${ev.id} FAILED: ${ev.error}: ${ev.message}`, "bad");
    addRequest(ev);
  },
};

function connect() {
  const es = new EventSource(withToken("/api/events"));
  es.onopen = () => { $("conn").textContent = "live"; };
  es.onerror = () => { $("conn").textContent = "reconnecting…"; };
  for (const [type, fn] of Object.entries(handlers)) {
    es.addEventListener(type, e => fn(JSON.parse(e.data)));
  }
}
connect();
