"use strict";
// The message page: one websocket to the page's own URL, pickers from the
// directory, every received text rendered with textContent. One line per message:
// what comes back to us (a broadcast, our own group) is shown when it arrives;
// what does not (a group we are not in, a direct message) is shown on its ack.
(function () {
  const $ = (id) => document.getElementById(id);
  const messages = $("messages");
  const state = $("state");
  const kind = $("kind");
  const groupPick = $("group");
  const userPick = $("user");
  const text = $("text");
  const sendButton = $("send");
  const HINTS = {
    broadcast: "Broadcast: everyone who is connected gets it, you too.",
    group: "Group: every member of the group gets it, on every tab they have open.",
    direct: "Direct: only this person gets it, on every tab they have open.",
  };
  let socket = null;
  let attempt = 0;
  let counter = 0;
  let me = "";
  let myGroups = new Set();
  let directory = { groups: [], users: [] };
  const names = new Map(); // username (lower case) -> first name
  const pending = new Map(); // id -> what was sent, shown once the server acks it

  function socketUrl() {
    const url = new URL(".", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.hash = "";
    url.search = "";
    return url.href;
  }

  function setState(label, open) {
    state.textContent = label;
    state.className = open ? "state open" : "state";
    sendButton.disabled = !open;
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

  function handle(event) {
    if (!event || typeof event !== "object") return;
    if (event.type === "welcome") {
      me = event.user;
      myGroups = new Set(event.groups || []);
      $("whoami").textContent = event.user;
      fillPickers();
    } else if (event.type === "message") {
      const from = event.via ? `${event.from} (via ${event.via})` : nameOf(event.from);
      const mine = !event.via && isMe(event.from);
      add(
        `${clock(event.ts)} ${from} → ${audience(event.kind, event.group, event.to)}`,
        event.text,
        mine ? "received mine" : "received",
      );
    } else if (event.type === "ack") {
      const sent = pending.get(event.id);
      pending.delete(event.id);
      if (sent) add(`${clock()} you → ${sent.to}`, sent.text, "sent");
    } else if (event.type === "error") {
      pending.delete(event.id);
      add("not sent: " + event.code, event.detail, "error");
    }
  }

  // A refused handshake reaches the page only as a close with code 1006: ask the
  // server whether the session is still good before trying again.
  async function sessionGone() {
    try {
      const response = await fetch("api/directory", { credentials: "same-origin" });
      return response.status === 401;
    } catch (err) {
      return false; // the server is unreachable: keep reconnecting
    }
  }

  function connect() {
    setState(attempt ? "reconnecting" : "connecting", false);
    let opened = false;
    socket = new WebSocket(socketUrl());
    socket.onopen = function () {
      opened = true;
      attempt = 0;
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
      setState("reconnecting", false);
      if (e.code === 1008 || (!opened && await sessionGone())) {
        window.location.href = "login";
        return;
      }
      attempt += 1;
      const delay = Math.min(30000, 500 * 2 ** Math.min(attempt, 6)) * (0.5 + Math.random());
      setTimeout(connect, delay);
    };
  }

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
    if (response.status === 401) { window.location.href = "login"; return; }
    directory = await response.json();
    for (const u of directory.users) names.set(u.username.toLowerCase(), u.first_name || u.username);
    fillPickers();
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
    await fetch("logout", { method: "POST", credentials: "same-origin" });
    window.location.href = "login";
  });

  loadDirectory().catch(() => add("error", "could not load groups and users", "error"));
  connect();
})();
