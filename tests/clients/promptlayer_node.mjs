// End-to-end driver for the official PromptLayer JS SDK (npm `promptlayer` 1.3.6).
//
// Environment:
//   PROMPTLAYER_BASE_URL  (required; read by the SDK itself) base URL of the PromptLayer-compatible
//                         server, e.g. http://127.0.0.1:8080 -> POST http://127.0.0.1:8080/log-request
//   PROMPTLAYER_API_KEY   (default pl_test_api_key_0123456789; read by the SDK itself)
//   OPENAI_BASE_URL       only with EXTRAS=1: OpenAI-compatible mock INCLUDING /v1
//   OPENAI_API_KEY        only with EXTRAS=1 (default sk-test-openai-key)
//   EXTRAS=1              also exercise the SDK's OpenAI wrapper (`pl.OpenAI`), which logs through
//                         POST /track-request (not /log-request).
//
// Sequence: logRequest(openai chat), logRequest(anthropic), logRequest(status ERROR),
// track.score x2, track.metadata, track.prompt, group.create (/create-group), track.group (/track-group).
// The SDK is used with throwOnError=true (its default), so every failure throws -> exit 1.
import { createRequire } from "node:module";
import { PromptLayer } from "promptlayer";

if (!process.env.PROMPTLAYER_BASE_URL) {
  console.error("PROMPTLAYER_BASE_URL must be set");
  process.exit(2);
}
process.env.PROMPTLAYER_API_KEY ??= "pl_test_api_key_0123456789";

// API key and base URL are read from the environment by the constructor, like an app would.
const pl = new PromptLayer();

const show = (name, value) => console.log(`${name}: SDK returned ${JSON.stringify(value)}`);
function expectRequestLog(name, res) {
  show(name, res);
  if (!res || !Number.isInteger(res.id)) throw new Error(`${name}: expected a RequestLog with an integer id`);
  return res.id;
}
function expectTrue(name, res) {
  show(name, res);
  if (res !== true) throw new Error(`${name}: expected true, got ${JSON.stringify(res)}`);
}
const chat = (...messages) => ({
  type: "chat",
  messages: messages.map(([role, text]) => ({ role, content: [{ type: "text", text }] })),
});

// PromptLayer documents request_start_time/request_end_time as unix seconds; the JS SDK
// passes through whatever number it is given (Date.now() would be milliseconds!).
const nowSeconds = () => Date.now() / 1000;

async function main() {
  let start = nowSeconds();
  const openaiId = expectRequestLog(
    "logRequest[openai]",
    await pl.logRequest({
      provider: "openai",
      model: "gpt-4o-mini",
      input: chat(["system", "You are a terse assistant."], ["user", "Say hello to Ada in French."]),
      output: chat(["assistant", "Bonjour, Ada !"]),
      request_start_time: start,
      request_end_time: start + 0.734,
      parameters: { temperature: 0.2, max_tokens: 64 },
      tags: ["ci", "openai"],
      metadata: { user_id: "user-123", session_id: "sess-42" },
      input_tokens: 18,
      output_tokens: 6,
      price: 0.000031,
      function_name: "openai.chat.completions.create",
      api_type: "chat-completions",
    }),
  );

  start = nowSeconds();
  const anthropicId = expectRequestLog(
    "logRequest[anthropic]",
    await pl.logRequest({
      provider: "anthropic",
      model: "claude-3-5-sonnet-20241022",
      input: chat(["system", "Answer in one word."], ["user", "Capital of France?"]),
      output: chat(["assistant", "Paris"]),
      request_start_time: start,
      request_end_time: start + 0.412,
      parameters: { max_tokens: 256, temperature: 0 },
      tags: ["ci", "anthropic"],
      metadata: { user_id: "user-123" },
      input_tokens: 14,
      output_tokens: 3,
      price: 0.000087,
      function_name: "anthropic.messages.create",
    }),
  );

  start = nowSeconds();
  expectRequestLog(
    "logRequest[error]",
    await pl.logRequest({
      provider: "openai",
      model: "gpt-4o-mini",
      input: chat(["user", "This call was rate limited."]),
      output: { type: "chat", messages: [] },
      request_start_time: start,
      request_end_time: start + 0.05,
      tags: ["ci", "error"],
      status: "ERROR",
      error_type: "PROVIDER_RATE_LIMIT",
      error_message: "Rate limit reached for gpt-4o-mini",
    }),
  );

  expectTrue("track.score[named]", await pl.track.score({ request_id: openaiId, score: 87, name: "relevance" }));
  expectTrue("track.score", await pl.track.score({ request_id: anthropicId, score: 100 }));
  expectTrue(
    "track.metadata",
    await pl.track.metadata({ request_id: openaiId, metadata: { session_id: "sess-42", env: "ci" } }),
  );
  expectTrue(
    "track.prompt",
    await pl.track.prompt({
      request_id: openaiId,
      prompt_name: "welcome-prompt",
      prompt_input_variables: { name: "Ada", language: "French" },
      version: 3,
    }),
  );
  const groupId = await pl.group.create();
  show("group.create", groupId);
  if (!Number.isInteger(groupId)) throw new Error("group.create: expected an integer id");
  expectTrue("track.group", await pl.track.group({ request_id: openaiId, group_id: groupId }));

  if (process.env.EXTRAS === "1") {
    if (!process.env.OPENAI_BASE_URL) throw new Error("EXTRAS=1 needs OPENAI_BASE_URL");
    // `pl.OpenAI` is a Proxy around the `openai` package that logs via POST /track-request.
    // SDK LIMITATION: the ESM build loads `openai` with a bare require(), which does not exist in
    // an ES module, so `pl.OpenAI` is undefined there ("To use the OpenAI module, you must
    // install..."). The CommonJS build works, so load that one for the wrapper.
    const { PromptLayer: PromptLayerCjs } = createRequire(import.meta.url)("promptlayer");
    const OpenAI = new PromptLayerCjs().OpenAI;
    const client = new OpenAI({ apiKey: process.env.OPENAI_API_KEY ?? "sk-test-openai-key" });
    const [response, plId] = await client.chat.completions.create({
      model: "gpt-4o-mini",
      messages: [{ role: "user", content: "Hello through the PromptLayer wrapper." }],
      temperature: 0.5,
      pl_tags: ["ci", "wrapper"],
      return_pl_id: true,
    });
    show("OpenAI wrapper (track-request)", { response, pl_request_id: plId });
    if (!Number.isInteger(plId)) throw new Error("wrapper: expected an integer request id");
    expectTrue("track.score[wrapper id]", await pl.track.score({ request_id: plId, score: 50 }));
  }
}

try {
  await main();
} catch (err) {
  console.error(`FAIL: ${err?.stack ?? err}`);
  console.error("promptlayer_node: failed");
  process.exit(1);
}
console.log("promptlayer_node: OK");
