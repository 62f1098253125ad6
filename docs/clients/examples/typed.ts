import { Client, ClientError, type Message, type Positions } from "wsfanout";

// A token from your backend, asked for again whenever the server refuses the last one.
async function getToken(): Promise<string> {
  const response = await fetch("/my-backend/wsfanout-token");
  return response.text();
}

const saved: Positions = JSON.parse(sessionStorage.getItem("positions") ?? "{}");
const chat = new Client("wss://chat.example.com/", { getToken, positions: saved });
chat.on("message", (event: Message) => console.log(event.from, event.text));
chat.on("resumed", ({ recovered, lost, restarted }) => {
  if (!recovered) console.warn("refetch", lost.filter((stream) => !restarted.includes(stream)));
});
chat.on("state", (state, reason) => {
  sessionStorage.setItem("positions", JSON.stringify(chat.positions));
  if (state === "closed" && reason === "unauthorized") location.assign("/login");
});
chat.connect();

try {
  const ack = await chat.send({ type: "group", group: "girls", text: "nails at 5" });
  console.log("sent", ack.id);
  const { online, count } = await chat.presence("girls");
  const { messages } = await chat.history("group:girls", 20);
  console.log(online, count, messages.length);
} catch (err) {
  if (err instanceof ClientError) console.error(err.code); // "unknown_group", "timeout", ...
}
