// plm-serve playground: a chat client of /v1/chat/completions (SSE), in plain JavaScript.
// It sends what any OpenAI client sends and shows the server's own words for every error.
"use strict";

const KEY_STORAGE = "plm-serve.api-key"; // sessionStorage only: gone when the tab closes
const NARROW = window.matchMedia("(max-width: 48rem)");

const $ = (id) => document.getElementById(id);
const el = {
  apiKey: $("api-key"), detail: $("detail"), temperature: $("temperature"), maxTokens: $("max-tokens"),
  seed: $("seed"), settings: $("settings"), newChat: $("new-chat"), modelStatus: $("model-status"),
  log: $("log"), stats: $("stats"), error: $("error"), composer: $("composer"), attachments: $("attachments"),
  prompt: $("prompt"), attach: $("attach"), file: $("file"), stop: $("stop"), send: $("send"),
};

const state = {
  history: [],      // OpenAI messages of the finished turns, sent again with every new prompt
  pending: [],      // files picked for the next message: {file, kind, url}
  controller: null, // AbortController of the answer being streamed, null when idle
  objectUrls: [],   // previews shown in the conversation, released by "New conversation"
  conversation: 0,  // bumped by "New conversation": an answer still arriving for an older one is dropped
};

// ------------------------------------------------------------------------------------------- errors
class ApiError extends Error {
  constructor(status, body) {
    super(body.message);
    this.status = status; // 0: an error event inside a stream whose status line said 200
    this.body = body;     // OpenAI's {message, type, param, code}
  }
}

async function errorFromResponse(response) {
  const raw = await response.text();
  try {
    const body = JSON.parse(raw).error;
    if (body && typeof body.message === "string") return new ApiError(response.status, body);
  } catch (_) { /* not an OpenAI error body: show the status and the text below */ }
  return new ApiError(response.status, { message: `${response.status} ${response.statusText} ${raw}`.trim() });
}

function showError(err) {
  if (!err) { el.error.textContent = ""; return; }
  if (err instanceof ApiError) {
    const { type, code, param } = err.body;
    const what = [err.status ? `Error ${err.status}` : "Error in the stream", type, code].filter(Boolean).join(" · ");
    el.error.textContent = `${what}\n${err.message}` + (param ? `\n(param: ${param})` : "");
  } else {
    el.error.textContent = `Error\n${err.message || err}`;
  }
}

// ------------------------------------------------------------------------------------- settings
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = el.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The sampling settings; an empty field leaves the server's default. Values out of range still go to the
// server, so that its 400 says what is wrong with them.
function samplingSettings() {
  const settings = {};
  for (const [name, input] of [["max_tokens", el.maxTokens], ["temperature", el.temperature], ["seed", el.seed]]) {
    if (input.validity.badInput) throw new Error(`${name} must be a number.`);
    if (input.value.trim() !== "") settings[name] = Number(input.value);
  }
  return settings;
}

async function showModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw await errorFromResponse(response);
    const [card] = (await response.json()).data;
    if (card.max_model_len == null) {
      el.modelStatus.textContent = `Model: ${card.id} (loading…)`;
      setTimeout(showModel, 2000);
      return;
    }
    el.modelStatus.textContent = `Model: ${card.id} · context ${card.max_model_len.toLocaleString("en")} tokens`;
  } catch (err) {
    el.modelStatus.textContent = `Model unknown: ${err.message}`;
  }
}

// ---------------------------------------------------------------------------------- attachments
function kindOf(file) {
  if (file.type.startsWith("image/")) return "image";
  if (file.type.startsWith("video/")) return "video";
  return null;
}

function addFiles(files) {
  const refused = [];
  for (const file of files) {
    const kind = kindOf(file);
    if (kind === null) { refused.push(file.name || "the pasted item"); continue; }
    state.pending.push({ file, kind, url: URL.createObjectURL(file) });
  }
  renderPending();
  showError(refused.length ? new Error(`Not an image or a video: ${refused.join(", ")}`) : null);
}

