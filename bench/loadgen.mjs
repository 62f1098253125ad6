// Load generator for bench/run.py: opens many websockets, waits for "go" on stdin,
// runs one scenario, prints one JSON line of results. Node's `ws` keeps up with
// hundreds of thousands of frames per second on one core; run.py prints this process's CPU
// beside the server's, and notes a run in which this process, not the server, was the limit.
//
// wsfanout's connections are our own JavaScript client (web/wsfanout.js, as the page uses it)
// over a `ws` socket that opens as Chrome does: a connection counts once the client is
// `connected` (the welcome came), a delivery is the client's "message" event, and a publish is
// its send(), which asks for an ack as the page's does. One connection per client: a client
// that loses its connection is an error, not something to reconnect. The bare app (baseline)
// has no protocol: raw `ws` sockets. Node 20 before 20.19 loads web/wsfanout.js (an ES module
// without a package.json saying so) only with --experimental-detect-module; run.py passes it.
//
// The client parses every frame (JSON.parse, an event per message) where a hand-written reader
// scans it for "text":": this process spends 1.2 to 1.5x the CPU per delivery, and 1.4x per
// handshake. Where it, not the server, limits a run (wsfanout under uvicorn in the burst and
// groups scenarios: this process at a full core, the server near half of one), `clientlib:
// false` (run.py --raw-clients) speaks the protocol by hand instead: the cookie, the welcome
// skipped, frames scanned, publishes without an id (so without acks).
//
// Config (a JSON file named by argv[2]):
//   mode        "wsfanout" (JSON protocol, cookie auth) or "baseline" (bare app)
//   url         ws://127.0.0.1:PORT/
//   connections how many sockets to open
//   cookies     cookie header per connection (cycled), wsfanout only
//   groups      group name per connection (cycled); baseline joins it via ?g=
//   scenario    "burst" | "paced" | "groups" | "capacity" | "broadcast" (bench/scale.py: after
//               "go", wait for one message on every connection, published by run.py, and report
//               when each came, in ms of CLOCK_MONOTONIC, the clock Python's time.monotonic() reads)
//   messages    publishes to send; size: payload bytes; rate: publishes/s (paced)
//   senders     connections that publish (groups)
//   groupSizes  {group: members} to know how many deliveries a group send makes
//   concurrency handshakes in flight at once
//   client      "browser" (default): the handshake Chrome sends, permessage-deflate offered
//               as Chrome offers it ("permessage-deflate; client_max_window_bits") and every
//               outbound frame compressed when the server accepts; "plain": no extensions offered
//   sources     local addresses to connect from, in turn (127.0.0.x: more ephemeral ports)
//   clientlib   true (default): wsfanout's connections through web/wsfanout.js; false: by hand
//   retries     how often a refused handshake is tried again (default 0: a refusal ends the run),
//               after a random wait of up to retryMs (default 100) ms; "refused" counts them
//   timeoutMs   how long "broadcast" waits for its message (default 60,000)
//
// The result says what the server negotiated ("negotiated": its Sec-WebSocket-Extensions
// answer, "" for none), so a table can show which clients got compression.
import { WebSocket } from "ws";
import { performance } from "node:perf_hooks";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { Client } from "../web/wsfanout.js";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const wsfanout = cfg.mode === "wsfanout";
const clientlib = wsfanout && cfg.clientlib !== false;
const browser = (cfg.client || "browser") === "browser";
const origin = new URL(cfg.url.replace(/^ws/, "http")).origin;
// What Chrome sends besides the websocket headers of its own (ws adds Host, Upgrade,
// Connection, Sec-WebSocket-Key/-Version, and the deflate offer below).
const BROWSER_HEADERS = {
  Origin: origin,
  "User-Agent":
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36",
  Pragma: "no-cache",
  "Cache-Control": "no-cache",
  "Accept-Encoding": "gzip, deflate, br, zstd",
  "Accept-Language": "en-US,en;q=0.9",
};
// Chrome's offer is "permessage-deflate; client_max_window_bits" (ws offers exactly that by
// default) and, once accepted, it compresses every message it sends, however small.
const DEFLATE = { clientMaxWindowBits: true, threshold: 0 };
// The client's timeouts, in seconds: a run's own limit is 60 s (waitFor), so neither a slow
// welcome under 200 handshakes at once nor a late ack should end it sooner.
const CLIENT_TIMEOUTS = { connectTimeout: 60, requestTimeout: 60 };
const negotiated = new Map();
const sockets = new Array(cfg.connections); // the ws sockets (under the clients, for wsfanout)
const chats = new Array(cfg.connections); // wsfanout's clients
let deliveries = 0;
let expected = Infinity;
let latencies = new Float64Array(0);
let finish = null;
let errors = 0;
let refused = 0;
const refusals = {}; // why handshakes were refused (retries), by reason
// broadcast: when each connection's first message came (ms of the monotonic clock; 0: not yet)
const arrivals = new Float64Array(cfg.scenario === "broadcast" ? cfg.connections : 0);

