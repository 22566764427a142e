// Two WebTransport sessions (A and B) on one relay LAN speak the BAVY wire protocol:
// Register -> Assigned for both; then, as real IPv4 frames the page builds itself from each
// session's own MAC and assigned address (the relay's port security drops anything else):
// a broadcast UDP frame A -> B, a 1400-byte UDP frame A -> B that A chunks and the relay
// re-chunks towards B, an ARP request from A for the gateway 10.0.2.2 and its reply, an ICMP
// echo from B to the gateway (at the MAC that ARP reply gave) and its reply; and Heartbeat ->
// HeartbeatAck on B. The outcome is POSTed as JSON to /result; progress lines also go to /log
// as they happen, so a test that times out can still say how far the page got.
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
const ETHERTYPE_IPV4 = 0x0800;
const ETHERTYPE_ARP = 0x0806;
const IPPROTO_ICMP = 1;
const IPPROTO_UDP = 17;
const ARP_REQUEST = 1;
const ARP_REPLY = 2;
const ICMP_ECHO_REPLY = 0;
const ICMP_ECHO_REQUEST = 8;
const PING_ID = 0x1234;
const PING_TAG = "RISCV_PING";
const TEST_PORT_A = 40000; // UDP ports of the A -> B frames (never DHCP's 67/68)
const TEST_PORT_B = 40001;
const BROADCAST = new Uint8Array([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
const ZERO_MAC = new Uint8Array(6);
const LAN_BROADCAST_IP = new Uint8Array([10, 0, 2, 255]);
const GATEWAY_IP = new Uint8Array([10, 0, 2, 2]);
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

function ipText(ip) {
  return Array.from(ip).join(".");
}

function hexText(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function randomBytes(n) {
  return crypto.getRandomValues(new Uint8Array(n));
}

// -- frames the page builds ----------------------------------------------------------------

// RFC 1071: the ones' complement of the ones' complement sum of 16-bit words. Summed over a
// header or message that carries a correct checksum, it is 0.
function internetChecksum(bytes) {
  let sum = 0;
  for (let i = 0; i + 1 < bytes.length; i += 2) sum += (bytes[i] << 8) | bytes[i + 1];
  if (bytes.length % 2) sum += bytes[bytes.length - 1] << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

function ethernetFrame(dst, src, ethertype, payload) {
  const frame = new Uint8Array(14 + payload.length);
  frame.set(dst, 0);
  frame.set(src, 6);
  frame[12] = ethertype >> 8;
  frame[13] = ethertype & 0xff;
  frame.set(payload, 14);
  return frame;
}

let nextIpIdent = 1;

// A 20-byte IPv4 header (TTL 64, DF clear) with its checksum, then the payload.
function ipv4Packet(src, dst, proto, payload) {
  const packet = new Uint8Array(20 + payload.length);
  const view = new DataView(packet.buffer);
  packet[0] = 0x45;
  view.setUint16(2, packet.length);
  view.setUint16(4, nextIpIdent++ & 0xffff);
  packet[8] = 64;
  packet[9] = proto;
  packet.set(src, 12);
  packet.set(dst, 16);
  view.setUint16(10, internetChecksum(packet.subarray(0, 20)));
  packet.set(payload, 20);
  return packet;
}

// A UDP datagram with checksum 0 ("none", allowed over IPv4).
function udpDatagram(sport, dport, payload) {
  const datagram = new Uint8Array(8 + payload.length);
  const view = new DataView(datagram.buffer);
  view.setUint16(0, sport);
  view.setUint16(2, dport);
  view.setUint16(4, datagram.length);
  datagram.set(payload, 8);
  return datagram;
}

function udpFrame(dstMac, srcMac, srcIp, dstIp, payload) {
  const udp = udpDatagram(TEST_PORT_A, TEST_PORT_B, payload);
  return ethernetFrame(dstMac, srcMac, ETHERTYPE_IPV4, ipv4Packet(srcIp, dstIp, IPPROTO_UDP, udp));
}

// An Ethernet/IPv4 ARP packet.
function arpPacket(op, senderMac, senderIp, targetMac, targetIp) {
  const packet = new Uint8Array(28);
  const view = new DataView(packet.buffer);
  view.setUint16(0, 1); // hardware: Ethernet
  view.setUint16(2, ETHERTYPE_IPV4);
  packet[4] = 6;
  packet[5] = 4;
  view.setUint16(6, op);
  packet.set(senderMac, 8);
  packet.set(senderIp, 14);
  packet.set(targetMac, 18);
  packet.set(targetIp, 24);
  return packet;
}

function icmpEcho(type, id, seq, data) {
  const message = new Uint8Array(8 + data.length);
  const view = new DataView(message.buffer);
  message[0] = type;
  view.setUint16(4, id);
  view.setUint16(6, seq);
  message.set(data, 8);
  view.setUint16(2, internetChecksum(message));
  return message;
}

// -- frames the page reads -----------------------------------------------------------------

function ethertypeOf(frame) {
  return frame.length >= 14 ? (frame[12] << 8) | frame[13] : -1;
}

function parseArp(frame) {
  if (ethertypeOf(frame) !== ETHERTYPE_ARP || frame.length < 14 + 28) return null;
  const view = new DataView(frame.buffer, frame.byteOffset + 14, 28);
  if (view.getUint16(0) !== 1 || view.getUint16(2) !== ETHERTYPE_IPV4) return null;
  if (frame[18] !== 6 || frame[19] !== 4) return null;
  return {
    ethDst: frame.subarray(0, 6),
    ethSrc: frame.subarray(6, 12),
    op: view.getUint16(6),
    senderMac: frame.subarray(22, 28),
    senderIp: frame.subarray(28, 32),
    targetMac: frame.subarray(32, 38),
    targetIp: frame.subarray(38, 42),
  };
}

function parseIpv4(frame) {
  if (ethertypeOf(frame) !== ETHERTYPE_IPV4 || frame.length < 14 + 20) return null;
  const headerLen = (frame[14] & 0x0f) * 4;
  const totalLen = (frame[16] << 8) | frame[17];
  if (frame[14] >> 4 !== 4 || headerLen < 20 || totalLen < headerLen) return null;
  if (14 + totalLen > frame.length) return null;
  return {
    ethDst: frame.subarray(0, 6),
    ethSrc: frame.subarray(6, 12),
    ttl: frame[22],
    proto: frame[23],
    src: frame.subarray(26, 30),
    dst: frame.subarray(30, 34),
    headerChecksumOk: internetChecksum(frame.subarray(14, 14 + headerLen)) === 0,
    payload: frame.subarray(14 + headerLen, 14 + totalLen),
  };
}

function parseIcmpEcho(message) {
  if (message.length < 8) return null;
  const view = new DataView(message.buffer, message.byteOffset, 8);
  return {
    type: message[0],
    code: message[1],
    id: view.getUint16(4),
    seq: view.getUint16(6),
    data: message.subarray(8),
    checksumOk: internetChecksum(message) === 0,
  };
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
  const ipA = new Uint8Array(parseControl(regA.value).ip);
  const ipB = new Uint8Array(parseControl(regB.value).ip);
  if (ipA.length !== 4 || ipB.length !== 4) throw new Error("Assigned without a 4-byte ip");
  result.ipA = ipText(ipA);
  result.ipB = ipText(ipB);
  note(`A ${macText(MAC_A)} is ${result.ipA}; B ${macText(MAC_B)} is ${result.ipB}`);
  result.sentFrames = {};
  result.framesSent = 0;

  // 1. A 100-byte UDP broadcast travels as one 0x01 datagram.
  const text = new TextEncoder().encode("relay browser test: broadcast from A ");
  const small = new Uint8Array(100 - 14 - 20 - 8);
  for (let i = 0; i < small.length; i++) small[i] = text[i % text.length];
  const broadcast = udpFrame(BROADCAST, MAC_A, ipA, LAN_BROADCAST_IP, small);
  result.sentFrames.broadcast = hexText(broadcast);
  const sentBroadcast = await exchange(
    "broadcast A->B",
    a,
    () => encodeFrame(broadcast),
    b,
    () => b.frames.find((f) => equalBytes(f.bytes, broadcast)),
  );
  result.broadcastOk = true;
  result.broadcastAttempts = sentBroadcast.attempts;
  result.framesSent += sentBroadcast.attempts;

  // 2. A 1400-byte unicast frame, chunked by the page (900 + 500) and re-chunked by the relay.
  const pattern = new Uint8Array(BIG_FRAME_SIZE - 14 - 20 - 8);
  for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7) & 0xff;
  const big = udpFrame(MAC_B, MAC_A, ipA, ipB, pattern);
  result.sentFrames.big = hexText(big);
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
  result.framesSent += sentBig.attempts;

  // 3. A asks who has 10.0.2.2 (a broadcast, so B gets it too); the gateway answers A alone.
  const arpRequest = ethernetFrame(
    BROADCAST,
    MAC_A,
    ETHERTYPE_ARP,
    arpPacket(ARP_REQUEST, MAC_A, ipA, ZERO_MAC, GATEWAY_IP),
  );
  result.sentFrames.arpRequest = hexText(arpRequest);
  const arp = await exchange(
    "ARP who-has 10.0.2.2 from A",
    a,
    () => encodeFrame(arpRequest),
    a,
    () =>
      a.frames
        .map((f) => parseArp(f.bytes))
        .find((r) => r !== null && r.op === ARP_REPLY && equalBytes(r.senderIp, GATEWAY_IP)),
  );
  const reply = arp.value;
  result.arpAttempts = arp.attempts;
  result.framesSent += arp.attempts;
  result.arpReply = {
    ethDst: macText(reply.ethDst),
    ethSrc: macText(reply.ethSrc),
    op: reply.op,
    senderMac: macText(reply.senderMac),
    senderIp: ipText(reply.senderIp),
    targetMac: macText(reply.targetMac),
    targetIp: ipText(reply.targetIp),
  };
  result.arpOk =
    equalBytes(reply.ethDst, MAC_A) &&
    equalBytes(reply.ethSrc, reply.senderMac) &&
    equalBytes(reply.targetMac, MAC_A) &&
    equalBytes(reply.targetIp, ipA);
  const gatewayMac = reply.senderMac.slice();
  result.gatewayMac = macText(gatewayMac);
  note(`gateway ${ipText(GATEWAY_IP)} is at ${result.gatewayMac}`);

  // 4. B pings the gateway at the MAC that ARP reply gave; a new payload for each attempt.
  const pings = new Map(); // seq -> payload sent
  const tag = new TextEncoder().encode(PING_TAG);
  const ping = await exchange(
    "ICMP echo B->10.0.2.2",
    b,
    (attempt) => {
      const data = concat([tag, randomBytes(16)]);
      pings.set(attempt, data);
      const icmp = icmpEcho(ICMP_ECHO_REQUEST, PING_ID, attempt, data);
      const frame = ethernetFrame(
        gatewayMac,
        MAC_B,
        ETHERTYPE_IPV4,
        ipv4Packet(ipB, GATEWAY_IP, IPPROTO_ICMP, icmp),
      );
      result.sentFrames.pingRequest = hexText(frame);
      return encodeFrame(frame);
    },
    b,
    () => {
      for (const f of b.frames) {
        const ip = parseIpv4(f.bytes);
        if (ip === null || ip.proto !== IPPROTO_ICMP) continue;
        const echo = parseIcmpEcho(ip.payload);
        if (echo === null || echo.type !== ICMP_ECHO_REPLY || echo.id !== PING_ID) continue;
        const sent = pings.get(echo.seq);
        if (sent !== undefined && equalBytes(echo.data, sent)) return { ip, echo };
      }
      return undefined;
    },
  );
  const { ip: pingIp, echo } = ping.value;
  result.pingAttempts = ping.attempts;
  result.framesSent += ping.attempts;
  result.pingReply = {
    ethDst: macText(pingIp.ethDst),
    ethSrc: macText(pingIp.ethSrc),
    ipSrc: ipText(pingIp.src),
    ipDst: ipText(pingIp.dst),
    ipChecksumOk: pingIp.headerChecksumOk,
    type: echo.type,
    code: echo.code,
    id: echo.id,
    seq: echo.seq,
    payloadTagged: equalBytes(echo.data.subarray(0, tag.length), tag),
    payloadLength: echo.data.length,
    icmpChecksumOk: echo.checksumOk,
  };
  result.pingOk =
    equalBytes(pingIp.ethDst, MAC_B) &&
    equalBytes(pingIp.ethSrc, gatewayMac) &&
    equalBytes(pingIp.src, GATEWAY_IP) &&
    equalBytes(pingIp.dst, ipB) &&
    pingIp.headerChecksumOk &&
    echo.code === 0 &&
    echo.checksumOk;

  // 5. Heartbeat -> HeartbeatAck on B.
  const acks = await exchange(
    "B Heartbeat",
    b,
    () => [control({ type: "Heartbeat" })],
    b,
    () => b.controls.find((t) => parseControl(t).type === "HeartbeatAck"),
  );
  result.heartbeatAck = true;
  result.heartbeatAckText = acks.value;

  // The relay must not send a session's own frames back to it (B's ping, and A's broadcasts
  // and ARP requests, which are flooded to every other port).
  const echoes = (s) => s.frames.filter((f) => equalBytes(f.bytes.subarray(6, 12), s.mac)).length;
  result.echoesSeenByA = echoes(a);
  result.echoesSeenByB = echoes(b);
  result.arpRequestsSeenByB = b.frames.filter((f) => equalBytes(f.bytes, arpRequest)).length;
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
    arpOk: false,
    gatewayMac: null,
    pingOk: false,
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
