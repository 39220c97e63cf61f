// The page at /ui: what is served (GET model), and the top classes of the user's images
// (POST classify_batch: the images added together, in groups of up to BATCH_SIZE).
// Every URL is relative to the page, so nothing is asked of any other server.
"use strict";

const BATCH_SIZE = 8; // images per request at most: the first 8 shown sooner than all of many
const BATCHES_IN_FLIGHT = 2; // the next batch is decoded while one runs

// What the graph averages per image, after the shorter side is resized to Q.
const TTA_VIEWS = {
  center: (crop) => `the centre ${crop} × ${crop} crop`,
  five: (crop) => `5 crops of ${crop} × ${crop} (corners and centre), averaged`,
  ten: (crop) => `10 crops of ${crop} × ${crop} (5 and their mirror images), averaged`,
  dense: () => "dense: the whole image and its mirror image, averaged",
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

function known(value) {
  return value !== undefined && value !== null;
}

function testTime(model) {
  const resize = `shorter side resized to Q = ${model.test_scale}`;
  if (!known(model.tta)) return resize;
  const views = TTA_VIEWS[model.tta] && known(model.crop) ? TTA_VIEWS[model.tta](model.crop) : `${model.tta} views`;
  return `${resize}; ${views}`;
}

function modelRows(model) {
  const rows = [["Model", model.tag]];
  if (known(model.cfg)) {
    rows.push(["Configuration", `VGG-${model.cfg}${model.batch_norm ? " with batch norm" : ""}`]);
  }
  if (known(model.test_scale)) rows.push(["Test time", testTime(model)]);
  if (known(model.precision)) rows.push(["Precision", model.precision]);
  if (known(model.provider)) {
    const device = PROVIDER_NAMES[model.provider] || model.provider;
    const workers = model.workers > 1 ? `, ${model.workers} workers` : "";
    rows.push(["Device", `${device}${workers}`]);
  }
  if (known(model.num_classes)) rows.push(["Classes", String(model.num_classes)]);
  rows.push(["Validation top-1", typeof model.val_top1 === "number" ? percent(model.val_top1) : "not recorded"]);
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
    const retryAfter = Number(response.headers.get("retry-after"));
    if (response.status === 503 && retryAfter > 0) {
      // Warming up: say so, and ask again when the server says to.
      $("model-status").textContent = await errorText(response);
      setTimeout(loadModel, 1000 * Math.min(retryAfter, 60));
      return;
    }
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

// One POST classify_batch per group of images: measured faster for 5 images than one POST
// classify each (README.md, "A page to try it"). A bad image fails its whole request, with
// its position in the error ("images[2]: ..."): it is marked and the others are sent again.
async function send(jobs) {
  const form = new FormData();
  for (const job of jobs) form.append("images", job.file, job.file.name);
  let response;
  let body;
  try {
    response = await fetch("classify_batch", { method: "POST", body: form });
    body = response.ok ? await response.json() : await errorText(response);
  } catch (error) {
    const message = response ? `unreadable answer: ${error.message}` : `could not reach the server: ${error.message}`;
    return jobs.forEach((job) => finish(job.card, message));
  }
  if (jobs.some((job) => !job.card.isConnected)) return; // cleared while it ran
  if (response.ok) {
    return jobs.forEach((job, index) => {
      showTop(job.card, body[index]);
      finish(job.card, null);
    });
  }
  retryOrFail(jobs, response.status, body);
}

function retryOrFail(jobs, status, message) {
  const culprit = /^images\[(\d+)\]: (.*)$/s.exec(message);
  if (culprit && Number(culprit[1]) < jobs.length) {
    const index = Number(culprit[1]);
    finish(jobs[index].card, culprit[2]);
    const rest = jobs.filter((_, position) => position !== index);
    if (rest.length) queue.unshift(rest);
  } else if (status === 413 && jobs.length > 1) { // too big together: halve
    const half = Math.ceil(jobs.length / 2);
    queue.unshift(jobs.slice(0, half), jobs.slice(half));
  } else {
    jobs.forEach((job) => finish(job.card, message));
  }
}

function pump() {
  while (running < BATCHES_IN_FLIGHT && queue.length) {
    const jobs = queue.shift();
    jobs.forEach((job) => { job.card.querySelector(".status").textContent = "Classifying…"; });
    running += 1;
    send(jobs).finally(() => {
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
  const jobs = [];
  for (const file of files) {
    const card = newCard(file);
    list.append(card);
    jobs.push({ file, card });
    counts.total += 1;
  }
  for (let start = 0; start < jobs.length; start += BATCH_SIZE) {
    queue.push(jobs.slice(start, start + BATCH_SIZE));
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
