// clipxfer web page: live search, search by image, large view with neighbours, and the labelling loop.
// Every name, path and label from the server goes into the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let labelState = { classes: [], labels: {}, evaluation: {} };
let searchSeq = 0;
let pollTimer = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text) { $("status").textContent = text; }

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
    throw new Error(detail);
  }
  return body;
}

function jsonBody(method, value) {
  return { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(value) };
}

// ---------------------------------------------------------------- result cards
function card(item, small) {
  const fig = el("figure", "card");
  fig.tabIndex = 0;
  fig.dataset.id = item.id;
  fig.dataset.name = item.name || "";
  const img = el("img");
  img.src = "/api/thumb/" + encodeURIComponent(item.id);
  img.alt = item.name || "";
  img.loading = "lazy";
  img.addEventListener("click", () => openViewer(item));
  fig.appendChild(img);
  const caption = el("figcaption");
  const score = item.score !== undefined ? item.score.toFixed(3) : (item.uncertainty !== undefined ? "unsure " + item.uncertainty.toFixed(2) : "");
  caption.appendChild(el("span", "score", (item.rank ? "#" + item.rank + " · " : "") + score));
  caption.appendChild(el("br"));
  caption.appendChild(el("span", "name", item.name || ""));
  if (item.label !== undefined && item.uncertainty !== undefined) {
    caption.appendChild(el("br"));
    caption.appendChild(el("span", "why", "guess: " + item.label + " " + item.probability.toFixed(2)));
  }
  caption.appendChild(el("br"));
  caption.appendChild(el("span", "label", labelState.labels[String(item.id)] || ""));
  if (!small) caption.appendChild(labelButtons(item.id));
  fig.appendChild(caption);
  fig.addEventListener("focus", () => focusCard(fig));
  return fig;
}

function labelButtons(id) {
  const box = el("div", "label-buttons");
  labelState.classes.forEach((name, i) => {
    const button = el("button", "", (i < 9 ? (i + 1) + " " : "") + name);
    button.type = "button";
    button.title = "label as " + name;
    button.addEventListener("click", (event) => { event.stopPropagation(); setLabel(id, name); });
    box.appendChild(button);
  });
  return box;
}

function showResults(items, note) {
  const grid = $("grid");
  grid.replaceChildren(...items.map((item) => card(item, false)));
  setStatus(note);
  const first = grid.querySelector(".card");
  if (first) markFocused(first);
}

function cards() { return Array.from($("grid").querySelectorAll(".card")); }

function markFocused(fig) {
  cards().forEach((c) => c.classList.toggle("focused", c === fig));
}

function focusCard(fig) { markFocused(fig); }

function focusedCard() { return $("grid").querySelector(".card.focused"); }

function refreshCardLabels() {
  for (const fig of document.querySelectorAll(".card")) {
    const span = fig.querySelector(".label");
    if (span) span.textContent = labelState.labels[fig.dataset.id] || "";
    const old = fig.querySelector(".label-buttons");
    if (old) old.replaceWith(labelButtons(fig.dataset.id));
  }
}

// ---------------------------------------------------------------- search
let lastImage = null;  // the last image searched by: a query starting with + or - then adds to it

function searchParams(extra) {
  const params = new URLSearchParams({ k: "24", ...extra });
  const fields = { path: "f-path", modified_after: "f-after", modified_before: "f-before",
                   min_width: "f-minw", min_height: "f-minh" };
  for (const [name, id] of Object.entries(fields)) {
    const value = $(id).value.trim();
    if (value) params.set(name, value);
  }
  if ($("f-relevant").checked) params.set("min_relevance", "0.95");
  return params.toString();
}

async function textSearch(query) {
  if (lastImage && /^\s*[+-]/.test(query)) { imageSearch(lastImage, query); return; }
  lastImage = null;
  const seq = ++searchSeq;
  if (!query.trim()) { showResults([], ""); return; }
  setStatus("searching…");
  try {
    const hits = await api("/api/search?" + searchParams({ q: query }));
    if (seq === searchSeq) showResults(hits, hits.length + " results");
  } catch (error) {
    if (seq === searchSeq) setStatus("error: " + error.message);
  }
}

