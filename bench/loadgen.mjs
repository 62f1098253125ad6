// Load generator for bench/run.py: opens many websockets, waits for "go" on stdin,
// runs one scenario, prints one JSON line of results. Node's `ws` keeps up with
// hundreds of thousands of frames per second on one core, so the server, not this,
// is what a run measures (run.py prints this process's CPU beside the server's).
//
// Config (a JSON file named by argv[2]):
//   mode        "wsfanout" (JSON protocol, cookie auth) or "baseline" (bare app)
//   url         ws://127.0.0.1:PORT/
//   connections how many sockets to open
//   cookies     cookie header per connection (cycled), wsfanout only
//   groups      group name per connection (cycled); baseline joins it via ?g=
//   scenario    "burst" | "paced" | "groups" | "capacity"
//   messages    publishes to send; size: payload bytes; rate: publishes/s (paced)
//   senders     connections that publish (groups)
//   groupSizes  {group: members} to know how many deliveries a group send makes
//   concurrency handshakes in flight at once
//   client      "browser" (default): the handshake Chrome sends, permessage-deflate offered
//               as Chrome offers it ("permessage-deflate; client_max_window_bits") and every
//               outbound frame compressed when the server accepts; "plain": no extensions offered
//   sources     local addresses to connect from, in turn (127.0.0.x: more ephemeral ports)
//
// The result says what the server negotiated ("negotiated": its Sec-WebSocket-Extensions
// answer, "" for none), so a table can show which clients got compression.
import { WebSocket } from "ws";
import { performance } from "node:perf_hooks";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const wsfanout = cfg.mode === "wsfanout";
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
const negotiated = new Map();
const sockets = new Array(cfg.connections);
let deliveries = 0;
let expected = Infinity;
let latencies = new Float64Array(0);
let finish = null;
let errors = 0;

function payload(seq) {
  const head = `${seq}|${performance.now().toFixed(3)}|`;
  return head + "x".repeat(Math.max(0, cfg.size - head.length));
}

function publishFrame(text, group) {
  if (!wsfanout) return group ? `${group}|${text}` : `*|${text}`;
  return group ? JSON.stringify({ type: "group", group, text }) : JSON.stringify({ type: "broadcast", text });
}

function delivered(text) {
  const now = performance.now();
  const second = text.indexOf("|", text.indexOf("|") + 1);
  const sent = Number(text.slice(text.indexOf("|") + 1, second));
  if (deliveries < latencies.length) latencies[deliveries] = now - sent;
  deliveries += 1;
  if (deliveries >= expected && finish) finish();
}

// Frames are scanned, not JSON.parse'd: the client's own cost should not decide
// the latency it measures. A wsfanout frame is one event or an array of them; each
// message event carries "text":"<seq>|<sent ms>|...".
const TEXT = '"text":"';
const ERROR = '"type":"error"';

function onFrame(data) {
  const text = data.toString();
  if (!wsfanout) {
    delivered(text);
    return;
  }
  let at = text.indexOf(TEXT);
  while (at !== -1) {
    delivered(text.slice(at + TEXT.length, at + TEXT.length + 40));
    at = text.indexOf(TEXT, at + TEXT.length);
  }
  if (text.includes(ERROR)) errors += 1;
}

function open(index) {
  return new Promise((resolve, reject) => {
    const group = cfg.groups ? cfg.groups[index % cfg.groups.length] : "";
    const url = wsfanout || !group ? cfg.url : `${cfg.url}?g=${encodeURIComponent(group)}`;
    const headers = browser ? { ...BROWSER_HEADERS } : {};
    if (wsfanout) headers.Cookie = cfg.cookies[index % cfg.cookies.length];
    const options = {
      headers,
      perMessageDeflate: browser ? DEFLATE : false,
      maxPayload: 64 * 1024 * 1024,
    };
    if (cfg.sources && cfg.sources.length) options.localAddress = cfg.sources[index % cfg.sources.length];
    const ws = new WebSocket(url, options);
    // Connected means accepted, for both systems; wsfanout's welcome (the first
    // frame) is then skipped rather than counted as a delivery.
    let welcome = wsfanout;
    ws.on("message", (data) => {
      if (welcome) {
        welcome = false;
        return;
      }
      onFrame(data);
    });
    ws.on("open", () => {
      negotiated.set(ws.extensions, (negotiated.get(ws.extensions) || 0) + 1);
      resolve(ws);
    });
    ws.on("error", reject);
    sockets[index] = ws;
  });
}

async function openAll() {
  let next = 0;
  const start = performance.now();
  async function worker() {
    while (next < cfg.connections) {
      const index = next++;
      await open(index);
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
  const handshakeSeconds = await openAll();
  process.stdout.write(JSON.stringify({ ready: true, handshake_s: handshakeSeconds }) + "\n");
  await commands.next(); // "go"

  const cpu0 = process.cpuUsage();
  const wire0 = wireBytes();
  const t0 = performance.now();
  let complete = true;
  let sent = 0;
  if (cfg.scenario === "burst") {
    latencies = new Float64Array(cfg.messages * cfg.connections);
    const done = waitFor(cfg.messages * cfg.connections, 60_000);
    for (let i = 0; i < cfg.messages; i++) sockets[0].send(publishFrame(payload(i)));
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
      sockets[0].send(publishFrame(payload(i)));
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
    plan.forEach((group, i) => sockets[i % cfg.senders].send(publishFrame(payload(i), group)));
    sent = cfg.messages;
    complete = await done;
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
    wire_bytes_per_delivery: deliveries ? wire / deliveries : null,
    negotiated: [...negotiated.keys()].join(" | "),
  };
  process.stdout.write(JSON.stringify(result) + "\n");
  // Reset rather than close: a closing client would leave every local port in TIME_WAIT
  // for a minute, and the next run's handshakes would pay for finding free ones.
  for (const ws of sockets) {
    if (!ws) continue;
    if (ws._socket && ws._socket.resetAndDestroy) ws._socket.resetAndDestroy();
    else ws.terminate();
  }
  process.exit(0);
}

run().catch((err) => {
  process.stdout.write(JSON.stringify({ error: String(err && err.message || err) }) + "\n");
  process.exit(1);
});
