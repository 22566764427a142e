// The relay's live dashboard: the certificate hashes from /cert-hash, LANs, peers and counters
// from /status every 2 s, and a "Test connection" button that opens a WebTransport session
// from this browser to the relay, registers a MAC, times five Heartbeat -> HeartbeatAck round
// trips and disconnects. Plain ES2020, no build step, nothing loaded from elsewhere.
//
// Query string (all optional):
//   quic_port=N  UDP port of the relay's WebTransport side (default: this page's port, as the
//                relay serves HTTP on the same port number as QUIC by default)
//   lan=NAME     the LAN the connection test joins (default: the default LAN, path "/")
"use strict";

const POLL_MS = 2000;
const CERT_REFRESH_MS = 60000; // the relay may rotate or reload its certificate
const FETCH_TIMEOUT_MS = 5000;
const CONNECT_TIMEOUT_MS = 10000;
const CLOSE_TIMEOUT_MS = 2000;
const REPLY_TIMEOUT_MS = 1000; // datagrams may be lost: each request is sent again after this
const ATTEMPTS = 3;
const HEARTBEATS = 5;
const CONTROL = 0x00; // BAVY datagram type of a JSON control message
const MAC_KEY = "relay-dashboard-test-mac";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// -- formatting ---------------------------------------------------------------------------

