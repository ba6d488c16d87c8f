// Interop tests against a live routesvc: ROUTESVC_TARGET=host:port (plaintext) and,
// for the slow-provider cases, ROUTESVC_FAKE_URL of the fake provider behind it.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, before, describe, it } from "node:test";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";

import {
  Code,
  ConnectError,
  DEFAULT_TIMEOUT_MS,
  ErrorInfoSchema,
  errorInfo,
  FinishReason,
  HealthCheckResponse_ServingStatus,
  retryInfo,
  RetryInfoSchema,
  RouterClient,
  userPrompt,
  type CompleteResponse,
  type DialOptions,
} from "../src/index.js";

const target = process.env.ROUTESVC_TARGET;
const fakeUrl = process.env.ROUTESVC_FAKE_URL;
const skip = target ? false : "ROUTESVC_TARGET not set: no live service to test against";
const skipFake = skip || (fakeUrl ? false : "ROUTESVC_FAKE_URL not set: cannot script a slow provider");
// The scripted tests pin PINNED, so that the fake provider's script queue for its provider
// model name is consumed only by them, never by the unscripted tests (routed to the default
// gpt-4o-mini).
const PINNED = "claude-sonnet";

/** Reset the fake provider, then queue one scripted answer for the provider model serving PINNED. */
async function script(client: RouterClient, fields: Record<string, unknown>): Promise<void> {
  const models = await client.listModels({ timeoutMs: 10_000 });
  const providerModel = models.find((model) => model.id === PINNED)?.providerModel;
  assert.ok(providerModel, `catalog has no ${PINNED}`);
  const calls: [string, unknown][] = [
    ["/_fake/reset", {}],
    ["/_fake/script", { script: fields, model: providerModel, mode: "enqueue" }],
  ];
  for (const [path, body] of calls) {
    const response = await fetch(`${fakeUrl}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    assert.equal(response.status, 200, await response.text());
  }
}

/** What the fake provider recorded of one request it received (GET /_fake/requests). */
interface UpstreamRequest {
  chunks_sent: number;
  completed: boolean;
  aborted: boolean;
  ended: boolean;
}

/**
 * The fake provider's record of the last request it received, once that request has ended
 * (completed, cut or aborted by routesvc): `aborted` says whether routesvc closed it early.
 * A bounded poll (the fake is another process), well past a scripted 5 s answer, so an
 * uncancelled request ends completed rather than timing out.
 */
async function upstream(): Promise<UpstreamRequest> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const response = await fetch(`${fakeUrl}/_fake/requests`);
    assert.equal(response.status, 200);
    const recorded = ((await response.json()) as { requests: UpstreamRequest[] }).requests;
    const last = recorded.at(-1);
    if (last?.ended) return last;
    assert.ok(Date.now() < deadline, "the provider request did not end within 20 s");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Wait until the fake provider has received a request (after a reset: the one under test). */
async function upstreamReceived(): Promise<void> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const response = await fetch(`${fakeUrl}/_fake/requests`);
    assert.equal(response.status, 200);
    if (((await response.json()) as { requests: UpstreamRequest[] }).requests.length > 0) return;
    assert.ok(Date.now() < deadline, "the provider received no request within 20 s");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function rejection(promise: Promise<unknown>): Promise<ConnectError> {
  try {
    await promise;
  } catch (error) {
    return ConnectError.from(error);
  }
  assert.fail("expected the call to fail");
}

describe("routesvc interop (TypeScript)", { skip }, () => {
  let client: RouterClient;
  before(() => {
    client = RouterClient.dial(target ?? "", { insecure: true, apiKey: "interop-key" });
  });
  after(() => client.close());

  it("Route returns a decision", async () => {
    const decision = await client.route({ chat: userPrompt("Say hello") }, { timeoutMs: 10_000 });
    assert.ok(decision.model);
    assert.ok(decision.decisionId);
    assert.ok(decision.estimatedCostUsd);
    assert.ok(decision.candidates.length > 0);
  });

  it("ListModels returns the catalog", async () => {
    const models = await client.listModels({ timeoutMs: 10_000 });
    assert.ok(models.length > 0);
    assert.ok(models[0]?.id);
  });

  it("Complete streams the decision, deltas, then the completion", async () => {
    const messages: CompleteResponse[] = [];
    for await (const message of client.complete({ chat: userPrompt("Say hello") }, { timeoutMs: 20_000 })) {
      messages.push(message);
    }
    const kinds = messages.map((m) => m.event.case);
    assert.equal(kinds[0], "decision");
    assert.equal(kinds.at(-1), "completion");
    assert.ok(kinds.length >= 3, `kinds: ${kinds}`);
    assert.ok(kinds.slice(1, -1).every((kind) => kind === "delta"), `kinds: ${kinds}`);
    const last = messages.at(-1)?.event;
    assert.ok(last?.case === "completion");
    assert.ok((last.value.usage?.inputTokens ?? 0n) > 0n);
    assert.ok((last.value.usage?.outputTokens ?? 0n) > 0n);
    assert.ok(last.value.costUsd);
    assert.equal(last.value.finishReason, FinishReason.STOP);
  });

  it("a slow provider ends in DEADLINE_EXCEEDED", { skip: skipFake }, async () => {
    await script(client, { first_chunk_delay: 10.0 }); // also connects: the deadline is for the provider
    const stream = client.complete({ chat: userPrompt("Say hello slowly"), context: { model: PINNED } }, { timeoutMs: 1000 });
    const error = await rejection((async () => { for await (const _ of stream) { /* drain */ } })());
    assert.equal(error.code, Code.DeadlineExceeded, String(error));
  });

  it("a call without timeoutMs is sent with the default deadline; its own or null replaces it", async () => {
    const sent: (string | null)[] = [];
    const capture = (defaults: Pick<DialOptions, "defaultTimeoutMs">) =>
      RouterClient.dial(target ?? "", {
        insecure: true,
        ...defaults,
        interceptors: [(next) => (request) => (sent.push(request.header.get("grpc-timeout")), next(request))],
      });
    const withDefault = capture({});
    const without = capture({ defaultTimeoutMs: null });
    try {
      await withDefault.listModels();
      await withDefault.listModels({ timeoutMs: 10_000 });
      await without.listModels();
    } finally {
      withDefault.close();
      without.close();
    }
    assert.deepEqual(sent, [`${DEFAULT_TIMEOUT_MS}m`, "10000m", null]);
  });

  it("a Complete without timeoutMs ends at the default stream deadline", { skip: skipFake }, async () => {
    await script(client, { first_chunk_delay: 10.0 });
    const quick = RouterClient.dial(target ?? "", { insecure: true, defaultStreamTimeoutMs: 1000 });
    try {
      const stream = quick.complete({ chat: userPrompt("Say hello slowly"), context: { model: PINNED } });
      const error = await rejection((async () => { for await (const _ of stream) { /* drain */ } })());
      assert.equal(error.code, Code.DeadlineExceeded, String(error));
    } finally {
      quick.close();
    }
  });

  it("cancelling mid-stream ends the call as CANCELLED", { skip: skipFake }, async () => {
    await script(client, { chunk_count: 100, chunk_delay: 0.05 });
    const abort = new AbortController();
    const seen: (string | undefined)[] = [];
    const stream = client.complete({ chat: userPrompt("Count slowly"), context: { model: PINNED } }, { signal: abort.signal, timeoutMs: 20_000 });
    const error = await rejection((async () => {
      for await (const message of stream) {
        seen.push(message.event.case);
        if (message.event.case === "delta") abort.abort();
      }
    })());
    assert.deepEqual(seen, ["decision", "delta"]);
    assert.equal(error.code, Code.Canceled, String(error));
  });

  it("leaving the loop early cancels the call upstream", { skip: skipFake }, async () => {
    await script(client, { chunk_count: 100, chunk_delay: 0.05 });
    const seen: (string | undefined)[] = [];
    for await (const message of client.complete({ chat: userPrompt("Count slowly"), context: { model: PINNED } }, { timeoutMs: 20_000 })) {
      seen.push(message.event.case);
      if (message.event.case === "delta") break;
    }
    const recorded = await upstream();
    assert.deepEqual(seen, ["decision", "delta"]);
    assert.deepEqual([recorded.aborted, recorded.completed], [true, false]);
    assert.ok(recorded.chunks_sent < 100, `chunks_sent: ${recorded.chunks_sent}`);
  });

  it("an exception inside the loop cancels the call upstream", { skip: skipFake }, async () => {
    await script(client, { chunk_count: 100, chunk_delay: 0.05 });
    const seen: (string | undefined)[] = [];
    await assert.rejects(async () => {
      for await (const message of client.complete({ chat: userPrompt("Count slowly"), context: { model: PINNED } }, { timeoutMs: 20_000 })) {
        seen.push(message.event.case);
        if (message.event.case === "delta") throw new Error("caller gave up");
      }
    }, /caller gave up/);
    const recorded = await upstream();
    assert.deepEqual(seen, ["decision", "delta"]);
    assert.deepEqual([recorded.aborted, recorded.completed], [true, false]);
    assert.ok(recorded.chunks_sent < 100, `chunks_sent: ${recorded.chunks_sent}`);
  });

  it("the call starts when complete() is called, so timeoutMs counts from there", { skip: skipFake }, async () => {
    await script(client, { first_chunk_delay: 10.0 });
    const stream = client.complete({ chat: userPrompt("Say hello slowly"), context: { model: PINNED } }, { timeoutMs: 1000 });
    // Nothing is read until the deadline has passed and routesvc has given up on the provider.
    const recorded = await upstream();
    assert.deepEqual([recorded.aborted, recorded.completed], [true, false]);
    const seen: (string | undefined)[] = [];
    const error = await rejection((async () => { for await (const message of stream) seen.push(message.event.case); })());
    assert.deepEqual(seen, ["decision"]);
    assert.equal(error.code, Code.DeadlineExceeded, String(error));
  });

  it("closing a stream before reading it cancels the call upstream", { skip: skipFake }, async () => {
    await script(client, { chunk_count: 100, chunk_delay: 0.05 });
    const stream = client.complete({ chat: userPrompt("Count slowly"), context: { model: PINNED } }, { timeoutMs: 20_000 });
    await upstreamReceived();
    await stream.return();
    const recorded = await upstream();
    assert.deepEqual([recorded.aborted, recorded.completed], [true, false]);
    assert.ok(recorded.chunks_sent < 100, `chunks_sent: ${recorded.chunks_sent}`);
    assert.deepEqual(await stream.next(), { done: true, value: undefined });
  });

  it("aborting the signal cancels a stream not read yet", { skip: skipFake }, async () => {
    await script(client, { chunk_count: 100, chunk_delay: 0.05 });
    const abort = new AbortController();
    const stream = client.complete({ chat: userPrompt("Count slowly"), context: { model: PINNED } }, { signal: abort.signal, timeoutMs: 20_000 });
    await upstreamReceived();
    abort.abort();
    const recorded = await upstream();
    assert.deepEqual([recorded.aborted, recorded.completed], [true, false]);
    const error = await rejection((async () => { for await (const _ of stream) { /* drain */ } })());
    assert.equal(error.code, Code.Canceled, String(error));
  });

  it("a stream dropped unread and unclosed is cancelled when it is garbage-collected", { skip: skipFake }, async () => {
    setFlagsFromString("--expose-gc");
    const gc = runInNewContext("gc") as () => void;
    await script(client, { chunk_count: 100, chunk_delay: 0.05 });
    (() => {
      client.complete({ chat: userPrompt("Count slowly"), context: { model: PINNED } }, { timeoutMs: 20_000 });
    })();
    await upstreamReceived();
    gc();
    const recorded = await upstream();
    assert.deepEqual([recorded.aborted, recorded.completed], [true, false]);
    assert.ok(recorded.chunks_sent < 100, `chunks_sent: ${recorded.chunks_sent}`);
  });

  it("the completion is handed over once the stream has ended, so stopping at it cancels nothing", async () => {
    let trailer: Headers | undefined;
    let trailerAtCompletion: Headers | undefined;
    for await (const message of client.complete({ chat: userPrompt("Say hello") }, { timeoutMs: 20_000, onTrailer: (t) => (trailer = t) })) {
      if (message.event.case === "completion") {
        trailerAtCompletion = trailer;
        break;
      }
    }
    assert.ok(trailerAtCompletion, "the completion came before the call's status");
  });

  it("empty messages are INVALID_ARGUMENT with ErrorInfo reason INVALID_REQUEST", async () => {
    const error = await rejection(client.route({ chat: { messages: [] } }, { timeoutMs: 10_000 }));
    assert.equal(error.code, Code.InvalidArgument, String(error));
    const info = errorInfo(error);
    assert.equal(info?.reason, "INVALID_REQUEST");
    assert.equal(info?.domain, "routesvc");
  });

  it("x-request-id round-trips in initial and trailing metadata", async () => {
    const id = "ts-interop-7f3a";
    let header: Headers | undefined;
    let trailer: Headers | undefined;
    await client.route(
      { chat: userPrompt("Say hello") },
      { timeoutMs: 10_000, headers: { "x-request-id": id }, onHeader: (h) => (header = h), onTrailer: (t) => (trailer = t) },
    );
    assert.equal(header?.get("x-request-id"), id);
    assert.equal(trailer?.get("x-request-id"), id);
  });

  it("the health check reports SERVING", async () => {
    assert.equal(await client.healthStatus({ timeoutMs: 10_000 }), HealthCheckResponse_ServingStatus.SERVING);
  });
});

describe("errors and options without a server (TypeScript)", () => {
  it("retryInfo reads the delay a RESOURCE_EXHAUSTED error carries; errorInfo its reason", () => {
    const error = new ConnectError("tenant 'a' is over its 1 requests per minute", Code.ResourceExhausted, undefined, [
      { desc: ErrorInfoSchema, value: { reason: "RATE_LIMITED", domain: "routesvc" } },
      { desc: RetryInfoSchema, value: { retryDelay: { seconds: 42n, nanos: 500_000_000 } } },
    ]);
    const delay = retryInfo(error)?.retryDelay;
    assert.deepEqual([delay?.seconds, delay?.nanos], [42n, 500_000_000]);
    assert.equal(errorInfo(error)?.reason, "RATE_LIMITED");
    assert.equal(retryInfo(new ConnectError("no details", Code.Unavailable)), undefined);
    assert.equal(retryInfo(new Error("not a ConnectError")), undefined);
  });

  it("a default timeout that is not above zero is refused", () => {
    assert.throws(() => RouterClient.dial("127.0.0.1:1", { defaultTimeoutMs: 0 }), RangeError);
    assert.throws(() => RouterClient.dial("127.0.0.1:1", { defaultStreamTimeoutMs: -1 }), RangeError);
  });
});

describe("Complete without a server (TypeScript)", () => {
  /** A loopback port nothing listens on. */
  async function closedPort(): Promise<number> {
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    assert.ok(address && typeof address === "object");
    await new Promise((resolve) => server.close(resolve));
    return address.port;
  }

  it("a call that fails before it is read is no unhandled rejection", { timeout: 10_000 }, async () => {
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown) => unhandled.push(reason);
    process.on("unhandledRejection", onUnhandled);
    let failed: () => void = () => undefined;
    const failure = new Promise<void>((resolve) => (failed = resolve));
    const refused = RouterClient.dial(`127.0.0.1:${await closedPort()}`, {
      insecure: true,
      interceptors: [
        (next) => async (request) => {
          try {
            return await next(request);
          } catch (error) {
            failed();
            throw error;
          }
        },
      ],
    });
    try {
      const stream = refused.complete({ chat: userPrompt("Say hello") }, { timeoutMs: 10_000 });
      await failure;
      // Node reports a rejection as unhandled once the microtasks queued with it have run.
      await new Promise((resolve) => setImmediate(resolve));
      assert.deepEqual(unhandled, []);
      const error = await rejection(stream.next());
      assert.equal(error.code, Code.Unavailable, String(error));
    } finally {
      process.off("unhandledRejection", onUnhandled);
      refused.close();
    }
  });
});
