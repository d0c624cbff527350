// The chat page of examples/chat_proxy.py: no framework, no build step. It streams answers from
// the resumable OpenAI-compatible route and resumes them with Last-Event-ID when the connection
// drops; Stop cancels the stream (DELETE /streams/<id>), which closes the upstream request.
"use strict";

const API = "/resumable/v1/chat/completions";
const STREAMS = "/streams"; // the extension's resume (GET) and cancel (DELETE) routes
const STORE_KEY = "streamplus.chat.v1";
const MAX_RECONNECTS = 8; // in a row, without an answer from the server in between
const $ = (selector) => document.querySelector(selector);
const log = $("#log"), form = $("#form"), prompt = $("#prompt");
const sendButton = $("#send"), stopButton = $("#stop"), modelSelect = $("#model");
const conn = $("#conn"), jump = $("#jump"), welcome = $("#welcome");

// ---- conversations, kept in localStorage -------------------------------------------------
// {current: id, chats: [{id, title, updated, messages: [{role, content, state?, error?, stats?,
// model?, resumed?}]}]}; an assistant message's state: streaming, done, stopped or error.
let store = load();
const views = new WeakMap(); // message -> its elements on the page, for the chat shown
let live = null; // the answer being generated: {chat, msg, ctrl, key, streamId, lastId, stopped}
let stick = true; // keep the newest text in view (until the user scrolls up)

function uid() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function load() {
  let data = null;
  try { data = JSON.parse(localStorage.getItem(STORE_KEY)); } catch { /* start afresh */ }
  if (!data || !Array.isArray(data.chats)) data = { current: null, chats: [] };
  for (const chat of data.chats) {
    for (const msg of chat.messages) {
      if (msg.state === "streaming") msg.state = "stopped"; // the page closed mid-answer
    }
  }
  return data;
}

let saveTimer = null;
function save(soon = false) {
  clearTimeout(saveTimer);
  const write = () => {
    try { localStorage.setItem(STORE_KEY, JSON.stringify(store)); } catch { /* full: skip */ }
  };
  if (soon) saveTimer = setTimeout(write, 500); else write();
}

function currentChat() {
  let chat = store.chats.find((c) => c.id === store.current);
  if (!chat) {
    chat = { id: uid(), title: "New chat", updated: Date.now(), messages: [] };
    store.chats.unshift(chat);
    store.current = chat.id;
  }
  return chat;
}

// The conversation sent to the model: a failed turn (an answer that ended in an error, and the
// prompt it answered) is left out, and so is an answer stopped before its first word.
function context(messages) {
  const out = [];
  for (let i = 0; i < messages.length; i++) {
    const msg = messages[i], next = messages[i + 1];
    if (msg.role === "user" && next && next.role === "assistant" && next.state === "error") {
      i++;
      continue;
    }
    if (msg.role === "assistant" && (msg.state === "error" || !msg.content)) continue;
    out.push({ role: msg.role, content: msg.content });
  }
  return out;
}

// ---- rendering -----------------------------------------------------------------------------
if (window.DOMPurify) {
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
}