function setText(id, value) {
  $(id).textContent = value;
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function hexToBytes(hex) {
  if (!/^(?:[0-9a-f]{2})+$/i.test(hex || "")) throw new Error(`bad hex hash ${hex}`);
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
  return out;
}

function macText(mac) {
  if (!Array.isArray(mac)) return String(mac);
  return mac.map((b) => Number(b).toString(16).padStart(2, "0")).join(":");
}

function ipText(ip) {
  return Array.isArray(ip) ? ip.join(".") : String(ip);
}

function duration(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${s % 60} s`;
  return `${s} s`;
}

// Times come as Unix seconds or as ISO 8601 text; both are shown as UTC.
function timeText(value) {
  if (value === null || value === undefined || value === "") return "–";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return `${date.toISOString().slice(0, 19).replace("T", " ")} UTC`;
}

// "12 s ago", measured against the relay's own clock when it sent one (no browser skew).
function ago(value, now) {
  const then = typeof value === "number" ? value * 1000 : Date.parse(value);
  const reference = now ? Date.parse(now) : Date.now();
  if (Number.isNaN(then) || Number.isNaN(reference)) return timeText(value);
  return `${duration((reference - then) / 1000)} ago`;
}

function bytesText(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n) || 0;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

// {a: {b: 1}, c: 2} -> [["a.b", 1], ["c", 2]]
function flatten(object, prefix = "") {
  const rows = [];
  for (const [key, value] of Object.entries(object || {})) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      rows.push(...flatten(value, name));
    } else {
      rows.push([name, Array.isArray(value) ? value.join(", ") : value]);
    }
  }
  return rows;
}

function definitionList(rows) {
  const list = element("dl");
  for (const [name, value] of rows) {
    list.append(element("dt", name), element("dd", value));
  }
  if (rows.length === 0) list.append(element("dt", "none"), element("dd", "–"));
  return list;
}

function table(caption, headers, rows) {
  const node = element("table");
  node.append(element("caption", caption));
  const head = element("tr");
  for (const h of headers) {
    const th = element("th", h);
    th.scope = "col";
    head.append(th);
  }
  node.createTHead().append(head);
  const body = node.createTBody();
  for (const cells of rows) {
    const tr = element("tr");
    for (const cell of cells) tr.append(element("td", cell));
    body.append(tr);
  }
  if (rows.length === 0) {
    const td = element("td", "no peers");
    td.colSpan = headers.length;
    body.insertRow().append(td);
  }
  return node;
}

async function fetchJson(path) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch(path, { cache: "no-store", signal: controller.signal });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return await response.json();
  } finally {
    clearTimeout(timer);
  }
}

// -- certificate ---------------------------------------------------------------------------

function certHashes(cert) {
  if (Array.isArray(cert.hashes) && cert.hashes.length > 0) return cert.hashes;
  return [{ algorithm: cert.algorithm || "sha-256", value: cert.hash }];
}

function renderCert(cert) {
  setText(
    "cert-mode",
    cert.self_signed
      ? "self-signed (clients pin these hashes)"
      : "CA-signed (browsers verify it as usual)",
  );
  const body = $("cert-hashes");
  body.replaceChildren();
  certHashes(cert).forEach((entry, index) => {
    const tr = element("tr");
    const hash = element("td");
    hash.append(element("code", entry.value, "hash"));
    if (index > 0) hash.append(element("span", " (next)", "note"));
    const from = element("td", timeText(entry.not_before));
    tr.append(hash, from, element("td", timeText(entry.not_after)));
    body.append(tr);
  });
}

async function loadCert() {
  const cert = await fetchJson("cert-hash");
  renderCert(cert);
  setText("cert-error", "");
  return cert;
}

// -- status --------------------------------------------------------------------------------

let statusSequence = 0; // a slow answer must not overwrite a newer one
let statusShown = 0;

function peerCount(lan) {
  return lan.peer_count ?? (lan.peers || []).length;
}

function peerRow(peer, now) {
  return [
    peer.mac === null || peer.mac === undefined ? "(not registered)" : macText(peer.mac),
    peer.ip === null || peer.ip === undefined ? "–" : ipText(peer.ip),
    peer.raw ? "raw" : "BAVY",
    timeText(peer.connected_since),
    ago(peer.last_seen, now),
    `${peer.frames_in ?? 0} / ${peer.frames_out ?? 0}`,
    `${bytesText(peer.bytes_in)} / ${bytesText(peer.bytes_out)}`,
  ];
}

const PEER_HEADERS = [
  "MAC",
  "IP",
  "Framing",
  "Connected since",
  "Last seen",
  "Frames in / out",
  "Bytes in / out",
];

function renderLan(lan, now) {
  const section = element("section", undefined, "lan");
  const peers = lan.peers || [];
  const count = peerCount(lan);
  section.append(element("h3", `LAN ${lan.name}`));
  const summary = [`${count} peer${count === 1 ? "" : "s"}`];
  summary.push(`${lan.frames_switched ?? 0} frames switched`);
  if (lan.frames_flooded !== undefined) summary.push(`${lan.frames_flooded} flooded`);
  if (lan.mac_entries !== undefined) summary.push(`${lan.mac_entries} MACs learned`);
  section.append(element("p", summary.join(" · ")));
  const rows = peers.map((p) => peerRow(p, now));
  section.append(table(`Peers on LAN ${lan.name}`, PEER_HEADERS, rows));
  if (peers.length < count) {
    section.append(element("p", `(${count - peers.length} more not listed)`, "note"));
  }
  const details = [
    ["Drops by reason", flatten(lan.drops)],
    ["Gateway answers", flatten(lan.gateway && lan.gateway.answered)],
    ["Gateway drops", flatten(lan.gateway && lan.gateway.drops)],
  ];
  for (const [title, rows] of details) {
    if (rows.length > 0) section.append(element("h4", title), definitionList(rows));
  }
  return section;
}

function counterBox(title, object) {
  const box = element("section");
  box.append(element("h3", title), definitionList(flatten(object)));
  return box;
}

function renderStatus(status) {
  const lans = status.lans || [];
  setText("version", status.version ?? "?");
  setText("uptime", duration(status.uptime_s));
  setText("peer-count", String(lans.reduce((n, lan) => n + peerCount(lan), 0)));
  const lanList = $("lans");
  lanList.replaceChildren(...lans.map((lan) => renderLan(lan, status.now)));
  if (lans.length === 0) lanList.append(element("p", "No LAN has been created yet."));
  const boxes = [];
  if (status.quic) boxes.push(counterBox("QUIC", status.quic));
  if (status.nat) boxes.push(counterBox("NAT", status.nat));
  if (status.dns) boxes.push(counterBox("DNS", status.dns));
  if (status.lans_refused !== undefined || status.lans_evicted !== undefined) {
    boxes.push(counterBox("LANs", { refused: status.lans_refused, evicted: status.lans_evicted }));
  }
  if (status.listening) boxes.push(counterBox("Listening", status.listening));
  $("counters").replaceChildren(...boxes);
}

async function refreshStatus() {
  const sequence = ++statusSequence;
  try {
    const status = await fetchJson("status");
    if (sequence < statusShown) return;
    statusShown = sequence;
    renderStatus(status);
    setText("poll-state", `updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    setText("poll-state", `status unavailable: ${e.message}`);
  }
}

