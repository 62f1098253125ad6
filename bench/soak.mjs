// The soak's clients and publisher (bench/soak.py runs it): holds a pool of browser-like
// connections to one or more nodes, churns it, publishes through POST /api/publish, and every
// `interval` seconds prints one JSON line of what it saw. soak.py samples the servers as each
// line comes in.
//
// Connections are our own JavaScript client (web/wsfanout.js) over a `ws` socket that opens as
// Chrome does: its headers, the session cookie, permessage-deflate offered as Chrome offers it
// (the server declines it by default, DESIGN 10). A new connection is a new Client, as a page
// load makes one. A connection is counted once its welcome came.
//
// Churn. Every tick (100 ms) `churn / 10` connections are doomed and as many new ones opened,
// so the pool stays at `connections`. A doomed connection stops counting deliveries at once
// and closes `grace` seconds later (so that what was in flight to it can arrive): a share
// `abrupt` of them has its TCP socket reset (no close frame, as a tab killed or a network
// lost), the others close as the page's Client does (1000). A connection the server closes,
// or that fails to open, is counted (`lost`, `refused`) and replaced.
//
// Delivery, exactly. Every message's text is "<seq>|<publish ms>|…", the publish time taken
// from this process's monotonic clock when its batch is posted. A connection expects every
// message posted (and answered 2xx) to a stream it listens to between its welcome and its
// doom; it delivers those of them it receives, by their stamp. Both are added up once it is
// finished (doomed and closed, or at the end) and no post stamped before its end is still in
// flight, so `expected` and `delivered` are exact, and a message later than `grace` counts as
// missed. A line's `delivered` and `expected` are those added up since the last line.
// Latency is receipt minus stamp, for every message received in the interval.
//
// Config (a JSON file named by argv[2]):
//   urls         ws://… per node; connection i goes to urls[i % n]
//   publishUrls  http://…/api/publish per node; batches go to the nodes in turn
//   apiKey       the bearer key
//   cookies, groups  a session cookie and its user's group, per user (connection i: user i % n)
//   connections  the pool's size; churn: connects (and disconnects) per second; abrupt: share
//   broadcasts, groupMessages  per second; size: each text's bytes
//   duration, interval, grace  seconds
//   concurrency  handshakes in flight while the pool first fills
import { WebSocket } from "ws";
import { performance } from "node:perf_hooks";
import { readFileSync } from "node:fs";
import { Client } from "../web/wsfanout.js";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const TICK = 100; // ms
const origin = (url) => new URL(url.replace(/^ws/, "http")).origin;
const BROWSER_HEADERS = {
  "User-Agent":
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36",
  Pragma: "no-cache",
  "Cache-Control": "no-cache",
  "Accept-Encoding": "gzip, deflate, br, zstd",
  "Accept-Language": "en-US,en;q=0.9",
};
const DEFLATE = { clientMaxWindowBits: true, threshold: 0 }; // Chrome's offer
const CLIENT_TIMEOUTS = { connectTimeout: 30, requestTimeout: 30 };
const graceMs = cfg.grace * 1000;

// What was published (answered 2xx): stamps per stream, kept sorted, to count a window's.
const broadcastStamps = [];
const groupStamps = new Map(); // group -> stamps
function record(stamps, stamp) {
  let at = stamps.length;
  stamps.push(stamp);
  while (at > 0 && stamps[at - 1] > stamp) { stamps[at] = stamps[at - 1]; at -= 1; }
  stamps[at] = stamp;
}
function lowerBound(stamps, value) {
  let lo = 0, hi = stamps.length;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (stamps[mid] < value) lo = mid + 1; else hi = mid; }
  return lo;
}
function between(stamps, from, to) {
  return stamps ? Math.max(0, lowerBound(stamps, to + 1e-9) - lowerBound(stamps, from)) : 0;
}

// The interval's counters (reset at each line) and the run's totals.
const blank = () => ({
  connects: 0, disconnects: 0, abrupt: 0, lost: 0, refused: 0, published: 0,
  publishFailed: 0, skipped: 0, delivered: 0, expected: 0, errors: 0,
});
let window = blank();
const totals = blank();
let latencies = new Float64Array(1 << 16);
let posts = []; // each post's round trip in the interval, ms
let received = 0;
function add(name, n = 1) { window[name] += n; totals[name] += n; }

const live = new Set(); // connections open or opening, doomed ones included
let serial = 0;
let connected = 0;

