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
 * Deadlines are `timeoutMs`, cancellation is an `AbortSignal`, and custom metadata
 * is `headers` / `onHeader` / `onTrailer`, all in Connect's `CallOptions`.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { ConnectError, createClient, type CallOptions, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type { SecureClientSessionOptions } from "node:http2";

import { ErrorInfoSchema, type ErrorInfo } from "./gen/google/rpc/error_details_pb.js";
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
export type { ErrorInfo } from "./gen/google/rpc/error_details_pb.js";
export { Code, ConnectError, type CallOptions } from "@connectrpc/connect";

/** The ErrorInfo domain of errors raised by routesvc itself. */
export const ERROR_DOMAIN = "routesvc";

export interface DialOptions {
  /** Plaintext HTTP/2 instead of TLS, for loopback and tests. */
  insecure?: boolean;
  /** Sent as `authorization: Bearer <apiKey>` on every call. */
  apiKey?: string;
  /** TLS options (CA, client certificate, servername) when not insecure. */
  tls?: SecureClientSessionOptions;
  /** Extra Connect interceptors, run after the one that adds the API key. */
  interceptors?: Interceptor[];
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

  /** A client for `target` ("host:port"). It connects on the first call. */
  static dial(target: string, options: DialOptions = {}): RouterClient {
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
    const transport = createGrpcTransport({ baseUrl, sessionManager: session, interceptors });
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
   * The Complete stream: first the decision, then text deltas, then one completion.
   * Abort `options.signal` to cancel it.
   */
  complete(request: MessageInitShape<typeof CompleteRequestSchema>, options?: CallOptions): AsyncIterable<CompleteResponse> {
    return this.stub.complete(request, options);
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
