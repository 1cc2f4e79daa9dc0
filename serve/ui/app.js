// The serve.openai playground: chat, compare and adapters over the server's public API (the same routes as any
// client). No framework, no build step, nothing from the network. Model output is only ever set as textContent.
"use strict";

(() => {
  const KEY_STORE = "minimind.apiKey"; // sessionStorage: this tab only, gone when it closes
  const LANG_STORE = "minimind.lang";
  // Mix weights: the server reads signed mixes ("a+-0.5*b" takes half of b away), 0 leaves an adapter out.
  const MIN_WEIGHT = -1, MAX_WEIGHT = 2, WEIGHT_STEP = 0.05;
  const MAX_COLUMNS = 4, MIN_COLUMNS = 2;

  const I18N = {
    en: {
      "playground": "playground", "tab.chat": "Chat", "tab.compare": "Compare", "tab.adapters": "Adapters",
      "models.title": "Models", "models.base": "base", "models.always": "always on",
      "models.mix": "Model string (the API's model)", "models.off": "All off", "copy": "Copy", "copied": "Copied",
      "models.weight": "weight of {name}",
      "settings.title": "Settings", "settings.temperature": "Temperature", "settings.max_tokens": "Max new tokens",
      "settings.history": "History rounds", "settings.thinking": "Thinking", "settings.seed": "Seed",
      "settings.random": "random",
      "chat.model": "Model", "chat.clear": "Clear", "chat.empty": "Pick a mix on the left, then say hello.",
      "chat.placeholder": "Message MiniMind (Enter sends, Shift+Enter: new line)",
      "send": "Send", "stop": "Stop", "msg.you": "You", "msg.thinking": "Thinking", "msg.stopped": "stopped",
      "msg.error": "error",
      "compare.placeholder": "One prompt, sent to every column at once",
      "compare.hint": "2 to 4 models: a name or a mix such as a+0.5*b", "compare.add": "+ Model",
      "compare.remove": "Remove", "compare.model": "model {n}",
      "adapters.server": "Server", "adapters.loaded": "Loaded", "adapters.available": "In --lora_dir",
      "adapters.nodir": "Start the server with --lora_dir DIR to load adapter files from here.",
      "adapters.none": "No adapter is loaded.", "adapters.nofiles": "No adapter files in --lora_dir.",
      "adapters.load": "Load", "adapters.unload": "Unload", "adapters.loaded_as": "loaded as {name}",
      "adapters.name": "name", "adapters.done_load": "Loaded {name}.", "adapters.done_unload": "Unloaded {name}.",
      "metrics.active": "Active slots", "metrics.queue": "Queue", "metrics.tps": "Tokens/s (decode)",
      "metrics.tokens": "Tokens served", "metrics.occupancy": "Batch occupancy", "metrics.requests": "Requests",
      "key.title": "API key",
      "key.text": "This server wants an API key. It is kept in this browser tab only (session storage) and sent only to this server.",
      "key.submit": "Continue", "key.forget": "Forget key",
    },
    zh: {
      "playground": "在线体验", "tab.chat": "对话", "tab.compare": "对比", "tab.adapters": "适配器",
      "models.title": "模型", "models.base": "基座", "models.always": "始终启用",
      "models.mix": "模型字符串（API 的 model 参数）", "models.off": "全部关闭", "copy": "复制", "copied": "已复制",
      "models.weight": "{name} 的权重",
      "settings.title": "参数", "settings.temperature": "温度", "settings.max_tokens": "最大生成长度",
      "settings.history": "历史对话轮数", "settings.thinking": "思考模式", "settings.seed": "随机种子",
      "settings.random": "随机",
      "chat.model": "模型", "chat.clear": "清空对话", "chat.empty": "在左侧选择模型组合，然后打个招呼吧。",
      "chat.placeholder": "给 MiniMind 发消息（Enter 发送，Shift+Enter 换行）",
      "send": "发送", "stop": "停止", "msg.you": "你", "msg.thinking": "思考过程", "msg.stopped": "已停止",
      "msg.error": "出错",
      "compare.placeholder": "同一个问题，同时发给每一列",
      "compare.hint": "2 到 4 个模型：适配器名或组合，如 a+0.5*b", "compare.add": "+ 模型",
      "compare.remove": "移除", "compare.model": "模型 {n}",
      "adapters.server": "服务状态", "adapters.loaded": "已加载", "adapters.available": "--lora_dir 中的文件",
      "adapters.nodir": "用 --lora_dir DIR 启动服务后，可在这里加载其中的适配器文件。",
      "adapters.none": "尚未加载适配器。", "adapters.nofiles": "--lora_dir 中没有适配器文件。",
      "adapters.load": "加载", "adapters.unload": "卸载", "adapters.loaded_as": "已加载为 {name}",
      "adapters.name": "名称", "adapters.done_load": "已加载 {name}。", "adapters.done_unload": "已卸载 {name}。",
      "metrics.active": "活跃槽位", "metrics.queue": "排队", "metrics.tps": "每秒 token（解码）",
      "metrics.tokens": "已生成 token", "metrics.occupancy": "批占用率", "metrics.requests": "请求数",
      "key.title": "API 密钥",
      "key.text": "此服务需要 API 密钥。密钥只保存在当前浏览器标签页（会话存储）中，且只发送给本服务。",
      "key.submit": "继续", "key.forget": "清除密钥",
    },
  };

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  let lang = localStorage.getItem(LANG_STORE) || ((navigator.language || "").startsWith("zh") ? "zh" : "en");
  const S = {
    base: "minimind", adapters: [], weights: new Map(), history: [], chat: null, compare: null,
    columns: null, view: "chat", metricsTimer: null, lastBusy: null, started: false,
  };

  // -- text and elements -------------------------------------------------------------------------------------------
  function t(key, vars) {
    let s = (I18N[lang] && I18N[lang][key]) || I18N.en[key] || key;
    for (const [k, v] of Object.entries(vars || {})) s = s.replace(`{${k}}`, v);
    return s;
  }

  // An element; `text` is set as textContent (never parsed as HTML); `i18n` makes it follow the language switch.
  function el(tag, cls, text, i18n) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (i18n) { e.dataset.i18n = i18n; e.textContent = t(i18n); } else if (text != null) e.textContent = text;
    return e;
  }

  function applyLang() {
    document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
    for (const e of $$("[data-i18n]")) e.textContent = t(e.dataset.i18n);
    for (const e of $$("[data-i18n-ph]")) e.placeholder = t(e.dataset.i18nPh);
    for (const e of $$("[data-i18n-label]")) e.setAttribute("aria-label", t(e.dataset.i18nLabel, {name: e.dataset.name || ""}));
    const button = $("#lang");
    button.textContent = lang === "zh" ? "English" : "中文";
    button.lang = lang === "zh" ? "en" : "zh";
    document.title = `MiniMind ${t("playground")}`;
    if (S.started) renderMetricsLabels();
  }

  function banner(message) {
    const b = $("#banner");
    b.textContent = message || "";
    b.hidden = !message;
  }

  // -- the API -----------------------------------------------------------------------------------------------------
  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function failure(response) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON */ }
    if (response.status === 401) askKey(message);
    return new HttpError(response.status, message);
  }

  async function api(path, method = "GET", body = undefined) {
    const response = await fetch(path, {method, headers: headers(body !== undefined),
                                        body: body === undefined ? undefined : JSON.stringify(body)});
    if (!response.ok) throw await failure(response);
    return (response.headers.get("content-type") || "").includes("json") ? response.json() : response.text();
  }

  // POST /v1/chat/completions as server-sent events. `on(content, reasoning)` gets each delta; `st` collects the
  // timing (t0, first, chunks, usage, finish), so a stopped request still has its numbers.
  async function streamChat(body, signal, st, on) {
    st.t0 = performance.now();
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), signal,
      body: JSON.stringify({...body, stream: true, stream_options: {include_usage: true}}),
    });
    if (!response.ok) throw await failure(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new HttpError(500, chunk.error.message || "server error");
          if (chunk.usage) st.usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          const delta = choice.delta || {};
          const content = typeof delta.content === "string" ? delta.content : "";
          const reasoning = typeof delta.reasoning_content === "string" ? delta.reasoning_content : "";
          if (content || reasoning) {
            if (st.first === null) st.first = performance.now();
            st.chunks += 1;
            on(content, reasoning);
          }
          if (choice.finish_reason) st.finish = choice.finish_reason;
        }
      }
    }
    st.end = performance.now();
  }

  function newStats() { return {t0: 0, first: null, end: null, chunks: 0, usage: null, finish: null}; }

  // "24 tok · 85.1 tok/s · TTFT 120 ms": tokens from the usage chunk (else the chunks counted), tokens/s over the
  // time after the first token, time to first token from the request's start.
  function statsText(st) {
    const end = st.end || performance.now();
    const tokens = st.usage ? st.usage.completion_tokens : st.chunks;
    const parts = [`${tokens} tok`];
    if (st.first !== null && tokens > 1 && end > st.first) parts.push(`${((tokens - 1) * 1000 / (end - st.first)).toFixed(1)} tok/s`);
    else parts.push("– tok/s");
    parts.push(st.first === null ? "TTFT –" : `TTFT ${Math.round(st.first - st.t0)} ms`);
    return parts.join(" · ");
  }

  // -- settings and the mix ----------------------------------------------------------------------------------------
  function settings() {
    const number = (id) => { const v = $(id).value.trim(); return v === "" ? null : Number(v); };
    const s = {temperature: Number($("#temperature").value), top_p: Number($("#top_p").value),
               open_thinking: $("#thinking").checked};
    const maxTokens = number("#max_tokens"), seed = number("#seed");
    if (maxTokens !== null && Number.isInteger(maxTokens) && maxTokens >= 1) s.max_tokens = maxTokens;
    if (seed !== null && Number.isInteger(seed)) s.seed = seed;
    return s;
  }

  function formatWeight(w) { return String(Math.round(w * 100) / 100); }

  // The `model` string of the sliders: "a+0.5*b" (weight 1: the name alone), the base when every weight is 0.
  function mixString() {
    const terms = [];
    for (const a of S.adapters) {
      const w = S.weights.get(a.id) || 0;
      if (w === 0) continue;
      terms.push(w === 1 ? a.id : `${formatWeight(w)}*${a.id}`);
    }
    return terms.length ? terms.join("+") : S.base;
  }

  function showMix() {
    const mix = mixString();
    $("#mix").textContent = mix;
    $("#chat-model").textContent = mix;
    const options = $("#model-options");
    options.replaceChildren();
    for (const id of new Set([S.base, ...S.adapters.map((a) => a.id), mix])) {
      const o = document.createElement("option");
      o.value = id;
      options.append(o);
    }
  }

  function renderModels() {
    const list = $("#model-list");
    list.replaceChildren();
    const base = el("div", "model-row base");
    const name = el("div", "name");
    name.append(el("span", "id", S.base), el("span", "badge", null, "models.base"));
    base.append(name, el("div", "meta", null, "models.always"));
    list.append(base);
    for (const a of S.adapters) {
      const row = el("div", "model-row");
      row.dataset.model = a.id;
      const head = el("div", "name");
      head.append(el("span", "id", a.id));
      const targets = Array.isArray(a.targets) ? a.targets.join(", ") : String(a.targets ?? "");
      const meta = el("div", "meta", `rank ${a.rank ?? "?"} · ${targets}`);
      if (a.warning) { meta.append(el("span", "warn", " ⚠")); meta.title = a.warning; }
      const slider = document.createElement("input");
      slider.type = "range";
      slider.min = MIN_WEIGHT; slider.max = MAX_WEIGHT; slider.step = WEIGHT_STEP;
      slider.value = S.weights.get(a.id) || 0;
      slider.className = "weight";
      slider.dataset.i18nLabel = "models.weight";
      slider.dataset.name = a.id;
      slider.setAttribute("aria-label", t("models.weight", {name: a.id}));
      const out = el("output", "weight-out", formatWeight(Number(slider.value)));
      slider.addEventListener("input", () => {
        const w = Math.round(Number(slider.value) / WEIGHT_STEP) * WEIGHT_STEP;
        S.weights.set(a.id, Math.round(w * 100) / 100);
        out.textContent = formatWeight(S.weights.get(a.id));
        row.classList.toggle("on", S.weights.get(a.id) !== 0);
        showMix();
      });
      row.classList.toggle("on", (S.weights.get(a.id) || 0) !== 0);
      row.append(head, meta, slider, out);
      list.append(row);
    }
    showMix();
  }

  async function refreshModels() {
    const body = await api("/v1/models");
    const models = body.data || [];
    const base = models.find((m) => !m.parent) || models[0];
    if (base) S.base = base.id;
    S.adapters = models.filter((m) => m.parent);
    for (const id of Array.from(S.weights.keys())) if (!S.adapters.some((a) => a.id === id)) S.weights.delete(id);
    renderModels();
    if (S.columns === null) {
      const ids = S.adapters.map((a) => a.id);
      S.columns = [S.base, ...ids.slice(0, 1)];
      if (ids.length > 1) S.columns.push(`${ids[0]}+0.5*${ids[1]}`);
      while (S.columns.length < MIN_COLUMNS) S.columns.push(S.base);
      renderColumns();
    }
  }

  // -- a reply: content (with MiniMind's <think> block) and reasoning_content, shown as text ------------------------
  function replyView(root, label) {
    root.dataset.state = "running";
    if (label !== null) {
      const who = el("div", "who");
      who.append(el("span", "role", label));
      root.append(who);
    }
    const think = el("details", "reasoning");
    think.open = true;
    think.hidden = true;
    const summary = el("summary", null, null, "msg.thinking");
    const thinkText = el("div", "text");
    think.append(summary, thinkText);
    const answer = el("div", "answer");
    const foot = el("div", "foot");
    const badge = el("span", "badge-state");
    const stats = el("span", "stats");
    foot.append(badge, stats);
    root.append(think, answer, foot);
    return {root, think, thinkText, answer, badge, stats, raw: "", reasoning: ""};
  }

  // MiniMind's template opens <think> itself when thinking is on, so the content starts inside the block and the
  // answer follows "</think>". A server that sends reasoning_content has split them already.
  function split(raw, thinking, separate) {
    const close = raw.indexOf("</think>");
    if (close >= 0) return [raw.slice(0, close).replace(/^\s*<think>/, "").trim(), raw.slice(close + 8).replace(/^\n+/, "")];
    if (thinking && !separate) return [raw.replace(/^\s*<think>/, "").trim(), ""];
    return ["", raw];
  }

  function renderReply(v, thinking) {
    const [inline, answer] = split(v.raw, thinking, v.reasoning !== "");
    const reasoning = [v.reasoning.trim(), inline].filter(Boolean).join("\n");
    v.think.hidden = reasoning === "";
    v.thinkText.textContent = reasoning;
    v.answer.textContent = answer;
    v.answerText = answer;
  }

  function finishReply(v, st, outcome, error) {
    v.root.dataset.state = outcome;
    v.badge.replaceChildren();
    if (outcome === "stopped") { v.badge.dataset.i18n = "msg.stopped"; v.badge.textContent = t("msg.stopped"); }
    else if (outcome === "error") { v.badge.dataset.i18n = "msg.error"; v.badge.textContent = t("msg.error"); }
    else { delete v.badge.dataset.i18n; v.badge.textContent = st.finish === "length" ? "length" : ""; }
    if (error) v.root.append(el("div", "error", error));
    v.stats.textContent = st.t0 ? statsText(st) : "";
  }

  // -- chat --------------------------------------------------------------------------------------------------------
  function scrollDown() {
    const box = $("#messages");
    box.scrollTop = box.scrollHeight;
  }

  function addUser(text) {
    const m = el("div", "msg user");
    const who = el("div", "who");
    who.append(el("span", "role", null, "msg.you"));
    m.append(who, el("div", "answer", text));
    $("#messages").append(m);
  }

  async function sendChat(event) {
    event.preventDefault();
    if (S.chat) return;
    const prompt = $("#prompt");
    const text = prompt.value;
    if (!text.trim()) return;
    prompt.value = "";
    $("#chat-empty").hidden = true;
    const model = mixString();
    const s = settings();
    const rounds = Number($("#history").value);
    const messages = [...(rounds > 0 ? S.history.slice(-2 * rounds) : []), {role: "user", content: text}];
    addUser(text);
    const root = el("div", "msg assistant");
    $("#messages").append(root);
    const v = replyView(root, model);
    scrollDown();
    const controller = new AbortController();
    S.chat = controller;
    busy("chat", true);
    const st = newStats();
    const body = {model, messages, ...s};
    let outcome = "done", error = null;
    try {
      await streamChat(body, controller.signal, st, (content, reasoning) => {
        v.raw += content;
        v.reasoning += reasoning;
        renderReply(v, s.open_thinking);
        v.stats.textContent = statsText(st);
        scrollDown();
      });
    } catch (e) {
      if (e.name === "AbortError") outcome = "stopped";
      else { outcome = "error"; error = e.message; }
    } finally {
      S.chat = null;
      busy("chat", false);
    }
    renderReply(v, s.open_thinking);
    finishReply(v, st, outcome, error);
    if (outcome !== "error") S.history.push({role: "user", content: text}, {role: "assistant", content: v.answerText || ""});
    scrollDown();
  }

  function busy(which, on) {
    const [send, stop] = which === "chat" ? ["#send", "#stop"] : ["#compare-send", "#compare-stop"];
    $(send).hidden = on;
    $(stop).hidden = !on;
  }

  function clearChat() {
    if (S.chat) S.chat.abort();
    S.history = [];
    for (const m of $$("#messages .msg")) m.remove();
    $("#chat-empty").hidden = false;
  }

  // -- compare -----------------------------------------------------------------------------------------------------
  function renderColumns() {
    const box = $("#columns");
    box.replaceChildren();
    S.columns.forEach((model, i) => {
      const col = el("div", "col");
      col.dataset.index = i;
      const head = el("div", "col-head");
      const input = document.createElement("input");
      input.className = "col-model";
      input.setAttribute("list", "model-options");
      input.value = model;
      input.spellcheck = false;
      input.setAttribute("aria-label", t("compare.model", {n: i + 1}));
      input.addEventListener("input", () => { S.columns[i] = input.value.trim(); });
      const remove = el("button", "quiet icon", "×");
      remove.type = "button";
      remove.dataset.i18nLabel = "compare.remove";
      remove.setAttribute("aria-label", t("compare.remove"));
      remove.disabled = S.columns.length <= MIN_COLUMNS;
      remove.addEventListener("click", () => {
        if (S.compare || S.columns.length <= MIN_COLUMNS) return;
        S.columns.splice(i, 1);
        renderColumns();
      });
      head.append(input, remove);
      const body = el("div", "col-body");
      col.append(head, body);
      box.append(col);
    });
    $("#add-column").disabled = S.columns.length >= MAX_COLUMNS;
  }

  async function sendCompare(event) {
    event.preventDefault();
    if (S.compare) return;
    const text = $("#compare-prompt").value;
    if (!text.trim()) return;
    const s = settings();
    const controller = new AbortController();
    S.compare = controller;
    busy("compare", true);
    const runs = $$("#columns .col").map(async (col) => {
      const model = $(".col-model", col).value.trim() || S.base;
      const body = $(".col-body", col);
      body.replaceChildren();
      const v = replyView(body, null);
      const st = newStats();
      let outcome = "done", error = null;
      try {
        await streamChat({model, messages: [{role: "user", content: text}], ...s}, controller.signal, st,
          (content, reasoning) => {
            v.raw += content;
            v.reasoning += reasoning;
            renderReply(v, s.open_thinking);
            v.stats.textContent = statsText(st);
          });
      } catch (e) {
        if (e.name === "AbortError") outcome = "stopped";
        else { outcome = "error"; error = e.message; }
      }
      renderReply(v, s.open_thinking);
      finishReply(v, st, outcome, error);
    });
    await Promise.allSettled(runs);
    S.compare = null;
    busy("compare", false);
  }

  // -- adapters and metrics ----------------------------------------------------------------------------------------
  function note(message, isError) {
    const p = $("#adapters-msg");
    p.textContent = message || "";
    p.classList.toggle("error", Boolean(isError));
  }

  async function refreshAdapters() {
    let body;
    try { body = await api("/v1/adapters"); } catch (e) { note(e.message, true); return; }
    const loaded = $("#loaded");
    loaded.replaceChildren();
    if (!body.data.length) loaded.append(el("p", "note", null, "adapters.none"));
    for (const a of body.data) {
      const row = el("div", "row");
      row.dataset.model = a.id;
      const info = el("div", "info");
      const targets = Array.isArray(a.targets) ? a.targets.join(", ") : String(a.targets ?? "");
      info.append(el("span", "id", a.id), el("span", "meta", `rank ${a.rank ?? "?"} · ${targets}`),
                  el("span", "path", a.path || ""));
      const unload = el("button", "quiet unload", null, "adapters.unload");
      unload.type = "button";
      unload.addEventListener("click", () => unloadAdapter(a.id));
      row.append(info, unload);
      loaded.append(row);
    }
    const available = $("#available");
    available.replaceChildren();
    if (!body.lora_dir) available.append(el("p", "note", null, "adapters.nodir"));
    else if (!body.available.length) available.append(el("p", "note", null, "adapters.nofiles"));
    for (const f of body.available) {
      const row = el("div", "row");
      row.dataset.path = f.path;
      const info = el("div", "info");
      info.append(el("span", "path file", f.path));
      row.append(info);
      if (f.loaded_as) {
        row.append(el("span", "meta", t("adapters.loaded_as", {name: f.loaded_as})));
      } else {
        const name = document.createElement("input");
        name.className = "load-name";
        name.value = f.name;
        name.spellcheck = false;
        name.setAttribute("aria-label", t("adapters.name"));
        const load = el("button", "primary load", null, "adapters.load");
        load.type = "button";
        load.addEventListener("click", () => loadAdapter(name.value.trim(), f.path));
        row.append(name, load);
      }
      available.append(row);
    }
  }

  async function loadAdapter(name, path) {
    try {
      await api("/v1/adapters", "POST", {name, path});
      note(t("adapters.done_load", {name}));
    } catch (e) { note(e.message, true); }
    await Promise.allSettled([refreshAdapters(), refreshModels()]);
  }

  async function unloadAdapter(name) {
    try {
      await api(`/v1/adapters/${encodeURIComponent(name)}`, "DELETE");
      note(t("adapters.done_unload", {name}));
    } catch (e) { note(e.message, true); }
    await Promise.allSettled([refreshAdapters(), refreshModels()]);
  }

  const TILES = [["active", "metrics.active"], ["queue", "metrics.queue"], ["tps", "metrics.tps"],
                 ["tokens", "metrics.tokens"], ["occupancy", "metrics.occupancy"], ["requests", "metrics.requests"]];

  function renderMetricsLabels() {
    const box = $("#metrics");
    if (!box.children.length) {
      for (const [id, label] of TILES) {
        const tile = el("div", "tile");
        tile.dataset.metric = id;
        tile.append(el("div", "value", "–"), el("div", "label", null, label));
        box.append(tile);
      }
    }
  }

  function parseMetrics(text) {
    const m = {requests: 0};
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const cut = line.lastIndexOf(" ");
      const name = line.slice(0, cut), value = Number(line.slice(cut + 1));
      if (name.startsWith("minimind_requests_total{")) m.requests += value;
      else if (!name.includes("{")) m[name] = value;
    }
    return m;
  }

  async function pollMetrics() {
    let m;
    try { m = parseMetrics(await api("/metrics")); } catch (e) { note(e.message, true); return; }
    const now = performance.now();
    const slots = m.minimind_slots || 0;
    // slot-steps spent decoding so far: one token each (occupancy x steps x slots)
    const busySteps = (m.minimind_batch_occupancy || 0) * (m.minimind_decode_steps || 0) * slots;
    let tps = null;
    if (S.lastBusy && now > S.lastBusy.at) tps = Math.max(0, (busySteps - S.lastBusy.value) * 1000 / (now - S.lastBusy.at));
    S.lastBusy = {value: busySteps, at: now};
    const set = (id, v) => { $(`#metrics [data-metric="${id}"] .value`).textContent = v; };
    set("active", `${m.minimind_active_slots ?? 0} / ${slots}`);
    set("queue", String(m.minimind_queue_length ?? 0));
    set("tps", tps === null ? "–" : tps.toFixed(1));
    set("tokens", String(m.minimind_completion_tokens_total ?? 0));
    set("occupancy", `${Math.round((m.minimind_batch_occupancy || 0) * 100)}%`);
    set("requests", String(m.requests));
  }

  function watchMetrics(on) {
    clearInterval(S.metricsTimer);
    S.metricsTimer = null;
    S.lastBusy = null;
    if (!on) return;
    pollMetrics();
    S.metricsTimer = setInterval(pollMetrics, 1000);
  }

  // -- views, key, start -------------------------------------------------------------------------------------------
  function show(view) {
    S.view = view;
    for (const tab of $$(".tabs [role=tab]")) tab.setAttribute("aria-selected", String(tab.dataset.view === view));
    for (const name of ["chat", "compare", "adapters"]) $(`#view-${name}`).hidden = name !== view;
    if (view === "adapters" && S.started) refreshAdapters();
    watchMetrics(view === "adapters" && S.started);
    if (location.hash !== `#${view}`) history.replaceState(null, "", `#${view}`);
  }

  function askKey(message) {
    $("#key-dialog").hidden = false;
    $("#key-error").textContent = message && sessionStorage.getItem(KEY_STORE) ? message : "";
    sessionStorage.removeItem(KEY_STORE);
    $("#forget-key").hidden = true;
    watchMetrics(false);
    $("#key-input").focus();
  }

  async function submitKey(event) {
    event.preventDefault();
    const key = $("#key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("#key-input").value = "";
    try {
      await refreshModels();
    } catch (e) {
      $("#key-error").textContent = e.message;
      return;
    }
    $("#key-dialog").hidden = true;
    $("#forget-key").hidden = false;
    started();
  }

  function started() {
    S.started = true;
    banner("");
    renderMetricsLabels();
    show(S.view);
  }

  function copyMix() {
    const mix = mixString();
    const done = () => {
      const b = $("#copy-mix");
      b.dataset.i18n = "copied";
      b.textContent = t("copied");
      setTimeout(() => { b.dataset.i18n = "copy"; b.textContent = t("copy"); }, 1200);
    };
    const select = () => {
      const range = document.createRange();
      range.selectNodeContents($("#mix"));
      const selection = getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    };
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(mix).then(done, select);
    else select();
  }

  function bind() {
    for (const tab of $$(".tabs [role=tab]")) tab.addEventListener("click", () => show(tab.dataset.view));
    $("#lang").addEventListener("click", () => {
      lang = lang === "zh" ? "en" : "zh";
      localStorage.setItem(LANG_STORE, lang);
      applyLang();
    });
    for (const id of ["temperature", "top_p", "history"]) {
      const input = $(`#${id}`), out = $(`#${id}-out`);
      input.addEventListener("input", () => { out.textContent = input.value; });
    }
    $("#chat-form").addEventListener("submit", sendChat);
    $("#prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("#chat-form").requestSubmit(); }
    });
    $("#stop").addEventListener("click", () => { if (S.chat) S.chat.abort(); });
    $("#clear").addEventListener("click", clearChat);
    $("#compare-form").addEventListener("submit", sendCompare);
    $("#compare-prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("#compare-form").requestSubmit(); }
    });
    $("#compare-stop").addEventListener("click", () => { if (S.compare) S.compare.abort(); });
    $("#add-column").addEventListener("click", () => {
      if (S.compare || !S.columns || S.columns.length >= MAX_COLUMNS) return;
      S.columns.push(mixString());
      renderColumns();
    });
    $("#reset-mix").addEventListener("click", () => { S.weights.clear(); renderModels(); });
    $("#copy-mix").addEventListener("click", copyMix);
    $("#key-form").addEventListener("submit", submitKey);
    $("#forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); location.reload(); });
  }

  async function start() {
    bind();
    if (matchMedia("(max-width: 860px)").matches) for (const d of $$(".side details")) d.open = false;
    const view = location.hash.slice(1);
    if (["chat", "compare", "adapters"].includes(view)) S.view = view;
    applyLang();
    show(S.view);
    if (document.documentElement.dataset.auth === "1" && !sessionStorage.getItem(KEY_STORE)) {
      askKey();
      return;
    }
    try {
      await refreshModels();
    } catch (e) {
      if (e.status !== 401) banner(e.message);
      return;
    }
    $("#forget-key").hidden = document.documentElement.dataset.auth !== "1";
    started();
  }

  start();
})();