class Connection {
  constructor() {
    this.index = serial++;
    const user = this.index % cfg.cookies.length;
    this.group = cfg.groups[user];
    this.url = cfg.urls[this.index % cfg.urls.length];
    this.from = null; // the welcome's time
    this.cutoff = Infinity; // the doom's time
    this.delivered = 0;
    this.finished = false;
    this.socket = null;
    const options = {
      headers: { ...BROWSER_HEADERS, Origin: origin(this.url), Cookie: cfg.cookies[user] },
      perMessageDeflate: DEFLATE,
    };
    const self = this;
    class BrowserSocket extends WebSocket {
      constructor(url) { super(url, options); self.socket = this; }
    }
    this.chat = new Client(this.url, { WebSocket: BrowserSocket, ...CLIENT_TIMEOUTS });
    this.chat.on("message", (event) => this.receive(event.text));
    this.chat.on("error", () => add("errors"));
    this.chat.on("state", (state, reason) => this.state(state, reason));
    live.add(this);
    this.chat.connect();
  }

  receive(text) {
    const now = performance.now();
    const bar = text.indexOf("|");
    const stamp = Number(text.slice(bar + 1, text.indexOf("|", bar + 1)));
    if (received >= latencies.length) {
      const bigger = new Float64Array(latencies.length * 2);
      bigger.set(latencies);
      latencies = bigger;
    }
    latencies[received++] = now - stamp;
    if (this.from !== null && stamp >= this.from && stamp <= this.cutoff) this.delivered += 1;
  }

  state(state, reason) {
    if (state === "connected") {
      this.from = performance.now();
      connected += 1;
      add("connects");
      return;
    }
    if (state !== "disconnected" && !(state === "closed" && reason !== "closed")) return;
    // Lost or refused, not by us: stop the client's retry and replace the connection.
    queueMicrotask(() => this.chat.close());
    if (this.from === null) add("refused");
    else if (this.cutoff === Infinity) add("lost");
    this.finish(performance.now());
  }

  // Stop counting now; close `grace` later, abruptly or not.
  doom(now) {
    this.cutoff = now;
    const abrupt = Math.random() < cfg.abrupt;
    setTimeout(() => {
      if (this.finished) return;
      if (abrupt) {
        const raw = this.socket && this.socket._socket;
        if (raw && raw.resetAndDestroy) raw.resetAndDestroy();
        else if (this.socket) this.socket.terminate();
        add("abrupt");
      }
      this.chat.close();
      add("disconnects");
      this.finish(this.cutoff);
    }, graceMs);
  }

  // Done: what it expected is added up once no post stamped before its end is in flight.
  finish(until) {
    if (this.finished) return;
    this.finished = true;
    live.delete(this);
    if (this.from === null) return;
    connected -= 1;
    this.to = Math.min(until, this.cutoff);
    finished.push(this);
  }
}

// Connections finished but not yet added up, and the stamps of the posts in flight: a post
// answered after a connection's end still adds to what it was owed.
let finished = [];
const posting = new Map(); // stamp -> posts in flight with it
function account(all = false) {
  let oldest = Infinity;
  for (const stamp of posting.keys()) oldest = Math.min(oldest, stamp);
  const waiting = [];
  for (const c of finished) {
    if (!all && c.to >= oldest) { waiting.push(c); continue; }
    add("expected", between(broadcastStamps, c.from, c.to) + between(groupStamps.get(c.group), c.from, c.to));
    add("delivered", c.delivered);
  }
  finished = waiting;
}

// The publisher: a batch per tick, to the nodes in turn; a tick whose post would exceed the
// posts in flight is skipped (and counted: the service did not keep up).
let seq = 0;
let inflight = 0;
let owedBroadcasts = 0;
let owedGroups = 0;
const MAX_INFLIGHT = 20;
const failures = new Map(); // why a post failed (status and body, or the error) -> posts
const groupNames = [...new Set(cfg.groups)];
function pad(head) { return head + "x".repeat(Math.max(0, cfg.size - head.length)); }
async function publishTick(tick) {
  owedBroadcasts += cfg.broadcasts / (1000 / TICK);
  owedGroups += cfg.groupMessages / (1000 / TICK);
  const broadcasts = Math.floor(owedBroadcasts);
  const groups = Math.floor(owedGroups);
  owedBroadcasts -= broadcasts;
  owedGroups -= groups;
  if (broadcasts + groups === 0) return;
  if (inflight >= MAX_INFLIGHT) { add("skipped", broadcasts + groups); return; }
  const stamp = performance.now();
  const items = [];
  const targets = [];
  for (let i = 0; i < broadcasts; i++) {
    items.push({ type: "broadcast", text: pad(`${seq++}|${stamp.toFixed(3)}|`) });
    targets.push(null);
  }
  for (let i = 0; i < groups; i++) {
    const group = groupNames[Math.floor(Math.random() * groupNames.length)];
    items.push({ type: "group", group, text: pad(`${seq++}|${stamp.toFixed(3)}|`) });
    targets.push(group);
  }
  inflight += 1;
  posting.set(stamp, (posting.get(stamp) || 0) + 1);
  try {
    const response = await fetch(cfg.publishUrls[tick % cfg.publishUrls.length], {
      method: "POST",
      headers: { Authorization: `Bearer ${cfg.apiKey}`, "Content-Type": "application/json" },
      body: JSON.stringify(items),
    });
    const body = await response.arrayBuffer();
    if (response.status < 200 || response.status > 299) {
      add("publishFailed", items.length);
      const why = `${response.status} ${new TextDecoder().decode(body).slice(0, 200)}`;
      failures.set(why, (failures.get(why) || 0) + 1);
      return;
    }
    for (const group of targets) {
      if (group === null) record(broadcastStamps, stamp);
      else {
        if (!groupStamps.has(group)) groupStamps.set(group, []);
        record(groupStamps.get(group), stamp);
      }
    }
    add("published", items.length);
    posts.push(performance.now() - stamp);
  } catch (err) {
    add("publishFailed", items.length);
    const why = String((err && err.cause && err.cause.code) || err);
    failures.set(why, (failures.get(why) || 0) + 1);
  } finally {
    inflight -= 1;
    if (posting.get(stamp) === 1) posting.delete(stamp);
    else posting.set(stamp, posting.get(stamp) - 1);
  }
}

