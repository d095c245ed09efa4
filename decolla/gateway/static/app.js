// Requester page: send a photo to /api/infer, show top-5, latency and the per-device timeline.
"use strict";
const $ = id => document.getElementById(id);
let MODELS = {};

async function loadModels() {
  const r = await apiFetch("/api/models");
  const info = await r.json();
  const b = $("backend");
  b.textContent = info.backend.label;
  b.dataset.kind = info.backend.kind;
  b.classList.toggle("local", info.backend.kind === "local-reference");
  const sel = $("model");
  sel.textContent = "";
  for (const m of info.models) {
    MODELS[m.key] = m;
    const o = document.createElement("option");
    o.value = m.key; o.textContent = m.title;
    sel.appendChild(o);
  }
  sel.value = info.default;
  showNote();
}

function showNote() {
  const m = MODELS[$("model").value];
  $("model-note").textContent = m ? `${m.input_size}×${m.input_size} input, ${m.num_classes} classes, ` +
    `${(m.macs / 1e6).toFixed(1)} M MACs${m.note ? " — " + m.note : ""}` : "";
}

async function send(file) {
  if (!file) return;
  $("error").hidden = true;
  $("state").textContent = `Recognising ${file.name || "photo"} (${fmtBytes(file.size)})…`;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.style.display = "block";
  const form = new FormData();
  form.append("image", file, file.name || "photo.jpg");
  const url = `/api/infer?model=${encodeURIComponent($("model").value)}&k=5`;
  let body;
  try {
    const r = await apiFetch(url, {method: "POST", body: form});
    body = await r.json();
    if (!r.ok) throw new Error(`${r.status} ${body.error}: ${body.message}`);
  } catch (e) {
    $("state").textContent = "";
    $("error").textContent = String(e.message || e);
    $("error").hidden = false;
    return;
  }
  render(body);
}

function render(res) {
  $("state").textContent = `Done: ${res.model.title} (digest ${res.model.digest.slice(0, 12)}) ` +
    `answered on ${res.backend.label}.`;
  const ol = $("top");
  ol.textContent = "";
  for (const t of res.top) {
    const li = document.createElement("li");
    li.dataset.index = t.index;
    li.innerHTML = `<b class="label"></b> <span class="muted">${(100 * t.prob).toFixed(1)} %</span>` +
                   `<div class="bar" style="width:${Math.max(1, 100 * t.prob)}%"></div>`;
    li.querySelector(".label").textContent = t.label;
    ol.appendChild(li);
  }
  $("warning").hidden = !res.warning;
  $("warning").textContent = res.warning || "";
  $("latency").textContent = fmtMs(res.latency_ms);
  $("latency").dataset.ms = res.latency_ms;
  const tm = res.timings_ms;
  $("timings").textContent = `inference on ${res.trace.devices.length} device(s); ` +
    `decode ${fmtMs(tm.decode)}, preprocess ${fmtMs(tm.preprocess)}, total at gateway ${fmtMs(tm.total)}`;
  $("rid").textContent = `(${res.id}, ${res.trace.chunks.length} chunks)`;
  $("trace-link").href = withToken(res.trace_url);
  drawTimeline($("timeline"), res.trace);
  $("result").hidden = false;
  $("result").dataset.rid = res.id;
}

$("model").addEventListener("change", showNote);
for (const id of ["camera-input", "file-input"]) {
  $(id).addEventListener("change", e => { send(e.target.files[0]); e.target.value = ""; });
}
loadModels().catch(e => { $("backend").textContent = "cannot reach the gateway: " + e; });
