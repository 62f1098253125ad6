// wsfanout.js: the JavaScript client of wsfanout (DESIGN section 11). One ES module without
// dependencies or a build step: served by the service at /static/wsfanout.js and published to
// npm as `wsfanout` (clients/js/ packs this very file). Browsers and Node 20+ (Node 20 needs
// `node --experimental-websocket`, or pass `{ WebSocket }` from the `ws` package).
//
// Theory of operation.
//
// States. A client is `closed` until `connect()`; then `connecting` (an attempt is under way),
// `connected` (the server's `welcome` came), `disconnected` (a timer will try again) and, when
// the application closes it or the server refuses its credentials for good, `closed` again.
// Each change is a "state" event with a reason (the type `Reason` in wsfanout.d.ts).
//
// Attempts. One socket at a time; an attempt that brings no `welcome` within `connectTimeout`
// (a server that accepts and says nothing) is given up. A lost connection is tried again after
// a full-jitter exponential backoff: a random delay between 0 and min(maxDelay, minDelay *
// 2^attempt), the attempt counter reset once a connection has lived `resetAfter` seconds, so
// that clients cut off together spread their handshakes instead of returning as a herd. The close code changes
// the delay: 1001 and 1012 (the server goes away, or its node lost its backplane) come back
// within a random second; 1013 (too slow a reader), and 1008 right after a `rate_limited` or
// `bad_message` error (the server's answer to a flood), back off at least a few seconds; 1008 (the
// session or token expired, or was revoked) asks `getToken()` for a new token once, or without
// one tries the same credentials once more (a host app's session behind the cookie may have been
// renewed), then stops with reason "unauthorized".
//
// Refused handshakes. Neither a browser nor Node's WebSocket lets a script see a refused
// handshake's HTTP status: a 403, a 400 or a 429 all look like a close 1006 before open. So
// after a failure before open the client asks the server once over plain HTTP, with the same
// credentials (the cookie, or `?token=`), whether they still hold: `GET <socket path>api/directory`
// answers 401 to anonymous requests. 401 or 403: the credentials are refused, handled as 1008.
// No answer at all: the server is unreachable; back off. An answer of 200 means the server is up
// and takes our credentials yet refused the handshake: full, shutting down, a user over their
// connection limit (429), or the positions we asked to resume from (400). Two such refusals in a
// row while resuming, and the positions are dropped: the next attempt connects fresh and the
// application hears `resumed` with `recovered: false` (and `refused: true`) after its `welcome`.
// The probe needs the socket to be on the page's own origin (or CORS); otherwise it counts as
// unreachable, and the client simply backs off.
//
// Positions and resume. The client keeps each stream's epoch (from `welcome` and `history`
// answers) and the offset of the last message it gave the application, and reconnects with
// `?resume=`. A stream of the welcome that kept its epoch keeps our offset (the replay moves it
// on); any other takes the welcome's. A message at or below a stream's last offset is never
// given again, replayed or live (the server changes a stream's epoch only across connections:
// a node that lost its history closes them, 1012). The replay (the messages between `welcome`
// and `resumed`) is held until `resumed`, then delivered merged across streams by `ts`, each
// stream's in offset order. A group joined meanwhile is resumed too: its epoch is asked for
// (`history` with limit 0). `resumed` gains `restarted`: the lost streams whose new epoch
// stands at offset 0, whose history began anew and got no message since (a single node
// restarted and nothing was published: nothing to warn of). Streams the client itself could
// not resume (positions the server refused, a joined group whose epoch it never learnt) are
// added to `lost`; when the server sends no `resumed`, the client makes one.
//
// Requests. `send()`, `presence()` and `history()` give the frame an id and return a promise
// settled by the answer with that id: resolved with the `ack` (or the `presence` or `history`
// answer), rejected with a `ClientError` whose `code` is the server's error code, "timeout"
// after `requestTimeout`, or "disconnected" when the connection is not up or goes before the
// answer (nothing is queued: the application decides whether to send again).

