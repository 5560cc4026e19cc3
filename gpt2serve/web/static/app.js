// The model page's behaviour: plain ES2020, no dependencies, no build step.
// Data: GET /v1/page-info (facts, prices, zero-shot), GET /health (live status),
// POST /v1/signup, GET /v1/credits, GET /v1/key, GET /v1/generation?id= (account),
// POST /v1/completions | /v1/chat/completions with stream: true (playground).
"use strict";

const KEY_STORE = "gpt2serve.key";        // this tab's API key (sessionStorage: gone with the tab)
const RECENT_STORE = "gpt2serve.recent";  // ids of this tab's generations, newest first
const $ = (id) => document.getElementById(id);
const state = { info: null, abort: null };

// ---------------------------------------------------------------------------------------------
// helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
const fmtInt = (n) => (n == null ? "—" : Number(n).toLocaleString("en-US"));
const fmtNum = (n) => (n == null ? "—" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 2 }));
function fmtUsd(x) {
  if (x == null || x === "" || Number.isNaN(Number(x))) return "—";
  const n = Number(x);
  // Sub-cent amounts are common here (a token costs a micro-dollar): keep six decimals for them.
  return "$" + n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: Math.abs(n) < 1 ? 6 : 2 });
}
const getKey = () => sessionStorage.getItem(KEY_STORE) || "";
function authHeaders() {
  const key = getKey();
  return key ? { Authorization: "Bearer " + key } : {};
}
function recentIds() {
  try { return JSON.parse(sessionStorage.getItem(RECENT_STORE) || "[]"); } catch { return []; }
}

// A readable sentence for an API error (OpenAI's body: {"error": {"message", "type", "param", "code"}}).
function errorMessage(status, body, headers) {
  const err = (body && body.error) || {};
  const msg = err.message || (typeof body === "string" ? body : "") || "";
  const code = err.code || err.type || "";
  if (status === 401) return "Your API key was not accepted (401). Sign up for a key above, or paste a valid one." + (msg ? " Server: " + msg : "");
  if (status === 402) return "Out of credit (402): this key has too little credit left for this request, so it was not run." + (msg ? " Server: " + msg : "");
  if (status === 429) {
    const after = headers && headers.get && headers.get("Retry-After");
    const what = code === "overloaded" ? "The server is busy (429)" : "Rate limit reached (429)";
    return what + (after ? `: try again in ${after} s.` : ": try again shortly.") + (msg ? " Server: " + msg : "");
  }
  if (code === "context_length_exceeded" || /context|too long|maximum.*tokens/i.test(msg)) {
    return "Too long for the model's context window: shorten the prompt or lower max tokens." + (msg ? " Server: " + msg : "");
  }
  if (status === 503) return "The model is still loading; try again in a moment.";
  if (status === 400) return "The request was refused (400)" + (err.param ? ` because of ${err.param}` : "") + ": " + (msg || "invalid request.");
  return `Request failed (${status || "network"}): ${msg || "no details."}`;
}

async function api(path, opts = {}) {
  const res = await fetch(path, opts);
  let body = null;
  const text = await res.text();
  try { body = text ? JSON.parse(text) : null; } catch { body = text; }
  if (!res.ok) {
    const e = new Error(errorMessage(res.status, body, res.headers));
    e.status = res.status;
    throw e;
  }
  return body;
}

// ---------------------------------------------------------------------------------------------
// model facts, pricing, zero-shot table, snippets

