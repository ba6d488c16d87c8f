package dev.routesvc.client;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.ErrorInfo;
import dev.routesvc.v1.ChatRequest;
import dev.routesvc.v1.CompleteRequest;
import dev.routesvc.v1.CompleteResponse;
import dev.routesvc.v1.ListModelsRequest;
import dev.routesvc.v1.Message;
import dev.routesvc.v1.ModelInfo;
import dev.routesvc.v1.Role;
import dev.routesvc.v1.RouteDecision;
import dev.routesvc.v1.RouteRequest;
import dev.routesvc.v1.RouterServiceGrpc;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.Context;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.TlsChannelCredentials;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Optional;
import java.util.concurrent.TimeUnit;

/**
 * A small client for the routesvc RouterService over grpc-java.
 *
 * <pre>{@code
 * try (RouterClient client = RouterClient.newBuilder("127.0.0.1:50051").usePlaintext().apiKey(key).build()) {
 *   RouteDecision decision = client.route(
 *       RouteRequest.newBuilder().setChat(RouterClient.userPrompt("hi")).build(), Duration.ofSeconds(5));
 * }
 * }</pre>
 *
 * <p>Every call has a deadline: the one given to a helper, else one set on the stub or the
 * {@code Context}, else the client's {@link Builder#defaultTimeout(Duration) default} (30 s), calls
 * through {@link #stub()} included. For cancellation or custom metadata use {@link #stub()} with
 * grpc-java's own tools ({@code Context.CancellableContext}, {@code MetadataUtils}). Errors are
 * {@link io.grpc.StatusRuntimeException}s; {@link #errorInfo(Throwable)} reads routesvc's reason.
 */
public final class RouterClient implements AutoCloseable {
  /** The ErrorInfo domain of errors raised by routesvc itself. */
  public static final String ERROR_DOMAIN = "routesvc";

  /** The deadline of a call that sets none, unless {@link Builder#defaultTimeout(Duration)} says otherwise. */
  public static final Duration DEFAULT_TIMEOUT = Duration.ofSeconds(30);

  private static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

  private final ManagedChannel channel;
  private final Duration defaultTimeout;
  private final RouterServiceGrpc.RouterServiceBlockingStub stub;
  private final HealthGrpc.HealthBlockingStub health;

  private RouterClient(ManagedChannel channel, Duration defaultTimeout, List<ClientInterceptor> interceptors) {
    this.channel = channel;
    this.defaultTimeout = defaultTimeout;
    this.stub = RouterServiceGrpc.newBlockingStub(channel).withInterceptors(interceptors.toArray(ClientInterceptor[]::new));
    this.health = HealthGrpc.newBlockingStub(channel);
  }

  /** A builder for a client of {@code target} ("host:port"); TLS unless {@link Builder#usePlaintext()}. */
  public static Builder newBuilder(String target) {
    return new Builder(target);
  }

  /** Builds a {@link RouterClient}. */
  public static final class Builder {
    private final String target;
    private boolean plaintext;
    private String apiKey;
    private Duration defaultTimeout = DEFAULT_TIMEOUT;
    private Path caFile;
    private Path certFile;
    private Path keyFile;
    private final List<ClientInterceptor> interceptors = new ArrayList<>();

    private Builder(String target) {
      this.target = target;
    }

    /** Plaintext HTTP/2, for loopback and tests. */
    public Builder usePlaintext() {
      this.plaintext = true;
      return this;
    }

    /** Sent as {@code authorization: Bearer <key>} on every call. */
    public Builder apiKey(String key) {
      this.apiKey = key;
      return this;
    }

    /**
     * The deadline of every call that sets none (30 s unless set): calls through {@link #stub()}
     * and the helpers called without a timeout. A deadline on the stub ({@code
     * stub().withDeadlineAfter(...)}) or on the calling {@code Context} replaces it.
     */
    public Builder defaultTimeout(Duration timeout) {
      if (timeout.isNegative() || timeout.isZero()) {
        throw new IllegalArgumentException("defaultTimeout must be above zero, not " + timeout);
      }
      this.defaultTimeout = timeout;
      return this;
    }

    /** Trust the CA certificates in this PEM file instead of the system roots (a private CA). */
    public Builder tlsCaFile(Path caFile) {
      this.caFile = caFile;
      return this;
    }

    /**
     * Present this client certificate chain and its private key (PEM files; the key PKCS#8,
     * as {@code openssl genpkey} or {@code openssl req -newkey} write it), for mutual TLS.
     */
    public Builder tlsClientCertificate(Path certFile, Path keyFile) {
      this.certFile = certFile;
      this.keyFile = keyFile;
      return this;
    }

    /** Extra interceptors for every RouterService call. */
    public Builder intercept(ClientInterceptor interceptor) {
      interceptors.add(interceptor);
      return this;
    }

    /**
     * The client. Like grpc-java's channels it connects on the first call.
     *
     * @throws IllegalStateException when TLS files are given with {@link #usePlaintext()}
     * @throws UncheckedIOException naming the file when a TLS file cannot be read
     */
    public RouterClient build() {
      List<ClientInterceptor> all = new ArrayList<>(interceptors);
      if (apiKey != null && !apiKey.isEmpty()) {
        Metadata headers = new Metadata();
        headers.put(AUTHORIZATION, "Bearer " + apiKey);
        all.add(MetadataUtils.newAttachHeadersInterceptor(headers));
      }
      // Last, so that it runs first: the caller's interceptors see the deadline the call has.
      all.add(new DefaultDeadline(defaultTimeout));
      ManagedChannel channel = Grpc.newChannelBuilder(target, credentials()).build();
      return new RouterClient(channel, defaultTimeout, all);
    }