function pollStatus() {
  refreshStatus().finally(() => setTimeout(pollStatus, POLL_MS));
}

// -- connection test -------------------------------------------------------------------------

function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function relayUrl() {
  const defaultPort = location.protocol === "https:" ? "443" : "80";
  const port = params.get("quic_port") || location.port || defaultPort;
  if (!/^\d+$/.test(port)) throw new Error(`bad quic_port ${port}`);
  const lan = params.get("lan");
  const path = lan ? `/lan/${encodeURIComponent(lan)}` : "/";
  // location.hostname keeps the brackets of an IPv6 literal.
  return `https://${location.hostname}:${port}${path}`;
}

// A random locally administered unicast MAC, kept per browser so repeated tests reuse one
// lease instead of taking a new address from the LAN's pool each time.
function testMac() {
  let stored = null;
  try {
    stored = JSON.parse(localStorage.getItem(MAC_KEY) || "null");
  } catch (e) {
    stored = null;
  }
  const valid =
    Array.isArray(stored) &&
    stored.length === 6 &&
    stored.every((b) => Number.isInteger(b) && b >= 0 && b <= 255) &&
    (stored[0] & 0x03) === 0x02; // locally administered, unicast
  if (valid) return stored;
  const mac = Array.from(crypto.getRandomValues(new Uint8Array(6)));
  mac[0] = (mac[0] & 0xfc) | 0x02;
  try {
    localStorage.setItem(MAC_KEY, JSON.stringify(mac));
  } catch (e) {
    // private mode: a fresh MAC next time
  }
  return mac;
}

// The control-message side of one BAVY session: JSON after a 0x00 type byte, both ways.
class ControlSession {
  constructor(transport) {
    const datagrams = transport.datagrams;
    const writable = datagrams.createWritable ? datagrams.createWritable() : datagrams.writable;
    this.writer = writable.getWriter();
    this.reader = datagrams.readable.getReader();
    this.waiters = [];
    this.pump();
  }

  async pump() {
    try {
      for (;;) {
        const { value, done } = await this.reader.read();
        if (done) return;
        this.receive(value, performance.now());
      }
    } catch (e) {
      // the session closed
    }
  }

  receive(datagram, at) {
    if (datagram.length < 2 || datagram[0] !== CONTROL) return; // LAN frames are not for us
    let message;
    try {
      message = JSON.parse(decoder.decode(datagram.subarray(1)));
    } catch (e) {
      return;
    }
    const index = this.waiters.findIndex((w) => w.accepts(message));
    if (index >= 0) this.waiters.splice(index, 1)[0].resolve({ message, at });
  }

  async send(message) {
    const json = encoder.encode(JSON.stringify(message)); // compact, "type" first
    const datagram = new Uint8Array(json.length + 1);
    datagram[0] = CONTROL;
    datagram.set(json, 1);
    await this.writer.ready;
    await this.writer.write(datagram);
  }