function renderInfo(info) {
  const m = info.model;
  const params = m.parameters || "?";
  $("model-title").textContent = "GPT-2" + (m.size ? ` (${m.size})` : "");
  $("hub-id").textContent = m.hub_id;
  $("lede-params").textContent = params;
  $("f-id").textContent = m.id;
  $("f-task").textContent = "Text generation (" + m.task + ")";
  $("f-arch").textContent = `Decoder-only transformer · ${m.n_layer} layers · ${m.n_head} heads · width ${m.n_embd}`;
  $("f-params").textContent = `${params} (${fmtInt(m.num_parameters)})`;
  $("f-ctx").textContent = fmtInt(m.context_length) + " tokens";
  $("f-vocab").textContent = fmtInt(m.vocab_size) + " tokens (byte-level BPE)";
  $("f-weights").textContent = (m.random_weights ? "Random (not trained)" : "Trained") + (m.dtype ? ` · ${m.dtype}` : "") + (m.device ? ` · ${m.device}` : "");
  $("f-licence").textContent = m.licence.name;
  $("description").textContent = m.description;
  $("limits").replaceChildren(...m.limits.map((t) => el("li", { text: t })));
  for (const node of document.querySelectorAll(".ctx")) node.textContent = fmtInt(m.context_length);
  $("max_tokens").max = String(m.context_length || 1024);
  document.title = `GPT-2${m.size ? " " + m.size : ""} · ${m.hub_id} · gpt2serve`;

  const p = info.pricing;
  $("pricing-text").textContent = p.billed
    ? `${fmtUsd(p.prompt_per_million_usd)} per million prompt tokens and ${fmtUsd(p.completion_per_million_usd)} per million completion tokens ` +
      `(${p.prompt} and ${p.completion} USD per token). Each request holds its worst case (the prompt plus max tokens) on your credit, then pays only for the tokens generated.`
    : "Free: this server runs without API keys, so nothing is charged.";

  renderZeroShot(info.zero_shot);
  renderSignup(info);
  renderSnippets();
}

function renderZeroShot(zs) {
  const size = zs.size || "124M";
  const head = $("zs-table").tHead.rows[0].cells;
  head[2].textContent = `Published (GPT-2 ${size})`;
  const tbody = $("zs-table").tBodies[0];
  tbody.replaceChildren(...zs.rows.map((r) => el("tr", {},
    el("th", { scope: "row", text: r.label }),
    el("td", { text: `${r.metric} (${r.better === "lower" ? "lower" : "higher"} is better)` }),
    el("td", { class: "num", text: fmtNum(r.published[size]) }),
    el("td", { class: "num", text: fmtNum(r.measured) }))));
  const notes = [`Published: ${zs.source}.`];
  if (!zs.size) notes.push("This deployment is not one of the released GPT-2 shapes; the 124M numbers are shown for reference.");
  if (zs.report) {
    notes.push(`Measured here: from ${zs.report.path}` + (zs.report.model ? ` (model ${zs.report.model})` : "") + ".");
    if (zs.report.limit) notes.push(`Only the first ${zs.report.limit} examples of each test set were used, so the numbers are not directly comparable.`);
    if (zs.measured_random_weights) notes.push("Those measurements were made with random weights: they show the harness works, not GPT-2's quality.");
  } else {
    notes.push("No evaluation report on this server yet: run `gpt2serve eval --output report.json` and point the server's eval_report setting (GPT2SERVE_EVAL_REPORT) at it.");
  }
  $("zs-note").textContent = notes.join(" ");

  const sizes = $("sizes-table").tBodies[0];
  const idx = (task) => zs.rows.find((r) => r.task === task);
  sizes.replaceChildren(...zs.sizes.map((s) => el("tr", {},
    el("th", { scope: "row", text: "GPT-2 " + s + (s === zs.size ? " (this one)" : "") }),
    el("td", { class: "num", text: fmtNum(idx("lambada_acc").published[s]) }),
    el("td", { class: "num", text: fmtNum(idx("wikitext2").published[s]) }))));
}

function snippetArgs() {
  const f = formValues();
  return { base: location.origin + "/v1", model: state.info ? state.info.model.id : "gpt2", ...f };
}

