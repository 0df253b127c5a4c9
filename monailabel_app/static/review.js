// The review page: MONAI Label's REST API (GET /info/, GET /datastore/?output=all, GET /datastore/image,
// GET /datastore/label, POST /infer/<model>, PUT /datastore/label, POST /batch/infer/<model>, POST /train/<model>)
// and the app's video routes (PUT /video/<id>, GET /video/<id>, GET /video/<id>/export). No framework, no build step.
// The server's access token is asked for once (or taken from the address's #token=...), kept in this tab's
// sessionStorage, and sent as "Authorization: Bearer <token>" with every request.
"use strict";

const RESULT = { result_extension: ".png", result_dtype: "uint8" };
const COLOURS = ["#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
                 "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000"];
const state = { frame: null, width: 0, height: 0, label: null, classes: {}, foreground: [], background: [],
                box: null, drag: null, scale: 1, video: null, videoFrames: [], undo: [], dirty: false,
                playing: null, painting: false };
const UNDO_DEPTH = 30;
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "surgicalsam_token";

function accessToken() {
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    history.replaceState(null, "", location.pathname + location.search);
  }
  let token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    token = (prompt("Access token of this SurgicalSAM server (printed on its console at first start):") || "").trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
  }
  return token;
}

// fetch() with the access token; a 401 forgets it, so the next page load asks again
async function api(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${accessToken()}` } });
  if (response.status === 401) sessionStorage.removeItem(TOKEN_KEY);
  return response;
}

function setStatus(text, busy) {
  $("status").textContent = text;
  document.body.dataset.state = busy ? "busy" : "ready";
}

async function checked(response) {
  if (!response.ok) {
    let detail = await response.text();
    try { detail = JSON.parse(detail).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function colour(value) {
  const hex = COLOURS[value % COLOURS.length];
  return [parseInt(hex.slice(1, 3), 16), parseInt(hex.slice(3, 5), 16), parseInt(hex.slice(5, 7), 16)];
}

// A label-map PNG (one channel of class ids) -> Uint8Array of width*height values.
async function decodeLabel(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const values = new Uint8Array(bitmap.width * bitmap.height);
  for (let i = 0; i < values.length; i++) values[i] = rgba[4 * i];
  return values;
}

function drawOverlay() {
  const canvas = $("overlay");
  const context = canvas.getContext("2d");
  const image = context.createImageData(state.width, state.height);
  for (let i = 0; i < state.label.length; i++) {
    const value = state.label[i];
    if (!value) continue;
    const [r, g, b] = colour(value);
    image.data.set([r, g, b, 110], 4 * i);
  }
  context.putImageData(image, 0, 0);
  // markers of a size seen at the frame's scale on screen: at least 3 screen pixels, about 1/100 of the frame
  const radius = Math.max(1, Math.round(Math.max(state.width, state.height) / 120), Math.ceil(3 / state.scale));
  context.lineWidth = Math.max(1, Math.round(radius / 3));
  for (const [points, fill] of [[state.foreground, "#00ff00"], [state.background, "#ff0000"]]) {
    context.fillStyle = fill;
    context.strokeStyle = "#000000";
    for (const [x, y] of points) {
      context.fillRect(x - radius, y - radius, 2 * radius + 1, 2 * radius + 1);
      if (radius > 2) context.strokeRect(x - radius, y - radius, 2 * radius + 1, 2 * radius + 1);
    }
  }
  const box = state.drag && state.mode === "prompt" ? state.drag : state.box;
  if (box) {
    context.strokeStyle = "#ffffff";
    context.strokeRect(Math.min(box[0], box[2]), Math.min(box[1], box[3]), Math.abs(box[2] - box[0]), Math.abs(box[3] - box[1]));
  }
  const parts = [];
  if (state.foreground.length) parts.push(`${state.foreground.length} foreground`);
  if (state.background.length) parts.push(`${state.background.length} background`);
  if (state.box) parts.push(`box ${state.box.join(", ")}`);
  $("prompts").textContent = "clicks: " + (parts.join(", ") || "none");
}

async function infer(model, params) {
  const form = new FormData();
  form.append("params", JSON.stringify({ ...RESULT, ...params }));
  const url = `../infer/${model}?image=${encodeURIComponent(state.frame)}&output=image`;
  return decodeLabel(await (await checked(await api(url, { method: "POST", body: form }))).blob());
}

// The canvas scale: the frame fits the space beside the lists and above the player (whole multiples when the
// frame is smaller than that space, so each frame pixel is a square of screen pixels).
function fitScale(width, height) {
  const room = $("work").getBoundingClientRect();
  const fit = Math.min((room.width - 4) / width, (window.innerHeight - room.top - 70) / height, 8);
  return fit >= 1 ? Math.floor(fit) : Math.max(fit, 0.1);
}

function discardEdits() {
  return !state.dirty || confirm(`${state.frame} has unsaved edits: discard them?`);
}

async function storedLabel(id) {
  for (const [tag, source] of [["final", "saved label"], ["original", "stored pre-label"]]) {
    const response = await api(`../datastore/label?label=${encodeURIComponent(id)}&tag=${tag}`);
    if (response.ok) return [await decodeLabel(await response.blob()), source];
  }
  return [null, null];
}

async function openFrame(id, options = {}) {
  if (!options.force && !discardEdits()) return false;
  setStatus(`opening ${id}…`, true);
  state.frame = id;
  state.foreground = []; state.background = []; state.box = null; state.undo = []; state.dirty = false;
  for (const li of $("frames").children) li.classList.toggle("current", li.dataset.id === id);
  const blob = await (await checked(await api(`../datastore/image?image=${encodeURIComponent(id)}`))).blob();
  const bitmap = await createImageBitmap(blob);
  state.width = bitmap.width; state.height = bitmap.height;
  state.scale = fitScale(bitmap.width, bitmap.height);
  for (const canvas of [$("frame"), $("overlay")]) {
    canvas.width = bitmap.width; canvas.height = bitmap.height;
    canvas.style.width = `${bitmap.width * state.scale}px`;
    canvas.style.height = `${bitmap.height * state.scale}px`;
  }
  $("frame").getContext("2d").drawImage(bitmap, 0, 0);
  const [label, source] = await storedLabel(id);
  if (label) {
    state.label = label;
    setStatus(`${id}: ${source}`, false);
  } else if (options.playing) {
    state.label = new Uint8Array(state.width * state.height);
    setStatus(`${id}: no label yet`, false);
  } else {
    state.label = await infer("surgicalsam", {});
    setStatus(`${id}: automatic pre-label`, false);
  }
  showPosition();
  drawOverlay();
  return true;
}

function framePoint(event) {
  const rect = $("overlay").getBoundingClientRect();
  const x = Math.floor((event.clientX - rect.left) / rect.width * state.width);
  const y = Math.floor((event.clientY - rect.top) / rect.height * state.height);
  return [Math.min(Math.max(x, 0), state.width - 1), Math.min(Math.max(y, 0), state.height - 1)];
}

function remember() {
  state.undo.push(state.label.slice());
  if (state.undo.length > UNDO_DEPTH) state.undo.shift();
}

function edited() {
  state.dirty = true;
  drawOverlay();
}

function undo() {
  if (!state.undo.length) return;
  state.label = state.undo.pop();
  state.dirty = state.undo.length > 0 || state.dirty;
  drawOverlay();
  setStatus(`${state.frame}: undone`, false);
}

function paint(x, y) {
  const value = state.mode === "eraser" ? 0 : Number($("class").value);
  const radius = Math.max(0, Number($("brush-size").value) - 1);
  for (let dy = -radius; dy <= radius; dy++) {
    for (let dx = -radius; dx <= radius; dx++) {
      const px = x + dx, py = y + dy;
      if (dx * dx + dy * dy > radius * radius || px < 0 || py < 0 || px >= state.width || py >= state.height) continue;
      state.label[py * state.width + px] = value;
    }
  }
}

function paintLine(from, to) {
  const steps = Math.max(Math.abs(to[0] - from[0]), Math.abs(to[1] - from[1]), 1);
  for (let i = 0; i <= steps; i++) {
    paint(Math.round(from[0] + (to[0] - from[0]) * i / steps), Math.round(from[1] + (to[1] - from[1]) * i / steps));
  }
}

function bindCanvas() {
  const canvas = $("overlay");
  canvas.addEventListener("mousedown", (event) => {
    if (!state.label) return;
    const [x, y] = framePoint(event);
    state.drag = [x, y, x, y];
    state.dragShift = event.shiftKey;
    if (state.mode !== "prompt") {
      remember();
      paint(x, y);
      edited();
    }
  });
  canvas.addEventListener("mousemove", (event) => {
    if (!state.drag) return;
    const [x, y] = framePoint(event);
    if (state.mode !== "prompt") paintLine([state.drag[2], state.drag[3]], [x, y]);
    state.drag[2] = x; state.drag[3] = y;
    if (state.mode !== "prompt") edited(); else drawOverlay();
  });
  window.addEventListener("mouseup", () => {
    if (!state.drag) return;
    const [x0, y0, x1, y1] = state.drag;
    state.drag = null;
    if (state.mode !== "prompt") return;
    if (Math.abs(x1 - x0) + Math.abs(y1 - y0) < 3) {
      (state.dragShift ? state.background : state.foreground).push([x0, y0]);
    } else {
      state.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
    }
    drawOverlay();
  });
}

async function applySam(value) {
  const params = { foreground: state.foreground, background: state.background };
  if (state.box) params.box = state.box;
  setStatus("SAM…", true);
  const mask = await infer("sam_prompt", params);
  remember();
  for (let i = 0; i < mask.length; i++) if (mask[i]) state.label[i] = value;
  state.foreground = []; state.background = []; state.box = null;
  edited();
  setStatus(`${state.frame}: SAM mask ${value ? "added as class " + value : "erased"}`, false);
}

async function save() {
  setStatus("saving…", true);
  const form = new FormData();
  form.append("label", await encodeGrayPng(state.label, state.width, state.height), `${state.frame}.png`);
  form.append("params", "{}");
  await checked(await api(`../datastore/label?image=${encodeURIComponent(state.frame)}&tag=final`, { method: "PUT", body: form }));
  const li = [...$("frames").children].find((item) => item.dataset.id === state.frame);
  if (li) li.classList.add("labelled");
  state.dirty = false;
  if (state.video) await loadVideo(state.video, false);
  setStatus(`${state.frame}: saved`, false);
}

// ------------------------------------------------------------------------------------------------ videos
async function loadVideo(video, openFirst = true) {
  state.video = video || null;
  state.videoFrames = [];
  if (state.video) {
    const listed = await (await checked(await api(`../video/${encodeURIComponent(state.video)}`))).json();
    state.videoFrames = listed.frames;
    state.fps = listed.fps || 8;
  }
  const timeline = $("timeline");
  timeline.replaceChildren();
  for (const frame of state.videoFrames) {
    const cell = document.createElement("span");
    cell.dataset.id = frame.id;
    cell.className = `state-${frame.state}`;
    cell.title = `${frame.id}: ${frame.state}` + (frame.presence_margin == null ? "" : `, margin ${frame.presence_margin.toFixed(3)}`);
    cell.addEventListener("click", guarded(() => openFrame(frame.id)));
    timeline.append(cell);
  }
  $("scrub").max = Math.max(0, state.videoFrames.length - 1);
  if (openFirst && state.videoFrames.length) await openFrame(state.videoFrames[0].id);
  showPosition();
}

function position() {
  return state.videoFrames.findIndex((frame) => frame.id === state.frame);
}

function showPosition() {
  const at = position();
  for (const cell of $("timeline").children) cell.classList.toggle("current", cell.dataset.id === state.frame);
  if (at >= 0) {
    $("scrub").value = at;
    $("position").textContent = `${at + 1} / ${state.videoFrames.length} (${state.videoFrames[at].state})`;
  } else {
    $("position").textContent = "";
  }
}

async function step(offset) {
  if (!state.videoFrames.length) return;
  const at = Math.min(Math.max(position() + offset, 0), state.videoFrames.length - 1);
  await openFrame(state.videoFrames[at].id);
}

function togglePlay() {
  if (state.playing) {
    clearTimeout(state.playing);
    state.playing = null;
    $("play").textContent = "Play";
    setStatus(`${state.frame}: paused`, false);
    return;
  }
  if (!state.videoFrames.length || !discardEdits()) return;
  $("play").textContent = "Pause";
  const tick = async () => {
    let at = position() + 1;
    if (at >= state.videoFrames.length) at = 0;
    const started = performance.now();
    try { await openFrame(state.videoFrames[at].id, { force: true, playing: true }); } catch (error) { setStatus(`error: ${error.message}`, false); }
    if (state.playing) state.playing = setTimeout(tick, Math.max(0, 1000 / state.fps - (performance.now() - started)));
  };
  state.playing = setTimeout(tick, 0);
  setStatus("playing", true);
}

// The unreviewed pre-labelled frame whose pre-label was closest to another decision (lib/batch.py)
async function nextUncertain() {
  if (!state.video) throw new Error("pick a video first");
  await loadVideo(state.video, false);
  const waiting = state.videoFrames.filter((frame) => frame.state === "pre-labelled" && frame.id !== state.frame);
  if (!waiting.length) { setStatus(`${state.video}: no unreviewed pre-labelled frame left`, false); return; }
  const margin = (frame) => (frame.presence_margin == null ? Infinity : frame.presence_margin);
  waiting.sort((a, b) => margin(a) - margin(b) || a.index - b.index);
  await openFrame(waiting[0].id);
}

async function preLabelVideo(again = false) {
  if (!state.video) throw new Error("pick a video first");
  setStatus(`${state.video}: pre-labelling…`, true);
  const report = await (await checked(await api("../batch/infer/surgicalsam?run_sync=true", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ video: state.video }),
  }))).json();
  await loadVideo(state.video, false);
  if (state.frame && !state.dirty) await openFrame(state.frame, { force: true });
  setStatus(`${state.video}: ${report.ok} frames pre-labelled${again ? " again" : ""}` +
            (report.failed.length ? `, ${report.failed.length} failed` : ""), false);
}

async function uploadVideo() {
  const file = $("upload-file").files[0];
  const video = $("upload-id").value.trim() || (file ? file.name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9_+.-]/g, "_") : "");
  if (!file || !video) throw new Error("choose a video file (mp4, or a zip of frames) and give it an id");
  setStatus(`uploading ${video}…`, true);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("params", "{}");
  const stored = await (await checked(await api(`../video/${encodeURIComponent(video)}`, { method: "PUT", body: form }))).json();
  await listVideos(video);
  await listFrames();
  await loadVideo(video, false);
  setStatus(`${video}: ${stored.frames} frames stored`, false);
}

async function train() {
  const params = JSON.parse($("train-params").value || "{}");
  setStatus("training…", true);
  await checked(await api("../train/surgicalsam", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(params),
  }));
  let task = {};
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 2000));
    task = await (await checked(await api("../train/?check_if_running=false"))).json();
    if (task.status === "DONE" || task.status === "ERROR") break;
  }
  if (task.status === "ERROR") throw new Error(`training failed: ${JSON.stringify(task.details || task).slice(-300)}`);
  if (state.video) await preLabelVideo(true); else setStatus("trained", false);
}

async function exportVideo() {
  if (!state.video) throw new Error("pick a video first");
  setStatus(`${state.video}: exporting…`, true);
  const blob = await (await checked(await api(`../video/${encodeURIComponent(state.video)}/export`))).blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${state.video}_labels.zip`;
  document.body.append(link);
  link.click();
  link.remove();
  setStatus(`${state.video}: exported`, false);
}

