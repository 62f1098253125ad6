import { Client } from "wsfanout";

const chat = new Client(process.env.WSFANOUT_URL, { token: process.env.WSFANOUT_TOKEN });
chat.on("state", (state, reason) => console.log("state:", state, reason ?? ""));
chat.on("message", (event) => {
  console.log(`${event.from}: ${event.text}`);
  if (event.text === "hello from Node") chat.close();
});
chat.on("welcome", () => chat.send({ type: "broadcast", text: "hello from Node" }));
chat.connect();
