// The node dashboard: polls /agora/v1/status, pages through the log, checks inclusion proofs in the
// page, and streams playground chats from /v1/chat/completions. Everything a peer reports is shown
// as text (never as HTML): peers are untrusted.
import { verifyReceipt } from "./merkle.js";

const STATUS_EVERY_MS = 2000;
const PAGE = { peers: 25, offers: 25, log: 50 };
const KNOWN = new Set(["node", "health", "traffic", "offers", "peers", "log", "verification", "credits", "routing"]);
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
// One formatter each: toLocaleString builds a new one per call, which a page of 200 peers feels.
const GROUPED = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const CENTS = new Intl.NumberFormat("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const count = (x) => (x === null || x === undefined ? "–" : GROUPED.format(Math.round(x)));
// Credits are kept in micro-credits (µcr); a whole credit and up reads better in credits.
const credits = (micro) => (micro === null || micro === undefined ? "–" : Math.abs(micro) >= 1e6
  ? `${CENTS.format(micro / 1e6)} cr`
  : `${count(micro)} µcr`);
const millis = (ms) => (ms === null || ms === undefined ? "–" : ms < 1000 ? `${ms.toFixed(ms < 10 ? 1 : 0)} ms`
  : `${(ms / 1000).toFixed(2)} s`);
const seconds = (s) => (s === null || s === undefined ? "–" : s < 120 ? `${Math.round(s)} s`
  : s < 7200 ? `${Math.round(s / 60)} min` : s < 172800 ? `${(s / 3600).toFixed(1)} h` : `${(s / 86400).toFixed(1)} d`);
const when = (epochMs) => new Date(epochMs).toLocaleString();
const percent = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(x < 0.1 ? 1 : 0)}%`);
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
  $("#node-id").title = `${s.node.url || ""} · agoranet ${s.node.version} · up ${seconds(s.node.uptime_s)}`;
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
      el("td", { class: "num" }, millis(t.p50_ms)), el("td", { class: "num" }, millis(t.p99_ms)),
      el("td", { class: "num" }, fmt(t.in_flight, 0)), el("td", { class: "num" }, count(p.log_size)),
      el("td", { class: "num" }, p.via ? "via gossip" : millis(p.rtt_ms)));
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
      el("td", { class: "num", title: `${count(m.input_per_mtok)} µcr` }, credits(m.input_per_mtok)),
      el("td", { class: "num", title: `${count(m.output_per_mtok)} µcr` }, credits(m.output_per_mtok)),
      el("td", {}, o.precision), el("td", {}, o.engine), el("td", {}, o.hardware),
      el("td", { class: "num" }, fmt(o.max_concurrency, 0)),
      el("td", { title: o.expires_ms ? when(o.expires_ms) : "" },
        o.expires_ms ? (o.expires_ms < now ? "expired" : `in ${seconds((o.expires_ms - now) / 1000)}`) : "–"),
      el("td", { class: o.verified ? "ok" : "bad", title: o.error || `offer ${o.cid}` }, o.verified ? "✓ valid" : "✗ invalid")));
  $("#offers tbody").replaceChildren(...rows);
  pager($("#offers-pager"), state.offersPage, pages, (n) => { state.offersPage = n; renderOffers(); });
}

// -- traffic --------------------------------------------------------------------------------------

function renderTraffic(t) {
  $("#t-rps").textContent = fmt(t.requests_per_s, 2);
  $("#t-tps").textContent = fmt(t.tokens_per_s, 1);
  $("#t-p50").textContent = millis(t.p50_ms);
  $("#t-p99").textContent = millis(t.p99_ms);
  $("#t-inflight").textContent = fmt(t.in_flight, 0);
  $("#t-total").textContent = count(t.requests_total);
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

// -- routing (gateways) ---------------------------------------------------------------------------

function reputation(r) {
  if (!r) return el("span", { class: "muted" }, "no verdicts");
  if (r.excluded) return el("span", { class: "bad" }, r.violations ? "✗ violation (unjudgeable receipt)" : "✗ fraud proven");
  return el("span", { class: r.passed === r.verified ? "ok" : "warn" }, `${r.passed} of ${r.verified} passed`);
}

function renderRouting(r) {
  const section = $("#routing");
  section.hidden = !r;
  if (!r) return;
  const lat = r.latency || {};
  $("#r-providers").textContent = `${r.providers.filter((p) => p.state === "ok").length} of ${r.providers.length}`;
  $("#r-ttft50").textContent = millis(lat.ttft_p50_ms);
  $("#r-ttft95").textContent = millis(lat.ttft_p95_ms);
  $("#r-p50").textContent = millis(lat.p50_ms);
  $("#r-p95").textContent = millis(lat.p95_ms);
  $("#r-failovers").textContent = count(r.failovers);
  $("#routing-note").textContent = `(what this gateway routes over; latency over the last ${seconds(lat.window_s)}` +
    `${r.requires_keys ? "; API key required" : ""}${r.charges_credits ? "; charges credits" : ""})`;
  const rows = r.providers.map((p) => el("tr", { class: "route", "data-peer": p.peer },
    el("td", {}, el("span", { class: "mono", title: p.peer }, short(p.peer)), " ", el("a", { href: p.url, class: "muted" }, p.url)),
    el("td", {}, ...p.models.map((m) => el("div", { title: m.cid }, `${m.name}: `,
      el("span", { class: "price" }, `${credits(m.input_per_mtok)} in · ${credits(m.output_per_mtok)} out`)))),
    el("td", {}, `${p.precision} · ${p.engine}`),
    el("td", { class: p.state === "ok" ? "ok" : p.state.startsWith("excluded") ? "bad" : "warn" }, p.state),
    el("td", {}, reputation(p.reputation)),
    el("td", { class: "num share" }, percent(p.share)), el("td", { class: "num served" }, count(p.served)),
    el("td", { class: "num errors" }, count(p.errors)),
    el("td", { class: "num tokens" }, `${count(p.prompt_tokens)} / ${count(p.completion_tokens)}`),
    el("td", { class: "num" }, millis(p.ttft_ms)), el("td", { class: "num" }, fmt(p.tokens_per_s, 1)),
    el("td", { class: "num charged", title: `${count(p.charged)} µcr` }, credits(p.charged))));
  $("#routing-providers tbody").replaceChildren(...rows);
}

// -- credits --------------------------------------------------------------------------------------

function renderCredits(c) {
  const body = $("#credits-body");
  if (!c) { body.className = "muted"; body.replaceChildren("No credit ledger on this node yet."); return; }
  body.className = "";
  const tile = (value, label) => el("div", { class: "tile" }, el("b", {}, value), el("span", {}, label));
  const accounts = c.by_account || [];
  const row = (a) => el("tr", { class: `account ${a.kind}`, "data-account": a.id },
    el("td", {}, a.kind), el("td", {}, a.name ? el("span", {}, a.name, " ", el("span", { class: "mono muted" }, a.id))
      : el("span", { class: "mono", title: a.id }, short(a.id))),
    el("td", { class: "num balance", title: `${count(a.balance)} µcr` }, credits(a.balance)),
    el("td", { class: "num" }, a.charged === undefined ? "" : credits(a.charged)),
    el("td", { class: "num" }, a.used_tokens === undefined ? "" : count(a.used_tokens)),
    el("td", { class: "num" }, a.requests === undefined ? "" : count(a.requests)));
  body.replaceChildren(
    el("div", { class: "tiles" }, tile(credits(c.users), "users' balances"), tile(credits(c.providers), "earned by providers"),
      tile(credits(c.verifiers), "verifiers' fees"), tile(credits(c.operator), "operator"),
      tile(credits(c.held), `held for ${count(c.open_requests)} open requests`)),
    accounts.length ? el("div", { class: "scroll" }, el("table", { id: "credit-accounts" },
      el("thead", {}, el("tr", {}, el("th", {}, "account"), el("th", {}, "who"), el("th", { class: "num" }, "balance"),
        el("th", { class: "num" }, "spent"), el("th", { class: "num" }, "tokens used"), el("th", { class: "num" }, "requests"))),
      el("tbody", {}, ...accounts.map(row)))) : el("p", { class: "muted" }, "no accounts yet"));
}

// -- any section, as tables -----------------------------------------------------------------------

// Numbers read by their key: epoch milliseconds as dates, durations in ms or s in human units.
function renderNumber(key, value) {
  if (key && /_ms$/.test(key)) return value > 1e12 ? when(value) : millis(value);
  if (key && /(^|_)s$/.test(key)) return seconds(value);
  return String(Math.round(value * 1000) / 1000);
}

function renderValue(value, depth = 0, key = "") {
  if (value === null || value === undefined) return el("span", { class: "muted" }, "–");
  if (Array.isArray(value)) {
    if (!value.length) return el("span", { class: "muted" }, "none");
    if (value.every((v) => v && typeof v === "object" && !Array.isArray(v)) && depth < 2) {
      const keys = [...new Set(value.flatMap((v) => Object.keys(v)))];
      const shown = value.slice(0, 100);
      return el("table", {}, el("thead", {}, el("tr", {}, ...keys.map((k) => el("th", {}, k)))),
        el("tbody", {}, ...shown.map((v) => el("tr", {}, ...keys.map((k) => el("td", {}, renderValue(v[k], depth + 1, k)))))),
        value.length > shown.length ? el("caption", {}, `first 100 of ${value.length}`) : null);
    }
    return el("span", {}, value.map((v) => (typeof v === "object" ? JSON.stringify(v) : String(v))).join(", "));
  }
  if (typeof value === "object") {
    if (depth >= 2) return el("span", { class: "mono" }, JSON.stringify(value));
    return el("table", {}, el("tbody", {}, ...Object.entries(value).map(([k, v]) =>
      el("tr", {}, el("th", {}, k), el("td", {}, renderValue(v, depth + 1, k))))));
  }
  return el("span", {}, typeof value === "number" ? renderNumber(key, value) : String(value));
}

function renderSection(id, value, absent) {
  const body = $(`#${id}-body`);
  if (value === undefined) { body.className = "muted"; body.replaceChildren(absent); return; }
  body.className = "scroll";
  body.replaceChildren(renderValue(value));
}

