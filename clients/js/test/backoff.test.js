// The delay function and what the client checks before it ever connects: no server needed.

import assert from "node:assert/strict";
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
