// The message page, built on the JavaScript client (wsfanout.js) and its public API only: the
// client connects, reconnects, resumes and answers requests; this file renders. Every received
// text is rendered with textContent. One line per message: what comes back to us (a broadcast,
// our own group) is shown when it arrives; what does not (a group we are not in, a direct
// message) is shown on its ack.
//
// Scrollback: the lines shown and the client's positions are kept together in this tab's
// sessionStorage, so a reload shows the same lines again and the client's resume brings what
// was sent meanwhile, once. A tab with nothing kept shows each stream's recent history instead.
// When the server could not replay what was missed, a notice says so, unless the server only
// restarted and nothing was sent since (`restarted`): then one line says the server restarted.
//
// Presence: who of each of our groups is online, asked for on every welcome and kept current
// with online / offline events.
import { Client } from "./wsfanout.js";

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
const POSITIONS_KEY = "wsfanout.positions"; // {user, streams: the client's positions}
const LINES_KEY = "wsfanout.lines"; // {user, lines: [{meta, text, className}]}, as shown
const LINES_KEPT = 300; // the newest lines a reload shows again
const HISTORY_LIMIT = 50; // messages of each stream a new tab shows
const FLUSH_DELAY = 200; // ms between writes to sessionStorage
const REASK = 30000; // ms: a group too large for online/offline events is asked again
const token = new URLSearchParams(window.location.search).get("token"); // a page opened with ?token=

let me = "";
let myGroups = new Set();
let directory = { groups: [], users: [] };
const names = new Map(); // username (lower case) -> first name
let shown = []; // the lines on the page, as kept
let welcomes = 0; // connections welcomed so far
let loggedOut = false;

// ---- What this tab kept ------------------------------------------------------------------

function read(key) {
  try {
    const data = JSON.parse(sessionStorage.getItem(key) || "null");
    return data && typeof data === "object" ? data : null;
  } catch (err) {
    return null; // no storage, or not ours: start afresh
  }
}

const kept = read(POSITIONS_KEY);
const keptLines = read(LINES_KEY);
const keptUser = kept && typeof kept.user === "string" ? kept.user : "";
let foreign = false; // what was kept is another user's: the first resume's outcome is not ours

let flushTimer = null;

function flush() {
  if (flushTimer !== null) clearTimeout(flushTimer);
  flushTimer = null;
  if (loggedOut) return;
  const user = me || keptUser;
  try {
    sessionStorage.setItem(POSITIONS_KEY, JSON.stringify({ user, streams: chat.positions }));
    sessionStorage.setItem(LINES_KEY, JSON.stringify({ user, lines: shown.slice(-LINES_KEPT) }));
  } catch (err) {
    // storage full or disabled: the page still works, a reload just starts afresh
  }
}

function changed() {
  if (flushTimer === null) flushTimer = setTimeout(flush, FLUSH_DELAY);
}

function forget() {
  loggedOut = true;
  try {
    sessionStorage.removeItem(POSITIONS_KEY);
    sessionStorage.removeItem(LINES_KEY);
  } catch (err) {
    // nothing kept
  }
}

window.addEventListener("pagehide", flush);
window.addEventListener("beforeunload", flush);

// ---- Rendering ---------------------------------------------------------------------------

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

function render(line) {
  const item = document.createElement("li");
  item.className = line.className;
  const head = document.createElement("span");
  head.className = "meta";
  head.textContent = line.meta;
  const content = document.createElement("span");
  content.className = "text";
  content.textContent = line.text;
  item.append(head, content);
  return item;
}

// Lines at the end of the list (or, older ones, at its top). className: "received" (a
// message; "mine" too when we sent it), "sent" (ours, shown on its ack), "error", "membership".
function add(lines, older) {
  if (!lines.length) return;
  const atBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
  const items = lines.map(render);
  if (older) {
    messages.prepend(...items);
    shown = [...lines, ...shown];
  } else {
    messages.append(...items);
    shown.push(...lines);
  }
  if (shown.length > 2 * LINES_KEPT) shown = shown.slice(-LINES_KEPT);
  $("empty").hidden = true;
  if (atBottom || older) messages.scrollTop = messages.scrollHeight;
  changed();
}

function say(meta, body, className) {
  add([{ meta, text: String(body ?? ""), className }]);
}

function audience(kindName, group, to) {
  if (kindName === "group") return group;
  if (kindName === "direct") return nameOf(to);
  return "everyone";
}

function lineOf(event) {
  const from = event.via ? `${event.from} (via ${event.via})` : nameOf(event.from);
  const mine = !event.via && isMe(event.from);
  return {
    meta: `${clock(event.ts)} ${from} → ${audience(event.kind, event.group, event.to)}`,
    text: String(event.text ?? ""),
    className: mine ? "received mine" : "received",
  };
}

function streamLabel(stream) {
  if (stream === "all") return "everyone";
  if (stream.startsWith("group:")) return stream.slice(6);
  if (stream.startsWith("user:")) return "direct messages";
  return stream;
}

