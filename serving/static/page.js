// The page at /ui: what is served (GET model), and the top classes of the user's images
// (POST classify, one request per image, several in flight: the server batches them).
// Every URL is relative to the page, so nothing is asked of any other server.
"use strict";

const IN_FLIGHT = 6; // Chromium's connections per server over HTTP/1.1

const TTA_NAMES = {
  center: "centre crop",
  five: "5 crops (corners and centre)",
  ten: "10 crops (5 and their mirror images)",
  dense: "dense (whole image and its mirror image)",
};

const PROVIDER_NAMES = {
  CPUExecutionProvider: "CPU",
  CUDAExecutionProvider: "GPU (CUDA)",
};

const queue = [];
let running = 0;
const counts = { total: 0, done: 0, failed: 0 };
const objectUrls = [];

function $(id) {
  return document.getElementById(id);
}

function percent(score) {
  return `${(score * 100).toFixed(1)} %`;
}

// ------------------------------------------------------------------ the model

function modelRows(model) {
  const rows = [["Model", model.tag]];
  if (model.cfg !== undefined) {
    rows.push(["Configuration", `VGG-${model.cfg}${model.batch_norm ? " with batch norm" : ""}`]);
  }
  if (model.test_scale !== undefined) {
    const tta = TTA_NAMES[model.tta] || model.tta;
    rows.push(["Test time", `images resized to Q = ${model.test_scale}, ${model.crop} × ${model.crop} crops; ${tta}`]);
  }
  if (model.precision !== undefined) rows.push(["Precision", model.precision]);
  if (model.provider !== undefined) {
    const device = PROVIDER_NAMES[model.provider] || model.provider;
    const workers = model.workers > 1 ? `, ${model.workers} workers` : "";
    rows.push(["Device", `${device}${workers}`]);
  }
  if (model.num_classes !== undefined) rows.push(["Classes", String(model.num_classes)]);
  const top1 = typeof model.val_top1 === "number" ? percent(model.val_top1) : "not recorded";
  rows.push(["Validation top-1", top1]);
  return rows;
}

function showModel(model) {
  const list = $("model-info");
  for (const [term, value] of modelRows(model)) {
    const row = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    row.append(dt, dd);
    list.append(row);
  }
  list.hidden = false;
  $("model-status").hidden = true;
}

async function loadModel() {
  try {
    const response = await fetch("model", { headers: { accept: "application/json" } });
    if (!response.ok) throw new Error(await errorText(response));
    showModel(await response.json());
  } catch (error) {
    $("model-status").textContent = `Model information unavailable: ${error.message}`;
    $("model-status").classList.add("error");
  }
}

// ------------------------------------------------------------------ answers and errors

async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

function showTop(card, answer) {
  const list = card.querySelector(".top");
  for (const entry of answer.top) {
    const item = document.createElement("li");
    const label = document.createElement("span");
    const value = document.createElement("span");
    const bar = document.createElement("div");
    const fill = document.createElement("div");
    label.className = "label";
    label.textContent = entry.label;
    value.className = "pct";
    value.textContent = percent(entry.score);
    bar.className = "bar";
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(1, entry.score)) * 100}%`;
    bar.append(fill);
    item.append(label, value, bar);
    list.append(item);
  }
  card.querySelector(".status").textContent = "Top classes:";
}

function finish(card, error) {
  if (!card.isConnected) return; // cleared while it ran
  card.setAttribute("aria-busy", "false");
  counts.done += 1;
  if (error) {
    counts.failed += 1;
    card.classList.add("failed");
    const status = card.querySelector(".status");
    status.textContent = error;
    status.classList.add("error");
    status.setAttribute("role", "alert");
  } else {
    card.classList.add("done");
  }
  showSummary();
}

function showSummary() {
  const left = counts.total - counts.done;
  const parts = [`${counts.total} image${counts.total === 1 ? "" : "s"}`, `${counts.done - counts.failed} classified`];
  if (counts.failed) parts.push(`${counts.failed} failed`);
  if (left) parts.push(`${left} running`);
  $("summary").textContent = counts.total ? parts.join(", ") : "";
}

// ------------------------------------------------------------------ classifying

async function classify(job) {
  const form = new FormData();
  form.append("image", job.file, job.file.name);
  try {
    const response = await fetch("classify", { method: "POST", body: form });
    if (!response.ok) return finish(job.card, await errorText(response));
    const answer = await response.json();
    if (!job.card.isConnected) return;
    showTop(job.card, answer);
    finish(job.card, null);
  } catch (error) {
    finish(job.card, `could not reach the server: ${error.message}`);
  }
}

function pump() {
  while (running < IN_FLIGHT && queue.length) {
    const job = queue.shift();
    job.card.querySelector(".status").textContent = "Classifying…";
    running += 1;
    classify(job).finally(() => {
      running -= 1;
      pump();
    });
  }
}

function newCard(file) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  const image = card.querySelector("img");
  const url = URL.createObjectURL(file);
  objectUrls.push(url);
  image.alt = `thumbnail of ${file.name}`;
  image.addEventListener("error", () => {
    image.remove();
    card.querySelector(".thumb").textContent = "no preview";
  }, { once: true });
  image.src = url;
  card.querySelector(".name").textContent = file.name;
  return card;
}

function addFiles(files) {
  const list = $("results");
  for (const file of files) {
    const card = newCard(file);
    list.append(card);
    queue.push({ file, card });
    counts.total += 1;
  }
  $("clear").disabled = counts.total === 0;
  showSummary();
  pump();
}

function clearResults() {
  queue.length = 0;
  $("results").replaceChildren();
  objectUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  counts.total = counts.done = counts.failed = 0;
  $("clear").disabled = true;
  showSummary();
  $("pick").focus();
}

// ------------------------------------------------------------------ picking and dropping

function hasFiles(event) {
  return Array.from(event.dataTransfer ? event.dataTransfer.types : []).includes("Files");
}

function wireDragAndDrop() {
  const overlay = $("drop-overlay");
  let depth = 0;
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    overlay.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  window.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    overlay.hidden = true;
    addFiles(Array.from(event.dataTransfer.files));
  });
}

function start() {
  const input = $("files");
  $("pick").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    addFiles(Array.from(input.files));
    input.value = ""; // picking the same files again classifies them again
  });
  $("clear").addEventListener("click", clearResults);
  wireDragAndDrop();
  loadModel();
}

document.addEventListener("DOMContentLoaded", start);
