// The delay function, and the client driven through a fake WebSocket: what it asks for, what it
// delivers and in what order, how it settles requests. No server needed.

import assert from "node:assert/strict";
import { once } from "node:events";
import net from "node:net";
import { test } from "node:test";

import { Client, ClientError, backoff } from "../../../web/wsfanout.js";

test("the backoff doubles from 0.5 s to a ceiling of 20 s", () => {
  const ceilings = [0, 1, 2, 3, 4, 5, 6, 7, 50, 5000].map((attempt) => backoff(attempt, 0.5, 20, () => 1));
  assert.deepEqual(ceilings, [0.5, 1, 2, 4, 8, 16, 20, 20, 20, 20]);
  assert.equal(backoff(3, 0.5, 20, () => 0), 0);
});

test("the backoff has full jitter: delays spread over the whole window, never above it", () => {
  const delays = Array.from({ length: 1000 }, () => backoff(10));
  assert.ok(delays.every((delay) => delay >= 0 && delay < 20));
  // Spread, not bunched: each fifth of the window holds some of them (each holds about 200).
  const fifths = [0, 0, 0, 0, 0];
  for (const delay of delays) fifths[Math.floor(delay / 4)] += 1;
  assert.ok(fifths.every((count) => count > 100), `fifths: ${fifths}`);
  assert.ok(new Set(delays).size > 990);
});

test("a URL is needed outside a page, and only ws(s) or http(s)", () => {
  assert.throws(() => new Client(), /a URL is needed/);
  assert.throws(() => new Client("/chat/"), /bad URL/);
  assert.throws(() => new Client("ftp://example.com/"), /a ws:, wss:, http: or https: URL/);
  assert.throws(() => new Client("ws://example.com/", { minDelay: -1 }), /minDelay/);
  assert.throws(() => new Client("ws://example.com/", { getToken: "abc" }), /getToken/);
});

test("requests before connect() are refused at once, never queued", async () => {
  const chat = new Client("http://127.0.0.1:9/", { positions: { all: { epoch: "e1", offset: 3 }, bad: { epoch: 1 } } });
  assert.equal(chat.state, "closed");
  await assert.rejects(chat.send({ type: "broadcast", text: "hi" }), (err) => err instanceof ClientError && err.code === "disconnected");
  await assert.rejects(chat.presence("girls"), { code: "disconnected" });
  await assert.rejects(chat.send("hi"), { code: "bad_message" });
  // Malformed positions are left out; a copy is given, never the client's own.
  assert.deepEqual(chat.positions, { all: { epoch: "e1", offset: 3 } });
  chat.positions.all.offset = 99;
  assert.equal(chat.positions.all.offset, 3);
});

// A WebSocket the test drives: what the client asked for, and what the server would say.
class FakeSocket {
  static made = [];

  constructor(url) {
    this.url = new URL(url);
    this.sent = [];
    FakeSocket.made.push(this);
  }

  send(text) { this.sent.push(JSON.parse(text)); }

  close() {}

  open() { this.onopen(); }

  receive(...events) { this.onmessage({ data: JSON.stringify(events.length === 1 ? events[0] : events) }); }

  closed(code) { this.onclose({ code }); }
}

function fake(url, options = {}) {
  FakeSocket.made = [];
  const chat = new Client(url, { WebSocket: FakeSocket, minDelay: 0, maxDelay: 0, ...options });
  const delivered = [];
  chat.on("event", (event) => delivered.push(event));
  return { chat, delivered, socket: () => FakeSocket.made.at(-1) };
}

const message = (stream, offset, text, ts = offset) => ({ type: "message", kind: "broadcast", stream, offset, from: "ops", text, ts });
const streams = (all, girls) => ({ all: { epoch: all[0], offset: all[1] }, "group:girls": { epoch: girls[0], offset: girls[1] } });

