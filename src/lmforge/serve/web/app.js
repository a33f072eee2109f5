// The chat page: keeps the conversation in memory, streams replies from /v1/chat/completions (server-sent
// events), renders them as markdown, and stops a reply on request (aborting the fetch frees the server's slot).
// Settings (system prompt, temperature, max tokens, API key, language) persist in localStorage.
"use strict";

const STRINGS = {
  en: {
    newChat: "New chat", settings: "Settings", system: "System prompt", temperature: "Temperature",
    maxTokens: "Max tokens", apiKey: "API key (if the server needs one)", hello: "What can I help with?",
    helloSub: "Replies stream from the model running on this server. Nothing leaves this machine.",
    placeholder: "Message… (Enter to send, Shift+Enter for a new line)", send: "Send", stop: "Stop",
    systemHint: "e.g. You are a concise assistant.", you: "You", stopped: "stopped", copy: "copy", copied: "copied",
    error: "Error", tokens: "tokens", lang: "中文",
  },
  zh: {
    newChat: "新对话", settings: "设置", system: "系统提示词", temperature: "温度", maxTokens: "最大生成长度",
    apiKey: "API 密钥（服务器要求时填写）", hello: "有什么可以帮你？",
    helloSub: "回复由本服务器上运行的模型流式生成，数据不会离开这台机器。",
    placeholder: "输入消息…（Enter 发送，Shift+Enter 换行）", send: "发送", stop: "停止",
    systemHint: "例如：你是一个简洁的助手。", you: "你", stopped: "已停止", copy: "复制", copied: "已复制",
    error: "错误", tokens: "词元", lang: "English",
  },
};

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null, model: null };
const saved = JSON.parse(localStorage.getItem("lmforge") || "{}");
let lang = saved.lang || ((navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en");
const t = (key) => STRINGS[lang][key] || key;

function applyLanguage() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("lang").textContent = t("lang");
  $("send").textContent = state.controller ? t("stop") : t("send");
  document.querySelectorAll("[data-copy]").forEach((b) => { b.textContent = t("copy"); });
}

function save() {
  const s = { lang, system: $("system").value, temperature: $("temperature").value, maxTokens: $("max-tokens").value,
    apiKey: $("api-key").value };
  localStorage.setItem("lmforge", JSON.stringify(s));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api-key").value) h.Authorization = `Bearer ${$("api-key").value}`;
  return h;
}

function addMessage(role, text) {
  $("empty").hidden = true;
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.innerHTML = `<div class="bubble"></div><div class="meta"></div>`;
  const bubble = el.querySelector(".bubble");
  if (role === "user") bubble.textContent = text;
  else bubble.innerHTML = Markdown.render(text);
  $("log").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (r.ok) { state.model = body.data[0].id; $("model").textContent = state.model; }
    else if (r.status === 401) { $("settings").hidden = false; $("api-key").focus(); }
  } catch (e) { /* the server is down; sending will say so */ }
}

// Parse a server-sent-events body, calling onData with each `data:` payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) onData(line.slice(6));
    }
  }
}

async function send(text) {
  if (!state.model) await loadModel();
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const el = addMessage("assistant", "");
  el.classList.add("streaming");
  const bubble = el.querySelector(".bubble");
  const meta = el.querySelector(".meta");
  const system = $("system").value.trim();
  const body = {
    model: state.model, stream: true, stream_options: { include_usage: true },
    messages: (system ? [{ role: "system", content: system }] : []).concat(state.messages),
    temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max-tokens").value, 10) || undefined,
  };
  state.controller = new AbortController();
  $("send").textContent = t("stop");
  $("send").classList.add("stop");
  let reply = "";
  let pending = false;
  const started = performance.now();
  const paint = () => {  // at most one markdown render per animation frame, however fast tokens arrive
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; bubble.innerHTML = Markdown.render(reply); el.scrollIntoView({ block: "end" }); });
  };
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal });
    if (!r.ok) throw new Error((await r.json()).error?.message || r.statusText);
    await readEvents(r, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        const secs = (performance.now() - started) / 1000;
        meta.textContent = `${chunk.usage.completion_tokens} ${t("tokens")} · ${(chunk.usage.completion_tokens / secs).toFixed(1)} tok/s`;
      }
      const delta = chunk.choices?.[0]?.delta;
      if (delta?.content) { reply += delta.content; paint(); }
    });
  } catch (e) {
    if (e.name === "AbortError") meta.textContent = t("stopped");
    else { el.classList.add("error"); meta.textContent = `${t("error")}: ${e.message}`; }
  } finally {
    bubble.innerHTML = Markdown.render(reply);
    el.classList.remove("streaming");
    if (reply) state.messages.push({ role: "assistant", content: reply });
    else state.messages.pop();  // nothing came back: let the user resend this turn
    state.controller = null;
    $("send").textContent = t("send");
    $("send").classList.remove("stop");
    applyLanguage();
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  document.querySelectorAll("#log .msg").forEach((m) => m.remove());
  $("empty").hidden = false;
  $("input").focus();
}

function init() {
  $("system").value = saved.system || "";
  $("temperature").value = saved.temperature || "0.7";
  $("temp-out").textContent = $("temperature").value;
  $("max-tokens").value = saved.maxTokens || "1024";
  $("api-key").value = saved.apiKey || "";
  applyLanguage();
  ["system", "temperature", "max-tokens", "api-key"].forEach((id) => $(id).addEventListener("change", save));
  $("temperature").addEventListener("input", () => { $("temp-out").textContent = $("temperature").value; });
  $("api-key").addEventListener("change", loadModel);
  $("lang").addEventListener("click", () => { lang = lang === "zh" ? "en" : "zh"; save(); applyLanguage(); });
  $("toggle-settings").addEventListener("click", () => { $("settings").hidden = !$("settings").hidden; });
  $("new-chat").addEventListener("click", newChat);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.controller) { state.controller.abort(); return; }
    const text = $("input").value.trim();
    if (!text) return;
    $("input").value = "";
    $("input").style.height = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    // isComposing: Enter that confirms a Chinese IME candidate must not send the message.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("input").addEventListener("input", () => {
    $("input").style.height = "";
    $("input").style.height = `${Math.min($("input").scrollHeight, 200)}px`;
  });
  $("log").addEventListener("click", (e) => {
    const button = e.target.closest("[data-copy]");
    if (!button) return;
    navigator.clipboard?.writeText(button.closest(".code").querySelector("code").textContent);
    button.textContent = t("copied");
    setTimeout(() => { button.textContent = t("copy"); }, 1200);
  });
  loadModel();
}

init();
