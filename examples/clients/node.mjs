// Log LLM calls to llmlogd over its Unix socket (NDJSON), with Node's standard library only.
import net from "node:net";
import readline from "node:readline";

const SOCKET = process.env.LLMLOGD_SOCKET || "/run/llmlogd/llmlogd.sock";

const events = [
  { model: "gpt-4o", input: "What is 2+2?", output: "4", client: "node" },
  { model: "gpt-4o", input: "And 3+3?", output: "6", client: "node" },
];

const conn = net.createConnection(SOCKET);
conn.setTimeout(30000, () => conn.destroy(new Error("llmlogd did not answer")));
conn.on("error", (err) => {
  console.error(`llmlogd: ${err.message}`);
  process.exit(1);
});
const replies = readline.createInterface({ input: conn })[Symbol.asyncIterator]();

for (const event of events) {
  conn.write(JSON.stringify(event) + "\n"); // one event per line
  const { value: line } = await replies.next();
  const reply = line ? JSON.parse(line) : { ok: false, error: "connection closed" };
  if (!reply.ok) {
    // The event was not stored; reply.error says why.
    console.error(`llmlogd refused the event: ${reply.error}`);
    process.exit(1);
  }
  console.log("stored", reply.id);
}
conn.end();