// A new tab: what each stream said before the welcome (later ones arrive as messages).
async function showHistory() {
  const tops = chat.positions;
  const answers = await Promise.allSettled(
    Object.keys(tops).map((stream) => chat.history(stream, HISTORY_LIMIT)));
  const older = [];
  for (const answer of answers) {
    if (answer.status !== "fulfilled") continue;
    const top = tops[answer.value.stream];
    for (const event of answer.value.messages) {
      if (top && event.offset <= top.offset) older.push(event);
    }
  }
  older.sort((a, b) => (Number(a.ts) || 0) - (Number(b.ts) || 0));
  add(older.map(lineOf), true);
}

// ---- Presence ----------------------------------------------------------------------------

const online = new Map(); // group -> {users: Set of usernames, hidden: how many not named, known}

function resetOnline() {
  online.clear();
  for (const group of [...myGroups].sort()) online.set(group, { users: new Set(), hidden: 0, known: false });
  renderOnline();
}

function askPresence(only) {
  const asked = welcomes;
  for (const group of only ? [only] : online.keys()) {
    chat.presence(group).then((answer) => {
      if (welcomes === asked) presence(answer);
    }).catch(() => {}); // the panel just stays as it was
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

function presence(answer) {
  const seen = online.get(answer.group);
  if (!seen || !Array.isArray(answer.online)) return;
  seen.users = new Set(answer.online.map(String)); // the answer replaces what we knew
  seen.hidden = Math.max(0, (Number(answer.count) || 0) - seen.users.size);
  seen.known = true;
  renderOnline();
  if (answer.events === false) {
    // No online/offline events for this group (it is large): ask again now and then.
    const asked = welcomes;
    setTimeout(() => { if (welcomes === asked && chat.state === "connected") askPresence(answer.group); }, REASK);
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
  const joined = event.type === "joined";
  if (joined) myGroups.add(event.group); else myGroups.delete(event.group);
  say(`${clock()} ${joined ? "you were added to" : "you were removed from"} ${event.group}`,
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

// ---- The client --------------------------------------------------------------------------

const chat = new Client({ positions: kept && kept.streams ? kept.streams : undefined });

chat.on("state", (now, reason) => {
  if (now === "closed" && reason === "unauthorized") {
    toLogin();
    return;
  }
  if (now === "connected") setState("connected", true);
  else if (now === "connecting" && !reason) setState("connecting", false);
  else setState(now === "closed" ? "closed" : "reconnecting", false);
  if (now !== "connected") flush();
});

chat.on("welcome", (event) => {
  welcomes += 1;
  if (welcomes === 1 && keptUser && keptUser !== event.user) {
    // What this tab kept was someone else's (another login since): not theirs to see.
    foreign = true;
    messages.replaceChildren();
    shown = [];
  }
  me = event.user;
  myGroups = new Set(event.groups || []);
  $("whoami").textContent = event.user;
  fillPickers();
  resetOnline();
  askPresence();
  if (welcomes === 1 && !shown.length) showHistory();
  flush(); // where every stream stands now, kept at once
});

chat.on("message", (event) => add([lineOf(event)]));

chat.on("resumed", (event) => {
  if (foreign) {
    foreign = false;
    return;
  }
  const restarted = new Set(event.restarted);
  const lost = event.lost.filter((stream) => !restarted.has(stream));
  if (restarted.size && !event.refused) say(`${clock()} the server restarted`, "", "membership");
  if (!event.recovered && lost.length) {
    $("notice-text").textContent = "Some messages sent while you were away could not be "
      + `recovered (${lost.map(streamLabel).join(", ")}).`;
    notice.hidden = false;
  }
});

chat.on("online", arrival);
chat.on("offline", arrival);
chat.on("joined", membership);
chat.on("left", membership);
chat.on("error", (event) => say(`error: ${event.code}`, event.detail, "error"));

$("notice-close").addEventListener("click", () => { notice.hidden = true; });

function toLogin() {
  forget(); // the next one to log in here may be someone else
  chat.close();
  window.location.href = "login";
}

// ---- Pickers and the compose form --------------------------------------------------------

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
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  const response = await fetch("api/directory", { credentials: "same-origin", headers });
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

$("compose").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!text.value.trim() || chat.state !== "connected") return;
  const message = { type: kind.value, text: text.value };
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
  const to = audience(kind.value, message.group, message.user_name);
  chat.send(message).then(
    () => { if (!echoes) say(`${clock()} you → ${to}`, message.text, "sent"); },
    (err) => say(`not sent: ${err.code}`, err.detail, "error"),
  );
  text.value = "";
});

$("logout").addEventListener("submit", async (e) => {
  e.preventDefault();
  forget();
  chat.close();
  await fetch("logout", { method: "POST", credentials: "same-origin" });
  window.location.href = "login";
});

// ---- Start -------------------------------------------------------------------------------

if (keptLines && keptLines.user === keptUser && Array.isArray(keptLines.lines)) {
  add(keptLines.lines.filter((line) => line && typeof line.meta === "string"
    && typeof line.text === "string" && typeof line.className === "string"));
}
loadDirectory().catch(() => say("error", "could not load groups and users", "error"));
chat.connect();