test("in a page, the default socket is the page's own path with its ?token=, under a mount too", () => {
  globalThis.location = { href: "https://example.com/chat/?token=abc.def.ghi&tab=2#top" };
  try {
    const { chat, socket } = fake();
    chat.connect();
    assert.equal(socket().url.href, "wss://example.com/chat/?token=abc.def.ghi");
    chat.close();
    const relative = fake("other/", { token: "t1", positions: { all: { epoch: "e", offset: 4 } } });
    relative.chat.connect();
    assert.equal(relative.socket().url.origin + relative.socket().url.pathname, "wss://example.com/chat/other/");
    assert.equal(relative.socket().url.searchParams.get("token"), "t1");
    assert.deepEqual(JSON.parse(relative.socket().url.searchParams.get("resume")), { all: { epoch: "e", offset: 4 } });
    relative.chat.close();
  } finally {
    delete globalThis.location;
  }
});

test("frames of one event or many; the replay held until resumed, merged by time, each once", () => {
  const { chat, delivered, socket } = fake("ws://example.com/", { positions: streams(["A", 2], ["G", 5]) });
  chat.connect();
  socket().open();
  socket().receive({ type: "welcome", user: "amanda", groups: ["girls"], streams: streams(["A", 4], ["G", 6]) });
  // The replay, stream by stream, a duplicate among it; nothing reaches the app yet.
  socket().receive(message("all", 2, "seen already", 1), message("all", 3, "a3", 10), message("all", 4, "a4", 30));
  socket().receive(message("group:girls", 6, "g6", 20));
  assert.deepEqual(delivered.map((event) => event.type), ["welcome"]);
  socket().receive([{ type: "resumed", recovered: true, missed: 3 }, message("all", 5, "a5", 40)]);
  assert.deepEqual(delivered.map((event) => event.text ?? event.type), ["welcome", "a3", "g6", "a4", "resumed", "a5"]);
  assert.deepEqual(delivered[4], { type: "resumed", recovered: true, missed: 3, lost: [], restarted: [] });
  assert.deepEqual(chat.positions, streams(["A", 5], ["G", 6]));
  chat.close();
});

test("lost streams: restarted when the new epoch stands at 0, and go on from the welcome's offset", () => {
  const { chat, delivered, socket } = fake("ws://example.com/", { positions: streams(["A", 7], ["G", 5]) });
  chat.connect();
  socket().open();
  socket().receive({ type: "welcome", user: "amanda", groups: ["girls"], streams: streams(["A2", 0], ["G2", 3]) });
  socket().receive({ type: "resumed", recovered: false, missed: 0, lost: ["all", "group:girls"] });
  assert.deepEqual(delivered.at(-1).restarted, ["all"]);
  assert.deepEqual(chat.positions, streams(["A2", 0], ["G2", 3]));
  // Live, too: never at or below the last offset.
  socket().receive(message("group:girls", 4, "g4"), message("group:girls", 4, "again"), message("group:girls", 2, "old"));
  assert.deepEqual(delivered.slice(-1).map((event) => event.text), ["g4"]);
  chat.close();
});

test("a group joined meanwhile: its epoch is asked for; never learnt, it counts as lost", async () => {
  const { chat, delivered, socket } = fake("ws://example.com/", { positions: streams(["A", 1], ["G", 1]) });
  chat.connect();
  socket().open();
  socket().receive({ type: "welcome", user: "greg", groups: [], streams: { all: { epoch: "A", offset: 1 } } });
  socket().receive({ type: "resumed", recovered: true, missed: 0 });
  socket().receive({ type: "joined", group: "chess" }, { type: "joined", group: "boys" });
  const [chess, boys] = socket().sent;
  assert.deepEqual([chess.type, chess.stream, chess.limit], ["history", "group:chess", 0]);
  socket().receive({ type: "history", stream: "group:chess", epoch: "C", offset: 9, messages: [], id: chess.id });
  socket().receive(message("group:boys", 3, "b3"));
  assert.deepEqual(chat.positions, { all: { epoch: "A", offset: 1 }, "group:chess": { epoch: "C", offset: 9 } });
  assert.equal(boys.stream, "group:boys"); // its answer never came: no epoch for boys
  const first = socket();
  first.closed(1006);
  while (socket() === first) await new Promise((resolve) => setTimeout(resolve, 1)); // the retry
  assert.deepEqual(JSON.parse(socket().url.searchParams.get("resume")), { all: { epoch: "A", offset: 1 }, "group:chess": { epoch: "C", offset: 9 } });
  socket().open();
  const welcome = { all: { epoch: "A", offset: 1 }, "group:chess": { epoch: "C", offset: 9 }, "group:boys": { epoch: "B", offset: 5 } };
  socket().receive({ type: "welcome", user: "greg", groups: ["chess", "boys"], streams: welcome });
  socket().receive({ type: "resumed", recovered: true, missed: 0 });
  assert.deepEqual(delivered.at(-1), { type: "resumed", recovered: false, missed: 0, lost: ["group:boys"], restarted: [] });
  chat.close();
});

