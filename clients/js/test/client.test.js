// The client against one real node (history in memory): states, requests, presence, history,
// resume across connection resets, a restart that loses the history, and 1008.

import assert from "node:assert/strict";
import { after, test } from "node:test";

import { Client } from "../../../web/wsfanout.js";
import { Proxy, amanda, control, env, next, publish, reach, states, token } from "./support.js";

const FAST = { minDelay: 0.05, maxDelay: 0.4 }; // tests need not wait seconds for a retry
const clients = [];

function client(url, options) {
  const chat = new Client(url, { ...FAST, ...options });
  clients.push(chat);
  return chat;
}

after(() => {
  for (const chat of clients) chat.close();
});

/** Every message `chat` delivers, as text. */
function texts(chat) {
  const seen = [];
  chat.on("message", (event) => seen.push(event.text));
  return seen;
}

test("states: closed, connecting, connected, and closed again by close()", async () => {
  const chat = client(env.single, { token: amanda() });
  const seen = states(chat);
  assert.equal(chat.state, "closed");
  const welcome = next(chat, "welcome");
  chat.connect();
  assert.equal(chat.state, "connecting");
  assert.equal((await welcome).user, "amanda");
  assert.equal(chat.state, "connected");
  assert.deepEqual(Object.keys(chat.positions).sort(), ["all", "group:girls", "user:amanda"]);
  chat.close();
  assert.deepEqual(seen, ["connecting", "connected", "closed:closed"]);
  await assert.rejects(chat.send({ type: "broadcast", text: "late" }), { code: "disconnected" });
});

test("send resolves with the ack and rejects with the server's error code", async () => {
  const chat = client(env.single, { token: amanda() }).connect();
  await reach(chat, "connected");
  const echo = next(chat, "message", (event) => event.text === "hello all");
  const ack = await chat.send({ type: "broadcast", text: "hello all" });
  assert.equal(ack.type, "ack");
  assert.equal((await echo).from, "amanda");
  await assert.rejects(chat.send({ type: "group", group: "chess", text: "?" }), (err) => {
    assert.equal(err.code, "unknown_group");
    assert.match(err.detail, /chess/);
    return true;
  });
  await assert.rejects(chat.send({ type: "shout", text: "?" }), { code: "bad_message" });
  // The error answered a request: it is not an "error" event as well.
  let errors = 0;
  chat.on("error", () => { errors += 1; });
  await chat.send({ type: "direct", user_name: "greg", text: "hi greg" });
  assert.equal(errors, 0);
  chat.close();
});

test("a request the server never answers times out; one cut short rejects with disconnected", async () => {
  const proxy = await new Proxy(env.single).start();
  const chat = client(proxy.url, { token: amanda(), requestTimeout: 0.3 }).connect();
  await reach(chat, "connected");
  proxy.hold();
  await assert.rejects(chat.send({ type: "broadcast", text: "into the void" }), { code: "timeout" });
  const pending = chat.presence("girls");
  proxy.cut();
  await assert.rejects(pending, { code: "disconnected" });
  chat.close();
  await proxy.close();
});

test("presence answers for the user's group and is forbidden for another", async () => {
  const lisa = client(env.single, { token: token("lisa", ["girls"]) }).connect();
  const chat = client(env.single, { token: amanda() }).connect();
  await Promise.all([reach(lisa, "connected"), reach(chat, "connected")]);
  const answer = await chat.presence("girls");
  assert.equal(answer.group, "girls");
  assert.deepEqual([...answer.online].sort(), ["amanda", "lisa"]);
  assert.equal(answer.count, 2);
  await assert.rejects(chat.presence("boys"), { code: "forbidden" });
  const gone = next(chat, "offline", (event) => event.user === "lisa");
  lisa.close();
  assert.equal((await gone).group, "girls");
  chat.close();
});

test("history answers with the stream's epoch, offset and last messages", async () => {
  const chat = client(env.single, { token: amanda() }).connect();
  await reach(chat, "connected");
  for (const text of ["h1", "h2", "h3"]) await publish(env.single, { type: "group", group: "girls", text });
  const answer = await chat.history("group:girls", 2);
  assert.deepEqual(answer.messages.map((event) => event.text), ["h2", "h3"]);
  assert.equal(answer.epoch, chat.positions["group:girls"].epoch);
  assert.equal(answer.offset, answer.messages[1].offset);
  await assert.rejects(chat.history("group:boys", 2), { code: "forbidden" });
  chat.close();
});

