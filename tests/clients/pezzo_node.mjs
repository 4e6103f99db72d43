// End-to-end driver for the official TypeScript/JS Pezzo client (@pezzo/client 0.4.18).
//
// Environment:
//   PEZZO_SERVER_URL   (required) base URL of the Pezzo-compatible server, e.g. http://127.0.0.1:8080
//                      The client POSTs to `${PEZZO_SERVER_URL}/api/reporting/v2/request`.
//   OPENAI_BASE_URL    (required) base URL of an OpenAI-compatible mock, INCLUDING /v1,
//                      e.g. http://127.0.0.1:9090/v1 (record_server.py serves it).
//   PEZZO_API_KEY      (default pez_test_api_key_0123456789)
//   PEZZO_PROJECT_ID   (default test-project-id)
//   PEZZO_ENVIRONMENT  (default Production; step 4 deliberately runs without it)
//   OPENAI_API_KEY     (default sk-test-openai-key)
//   EXTRAS=1           also exercise the cache path (/api/cache/v1/request/retrieve + /save)
//
// Exit status is non-zero if anything the SDK reports (it only console.warn/console.error's
// failed reports, it never throws for them) or any unexpected result happens.
import { Pezzo, PezzoOpenAI } from "@pezzo/client";

for (const name of ["PEZZO_SERVER_URL", "OPENAI_BASE_URL"]) {
  if (!process.env[name]) {
    console.error(`${name} must be set`);
    process.exit(2);
  }
}
process.env.PEZZO_API_KEY ??= "pez_test_api_key_0123456789";
process.env.PEZZO_PROJECT_ID ??= "test-project-id";
process.env.PEZZO_ENVIRONMENT ??= "Production";
process.env.OPENAI_API_KEY ??= "sk-test-openai-key";

// The SDK swallows report failures and only logs them; turn those logs into a failure.
const sdkComplaints = [];
for (const level of ["warn", "error"]) {
  const orig = console[level].bind(console);
  console[level] = (...args) => {
    const text = args.map((a) => (typeof a === "string" ? a : String(a?.stack ?? JSON.stringify(a)))).join(" ");
    if (/Could not report|Failed to report|Could not cache|Could not fetch request/i.test(text)) {
      sdkComplaints.push(text);
    }
    orig(...args);
  };
}

let failures = 0;
function fail(msg) {
  failures++;
  console.error(`FAIL: ${msg}`);
}

// Configuration exactly as an app would do it: everything comes from the env.
const pezzo = new Pezzo({});
const openai = new PezzoOpenAI(pezzo); // OpenAI reads OPENAI_BASE_URL / OPENAI_API_KEY itself

async function step(name, fn) {
  const before = sdkComplaints.length;
  try {
    const out = await fn();
    console.log(`${name}: SDK returned ${JSON.stringify(out)}`);
  } catch (err) {
    fail(`${name}: threw ${err?.stack ?? err}`);
  }
  if (sdkComplaints.length > before) fail(`${name}: SDK reported: ${sdkComplaints.slice(before).join(" | ")}`);
}

// 1. Plain chat completion with variables and properties (report-success).
await step("chat-success", async () => {
  const res = await openai.chat.completions.create(
    {
      model: "gpt-4o-mini",
      temperature: 0.2,
      max_tokens: 64,
      messages: [
        { role: "system", content: "You are a terse assistant." },
        { role: "user", content: "Say hello to {name} in {language}." },
      ],
    },
    {
      variables: { name: "Ada", language: "French" },
      properties: { userId: "user-123", traceId: "trace-abc" },
    },
  );
  if (res?.object !== "chat.completion") throw new Error("unexpected completion " + JSON.stringify(res));
  return res;
});

// 2. Managed-prompt flow: what getPrompt() would have returned, passed as `pezzo`.
await step("chat-managed-prompt", async () => {
  const prompt = {
    metadata: { promptId: "clx0prompt000001", promptVersionSha: "3f2a9c1", type: "Prompt" },
    settings: { model: "gpt-3.5-turbo", temperature: 0.7 },
    content: { prompt: "Write a haiku about {topic}." },
  };
  const res = await openai.chat.completions.create({ pezzo: prompt }, { variables: { topic: "logs" } });
  if (res?.object !== "chat.completion") throw new Error("unexpected completion " + JSON.stringify(res));
  return res;
});

// 3. Provider error: the client reports it (response.status = 404) and rethrows the OpenAI error.
await step("chat-error", async () => {
  try {
    await openai.chat.completions.create(
      { model: "nonexistent-model", messages: [{ role: "user", content: "This call fails." }] },
      { properties: { userId: "user-123" } },
    );
  } catch (err) {
    if (err?.status !== 404) throw err;
    return { rethrown: err.constructor.name, status: err.status, error: err.error };
  }
  throw new Error("expected the OpenAI call to fail with 404");
});

// 4. A client configured without any environment: the JS client then omits
//    metadata.environment entirely (the Python client would send "Production").
await step("chat-no-environment", async () => {
  const saved = process.env.PEZZO_ENVIRONMENT;
  delete process.env.PEZZO_ENVIRONMENT;
  const bare = new PezzoOpenAI(new Pezzo({}));
  process.env.PEZZO_ENVIRONMENT = saved;
  const res = await bare.chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "No environment configured." }],
  });
  if (res?.object !== "chat.completion") throw new Error("unexpected completion " + JSON.stringify(res));
  return res;
});

// 5. The provider cannot be reached (connection refused): the client reports the failed call
//    with no response body and no status (the OpenAI SDK's APIConnectionError has neither),
//    then rethrows. The spec requires the body; llmlogd accepts the report (a failed call is
//    worth keeping) and delivers it with an error body.
await step("chat-unreachable", async () => {
  const unreachable = new PezzoOpenAI(pezzo, { baseURL: "http://127.0.0.1:1/v1", maxRetries: 0 });
  try {
    await unreachable.chat.completions.create({
      model: "gpt-4o-mini",
      messages: [{ role: "user", content: "Nobody answers." }],
    });
  } catch (err) {
    if (err?.constructor?.name !== "APIConnectionError") throw err;
    return { rethrown: err.constructor.name };
  }
  throw new Error("expected the OpenAI call to fail to connect");
});

// 6. Optional: request cache (two extra endpoints).
if (process.env.EXTRAS === "1") {
  await step("chat-cache-miss", async () => {
    const res = await openai.chat.completions.create(
      { model: "gpt-4o-mini", messages: [{ role: "user", content: "Cache me." }] },
      { cache: true },
    );
    if (res?.object !== "chat.completion") throw new Error("unexpected completion " + JSON.stringify(res));
    return res;
  });
}

if (failures) {
  console.error(`pezzo_node: ${failures} failure(s)`);
  process.exit(1);
}
console.log("pezzo_node: OK");
