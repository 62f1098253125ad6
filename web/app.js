"use strict";
// The message page: one websocket to the page's own URL, pickers from the
// directory, every received text rendered with textContent.
(function () {
  const $ = (id) => document.getElementById(id);
  const messages = $("messages");
  const state = $("state");
  const kind = $("kind");
  const groupPick = $("group");
  const userPick = $("user");
  const text = $("text");
  const sendButton = $("send");
  let socket = null;
  let attempt = 0;
  let counter = 0;
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

  // kind: "received" (a message event), "sent" (our own, once acked) or "error".
  function add(meta, body, kind) {
    const item = document.createElement("li");
    item.className = kind;
    const head = document.createElement("span");
    head.className = "meta";
    head.textContent = meta;
    const content = document.createElement("span");
    content.textContent = body;
    item.append(head, content);
    messages.prepend(item);
  }

  function handle(event) {
    if (!event || typeof event !== "object") return;
    if (event.type === "welcome") {
      $("whoami").textContent = event.user;
    } else if (event.type === "message") {
      const when = new Date((event.ts || 0) * 1000).toLocaleTimeString();
      let where = event.kind;
      if (event.kind === "group") where += " " + event.group;
      if (event.kind === "direct") where += " to " + event.to;
      add(`${when} ${event.from} (${where})`, event.text, "received");
    } else if (event.type === "ack") {
      const sent = pending.get(event.id);
      pending.delete(event.id);
      if (sent) add(`${new Date().toLocaleTimeString()} you (${sent.where})`, sent.text, "sent");
    } else if (event.type === "error") {
      pending.delete(event.id);
      add("error " + event.code, event.detail, "error");
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
      setState("reconnecting", false);
      setTimeout(connect, delay);
    };
  }

  function fill(select, items) {
    select.replaceChildren(...items.map(([value, label]) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      return option;
    }));
  }

  async function loadDirectory() {
    const response = await fetch("api/directory", { credentials: "same-origin" });
    if (response.status === 401) { window.location.href = "login"; return; }
    const data = await response.json();
    fill(groupPick, data.groups.map((g) => [g, g]));
    fill(userPick, data.users.map((u) => [u.username, u.first_name || u.username]));
  }

  kind.addEventListener("change", function () {
    groupPick.hidden = kind.value !== "group";
    userPick.hidden = kind.value !== "direct";
  });

  $("compose").addEventListener("submit", function (e) {
    e.preventDefault();
    if (!text.value.trim() || !socket || socket.readyState !== WebSocket.OPEN) return;
    const message = { type: kind.value, text: text.value, id: "m" + (++counter) };
    if (kind.value === "group") message.group = groupPick.value;
    if (kind.value === "direct") message.user_name = userPick.value;
    // A broadcast comes back to its sender anyway; other kinds are shown on their ack.
    if (kind.value === "group") pending.set(message.id, { where: "group " + message.group, text: message.text });
    if (kind.value === "direct") pending.set(message.id, { where: "direct to " + message.user_name, text: message.text });
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
