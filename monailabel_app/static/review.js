// The review page: MONAI Label's REST API only (GET /info/, GET /datastore/?output=all, GET /datastore/image,
// GET /datastore/label, POST /infer/<model>, PUT /datastore/label). No framework, no build step.
// The server's access token is asked for once (or taken from the address's #token=...), kept in this tab's
// sessionStorage, and sent as "Authorization: Bearer <token>" with every request.
"use strict";

const RESULT = { result_extension: ".png", result_dtype: "uint8" };
const COLOURS = ["#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
                 "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000"];
const state = { frame: null, width: 0, height: 0, label: null, classes: {}, foreground: [], background: [],
                box: null, drag: null, scale: 1 };
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
  context.lineWidth = 1;
  for (const [points, fill] of [[state.foreground, "#00ff00"], [state.background, "#ff0000"]]) {
    context.fillStyle = fill;
    for (const [x, y] of points) context.fillRect(x - 1, y - 1, 3, 3);
  }
  const box = state.drag || state.box;
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

async function openFrame(id) {
  setStatus(`opening ${id}…`, true);
  state.frame = id;
  state.foreground = []; state.background = []; state.box = null;
  for (const li of $("frames").children) li.classList.toggle("current", li.dataset.id === id);
  const blob = await (await checked(await api(`../datastore/image?image=${encodeURIComponent(id)}`))).blob();
  const bitmap = await createImageBitmap(blob);
  state.width = bitmap.width; state.height = bitmap.height;
  state.scale = Math.max(1, Math.min(8, Math.floor(800 / bitmap.width)));
  for (const canvas of [$("frame"), $("overlay")]) {
    canvas.width = bitmap.width; canvas.height = bitmap.height;
    canvas.style.width = `${bitmap.width * state.scale}px`;
    canvas.style.height = `${bitmap.height * state.scale}px`;
  }
  $("frame").getContext("2d").drawImage(bitmap, 0, 0);
  const saved = await api(`../datastore/label?label=${encodeURIComponent(id)}&tag=final`);
  if (saved.ok) {
    state.label = await decodeLabel(await saved.blob());
    setStatus(`${id}: saved label`, false);
  } else {
    state.label = await infer("surgicalsam", {});
    setStatus(`${id}: automatic pre-label`, false);
  }
  drawOverlay();
}

function framePoint(event) {
  const rect = $("overlay").getBoundingClientRect();
  const x = Math.floor((event.clientX - rect.left) / rect.width * state.width);
  const y = Math.floor((event.clientY - rect.top) / rect.height * state.height);
  return [Math.min(Math.max(x, 0), state.width - 1), Math.min(Math.max(y, 0), state.height - 1)];
}

function bindCanvas() {
  const canvas = $("overlay");
  canvas.addEventListener("mousedown", (event) => {
    const [x, y] = framePoint(event);
    state.drag = [x, y, x, y];
    state.dragShift = event.shiftKey;
  });
  canvas.addEventListener("mousemove", (event) => {
    if (!state.drag) return;
    const [x, y] = framePoint(event);
    state.drag[2] = x; state.drag[3] = y;
    drawOverlay();
  });
  canvas.addEventListener("mouseup", () => {
    const [x0, y0, x1, y1] = state.drag;
    state.drag = null;
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
  for (let i = 0; i < mask.length; i++) if (mask[i]) state.label[i] = value;
  state.foreground = []; state.background = []; state.box = null;
  drawOverlay();
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
  setStatus(`${state.frame}: saved`, false);
}

function guarded(action) {
  return async (...args) => {
    try { await action(...args); } catch (error) { setStatus(`error: ${error.message}`, false); }
  };
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
  const datastore = await (await checked(await api("../datastore/?output=all"))).json();
  const objects = datastore.objects || {};
  for (const id of Object.keys(objects).sort()) {
    const li = document.createElement("li");
    li.textContent = id;
    li.dataset.id = id;
    if ((objects[id].labels || {}).final) li.classList.add("labelled");
    li.addEventListener("click", guarded(() => openFrame(id)));
    $("frames").append(li);
  }
  bindCanvas();
  $("auto").addEventListener("click", guarded(async () => { state.label = await infer("surgicalsam", {}); drawOverlay(); }));
  $("sam").addEventListener("click", guarded(() => applySam(Number($("class").value))));
  $("erase").addEventListener("click", guarded(() => applySam(0)));
  $("clear-prompts").addEventListener("click", () => { state.foreground = []; state.background = []; state.box = null; drawOverlay(); });
  $("save").addEventListener("click", guarded(save));
  setStatus(`${Object.keys(objects).length} frames`, false);
}

guarded(start)();