// The monotonic clock Node and Python share on one machine (CLOCK_MONOTONIC), in ms.
function monotonicMs() {
  return Number(process.hrtime.bigint()) / 1e6;
}

// A message on connection `index`: broadcast notes when the first came; the others time it.
function received(index, text) {
  if (arrivals.length) {
    if (arrivals[index] === 0) {
      arrivals[index] = monotonicMs();
      deliveries += 1;
      if (deliveries >= expected && finish) finish();
    }
  } else delivered(text);
}

function payload(seq) {
  const head = `${seq}|${performance.now().toFixed(3)}|`;
  return head + "x".repeat(Math.max(0, cfg.size - head.length));
}

// One publish from connection `index`: to everyone, or to a group. wsfanout's goes through the
// client's send(), whose ack (or error) settles it; by hand, it is the frame alone; the bare
// app's is a line of its own.
function publish(index, text, group) {
  if (!wsfanout) {
    sockets[index].send(group ? `${group}|${text}` : `*|${text}`);
    return;
  }
  const frame = group ? { type: "group", group, text } : { type: "broadcast", text };
  if (clientlib) chats[index].send(frame).catch(() => { errors += 1; });
  else sockets[index].send(JSON.stringify(frame));
}

// A delivery's text is "<seq>|<sent ms>|...": its latency is now minus the stamp.
function delivered(text) {
  const now = performance.now();
  const second = text.indexOf("|", text.indexOf("|") + 1);
  const sent = Number(text.slice(text.indexOf("|") + 1, second));
  if (deliveries < latencies.length) latencies[deliveries] = now - sent;
  deliveries += 1;
  if (deliveries >= expected && finish) finish();
}

// The ws options of connection `index`: Chrome's handshake and deflate offer (or none), its
// cookie, the local address to connect from.
function socketOptions(index) {
  const headers = browser ? { ...BROWSER_HEADERS } : {};
  if (wsfanout) headers.Cookie = cfg.cookies[index % cfg.cookies.length];
  const options = {
    headers,
    perMessageDeflate: browser ? DEFLATE : false,
    maxPayload: 64 * 1024 * 1024,
  };
  if (cfg.sources && cfg.sources.length) options.localAddress = cfg.sources[index % cfg.sources.length];
  return options;
}

function counted(ws) {
  negotiated.set(ws.extensions, (negotiated.get(ws.extensions) || 0) + 1);
}

// wsfanout's frames by hand (clientlib: false): scanned, not JSON.parse'd. A frame is one
// event or an array of them; each message event carries "text":"<seq>|<sent ms>|...".
const TEXT = '"text":"';
const ERROR = '"type":"error"';

function scanned(data) {
  const text = data.toString();
  let at = text.indexOf(TEXT);
  while (at !== -1) {
    delivered(text.slice(at + TEXT.length, at + TEXT.length + 40));
    at = text.indexOf(TEXT, at + TEXT.length);
  }
  if (text.includes(ERROR)) errors += 1;
}