function renderMore(s) {
  const extra = Object.keys(s).filter((k) => !KNOWN.has(k));
  $("#more").replaceChildren(...extra.map((k) => el("div", { class: "extra", "data-section": k },
    el("h2", {}, k[0].toUpperCase() + k.slice(1)), el("div", { class: "scroll" }, renderValue(s[k])))));
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
    const key = $("#chat-key").value.trim();
    sessionStorage.setItem("agora-api-key", key);  // this tab only: gone when it closes
    const headers = { "content-type": "application/json", accept: "text/event-stream" };
    if (key) headers.authorization = `Bearer ${key}`;
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers,
      body: JSON.stringify({
        model: $("#chat-model").value, stream: true, messages: [{ role: "user", content: $("#chat-input").value }],
        temperature: Number($("#chat-temperature").value), max_tokens: Number($("#chat-max-tokens").value),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const needsKey = response.status === 401 && !key ? " (enter an API key above)" : "";
      throw new Error((body?.error?.message || `HTTP ${response.status}`) + needsKey);
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
    renderRouting(s.routing);
    renderCredits(s.credits);
    renderMore(s);
    if (s.log) {
      $("#log-head").textContent = `log ${short(s.log.log_id)} · ${count(s.log.size)} entries · root ${s.log.root}`;
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
  $("#chat-key").value = sessionStorage.getItem("agora-api-key") || "";
  loadModels();
  refresh().then(() => document.body.setAttribute("data-ready", "1"));
  setInterval(refresh, STATUS_EVERY_MS);
}

init();
