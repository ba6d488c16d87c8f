/**
 * A small TypeScript client for the routesvc RouterService, over gRPC with
 * Connect-ES (`@connectrpc/connect-node`).
 *
 * ```ts
 * const client = RouterClient.dial("127.0.0.1:50051", { insecure: true, apiKey });
 * const decision = await client.route({ chat: userPrompt("hi") }, { timeoutMs: 5000 });
 * for await (const msg of client.complete({ chat: userPrompt("hi") })) { ... }
 * client.close();
 * ```
 *
 * Deadlines are `timeoutMs`, cancellation is an `AbortSignal` (or leaving the loop over
 * `complete()`), and custom metadata is `headers` / `onHeader` / `onTrailer`, all in
 * Connect's `CallOptions`. A call without `timeoutMs` gets the client's default:
 * `DEFAULT_TIMEOUT_MS` (30 s) for unary calls, `DEFAULT_STREAM_TIMEOUT_MS` (5 minutes) for a
 * whole Complete stream, calls through `stub` included (`DialOptions.defaultTimeoutMs` and
 * `defaultStreamTimeoutMs` change them; `null` turns them off).
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  ConnectError,
  createClient,
  type CallOptions,
  type Client,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type { SecureClientSessionOptions } from "node:http2";

import { ErrorInfoSchema, RetryInfoSchema, type ErrorInfo, type RetryInfo } from "./gen/google/rpc/error_details_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";
import {
  ChatRequestSchema,
  Role,
  RouterService,
  type ChatRequest,
  type CompleteRequestSchema,
  type CompleteResponse,
  type ModelInfo,
  type RouteDecision,
  type RouteRequestSchema,
} from "./gen/routesvc/v1/router_pb.js";

export * from "./gen/routesvc/v1/router_pb.js";
export { HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";
export { ErrorInfoSchema, RetryInfoSchema, type ErrorInfo, type RetryInfo } from "./gen/google/rpc/error_details_pb.js";
export { Code, ConnectError, type CallOptions } from "@connectrpc/connect";

/** The ErrorInfo domain of errors raised by routesvc itself. */
export const ERROR_DOMAIN = "routesvc";

/** The deadline of a unary call without `timeoutMs`, unless `DialOptions.defaultTimeoutMs` says otherwise. */
export const DEFAULT_TIMEOUT_MS = 30_000;

/**
 * The deadline of a Complete stream without `timeoutMs`, unless `DialOptions.defaultStreamTimeoutMs`
 * says otherwise. It bounds the whole answer, so it is longer than `DEFAULT_TIMEOUT_MS`: 30 s
 * would cut long answers, paid for, short.
 */
export const DEFAULT_STREAM_TIMEOUT_MS = 300_000;

export interface DialOptions {
  /** Plaintext HTTP/2 instead of TLS, for loopback and tests. */
  insecure?: boolean;
  /** Sent as `authorization: Bearer <apiKey>` on every call. */
  apiKey?: string;
  /** TLS options (CA, client certificate, servername) when not insecure. */
  tls?: SecureClientSessionOptions;
  /** Extra Connect interceptors, run after the one that adds the API key. */
  interceptors?: Interceptor[];
  /**
   * The deadline (ms) of every unary call without `timeoutMs`, calls through `stub` included
   * (default `DEFAULT_TIMEOUT_MS`, 30 s); `null`: none.
   */
  defaultTimeoutMs?: number | null;
  /**
   * The deadline (ms) of every Complete stream without `timeoutMs`, calls through `stub` included
   * (default `DEFAULT_STREAM_TIMEOUT_MS`, 5 minutes); `null`: none.
   */
  defaultStreamTimeoutMs?: number | null;
}

/** A connection to a routesvc server; call close() when done. */
export class RouterClient {
  /** The generated Connect client, for calls the wrapper does not cover. */
  readonly stub: Client<typeof RouterService>;
  private readonly health: Client<typeof Health>;
  private readonly session: Http2SessionManager;

  private constructor(stub: Client<typeof RouterService>, health: Client<typeof Health>, session: Http2SessionManager) {
    this.stub = stub;
    this.health = health;
    this.session = session;
  }

  /**
   * A client for `target` ("host:port"). It connects on the first call. Throws a RangeError for a
   * default timeout that is not a number above zero (or null).
   */
  static dial(target: string, options: DialOptions = {}): RouterClient {
    const unaryMs = checkedTimeout("defaultTimeoutMs", options.defaultTimeoutMs, DEFAULT_TIMEOUT_MS);
    const streamMs = checkedTimeout("defaultStreamTimeoutMs", options.defaultStreamTimeoutMs, DEFAULT_STREAM_TIMEOUT_MS);
    const baseUrl = `${options.insecure ? "http" : "https"}://${target}`;
    const session = new Http2SessionManager(baseUrl, {}, options.insecure ? {} : (options.tls ?? {}));
    const interceptors: Interceptor[] = [];
    if (options.apiKey) {
      const value = `Bearer ${options.apiKey}`;
      interceptors.push((next) => (req) => {
        req.header.set("authorization", value);
        return next(req);
      });
    }
    interceptors.push(...(options.interceptors ?? []));
    const transport = withDefaultTimeouts(
      createGrpcTransport({ baseUrl, sessionManager: session, interceptors }),
      unaryMs,
      streamMs,
    );
    return new RouterClient(createClient(RouterService, transport), createClient(Health, transport), session);
  }

