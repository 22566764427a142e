// Two WebTransport sessions (A and B) on one relay LAN speak the BAVY wire protocol:
// Register -> Assigned for both, a broadcast frame A -> B, a 1400-byte frame A -> B that A
// chunks and the relay re-chunks towards B, and Heartbeat -> HeartbeatAck on B. The outcome
// is POSTed as JSON to /result; progress lines also go to /log as they happen, so a test that
// times out can still say how far the page got.
//
// Query string: port (relay UDP port on 127.0.0.1), hash (SHA-256 hex of the relay's
// certificate DER), path (the LAN's WebTransport path).
"use strict";

const CONTROL = 0x00;
const FRAME = 0x01;
const CHUNK = 0x02;
const CHUNK_THRESHOLD = 950;
const CHUNK_PAYLOAD = 900;
const CHUNK_HEADER = 5;
const ETHERTYPE = 0x88b5; // IEEE local experimental EtherType 1
const BROADCAST = new Uint8Array([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
const MAC_A = new Uint8Array([0x52, 0x54, 0x00, 0xaa, 0x00, 0x01]);
const MAC_B = new Uint8Array([0x52, 0x54, 0x00, 0xaa, 0x00, 0x02]);
const BIG_FRAME_SIZE = 1400;
// Datagrams may be lost even on loopback; each exchange is tried a few times, and every
// attempt is reported so the Python side can check the relay's counters against it.
const WAIT_MS = 3000;
const ATTEMPTS = 3;
const CLOSE_WAIT_MS = 3000;

const started = performance.now();
const log = [];

function note(message) {
  const line = `${(performance.now() - started).toFixed(0).padStart(6)} ms ${message}`;
  log.push(line);
  document.getElementById("log").textContent += `${line}\n`;
  fetch("/log", { method: "POST", body: line }).catch(() => {});
}

function hexToBytes(hex) {
  if (!/^(?:[0-9a-f]{2}){32}$/i.test(hex || "")) {
    throw new Error(`hash must be 64 hex digits, got ${JSON.stringify(hex)}`);
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
  return out;
}

function macText(mac) {
  return Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join(":");
}

function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

function control(message) {
  return concat([new Uint8Array([CONTROL]), new TextEncoder().encode(JSON.stringify(message))]);
}

function ethernetFrame(dst, src, payload) {
  const frame = new Uint8Array(14 + payload.length);
  frame.set(dst, 0);
  frame.set(src, 6);
  frame[12] = ETHERTYPE >> 8;
  frame[13] = ETHERTYPE & 0xff;
  frame.set(payload, 14);
  return frame;
}

// The BAVY client's framing: one 0x01 datagram up to 950 bytes, else 900-byte 0x02 chunks.
function encodeFrame(frame, chunkId) {
  if (frame.length <= CHUNK_THRESHOLD) return [concat([new Uint8Array([FRAME]), frame])];
  const total = Math.ceil(frame.length / CHUNK_PAYLOAD);
  const datagrams = [];
  for (let index = 0; index < total; index++) {
    const slice = frame.subarray(index * CHUNK_PAYLOAD, (index + 1) * CHUNK_PAYLOAD);
    const header = new Uint8Array([CHUNK, chunkId >> 8, chunkId & 0xff, index, total]);
    datagrams.push(concat([header, slice]));
  }
  return datagrams;
}

function parseControl(text) {
  try {
    return JSON.parse(text);
  } catch (e) {
    return { type: `unparsable: ${text}` };
  }
}

class Session {
  constructor(name, mac) {
    this.name = name;
    this.mac = mac;
    this.controls = []; // raw JSON text of every 0x00 datagram, in arrival order
    this.frames = []; // {bytes, viaChunks}
    this.datagramsSeen = 0;
    this.chunksSeen = 0;
    this.partials = new Map(); // chunk id -> {total, parts, got}
    this.waiters = new Set();
    this.closing = false;
    this.wt = null;
  }

  async open(url, hash) {
    this.wt = new WebTransport(url, {
      serverCertificateHashes: [{ algorithm: "sha-256", value: hash }],
    });
    this.wt.closed.then(
      (info) => note(`${this.name}: session closed ${JSON.stringify(info)}`),
      (e) => note(`${this.name}: session closed with error: ${e}`),
    );
    await this.wt.ready;
    const dg = this.wt.datagrams;
    this.writer = (dg.createWritable ? dg.createWritable() : dg.writable).getWriter();
    this.reader = dg.readable.getReader();
    this.pump();
    note(`${this.name}: session ready, maxDatagramSize ${dg.maxDatagramSize}`);
  }

  async pump() {
    try {
      for (;;) {
        const { value, done } = await this.reader.read();
        if (done) return;
        this.receive(value);
      }
    } catch (e) {
      if (!this.closing) note(`${this.name}: datagram reader failed: ${e}`);
    }
  }

  receive(d) {
    this.datagramsSeen++;
    if (d.length === 0) {
      note(`${this.name}: empty datagram`);
    } else if (d[0] === CONTROL) {
      this.controls.push(new TextDecoder().decode(d.subarray(1)));
    } else if (d[0] === FRAME) {
      this.frames.push({ bytes: d.slice(1), viaChunks: false });
    } else if (d[0] === CHUNK) {
      this.receiveChunk(d);
    } else {
      note(`${this.name}: unknown datagram type ${d[0]}`);
    }
    for (const wake of [...this.waiters]) wake();
  }

  receiveChunk(d) {
    if (d.length <= CHUNK_HEADER) {
      note(`${this.name}: chunk without payload`);
      return;
    }
    this.chunksSeen++;
    const id = (d[1] << 8) | d[2];
    const index = d[3];
    const total = d[4];
    let partial = this.partials.get(id);
    if (partial === undefined) {
      partial = { total, parts: new Array(total).fill(null), got: 0 };
      this.partials.set(id, partial);
    }
    if (partial.total !== total || index >= total) {
      note(`${this.name}: inconsistent chunk ${id} ${index}/${total}; partial dropped`);
      this.partials.delete(id);
      return;
    }
    if (partial.parts[index] === null) {
      partial.parts[index] = d.slice(CHUNK_HEADER);
      partial.got++;
    }
    if (partial.got === total) {
      this.partials.delete(id);
      this.frames.push({ bytes: concat(partial.parts), viaChunks: true });
      note(`${this.name}: reassembled chunk id ${id} from ${total} chunks`);
    }
  }

  async send(datagram) {
    await this.writer.ready;
    await this.writer.write(datagram);
  }

  // Resolves with predicate()'s first defined value, or undefined after ms.
  until(predicate, ms) {
    return new Promise((resolve) => {
      const check = () => {
        const value = predicate();
        if (value === undefined) return;
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve(value);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        resolve(undefined);
      }, ms);
      this.waiters.add(check);
      check();
    });
  }

  close() {
    if (this.wt === null) return Promise.resolve();
    this.closing = true;
    try {
      this.wt.close({ closeCode: 0, reason: "test done" });
    } catch (e) {
      note(`${this.name}: close failed: ${e}`);
    }
    return this.wt.closed.catch(() => {});
  }
}

// Send what makeDatagrams(attempt) returns from sender until predicate holds on receiver.
async function exchange(what, sender, makeDatagrams, receiver, predicate) {
  for (let attempt = 1; attempt <= ATTEMPTS; attempt++) {
    for (const d of makeDatagrams(attempt)) await sender.send(d);
    const value = await receiver.until(predicate, WAIT_MS);
    if (value !== undefined) {
      note(`${what}: ok (attempt ${attempt})`);
      return { value, attempts: attempt };
    }
    note(`${what}: nothing within ${WAIT_MS} ms (attempt ${attempt})`);
  }
  throw new Error(`${what}: no answer after ${ATTEMPTS} attempts`);
}

function register(session) {
  const message = control({ type: "Register", mac: Array.from(session.mac) });
  return exchange(`${session.name} Register`, session, () => [message], session, () =>
    session.controls.find((text) => parseControl(text).type === "Assigned"),
  );
}

async function run(result, sessions) {
  if (!window.isSecureContext) throw new Error("the page is not a secure context");
  if (typeof WebTransport === "undefined") throw new Error("WebTransport is not available");
  const params = new URLSearchParams(location.search);
  const port = params.get("port");
  const path = params.get("path");
  const hash = hexToBytes(params.get("hash"));
  if (!/^\d+$/.test(port || "") || !(path || "").startsWith("/")) {
    throw new Error(`bad query string ${location.search}`);
  }
  const url = `https://127.0.0.1:${port}${path}`;
  note(`${navigator.userAgent}; relay ${url}`);
  result.userAgent = navigator.userAgent;

  const a = new Session("A", MAC_A);
  const b = new Session("B", MAC_B);
  sessions.push(a, b);
  await Promise.all([a.open(url, hash), b.open(url, hash)]);

  const [regA, regB] = await Promise.all([register(a), register(b)]);
  result.assignedText = regA.value;
  result.assignedTextB = regB.value;
  result.ipA = parseControl(regA.value).ip.join(".");
  result.ipB = parseControl(regB.value).ip.join(".");
  note(`A ${macText(MAC_A)} is ${result.ipA}; B ${macText(MAC_B)} is ${result.ipB}`);

  // 1. A broadcast of about 100 bytes travels as one 0x01 datagram.
  const text = new TextEncoder().encode("relay browser test: broadcast from A ");
  const small = new Uint8Array(100);
  for (let i = 0; i < small.length; i++) small[i] = text[i % text.length];
  const broadcast = ethernetFrame(BROADCAST, MAC_A, small);
  const sentBroadcast = await exchange(
    "broadcast A->B",
    a,
    () => encodeFrame(broadcast),
    b,
    () => b.frames.find((f) => equalBytes(f.bytes, broadcast)),
  );
  result.broadcastOk = true;
  result.broadcastAttempts = sentBroadcast.attempts;

  // 2. A 1400-byte unicast frame, chunked by the page (900 + 500) and re-chunked by the relay.
  const pattern = new Uint8Array(BIG_FRAME_SIZE - 14);
  for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7) & 0xff;
  const big = ethernetFrame(MAC_B, MAC_A, pattern);
  const firstChunkId = Math.floor(Math.random() * 0x10000);
  const chunksBefore = b.chunksSeen;
  const sentBig = await exchange(
    "1400-byte frame A->B",
    a,
    (attempt) => {
      const datagrams = encodeFrame(big, (firstChunkId + attempt - 1) & 0xffff);
      result.bigFrameDatagramSizes = datagrams.map((d) => d.length);
      return datagrams;
    },
    b,
    () => b.frames.find((f) => equalBytes(f.bytes, big)),
  );
  result.bigFrameOk = true;
  result.bigFrameViaChunks = sentBig.value.viaChunks;
  result.bigFrameAttempts = sentBig.attempts;
  result.chunksSeenByB = b.chunksSeen - chunksBefore;
  result.framesSent = sentBroadcast.attempts + sentBig.attempts;

  // 3. Heartbeat -> HeartbeatAck on B.
  const acks = await exchange(
    "B Heartbeat",
    b,
    () => [control({ type: "Heartbeat" })],
    b,
    () => b.controls.find((t) => parseControl(t).type === "HeartbeatAck"),
  );
  result.heartbeatAck = true;
  result.heartbeatAckText = acks.value;

  // The relay must not send A's own frames back to A.
  result.echoesSeenByA = a.frames.filter((f) => equalBytes(f.bytes.subarray(6, 12), MAC_A)).length;
  result.framesSeenByA = a.frames.length;
  result.framesSeenByB = b.frames.length;
  result.datagramsSeen = { A: a.datagramsSeen, B: b.datagramsSeen };
  result.controlsSeen = { A: a.controls, B: b.controls };
}

async function main() {
  const result = {
    ok: false,
    ipA: null,
    ipB: null,
    broadcastOk: false,
    bigFrameOk: false,
    chunksSeenByB: 0,
    heartbeatAck: false,
    assignedText: null,
    error: null,
    log,
  };
  const sessions = [];
  try {
    await run(result, sessions);
    result.ok = true;
  } catch (e) {
    result.ok = false;
    result.error = String(e);
    result.stack = e && e.stack ? String(e.stack) : null;
    note(`failed: ${e}`);
  }
  const closing = Promise.all(sessions.map((s) => s.close()));
  const timeout = new Promise((resolve) => setTimeout(() => resolve("timeout"), CLOSE_WAIT_MS));
  result.closed = (await Promise.race([closing.then(() => "closed"), timeout])) === "closed";
  note(`sessions ${result.closed ? "closed" : "not closed in time"}; posting result`);
  try {
    await fetch("/result", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(result),
    });
  } catch (e) {
    note(`posting the result failed: ${e}`);
  }
}

main();
