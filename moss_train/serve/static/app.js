// moss-serve's chat page: talks to this server's /v1 API (OpenAI's chat completions, streamed
// as server-sent events) and shows each turn's inner thoughts, commands and tool results in
// their own panel above the reply. Plain JS, no dependencies; model text only ever goes into
// the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["temperature", "top_p", "max_tokens", "seed", "api_key"];
const state = { models: [], messages: [], controller: null };

// ------------------------------------------------------------------ settings and models
function restoreSettings() {
  for (const name of SETTINGS) {
    const saved = localStorage.getItem("moss." + name);
    if (saved !== null) $(name).value = saved;
    $(name).addEventListener("change", () => localStorage.setItem("moss." + name, $(name).value));
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, bad) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", !!bad);
}

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (error) {
    setStatus("cannot reach the server: " + error.message, true);
    return;
  }
  if (response.status === 401) {
    setStatus("this server needs an API key: enter it under Server", true);
    return;
  }
  const body = await response.json();
  state.models = body.data || [];
  const select = $("model");
  const previous = select.value || localStorage.getItem("moss.model");
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  if (state.models.some((m) => m.id === previous)) select.value = previous;
  setStatus(state.models.length + " model(s) served");
  showModelOptions();
}

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

function showModelOptions() {
  const model = currentModel();
  if (!model) return;
  localStorage.setItem("moss.model", model.id);
  const box = $("plugins");
  box.replaceChildren();
  for (const name of model.moss.plugins) {
    const label = document.createElement("label");
    const check = document.createElement("input");
    check.type = "checkbox";
    check.checked = true;
    check.value = name;
    check.dataset.plugin = name;
    label.append(check, " " + name);
    box.append(label);
  }
  if (!model.moss.plugins.length) box.innerHTML = '<p class="hint">none loaded</p>';
  const levels = model.moss.quality_levels;
  $("quality-box").hidden = !levels;
  const quality = $("quality");
  quality.replaceChildren();
  if (levels) {
    quality.append(new Option("best (" + levels + "/" + levels + ")", "best"));
    for (let level = levels; level >= 1; level--) quality.append(new Option(level + "/" + levels, level + "/" + levels));
  }
}

// ------------------------------------------------------------------ the conversation
function addUserTurn(text) {
  $("empty").hidden = true;
  const turn = document.createElement("article");
  turn.className = "turn user";
  turn.textContent = text;
  $("log").append(turn);
  return turn;
}

function addAssistantTurn() {
  const turn = $("assistant-turn").content.firstElementChild.cloneNode(true);
  $("log").append(turn);
  return turn;
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

function requestBody(text) {
  const body = {
    model: $("model").value,
    messages: [...state.messages, { role: "user", content: text }],
    stream: true,
    stream_options: { include_usage: true },
    plugins: [...document.querySelectorAll("#plugins input:checked")].map((c) => c.value),
  };
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    const value = $(name).value.trim();
    if (value !== "") body[name] = Number(value);
  }
  if (!$("quality-box").hidden) body.quality = $("quality").value;
  return body;
}

// One turn as the stream delivers it; `moss` is what goes back into the history.
function turnView(element) {
  const view = {
    element, reply: "", moss: { inner_thoughts: "", commands: "", results: [] }, deltas: 0,
    thoughts: element.querySelector(".thoughts"),
    commands: element.querySelector(".commands"),
    calls: element.querySelector(".tool-calls"),
    replyBox: element.querySelector(".reply"),
    note: element.querySelector(".note"),
  };
  view.apply = (delta) => {
    if (delta.content) {
      view.reply += delta.content;
      view.replyBox.textContent = view.reply;
      view.deltas += 1;
      element.dataset.deltas = view.deltas;
    }
    const moss = delta.moss || {};
    if (moss.inner_thoughts) view.thoughts.textContent = view.moss.inner_thoughts += moss.inner_thoughts;
    if (moss.commands) view.commands.textContent = view.moss.commands += moss.commands;
    for (const call of moss.results || []) {
      view.moss.results.push(call);
      const item = document.createElement("li");
      const command = document.createElement("code");
      command.className = "command";
      command.textContent = call.command;
      const result = document.createElement("code");
      result.className = "result";
      result.textContent = call.result;
      item.append(command, " → ", result);
      if (call.error) {
        const why = document.createElement("span");
        why.className = "error";
        why.textContent = " (" + call.error + ")";
        item.append(why);
      }
      view.calls.append(item);
    }
  };
  return view;
}

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onEvent(line.slice(6));
      }
    }
  }
}

async function send(text) {
  const body = requestBody(text);
  addUserTurn(text);
  const element = addAssistantTurn();
  const view = turnView(element);
  element.dataset.state = "streaming";
  scrollDown();
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  let finish = null, usage = null, failure = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || response.status + " " + response.statusText);
    }
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) { failure = chunk.error.message; return; }
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        view.apply(choice.delta || {});
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      scrollDown();
    });
  } catch (error) {
    failure = error.name === "AbortError" ? "stopped" : error.message;
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").hidden = true;
  }
  if (!view.moss.inner_thoughts) view.thoughts.textContent = "—";
  if (!view.moss.commands) view.commands.textContent = "—";
  if (!view.moss.results.length) view.calls.replaceChildren(Object.assign(document.createElement("li"), { textContent: "no tool was called", className: "hint" }));
  if (failure) {
    element.dataset.state = "error";
    view.note.textContent = failure;
    view.note.classList.add("bad");
    return;
  }
  element.dataset.state = "done";
  view.note.textContent = (finish === "length" ? "cut off (max tokens) · " : "") +
    (usage ? usage.completion_tokens + " tokens" : "");
  state.messages.push({ role: "user", content: text }, { role: "assistant", content: view.reply, moss: view.moss });
}

function reset() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("log").replaceChildren($("empty"));
  $("empty").hidden = false;
  $("input").focus();
}

// ------------------------------------------------------------------ wiring
function toggleSettings() {
  const phone = window.matchMedia("(max-width: 760px)").matches;
  const panel = $("settings");
  const open = phone ? panel.classList.toggle("open") : !panel.classList.toggle("closed");
  $("toggle-settings").setAttribute("aria-expanded", String(open));
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("reset").addEventListener("click", reset);
$("model").addEventListener("change", () => { showModelOptions(); reset(); });
$("toggle-settings").addEventListener("click", toggleSettings);
$("api_key").addEventListener("change", loadModels);
restoreSettings();
loadModels();