const DEFAULTS = Object.freeze({
  // Timeouts, in seconds
  minDelay: 0.5, // the first backoff's ceiling
  maxDelay: 20, // the backoff's ceiling
  resetAfter: 10, // a connection that lived this long starts the backoff afresh
  requestTimeout: 10, // how long send(), presence() and history() wait for their answer
  connectTimeout: 10, // how long an attempt may take, from the handshake to the welcome
});
const GOING_AWAY_DELAY = 1; // seconds: the most to wait after a 1001 or 1012
const SLOW_CONSUMER_ATTEMPT = 2; // after 1013, back off as after this many failures at least
const REFUSALS_BEFORE_FRESH = 2; // handshakes refused in a row while resuming: drop the positions
const PROBE_TIMEOUT = 5; // seconds the probe of a refused handshake may take
const TIMED_OUT = -1; // not a close code: an attempt that took longer than connectTimeout
// The server closes a client that floods it with 1008 too, after an error with one of these.
const FLOOD_ERRORS = new Set(["rate_limited", "bad_message"]);
const NOTHING = Object.freeze({}); // an empty record, shared
const CLOSE_CODES = Object.freeze({
  1001: "going_away",
  1012: "restart",
  1013: "slow_consumer",
});

/**
 * A full-jitter backoff delay, in seconds: random in [0, min(maxDelay, minDelay * 2^attempt)).
 */
export function backoff(attempt, minDelay = DEFAULTS.minDelay, maxDelay = DEFAULTS.maxDelay,
  random = Math.random) {
  const ceiling = Math.min(maxDelay, minDelay * 2 ** Math.min(Math.max(attempt, 0), 64));
  return random() * ceiling;
}

/** A refused request: `code` is the server's error code, "timeout" or "disconnected". */
export class ClientError extends Error {
  constructor(code, detail, event) {
    super(detail ? `${code}: ${detail}` : code);
    this.name = "ClientError";
    this.code = code;
    this.detail = detail || "";
    this.event = event;
  }
}

function seconds(value, fallback, name) {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== "number" || !(value >= 0) || !Number.isFinite(value)) {
    throw new TypeError(`${name} must be a number of seconds >= 0, not ${String(value)}`);
  }
  return value;
}

function isPosition(where) {
  return !!where && typeof where === "object" && typeof where.epoch === "string"
    && where.epoch !== "" && Number.isSafeInteger(where.offset) && where.offset >= 0;
}

/** The socket's URL: `url` resolved against the page, http(s) turned into ws(s). */
function socketUrl(url) {
  const page = globalThis.location && globalThis.location.href;
  let target;
  try {
    if (url === undefined || url === null || url === "") {
      if (!page) throw new TypeError("no page to take it from");
      // The socket at the page's own path (so under a mount prefix too), and its ?token=.
      const here = new URL(page);
      target = new URL(".", here);
      target.search = "";
      const token = here.searchParams.get("token");
      if (token) target.searchParams.set("token", token);
    } else {
      target = page ? new URL(String(url), page) : new URL(String(url));
    }
  } catch (err) {
    throw new TypeError(`new Client(url): ${!url ? "a URL is needed" : `bad URL ${JSON.stringify(String(url))}`} (${err.message})`);
  }
  if (target.protocol === "http:") target.protocol = "ws:";
  if (target.protocol === "https:") target.protocol = "wss:";
  if (target.protocol !== "ws:" && target.protocol !== "wss:") {
    throw new TypeError(`new Client(url): a ws:, wss:, http: or https: URL, not ${target.protocol}`);
  }
  if (target.hash) target.hash = "";
  target.searchParams.delete("resume"); // ours to set
  return target;
}

function report(err) {
  // A listener's exception is the application's: report it as an uncaught one would be,
  // without breaking the client (as EventTarget does).
  setTimeout(() => { throw err; });
}