  // Send message until a reply accepts() takes arrives; rtt counts from the last send.
  async request(message, accepts) {
    let resolve;
    const answer = new Promise((r) => {
      resolve = r;
    });
    const waiter = { accepts, resolve };
    this.waiters.push(waiter);
    try {
      for (let attempt = 1; attempt <= ATTEMPTS; attempt++) {
        const sentAt = performance.now();
        await this.send(message);
        const reply = await Promise.race([answer, delay(REPLY_TIMEOUT_MS).then(() => null)]);
        if (reply !== null) return { message: reply.message, rtt: reply.at - sentAt };
      }
      throw new Error(`no answer to ${message.type} after ${ATTEMPTS} attempts`);
    } finally {
      this.waiters = this.waiters.filter((w) => w !== waiter);
    }
  }
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

async function closeQuietly(transport, reason) {
  try {
    transport.close({ closeCode: 0, reason });
  } catch (e) {
    // already closed (the relay closes the session on Disconnect)
  }
  await withTimeout(transport.closed, CLOSE_TIMEOUT_MS, "closing").catch(() => {});
}

async function testConnection() {
  const button = $("test-connection");
  button.disabled = true;
  for (const id of ["test-ip", "rtt-ms", "rtt-samples"]) setText(id, "–");
  setText("test-error", "");
  let transport = null;
  try {
    if (typeof WebTransport === "undefined") {
      throw new Error(
        window.isSecureContext
          ? "this browser has no WebTransport"
          : "WebTransport needs a secure context: open this page over HTTPS, or on localhost " +
              "(e.g. through an SSH tunnel)",
      );
    }
    setText("test-state", "fetching the certificate hash");
    const cert = await loadCert();
    const url = relayUrl();
    setText("test-url", url);
    const options = {};
    if (cert.self_signed) {
      options.serverCertificateHashes = certHashes(cert).map((h) => ({
        algorithm: "sha-256",
        value: hexToBytes(h.value),
      }));
    }
    setText("test-state", "connecting");
    transport = new WebTransport(url, options);
    transport.closed.catch(() => {}); // reported through ready or request failures instead
    try {
      await withTimeout(transport.ready, CONNECT_TIMEOUT_MS, "the WebTransport handshake");
    } catch (e) {
      throw new Error(`cannot open a WebTransport session to ${url}: ${e.message || e}`);
    }
    const session = new ControlSession(transport);

    setText("test-state", "registering");
    const mac = testMac();
    const registered = await session.request(
      { type: "Register", mac },
      (m) => m.type === "Assigned" || m.type === "Error",
    );
    if (registered.message.type === "Error") {
      throw new Error(`the relay refused the registration: ${registered.message.message}`);
    }
    setText("test-ip", ipText(registered.message.ip));
    await refreshStatus(); // the test peer shows up in the table

    setText("test-state", "measuring");
    const samples = [];
    for (let i = 0; i < HEARTBEATS; i++) {
      const ack = await session.request({ type: "Heartbeat" }, (m) => m.type === "HeartbeatAck");
      samples.push(ack.rtt);
    }
    setText("rtt-samples", samples.map((s) => s.toFixed(1)).join(", "));
    setText("rtt-ms", median(samples).toFixed(1));

    setText("test-state", "disconnecting");
    await session.send({ type: "Disconnect" });
    await closeQuietly(transport, "dashboard test done");
    transport = null;
    setText("test-state", `done (MAC ${macText(mac)})`);
  } catch (e) {
    setText("test-state", "failed");
    setText("test-error", `Connection test failed: ${e && e.message ? e.message : e}`);
    if (transport !== null) await closeQuietly(transport, "dashboard test failed");
  } finally {
    button.disabled = false;
    refreshStatus();
  }
}

// -- start -----------------------------------------------------------------------------------

function start() {
  try {
    setText("test-url", relayUrl());
  } catch (e) {
    setText("test-error", e.message);
  }
  $("test-connection").addEventListener("click", testConnection);
  const refreshCert = () =>
    loadCert()
      .catch((e) => setText("cert-error", `Cannot load /cert-hash: ${e.message}`))
      .finally(() => setTimeout(refreshCert, CERT_REFRESH_MS));
  refreshCert();
  pollStatus();
}

start();
