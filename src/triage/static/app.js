// ICH triage page: collects the dropped files, posts them to the local server, draws the answer. No external requests.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
let info = null;

function el(tag, attrs = {}, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function showError(message, skipped) {
  const box = $("error");
  box.textContent = message;
  if (skipped && skipped.length) {
    const list = el("ul");
    for (const s of skipped.slice(0, 10)) list.appendChild(el("li", {}, `${s.path}: ${s.reason}`));
    if (skipped.length > 10) list.appendChild(el("li", {}, `… ${skipped.length - 10} more`));
    box.appendChild(list);
  }
  box.hidden = false;
  $("result").hidden = true;
}

function setStatus(text) { $("status").textContent = text; }

async function loadInfo() {
  try {
    const r = await fetch("/api/info");
    info = await r.json();
    $("info").textContent = `Model: ${info.model}. Flags: ${info.thresholds_source}. Upload limit ${info.max_upload_mb} MB.`;
  } catch (e) {
    $("info").textContent = "The local server does not answer: is python -m src.triage.serve still running?";
  }
}

// A dropped folder arrives as a directory entry: walk it (readEntries returns at most 100 entries per call).
function readEntry(entry, prefix, out) {
  return new Promise((resolve) => {
    if (entry.isFile) {
      entry.file((f) => { out.push([prefix + f.name, f]); resolve(); }, () => resolve());
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      const next = () => reader.readEntries(async (entries) => {
        if (!entries.length) { resolve(); return; }
        for (const e of entries) await readEntry(e, prefix + entry.name + "/", out);
        next();
      }, () => resolve());
      next();
    } else {
      resolve();
    }
  });
}

async function filesFromDrop(dt) {
  const out = [];
  const entries = [...(dt.items || [])].map((it) => it.webkitGetAsEntry && it.webkitGetAsEntry()).filter(Boolean);
  if (entries.length) {
    for (const e of entries) await readEntry(e, "", out);
  } else {
    for (const f of dt.files) out.push([f.name, f]);
  }
  return out;
}

async function upload(named) {
  $("error").hidden = true;
  if (!named.length) { showError("No files: drop the DICOM files (or a folder or zip) of one study."); return; }
  const total = named.reduce((s, [, f]) => s + f.size, 0);
  if (info && total > info.max_upload_mb * 1048576) {
    showError(`These ${named.length} files hold ${(total / 1048576).toFixed(1)} MB, more than the ` +
              `${info.max_upload_mb} MB limit of this server (python -m src.triage.serve --max-upload-mb).`);
    return;
  }
  const form = new FormData();
  for (const [name, f] of named) form.append("files", f, name);
  setStatus(`analysing ${named.length} file(s)…`);
  let response, body;
  try {
    response = await fetch("/api/predict", { method: "POST", body: form });
    body = await response.json();
  } catch (e) {
    setStatus("");
    showError(`The local server did not answer (${e}). Is python -m src.triage.serve still running?`);
    return;
  }
  setStatus("");
  if (!response.ok) { showError(body.error || `server error ${response.status}`, body.skipped); return; }
  render(body);
}

function fmtProb(p) { return p === null || p === undefined ? "–" : p.toFixed(3); }

function render(r) {
  const positive = r.verdict !== "no ICH flagged";
  const verdict = $("verdict");
  verdict.textContent = r.verdict;
  verdict.className = "verdict " + (positive ? "positive" : "negative");
  $("meta").textContent = `Study ${r.study} · ${r.n_slices} slices in ${r.series.length} series · ` +
    `model time ${r.seconds_model.toFixed(2)} s · ${r.model}`;
  $("source").textContent = `Probabilities from: ${r.probabilities_from}`;

  const body = $("probs").querySelector("tbody");
  body.replaceChildren();
  for (const [label, p] of Object.entries(r.probabilities)) {
    const flagged = r.flags[label];
    const row = el("tr", { "data-label": label, class: flagged ? "flagged" : "" });
    row.appendChild(el("td", {}, label));
    row.appendChild(el("td", { class: "prob" }, fmtProb(p)));
    const bar = el("div", { class: "bar" });
    const fill = el("div");
    fill.style.width = `${(100 * p).toFixed(1)}%`;  // CSSOM, not a style attribute: the page's CSP forbids those
    bar.appendChild(fill);
    const cell = el("td");
    cell.appendChild(bar);
    row.appendChild(cell);
    const thr = r.thresholds.study_max[label];
    row.appendChild(el("td", { class: "flag" }, thr === null || thr === undefined ? "n/a" : flagged ? "FLAG" : "–"));
    body.appendChild(row);
  }
  $("thresholds").textContent = `Flag = max over slices ≥ the threshold at precision ${r.thresholds.precision} ` +
    `(${r.thresholds.source}); n/a = that precision was not reachable on the validation data.`;

  $("volume").textContent = r.blood_volume_ml === null ? "not available (model without a segmentation branch)"
    : `${r.blood_volume_ml.toFixed(2)} mL`;
  $("volume-caveat").textContent = r.volume_caveat || "";
  const top = $("top-slices");
  top.replaceChildren();
  for (const t of r.top_slices) top.appendChild(el("li", {}, `${t.ID} (slice ${t.slice_index}): p(any) ${fmtProb(t.any)}`));

  drawStrip(r.slices, r.slice_threshold_any);
  const overlays = $("overlays");
  overlays.replaceChildren();
  if (!r.overlays.length) overlays.appendChild(el("p", { class: "note" }, "No slice passes the slice threshold."));
  for (const o of r.overlays) {
    const fig = el("figure");
    fig.appendChild(el("img", { src: o.src, alt: `overlay of ${o.ID}`, "data-id": o.ID }));
    const vol = o.volume_mm3 === null ? "" : ` · ${(o.volume_mm3 / 1000).toFixed(2)} mL`;
    fig.appendChild(el("figcaption", {}, `${o.ID} · slice ${o.slice_index} · p(any) ${fmtProb(o.any)}${vol}`));
    overlays.appendChild(fig);
  }
  const skippedBox = $("skipped-box");
  $("skipped").replaceChildren();
  for (const s of r.skipped) $("skipped").appendChild(el("li", {}, `${s.path}: ${s.reason}`));
  $("skipped-summary").textContent = `${r.skipped.length} file(s) skipped`;
  skippedBox.hidden = r.skipped.length === 0;
  $("result").hidden = false;
}

function drawStrip(slices, threshold) {
  const svg = $("strip");
  svg.replaceChildren();
  const step = 12, h = 110, top = 8, bottom = 18;
  const width = Math.max(320, slices.length * step + 40);
  svg.setAttribute("width", width);
  svg.setAttribute("height", h);
  svg.setAttribute("viewBox", `0 0 ${width} ${h}`);
  const plotH = h - top - bottom;
  const y = (p) => top + plotH * (1 - p);
  let previous = null;
  slices.forEach((s, i) => {
    const x = 30 + i * step;
    if (previous !== null && s.SeriesInstanceUID !== previous) {
      svg.appendChild(el("svg:line", { x1: x - 1, x2: x - 1, y1: top, y2: h - bottom, stroke: "#999" }));
    }
    previous = s.SeriesInstanceUID;
    const rect = el("svg:rect", { class: "slice" + (s.flag_any ? " flagged" : ""), x: x, y: y(s.any),
      width: step - 2, height: Math.max(1, plotH * s.any), "data-id": s.ID, "data-p": s.any.toFixed(4) });
    rect.appendChild(el("svg:title", {}, `${s.ID} slice ${s.slice_index}: p(any) ${s.any.toFixed(3)}`));
    svg.appendChild(rect);
  });
  if (threshold !== null && threshold !== undefined) {
    svg.appendChild(el("svg:line", { class: "threshold", x1: 28, x2: width - 4, y1: y(threshold), y2: y(threshold) }));
  }
  svg.appendChild(el("svg:text", { x: 2, y: top + 8 }, "1"));
  svg.appendChild(el("svg:text", { x: 2, y: h - bottom }, "0"));
  svg.appendChild(el("svg:text", { x: 30, y: h - 4 }, "slices in order along the slice normal →"));
}

function setup() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload(await filesFromDrop(e.dataTransfer));
  });
  for (const id of ["file-input", "folder-input"]) {
    $(id).addEventListener("change", (e) => {
      upload([...e.target.files].map((f) => [f.webkitRelativePath || f.name, f]));
      e.target.value = "";
    });
  }
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setup);