export class Client {
  /**
   * @param {string|URL} [url] the socket (ws:, wss:, or http(s): of the same path); relative to
   *   the page, or omitted in a page for the page's own path and `?token=`.
   * @param {object} [options] token, getToken, positions, minDelay, maxDelay, resetAfter,
   *   requestTimeout (seconds), WebSocket (a constructor; default globalThis.WebSocket).
   */
  constructor(url, options) {
    if (options === undefined && url && typeof url === "object" && !(url instanceof URL)) {
      options = url; // new Client({ ... }) in a page
      url = undefined;
    }
    options = options || {};
    this._href = socketUrl(url).href; // the socket's URL, without a token of getToken's
    this._token = options.token || null;
    this._getToken = options.getToken || null;
    if (this._getToken !== null && typeof this._getToken !== "function") {
      throw new TypeError("getToken must be a function returning a token (or a promise of one)");
    }
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket here: pass { WebSocket } (Node 20: node --experimental-websocket)");
    }
    this._minDelay = seconds(options.minDelay, DEFAULTS.minDelay, "minDelay");
    this._maxDelay = seconds(options.maxDelay, DEFAULTS.maxDelay, "maxDelay");
    this._resetAfter = seconds(options.resetAfter, DEFAULTS.resetAfter, "resetAfter");
    this._requestTimeout = seconds(options.requestTimeout, DEFAULTS.requestTimeout, "requestTimeout");
    this._connectTimeout = seconds(options.connectTimeout, DEFAULTS.connectTimeout, "connectTimeout");
    this._positions = new Map(); // stream -> {epoch (null: not known yet), offset}
    for (const [stream, where] of Object.entries(options.positions || {})) {
      if (isPosition(where)) this._positions.set(stream, { epoch: where.epoch, offset: where.offset });
    }
    this._listeners = new Map(); // event name -> [listener]
    this._pending = new Map(); // request id -> {resolve, reject, timer}
    this._counter = 0;
    this._conn = null; // the current attempt or connection
    this._timer = null; // the next attempt
    this._run = 0; // bumped by every attempt and by close(): stale callbacks see it changed
    this._attempt = 0; // failures since the last connection that lived resetAfter
    this._refusals = 0; // handshakes refused in a row, credentials good, while resuming
    this._authRetried = false; // one more try was given after a refusal: next time, stop
    this._dropped = null; // positions dropped after refusals: told to the app after the welcome
    this._stopped = true;
    this._online = null; // in a page: back online, try at once (made at connect())
    /** "connecting" | "connected" | "disconnected" | "closed" */
    this.state = "closed";
    /** Why: the reason of the last "state" event (null before connect()). */
    this.reason = null;
  }

  // ---- Public API -----------------------------------------------------------------------

  /** Start connecting (and reconnecting) until close(). */
  connect() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._attempt = 0;
    this._refusals = 0;
    this._authRetried = false;
    if (typeof globalThis.addEventListener === "function") {
      this._online = this._online || (() => {
        if (this.state === "disconnected" && this._timer !== null) {
          clearTimeout(this._timer);
          this._open("retry");
        }
      });
      globalThis.addEventListener("online", this._online); // back online: try at once
    }
    this._open(null);
    return this;
  }

  /** Close for good (code 1000); pending requests are rejected with "disconnected". */
  close() {
    if (this._stopped) return;
    this._stop();
    this._set("closed", "closed");
  }

  /** Listen to "state" (state, reason), to an event type, or to "event" (every event). */
  on(name, listener) {
    if (typeof listener !== "function") throw new TypeError("on(name, listener): a function");
    if (!this._listeners.has(name)) this._listeners.set(name, []);
    this._listeners.get(name).push(listener);
    return this;
  }

  off(name, listener) {
    const listeners = this._listeners.get(name);
    const index = listeners ? listeners.indexOf(listener) : -1;
    if (index >= 0) listeners.splice(index, 1);
    return this;
  }

  /** Send a frame (broadcast, group, direct); resolves with its ack. */
  send(frame) {
    if (!frame || typeof frame !== "object" || Array.isArray(frame)) {
      return Promise.reject(new ClientError("bad_message", "a frame is an object: { type, ... }"));
    }
    return this._request(frame);
  }

  /** Who of a group is online: resolves with the presence answer. */
  presence(group) {
    return this._request({ type: "presence", group });
  }

  /** A stream's epoch, offset and last `limit` messages: resolves with the history answer. */
  history(stream, limit) {
    const frame = { type: "history", stream };
    if (limit !== undefined) frame.limit = limit;
    return this._request(frame);
  }

  /** Where each stream stands: {stream: {epoch, offset}}, a copy to save and resume from. */
  get positions() {
    const copy = {};
    for (const [stream, where] of this._positions) {
      if (where.epoch && where.offset !== null) copy[stream] = { epoch: where.epoch, offset: where.offset };
    }
    return copy;
  }

  // ---- Attempts ---------------------------------------------------------------------------

  async _open(reason) {
    this._timer = null;
    const run = ++this._run;
    this._set("connecting", reason);
    let token = this._token;
    if (this._getToken) {
      try {
        token = await this._getToken();
      } catch (err) {
        if (run === this._run) this._backOff("token_failed"); // getToken's to report
        return;
      }
      if (run !== this._run) return; // closed meanwhile
    }
    const positions = this._positions.size ? this.positions : NOTHING; // copied once
    const asked = Object.keys(positions).length ? positions : null;
    let url = this._href;
    if (token || asked) {
      const withQuery = new URL(url);
      if (token) withQuery.searchParams.set("token", String(token));
      if (asked) withQuery.searchParams.set("resume", JSON.stringify(asked));
      url = withQuery.href;
    }
    let socket;
    try {
      socket = new this._WebSocket(url);
    } catch (err) {
      this._backOff("connection_lost");
      report(err);
      return;
    }
    // replay: the resume's messages, held until "resumed"; top: the welcome's positions
    const conn = { socket, url, asked, run, opened: false, welcomed: false, since: 0, replay: null, top: {} };
    this._conn = conn;
    // A handshake that hangs (a server that accepts but does not answer) is given up on.
    conn.deadline = setTimeout(() => {
      this._closed(conn, TIMED_OUT);
      try { socket.close(); } catch (err) { /* closed already */ }
    }, this._connectTimeout * 1000);
    socket.onopen = () => { conn.opened = true; };
    socket.onmessage = (e) => this._frame(conn, e.data);
    // A failed connection fires "error", then "close" with 1006; but Node 20's WebSocket fires
    // no "close" after a failed handshake, so the error is taken as that close.
    socket.onerror = () => {
      this._closed(conn, 1006);
      try { socket.close(); } catch (err) { /* closed already */ }
    };
    socket.onclose = (e) => this._closed(conn, e.code);
  }

  _closed(conn, code) {
    if (conn !== this._conn) return;
    this._conn = null;
    clearTimeout(conn.deadline);
    this._endReplay(conn);
    this._failPending();
    if (conn.welcomed && (Date.now() - conn.since) / 1000 >= this._resetAfter) this._attempt = 0;
    if (code === TIMED_OUT) {
      this._backOff("timeout");
    } else if (!conn.opened) {
      this._refused(conn);
    } else if (code === 1001 || code === 1012) {
      this._retry(CLOSE_CODES[code], Math.random() * GOING_AWAY_DELAY);
    } else if (code === 1008 && FLOOD_ERRORS.has(conn.lastError)) {
      // Closed for sending too fast (the error before the close says so), not for its
      // credentials: back off as a slow consumer does.
      this._attempt = Math.max(this._attempt, SLOW_CONSUMER_ATTEMPT);
      this._backOff("flooded");
    } else if (code === 1008) {
      this._unauthorized(true);
    } else if (code === 1013) {
      this._attempt = Math.max(this._attempt, SLOW_CONSUMER_ATTEMPT);
      this._backOff(CLOSE_CODES[code]);
    } else {
      this._backOff("connection_lost");
    }
  }

  // A handshake failed before open: ask the server whether our credentials still hold.
  async _refused(conn) {
    const verdict = await this._probe(conn.url);
    if (conn.run !== this._run || this._stopped) return;
    if (verdict === "unauthorized") {
      this._unauthorized();
      return;
    }
    this._refusals = verdict === "up" && conn.asked ? this._refusals + 1 : 0;
    if (this._refusals >= REFUSALS_BEFORE_FRESH) {
      this._refusals = 0;
      this._dropped = conn.asked;
      this._positions = new Map();
    }
    this._backOff(verdict === "unreachable" ? "unreachable" : "refused");
  }

  async _probe(socketUrl) {
    if (typeof fetch !== "function") return "unknown";
    const url = new URL(socketUrl);
    const token = url.searchParams.get("token");
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    if (!url.pathname.endsWith("/")) url.pathname += "/";
    url.pathname += "api/directory";
    url.search = "";
    if (token) url.searchParams.set("token", token);
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), PROBE_TIMEOUT * 1000);
    try {
      const response = await fetch(url.href, { credentials: "same-origin", signal: abort.signal });
      if (response.body) response.body.cancel().catch(() => {});
      if (response.status === 401 || response.status === 403) return "unauthorized";
      return response.ok ? "up" : "unknown";
    } catch (err) {
      return "unreachable";
    } finally {
      clearTimeout(timer);
    }
  }

  // The credentials were refused: one new token if there is a getToken, else stop. After the
  // server ended an open session (`ended`, 1008), the same credentials get one more try too.
  _unauthorized(ended = false) {
    if ((this._getToken || ended) && !this._authRetried) {
      this._authRetried = true;
      this._retry("unauthorized", backoff(0, this._minDelay, this._maxDelay));
    } else {
      this._stop();
      this._set("closed", "unauthorized");
    }
  }

  _backOff(reason) {
    const delay = backoff(this._attempt, this._minDelay, this._maxDelay);
    this._attempt += 1;
    this._retry(reason, delay);
  }

  _retry(reason, delay) {
    // The timer first: a listener that calls close() on "disconnected" must find it to clear.
    this._timer = setTimeout(() => this._open("retry"), delay * 1000);
    this._set("disconnected", reason);
  }

  _stop() {
    this._stopped = true;
    this._run += 1;
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
    if (this._online !== null && typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._online);
    }
    const conn = this._conn;
    this._conn = null;
    if (conn) {
      clearTimeout(conn.deadline);
      this._endReplay(conn);
      try { conn.socket.close(1000); } catch (err) { /* already closing */ }
    }
    this._failPending();
  }

  _set(state, reason) {
    if (this.state === state) return;
    this.state = state;
    this.reason = reason === undefined ? null : reason;
    this._emit("state", state, reason === undefined ? null : reason);
  }

  // ---- Events ----------------------------------------------------------------------------

  _emit(name, ...args) {
    for (const key of name === "state" ? [name] : [name, "event"]) {
      for (const listener of [...(this._listeners.get(key) || [])]) {
        try { listener(...args); } catch (err) { report(err); }
      }
    }
  }

  _frame(conn, data) {
    if (conn !== this._conn) return;
    let parsed;
    try {
      parsed = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch (err) {
      return; // not a frame of ours
    }
    for (const event of Array.isArray(parsed) ? parsed : [parsed]) {
      if (conn !== this._conn) return; // a listener closed the client
      if (event && typeof event === "object" && typeof event.type === "string") this._event(conn, event);
    }
  }

  _event(conn, event) {
    switch (event.type) {
      case "welcome": this._welcome(conn, event); return;
      case "message": this._message(conn, event); return;
      case "resumed": this._resumed(conn, event); return;
      case "ack": case "presence": case "history": this._answer(event); return;
      case "error":
        conn.lastError = event.code;
        if (!this._answer(event)) this._emit("error", event);
        return;
      case "joined": this._joined(event); break;
      default: break;
    }
    this._emit(event.type, event);
  }

  _welcome(conn, event) {
    clearTimeout(conn.deadline);
    conn.deadline = null; // not kept for the connection's life
    conn.welcomed = true;
    conn.since = Date.now();
    this._authRetried = false;
    this._refusals = 0;
    const dropped = this._dropped || {};
    this._dropped = null;
    // Streams this connection cannot resume: positions the server refused, and streams met
    // since the last welcome (joined) whose epoch was never learnt, if anything came since.
    conn.unresumed = [];
    const streams = event.streams && typeof event.streams === "object" ? event.streams : {};
    const next = new Map();
    for (const [stream, where] of Object.entries(streams)) {
      if (!isPosition(where)) continue;
      conn.top[stream] = { epoch: where.epoch, offset: where.offset };
      const had = this._positions.get(stream);
      const kept = had && had.epoch === where.epoch && had.offset <= where.offset;
      next.set(stream, kept ? { epoch: had.epoch, offset: had.offset } : { ...conn.top[stream] });
      if (stream in dropped || (had && had.epoch === null && (had.offset ?? 0) !== where.offset)) {
        conn.unresumed.push(stream);
      }
    }
    // where each stream stood, for `restarted`
    conn.before = conn.asked || conn.unresumed.length ? { ...dropped, ...conn.asked } : NOTHING;
    this._positions = next; // streams no longer ours (or history off) are forgotten
    conn.replay = conn.asked ? [] : null;
    this._set("connected", null);
    this._emit("welcome", event);
    if (!conn.asked && conn.unresumed.length && conn.run === this._run) {
      // The server sends no resumed (nothing was asked to resume): the client makes one.
      const resumed = { type: "resumed", recovered: false, missed: 0, lost: [] };
      this._emit("resumed", this._amend(conn, resumed, Object.keys(dropped).length > 0));
    }
  }

  _resumed(conn, event) {
    this._endReplay(conn);
    this._emit("resumed", this._amend(conn, event, false));
  }

  // A resumed event with the client's additions: the streams it could not resume itself among
  // `lost`, and `restarted`: the lost streams whose new epoch stands at offset 0 (their history
  // began anew and nothing was published since).
  _amend(conn, event, refused) {
    const lost = Array.isArray(event.lost) ? event.lost.filter((s) => typeof s === "string") : [];
    lost.push(...conn.unresumed.filter((stream) => !lost.includes(stream)));
    for (const stream of lost) {
      // Nothing of it was replayed: it goes on from where it stands now.
      const where = this._positions.get(stream);
      const top = conn.top[stream];
      if (where && top && where.epoch === top.epoch && where.offset < top.offset) where.offset = top.offset;
    }
    const restarted = lost.filter((stream) => conn.before[stream] && conn.top[stream]
      && conn.top[stream].epoch !== conn.before[stream].epoch && conn.top[stream].offset === 0);
    const amended = { ...event, lost, restarted };
    if (lost.length) amended.recovered = false;
    if (refused) amended.refused = true;
    return amended;
  }

  _message(conn, event) {
    if (typeof event.stream !== "string" || !Number.isSafeInteger(event.offset)) {
      this._emit("message", event); // no position: nothing to order it by
    } else if (conn.replay) {
      conn.replay.push(event);
    } else {
      this._deliver(event);
    }
  }

  // A message with a position reaches the application once: not at or below the last offset.
  _deliver(event) {
    const where = this._positions.get(event.stream);
    if (!where) {
      this._positions.set(event.stream, { epoch: null, offset: event.offset });
    } else if (where.offset !== null && event.offset <= where.offset) {
      return; // delivered already
    } else {
      where.offset = event.offset;
    }
    this._emit("message", event);
  }

  // The replay, merged across streams by time, each stream's in offset order.
  _endReplay(conn) {
    const replay = conn.replay;
    conn.replay = null;
    if (!replay || !replay.length) return;
    const queues = new Map();
    for (const event of replay) {
      if (!queues.has(event.stream)) queues.set(event.stream, []);
      queues.get(event.stream).push(event);
    }
    const heads = [...queues.values()];
    while (heads.length) {
      let next = 0;
      for (let i = 1; i < heads.length; i++) {
        if ((Number(heads[i][0].ts) || 0) < (Number(heads[next][0].ts) || 0)) next = i;
      }
      this._deliver(heads[next].shift());
      if (!heads[next].length) heads.splice(next, 1);
    }
  }

  // Added to a group: learn its stream's epoch, so that a resume covers it too.
  _joined(event) {
    if (typeof event.group !== "string") return;
    const stream = `group:${event.group}`;
    if (!this._positions.has(stream)) this._positions.set(stream, { epoch: null, offset: null });
    this.history(stream, 0).catch(() => {}); // history off, or gone again: nothing to learn
  }

  // ---- Requests ----------------------------------------------------------------------------

  _request(frame) {
    const conn = this._conn;
    if (this.state !== "connected" || !conn) {
      return Promise.reject(new ClientError("disconnected", `the client is ${this.state}`));
    }
    const id = `w${++this._counter}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new ClientError("timeout", `no answer within ${this._requestTimeout} s`));
      }, this._requestTimeout * 1000);
      this._pending.set(id, { resolve, reject, timer });
      try {
        conn.socket.send(JSON.stringify({ ...frame, id }));
      } catch (err) {
        this._settle(id, new ClientError("disconnected", String(err && err.message)));
      }
    });
  }

  // An answer to one of our requests (true), or not (false).
  _answer(event) {
    const pending = typeof event.id === "string" ? this._pending.get(event.id) : undefined;
    if (!pending) return false;
    if (event.type === "error") {
      this._settle(event.id, new ClientError(String(event.code), event.detail, event));
      return true;
    }
    if (event.type === "history") this._learn(event);
    this._settle(event.id, null, event);
    return true;
  }

  _settle(id, error, answer) {
    const pending = this._pending.get(id);
    if (!pending) return;
    this._pending.delete(id);
    clearTimeout(pending.timer);
    if (error) pending.reject(error); else pending.resolve(answer);
  }

  // A history answer names the stream's epoch: the one thing a joined stream lacks. Its offset
  // is taken only when no message of that stream came: one published before the answer may
  // still be on its way from another node.
  _learn(answer) {
    const where = this._positions.get(answer.stream);
    if (!where || where.epoch !== null || typeof answer.epoch !== "string" || !answer.epoch) return;
    where.epoch = answer.epoch;
    if (where.offset === null && Number.isSafeInteger(answer.offset)) where.offset = answer.offset;
  }

  _failPending() {
    for (const id of [...this._pending.keys()]) {
      this._settle(id, new ClientError("disconnected", "the connection closed before the answer"));
    }
  }
}
