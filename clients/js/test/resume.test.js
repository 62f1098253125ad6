// The client against a node with the Redis backplane: the history outlives the server, so a
// client cut off by a restart while messages are published gets each of them once, in order.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Client } from "../../../web/wsfanout.js";
import { Proxy, amanda, control, env, next, publish, reach } from "./support.js";

const NO_REDIS = env.redis ? false : "Redis is not running on 127.0.0.1:6379 (start redis-server to run this)";

test("a server restart while messages are published: each once, in order, recovered", { skip: NO_REDIS }, async () => {
  // Through a proxy, to keep the client away until messages were published after the restart.
  const proxy = await new Proxy(env.redis).start();
  const chat = new Client(proxy.url, { token: amanda(), minDelay: 0.05, maxDelay: 0.4 });
  const got = [];
  const resumed = [];
  chat.on("message", (event) => got.push(event.text));
  chat.on("resumed", (event) => resumed.push(event));
  chat.connect();
  await reach(chat, "connected");
  const sent = [];
  let writing = true;
  const writer = (async () => {
    // Every kind of stream, one after the other, retried while the server is away.
    const kinds = [
      { type: "broadcast" },
      { type: "group", group: "girls" },
      { type: "direct", user_name: "amanda" },
    ];
    while (writing) {
      const text = `m${String(sent.length + 1).padStart(3, "0")}`;
      await publish(env.redis, { ...kinds[sent.length % 3], text });
      sent.push(text);
    }
  })();
  const restarted = next(chat, "resumed", () => true, 30);
  while (sent.length < 30) await new Promise((resolve) => setTimeout(resolve, 10));
  proxy.blocked = true;
  await control("stop", "redis");
  await control("start", "redis");
  const back = sent.length;
  while (sent.length < back + 10) await new Promise((resolve) => setTimeout(resolve, 10));
  proxy.blocked = false;
  await restarted;
  while (sent.length < back + 40) await new Promise((resolve) => setTimeout(resolve, 10));
  writing = false;
  await writer;
  while (got.length < sent.length) await next(chat, "message");
  await new Promise((resolve) => setTimeout(resolve, 200)); // a duplicate would show by now
  chat.close();
  await proxy.close();
  // In order within each stream; across streams the replay is merged by time, so all in order.
  assert.deepEqual(got, sent);
  assert.equal(resumed.length, 1);
  assert.equal(resumed[0].recovered, true);
  assert.deepEqual(resumed[0].lost, []);
  assert.ok(resumed[0].missed >= 10, `missed ${resumed[0].missed}`);
});