// The bare app, and wsfanout by hand: connected means accepted. Every frame of the bare app
// is a delivery; wsfanout's first frame, its welcome, is skipped, and the others scanned.
function openRaw(index) {
  return new Promise((resolve, reject) => {
    const group = cfg.groups ? cfg.groups[index % cfg.groups.length] : "";
    const url = group && !wsfanout ? `${cfg.url}?g=${encodeURIComponent(group)}` : cfg.url;
    const ws = new WebSocket(url, socketOptions(index));
    let welcome = wsfanout;
    ws.on("message", (data) => {
      if (welcome) welcome = false;
      else if (wsfanout) scanned(data);
      else received(index, data.toString());
    });
    ws.on("open", () => {
      counted(ws);
      resolve();
    });
    ws.on("error", reject);
    sockets[index] = ws;
  });
}

// wsfanout: a client, connected once its welcome came. The client constructs its socket with
// the URL alone, so one socket class (not one per connection: a class each costs the handshake
// phase a fifth of this process's CPU, in V8's garbage collector and its megamorphic
// constructor) takes this connection's options from `opening`, set while connect() opens it
// (the client opens its socket synchronously when it has no getToken), and keeps the socket
// where the run reads its bytes and resets it.
let opening = -1;
class BrowserSocket extends WebSocket {
  constructor(url) {
    if (opening < 0) throw new Error("a socket opened outside connect(): a reconnect?");
    super(url, socketOptions(opening));
    sockets[opening] = this;
  }
}

function openClient(index) {
  const chat = new Client(cfg.url, { WebSocket: BrowserSocket, ...CLIENT_TIMEOUTS });
  chats[index] = chat;
  chat.on("message", (event) => received(index, event.text));
  chat.on("error", () => { errors += 1; }); // an error frame that answers no request of ours
  return new Promise((resolve, reject) => {
    let connected = false;
    chat.on("state", (state, reason) => {
      if (state === "connected") {
        connected = true;
        counted(sockets[index]);
        resolve();
      } else if (state === "disconnected" || (state === "closed" && reason !== "closed")) {
        // Lost or refused: an error of the run. Closed once the client has scheduled its
        // retry (it does so after telling its listeners), so that close() cancels it.
        queueMicrotask(() => chat.close());
        if (connected) errors += 1;
        else reject(new Error(`connection ${index}: ${state} (${reason})`));
      }
    });
    opening = index;
    try {
      chat.connect();
    } finally {
      opening = -1;
    }
  });
}

const open = clientlib ? openClient : openRaw;

async function openAll() {
  let next = 0;
  const start = performance.now();
  async function worker() {
    while (next < cfg.connections) {
      const index = next++;
      for (let tries = 0; ; tries++) {
        try {
          await open(index);
          break;
        } catch (err) {
          if (tries >= (cfg.retries || 0)) throw err;
          refused += 1;
          const why = String(err && err.message || err).replace(/^connection \d+: /, "");
          refusals[why] = (refusals[why] || 0) + 1;
          await new Promise((r) => setTimeout(r, Math.random() * (cfg.retryMs || 100)));
        }
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(cfg.concurrency || 100, cfg.connections) }, worker));
  return (performance.now() - start) / 1000;
}

// Bytes the clients read off their sockets: what compression saves on the wire.
function wireBytes() {
  let total = 0;
  for (const ws of sockets) if (ws && ws._socket) total += ws._socket.bytesRead;
  return total;
}

// Reset rather than close: a closing client would leave every local port in TIME_WAIT for a
// minute, and the next run's handshakes would pay for finding free ones. A client is closed
// after its socket is reset, so that it neither sends a close frame nor reconnects.
function resetAll() {
  for (let index = 0; index < sockets.length; index++) {
    const ws = sockets[index];
    if (ws && ws._socket && ws._socket.resetAndDestroy) ws._socket.resetAndDestroy();
    else if (ws) ws.terminate();
    if (chats[index]) chats[index].close();
  }
}

function quantile(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function waitFor(count, timeoutMs) {
  expected = count;
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), timeoutMs);
    finish = () => { clearTimeout(timer); resolve(true); };
    if (deliveries >= expected) finish();
  });
}