  /** The routing decision for a request, without calling any model. */
  async route(request: MessageInitShape<typeof RouteRequestSchema>, options?: CallOptions): Promise<RouteDecision> {
    const response = await this.stub.route(request, options);
    if (!response.decision) {
      throw new ConnectError("RouteResponse without a decision");
    }
    return response.decision;
  }

  /**
   * The Complete stream: first the decision, then text deltas, then one completion (or, in
   * batch mode, the decision and the batch job). A cascade may send an escalation before the
   * deltas (one per step passed); the deltas that follow are the next model's, or, if it failed
   * before any text, the rejected answer's: the completion's `model` says whose. The call
   * starts now, as `complete()` is called, so `timeoutMs` counts from here whenever the stream
   * is first read.
   *
   * Leaving a `for await` loop over it early (`break`, `return`, an exception) or
   * `await stream.return()` cancels the call, and routesvc then aborts the provider's
   * request; so does aborting `options.signal`. Both work on a stream not read yet. A stream
   * neither read to its end nor closed keeps running (and the provider keeps generating)
   * until `timeoutMs`, or until it is garbage-collected, which may be late: close it.
   *
   * The last message (the completion or the batch job) is followed at once by the status:
   * it is handed over only when the stream has ended, so a caller that stops at it does not
   * cancel a finished call (a cancel there makes the server's final status fail, and grpcio
   * leaks native memory for every such call: grpc/grpc#43360). When the call ends in an
   * error after it, it is handed over before the error is thrown.
   */
  complete(
    request: MessageInitShape<typeof CompleteRequestSchema>,
    options?: CallOptions,
  ): AsyncGenerator<CompleteResponse, void, undefined> {
    return new CompleteStream(new CompleteCall(this.stub, request, options));
  }

  /** The model catalog. */
  async listModels(options?: CallOptions): Promise<ModelInfo[]> {
    return (await this.stub.listModels({}, options)).models;
  }

  /** The server's grpc.health.v1 status for RouterService. */
  async healthStatus(options?: CallOptions): Promise<HealthCheckResponse_ServingStatus> {
    return (await this.health.check({ service: RouterService.typeName }, options)).status;
  }

  /** Close the HTTP/2 connection; calls in flight fail. */
  close(): void {
    this.session.abort();
  }
}

/**
 * One Complete call, started as it is created, with its own AbortController: Connect-ES's
 * stream iterator has only next() (no return()), so leaving a loop over it would not end the
 * HTTP/2 stream, and the call would run on until its deadline.
 */
class CompleteCall {
  private readonly controller = new AbortController();
  private readonly callerSignal: AbortSignal | undefined;
  private readonly onCallerAbort = () => this.controller.abort(this.callerSignal?.reason);
  private readonly messages: AsyncIterator<CompleteResponse>;
  private pending: Promise<IteratorResult<CompleteResponse>> | undefined; // the first read
  private ended = false; // by itself: read to its end, or failed
  private closed = false;

  constructor(
    stub: Client<typeof RouterService>,
    request: MessageInitShape<typeof CompleteRequestSchema>,
    options: CallOptions | undefined,
  ) {
    this.callerSignal = options?.signal;
    if (this.callerSignal?.aborted) {
      this.onCallerAbort();
    } else {
      this.callerSignal?.addEventListener("abort", this.onCallerAbort, { once: true });
    }
    this.messages = stub.complete(request, { ...options, signal: this.controller.signal })[Symbol.asyncIterator]();
    // Connect sends the request now but awaits the response only on the first read: read it
    // now, or a call that fails before the caller reads would be an unhandled rejection.
    this.pending = this.messages.next();
    this.pending.catch(() => undefined);
  }

  /** The next message, or the end of the call; throws the call's error. */
  async read(): Promise<IteratorResult<CompleteResponse>> {
    const next = this.pending ?? this.messages.next();
    this.pending = undefined;
    try {
      const result = await next;
      this.ended ||= Boolean(result.done);
      return result;
    } catch (error) {
      this.ended = true;
      throw error;
    }
  }

