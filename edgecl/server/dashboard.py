"""The read-only dashboard page (``GET /dashboard``): one self-contained HTML file.

No CDN, no build step: inline CSS, inline JS, the chart is an inline SVG drawn by the script, so the
page works on a plant network with no way out. The page holds no data itself: it asks for the
admin token (kept in ``sessionStorage``, so it is gone when the tab closes; ``#token=...`` in the URL
is taken once and removed from the address bar) and reads ``GET /v1/dashboard`` with it, plus each
stored version's ``manifest.json`` for its model name (bundles are named by model and version, never
by their 32-hex-digit lineage id, which only shows on hover), and ``GET /v1/drift`` for the devices'
drift reports.

It shows the figures the commands print, with the same words: the release check's table of
`edgecl release` (accuracy per class group on the held-out images, ncm head: frozen baseline,
current version, candidate) as the chart, the devices' do-no-harm check of `edgecl adapt`, and
what `edgecl watch` reports over time (unknown rate, mean confidence, embedding shift: a second
chart, one row per device on one time axis).
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgecl fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
 h1{font-size:20px;margin:0 0 .2em} h2{font-size:16px;margin:1.4em 0 .4em}
 table{border-collapse:collapse;background:#fff;min-width:40em} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
 th{background:#f0f0f0;font-weight:600} td:first-child{white-space:nowrap} td.n{text-align:right;font-variant-numeric:tabular-nums}
 .muted{color:#777} .bad{color:#b00} .good{color:#070} #error{color:#b00;font-weight:bold}
 #login{display:none;margin:1em 0} input{font:inherit;width:32em}
 svg text{font:11px system-ui,sans-serif} svg text.value{font-size:10px} svg text.version{font-weight:600}
 p.note{margin:.3em 0;max-width:60em}
</style></head>
<body>
<h1>edgecl fleet</h1>
<div class="muted" id="summary">loading...</div>
<div id="error"></div>
<form id="login"><label>Admin token: <input id="token" type="password" autocomplete="off"></label>
 <button type="submit">Show</button></form>
<div id="content" style="display:none">
<h2>Release checks: accuracy per class group</h2>
<p class="note muted">What <code>edgecl release</code> printed for each published version: accuracy on the operator's
 held-out images (never trained on), ncm head. Frozen baseline = the previous version's backbone unchanged with every
 device's classes added; current = the previous version as released (its own classes only); candidate = the new version.
 A version is published only if no group's candidate is below its baseline.</p>
<div id="chart"></div>
<h2>Devices</h2><table id="devices"><thead><tr><th>device</th><th>role</th><th>runs</th><th>last seen (UTC)</th>
 <th>last event</th><th>do-no-harm check: unchanged backbone</th><th>kept</th><th>status</th></tr></thead><tbody></tbody></table>
<p class="note muted">The do-no-harm check of the device's last <code>edgecl adapt</code>: accuracy on the share of its
 own images it held out, before (unchanged backbone) and with what it kept.</p>
<h2>Devices on the line: unknown rate and drift over time</h2>
<p class="note muted">What <code>edgecl watch</code> reports in its heartbeats (every 5 minutes and when it exits), over
 its last 500 images: the share it flagged unknown, its mean confidence, and the embedding shift (how far the images'
 mean embedding has moved from the known classes', in spreads of the known images: 0 = where they sit). The server keeps
 each device's last <span id="drift-kept">2016</span> reports. By default watch flags about 5% of known images unknown
 (its calibration target); well above that line, something new is on the line.</p>
<div id="drift"></div>
<h2>Versions</h2><table id="versions"><thead><tr><th>model</th><th>version</th><th>deltas</th><th>devices</th>
 <th>stored</th><th>released</th><th>devices' check: unchanged (mean)</th><th>kept (mean)</th>
 <th>release check: all held-out images</th></tr></thead>
 <tbody></tbody></table>
<h2>Merges</h2><table id="merges"><thead><tr><th>model</th><th>version</th><th>deltas counted</th><th>strategy</th>
 <th>devices</th><th>merged delta</th></tr></thead><tbody></tbody></table>
<h2>Releases</h2><table id="releases"><thead><tr><th>model</th><th>version</th><th>released (UTC)</th><th>to</th>
 <th>release check</th></tr></thead><tbody></tbody></table>
</div>
<script>
"use strict";
const KEY = "edgecl-admin-token";
if (location.hash.startsWith("#token=")) {
  sessionStorage.setItem(KEY, decodeURIComponent(location.hash.slice(7)));
  history.replaceState(null, "", location.pathname);
}
const NAMES = {};   // bundle id -> model name (from each stored version's manifest)
function pct(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%"; }
function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }
function model(id) { return NAMES[id] || id.slice(0, 8); }
function named(id, version) { return model(id) + " v" + version; }
function cell(row, text, cls, title) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; if (title) td.title = title;
}
function fill(id, rows, columns) {
  const body = document.querySelector("#" + id + " tbody");
  body.textContent = "";
  for (const r of rows) { const tr = body.insertRow(); for (const [f, cls, t] of columns) cell(tr, f(r), cls, t && t(r)); }
  if (!rows.length) { const tr = body.insertRow(); cell(tr, "none yet", "muted"); }
}
function heldout(r, when) { return r.last_heldout && r.last_heldout[when] ? r.last_heldout[when].accuracy : null; }
function groupLabel(name, previous) {
  if (name === "calibration") return "v" + previous + "'s own classes";
  return name.startsWith("device:") ? "new classes of " + name.slice(7) : name;
}
// One panel per published version whose release report has its class groups (edgecl release posts them):
// per group three bars, frozen baseline / current / candidate, each labelled with its value.
function chart(releases) {
  const box = document.getElementById("chart"); box.textContent = "";
  const reports = releases.filter(r => r.report && r.report.groups && Object.keys(r.report.groups).length)
                          .sort((a, b) => a.version - b.version);
  if (!reports.length) {
    box.innerHTML = '<p class="muted">No version was published through <code>edgecl release</code> yet.</p>'; return;
  }
  const series = [["baseline", "frozen baseline", "#90a4ae"], ["current", "current", "#64b5f6"],
                  ["candidate", "candidate", "#2e7d32"]];
  const BAR = 30, GAP = 3, GROUP_GAP = 34, PANEL_GAP = 46, L = 48, T = 34, PLOT = 180, B = 62, R = 16;
  const panels = reports.map(r => {
    const groups = Object.entries(r.report.groups).map(([name, row]) => [groupLabel(name, r.version - 1), row]);
    const all = r.report.candidate || {};
    if (all.accuracy !== undefined && all.accuracy !== null) {
      const cur = r.report.current && r.report.current.images === all.images ? r.report.current.accuracy : null;
      groups.push(["all held-out images", {images: all.images, candidate: all.accuracy,
                                           baseline: (r.report.baseline || {}).accuracy, current: cur}]);
    }
    return {release: r, groups: groups};
  });
  const groupW = 3 * BAR + 2 * GAP;
  let width = L;
  for (const p of panels) { p.x = width; width += p.groups.length * (groupW + GROUP_GAP) - GROUP_GAP + PANEL_GAP; }
  width = Math.max(width - PANEL_GAP + R, 420);
  const H = T + PLOT + B;
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", H); svg.setAttribute("id", "accuracy-chart");
  function el(name, attrs, text) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e); return e;
  }
  const y = v => T + (1 - v) * PLOT;
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    el("line", {x1: L, x2: width - R, y1: y(v), y2: y(v), stroke: v ? "#eee" : "#999"});
    el("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, (100 * v) + "%");
  }
  series.forEach(([key, label, color], s) => {
    el("rect", {x: L + 150 * s, y: 6, width: 10, height: 10, fill: color});
    el("text", {x: L + 150 * s + 14, y: 15}, label);
  });
  for (const p of panels) {
    const r = p.release;
    p.groups.forEach(([label, row], g) => {
      const gx = p.x + g * (groupW + GROUP_GAP);
      series.forEach(([key, , color], s) => {
        const v = row[key];
        if (v === null || v === undefined) return;
        const bx = gx + s * (BAR + GAP);
        el("rect", {x: bx, y: y(v), width: BAR, height: Math.max(PLOT * v, 0.5), fill: color, "data-series": key,
                    "data-group": label, "data-version": r.version, "data-value": Number(v).toFixed(4)});
        el("text", {x: bx + BAR / 2, y: y(v) - 3, "text-anchor": "middle", class: "value"}, (100 * v).toFixed(1));
      });
      // The group's name on up to two lines under its bars, so it never runs into the next group's.
      const words = label.split(" "), lines = [""];
      for (const w of words) {
        const line = lines[lines.length - 1];
        if (line && (line + " " + w).length > 16 && lines.length < 2) lines.push(w);
        else lines[lines.length - 1] = line ? line + " " + w : w;
      }
      lines.forEach((text, i) => el("text", {x: gx + groupW / 2, y: T + PLOT + 14 + 12 * i, "text-anchor": "middle"},
                                    text));
      el("text", {x: gx + groupW / 2, y: T + PLOT + 40, "text-anchor": "middle", class: "muted", fill: "#777"},
         plural(row.images || 0, "image"));
    });
    const span = p.groups.length * (groupW + GROUP_GAP) - GROUP_GAP;
    el("text", {x: p.x + span / 2, y: H - 6, "text-anchor": "middle", class: "version"},
       named(r.bundle_id, r.version) + " (candidate) vs v" + (r.version - 1) + (r.canary.length ? ", canary" : ""));
  }
  box.appendChild(svg);
}
// Per device one row, two panels on one shared time axis: unknown rate and mean confidence (0-100%),
// and the embedding shift (one scale for every device, so rows compare). A dashed line marks a new
// version or state (an adapt, a pull), where the figures are expected to move.
function serving(s, i) {   // what the device served when it reported: model, version, its own state
  const what = s.bundle_id[i] ? named(s.bundle_id[i], s.version[i]) : "?";
  return what + (!s.state[i] || s.state[i] === "bundle" ? " as shipped" : " + " + s.state[i]);
}
function driftChart(drift, devices) {
  const box = document.getElementById("drift"); box.textContent = "";
  document.getElementById("drift-kept").textContent = drift.max_points_per_device;
  const rows = drift.devices.filter(s => s.points > 0);
  const silent = devices.filter(d => d.role !== "admin" && !rows.some(s => s.device === d.name)).map(d => d.name);
  if (!rows.length) {
    box.innerHTML = '<p class="muted" id="drift-empty">No drift reports yet. They come from <code>edgecl watch</code>: on ' +
      'a device provisioned with <code>edgecl device init --server URL --name NAME --token ... --bundle BUNDLE</code>, ' +
      'run <code>edgecl watch BUNDLE CAMERA_DIR</code>; it reports every 5 minutes and when it exits.</p>';
    return;
  }
  const NS = "http://www.w3.org/2000/svg";
  const L = 215, YL = 40, PW = 330, END = 56, PH = 62, ROW = PH + 38, T = 70, B = 30;
  const ax = L + YL, bx = ax + PW + END + YL, width = bx + PW + END;
  const H = T + rows.length * ROW + B;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", H); svg.setAttribute("id", "drift-chart");
  function el(name, attrs, text, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    (parent || svg).appendChild(e); return e;
  }
  // Loops, not Math.min(...list): a fleet's points (2016 per device) would overflow the call's arguments.
  let t0 = Infinity, t1 = -Infinity, top = 0.5;
  for (const s of rows) {
    for (const t of s.received_ns) { t0 = Math.min(t0, Number(t)); t1 = Math.max(t1, Number(t)); }
    for (const v of s.embedding_shift) if (v !== null) top = Math.max(top, v);
  }
  if (t1 - t0 < 2e9) { t0 -= 1e9; t1 += 1e9; }
  const x = (left, t) => left + (t - t0) / (t1 - t0) * PW;
  const mag = Math.pow(10, Math.floor(Math.log10(top)));
  top = [1, 2, 2.5, 5, 10].map(m => m * mag).find(v => v >= top);
  const fmtShift = v => v.toFixed(v < 10 ? 2 : 1);
  const series = [["unknown_rate", "unknown rate", "#c62828", ax, 1, v => (100 * v).toFixed(1) + "%"],
                  ["mean_confidence", "mean confidence", "#1565c0", ax, 1, v => (100 * v).toFixed(1) + "%"],
                  ["embedding_shift", "embedding shift", "#6a1b9a", bx, top, fmtShift]];
  // Legend and panel titles.
  let lx = 0;
  for (const [, label, color] of series) {
    el("line", {x1: lx, x2: lx + 18, y1: 11, y2: 11, stroke: color, "stroke-width": 2});
    el("text", {x: lx + 22, y: 15}, label); lx += 34 + 7 * label.length;
  }
  el("line", {x1: lx, x2: lx + 18, y1: 11, y2: 11, stroke: "#ef6c00", "stroke-dasharray": "4 3"});
  el("text", {x: lx + 22, y: 15}, "5%: the default calibration target"); lx += 230;
  el("line", {x1: lx, x2: lx, y1: 3, y2: 19, stroke: "#888", "stroke-dasharray": "3 3"});
  el("text", {x: lx + 6, y: 15}, "new version or state");
  el("text", {x: ax, y: T - 24, class: "version"}, "unknown rate and mean confidence");
  el("text", {x: bx, y: T - 24, class: "version"}, "embedding shift (spreads of the known images)");
  const span = (t1 - t0) / 1e9;
  const clock = t => {
    const iso = new Date(t / 1e6).toISOString();
    return span > 86400 ? iso.slice(5, 10) + " " + iso.slice(11, 16) : iso.slice(11, span > 600 ? 16 : 19);
  };
  const ticks = [0, 0.25, 0.5, 0.75, 1].map(f => t0 + f * (t1 - t0));
  rows.forEach((s, r) => {
    const y0 = T + r * ROW, yv = (v, high) => y0 + PH - v / high * PH;
    const g = el("g", {class: "drift-device", "data-device": s.device});
    const n = s.points - 1;
    el("text", {x: 0, y: y0 + 12, class: "version"}, s.device, g);
    el("text", {x: 0, y: y0 + 27}, serving(s, n), g);
    el("text", {x: 0, y: y0 + 41, fill: "#777"}, plural(s.points, "report") + ", last " + s.received_utc[n].slice(11, 19), g);
    for (const [left, high, labels] of [[ax, 1, ["0%", "50%", "100%"]], [bx, top, ["0", fmtShift(top / 2), fmtShift(top)]]]) {
      [0, 0.5, 1].forEach((f, i) => {
        el("line", {x1: left, x2: left + PW, y1: yv(f * high, high), y2: yv(f * high, high), stroke: i ? "#eee" : "#999"}, g);
        el("text", {x: left - 5, y: yv(f * high, high) + 4, "text-anchor": "end", fill: "#777"}, labels[i], g);
      });
      for (const t of ticks.slice(1, -1)) el("line", {x1: x(left, t), x2: x(left, t), y1: y0, y2: y0 + PH, stroke: "#f3f3f3"}, g);
    }
    el("line", {x1: ax, x2: ax + PW, y1: yv(0.05, 1), y2: yv(0.05, 1), stroke: "#ef6c00", "stroke-dasharray": "4 3"}, g);
    for (let i = 1; i < s.points; i++) {
      if (s.bundle_id[i] === s.bundle_id[i - 1] && s.version[i] === s.version[i - 1] && s.state[i] === s.state[i - 1]) continue;
      const label = s.version[i] !== s.version[i - 1] || s.bundle_id[i] !== s.bundle_id[i - 1] ? "v" + s.version[i] : s.state[i];
      for (const left of [ax, bx]) {
        const cx = x(left, Number(s.received_ns[i]));
        el("line", {x1: cx, x2: cx, y1: y0 - 2, y2: y0 + PH, stroke: "#888", "stroke-dasharray": "3 3", class: "change"}, g);
        el("text", {x: cx, y: y0 - 5, fill: "#555", "text-anchor": "middle"}, label, g);
      }
    }
    for (const [key, label, color, left, high, fmt] of series) {
      const values = s[key];
      const sg = el("g", {class: "drift", "data-metric": key, "data-points": values.filter(v => v !== null).length}, undefined, g);
      let d = "", pen = "M", last = null;
      values.forEach((v, i) => {
        if (v === null) { pen = "M"; return; }      // no figure (an uncalibrated state): a gap, not a zero
        const px = x(left, Number(s.received_ns[i])), py = yv(Math.min(v, high), high);
        d += pen + px.toFixed(1) + " " + py.toFixed(1) + " "; pen = "L"; last = [px, py, v];
        if (s.points <= 200) el("circle", {cx: px, cy: py, r: 2.5, fill: color, "data-value": v.toFixed(4)}, undefined, sg)
          .appendChild(document.createElementNS(NS, "title")).textContent =
            label + " " + fmt(v) + " at " + s.received_utc[i] + " (" + serving(s, i) + ")";
      });
      if (d) el("path", {d: d, fill: "none", stroke: color, "stroke-width": 1.6}, undefined, sg);
      if (last) {
        // The newest figure, beside its point; the two lines of the first panel keep apart.
        const dy = key === "unknown_rate" && last[2] > s.mean_confidence[n] - 0.15 && s.mean_confidence[n] !== null ? -6
                 : key === "mean_confidence" && s.unknown_rate[n] !== null && last[2] - s.unknown_rate[n] < 0.15 ? 10 : 4;
        el("text", {x: last[0] + 6, y: Math.max(y0 + 8, Math.min(y0 + PH + 4, last[1] + dy)), fill: color, class: "last",
                    "data-metric": key}, fmt(last[2]), sg);
      }
    }
  });
  const yAxis = T + rows.length * ROW - ROW + PH + 16;
  for (const left of [ax, bx]) {
    ticks.forEach((t, i) => el("text", {x: x(left, t), y: yAxis, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle",
                                         fill: "#555"}, clock(t)));
  }
  el("text", {x: bx + PW, y: yAxis + 14, "text-anchor": "end", fill: "#777"}, "time of the report (UTC)");
  box.appendChild(svg);
  if (silent.length) {
    const p = document.createElement("p"); p.className = "note muted"; p.id = "drift-silent";
    p.textContent = "No reports yet from " + silent.join(", ") + " (run edgecl watch there with the server configured).";
    box.appendChild(p);
  }
}
async function names(token, bundles) {
  for (const b of bundles) {
    if (!b.stored || NAMES[b.bundle_id]) continue;
    try {
      const answer = await fetch("/v1/bundles/" + b.bundle_id + "/" + b.version + "/files/manifest.json",
                                 {headers: {"Authorization": "Bearer " + token}});
      if (answer.ok) { const m = await answer.json(); if (m.model_name) NAMES[b.bundle_id] = m.model_name; }
    } catch (e) { /* the short id stays */ }
  }
  // Two lineages of one model: add the short id so their rows stay apart.
  const seen = {};
  for (const id in NAMES) seen[NAMES[id]] = (seen[NAMES[id]] || 0) + 1;
  for (const id in NAMES) if (seen[NAMES[id]] > 1) NAMES[id] += " (" + id.slice(0, 6) + ")";
}
function releasedState(b, devices, bundles) {
  if (b.released) return b.canary.length ? "canary: " + b.canary.join(", ") : "yes";
  // The exported first version reaches devices by copy, not through the release check: a version devices
  // run is released, and so is the first version a later release replaced.
  const running = devices.filter(d => d.last_bundle === b.bundle_id && d.last_version === b.version).length;
  if (running) return "yes (" + (running === 1 ? "1 device runs" : running + " devices run") + " it)";
  const lineage = bundles.filter(o => o.bundle_id === b.bundle_id);
  const later = lineage.filter(o => o.released && o.version > b.version).map(o => o.version);
  if (later.length && b.version === Math.min(...lineage.map(o => o.version))) {
    return "yes (first version; v" + Math.min(...later) + " since)";
  }
  return "no";
}
async function load() {
  const token = sessionStorage.getItem(KEY);
  if (!token) { document.getElementById("login").style.display = "block";
                document.getElementById("summary").textContent = "sign in with an admin token"; return; }
  let answer;
  try { answer = await fetch("/v1/dashboard", {headers: {"Authorization": "Bearer " + token}}); }
  catch (e) { document.getElementById("error").textContent = "server unreachable: " + e; return; }
  const data = await answer.json();
  if (!answer.ok) {
    document.getElementById("error").textContent = data.error + ": " + data.message;
    sessionStorage.removeItem(KEY); document.getElementById("login").style.display = "block"; return;
  }
  await names(token, data.bundles);
  document.getElementById("login").style.display = "none";
  document.getElementById("content").style.display = "block";
  document.getElementById("summary").textContent = plural(data.devices.length, "device") + ", " +
    plural(data.deltas, "delta") + ", " + plural(data.bundles.length, "bundle version") + ", " +
    plural(data.releases.length, "release");
  const id = r => r.bundle_id + " v" + r.version;
  fill("devices", data.devices, [[r => r.name], [r => r.role], [r => r.last_version ? named(r.last_bundle,
    r.last_version) : "-"], [r => r.last_seen_utc || "never"], [r => r.last_event || "-"],
    [r => pct(heldout(r, "before")), "n"], [r => pct(heldout(r, "after")), "n"],
    [r => r.revoked ? "revoked" : "active", ""]]);
  fill("versions", data.bundles, [[r => model(r.bundle_id), "", id], [r => r.version, "n"], [r => r.deltas, "n"],
    [r => r.devices, "n"], [r => r.stored ? "yes" : "no"], [r => releasedState(r, data.devices, data.bundles)],
    [r => pct(r.device_accuracy_before), "n"], [r => pct(r.device_accuracy_after), "n"],
    [r => pct(r.release_accuracy), "n"]]);
  fill("merges", data.merges, [[r => model(r.bundle_id), "", id], [r => r.version, "n"], [r => r.inputs, "n"],
    [r => r.strategy], [r => r.devices.join(", ")], [r => r.sha256.slice(0, 12)]]);
  fill("releases", data.releases, [[r => model(r.bundle_id), "", id], [r => r.version, "n"], [r => r.released_utc],
    [r => r.canary.length ? r.canary.join(", ") : "every device"],
    [r => r.report && r.report.candidate ? "passed: candidate " + pct(r.report.candidate.accuracy) + " of " +
      plural(r.report.candidate.images || 0, "held-out image") + " (ncm)" : "-"]]);
  chart(data.releases);
  try {
    const drift = await fetch("/v1/drift", {headers: {"Authorization": "Bearer " + token}});
    const body = await drift.json();
    if (!drift.ok) throw new Error(body.error + ": " + body.message);
    driftChart(body, data.devices);
  } catch (e) { document.getElementById("drift").textContent = "drift reports unavailable: " + e.message; }
  document.body.setAttribute("data-loaded", "1");
}
document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault(); sessionStorage.setItem(KEY, document.getElementById("token").value); load(); });
load();
</script>
</body></html>
"""
