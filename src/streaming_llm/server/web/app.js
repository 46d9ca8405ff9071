// streaming-llm web chat: plain JS over the public API (no build step, no dependencies).
// Conversations are server sessions (ids kept in localStorage); replies stream over SSE
// (fetch + ReadableStream); the stream panel draws the session's cache: sinks | window | free.
"use strict";

const CONFIG = JSON.parse(document.getElementById("server-config").textContent);
const LS = { key: "sl.apiKey", sessions: "sl.sessions", current: "sl.current", stats: "sl.stats." };
const $ = (id) => document.getElementById(id);

const state = {
  sessions: loadJSON(LS.sessions, []),   // [{id, title, created}] newest first
  current: localStorage.getItem(LS.current),
  messages: [],                           // the current session's transcript
  stats: null,                            // last known numbers for the current session
  busy: false,
  abort: null,
};

function loadJSON(name, fallback) {
  try { const v = JSON.parse(localStorage.getItem(name)); return v ?? fallback; } catch { return fallback; }
}
function saveSessions() { localStorage.setItem(LS.sessions, JSON.stringify(state.sessions)); }
function newId() {
  const a = new Uint8Array(8); crypto.getRandomValues(a);
  return "web-" + Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(LS.key);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function apiError(resp) {
  let msg = `HTTP ${resp.status}`;
  try { const body = await resp.json(); if (body.error) msg += ": " + body.error.message; } catch { /* not JSON */ }
  if (resp.status === 401) msg += " (enter the server's API key in the sidebar)";
  return new Error(msg);
}
function showError(err) {
  const box = $("error");
  box.hidden = !err; box.textContent = err ? String(err.message || err) : "";
  if (err && /HTTP 401/.test(box.textContent)) $("api-key").focus();
}

// ---- sessions list ---------------------------------------------------------------------------
function renderSessions() {
  const ul = $("sessions"); ul.replaceChildren();
  for (const s of state.sessions) {
    const li = document.createElement("li");
    li.dataset.id = s.id; if (s.id === state.current) li.className = "active";
    const name = document.createElement("span"); name.className = "name"; name.textContent = s.title || "New conversation";
    name.title = s.id;
    const del = document.createElement("button"); del.className = "del"; del.textContent = "\u00d7"; del.title = "Delete this conversation";
    del.onclick = (e) => { e.stopPropagation(); deleteSession(s.id); };
    li.append(name, del); li.onclick = () => selectSession(s.id);
    ul.append(li);
  }
  const cur = state.sessions.find((s) => s.id === state.current);
  $("session-title").textContent = cur && cur.title ? cur.title : "New conversation";
}
function newSession() {
  if (state.busy) return;
  const cur = state.sessions.find((s) => s.id === state.current);
  if (cur && !cur.title && state.messages.length === 0) { $("prompt").focus(); return; } // reuse an empty one
  const s = { id: newId(), title: "", created: Date.now() };
  state.sessions.unshift(s); saveSessions();
  selectSession(s.id);
}
async function selectSession(id) {
  if (state.busy) return;
  state.current = id; localStorage.setItem(LS.current, id);
  state.messages = []; state.stats = loadJSON(LS.stats + id, null);
  renderSessions(); renderMessages(); renderStats();
  await loadSession(id);
  $("prompt").focus();
}
async function loadSession(id) {
  showError(null);
  let resp;
  try { resp = await fetch(`/v1/sessions/${encodeURIComponent(id)}`, { headers: headers() }); }
  catch (e) { showError(e); return; }
  if (id !== state.current) return;
  if (resp.status === 404) { state.messages = []; state.stats = null; localStorage.removeItem(LS.stats + id); renderMessages(); renderStats(); return; }  // not used yet (or expired)
  if (!resp.ok) { showError(await apiError(resp)); return; }
  const info = await resp.json();
  state.messages = (info.messages || []).map((m) => ({ role: m.role, content: m.content }));
  const capacity = (state.stats && state.stats.capacity) || CONFIG.sinks + CONFIG.window;
  const seen = info.tokens_seen ?? 0;
  // the cache holds min(tokens seen, sinks + window): the engine's rule
  state.stats = Object.assign({}, state.stats, { tokens_seen: seen, capacity, turns: info.turns,
    cache_tokens: Math.min(seen, capacity), in_memory: info.in_memory });
  const s = state.sessions.find((x) => x.id === id);
  if (s && !s.title) { const first = state.messages.find((m) => m.role === "user"); if (first) { s.title = titleOf(first.content); saveSessions(); renderSessions(); } }
  renderMessages(); renderStats();
}
async function deleteSession(id) {
  if (state.busy) return;
  try {
    const resp = await fetch(`/v1/sessions/${encodeURIComponent(id)}`, { method: "DELETE", headers: headers() });
    if (!resp.ok && resp.status !== 404) { showError(await apiError(resp)); return; }
  } catch (e) { showError(e); return; }
  state.sessions = state.sessions.filter((s) => s.id !== id); saveSessions();
  localStorage.removeItem(LS.stats + id);
  if (state.current === id) {
    if (state.sessions.length) selectSession(state.sessions[0].id);
    else { state.current = null; newSession(); }
  } else renderSessions();
}
const titleOf = (text) => (text.length > 40 ? text.slice(0, 40) + "\u2026" : text);

// ---- messages --------------------------------------------------------------------------------
function bubble(role, text, chunks) {
  const div = document.createElement("div");
  div.className = "msg " + role; div.dataset.role = role; div.textContent = text;
  if (chunks != null) div.dataset.chunks = String(chunks);  // SSE chunks it streamed in (this page's replies)
  return div;
}
function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...state.messages.map((m) => bubble(m.role, m.content, m.chunks)));
  box.scrollTop = box.scrollHeight;
}