    private ChannelCredentials credentials() {
      if (plaintext) {
        if (caFile != null || certFile != null) {
          throw new IllegalStateException("usePlaintext() with tlsCaFile or tlsClientCertificate: choose TLS or plaintext");
        }
        return InsecureChannelCredentials.create();
      }
      TlsChannelCredentials.Builder tls = TlsChannelCredentials.newBuilder();
      if (caFile != null) {
        try {
          tls.trustManager(caFile.toFile());
        } catch (IOException e) {
          throw new UncheckedIOException("TLS CA file " + caFile + ": cannot read", e);
        }
      }
      if (certFile != null) {
        try {
          tls.keyManager(certFile.toFile(), keyFile.toFile());
        } catch (IOException e) {
          throw new UncheckedIOException(
              "TLS client certificate " + certFile + " or key " + keyFile + ": cannot read", e);
        }
      }
      return tls.build();
    }
  }

  /** Gives a call the client's default deadline unless the stub or the calling Context set one. */
  private static final class DefaultDeadline implements ClientInterceptor {
    private final Duration timeout;

    DefaultDeadline(Duration timeout) {
      this.timeout = timeout;
    }

    @Override
    public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
        MethodDescriptor<ReqT, RespT> method, CallOptions options, Channel next) {
      if (options.getDeadline() == null && Context.current().getDeadline() == null) {
        options = options.withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS);
      }
      return next.newCall(method, options);
    }
  }

  /**
   * The generated blocking stub, for calls the wrapper does not cover: the API key is attached,
   * and a call without a deadline of its own gets the {@link Builder#defaultTimeout(Duration)
   * default}.
   */
  public RouterServiceGrpc.RouterServiceBlockingStub stub() {
    return stub;
  }

  /** The routing decision for {@code request}, within the default timeout. */
  public RouteDecision route(RouteRequest request) {
    return route(request, defaultTimeout);
  }

  /** The routing decision for {@code request}, without calling any model. */
  public RouteDecision route(RouteRequest request, Duration timeout) {
    return withDeadline(stub, timeout).route(request).getDecision();
  }

  /** The Complete stream within the default timeout; see {@link #complete(CompleteRequest, Duration)}. */
  public Iterator<CompleteResponse> complete(CompleteRequest request) {
    return complete(request, defaultTimeout);
  }

  /**
   * The Complete stream: first the decision, then text deltas, then one completion. Read the
   * iterator to its end, or cancel the enclosing {@code Context.CancellableContext} to stop early.
   */
  public Iterator<CompleteResponse> complete(CompleteRequest request, Duration timeout) {
    return withDeadline(stub, timeout).complete(request);
  }

  /** The model catalog, within the default timeout. */
  public List<ModelInfo> listModels() {
    return listModels(defaultTimeout);
  }

  /** The model catalog. */
  public List<ModelInfo> listModels(Duration timeout) {
    return withDeadline(stub, timeout).listModels(ListModelsRequest.getDefaultInstance()).getModelsList();
  }

  /** The server's grpc.health.v1 status for RouterService, within the default timeout. */
  public HealthCheckResponse.ServingStatus health() {
    return health(defaultTimeout);
  }

  /** The server's grpc.health.v1 status for RouterService. */
  public HealthCheckResponse.ServingStatus health(Duration timeout) {
    HealthCheckRequest request =
        HealthCheckRequest.newBuilder().setService(RouterServiceGrpc.SERVICE_NAME).build();
    return withDeadline(health, timeout).check(request).getStatus();
  }

  /** A ChatRequest with one user message. */
  public static ChatRequest userPrompt(String prompt) {
    return ChatRequest.newBuilder()
        .addMessages(Message.newBuilder().setRole(Role.ROLE_USER).setContent(prompt))
        .build();
  }

  /**
   * The {@code google.rpc.ErrorInfo} routesvc attached to a failed call, if any. Switch on its
   * reason ("INVALID_REQUEST", "MODEL_NOT_FOUND", ...).
   */
  public static Optional<ErrorInfo> errorInfo(Throwable error) {
    com.google.rpc.Status status = StatusProto.fromThrowable(error);
    if (status == null) {
      return Optional.empty();
    }
    for (Any detail : status.getDetailsList()) {
      if (detail.is(ErrorInfo.class)) {
        try {
          ErrorInfo info = detail.unpack(ErrorInfo.class);
          if (ERROR_DOMAIN.equals(info.getDomain())) {
            return Optional.of(info);
          }
        } catch (InvalidProtocolBufferException e) {
          return Optional.empty();
        }
      }
    }
    return Optional.empty();
  }

  private static <S extends io.grpc.stub.AbstractStub<S>> S withDeadline(S stub, Duration timeout) {
    return stub.withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS);
  }

  /** Shuts the channel down, waiting up to five seconds for calls in flight. */
  @Override
  public void close() throws InterruptedException {
    channel.shutdown();
    if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
      channel.shutdownNow();
    }
  }
}
