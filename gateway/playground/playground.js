// The Taxiway playground: the server's own OpenAI-compatible API, called like any client would.
// No framework and nothing fetched but the API: the page must work on an offline machine.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "taxiway.playground.apiKey";
const state = { key: localStorage.getItem(KEY_STORAGE) || "", history: [], controller: null, keysOn: false };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// -- the API ---------------------------------------------------------------------------------

function headers() {
  const h = { "content-type": "application/json" };
  if (state.key) h.authorization = "Bearer " + state.key;
  return h;
}

// The error body is OpenAI's {"error": {"message": ...}}: show the server's own words.
async function errorFrom(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return new ApiError(response.status, body.error.message);
  } catch (_) { /* not JSON: fall through */ }
  return new ApiError(response.status, `${response.status} ${response.statusText}${text ? ": " + text : ""}`);
}

async function api(path, body, signal) {
  const init = body === undefined ? { headers: headers(), signal } : { method: "POST", headers: headers(), body: JSON.stringify(body), signal };
  const response = await fetch(path, init);
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// Server-sent events from a streamed completion: yields each JSON chunk until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// -- errors and the key ----------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function needKey(error) {
  if (error.status === 401 || error.status === 403) {
    state.keysOn = true;
    $("key-row").hidden = false;
  }
}

// -- models ----------------------------------------------------------------------------------

function fillSelect(select, cards) {
  const previous = select.value;
  select.replaceChildren(...cards.map((card) => {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.root && card.root !== card.id ? `${card.id} → ${card.root}` : card.id;
    return option;
  }));
  if (cards.some((c) => c.id === previous)) select.value = previous;
  else {
    const first = cards.find((c) => !c.root || c.root === c.id);  // a model rather than an alias
    if (first) select.value = first.id;
  }
}

let modelPoll = null;

async function loadModels() {
  clearTimeout(modelPoll);
  let cards;
  try {
    cards = (await (await api("/v1/models")).json()).data;
  } catch (error) {
    needKey(error);
    showError(error.message);
    return;
  }
  showError("");
  const serves = (card, endpoint) => (card.endpoints || []).includes(endpoint);
  const unknown = (card) => !card.endpoints || card.endpoints.length === 0;  // still loading
  const chat = cards.filter((c) => serves(c, "/v1/chat/completions") || unknown(c));
  const embed = cards.filter((c) => serves(c, "/v1/embeddings"));
  fillSelect($("model"), chat);
  fillSelect($("embed-model"), embed);
  $("tab-embeddings").hidden = embed.length === 0;
  // a model still loading says what it serves once loaded: ask again
  if (cards.some(unknown)) modelPoll = setTimeout(loadModels, 2000);
}

// -- chat ------------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(body);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function numberOr(id, fallback) {
  const value = parseFloat($(id).value);
  return Number.isFinite(value) ? value : fallback;
}

function requestBody(messages) {
  const body = {
    model: $("model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberOr("temperature", 0.7),
    top_p: numberOr("top-p", 1),
    max_tokens: Math.round(numberOr("max-tokens", 256)),
  };
  const stop = $("stop").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) body.stop = stop;
  return body;
}

function showStats(div, { ttft, tokensPerSecond, usage }) {
  const stats = document.createElement("span");
  stats.className = "stats";
  const parts = [];
  if (ttft !== null) parts.push(`TTFT <b data-ttft>${ttft.toFixed(2)} s</b>`);
  if (tokensPerSecond !== null) parts.push(`<b data-tps>${tokensPerSecond.toFixed(1)}</b> tokens/s`);
  if (usage) {
    parts.push(`usage <span data-usage>${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens</span>`);
  }
  stats.innerHTML = parts.join(" · ");
  div.append(stats);
}

async function send(text) {
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history, { role: "user", content: text }];
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  const content = answer.querySelector(".content");
  setBusy(true);
  state.controller = new AbortController();
  const started = performance.now();
  let first = null, last = null, usage = null, reply = "", chunks = 0;
  try {
    const response = await api("/v1/chat/completions", requestBody(messages), state.controller.signal);
    for await (const chunk of events(response)) {
      if (chunk.error) throw new ApiError(0, chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        last = performance.now();
        if (first === null) first = last;
        chunks += 1;
        reply += delta.content;
        content.textContent = reply;
        answer.scrollIntoView({ block: "end" });
      }
    }
    state.history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    showError("");
  } catch (error) {
    if (error.name === "AbortError") {
      reply += " [stopped]";
      content.textContent = reply;
    } else {
      needKey(error);
      answer.classList.add("failed");
      content.textContent = error.message;
      showError(error.message);
    }
  } finally {
    setBusy(false);
    state.controller = null;
  }
  if (first !== null) {
    // decode rate: tokens after the first over the time after the first (TTFT is shown apart)
    const tokens = usage ? usage.completion_tokens : chunks;
    const seconds = (last - first) / 1000;
    showStats(answer, {
      ttft: (first - started) / 1000,
      tokensPerSecond: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null,
      usage,
    });
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop-button").hidden = !busy;
}

// -- embeddings ------------------------------------------------------------------------------

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / Math.sqrt(na * nb);
}

async function embed() {
  const inputs = $("embed-input").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const out = $("embed-result");
  out.replaceChildren();
  if (!inputs.length) return;
  $("embed-send").disabled = true;
  const started = performance.now();
  try {
    const body = await (await api("/v1/embeddings", { model: $("embed-model").value, input: inputs })).json();
    const seconds = (performance.now() - started) / 1000;
    const vectors = body.data.map((d) => d.embedding);
    const summary = document.createElement("p");
    summary.id = "embed-summary";
    summary.textContent = `${vectors.length} vectors of ${vectors[0].length} dimensions in ${seconds.toFixed(2)} s` +
      (body.usage ? ` · usage ${body.usage.prompt_tokens} tokens` : "");
    const table = document.createElement("table");
    const head = table.insertRow();
    head.insertCell().outerHTML = "<th>cosine</th>";
    inputs.forEach((_, j) => { head.insertCell().outerHTML = `<th>${j + 1}</th>`; });
    vectors.forEach((a, i) => {
      const row = table.insertRow();
      const label = document.createElement("th");
      label.textContent = `${i + 1}. ${inputs[i].slice(0, 40)}`;
      row.append(label);
      vectors.forEach((b) => { row.insertCell().textContent = cosine(a, b).toFixed(3); });
    });
    out.append(summary, table);
    showError("");
  } catch (error) {
    needKey(error);
    showError(error.message);
  } finally {
    $("embed-send").disabled = false;
  }
}

// -- wiring ----------------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of document.querySelectorAll("nav button")) {
    const selected = tab.dataset.panel === name;
    tab.setAttribute("aria-selected", String(selected));
    $(`panel-${tab.dataset.panel}`).hidden = !selected;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.key;
  if (state.key) $("key-row").hidden = false;
  $("key-apply").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    localStorage.setItem(KEY_STORAGE, state.key);
    loadModels();
  });
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") $("key-apply").click(); });
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop-button").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); });
  $("embed-send").addEventListener("click", embed);
  for (const tab of document.querySelectorAll("nav button")) tab.addEventListener("click", () => selectTab(tab.dataset.panel));
  if (window.matchMedia("(max-width: 600px)").matches) $("settings").open = false;
  loadModels();
});
