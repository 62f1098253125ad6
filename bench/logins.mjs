// Login load for bench/run.py: HTTP clients POST /login as the login page's fetch() does
// (JSON in, a session cookie out). It speaks to run.py as loadgen.mjs does: one JSON line
// when ready, "go" on stdin, one JSON line of results.
//
// Config (a JSON file named by argv[2]):
//   url         ws://127.0.0.1:PORT/ (the server's root; /login is under it)
//   clients     HTTP clients at once, each on a keep-alive connection of its own
//   seconds     how long they keep logging in (logins in flight then are finished, and count)
//   usernames   taken in turn, one login each, so the throttle's counts per name and per
//               (name, address) never come near their limits
//   password    every user's
//   cookieName  the cookie a login must set to count
//   sources     local addresses to connect from, in turn (client i uses sources[i % n]), so
//               no address comes near the throttle's per-address limit either
//   client      "browser" (default): the headers Chrome sends with fetch(); "plain": none
//
// A login counts when it is answered 200 with the cookie; any other answer, or a failed
// request, is a failure, counted by status in "failures".
import http from "node:http";
import { performance } from "node:perf_hooks";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const browser = (cfg.client || "browser") === "browser";
const origin = new URL(cfg.url.replace(/^ws/, "http")).origin;
const url = `${origin}${new URL(cfg.url).pathname.replace(/\/?$/, "/")}login`;
// As loadgen.mjs's: what Chrome sends besides what node:http adds itself.
const BROWSER_HEADERS = {
  Origin: origin,
  "User-Agent":
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36",
  Accept: "*/*",
  "Accept-Encoding": "gzip, deflate, br, zstd",
  "Accept-Language": "en-US,en;q=0.9",
};

function login(agent, localAddress, username) {
  const body = JSON.stringify({ username, password: cfg.password });
  const headers = {
    ...(browser ? BROWSER_HEADERS : {}),
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(body),
  };
  return new Promise((resolve) => {
    const request = http.request(url, { method: "POST", agent, headers, localAddress }, (response) => {
      response.resume();
      response.on("end", () => {
        const cookies = response.headers["set-cookie"] || [];
        const ok = response.statusCode === 200 && cookies.some((c) => c.startsWith(`${cfg.cookieName}=`));
        resolve(ok ? "ok" : String(response.statusCode));
      });
    });
    request.on("error", (err) => resolve(err.code || "error"));
    request.end(body);
  });
}

function quantile(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

async function run() {
  const lines = createInterface({ input: process.stdin });
  const commands = lines[Symbol.asyncIterator]();
  process.stdout.write(JSON.stringify({ ready: true, handshake_s: 0 }) + "\n");
  await commands.next(); // "go"

  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const until = t0 + cfg.seconds * 1000;
  const times = [];
  const failures = {};
  let next = 0;
  async function client(index) {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const sources = cfg.sources || [];
    const localAddress = sources.length ? sources[index % sources.length] : undefined;
    while (performance.now() < until) {
      const username = cfg.usernames[next++ % cfg.usernames.length];
      const started = performance.now();
      const outcome = await login(agent, localAddress, username);
      if (outcome === "ok") times.push(performance.now() - started);
      else failures[outcome] = (failures[outcome] || 0) + 1;
    }
    agent.destroy();
  }
  await Promise.all(Array.from({ length: cfg.clients }, (_, index) => client(index)));
  const elapsed = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const measured = Float64Array.from(times).sort();
  const result = {
    scenario: "logins",
    connections: 0,
    clients: cfg.clients,
    logins: times.length,
    logins_per_s: times.length / elapsed,
    deliveries: 0, // run.py's common fields: no websocket, no delivery
    expected: 0,
    complete: true,
    elapsed_s: elapsed,
    p50_ms: quantile(measured, 0.5),
    p90_ms: quantile(measured, 0.9),
    p99_ms: quantile(measured, 0.99),
    max_ms: measured.length ? measured[measured.length - 1] : null,
    loadgen_cpu_s: (cpu.user + cpu.system) / 1e6,
    errors: Object.values(failures).reduce((a, b) => a + b, 0),
    failures,
    client: browser ? "browser" : "plain",
    negotiated: "",
  };
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0);
}

run().catch((err) => {
  process.stdout.write(JSON.stringify({ error: String((err && err.message) || err) }) + "\n");
  process.exit(1);
});
