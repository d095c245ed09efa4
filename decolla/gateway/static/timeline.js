// Draws a per-device timeline of one request's chunks as SVG (no dependencies).
// trace = {devices: [...], chunks: [{stage, chunk, device, send, start, end, receive, retries,
//          status, name, bytes_in, bytes_out}]}, times in ms since the request began.
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceStep(span) {
  const raw = span / 6, p = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  for (const m of [1, 2, 5, 10]) if (raw <= m * p) return m * p;
  return 10 * p;
}

// Hues 90..300 only: reds stay reserved for late / failed chunks.
function stageColour(stage) { return `hsl(${90 + (stage * 47) % 210}, 55%, 50%)`; }

function drawTimeline(box, trace) {
  box.textContent = "";
  const chunks = (trace && trace.chunks) || [];
  if (!chunks.length) { box.textContent = "no trace"; return null; }
  const devices = [...new Set(chunks.map(c => c.device))].sort();
  const left = 130, right = 12, top = 6, row = 22, axisH = 22;
  const width = 900, plotW = width - left - right;
  const tmax = Math.max(...chunks.map(c => Math.max(c.receive, c.end, c.start))) || 1;
  const x = t => left + (t / tmax) * plotW;
  const height = top + devices.length * row + axisH;
  const svg = svgEl("svg", {class: "timeline", viewBox: `0 0 ${width} ${height}`,
                            role: "img", "aria-label": "per-device timeline"});
  devices.forEach((d, i) => {
    const y = top + i * row;
    svg.appendChild(svgEl("text", {x: 4, y: y + row * 0.65}, d.length > 20 ? d.slice(0, 19) + "…" : d));
    svg.appendChild(svgEl("line", {x1: left, x2: width - right, y1: y + row - 1, y2: y + row - 1,
                                   class: "axis"}));
  });
  for (const c of chunks) {
    const y = top + devices.indexOf(c.device) * row;
    // Round trip as the requester saw it (send -> receive), then the compute on the device.
    svg.appendChild(svgEl("line", {x1: x(c.send), x2: x(c.receive), y1: y + row / 2,
                                   y2: y + row / 2, stroke: "#9aa4b1", "stroke-width": 1}));
    const bad = c.status === "failed" || c.status === "late" || c.status === "cancelled";
    const rect = svgEl("rect", {
      x: x(c.start), y: y + 3, width: Math.max(1, x(c.end) - x(c.start)), height: row - 8,
      fill: bad ? "#e57373" : stageColour(c.stage), "fill-opacity": bad ? 0.6 : 0.9,
      stroke: c.retries ? "#b26a00" : "none", "stroke-width": c.retries ? 2 : 0,
      class: "chunk", "data-status": c.status});
    rect.appendChild(svgEl("title", {}, `${c.name || ""} stage ${c.stage} chunk ${c.chunk} on ${c.device}\n` +
      `compute ${(c.end - c.start).toFixed(2)} ms, round trip ${(c.receive - c.send).toFixed(2)} ms\n` +
      `bytes in ${c.bytes_in}, out ${c.bytes_out}; attempt ${c.retries}; ${c.status}`));
    svg.appendChild(rect);
  }
  const step = niceStep(tmax), yAxis = top + devices.length * row;
  for (let t = 0; t <= tmax + 1e-9; t += step) {
    svg.appendChild(svgEl("line", {x1: x(t), x2: x(t), y1: top, y2: yAxis + 4, class: "axis",
                                   "stroke-dasharray": "2,3"}));
    svg.appendChild(svgEl("text", {x: x(t), y: yAxis + 16, "text-anchor": "middle"},
                          `${+t.toFixed(3)} ms`));
  }
  box.appendChild(svg);
  return svg;
}

function fmtMs(ms) { return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(1) + " ms"; }
function fmtBytes(b) {
  if (b === null || b === undefined) return "–";
  return b >= 1e6 ? (b / 1e6).toFixed(1) + " MB" : b >= 1e3 ? (b / 1e3).toFixed(1) + " kB" : b + " B";
}