async function run() {
  const lines = createInterface({ input: process.stdin });
  const commands = lines[Symbol.asyncIterator]();
  const handshakeCpu0 = process.cpuUsage();
  const opening = monotonicMs();
  const handshakeSeconds = await openAll();
  const opened = monotonicMs();
  const handshakeCpu = process.cpuUsage(handshakeCpu0);
  const ready = { ready: true, handshake_s: handshakeSeconds, opening_ms: opening, opened_ms: opened };
  process.stdout.write(JSON.stringify({ ...ready, refused, refusals }) + "\n");
  await commands.next(); // "go"

  const cpu0 = process.cpuUsage();
  const wire0 = wireBytes();
  const t0 = performance.now();
  let complete = true;
  let sent = 0;
  if (cfg.scenario === "burst") {
    latencies = new Float64Array(cfg.messages * cfg.connections);
    const done = waitFor(cfg.messages * cfg.connections, 60_000);
    for (let i = 0; i < cfg.messages; i++) publish(0, payload(i));
    sent = cfg.messages;
    complete = await done;
  } else if (cfg.scenario === "paced") {
    latencies = new Float64Array(cfg.messages * cfg.connections);
    const done = waitFor(cfg.messages * cfg.connections, 60_000);
    const interval = 1000 / cfg.rate;
    for (let i = 0; i < cfg.messages; i++) {
      const due = t0 + i * interval;
      const wait = due - performance.now();
      if (wait > 1) await new Promise((r) => setTimeout(r, wait));
      publish(0, payload(i));
    }
    sent = cfg.messages;
    complete = await done;
  } else if (cfg.scenario === "groups") {
    const names = Object.keys(cfg.groupSizes);
    let total = 0;
    const plan = [];
    for (let i = 0; i < cfg.messages; i++) {
      const group = names[Math.floor(Math.random() * names.length)];
      total += cfg.groupSizes[group];
      plan.push(group);
    }
    latencies = new Float64Array(total);
    const done = waitFor(total, 60_000);
    plan.forEach((group, i) => publish(i % cfg.senders, payload(i), group));
    sent = cfg.messages;
    complete = await done;
  } else if (cfg.scenario === "broadcast") {
    complete = await waitFor(cfg.connections, cfg.timeoutMs || 60_000);
  }
  const elapsed = (performance.now() - t0) / 1000;
  const wire = wireBytes() - wire0;
  const cpu = process.cpuUsage(cpu0);
  const measured = latencies.subarray(0, Math.min(deliveries, latencies.length)).sort();
  const result = {
    scenario: cfg.scenario,
    connections: cfg.connections,
    handshake_s: handshakeSeconds,
    handshakes_per_s: cfg.connections / handshakeSeconds,
    loadgen_handshake_cpu_s: (handshakeCpu.user + handshakeCpu.system) / 1e6,
    published: sent,
    deliveries,
    expected: Number.isFinite(expected) ? expected : 0,
    complete,
    elapsed_s: elapsed,
    deliveries_per_s: deliveries / elapsed,
    p50_ms: quantile(measured, 0.5),
    p90_ms: quantile(measured, 0.9),
    p99_ms: quantile(measured, 0.99),
    max_ms: measured.length ? measured[measured.length - 1] : null,
    loadgen_cpu_s: (cpu.user + cpu.system) / 1e6,
    errors,
    client: browser ? "browser" : "plain",
    speaks: clientlib ? "wsfanout.js" : "by hand",
    wire_bytes_per_delivery: deliveries ? wire / deliveries : null,
    negotiated: [...negotiated.keys()].join(" | "),
    refused,
  };
  if (arrivals.length) result.arrivals_ms = Array.from(arrivals.filter((t) => t > 0));
  // Exit once the line is written: a pipe takes 64 KiB at once, and the rest of a longer line
  // (broadcast's arrivals) would be lost to an exit straight after the write.
  process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
  resetAll();
}

run().catch((err) => {
  process.stdout.write(JSON.stringify({ error: String(err && err.message || err) }) + "\n");
  process.exit(1);
});
