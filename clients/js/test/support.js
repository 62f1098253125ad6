// What the client's tests share: the servers tests/test_js_client.py started for them (their
// URLs and credentials in the environment), tokens, publishing, a TCP proxy that cuts and
// blocks connections, and waiting for a client's events.

import { createHmac } from "node:crypto";
import { once } from "node:events";
import net from "node:net";

export const env = {
  single: process.env.WSFANOUT_URL_SINGLE, // one node, history in memory
  redis: process.env.WSFANOUT_URL_REDIS, // one node with the Redis backplane (unset: no Redis)
  secret: process.env.WSFANOUT_JWT_SECRET,
  apiKey: process.env.WSFANOUT_API_KEY,
  control: process.env.WSFANOUT_CONTROL, // POST /stop/<server>, /start/<server>
};
if (!env.single || !env.secret || !env.apiKey || !env.control) {
  throw new Error("run by tests/test_js_client.py, which starts the servers and sets WSFANOUT_*");
}

/** A connection token as an operator's backend mints one (HS256). */
export function token(user, groups, { ttl = 300, secret = env.secret } = {}) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const exp = Math.floor(Date.now() / 1000) + ttl;
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub: user, groups, exp })}`;
  return `${unsigned}.${createHmac("sha256", secret).update(unsigned).digest("base64url")}`;
}

export const amanda = () => token("amanda", ["girls"]);

/** Publish through the HTTP API as the backend "ops"; retried while the server is away. */
export async function publish(server, item) {
  const url = new URL("api/publish", server.replace(/^ws/, "http"));
  for (;;) {
    try {
      const response = await fetch(url, {
        method: "POST",
        headers: { authorization: `Bearer ${env.apiKey}`, "content-type": "application/json" },
        body: JSON.stringify({ from: "ops", ...item }),
      });
      if (response.status === 202) return;
      if (response.status !== 503) throw new Error(`publish: ${response.status} ${await response.text()}`);
    } catch (err) {
      if (!(err instanceof TypeError)) throw err; // a TypeError: not reachable (restarting)
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Stop or start a server (tests/test_js_client.py's control endpoint). */
export async function control(action, server) {
  const response = await fetch(`${env.control}/${action}/${server}`, { method: "POST" });
  if (response.status !== 200) throw new Error(`control ${action} ${server}: ${response.status}`);
}

/** The next event `name` of `chat` for which `test` holds (within `seconds`). */
export function next(chat, name, test = () => true, seconds = 15) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      chat.off(name, listener);
      reject(new Error(`no ${name} event within ${seconds} s (state ${chat.state})`));
    }, seconds * 1000);
    function listener(...args) {
      if (!test(...args)) return;
      clearTimeout(timer);
      chat.off(name, listener);
      resolve(args.length > 1 ? args : args[0]);
    }
    chat.on(name, listener);
  });
}

/** Resolves once `chat` is in `state`. */
export function reach(chat, state, seconds = 15) {
  if (chat.state === state) return Promise.resolve();
  return next(chat, "state", (now) => now === state, seconds);
}

/** Every state change of `chat`, as "state:reason". */
export function states(chat) {
  const seen = [];
  chat.on("state", (state, reason) => seen.push(reason ? `${state}:${reason}` : state));
  return seen;
}

/** A TCP proxy in front of a server: it can cut every connection (a reset, as a network does)
 * and block new ones (they are reset at once, as from a host that is away). */
export class Proxy {
  constructor(target) {
    this.target = new URL(target);
    this.blocked = false;
    this.pairs = new Set();
    this.server = net.createServer((client) => this._accept(client));
  }

  async start() {
    this.server.listen(0, "127.0.0.1");
    await once(this.server, "listening");
    this.url = `ws://127.0.0.1:${this.server.address().port}${this.target.pathname}`;
    return this;
  }

  _accept(client) {
    if (this.blocked) {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(Number(this.target.port), this.target.hostname);
    const pair = { client, upstream, held: false };
    this.pairs.add(pair);
    const end = () => {
      this.pairs.delete(pair);
      if (!client.destroyed) client.resetAndDestroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
    client.on("data", (data) => { if (!pair.held) upstream.write(data); });
    upstream.pipe(client);
  }

  /** Reset every connection through the proxy. */
  cut() {
    for (const { client, upstream } of this.pairs) {
      client.resetAndDestroy();
      upstream.destroy();
    }
    this.pairs.clear();
  }

  /** From now on, drop what clients send (the server never hears their requests). */
  hold() {
    for (const pair of this.pairs) pair.held = true;
  }

  async close() {
    this.cut();
    this.server.close();
    await once(this.server, "close");
  }
}