test("answers settle their request by id; other errors are events", async () => {
  const { chat, delivered, socket } = fake("ws://example.com/");
  chat.connect();
  socket().open();
  socket().receive({ type: "welcome", user: "amanda", groups: [], streams: {} });
  const sent = chat.send({ type: "broadcast", text: "hi", id: "mine" });
  const asked = chat.history("all", 2);
  const [first, second] = socket().sent;
  assert.match(first.id, /^w\d+$/); // the client's own id, whatever the frame said
  socket().receive({ type: "error", code: "rate_limited", detail: "slow down", id: first.id });
  socket().receive({ type: "history", stream: "all", epoch: "E", offset: 9, messages: [], id: second.id });
  socket().receive({ type: "error", code: "forbidden", detail: "the session has expired" });
  await assert.rejects(sent, { code: "rate_limited", detail: "slow down" });
  assert.equal((await asked).offset, 9);
  assert.deepEqual(chat.positions, {}); // history is off here: nothing to resume
  assert.deepEqual(delivered.map((event) => event.code ?? event.type), ["welcome", "forbidden"]);
  chat.close();
});

test("an attempt the server never answers is given up after connectTimeout, and tried again", async () => {
  const silent = net.createServer(() => {}); // accepts, and says nothing
  silent.listen(0, "127.0.0.1");
  await once(silent, "listening");
  const chat = new Client(`ws://127.0.0.1:${silent.address().port}/`, { connectTimeout: 0.2, minDelay: 0.05, maxDelay: 0.05 });
  const seen = [];
  const twice = new Promise((resolve) => chat.on("state", (state, reason) => {
    seen.push(reason ? `${state}:${reason}` : state);
    if (seen.length === 4) resolve();
  }));
  chat.connect();
  await twice;
  chat.close();
  silent.close();
  assert.deepEqual(seen.slice(0, 4), ["connecting", "disconnected:timeout", "connecting:retry", "disconnected:timeout"]);
});

test("a 1008 right after a flood's error backs off; after a forbidden one, the credentials get one more try", async () => {
  for (const [error, state, reason] of [["rate_limited", "disconnected", "flooded"], ["forbidden", "disconnected", "unauthorized"]]) {
    const { chat, socket } = fake("ws://127.0.0.1:9/", { token: "t" });
    chat.connect();
    await new Promise((resolve) => setImmediate(resolve));
    socket().open();
    socket().receive({ type: "welcome", user: "u", groups: [], streams: {} });
    socket().receive({ type: "error", code: error, detail: "closing" });
    socket().closed(1008);
    assert.deepEqual([chat.state, chat.reason], [state, reason]);
    chat.close();
  }
});

test("close() from a 'disconnected' listener stops the reconnecting", async () => {
  const { chat, socket } = fake("ws://127.0.0.1:9/", { token: "t" });
  chat.on("state", (state) => { if (state === "disconnected") chat.close(); });
  chat.connect();
  await new Promise((resolve) => setImmediate(resolve));
  socket().open();
  socket().receive({ type: "welcome", user: "u", groups: [], streams: {} });
  socket().closed(1006);
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual([chat.state, FakeSocket.made.length], ["closed", 1]);
});
