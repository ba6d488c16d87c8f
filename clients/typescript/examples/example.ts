// Routes a prompt, then streams a completion for it.
//   node dist/examples/example.js 127.0.0.1:50051 "Explain gRPC in one line"
// Plaintext unless ROUTESVC_TLS=1; ROUTESVC_API_KEY is sent as a bearer token.
import { errorInfo, RouterClient, userPrompt } from "../src/index.js";

const target = process.argv[2] ?? "127.0.0.1:50051";
const prompt = process.argv.slice(3).join(" ") || "Say hello in five words.";
const client = RouterClient.dial(target, {
  insecure: process.env.ROUTESVC_TLS !== "1",
  apiKey: process.env.ROUTESVC_API_KEY,
});

try {
  const decision = await client.route({ chat: userPrompt(prompt) }, { timeoutMs: 30_000 });
  console.log(`route: ${decision.model} (${decision.rule}), estimated ${decision.estimatedCostUsd} USD`);

  for await (const message of client.complete({ chat: userPrompt(prompt) }, { timeoutMs: 30_000 })) {
    const event = message.event;
    if (event.case === "decision") {
      console.log(`[${event.value.model}]`);
    } else if (event.case === "delta") {
      process.stdout.write(event.value.text);
    } else if (event.case === "completion") {
      const { usage, costUsd } = event.value;
      console.log(`\n[${usage?.inputTokens} in / ${usage?.outputTokens} out tokens, ${costUsd} USD]`);
    }
  }
} catch (error) {
  console.error(`${error} (reason ${errorInfo(error)?.reason ?? "none"})`);
  process.exitCode = 1;
} finally {
  client.close();
}
