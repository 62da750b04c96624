// The node dashboard: polls /agora/v1/status, pages through the log, checks inclusion proofs in the
// page, and streams playground chats from /v1/chat/completions. Everything a peer reports is shown
// as text (never as HTML): peers are untrusted.
import { verifyReceipt } from "./merkle.js";

const STATUS_EVERY_MS = 2000;
const PAGE = { peers: 25, offers: 25, log: 50 };
const KNOWN = new Set(["node", "health", "traffic", "offers", "peers", "log", "verification", "credits"]);
const $ = (selector) => document.querySelector(selector);
const state = { status: null, peersPage: 0, offersPage: 0, logEnd: null, logSize: 0, history: [], polling: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const short = (text, n = 12) => (!text ? "" : text.length > 2 * n + 1 ? `${text.slice(0, n)}…${text.slice(-6)}` : text);
const fmt = (x, digits = 1) => (x === null || x === undefined ? "–" : typeof x === "number" ? x.toFixed(digits) : String(x));
const healthClass = (h) => (h === "ok" ? "ok" : h === "unreachable" ? "bad" : "warn");

async function getJSON(url) {
  const response = await fetch(url, { headers: { accept: "application/json" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body?.error?.message || `${url}: HTTP ${response.status}`);
  return body;
}

function pager(container, page, pages, go) {
  container.replaceChildren(
    el("button", { onclick: () => go(0), disabled: page === 0 }, "first"),
    el("button", { onclick: () => go(page - 1), disabled: page === 0 }, "‹ prev"),
    el("span", { class: "muted" }, `page ${pages ? page + 1 : 0} of ${pages}`),
    el("button", { onclick: () => go(page + 1), disabled: page >= pages - 1 }, "next ›"),
    el("button", { onclick: () => go(pages - 1), disabled: page >= pages - 1 }, "last"),
  );
}

// -- network --------------------------------------------------------------------------------------

function renderNode(s) {
  $("#node-id").textContent = s.node.peer_id || s.node.url || "(node without identity)";
  $("#node-id").title = `${s.node.url || ""} · agoranet ${s.node.version} · up ${Math.round(s.node.uptime_s)} s`;
  $("#node-roles").replaceChildren(...s.node.roles.map((r) => el("span", { class: "badge" }, r)));
  const health = $("#health");
  health.textContent = s.health.status;
  health.className = `badge ${healthClass(s.health.status)}`;
  health.title = Object.entries(s.health.checks).map(([k, v]) => `${k}: ${v}`).join("\n");
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function peerMatches(peer, needle) {
  if (!needle) return true;
  const hay = [peer.peer_id, peer.url, ...(peer.roles || []), ...(peer.models || []).flatMap((m) => [m.name, m.cid])];
  return hay.some((x) => x && String(x).toLowerCase().includes(needle));
}

function renderPeers() {
  const all = state.status.peers || [];
  const needle = $("#peers-filter").value.trim().toLowerCase();
  const peers = all.filter((p) => peerMatches(p, needle));
  const pages = Math.max(1, Math.ceil(peers.length / PAGE.peers));
  state.peersPage = Math.min(state.peersPage, pages - 1);
  const rows = peers.slice(state.peersPage * PAGE.peers, (state.peersPage + 1) * PAGE.peers).map((p) => {
    const t = p.traffic || {};
    return el("tr", { class: p.self ? "peer self" : "peer", "data-peer": p.peer_id || p.url },
      el("td", {}, el("span", { class: "mono", title: p.peer_id || "" }, short(p.peer_id) || "no identity"), " ",
        el("a", { href: p.url, class: "muted" }, p.url)),
      el("td", {}, (p.roles || []).join(", ")),
      el("td", { class: healthClass(p.health), title: p.error || "" }, p.health),
      el("td", {}, ...(p.models || []).map((m) => el("div", { title: m.cid }, m.name, " ",
        el("span", { class: "mono muted" }, short(m.cid, 8))))),
      el("td", { class: "num" }, fmt(t.requests_per_s, 2)), el("td", { class: "num" }, fmt(t.tokens_per_s, 1)),
      el("td", { class: "num" }, fmt(t.p50_ms, 0)), el("td", { class: "num" }, fmt(t.p99_ms, 0)),
      el("td", { class: "num" }, fmt(t.in_flight, 0)), el("td", { class: "num" }, fmt(p.log_size, 0)),
      el("td", { class: "num" }, fmt(p.rtt_ms, 0)));
  });
  $("#peers tbody").replaceChildren(...rows);
  $("#peers-count").textContent = `${peers.length} of ${all.length} nodes`;
  pager($("#peers-pager"), state.peersPage, pages, (n) => { state.peersPage = n; renderPeers(); });
}

function renderOffers() {
  const offers = (state.status.offers || []).flatMap((o) => (o.models || [{}]).map((m) => ({ o, m })));
  const pages = Math.max(1, Math.ceil(offers.length / PAGE.offers));
  state.offersPage = Math.min(state.offersPage, pages - 1);
  const now = Date.now();
  const rows = offers.slice(state.offersPage * PAGE.offers, (state.offersPage + 1) * PAGE.offers).map(({ o, m }) =>
    el("tr", { class: "offer" },
      el("td", {}, el("span", { class: "mono", title: o.provider || "" }, short(o.provider)), " ",
        el("a", { href: o.url, class: "muted" }, o.url)),
      el("td", {}, m.name), el("td", { class: "mono", title: m.cid }, short(m.cid, 10)),
      el("td", { class: "num" }, fmt(m.input_per_mtok, 0)), el("td", { class: "num" }, fmt(m.output_per_mtok, 0)),
      el("td", {}, o.precision), el("td", {}, o.engine), el("td", {}, o.hardware),
      el("td", { class: "num" }, fmt(o.max_concurrency, 0)),
      el("td", {}, o.expires_ms ? (o.expires_ms < now ? "expired" : `in ${Math.round((o.expires_ms - now) / 1000)} s`) : "–"),
      el("td", { class: o.verified ? "ok" : "bad", title: o.error || `offer ${o.cid}` }, o.verified ? "✓ valid" : "✗ invalid")));
  $("#offers tbody").replaceChildren(...rows);
  pager($("#offers-pager"), state.offersPage, pages, (n) => { state.offersPage = n; renderOffers(); });
}

// -- traffic --------------------------------------------------------------------------------------

function renderTraffic(t) {
  $("#t-rps").textContent = fmt(t.requests_per_s, 2);
  $("#t-tps").textContent = fmt(t.tokens_per_s, 1);
  $("#t-p50").textContent = fmt(t.p50_ms, 0);
  $("#t-p99").textContent = fmt(t.p99_ms, 0);
  $("#t-inflight").textContent = fmt(t.in_flight, 0);
  $("#t-total").textContent = fmt(t.requests_total, 0);
  $("#traffic-window").textContent = `(last ${t.window_s} s of OpenAI API calls; blue requests/s, purple tokens/s)`;
  state.history.push([t.requests_per_s || 0, t.tokens_per_s || 0]);
  if (state.history.length > 150) state.history.shift();
  const canvas = $("#spark"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (state.history.length < 2) return;
  [["#1f6feb", 0], ["#8250df", 1]].forEach(([color, k]) => {
    const max = Math.max(1e-9, ...state.history.map((h) => h[k]));
    ctx.strokeStyle = color;
    ctx.beginPath();
    state.history.forEach((h, i) => {
      const x = (i / 149) * canvas.width, y = canvas.height - 4 - (h[k] / max) * (canvas.height - 8);
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
}

// -- any section, as tables -----------------------------------------------------------------------

function renderValue(value, depth = 0) {
  if (value === null || value === undefined) return el("span", { class: "muted" }, "–");
  if (Array.isArray(value)) {
    if (!value.length) return el("span", { class: "muted" }, "none");
    if (value.every((v) => v && typeof v === "object" && !Array.isArray(v)) && depth < 2) {
      const keys = [...new Set(value.flatMap((v) => Object.keys(v)))];
      const shown = value.slice(0, 100);
      return el("table", {}, el("thead", {}, el("tr", {}, ...keys.map((k) => el("th", {}, k)))),
        el("tbody", {}, ...shown.map((v) => el("tr", {}, ...keys.map((k) => el("td", {}, renderValue(v[k], depth + 1)))))),
        value.length > shown.length ? el("caption", {}, `first 100 of ${value.length}`) : null);
    }
    return el("span", {}, value.map((v) => (typeof v === "object" ? JSON.stringify(v) : String(v))).join(", "));
  }
  if (typeof value === "object") {
    if (depth >= 2) return el("span", { class: "mono" }, JSON.stringify(value));
    return el("table", {}, el("tbody", {}, ...Object.entries(value).map(([k, v]) =>
      el("tr", {}, el("th", {}, k), el("td", {}, renderValue(v, depth + 1))))));
  }
  return el("span", {}, typeof value === "number" ? String(Math.round(value * 1000) / 1000) : String(value));
}

function renderSection(id, value, absent) {
  const body = $(`#${id}-body`);
  if (value === undefined) { body.className = "muted"; body.replaceChildren(absent); return; }
  body.className = "";
  body.replaceChildren(renderValue(value));
}

function renderMore(s) {
  const extra = Object.keys(s).filter((k) => !KNOWN.has(k));
  $("#more").replaceChildren(...extra.map((k) => el("div", { class: "extra", "data-section": k },
    el("h2", {}, k[0].toUpperCase() + k.slice(1)), renderValue(s[k]))));
}

// -- log ------------------------------------------------------------------------------------------

async function loadLog() {
  const size = state.logSize;
  const end = state.logEnd === null ? size : Math.max(0, Math.min(state.logEnd, size));
  const start = Math.max(0, end - PAGE.log);
  const page = await getJSON(`/agora/v1/status/log?start=${start}&end=${end}`);
  const rows = page.entries.slice().reverse().map((e) => el("tr", { class: "entry", "data-index": e.index },
    el("td", { class: "num" }, e.index), el("td", {}, e.type),
    el("td", { class: "mono", title: e.cid }, short(e.cid, 10)),
    el("td", { class: "mono", title: e.signer || "" }, short(e.signer, 8)), el("td", {}, e.summary),
    el("td", {}, el("button", { onclick: () => { $("#proof-cid").value = e.cid; checkProof(); } }, "verify"))));
  $("#log-entries tbody").replaceChildren(...rows);
  const pages = Math.max(1, Math.ceil(size / PAGE.log));
  const pageNo = Math.ceil((size - end) / PAGE.log);
  $("#log-page-info").textContent = size ? `entries ${start}–${Math.max(start, end - 1)} of ${size} · page ${pageNo + 1} of ${pages}` : "empty log";
  $("#log-newest").disabled = $("#log-newer").disabled = end >= size;
  $("#log-oldest").disabled = $("#log-older").disabled = start === 0;
}

function logGo(end) {
  state.logEnd = end === null || end >= state.logSize ? null : Math.max(Math.min(PAGE.log, state.logSize), end);
  loadLog().catch(showError);
}

async function checkProof() {
  const cid = $("#proof-cid").value.trim(), out = $("#proof-result");
  out.className = "muted";
  out.textContent = "checking…";
  try {
    const r = await verifyReceipt(cid);
    out.className = r.ok ? "ok" : "bad";
    out.textContent = `${r.ok ? "✓ included" : "✗ not proven"}: ${r.reason} (${r.hash})`;
  } catch (err) {
    out.className = "bad";
    out.textContent = `✗ ${err.message}`;
  }
}

// -- playground -----------------------------------------------------------------------------------

async function loadModels() {
  const select = $("#chat-model");
  try {
    const models = await getJSON("/v1/models");
    select.replaceChildren(...models.data.map((m) => el("option", { value: m.id }, m.id)));
  } catch {
    select.replaceChildren(el("option", { value: "" }, "this node serves no models"));
    $("#chat-send").disabled = true;
  }
}

// The provider that signed a receipt keeps it in its own log: this node's, or a peer's (by peer id).
function logBaseFor(providerId) {
  const s = state.status;
  if (!providerId || providerId === s.node.peer_id) return "";
  const peer = (s.peers || []).find((p) => p.peer_id === providerId && !p.self);
  return peer ? peer.url.replace(/\/$/, "") : "";
}

async function sendChat() {
  const answer = $("#chat-answer"), receipt = $("#chat-receipt"), verdict = $("#chat-verdict");
  answer.textContent = "";
  receipt.textContent = "";
  receipt.removeAttribute("href");
  verdict.textContent = "";
  verdict.className = "";
  $("#chat-send").disabled = true;
  let agora = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "content-type": "application/json", accept: "text/event-stream" },
      body: JSON.stringify({
        model: $("#chat-model").value, stream: true, messages: [{ role: "user", content: $("#chat-input").value }],
        temperature: Number($("#chat-temperature").value), max_tokens: Number($("#chat-max-tokens").value),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body?.error?.message || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { done = true; break; }
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        for (const choice of event.choices || []) answer.textContent += choice.delta?.content || "";
        if (event.agora) agora = event.agora;
      }
    }
    if (!agora) throw new Error("the stream ended without a receipt");
    receipt.textContent = agora.receipt_cid;
    receipt.href = `${logBaseFor(agora.provider)}/agora/v1/records/${agora.receipt_cid}`;
    verdict.textContent = "checking inclusion proof…";
    const r = await verifyReceipt(agora.receipt_cid, logBaseFor(agora.provider));
    verdict.className = r.ok ? "ok" : "bad";
    verdict.textContent = `${r.ok ? "✓ verified in the log" : "✗ not verified"}: ${r.reason} (${r.hash})`;
  } catch (err) {
    verdict.className = "bad";
    verdict.textContent = `✗ ${err.message}`;
  } finally {
    $("#chat-send").disabled = false;
  }
}

// -- polling --------------------------------------------------------------------------------------

function showError(err) {
  $("#updated").textContent = `⚠ ${err.message}`;
}

async function refresh() {
  if (state.polling) return;
  state.polling = true;
  try {
    const s = await getJSON("/agora/v1/status");
    state.status = s;
    renderNode(s);
    renderPeers();
    renderOffers();
    renderTraffic(s.traffic);
    renderSection("verification", s.verification, "No verifier role on this node or its peers yet.");
    renderSection("credits", s.credits, "No credit ledger on this node yet.");
    renderMore(s);
    if (s.log) {
      $("#log-head").textContent = `log ${short(s.log.log_id)} · ${s.log.size} entries · root ${s.log.root}`;
      const grew = s.log.size !== state.logSize;
      state.logSize = s.log.size;
      if (grew && state.logEnd === null) await loadLog();
    }
  } catch (err) {
    showError(err);
  } finally {
    state.polling = false;
  }
}

function init() {
  $("#peers-filter").addEventListener("input", () => { state.peersPage = 0; if (state.status) renderPeers(); });
  $("#proof-check").addEventListener("click", checkProof);
  $("#log-newest").addEventListener("click", () => logGo(null));
  $("#log-newer").addEventListener("click", () => logGo((state.logEnd ?? state.logSize) + PAGE.log));
  $("#log-older").addEventListener("click", () => logGo((state.logEnd ?? state.logSize) - PAGE.log));
  $("#log-oldest").addEventListener("click", () => logGo(0));
  $("#log-goto").addEventListener("change", (ev) => logGo(Number(ev.target.value) + 1));
  $("#chat-send").addEventListener("click", sendChat);
  loadModels();
  refresh().then(() => document.body.setAttribute("data-ready", "1"));
  setInterval(refresh, STATUS_EVERY_MS);
}

init();