function guarded(action) {
  return async (...args) => {
    try { await action(...args); } catch (error) { setStatus(`error: ${error.message}`, false); }
  };
}

async function listVideos(selected) {
  const listed = await (await checked(await api("../video/"))).json();
  const select = $("video");
  select.replaceChildren(new Option("(all frames)", ""));
  for (const video of listed.videos) select.add(new Option(`${video.id} (${video.frames})`, video.id));
  select.value = selected || "";
}

async function listFrames() {
  const datastore = await (await checked(await api("../datastore/?output=all"))).json();
  const objects = datastore.objects || {};
  $("frames").replaceChildren();
  for (const id of Object.keys(objects).sort()) {
    const li = document.createElement("li");
    li.textContent = id;
    li.dataset.id = id;
    if ((objects[id].labels || {}).final) li.classList.add("labelled");
    if (id === state.frame) li.classList.add("current");
    li.addEventListener("click", guarded(() => openFrame(id)));
    $("frames").append(li);
  }
  return Object.keys(objects).length;
}

function setMode(mode) {
  state.mode = mode;
  $(`mode-${mode}`).checked = true;
  $("overlay").style.cursor = mode === "prompt" ? "crosshair" : "cell";
}

function bindKeys() {
  document.addEventListener("keydown", (event) => {
    if (["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName) && event.target.type !== "radio") return;
    const key = event.key.toLowerCase();
    const actions = {
      arrowright: () => step(1), arrowleft: () => step(-1), " ": togglePlay, n: nextUncertain,
      a: () => applySam(Number($("class").value)), c: () => $("clear-prompts").click(),
      b: () => setMode("brush"), e: () => setMode("eraser"), v: () => setMode("prompt"),
      s: save, p: () => preLabelVideo(),
    };
    let action = actions[key];
    if ((event.ctrlKey || event.metaKey) && key === "z") action = undo;
    else if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (/^[1-9]$/.test(key) && [...$("class").options].some((o) => o.value === key)) action = () => { $("class").value = key; };
    if (!action) return;
    event.preventDefault();
    guarded(action)();
  });
}

async function start() {
  const info = await (await checked(await api("../info/"))).json();
  // the served bundle's class table (its metadata): the only values a saved label map may hold
  const table = info.class_table;
  const select = $("class");
  $("legend-source").textContent = `Label values of ${table.bundle} (${table.source}); ${table.unlabelled} = unlabelled. ` +
    "Labels with other values are refused.";
  for (const [key, name] of Object.entries(table.classes).sort((a, b) => Number(a[0]) - Number(b[0]))) {
    const value = Number(key);
    state.classes[value] = name;
    if (value) select.add(new Option(`${value} ${name}`, value));
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.style.background = COLOURS[value % COLOURS.length];
    item.append(swatch, `${value} ${name}`);
    $("legend").append(item);
  }
  const count = await listFrames();
  await listVideos("");
  bindCanvas();
  bindKeys();
  setMode("prompt");
  for (const mode of ["prompt", "brush", "eraser"]) $(`mode-${mode}`).addEventListener("change", () => setMode(mode));
  window.addEventListener("beforeunload", (event) => { if (state.dirty) { event.preventDefault(); event.returnValue = ""; } });
  $("video").addEventListener("change", guarded(async () => {
    if (!discardEdits()) { $("video").value = state.video || ""; return; }
    state.dirty = false;
    await loadVideo($("video").value);
  }));
  $("auto").addEventListener("click", guarded(async () => { const label = await infer("surgicalsam", {}); remember(); state.label = label; edited(); }));
  $("sam").addEventListener("click", guarded(() => applySam(Number($("class").value))));
  $("erase").addEventListener("click", guarded(() => applySam(0)));
  $("clear-prompts").addEventListener("click", () => { state.foreground = []; state.background = []; state.box = null; drawOverlay(); });
  $("undo").addEventListener("click", undo);
  $("save").addEventListener("click", guarded(save));
  $("prev").addEventListener("click", guarded(() => step(-1)));
  $("next-frame").addEventListener("click", guarded(() => step(1)));
  $("play").addEventListener("click", togglePlay);
  $("scrub").addEventListener("input", guarded(async () => {
    const frame = state.videoFrames[Number($("scrub").value)];
    if (frame && frame.id !== state.frame) await openFrame(frame.id, { playing: true });
  }));
  $("next").addEventListener("click", guarded(nextUncertain));
  $("prelabel").addEventListener("click", guarded(() => preLabelVideo()));
  $("train").addEventListener("click", guarded(train));
  $("export").addEventListener("click", guarded(exportVideo));
  $("upload").addEventListener("click", guarded(uploadVideo));
  setStatus(`${count} frames`, false);
}

guarded(start)();