function quantile(sorted, q) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : null;
}

const t0 = performance.now();
let cpu0 = process.cpuUsage();
function line(extra = {}) {
  account(extra.end === true);
  const measured = latencies.subarray(0, received).sort();
  const cpu = process.cpuUsage(cpu0);
  cpu0 = process.cpuUsage();
  const out = {
    t: (performance.now() - t0) / 1000,
    connected,
    open: live.size,
    ...window,
    received,
    p50_ms: quantile(measured, 0.5),
    p99_ms: quantile(measured, 0.99),
    max_ms: measured.length ? measured[measured.length - 1] : null,
    post_p99_ms: quantile(posts.sort((a, b) => a - b), 0.99),
    inflight,
    interval: cfg.interval,
    publish_failures: Object.fromEntries(failures),
    loadgen_cpu: (cpu.user + cpu.system) / 1e6 / cfg.interval,
    ...extra,
  };
  process.stdout.write(JSON.stringify(out) + "\n");
  window = blank();
  received = 0;
  posts = [];
  failures.clear();
}

async function fill() {
  let started = 0;
  await new Promise((resolve) => {
    const pump = () => {
      while (live.size - connected < cfg.concurrency && started < cfg.connections) {
        new Connection();
        started += 1;
      }
      if (connected + totals.refused >= cfg.connections) resolve();
      else setTimeout(pump, 20);
    };
    pump();
  });
}

async function run() {
  await fill();
  const ready = { ready: true, t: (performance.now() - t0) / 1000, connected, refused: totals.refused };
  process.stdout.write(JSON.stringify(ready) + "\n");
  window = blank();
  received = 0;
  const start = performance.now();
  let tick = 0;
  let nextLine = start + cfg.interval * 1000;
  const perTick = cfg.churn / (1000 / TICK);
  let owedChurn = 0;
  while (performance.now() - start < cfg.duration * 1000) {
    const due = start + tick * TICK;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const now = performance.now();
    publishTick(tick);
    owedChurn += perTick;
    let churn = Math.floor(owedChurn);
    owedChurn -= churn;
    // Doom `churn` random connected ones (not doomed yet): a pass over a few random picks.
    if (churn > 0) {
      const candidates = [...live].filter((c) => c.from !== null && c.cutoff === Infinity);
      for (let i = 0; i < churn && candidates.length; i++) {
        const at = Math.floor(Math.random() * candidates.length);
        candidates[at].doom(now);
        candidates[at] = candidates[candidates.length - 1];
        candidates.pop();
      }
    }
    // Top the pool up: what closed since the last tick (churned, lost or refused).
    let opening = 0;
    for (const c of live) if (c.from === null) opening += 1;
    const room = Math.min(cfg.connections - live.size, cfg.concurrency - opening);
    for (let i = 0; i < room; i++) new Connection();
    if (now >= nextLine) {
      line();
      nextLine += cfg.interval * 1000;
    }
    tick += 1;
  }
  // Stop publishing; let what is in flight land; then count every connection still open.
  await new Promise((r) => setTimeout(r, graceMs));
  for (let waited = 0; inflight > 0 && waited < 30_000; waited += 100) {
    await new Promise((r) => setTimeout(r, 100));
  }
  const end = performance.now() - graceMs;
  const open = [...live];
  for (const c of open) c.finish(end);
  line({ end: true, totals });
  for (const c of open) {
    const raw = c.socket && c.socket._socket;
    if (raw && raw.resetAndDestroy) raw.resetAndDestroy();
    c.chat.close();
  }
  process.exit(0);
}

run().catch((err) => {
  process.stdout.write(JSON.stringify({ error: String((err && err.stack) || err) }) + "\n");
  process.exit(1);
});