function renderMarkdown(element, text) {
  if (!window.marked || !window.DOMPurify) { element.textContent = text; return; }
  // no images: a model tricked by its input could leak the conversation in an image URL
  const html = marked.parse(text, { gfm: true });
  element.innerHTML = DOMPurify.sanitize(html, { FORBID_TAGS: ["img", "style"] });
  for (const pre of element.querySelectorAll("pre")) {
    const box = document.createElement("div");
    box.className = "codeblock";
    pre.replaceWith(box);
    box.appendChild(pre);
    const head = el("div", "codehead");
    const language = /language-(\S+)/.exec(pre.querySelector("code")?.className || "");
    head.appendChild(el("span", "", language ? language[1] : "code"));
    const copy = el("button", "copy", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => copyText(pre.innerText, copy));
    head.appendChild(copy);
    box.prepend(head);
  }
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch { // not a secure context (a LAN address over http): the old way
    const area = document.createElement("textarea");
    area.value = text; document.body.appendChild(area); area.select();
    document.execCommand("copy"); area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function render() {
  const chat = currentChat();
  for (const turn of log.querySelectorAll(".turn")) turn.remove();
  welcome.hidden = chat.messages.length > 0;
  chat.messages.forEach((msg) => log.appendChild(turnElement(chat, msg)));
  renderChats();
  stick = true;
  scroll();
}

function turnElement(chat, msg) {
  const turn = el("div", `turn ${msg.role}`);
  const bubble = el("div", "bubble");
  turn.appendChild(bubble);
  if (msg.role === "user") {
    bubble.textContent = msg.content;
  } else {
    const meta = el("div", "meta");
    turn.appendChild(meta);
    views.set(msg, { turn, bubble, meta, chat });
    update(msg);
  }
  return turn;
}

// Draw an assistant message: its text, and under it the error, the stats and the buttons.
function update(msg) {
  const view = views.get(msg);
  if (!view) return;
  const { turn, bubble, meta, chat } = view;
  turn.dataset.state = msg.state;
  if (msg.resumed) turn.dataset.resumed = String(msg.resumed);
  renderMarkdown(bubble, msg.content);
  turn.querySelector(".error")?.remove();
  meta.replaceChildren();
  const last = chat.messages[chat.messages.length - 1] === msg;
  if (msg.state === "error") {
    const error = el("div", "error");
    error.setAttribute("role", "alert");
    error.appendChild(el("span", "", msg.error));
    if (last) {
      const retry = el("button", "retry", "Retry");
      retry.type = "button";
      retry.addEventListener("click", () => regenerate(chat, msg));
      error.appendChild(retry);
    }
    turn.insertBefore(error, meta);
  }
  if (msg.stats) meta.appendChild(el("span", "stats", statsText(msg.stats)));
  if (msg.resumed) {
    const drops = msg.resumed === 1 ? "1 network drop" : `${msg.resumed} network drops`;
    meta.appendChild(el("span", "badge resumed", `resumed after ${drops}`));
  }
  if (msg.state === "stopped") meta.appendChild(el("span", "badge stopped", "stopped"));
  if (msg.state !== "streaming" && msg.state !== "error") {
    const copy = el("button", "copy-answer", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => copyText(msg.content, copy));
    meta.appendChild(copy);
    if (last) {
      const again = el("button", "regenerate", "Regenerate");
      again.type = "button";
      again.addEventListener("click", () => regenerate(chat, msg));
      meta.appendChild(again);
    }
  }
  scroll();
}

function statsText({ ttft, tokens, tps }) {
  const first = ttft < 1000 ? `${Math.round(ttft)} ms` : `${(ttft / 1000).toFixed(1)} s`;
  const parts = [`first token ${first}`];
  if (tps !== null) parts.push(`${tps.toFixed(1)} tokens/s`);
  parts.push(`${tokens} tokens`);
  return parts.join(" · ");
}

let frame = 0;
function updateSoon(msg) { // at most once per frame while tokens pour in
  if (frame) return;
  frame = requestAnimationFrame(() => { frame = 0; update(msg); });
}

function renderChats() {
  const nav = $("#chats");
  nav.replaceChildren();
  for (const chat of [...store.chats].sort((a, b) => b.updated - a.updated)) {
    if (!chat.messages.length && chat.id !== store.current) continue;
    const item = el("div", "chat-item" + (chat.id === store.current ? " current" : ""));
    const open = el("button", "open", chat.title);
    open.type = "button"; open.title = chat.title;
    open.addEventListener("click", () => {
      store.current = chat.id; save(); render(); closeMenu();
    });
    const del = el("button", "delete", "\u00d7");
    del.type = "button"; del.setAttribute("aria-label", `Delete “${chat.title}”`);
    del.addEventListener("click", () => deleteChat(chat));
    item.append(open, del);
    nav.appendChild(item);
  }
}

function deleteChat(chat) {
  if (live && live.chat === chat) stop();
  store.chats = store.chats.filter((c) => c !== chat);
  if (store.current === chat.id) store.current = store.chats[0]?.id ?? null;
  save(); render();
}

// ---- scrolling: follow the answer unless the user scrolled up ---------------------------
function scroll() {
  if (stick) log.scrollTop = log.scrollHeight;
  jump.hidden = stick;
}
log.addEventListener("scroll", () => {
  stick = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  jump.hidden = stick;
}, { passive: true });
jump.addEventListener("click", () => { stick = true; scroll(); });

// ---- the stream ----------------------------------------------------------------------------
// Parse an event stream read with fetch(): blocks end at a blank line; id, event, data fields.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
        let type = "message", id = null; const data = [];
        for (const line of block.split("\n")) {
          const colon = line.indexOf(":");
          if (colon === 0) continue; // a comment: a heartbeat
          const name = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (name === "event") type = value;
          else if (name === "data") data.push(value);
          else if (name === "id" && !value.includes("\0")) id = value;
        }
        if (data.length) yield { type, id, data: data.join("\n") };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// An error answer before the stream started: {"error": {"message": ...}}, or whatever a
// server in between sent.
async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try { return JSON.parse(text).error.message; }
  catch { return `HTTP ${response.status} ${response.statusText}`.trim(); }
}

class StreamFailed extends Error {} // the server said the answer failed: no reconnecting

function cancel(gen) { // closing a resumable stream's connection is not a cancel: this is
  if (gen.streamId) {
    fetch(`${STREAMS}/${encodeURIComponent(gen.streamId)}`, { method: "DELETE", keepalive: true })
      .catch(() => {});
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function indicate(state, text) {
  clearTimeout(indicate.timer);
  conn.hidden = !state;
  conn.dataset.state = state || "";
  conn.textContent = text || "";
  if (state === "resumed") indicate.timer = setTimeout(() => indicate(null), 3000);
}

async function generate(chat, msg) {
  const index = chat.messages.indexOf(msg);
  const body = {
    model: modelSelect.value || undefined,
    messages: context(chat.messages.slice(0, index)),
    stream: true,
    stream_options: { include_usage: true },
  };
  const gen = live = {
    chat, msg, ctrl: new AbortController(), key: uid(),
    streamId: null, lastId: null, stopped: false,
  };
  Object.assign(msg, {
    content: "", state: "streaming", error: undefined, stats: undefined, resumed: 0, model: body.model,
  });
  chat.updated = Date.now();
  save(); update(msg); busy(true);
  const started = performance.now();
  let first = null, count = 0, usage = null, failures = 0;
  try {
    for (;;) {
      let response = null;
      try {
        response = gen.streamId === null
          // a POST repeated with the same Idempotency-Key attaches to the stream it started
          ? await fetch(API, {
            method: "POST", body: JSON.stringify(body), signal: gen.ctrl.signal,
            headers: { "Content-Type": "application/json", "Idempotency-Key": gen.key },
          })
          : await fetch(`${STREAMS}/${encodeURIComponent(gen.streamId)}`, {
            headers: gen.lastId ? { "Last-Event-ID": gen.lastId } : {},
            signal: gen.ctrl.signal, cache: "no-store",
          });
      } catch { /* no answer: the network, or the server, is away */ }
      if (response && response.ok) {
        gen.streamId = response.headers.get("X-Stream-Id") || gen.streamId;
      }
      if (gen.stopped) { cancel(gen); return; } // stopped before the headers came
      let ended = false;
      if (response) {
        if (!response.ok) throw new StreamFailed(await errorMessage(response));
        if (failures) { indicate("resumed", "resumed"); failures = 0; }
        try {
          for await (const event of events(response)) {
            if (gen.stopped) return;
            if (event.id) gen.lastId = event.id;
            if (event.data === "[DONE]") { ended = true; break; }
            let chunk;
            try {
              chunk = JSON.parse(event.data);
            } catch {
              throw new StreamFailed("the server sent an event that is not JSON");
            }
            if (chunk.error) throw new StreamFailed(chunk.error.message || "the answer failed");
            for (const choice of chunk.choices || []) {
              const text = choice.delta && choice.delta.content;
              if (text) {
                first ??= performance.now();
                count++;
                msg.content += text;
              }
            }
            usage = chunk.usage || usage;
            updateSoon(msg); save(true);
          }
        } catch (err) {
          if (err instanceof StreamFailed) throw err;
          // the connection broke mid-answer: resume below
        }
      }
      if (gen.stopped) return;
      if (ended) break;
      if (++failures > MAX_RECONNECTS) {
        throw new StreamFailed("the connection to the server is lost (it did not come back after "
          + `${MAX_RECONNECTS} tries); Retry asks again`);
      }
      if (gen.streamId) msg.resumed++;
      indicate("reconnecting", `reconnecting…${failures > 1 ? ` (try ${failures})` : ""}`);
      await sleep(Math.min(250 * 2 ** (failures - 1), 8000));
      if (gen.stopped) { cancel(gen); return; }
    }
    const end = performance.now();
    const tokens = (usage && usage.completion_tokens) || count;
    const seconds = first === null ? 0 : (end - first) / 1000;
    const tps = seconds > 0 && tokens > 1 ? (tokens - 1) / seconds : null; // after the first
    msg.stats = { ttft: (first ?? end) - started, tokens, tps };
    finish(gen, "done");
  } catch (err) {
    if (gen.stopped) return;
    msg.error = err instanceof StreamFailed ? err.message : `the page failed: ${err}`;
    finish(gen, "error");
  } finally {
    gen.ctrl.abort(); // releases the connection (a no-op if it has ended)
  }
}

function finish(gen, state) {
  cancelAnimationFrame(frame); frame = 0;
  gen.msg.state = state;
  gen.chat.updated = Date.now();
  if (conn.dataset.state === "reconnecting") indicate(null);
  save(); update(gen.msg);
  if (live === gen) { live = null; busy(false); }
}

function stop() {
  const gen = live;
  if (!gen) return;
  gen.stopped = true;
  if (gen.streamId) { cancel(gen); gen.ctrl.abort(); }
  // else the POST waits for its answer's headers: generate() cancels once it has the stream's id
  finish(gen, "stopped");
}

function busy(on) {
  sendButton.hidden = on; stopButton.hidden = !on;
  sendButton.disabled = on || !prompt.value.trim();
  if (!on) prompt.focus();
}

function send(text) {
  text = text.trim();
  if (!text || live) return;
  const chat = currentChat();
  if (!chat.messages.length) chat.title = text.length > 48 ? text.slice(0, 47) + "…" : text;
  const msg = { role: "assistant", content: "", state: "streaming" };
  chat.messages.push({ role: "user", content: text }, msg);
  prompt.value = ""; grow();
  render();
  generate(chat, msg);
}

function regenerate(chat, msg) {
  if (live) return;
  const fresh = { role: "assistant", content: "", state: "streaming" };
  chat.messages.splice(chat.messages.indexOf(msg), 1, fresh);
  render();
  generate(chat, fresh);
}

// ---- controls ------------------------------------------------------------------------------
function grow() {
  prompt.style.height = "auto";
  prompt.style.height = Math.min(prompt.scrollHeight + 2, 192) + "px";
  sendButton.disabled = !!live || !prompt.value.trim();
}

form.addEventListener("submit", (event) => { event.preventDefault(); send(prompt.value); });
prompt.addEventListener("input", grow);
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send(prompt.value);
  }
});
stopButton.addEventListener("click", stop);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") { if (live) stop(); closeMenu(); }
});
for (const chip of document.querySelectorAll(".chip")) {
  chip.addEventListener("click", () => send(chip.textContent));
}
$("#new-chat").addEventListener("click", () => {
  const chat = currentChat();
  if (chat.messages.length) { store.current = null; currentChat(); }
  save(); render(); closeMenu(); prompt.focus();
});
function closeMenu() { document.body.classList.remove("menu-open"); }
$("#menu").addEventListener("click", () => document.body.classList.toggle("menu-open"));
$("#scrim").addEventListener("click", closeMenu);

