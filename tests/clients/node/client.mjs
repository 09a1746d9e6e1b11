// The openai Node SDK against the gateway, as a user's program calls it. Prints one JSON line of what it saw.
// Usage: node client.mjs <base_url> <api_key>
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });
const messages = [{ role: "user", content: "Say hello to the Node SDK" }];
const seen = {};

const models = await client.models.list();
seen.models = models.data.map((m) => m.id);

const { data: answer, response } = await client.chat.completions
  .create({ model: "small", messages, max_tokens: 8 })
  .withResponse();
seen.answer = { object: answer.object, text: answer.choices[0].message.content, usage: answer.usage,
                request_id: response.headers.get("x-request-id") };

const stream = await client.chat.completions.create({ model: "small", messages, max_tokens: 8, stream: true,
                                                      stream_options: { include_usage: true } });
let text = "";
let usage = null;
for await (const chunk of stream) {
  if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
seen.stream = { text, usage };

const tools = [{ type: "function", function: { name: "get_weather", description: "Weather in a city",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }];
const called = await client.chat.completions.create({ model: "small", tools, tool_choice: "auto",
  messages: [{ role: "user", content: "What is the weather in Paris? Use get_weather." }] });
const call = called.choices[0].message.tool_calls?.[0];
seen.tool = call ? { name: call.function.name, arguments: JSON.parse(call.function.arguments) } : null;

const embedded = await client.embeddings.create({ model: "embed", input: ["one", "two"] });
seen.embeddings = embedded.data.map((e) => e.embedding.length);

try {
  await new OpenAI({ baseURL, apiKey: "sk-not-a-key", maxRetries: 0 }).chat.completions.create(
    { model: "small", messages });
  seen.bad_key = null;
} catch (error) {
  seen.bad_key = { status: error.status, type: error.type, code: error.code };
}
try {
  await client.chat.completions.create({ model: "no-such-model", messages });
  seen.unknown_model = null;
} catch (error) {
  seen.unknown_model = { status: error.status, code: error.code };
}
console.log(JSON.stringify(seen));
