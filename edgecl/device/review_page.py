"""The review page `edgecl review BUNDLE` serves: one self-contained HTML file (no CDN, no fetch
outside this server), so it works on a line's offline PC."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgecl review</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:1rem;color:#222}
 h1{font-size:1.2rem;margin:0 0 .3rem} #summary{color:#555;margin-bottom:1rem}
 #items{display:flex;flex-wrap:wrap;gap:.8rem}
 .item{border:1px solid #ccc;border-radius:6px;padding:.5rem;width:220px}
 .item img{width:200px;height:200px;object-fit:contain;image-rendering:pixelated;background:#eee}
 .unknown{color:#b00;font-weight:600} .unsure{color:#a60}
 .item select,.item input,.item button{margin-top:.3rem;width:100%;box-sizing:border-box}
 .row{display:flex;gap:.3rem} .row button{flex:1} #empty{color:#555}
</style></head>
<body>
<h1>Review queue</h1>
<div id="summary">loading...</div>
<div id="items"></div>
<p id="empty" hidden>Nothing to review.</p>
<script>
"use strict";
let classes = [];
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
async function post(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                               body: JSON.stringify(body)});
  const answer = await r.json();
  if (!r.ok) throw new Error(answer.error || r.statusText);
  return answer;
}
function card(item) {
  const box = el("div", {"class": "item", "id": "item-" + item.id, "data-id": item.id});
  box.appendChild(el("img", {src: "/image/" + encodeURIComponent(item.image), alt: item.file || item.id}));
  const p = item.probability == null ? "n/a" : item.probability.toFixed(3);
  const verdict = item.unknown ? el("div", {"class": "unknown verdict"}, "unknown (nearest: " + item["class"] + ")")
                               : el("div", {"class": "unsure verdict"}, item["class"] + " p=" + p);
  box.appendChild(verdict);
  box.appendChild(el("div", {"class": "detail"}, "unknown score " +
    (item.unknown_score == null ? "n/a" : item.unknown_score.toPrecision(3)) + " \\u00b7 " + (item.reason || "")));
  const select = el("select", {"class": "choice"});
  select.appendChild(el("option", {value: ""}, "choose a class..."));
  for (const c of classes) select.appendChild(el("option", {value: c}, c));
  select.appendChild(el("option", {value: "__new__"}, "new class..."));
  const name = el("input", {"class": "new-name", placeholder: "new class name", hidden: ""});
  select.addEventListener("change", () => { name.hidden = select.value !== "__new__"; });
  const row = el("div", {"class": "row"});
  const label = el("button", {"class": "label"}, "Label");
  const discard = el("button", {"class": "discard"}, "Discard");
  const status = el("div", {"class": "status"});
  label.addEventListener("click", async () => {
    const cls = select.value === "__new__" ? name.value.trim() : select.value;
    if (!cls) { status.textContent = "choose a class first"; return; }
    try { await post("/api/label", {id: item.id, "class": cls}); box.remove(); await refresh(); }
    catch (e) { status.textContent = "error: " + e.message; }
  });
  discard.addEventListener("click", async () => {
    try { await post("/api/discard", {id: item.id}); box.remove(); await refresh(); }
    catch (e) { status.textContent = "error: " + e.message; }
  });
  row.append(label, discard);
  box.append(select, name, row, status);
  return box;
}
async function refresh() {
  const data = await (await fetch("/api/items")).json();
  classes = data.classes;
  document.getElementById("summary").textContent = data.items.length + " to review \\u00b7 " + data.labeled +
    " labeled, waiting for adapt \\u00b7 state " + data.state;
  const list = document.getElementById("items");
  const shown = new Set([...list.children].map(c => c.dataset.id));
  const wanted = new Set(data.items.map(i => i.id));
  for (const c of [...list.children]) if (!wanted.has(c.dataset.id)) c.remove();
  for (const item of data.items) if (!shown.has(item.id)) list.appendChild(card(item));
  document.getElementById("empty").hidden = data.items.length > 0;
}
refresh();
setInterval(refresh, 5000);
</script>
</body></html>
"""
