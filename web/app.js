"use strict";
// The message page: one websocket to the page's own URL, pickers from the
// directory, every received text rendered with textContent. One line per message:
// what comes back to us (a broadcast, our own group) is shown when it arrives;
// what does not (a group we are not in, a direct message) is shown on its ack.
//
// Positions: every message names its stream and offset. The page keeps, per stream of
// the last welcome, the epoch and the offset of the last message it showed, in
// sessionStorage (so a reload in the same tab keeps them), and reconnects with
// ?resume= so the server sends what was missed meanwhile, once. A replayed message at
// or below the kept offset is not shown again; a live one always is, and its offset is
// kept as it comes (a stream whose history was lost starts again lower, in a new epoch:
// the next resume then says it could not be recovered).
//
// Presence: who of each of our groups is online, asked for on every welcome and kept
// current with online / offline events.
(function () {
  const $ = (id) => document.getElementById(id);
  const messages = $("messages");
  const state = $("state");
  const kind = $("kind");
  const groupPick = $("group");
  const userPick = $("user");
  const text = $("text");
  const sendButton = $("send");
  const notice = $("notice");
  const onlinePanel = $("online");
  const onlineList = $("online-groups");
  const HINTS = {
    broadcast: "Broadcast: everyone who is connected gets it, you too.",
    group: "Group: every member of the group gets it, on every tab they have open.",
    direct: "Direct: only this person gets it, on every tab they have open.",
  };
  const POSITIONS_KEY = "wsfanout.positions"; // {user, streams: {name: {epoch, offset}}}
  const FLUSH_DELAY = 200; // ms between writes of the positions to sessionStorage
  let socket = null;
  let attempt = 0;
  let retry = null; // the timer of the next reconnection
  let counter = 0;
  let me = "";
  let myGroups = new Set();
  let directory = { groups: [], users: [] };
  const names = new Map(); // username (lower case) -> first name
  const pending = new Map(); // id -> what was sent, shown once the server acks it

  // ---- Positions ---------------------------------------------------------------

  let saved = readPositions(); // what this tab saw last: {user, streams} or null
  let positions = saved ? saved.streams : null; // stream -> {epoch, offset}
  let tops = {}; // stream -> offset as the last welcome said (where a lost stream resumes)
  let asked = null; // what the current connection asked to resume, or null
  let askedFor = ""; // the user those positions were saved for
  let dirty = false;
  let flushTimer = null;
  let refusals = 0; // handshakes with resume refused in a row by a reachable server
  let replay = null; // a resume's missed messages, shown together once they are all in

  function validPositions(streams) {
    const valid = {};
    if (!streams || typeof streams !== "object") return null;
    for (const [name, where] of Object.entries(streams)) {
      if (where && typeof where.epoch === "string" && where.epoch
          && Number.isSafeInteger(where.offset) && where.offset >= 0) {
        valid[name] = { epoch: where.epoch, offset: where.offset };
      }
    }
    return Object.keys(valid).length ? valid : null;
  }

  function readPositions() {
    try {
      const data = JSON.parse(sessionStorage.getItem(POSITIONS_KEY) || "null");
      const streams = data && validPositions(data.streams);
      return streams ? { user: String(data.user || ""), streams } : null;
    } catch (err) {
      return null; // no storage, or not ours: start afresh
    }
  }

  function flush() {
    if (flushTimer !== null) clearTimeout(flushTimer);
    flushTimer = null;
    if (!dirty) return;
    dirty = false;
    try {
      if (positions && me) {
        sessionStorage.setItem(POSITIONS_KEY, JSON.stringify({ user: me, streams: positions }));
      } else {
        sessionStorage.removeItem(POSITIONS_KEY);
      }
    } catch (err) {
      // storage full or disabled: the page still works, a reload just starts afresh
    }
  }

  function changed() {
    dirty = true;
    if (flushTimer === null) flushTimer = setTimeout(flush, FLUSH_DELAY);
  }

  function forgetPositions() {
    positions = null;
    saved = null;
    asked = null;
    dirty = true;
    flush();
  }

  // The welcome says where every stream of ours stands. Streams we resume keep our
  // offset (the replay that follows moves it on); the others start at the top.
  function welcomed(streams) {
    if (!streams || typeof streams !== "object") {
      positions = null; // history is off: nothing to resume
      tops = {};
      changed();
      return;
    }
    const mine = asked && askedFor === me ? asked : {};
    const next = {};
    tops = {};
    for (const [name, where] of Object.entries(streams)) {
      if (!where || typeof where.epoch !== "string" || !Number.isSafeInteger(where.offset)) continue;
      tops[name] = where.offset;
      const had = mine[name];
      next[name] = had && had.epoch === where.epoch && had.offset <= where.offset
        ? { epoch: had.epoch, offset: had.offset }
        : { epoch: where.epoch, offset: where.offset };
    }
    positions = next;
    changed();
  }

  // Whether a message is new to this page (it is, when it carries no position we know).
  function fresh(event) {
    const where = positions && positions[event.stream];
    return !where || !Number.isSafeInteger(event.offset) || event.offset > where.offset;
  }

  function advance(event) {
    const where = positions && positions[event.stream];
    if (where && Number.isSafeInteger(event.offset) && event.offset !== where.offset) {
      where.offset = event.offset;
      changed();
    }
  }

  // The replay comes stream by stream: show it in the order it was written, each
  // stream's messages still in offset order (a merge by time, never a sort within a stream).
  function showReplay() {
    const queues = new Map();
    for (const event of replay || []) {
      if (!queues.has(event.stream)) queues.set(event.stream, []);
      queues.get(event.stream).push(event);
    }
    replay = null;
    const heads = [...queues.values()];
    while (heads.length) {
      let next = 0;
      for (let i = 1; i < heads.length; i++) {
        if ((Number(heads[i][0].ts) || 0) < (Number(heads[next][0].ts) || 0)) next = i;
      }
      show(heads[next].shift(), true);
      if (!heads[next].length) heads.splice(next, 1);
    }
  }

  window.addEventListener("pagehide", flush);
  window.addEventListener("beforeunload", flush);

  // ---- Notice (messages that could not be recovered) ---------------------------

  function streamLabel(stream) {
    if (stream === "all") return "everyone";
    if (stream.startsWith("group:")) return stream.slice(6);
    if (stream.startsWith("user:")) return "direct messages";
    return stream;
  }

  function resumed(event) {
    const lost = Array.isArray(event.lost) ? event.lost.map(String) : [];
    for (const stream of lost) {
      // Nothing of it was replayed: go on from where it stands now.
      const where = positions && positions[stream];
      if (where && stream in tops && tops[stream] > where.offset) {
        where.offset = tops[stream];
        changed();
      }
    }
    const foreign = askedFor !== me; // positions saved by someone else in this tab
    asked = null;
    if (event.recovered === false && !foreign) {
      const which = lost.length ? ` (${lost.map(streamLabel).join(", ")})` : "";
      $("notice-text").textContent =
        `Some messages sent while you were away could not be recovered${which}.`;
      notice.hidden = false;
    }
  }

  $("notice-close").addEventListener("click", function () { notice.hidden = true; });

  // ---- Presence -----------------------------------------------------------------

  const online = new Map(); // group -> {users: Set of usernames, hidden: how many not named}
  const presenceIds = new Set();

  function resetOnline() {
    online.clear();
    for (const group of [...myGroups].sort()) online.set(group, { users: new Set(), hidden: 0, known: false });
    renderOnline();
  }

  const REASK = 30000; // ms: a group too large for online/offline events is asked again

  function askPresence(only) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    for (const group of only ? [only] : online.keys()) {
      const id = "p" + (++counter);
      presenceIds.add(id);
      socket.send(JSON.stringify({ type: "presence", group, id }));
    }
  }

  function renderOnline() {
    onlinePanel.hidden = online.size === 0;
    onlineList.replaceChildren(...[...online].map(([group, seen]) => {
      const item = document.createElement("li");
      item.dataset.group = group;
      const title = document.createElement("span");
      title.className = "group";
      title.textContent = group;
      const count = document.createElement("span");
      count.className = "count";
      const people = document.createElement("span");
      people.className = "people";
      if (seen.known) {
        const total = seen.users.size + seen.hidden;
        count.textContent = `${total} online`;
        const listed = [...seen.users].sort((a, b) =>
          (isMe(b) - isMe(a)) || nameOf(a).localeCompare(nameOf(b)));
        people.replaceChildren(...listed.map((user) => {
          const person = document.createElement("span");
          person.className = isMe(user) ? "person me" : "person";
          person.dataset.user = user;
          person.textContent = nameOf(user);
          return person;
        }));
        if (seen.hidden > 0) people.append(` and ${seen.hidden} more`);
      } else {
        count.textContent = "…";
      }
      item.append(title, count, people);
      return item;
    }));
  }

  function presence(event) {
    presenceIds.delete(event.id);
    const seen = online.get(event.group);
    if (!seen || !Array.isArray(event.online)) return;
    seen.users = new Set(event.online.map(String)); // the answer replaces what we knew
    seen.hidden = Math.max(0, (Number(event.count) || 0) - seen.users.size);
    seen.known = true;
    renderOnline();
    if (event.events === false) {
      // No online/offline events for this group (it is large): ask again now and then.
      const asked = socket;
      setTimeout(() => { if (socket === asked) askPresence(event.group); }, REASK);
    }
  }

  function arrival(event) {
    const seen = online.get(event.group);
    if (!seen || typeof event.user !== "string") return;
    if (event.type === "online") seen.users.add(event.user);
    else if (!seen.users.delete(event.user) && seen.hidden > 0) seen.hidden -= 1;
    renderOnline();
  }

  // An operator added us to a group, or took us out of one, while we were connected.
  function membership(event) {
    if (typeof event.group !== "string") return;
    const joined = event.type === "joined";
    if (joined) myGroups.add(event.group); else myGroups.delete(event.group);
    add(`${clock()} ${joined ? "you were added to" : "you were removed from"} ${event.group}`,
      "", "membership");
    fillPickers();
    if (joined) {
      online.set(event.group, { users: new Set(), hidden: 0, known: false });
      askPresence(event.group);
    } else {
      online.delete(event.group);
    }
    renderOnline();
  }

  // ---- Rendering --------------------------------------------------------------------

  function setState(label, open) {
    state.textContent = label;
    state.className = open ? "state open" : "state";
    sendButton.disabled = !open;
    onlinePanel.classList.toggle("stale", !open);
  }

  function isMe(username) {
    return !!me && String(username).toLowerCase() === me.toLowerCase();
  }

  function nameOf(username) {
    if (isMe(username)) return "you";
    return names.get(String(username).toLowerCase()) || username;
  }

  function clock(seconds) {
    const when = seconds ? new Date(seconds * 1000) : new Date();
    return when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  // One line: "12:01 Greg → girls" then the text. className: "received" (a message
  // event; "mine" too when we sent it), "sent" (ours, shown on its ack) or "error".
  function add(meta, body, className) {
    const item = document.createElement("li");
    item.className = className;
    const head = document.createElement("span");
    head.className = "meta";
    head.textContent = meta;
    const content = document.createElement("span");
    content.className = "text";
    content.textContent = body;
    item.append(head, content);
    const atBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
    messages.append(item);
    $("empty").hidden = true;
    if (atBottom) messages.scrollTop = messages.scrollHeight;
  }

  function audience(kindName, group, to) {
    if (kindName === "group") return group;
    if (kindName === "direct") return nameOf(to);
    return "everyone";
  }

  function show(event, replayed) {
    // A replayed message we have shown already is skipped (belt and braces: the server
    // sends it once); a live one is the server's word.
    if (replayed && !fresh(event)) return;
    const from = event.via ? `${event.from} (via ${event.via})` : nameOf(event.from);
    const mine = !event.via && isMe(event.from);
    add(
      `${clock(event.ts)} ${from} → ${audience(event.kind, event.group, event.to)}`,
      event.text,
      mine ? "received mine" : "received",
    );
    advance(event);
  }

  function handle(event) {
    if (!event || typeof event !== "object") return;
    if (event.type === "welcome") {
      me = event.user;
      myGroups = new Set(event.groups || []);
      $("whoami").textContent = event.user;
      welcomed(event.streams);
      replay = asked ? [] : null; // a resume: what was missed comes next, then "resumed"
      fillPickers();
      resetOnline();
      askPresence();
    } else if (event.type === "message") {
      if (replay) replay.push(event); else show(event);
    } else if (event.type === "resumed") {
      showReplay();
      resumed(event);
    } else if (event.type === "presence") {
      presence(event);
    } else if (event.type === "online" || event.type === "offline") {
      arrival(event);
    } else if (event.type === "joined" || event.type === "left") {
      membership(event);
    } else if (event.type === "ack") {
      const sent = pending.get(event.id);
      pending.delete(event.id);
      if (sent) add(`${clock()} you → ${sent.to}`, sent.text, "sent");
    } else if (event.type === "error") {
      if (presenceIds.delete(event.id)) return; // the panel just stays as it was
      pending.delete(event.id);
      add("not sent: " + event.code, event.detail, "error");
    }
  }

  // ---- The connection ---------------------------------------------------------------

  function socketUrl() {
    const url = new URL(".", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.hash = "";
    url.search = "";
    if (positions) url.search = "?resume=" + encodeURIComponent(JSON.stringify(positions));
    return url.href;
  }

  function toLogin() {
    forgetPositions(); // the next one to log in here may be someone else
    window.location.href = "login";
  }

  // A refused handshake reaches the page only as a close with code 1006: ask the
  // server what it thinks of the session. "gone" (401), "up", or "down" (unreachable).
  async function serverSays() {
    try {
      const response = await fetch("api/directory", { credentials: "same-origin" });
      return response.status === 401 ? "gone" : "up";
    } catch (err) {
      return "down";
    }
  }

  function connect() {
    retry = null;
    setState(attempt ? "reconnecting" : "connecting", false);
    let opened = false;
    asked = positions ? JSON.parse(JSON.stringify(positions)) : null;
    askedFor = saved && !me ? saved.user : me; // before the first welcome: whoever saved them
    const resuming = !!asked;
    socket = new WebSocket(socketUrl());
    socket.onopen = function () {
      opened = true;
      attempt = 0;
      refusals = 0;
      setState("connected", true);
    };
    socket.onmessage = function (e) {
      let data;
      try { data = JSON.parse(e.data); } catch (err) { return; }
      if (Array.isArray(data)) data.forEach(handle); else handle(data);
    };
    socket.onclose = async function (e) {
      socket = null;
      pending.clear(); // their acks will never come
      presenceIds.clear();
      if (replay) showReplay(); // cut short: show what did come
      setState("reconnecting", false);
      flush();
      if (e.code === 1008) { toLogin(); return; }
      if (!opened) {
        const says = await serverSays();
        if (says === "gone") { toLogin(); return; }
        // The server is up but turned the handshake down: twice in a row with a resume,
        // and the positions are dropped (they may be what it refuses).
        refusals = says === "up" && resuming ? refusals + 1 : 0;
        if (refusals >= 2) { refusals = 0; forgetPositions(); }
      }
      attempt += 1;
      const delay = Math.min(30000, 500 * 2 ** Math.min(attempt, 6)) * (0.5 + Math.random());
      retry = setTimeout(connect, delay);
    };
  }

  // Back online (the network, or the laptop's lid): try at once rather than after the backoff.
  window.addEventListener("online", function () {
    if (retry !== null) { clearTimeout(retry); connect(); }
  });

  // ---- Pickers and the compose form -----------------------------------------------

  function fill(select, items) {
    const chosen = select.value;
    select.replaceChildren(...items.map(([value, label]) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      return option;
    }));
    if (items.some(([value]) => value === chosen)) select.value = chosen;
  }

  // Groups you are in first; people by first name, without yourself.
  function fillPickers() {
    const groups = [...directory.groups].sort((a, b) =>
      (myGroups.has(b) - myGroups.has(a)) || a.localeCompare(b));
    fill(groupPick, groups.map((g) => [g, myGroups.has(g) ? `${g} (you are in it)` : g]));
    const people = directory.users
      .filter((u) => !isMe(u.username))
      .sort((a, b) => (a.first_name || a.username).localeCompare(b.first_name || b.username));
    fill(userPick, people.map((u) => [
      u.username, u.first_name ? `${u.first_name} (${u.username})` : u.username,
    ]));
  }

  async function loadDirectory() {
    const response = await fetch("api/directory", { credentials: "same-origin" });
    if (response.status === 401) { toLogin(); return; }
    directory = await response.json();
    for (const u of directory.users) names.set(u.username.toLowerCase(), u.first_name || u.username);
    fillPickers();
    renderOnline();
  }

  function showKind() {
    groupPick.hidden = kind.value !== "group";
    userPick.hidden = kind.value !== "direct";
    $("hint").textContent = HINTS[kind.value];
  }
  kind.addEventListener("change", showKind);
  showKind();

  $("compose").addEventListener("submit", function (e) {
    e.preventDefault();
    if (!text.value.trim() || !socket || socket.readyState !== WebSocket.OPEN) return;
    const message = { type: kind.value, text: text.value, id: "m" + (++counter) };
    let echoes = true; // a broadcast always comes back to its sender
    if (kind.value === "group") {
      if (!groupPick.value) return;
      message.group = groupPick.value;
      echoes = myGroups.has(message.group);
    }
    if (kind.value === "direct") {
      if (!userPick.value) return;
      message.user_name = userPick.value;
      echoes = isMe(message.user_name);
    }
    if (!echoes) {
      pending.set(message.id, {
        to: audience(kind.value, message.group, message.user_name),
        text: message.text,
      });
    }
    socket.send(JSON.stringify(message));
    text.value = "";
  });

  $("logout").addEventListener("submit", async function (e) {
    e.preventDefault();
    forgetPositions();
    await fetch("logout", { method: "POST", credentials: "same-origin" });
    window.location.href = "login";
  });

  loadDirectory().catch(() => add("error", "could not load groups and users", "error"));
  connect();
})();