// ---- the stream panel ------------------------------------------------------------------------
const fmt = (n) => (n == null ? "-" : Number(n).toLocaleString("en-US"));
function renderStats(live) {
  const st = state.stats || {};
  const capacity = st.capacity || CONFIG.sinks + CONFIG.window;
  const seen = st.tokens_seen || 0;
  const cache = st.cache_tokens ?? Math.min(seen, capacity);
  const sinks = Math.min(CONFIG.sinks ?? 0, cache);
  const windowFill = cache - sinks;
  const pct = (n) => (capacity ? (100 * n) / capacity : 0) + "%";
  $("bar-sinks").style.width = pct(sinks);
  $("bar-window").style.width = pct(windowFill);
  $("bar-free").style.width = pct(Math.max(0, capacity - cache));
  $("stat-sinks").textContent = `${sinks}/${CONFIG.sinks ?? "?"}`;
  $("stat-window").textContent = `${fmt(windowFill)}/${fmt(CONFIG.window)}`;
  $("stat-cache").textContent = `${fmt(cache)}/${fmt(capacity)}`;
  $("stat-seen").textContent = fmt(seen);
  $("stat-evicted").textContent = fmt(Math.max(0, seen - cache));
  $("stat-speed").textContent = st.tok_s ? `${st.tok_s.toFixed(1)} tok/s (${st.ms_per_token.toFixed(0)} ms/token)` : "-";
  $("stat-ttft").textContent = st.ttft_ms != null ? `${st.ttft_ms.toFixed(0)} ms` : "-";
  $("stat-turns").textContent = fmt(st.turns || 0);
  let note = "";
  if (live) note = `streaming: ${live.tokens} tokens so far (numbers are estimates until the reply ends)`;
  else if (st.prefilled_tokens != null)
    note = `last turn: ${fmt(st.prefilled_tokens)} prompt tokens prefilled, ${fmt(st.completion_tokens)} generated` +
      (st.loaded_from ? `, session from ${st.loaded_from}` : "") + (st.snapshot_bytes ? `, snapshot ${(st.snapshot_bytes / 1e6).toFixed(1)} MB` : "");
  $("stat-note").textContent = note;
  document.body.dataset.tokensSeen = String(seen);
}

