import { Client } from "wsfanout";

const chat = new Client(process.env.WSFANOUT_URL, { token: process.env.WSFANOUT_TOKEN });
chat.on("state", (state, reason) => console.log("state:", state, reason ?? ""));
chat.on("message", (event) => console.log(`${event.from}: ${event.text}`));
chat.on("welcome", async () => {
  const ack = await chat.send({ type: "broadcast", text: "hello from Node" });
  console.log("acknowledged:", ack.id);
  chat.close(); // the example ends here; a real client stays connected
});
chat.connect();