async function imageSearch(file, query) {
  const seq = ++searchSeq;
  lastImage = file;
  setStatus("searching by image…");
  const form = new FormData();
  form.append("file", file, file.name || "pasted-image");
  const extra = query && query.trim() ? { q: query } : {};
  try {
    const hits = await api("/api/search/image?" + searchParams(extra), { method: "POST", body: form });
    const note = "images like " + (file.name || "the pasted image") + (extra.q ? " " + extra.q : "");
    if (seq === searchSeq) showResults(hits, note);
  } catch (error) {
    if (seq === searchSeq) setStatus("error: " + error.message);
  }
}

let debounce = null;
$("q").addEventListener("input", (event) => {
  clearTimeout(debounce);
  const value = event.target.value;
  debounce = setTimeout(() => textSearch(value), 150);
});
for (const id of ["f-path", "f-after", "f-before", "f-minw", "f-minh", "f-relevant"]) {
  $(id).addEventListener("change", () => (lastImage ? imageSearch(lastImage, $("q").value) : textSearch($("q").value)));
}
$("upload").addEventListener("change", (event) => { if (event.target.files[0]) imageSearch(event.target.files[0]); });

document.addEventListener("dragover", (event) => { event.preventDefault(); $("dropzone").hidden = false; });
document.addEventListener("dragleave", (event) => { if (!event.relatedTarget) $("dropzone").hidden = true; });
document.addEventListener("drop", (event) => {
  event.preventDefault();
  $("dropzone").hidden = true;
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) imageSearch(file);
});
document.addEventListener("paste", (event) => {
  const items = event.clipboardData ? Array.from(event.clipboardData.items) : [];
  const image = items.find((item) => item.kind === "file" && item.type.startsWith("image/"));
  if (image) { event.preventDefault(); imageSearch(image.getAsFile()); }
});

// ---------------------------------------------------------------- large view
async function openViewer(item) {
  $("viewer-image").src = "/api/image/" + encodeURIComponent(item.id);
  $("viewer-name").textContent = item.path || item.name || "";
  $("neighbours").replaceChildren();
  $("viewer").hidden = false;
  try {
    const hits = await api("/api/similar/" + encodeURIComponent(item.id) + "?k=12");
    $("neighbours").replaceChildren(...hits.map((hit) => card(hit, true)));
  } catch (error) {
    $("neighbours").textContent = "error: " + error.message;
  }
}
function closeViewer() { $("viewer").hidden = true; $("viewer-image").removeAttribute("src"); }
$("viewer-close").addEventListener("click", closeViewer);
$("viewer").addEventListener("click", (event) => { if (event.target === $("viewer")) closeViewer(); });

// ---------------------------------------------------------------- labelling
function renderLabelState(state) {
  labelState = state;
  const list = $("class-list");
  list.replaceChildren(...state.classes.map((name) => el("li", "", name + " (" + (state.counts[name] || 0) + ")")));
  if (document.activeElement !== $("classes")) $("classes").value = state.classes.join(", ");
  $("method").value = state.method;
  const evaluation = state.evaluation || {};
  $("accuracy").textContent = evaluation.accuracy === null || evaluation.accuracy === undefined
    ? "–" : (100 * evaluation.accuracy).toFixed(1) + "% (" + evaluation.folds + "-fold, " + evaluation.count + " labels)";
  $("fit-state").textContent = state.fitting ? "fitting…" : "";
  $("label-error").textContent = state.fit_error || "";
  renderConfusion(evaluation);
  refreshCardLabels();
  if (state.fitting && !pollTimer) {
    pollTimer = setTimeout(async () => { pollTimer = null; renderLabelState(await api("/api/labels")); }, 500);
  }
}