function renderSnippets() {
  const a = snippetArgs();
  const chat = a.mode === "chat";
  const py = (v) => JSON.stringify(v);  // a JSON string literal is a valid Python/JS string literal
  const body = chat
    ? { model: a.model, messages: [{ role: "user", content: a.prompt }], max_tokens: a.max_tokens, temperature: a.temperature }
    : { model: a.model, prompt: a.prompt, max_tokens: a.max_tokens, temperature: a.temperature };
  const shellBody = JSON.stringify(body).replace(/'/g, "'\\''");
  $("base-url").textContent = a.base;
  $("code-curl").textContent =
    `curl ${a.base}/${chat ? "chat/completions" : "completions"} \\\n` +
    `  -H "Authorization: Bearer $GPT2SERVE_API_KEY" \\\n` +
    `  -H "Content-Type: application/json" \\\n` +
    `  -d '${shellBody}'`;
  const pyCall = chat
    ? `stream = client.chat.completions.create(\n    model=${py(a.model)},\n    messages=[{"role": "user", "content": ${py(a.prompt)}}],\n    max_tokens=${a.max_tokens},\n    temperature=${a.temperature},\n    stream=True,\n)\nfor chunk in stream:\n    print(chunk.choices[0].delta.content or "", end="", flush=True)`
    : `stream = client.completions.create(\n    model=${py(a.model)},\n    prompt=${py(a.prompt)},\n    max_tokens=${a.max_tokens},\n    temperature=${a.temperature},\n    stream=True,\n)\nfor chunk in stream:\n    print(chunk.choices[0].text, end="", flush=True)`;
  $("code-python").textContent =
    `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=${py(a.base)}, api_key=os.environ["GPT2SERVE_API_KEY"])\n` + pyCall + "\nprint()";
  const jsCall = chat
    ? `const stream = await client.chat.completions.create({\n  model: ${py(a.model)},\n  messages: [{ role: "user", content: ${py(a.prompt)} }],\n  max_tokens: ${a.max_tokens},\n  temperature: ${a.temperature},\n  stream: true,\n});\nfor await (const chunk of stream) process.stdout.write(chunk.choices[0]?.delta?.content ?? "");`
    : `const stream = await client.completions.create({\n  model: ${py(a.model)},\n  prompt: ${py(a.prompt)},\n  max_tokens: ${a.max_tokens},\n  temperature: ${a.temperature},\n  stream: true,\n});\nfor await (const chunk of stream) process.stdout.write(chunk.choices[0].text);`;
  $("code-js").textContent =
    `import OpenAI from "openai";\n\nconst client = new OpenAI({ baseURL: ${py(a.base)}, apiKey: process.env.GPT2SERVE_API_KEY });\n` + jsCall;
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    tab.focus();
  };
  tabs.forEach((t, i) => {
    t.addEventListener("click", () => select(t));
    t.addEventListener("keydown", (e) => {
      const d = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (d) { e.preventDefault(); select(tabs[(i + d + tabs.length) % tabs.length]); }
      if (e.key === "Home") { e.preventDefault(); select(tabs[0]); }
      if (e.key === "End") { e.preventDefault(); select(tabs[tabs.length - 1]); }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// live status

async function pollHealth() {
  const box = $("status");
  try {
    const h = await api("/health");
    const ready = h.status === "ok";
    // The page may have loaded while the model was loading: fetch its facts again once it is up.
    if (ready && state.info && state.info.status.status !== "ok") loadInfo();
    box.className = "status " + (ready ? "ok" : "loading");
    const weights = h.random_weights ? "random weights (not the trained GPT-2: expect gibberish)" : "trained weights";
    $("status-text").textContent = ready
      ? `Model ${h.model} loaded · ${weights} · queue: ${fmtInt(h.running)} running, ${fmtInt(h.waiting)} waiting`
      : `Model ${h.model || ""} loading…`;
  } catch (e) {
    // /health answers 503 while the model loads (and "failed" if it could not).
    box.className = "status " + (e.status === 503 ? "loading" : "down");
    $("status-text").textContent = e.status === 503 ? "Model not ready yet (loading, or it failed to load)" : "Server unreachable";
  }
}

// ---------------------------------------------------------------------------------------------
// sign-up, key, credit, recent usage

function renderSignup(info) {
  const s = info.signup;
  if (!info.auth) {
    $("signup-text").textContent = "This server runs without API keys: the playground and the API work without one.";
    $("signup-btn").hidden = true;
  } else if (!s.enabled) {
    $("signup-text").textContent = "Sign-up is closed on this server: ask its operator for a key (`gpt2serve keys create`).";
    $("signup-btn").hidden = true;
  } else {
    $("signup-text").textContent = `Sign up for a key with ${fmtUsd(s.starter_credit_usd)} of free starter credit. No e-mail needed.`;
  }
}

function pick(obj, ...names) {
  // The first present field among names, looking inside a {"data": ...} envelope too.
  for (const o of [obj, obj && obj.data]) {
    if (!o || typeof o !== "object") continue;
    for (const n of names) if (o[n] != null) return o[n];
  }
  return null;
}

async function signup() {
  const btn = $("signup-btn");
  btn.disabled = true;
  try {
    const body = await api("/v1/signup", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    const key = pick(body, "key", "api_key");
    if (!key) throw new Error("The server did not return a key.");
    sessionStorage.setItem(KEY_STORE, key);
    sessionStorage.removeItem(RECENT_STORE);
    $("new-key-value").textContent = key;
    $("new-key").hidden = false;
    $("key-input").value = "";
    await refreshAccount();
  } catch (e) {
    $("credit-text").textContent = "Sign-up failed: " + e.message;
  } finally {
    btn.disabled = false;
  }
}

async function refreshAccount() {
  const out = $("credit-text");
  if (!getKey()) {
    out.textContent = "No key in use.";
    $("usage-wrap").hidden = true;
    return;
  }
  try {
    const credits = await api("/v1/credits", { headers: authHeaders() });
    // Exact integer micro-USD when the server gives them (gpt2serve does), else OpenRouter's USD numbers.
    const cm = pick(credits, "total_credits_micros"), um = pick(credits, "total_usage_micros");
    let total = pick(credits, "total_credits"), used = pick(credits, "total_usage"), leftMicros = null;
    if (cm != null && um != null) { leftMicros = cm - um; total = cm / 1e6; used = um / 1e6; }
    else if (total != null && used != null) leftMicros = Math.round((Number(total) - Number(used)) * 1e6);
    out.textContent = `Remaining credit: ${fmtUsd(leftMicros == null ? null : leftMicros / 1e6)}` +
      (total != null ? ` of ${fmtUsd(total)}` : "") + (used != null ? ` · used ${fmtUsd(used)}` : "");
    out.dataset.remainingMicros = leftMicros == null ? "" : String(leftMicros);
  } catch (e) {
    out.textContent = e.message;
  }
  await refreshUsage();
}

async function refreshUsage() {
  const ids = recentIds().slice(0, 5);
  $("usage-wrap").hidden = ids.length === 0;
  const rows = await Promise.all(ids.map(async (id) => {
    try {
      const g = await api("/v1/generation?id=" + encodeURIComponent(id), { headers: authHeaders() });
      const pt = pick(g, "tokens_prompt", "native_tokens_prompt", "prompt_tokens");
      const ct = pick(g, "tokens_completion", "native_tokens_completion", "completion_tokens");
      return el("tr", {}, el("td", {}, el("code", { text: id })), el("td", { class: "num", text: `${fmtInt(pt)} + ${fmtInt(ct)}` }),
        el("td", { class: "num", text: fmtUsd(pick(g, "total_cost", "cost", "usage")) }));
    } catch (e) {
      return el("tr", {}, el("td", {}, el("code", { text: id })), el("td", { colspan: "2", text: e.message }));
    }
  }));
  $("usage-table").tBodies[0].replaceChildren(...rows);
}

// ---------------------------------------------------------------------------------------------
// playground

function formValues() {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  // Stops: comma-separated, with \n and \t written as escapes (a text box cannot hold a newline).
  const stop = $("stop").value.split(",").map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t")).filter((s) => s !== "");
  return {
    mode: document.querySelector('input[name="mode"]:checked').value,
    prompt: $("prompt").value,
    max_tokens: num("max_tokens") ?? 32,
    temperature: num("temperature") ?? 1,
    top_p: num("top_p") ?? 1,
    top_k: num("top_k") ?? 0,
    seed: num("seed"),
    stop,
    probs: $("show-probs").checked,
  };
}

function requestBody(f) {
  const body = { model: state.info ? state.info.model.id : "gpt2", max_tokens: f.max_tokens, temperature: f.temperature, top_p: f.top_p,
                 stream: true, stream_options: { include_usage: true } };
  if (f.top_k) body.top_k = f.top_k;  // an extension (vLLM's); OpenAI has no top_k
  if (f.seed != null) body.seed = f.seed;
  if (f.stop.length) body.stop = f.stop;
  if (f.mode === "chat") {
    body.messages = [{ role: "user", content: f.prompt }];
    if (f.probs) { body.logprobs = true; body.top_logprobs = 5; }
  } else {
    body.prompt = f.prompt;
    if (f.probs) body.logprobs = 5;
  }
  return body;
}

// Server-sent events from a fetch() body: yields each event's data (spec: data lines joined by \n,
// dispatched at a blank line; lines starting with ":" are comments, e.g. keep-alives).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + (buf.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") { if (data.length) yield data.join("\n"); data = []; }
      else if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
    }
    if (done) { if (data.length) yield data.join("\n"); return; }
  }
}

// One token's (text, logprob, top alternatives [[text, logprob]...]) from either endpoint's shape.
function tokensFromChoice(choice, chat) {
  const lp = choice.logprobs;
  if (!lp) return [];
  if (chat) {
    return (lp.content || []).map((t) => ({ text: t.token, logprob: t.logprob, top: (t.top_logprobs || []).map((a) => [a.token, a.logprob]) }));
  }
  return (lp.tokens || []).map((text, i) => ({
    text, logprob: lp.token_logprobs[i],
    top: Object.entries((lp.top_logprobs && lp.top_logprobs[i]) || {}).sort((a, b) => b[1] - a[1]),
  }));
}

const visible = (s) => s.replace(/\n/g, "↵").replace(/\t/g, "⇥") || "∅";
const pct = (lp) => (Math.exp(lp) * 100).toFixed(lp > Math.log(0.001) ? 1 : 3) + "%";

function addTokens(tokens) {
  const box = $("tokens");
  for (const t of tokens) {
    const b = el("button", { type: "button", class: "tok", "aria-pressed": "false", "aria-label": `token ${JSON.stringify(t.text)}, probability ${pct(t.logprob)}` });
    b.textContent = visible(t.text);
    b.style.setProperty("--p", Math.exp(t.logprob).toFixed(3));
    b.addEventListener("click", () => showToken(b, t));
    b.addEventListener("focus", () => showToken(b, t));
    box.append(b);
  }
}

function showToken(button, t) {
  for (const b of document.querySelectorAll(".tok[aria-pressed=true]")) b.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-pressed", "true");
  const rows = t.top.map(([text, lp]) => el("tr", {}, el("td", {}, el("code", { text: visible(text) })), el("td", { class: "num", text: pct(lp) })));
  $("token-detail").replaceChildren(
    el("p", {}, "Chosen ", el("code", { text: visible(t.text) }), ` with probability ${pct(t.logprob)}.`),
    el("table", {}, el("caption", { text: "Top alternatives" }),
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Token" }), el("th", { scope: "col", class: "num", text: "Probability" }))),
      el("tbody", {}, ...rows)));
  $("token-detail").hidden = false;
}

function showError(msg) {
  $("pg-error").textContent = msg;
  $("pg-error").hidden = !msg;
}

async function generate(ev) {
  ev.preventDefault();
  if (state.abort) return;
  const f = formValues();
  const chat = f.mode === "chat";
  const out = $("output");
  out.textContent = "";
  out.setAttribute("aria-busy", "true");
  out.dataset.done = "false";
  $("tokens").replaceChildren();
  $("token-detail").hidden = true;
  $("tokens-wrap").hidden = !f.probs;
  showError("");
  $("pg-meta").textContent = "Generating…";
  $("generate").disabled = true;
  $("stop-btn").disabled = false;
  state.abort = new AbortController();
  let id = null, finish = null, ntok = 0, usage = null;
  try {
    const res = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody(f)),
      signal: state.abort.signal,
    });
    if (!res.ok) {
      let body = null;
      const text = await res.text();
      try { body = JSON.parse(text); } catch { body = text; }
      throw new Error(errorMessage(res.status, body, res.headers));
    }
    for await (const data of sseEvents(res)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(errorMessage(chunk.error.status || 0, chunk, null));
      id = chunk.id || id;
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const text = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        out.append(text);  // a text node per delta: the stream shows token by token
        const toks = tokensFromChoice(choice, chat);
        ntok += toks.length;
        if (f.probs) addTokens(toks);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const n = usage ? usage.completion_tokens : ntok || null;
    const cost = usage && usage.cost != null ? `cost ${fmtUsd(usage.cost)}` : null;
    $("pg-meta").textContent = [finish && `finish: ${finish}`, n != null && `${n} tokens`, cost, id].filter(Boolean).join(" · ");
  } catch (e) {
    if (e.name === "AbortError") $("pg-meta").textContent = "Stopped.";
    else { showError(e instanceof TypeError ? "Could not reach the server: " + e.message : e.message); $("pg-meta").textContent = ""; }
  } finally {
    out.normalize();
    out.setAttribute("aria-busy", "false");
    out.dataset.done = "true";
    state.abort = null;
    $("generate").disabled = false;
    $("stop-btn").disabled = true;
  }
  if (id) {
    sessionStorage.setItem(RECENT_STORE, JSON.stringify([id, ...recentIds().filter((x) => x !== id)].slice(0, 20)));
  }
  if (getKey()) refreshAccount();
}

// ---------------------------------------------------------------------------------------------

async function main() {
  setupTabs();
  $("signup-btn").addEventListener("click", signup);
  $("copy-key").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("new-key-value").textContent); $("copy-key").textContent = "Copied"; }
    catch { $("copy-key").textContent = "Select and copy"; }
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    if (key) { sessionStorage.setItem(KEY_STORE, key); sessionStorage.removeItem(RECENT_STORE); }
    $("key-input").value = "";
    $("new-key").hidden = true;
    refreshAccount();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    sessionStorage.removeItem(RECENT_STORE);
    $("new-key").hidden = true;
    refreshAccount();
  });
  $("pg-form").addEventListener("submit", generate);
  $("stop-btn").addEventListener("click", () => state.abort && state.abort.abort());
  $("pg-form").addEventListener("input", renderSnippets);
  $("pg-form").addEventListener("change", () => { $("prompt-label").textContent = formValues().mode === "chat" ? "Message" : "Prompt"; renderSnippets(); });
  renderSnippets();
  pollHealth();
  setInterval(() => { if (!document.hidden) pollHealth(); }, 5000);
  refreshAccount();
  await loadInfo();
}

async function loadInfo() {
  try {
    state.info = await api("/v1/page-info");
    renderInfo(state.info);
    document.body.dataset.ready = "true";
  } catch (e) {
    $("description").textContent = "Could not load this server's model facts: " + e.message;
  }
}

main();