  /** Abort the call unless it ended by itself; idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    unclosedCalls.unregister(this);
    this.callerSignal?.removeEventListener("abort", this.onCallerAbort);
    if (!this.ended) {
      this.controller.abort();
      // Connect clears the call's deadline timer only once its iterator reports the end or an
      // error: read the aborted stream out in the background, or the timer holds the event
      // loop open until timeoutMs.
      void drain(this.messages);
    }
  }
}

/** Calls whose stream was dropped unclosed (and unread to its end): aborted when it is collected. */
const unclosedCalls = new FinalizationRegistry<CompleteCall>((call) => call.close());

/**
 * What `complete()` returns: the messages of a started call, with the last one held until the
 * call has ended. A generator closed before its first read never runs its body (nor its
 * `finally`), so return() and throw() close the call themselves.
 */
class CompleteStream implements AsyncGenerator<CompleteResponse, void, undefined> {
  readonly #call: CompleteCall;
  readonly #messages: AsyncGenerator<CompleteResponse, void, undefined>;

  constructor(call: CompleteCall) {
    this.#call = call;
    this.#messages = handOver(call);
    unclosedCalls.register(this, call, call);
  }

  next(): Promise<IteratorResult<CompleteResponse, void>> {
    return this.#messages.next();
  }

  async return(value?: void | PromiseLike<void>): Promise<IteratorResult<CompleteResponse, void>> {
    try {
      return await this.#messages.return(value);
    } finally {
      this.#call.close();
    }
  }

  async throw(error: unknown): Promise<IteratorResult<CompleteResponse, void>> {
    try {
      return await this.#messages.throw(error);
    } finally {
      this.#call.close();
    }
  }

  [Symbol.asyncIterator](): this {
    return this;
  }
}

/** The messages of `call`, each handed over as the next has come (the last: once the call ended). */
async function* handOver(call: CompleteCall): AsyncGenerator<CompleteResponse, void, undefined> {
  let last: CompleteResponse | undefined; // held until the stream ends
  try {
    for (;;) {
      let result: IteratorResult<CompleteResponse>;
      try {
        result = await call.read();
      } catch (error) {
        if (last) yield last;
        throw error;
      }
      if (result.done) {
        if (last) yield last;
        return;
      }
      if (last) {
        const held = last;
        last = undefined;
        yield held;
      }
      const kind = result.value.event.case;
      if (kind === "completion" || kind === "batch") {
        last = result.value;
      } else {
        yield result.value;
      }
    }
  } finally {
    call.close();
  }
}

/** Read an iterator to its end or first error, discarding what it yields. */
async function drain(iterator: AsyncIterator<unknown>): Promise<void> {
  try {
    while (!(await iterator.next()).done) {
      // discard
    }
  } catch {
    // the expected end of an aborted call
  }
}

/** `value` if given (a number above zero, or null), else `fallback`. */
function checkedTimeout(name: string, value: number | null | undefined, fallback: number): number | undefined {
  if (value === undefined) return fallback;
  if (value === null) return undefined;
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new RangeError(`${name} must be a number of milliseconds above zero (or null for none), not ${value}`);
  }
  return value;
}

/** `transport`, giving a call without `timeoutMs` the default of its kind (none when undefined). */
function withDefaultTimeouts(transport: Transport, unaryMs: number | undefined, streamMs: number | undefined): Transport {
  return {
    unary: (method, signal, timeoutMs, header, input, contextValues) =>
      transport.unary(method, signal, timeoutMs ?? unaryMs, header, input, contextValues),
    stream: (method, signal, timeoutMs, header, input, contextValues) =>
      transport.stream(method, signal, timeoutMs ?? streamMs, header, input, contextValues),
  };
}

/** A ChatRequest with one user message. */
export function userPrompt(prompt: string): ChatRequest {
  return create(ChatRequestSchema, { messages: [{ role: Role.USER, content: prompt }] });
}

/**
 * The google.rpc.ErrorInfo that routesvc attached to an error, or undefined.
 * Switch on its `reason` ("INVALID_REQUEST", "MODEL_NOT_FOUND", ...).
 */
export function errorInfo(error: unknown): ErrorInfo | undefined {
  if (!(error instanceof ConnectError)) {
    return undefined;
  }
  return error.findDetails(ErrorInfoSchema).find((info) => info.domain === ERROR_DOMAIN);
}

/**
 * The google.rpc.RetryInfo of an error, or undefined: how long to wait before trying again
 * (`retryDelay`, a Duration: `Number(seconds) * 1000 + nanos / 1e6` ms), on RESOURCE_EXHAUSTED
 * (RATE_LIMITED, OVERLOADED, ...) and some UNAVAILABLE errors.
 */
export function retryInfo(error: unknown): RetryInfo | undefined {
  if (!(error instanceof ConnectError)) {
    return undefined;
  }
  return error.findDetails(RetryInfoSchema)[0];
}