function renderConfusion(evaluation) {
  const table = $("confusion");
  const classes = evaluation.classes || [];
  const matrix = evaluation.confusion || [];
  if (!matrix.length || evaluation.accuracy === null) { table.replaceChildren(); return; }
  const head = el("tr");
  head.appendChild(el("th", "", "true \\ predicted"));
  classes.forEach((name) => head.appendChild(el("th", "", name)));
  const rows = [head];
  matrix.forEach((row, i) => {
    const tr = el("tr");
    tr.appendChild(el("th", "", classes[i]));
    row.forEach((value, j) => tr.appendChild(el("td", i === j ? "diag" : "", String(value))));
    rows.push(tr);
  });
  table.replaceChildren(...rows);
}

async function setLabel(id, name) {
  try {
    renderLabelState(await api("/api/labels/" + encodeURIComponent(id), jsonBody("PUT", { label: name })));
    setStatus("labelled " + name);
  } catch (error) { $("label-error").textContent = error.message; }
}

async function undo() {
  try {
    const state = await api("/api/labels/undo", { method: "POST" });
    renderLabelState(state);
    setStatus(state.undone === null ? "nothing to undo" : "undone");
  } catch (error) { $("label-error").textContent = error.message; }
}

$("classes-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const names = $("classes").value.split(",").map((s) => s.trim()).filter((s) => s);
  try {
    renderLabelState(await api("/api/labels/classes", jsonBody("PUT", { classes: names })));
    $("label-error").textContent = "";
    $("classes").blur();
  } catch (error) { $("label-error").textContent = error.message; }
});
$("method").addEventListener("change", async (event) => {
  try { renderLabelState(await api("/api/labels/method", jsonBody("PUT", { method: event.target.value }))); }
  catch (error) { $("label-error").textContent = error.message; }
});
$("undo").addEventListener("click", undo);
$("suggest").addEventListener("click", async () => {
  searchSeq++;
  setStatus("choosing images to label…");
  try {
    const picks = await api("/api/labels/suggest?n=12");
    showResults(picks.map((p) => ({ ...p, name: p.path.split("/").pop() })), picks.length + " images to label next");
  } catch (error) { setStatus("error: " + error.message); }
});

// Keys: 1-9 label the focused image (then move on), arrows move, U undoes, Enter opens, Escape closes.
document.addEventListener("keydown", (event) => {
  const target = event.target;
  if (target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA")) return;
  if (event.key === "Escape") { closeViewer(); return; }
  if (!$("viewer").hidden) return;
  const all = cards();
  const current = focusedCard();
  const index = current ? all.indexOf(current) : -1;
  const columns = Math.max(1, Math.round($("grid").clientWidth / (all[0] ? all[0].offsetWidth + 12 : 180)));
  const move = (to) => {
    if (!all.length) return;
    const next = all[Math.max(0, Math.min(all.length - 1, to))];
    markFocused(next);
    next.focus();
    event.preventDefault();
  };
  if (/^[1-9]$/.test(event.key) && current) {
    const name = labelState.classes[Number(event.key) - 1];
    if (name) { setLabel(current.dataset.id, name); move(index + 1); }
  } else if (event.key === "ArrowRight") move(index + 1);
  else if (event.key === "ArrowLeft") move(index - 1);
  else if (event.key === "ArrowDown") move(index + columns);
  else if (event.key === "ArrowUp") move(index - columns);
  else if (event.key === "u" || event.key === "U" || (event.key === "z" && (event.ctrlKey || event.metaKey))) { event.preventDefault(); undo(); }
  else if (event.key === "Enter" && current) {
    const img = current.querySelector("img");
    if (img) img.click();
  }
});

api("/api/labels").then(renderLabelState).catch((error) => setStatus("error: " + error.message));
api("/api/health").then((h) => setStatus(h.count + " images indexed (" + h.model + ")")).catch(() => {});