test("connection resets while messages flow: each message once, in order, none lost", async () => {
  const proxy = await new Proxy(env.single).start();
  const chat = client(proxy.url, { token: amanda() });
  const got = texts(chat);
  const resumed = [];
  chat.on("resumed", (event) => resumed.push(event));
  chat.connect();
  await reach(chat, "connected");
  const sent = [];
  const say = async (count) => {
    for (let i = 0; i < count; i++) {
      const text = `n${String(sent.length + 1).padStart(3, "0")}`;
      await publish(env.single, { type: "broadcast", text });
      sent.push(text);
    }
  };
  await say(20);
  for (let cut = 0; cut < 3; cut++) {
    // Cut off, and kept off while 15 more are published: the resume must bring them.
    proxy.blocked = true;
    proxy.cut();
    await reach(chat, "disconnected");
    await say(15);
    proxy.blocked = false;
    await next(chat, "resumed", () => true);
    await say(10); // and live ones, in between the cuts
  }
  await say(5);
  while (got.length < sent.length) await next(chat, "message");
  await new Promise((resolve) => setTimeout(resolve, 200)); // a duplicate would show by now
  assert.deepEqual(got, sent);
  assert.equal(resumed.length, 3);
  assert.ok(resumed.every((event) => event.recovered && event.lost.length === 0 && event.missed >= 15));
  chat.close();
  await proxy.close();
});

test("a restart that loses the history: restarted when nothing was published, lost when it was", async () => {
  const proxy = await new Proxy(env.single).start();
  const chat = client(proxy.url, { token: amanda() });
  const got = texts(chat);
  chat.connect();
  await reach(chat, "connected");
  await publish(env.single, { type: "broadcast", text: "before" });
  await next(chat, "message", (event) => event.text === "before");

  const first = next(chat, "resumed", () => true, 30);
  await control("stop", "single");
  await control("start", "single");
  const quiet = await first;
  assert.equal(quiet.recovered, false);
  assert.deepEqual([...quiet.lost].sort(), ["all", "group:girls", "user:amanda"]);
  assert.deepEqual([...quiet.restarted].sort(), ["all", "group:girls", "user:amanda"]);

  // Cut off across a restart, and a message published before the client is back: lost.
  proxy.blocked = true;
  proxy.cut();
  await control("stop", "single");
  await control("start", "single");
  await publish(env.single, { type: "broadcast", text: "while away" });
  const second = next(chat, "resumed", () => true, 30);
  proxy.blocked = false;
  const loud = await second;
  assert.equal(loud.recovered, false);
  assert.ok(loud.lost.includes("all"));
  assert.deepEqual([...loud.restarted].sort(), ["group:girls", "user:amanda"]);
  await publish(env.single, { type: "broadcast", text: "after" });
  await next(chat, "message", (event) => event.text === "after");
  assert.deepEqual(got, ["before", "after"]);
  chat.close();
  await proxy.close();
});

test("1008 (the token expired) without getToken: the same token once more, refused, then stop", async () => {
  const chat = client(env.single, { token: token("amanda", ["girls"], { ttl: 2 }) });
  const seen = states(chat);
  const expired = next(chat, "error", (event) => event.code === "forbidden");
  chat.connect();
  await reach(chat, "connected");
  await expired;
  await reach(chat, "closed");
  assert.deepEqual(seen, ["connecting", "connected", "disconnected:unauthorized", "connecting:retry", "closed:unauthorized"]);
});

test("1008 with getToken: a new token is asked for once, and the client carries on", async () => {
  let calls = 0;
  const getToken = async () => {
    calls += 1;
    return token("amanda", ["girls"], { ttl: calls === 1 ? 2 : 300 });
  };
  const chat = client(env.single, { getToken });
  const seen = states(chat);
  chat.connect();
  await reach(chat, "connected");
  await next(chat, "state", (state) => state === "disconnected", 10);
  await reach(chat, "connected");
  assert.equal(calls, 2);
  assert.deepEqual(seen, ["connecting", "connected", "disconnected:unauthorized", "connecting:retry", "connected"]);
  chat.close();
});

test("a refused token closes the client (unauthorized); getToken gets one more chance", async () => {
  const forged = token("amanda", ["girls"], { secret: "not the server's secret" });
  const chat = client(env.single, { token: forged });
  const seen = states(chat);
  chat.connect();
  await reach(chat, "closed");
  assert.deepEqual(seen, ["connecting", "closed:unauthorized"]);

  let calls = 0;
  const retried = client(env.single, { getToken: () => { calls += 1; return forged; } });
  const tried = states(retried);
  retried.connect();
  await reach(retried, "closed");
  assert.equal(calls, 2);
  assert.deepEqual(tried, ["connecting", "disconnected:unauthorized", "connecting:retry", "closed:unauthorized"]);
});