// leaving the page stops its answer: a resumable stream would otherwise go on upstream
window.addEventListener("pagehide", () => { if (live) stop(); });

// ---- theme ---------------------------------------------------------------------------------
function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
}
const dark = matchMedia("(prefers-color-scheme: dark)");
applyTheme(localStorage.getItem("streamplus.theme") || (dark.matches ? "dark" : "light"));
dark.addEventListener("change", (e) => {
  if (!localStorage.getItem("streamplus.theme")) applyTheme(e.matches ? "dark" : "light");
});
$("#theme").addEventListener("click", () => {
  const theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  localStorage.setItem("streamplus.theme", theme);
  applyTheme(theme);
});

// ---- models: the upstream's GET /v1/models, proxied by the example -----------------------
async function loadModels() {
  const saved = localStorage.getItem("streamplus.model");
  let ids = [];
  try {
    const response = await fetch("/v1/models");
    if (response.ok) ids = ((await response.json()).data || []).map((m) => m.id).filter(Boolean);
  } catch { /* offline: the upstream picks */ }
  modelSelect.replaceChildren();
  if (!ids.length) modelSelect.appendChild(new Option("(the upstream's default)", ""));
  for (const id of ids.sort()) modelSelect.appendChild(new Option(id, id));
  if (saved && ids.includes(saved)) modelSelect.value = saved;
}
modelSelect.addEventListener("change", () => {
  localStorage.setItem("streamplus.model", modelSelect.value);
});

render();
busy(false);
loadModels();