// ---- sending: POST /v1/chat/completions, stream: true ---------------------------------------
async function send(text) {
  if (state.busy || !text.trim()) return;
  if (!state.current) newSession();
  const id = state.current;
  showError(null);
  const s = state.sessions.find((x) => x.id === id);
  if (s && !s.title) { s.title = titleOf(text); saveSessions(); renderSessions(); }
  state.messages.push({ role: "user", content: text });
  renderMessages();
  const out = bubble("assistant", ""); out.classList.add("streaming");
  $("messages").append(out);
  setBusy(true);
  const base = Object.assign({}, state.stats || {});
  const t0 = performance.now();
  let first = null, last = null, tokens = 0, reply = "", session = null, usage = null;
  const controller = new AbortController(); state.abort = controller;
  try {
    // session_append: the server keeps the conversation; only the new message is sent (and prefilled)
    const body = { model: CONFIG.model, messages: [{ role: "user", content: text }], stream: true,
      stream_options: { include_usage: true }, session_id: id, session_append: true };
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!resp.ok) throw await apiError(resp);
    for await (const event of sseEvents(resp.body)) {
      if (event === "[DONE]") break;
      const chunk = JSON.parse(event);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      if (chunk.session) session = chunk.session;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        const now = performance.now(); if (first === null) first = now; last = now;
        tokens += 1; reply += delta.content; out.textContent = reply; out.dataset.chunks = String(tokens);
        $("messages").scrollTop = $("messages").scrollHeight;
        // live estimate: what the stream had seen plus the tokens generated so far
        const seen = (base.tokens_seen || 0) + tokens, capacity = base.capacity || CONFIG.sinks + CONFIG.window;
        state.stats = Object.assign({}, base, { tokens_seen: seen, cache_tokens: Math.min(seen, capacity),
          ttft_ms: first - t0, ...speed(first, last, tokens) });
        renderStats({ tokens });
      }
    }
    state.messages.push({ role: "assistant", content: reply, chunks: tokens });
    if (session) {
      const n = usage ? usage.completion_tokens : tokens;
      state.stats = { tokens_seen: session.tokens_seen, cache_tokens: session.cache_tokens, capacity: session.capacity,
        turns: session.turns, prefilled_tokens: session.prefilled_tokens, completion_tokens: n,
        loaded_from: session.loaded_from, snapshot_bytes: session.snapshot_bytes,
        ttft_ms: first !== null ? first - t0 : null, ...speed(first, last, n) };
      localStorage.setItem(LS.stats + id, JSON.stringify(state.stats));
    }
  } catch (e) {
    if (e.name === "AbortError") { state.messages.push({ role: "assistant", content: reply }); showError(new Error("stopped: this reply was not stored by the server (the session keeps its previous turn)")); await loadSession(id); }
    else { state.messages.pop(); showError(e); out.remove(); }
  } finally {
    out.classList.remove("streaming");
    state.abort = null; setBusy(false);
    if (state.current === id) { renderMessages(); renderStats(); }
  }
}
function speed(first, last, n) {
  if (first === null || n < 2 || last <= first) return {};
  const ms = (last - first) / (n - 1);  // between tokens: the prefill is in the first-token time
  return { tok_s: 1000 / ms, ms_per_token: ms };
}
// Server-sent events from a fetch body: yields each event's data ("data: ..." lines joined).
async function* sseEvents(stream) {
  const reader = stream.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const raw = buf.slice(0, cut); buf = buf.slice(cut + 2);
      const data = raw.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}
function setBusy(busy) {
  state.busy = busy; document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy; $("stop").hidden = !busy; $("new-chat").disabled = busy;
}

// ---- wiring ----------------------------------------------------------------------------------
$("composer").addEventListener("submit", (e) => { e.preventDefault(); const t = $("prompt").value; if (t.trim() && !state.busy) { $("prompt").value = ""; send(t); } });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); } });
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("new-chat").addEventListener("click", newSession);
$("api-key").value = localStorage.getItem(LS.key) || "";
$("api-key").addEventListener("change", (e) => {
  const v = e.target.value.trim();
  if (v) localStorage.setItem(LS.key, v); else localStorage.removeItem(LS.key);
  if (state.current) loadSession(state.current);
});
$("model-name").textContent = `${CONFIG.model} \u00b7 ${CONFIG.method || "streaming"} \u00b7 ${CONFIG.sinks} sinks + ${CONFIG.window} window`;
setBusy(false);
if (state.current && state.sessions.some((s) => s.id === state.current)) selectSession(state.current);
else if (state.sessions.length) selectSession(state.sessions[0].id);
else newSession();
