"""The read-only dashboard page (``GET /dashboard``): one self-contained HTML file.

No CDN, no build step: inline CSS, inline JS, the chart is an inline SVG drawn by the script, so the
page works on a plant network with no way out. The page holds no data itself: it asks for the
admin token (kept in ``sessionStorage``, so it is gone when the tab closes; ``#token=...`` in the URL
is taken once and removed from the address bar) and reads ``GET /v1/dashboard`` with it.
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgecl fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
 h1{font-size:20px;margin:0 0 .2em} h2{font-size:16px;margin:1.4em 0 .4em}
 table{border-collapse:collapse;background:#fff;min-width:40em} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
 th{background:#f0f0f0} td.n{text-align:right;font-variant-numeric:tabular-nums}
 .muted{color:#777} .bad{color:#b00} .good{color:#070} #error{color:#b00;font-weight:bold}
 #login{display:none;margin:1em 0} input{font:inherit;width:32em}
 svg text{font:11px system-ui,sans-serif}
</style></head>
<body>
<h1>edgecl fleet</h1>
<div class="muted" id="summary">loading...</div>
<div id="error"></div>
<form id="login"><label>Admin token: <input id="token" type="password" autocomplete="off"></label>
 <button type="submit">Show</button></form>
<div id="content" style="display:none">
<h2>Accuracy per version</h2><div id="chart"></div>
<h2>Devices</h2><table id="devices"><thead><tr><th>device</th><th>role</th><th>version</th><th>last seen (UTC)</th>
 <th>last event</th><th>held-out accuracy before</th><th>after</th><th>status</th></tr></thead><tbody></tbody></table>
<h2>Versions</h2><table id="versions"><thead><tr><th>bundle</th><th>version</th><th>deltas</th><th>devices</th>
 <th>stored</th><th>released</th><th>device accuracy before</th><th>after</th><th>release gate accuracy</th></tr></thead>
 <tbody></tbody></table>
<h2>Merges</h2><table id="merges"><thead><tr><th>bundle</th><th>version</th><th>deltas counted</th><th>strategy</th>
 <th>devices</th><th>merged delta</th></tr></thead><tbody></tbody></table>
<h2>Releases</h2><table id="releases"><thead><tr><th>bundle</th><th>version</th><th>released (UTC)</th><th>to</th>
 <th>gate</th></tr></thead><tbody></tbody></table>
</div>
<script>
"use strict";
const KEY = "edgecl-admin-token";
if (location.hash.startsWith("#token=")) {
  sessionStorage.setItem(KEY, decodeURIComponent(location.hash.slice(7)));
  history.replaceState(null, "", location.pathname);
}
function pct(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%"; }
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; }
function fill(id, rows, columns) {
  const body = document.querySelector("#" + id + " tbody");
  body.textContent = "";
  for (const r of rows) { const tr = body.insertRow(); for (const [f, cls] of columns) cell(tr, f(r), cls); }
  if (!rows.length) { const tr = body.insertRow(); cell(tr, "none yet", "muted"); }
}
function heldout(r, when) { return r.last_heldout && r.last_heldout[when] ? r.last_heldout[when].accuracy : null; }
function chart(bundles) {
  const series = [["device after (mean)", "device_accuracy_after", "#1565c0"],
                  ["device before (mean)", "device_accuracy_before", "#90a4ae"],
                  ["release gate (held-out)", "release_accuracy", "#2e7d32"]];
  const xs = bundles.map(b => b.bundle_id + " v" + b.version);
  const W = 560, H = 220, L = 44, R = 160, T = 12, B = 36;
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("id", "accuracy-chart");
  function el(name, attrs, text) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e); return e;
  }
  const x = i => L + (xs.length > 1 ? i * (W - L - R) / (xs.length - 1) : (W - L - R) / 2);
  const y = v => T + (1 - v) * (H - T - B);
  el("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fff", stroke: "#ccc"});
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    el("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eee"});
    el("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, (100 * v) + "%");
  }
  xs.forEach((name, i) => el("text", {x: x(i), y: H - B + 16, "text-anchor": "middle"}, name));
  series.forEach(([label, key, color], s) => {
    const pts = bundles.map((b, i) => [i, b[key]]).filter(p => p[1] !== null && p[1] !== undefined);
    if (pts.length > 1) el("polyline", {points: pts.map(([i, v]) => x(i) + "," + y(v)).join(" "), fill: "none",
                                        stroke: color, "stroke-width": 2});
    for (const [i, v] of pts) el("circle", {cx: x(i), cy: y(v), r: 3.5, fill: color, "data-series": key,
                                            "data-value": v.toFixed(4)});
    el("rect", {x: W - R + 12, y: T + 6 + 18 * s, width: 10, height: 10, fill: color});
    el("text", {x: W - R + 28, y: T + 15 + 18 * s}, label);
  });
  const box = document.getElementById("chart"); box.textContent = ""; box.appendChild(svg);
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
  document.getElementById("login").style.display = "none";
  document.getElementById("content").style.display = "block";
  document.getElementById("summary").textContent = data.devices.length + " devices, " + data.deltas +
    " deltas, " + data.bundles.length + " bundle versions, " + data.releases.length + " releases";
  fill("devices", data.devices, [[r => r.name], [r => r.role], [r => r.last_version ? r.last_bundle + " v" +
    r.last_version : "-"], [r => r.last_seen_utc || "never"], [r => r.last_event || "-"],
    [r => pct(heldout(r, "before")), "n"], [r => pct(heldout(r, "after")), "n"],
    [r => r.revoked ? "revoked" : "active", ""]]);
  fill("versions", data.bundles, [[r => r.bundle_id], [r => r.version, "n"], [r => r.deltas, "n"],
    [r => r.devices, "n"], [r => r.stored ? "yes" : "no"], [r => r.released ? (r.canary.length ? "canary: " +
    r.canary.join(", ") : "yes") : "no"], [r => pct(r.device_accuracy_before), "n"],
    [r => pct(r.device_accuracy_after), "n"], [r => pct(r.release_accuracy), "n"]]);
  fill("merges", data.merges, [[r => r.bundle_id], [r => r.version, "n"], [r => r.inputs, "n"], [r => r.strategy],
    [r => r.devices.join(", ")], [r => r.sha256.slice(0, 12)]]);
  fill("releases", data.releases, [[r => r.bundle_id], [r => r.version, "n"], [r => r.released_utc],
    [r => r.canary.length ? r.canary.join(", ") : "every device"],
    [r => r.report && r.report.candidate ? "passed, held-out " + pct(r.report.candidate.accuracy) : "-"]]);
  chart(data.bundles);
  document.body.setAttribute("data-loaded", "1");
}
document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault(); sessionStorage.setItem(KEY, document.getElementById("token").value); load(); });
load();
</script>
</body></html>
"""