function preview(item, { controls }) {
  const node = document.createElement(item.kind === "image" ? "img" : "video");
  node.src = item.url;
  if (item.kind === "image") {
    node.alt = item.file.name || "pasted image";
  } else {
    node.muted = true;
    node.controls = controls;
    node.setAttribute("aria-label", item.file.name || "video");
  }
  return node;
}

function renderPending() {
  el.attachments.replaceChildren(...state.pending.map((item, index) => {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = item.file.name || `pasted ${item.kind}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "secondary";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${name.textContent}`);
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(item.url);
      state.pending.splice(index, 1);
      renderPending();
      el.prompt.focus();
    });
    li.append(preview(item, { controls: false }), name, remove);
    return li;
  }));
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function userContent(text, items) {
  if (items.length === 0) return text;
  const detail = el.detail.value;
  const parts = [];
  for (const item of items) {
    const url = await readAsDataUrl(item.file);
    parts.push(item.kind === "image"
      ? { type: "image_url", image_url: { url, detail } }
      : { type: "video_url", video_url: { url } });
  }
  if (text) parts.push({ type: "text", text });
  return parts;
}

// --------------------------------------------------------------------------------- conversation
function addTurn(role, text, items = []) {
  const li = document.createElement("li");
  li.className = `turn ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  li.append(label);
  if (items.length) {
    const media = document.createElement("div");
    media.className = "media";
    media.append(...items.map((item) => preview(item, { controls: true })));
    li.append(media);
  }
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  el.log.append(li);
  scrollToEnd();
  return { li, body };
}

function scrollToEnd() {
  el.log.scrollTop = el.log.scrollHeight;
}

function setBusy(busy) {
  el.send.disabled = busy;
  el.stop.hidden = !busy;
  el.log.setAttribute("aria-busy", String(busy)); // screen readers read the answer once it is complete
}

function formatStats(usage, timing, finishReason) {
  const parts = [];
  if (usage) {
    parts.push(`${usage.completion_tokens} ${usage.completion_tokens === 1 ? "token" : "tokens"}`);
    const decodeS = (timing.end - timing.firstToken) / 1000;
    if (usage.completion_tokens > 1 && decodeS > 0) {
      // the first token arrives at firstToken: the rest took (end - firstToken)
      parts.push(`${((usage.completion_tokens - 1) / decodeS).toFixed(1)} tokens/s`);
    }
  }
  if (timing.firstToken !== null) {
    parts.push(`time to first token ${Math.round(timing.firstToken - timing.start)} ms`);
  }
  if (usage) {
    const cached = usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens;
    parts.push(`prompt ${usage.prompt_tokens} tokens` + (cached ? ` (${cached} cached)` : ""));
  }
  if (finishReason === "length") parts.push("stopped at max tokens");
  if (finishReason === "stopped") parts.push("stopped by you");
  if (finishReason === "interrupted") parts.push("cut off by an error");
  return parts.join(" · ");
}

// One SSE stream: calls onEvent(parsed JSON) per `data:` event until `data: [DONE]`.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("The connection closed before the answer was complete.");
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) onEvent(JSON.parse(data));
    }
  }
}

async function send() {
  if (state.controller) return;
  const text = el.prompt.value.trim();
  const items = state.pending.slice();
  if (!text && items.length === 0) {
    showError(new Error("Write a message or attach an image first."));
    el.prompt.focus();
    return;
  }
  let settings;
  try {
    settings = samplingSettings();
  } catch (err) {
    showError(err);
    return;
  }
  showError(null);
  el.stats.textContent = "";
  const controller = new AbortController();
  const conversation = state.conversation;
  state.controller = controller;
  setBusy(true);
  try {
    await streamTurn(text, items, settings, controller, conversation);
  } finally {
    state.controller = null;
    setBusy(false);
    el.prompt.focus();
  }
}

async function streamTurn(text, items, settings, controller, conversation) {
  let userMessage;
  try {
    userMessage = { role: "user", content: await userContent(text, items) };
  } catch (err) {
    showError(new Error(`Could not read the file: ${err.message || err}`));
    return;
  }
  // Shown at once; taken back into the composer (for another try) if the server refuses the request.
  const user = addTurn("user", text, items);
  const answer = addTurn("assistant", "");
  const draft = el.prompt.value;
  el.prompt.value = "";
  state.pending = [];
  renderPending();
  const takeBack = () => {
    user.li.remove();
    answer.li.remove();
    if (!el.prompt.value) el.prompt.value = draft;
    state.pending = items.concat(state.pending);
    renderPending();
  };

  const timing = { start: performance.now(), firstToken: null, end: null };
  let usage = null;
  let finishReason = null;
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify({
        messages: [...state.history, userMessage], stream: true, stream_options: { include_usage: true },
        ...settings,
      }),
      signal: controller.signal,
    });
    if (!response.ok) throw await errorFromResponse(response);
    await readEvents(response, (event) => {
      if (event.error) throw new ApiError(0, event.error);
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        if (timing.firstToken === null) timing.firstToken = performance.now();
        reply += choice.delta.content;
        answer.body.textContent = reply;
        scrollToEnd();
      }
      if (choice.finish_reason) finishReason = choice.finish_reason;
    });
  } catch (err) {
    controller.abort(); // after an error event mid-stream: close the connection too
    if (conversation !== state.conversation) { // "New conversation" while it streamed: drop the turn
      items.forEach((item) => URL.revokeObjectURL(item.url));
      return;
    }
    const stopped = err.name === "AbortError";
    if (!stopped) showError(err);
    if (reply === "") { takeBack(); return; } // refused, or nothing came: not a turn of the conversation
    finishReason = stopped ? "stopped" : "interrupted"; // what came stays, as a turn of the conversation
  }
  timing.end = performance.now();
  state.history.push(userMessage, { role: "assistant", content: reply });
  state.objectUrls.push(...items.map((item) => item.url));
  if (finishReason === "stopped" || finishReason === "interrupted") {
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = finishReason === "stopped" ? "(stopped)" : "(cut off by the error shown below)";
    answer.li.append(note);
  }
  el.stats.textContent = formatStats(usage, timing, finishReason);
}

function newConversation() {
  state.conversation += 1;
  if (state.controller) state.controller.abort();
  state.history = [];
  state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  state.objectUrls = [];
  el.log.replaceChildren();
  el.stats.textContent = "";
  showError(null);
  el.prompt.focus();
}

// ------------------------------------------------------------------------------------------ wiring
el.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
el.apiKey.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, el.apiKey.value));
el.apiKey.addEventListener("change", showModel);
if (NARROW.matches) el.settings.open = false; // on a phone the conversation gets the screen

el.composer.addEventListener("submit", (event) => { event.preventDefault(); send(); });
el.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.controller) state.controller.abort();
});
el.stop.addEventListener("click", () => state.controller && state.controller.abort());
el.newChat.addEventListener("click", newConversation);
el.attach.addEventListener("click", () => el.file.click());
el.file.addEventListener("change", () => { addFiles(el.file.files); el.file.value = ""; el.prompt.focus(); });

// Paste anywhere (files on the clipboard), drop anywhere on the page.
document.addEventListener("paste", (event) => {
  const files = [...(event.clipboardData ? event.clipboardData.files : [])];
  if (files.length) { event.preventDefault(); addFiles(files); }
});
let dragDepth = 0;
document.addEventListener("dragenter", (event) => {
  if (!event.dataTransfer || ![...event.dataTransfer.types].includes("Files")) return;
  dragDepth += 1;
  el.composer.classList.add("dragging");
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) el.composer.classList.remove("dragging");
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  el.composer.classList.remove("dragging");
  if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
});

showModel();
