package dev.routesvc.client;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.ErrorInfo;
import com.google.rpc.RetryInfo;
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
 * {@code Context}, else the client's default, calls through {@link #stub()} included: {@link
 * Builder#defaultTimeout(Duration)} (30 s) for unary calls, {@link
 * Builder#defaultStreamTimeout(Duration)} (5 minutes) for a whole Complete stream. Read a Complete
 * stream in try-with-resources ({@link CompleteStream}): leaving it early cancels the call. For
 * custom metadata use {@link #stub()} with grpc-java's own tools ({@code MetadataUtils}). Errors are
 * {@link io.grpc.StatusRuntimeException}s; {@link #errorInfo(Throwable)} reads routesvc's reason,
 * {@link #retryInfo(Throwable)} how long to wait before trying again.
 */
public final class RouterClient implements AutoCloseable {
  /** The ErrorInfo domain of errors raised by routesvc itself. */
  public static final String ERROR_DOMAIN = "routesvc";

  /** The deadline of a unary call that sets none, unless {@link Builder#defaultTimeout(Duration)} says otherwise. */
  public static final Duration DEFAULT_TIMEOUT = Duration.ofSeconds(30);

  /**
   * The deadline of a Complete stream that sets none, unless {@link
   * Builder#defaultStreamTimeout(Duration)} says otherwise. It bounds the whole answer, so it is
   * longer than {@link #DEFAULT_TIMEOUT}: 30 s would cut long answers, paid for, short.
   */
  public static final Duration DEFAULT_STREAM_TIMEOUT = Duration.ofMinutes(5);

  private static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

  private final ManagedChannel channel;
  private final RouterServiceGrpc.RouterServiceBlockingStub stub;
  private final HealthGrpc.HealthBlockingStub health;

  private RouterClient(ManagedChannel channel, List<ClientInterceptor> interceptors, DefaultDeadline defaultDeadline) {
    this.channel = channel;
    this.stub = RouterServiceGrpc.newBlockingStub(channel).withInterceptors(interceptors.toArray(ClientInterceptor[]::new));
    this.health = HealthGrpc.newBlockingStub(channel).withInterceptors(defaultDeadline);
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
    private Duration defaultStreamTimeout = DEFAULT_STREAM_TIMEOUT;
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
     * The deadline of every unary call that sets none ({@link #DEFAULT_TIMEOUT}, 30 s, unless
     * set): calls through {@link #stub()} and the helpers called without a timeout. A deadline on
     * the stub ({@code stub().withDeadlineAfter(...)}) or on the calling {@code Context} replaces
     * it. {@code null}: no default, a call without a deadline of its own has none.
     */
    public Builder defaultTimeout(Duration timeout) {
      this.defaultTimeout = checked("defaultTimeout", timeout);
      return this;
    }

    /**
     * The deadline of every Complete stream that sets none ({@link #DEFAULT_STREAM_TIMEOUT}, 5
     * minutes, unless set), through {@link #stub()} too; it bounds the whole answer. {@code
     * null}: no default.
     */
    public Builder defaultStreamTimeout(Duration timeout) {
      this.defaultStreamTimeout = checked("defaultStreamTimeout", timeout);
      return this;
    }

    private static Duration checked(String name, Duration timeout) {
      if (timeout != null && (timeout.isNegative() || timeout.isZero())) {
        throw new IllegalArgumentException(name + " must be above zero (or null for none), not " + timeout);
      }
      return timeout;
    }

    /** Trust the CA certificates in this PEM file instead of the system roots (a private CA). */
    public Builder tlsCaFile(Path caFile) {
      this.caFile = caFile;
      return this;
    }

    /**
     * Present this client certificate chain and its private key (PEM files; the key PKCS#8,
     * as {@code openssl genpkey} or {@code openssl req -newkey} write it), for mutual TLS.
     *
     * @throws IllegalArgumentException when either file is null: a certificate needs its key
     */
    public Builder tlsClientCertificate(Path certFile, Path keyFile) {
      if (certFile == null || keyFile == null) {
        throw new IllegalArgumentException(
            "tlsClientCertificate needs both the certificate and the key file, not " + certFile + " and " + keyFile);
      }
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
      DefaultDeadline defaultDeadline = new DefaultDeadline(defaultTimeout, defaultStreamTimeout);
      all.add(defaultDeadline);
      ManagedChannel channel = Grpc.newChannelBuilder(target, credentials()).build();
      return new RouterClient(channel, all, defaultDeadline);
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
    private final Duration unary; // null: none
    private final Duration stream; // null: none

    DefaultDeadline(Duration unary, Duration stream) {
      this.unary = unary;
      this.stream = stream;
    }

    @Override
    public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
        MethodDescriptor<ReqT, RespT> method, CallOptions options, Channel next) {
      Duration timeout = method.getType().serverSendsOneMessage() ? unary : stream;
      if (timeout != null && options.getDeadline() == null && Context.current().getDeadline() == null) {
        options = options.withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS);
      }
      return next.newCall(method, options);
    }
  }

  /**
   * The generated blocking stub, for calls the wrapper does not cover: the API key is attached,
   * and a call without a deadline of its own gets the {@link Builder#defaultTimeout(Duration)
   * default} ({@link Builder#defaultStreamTimeout(Duration)} for Complete). Its Complete returns
   * grpc-java's plain iterator, which leaving early does not cancel: prefer {@link #complete}.
   */
  public RouterServiceGrpc.RouterServiceBlockingStub stub() {
    return stub;
  }

  /**
   * The routing decision for {@code request}, within the calling {@code Context}'s deadline, else
   * the {@link Builder#defaultTimeout(Duration) default timeout}.
   */
  public RouteDecision route(RouteRequest request) {
    return route(request, null);
  }

  /** The routing decision for {@code request}, without calling any model. */
  public RouteDecision route(RouteRequest request, Duration timeout) {
    return withDeadline(stub, timeout).route(request).getDecision();
  }

  /**
   * The Complete stream within the calling {@code Context}'s deadline, else the {@link
   * Builder#defaultStreamTimeout(Duration) default stream timeout}; see {@link
   * #complete(CompleteRequest, Duration)}.
   */
  public CompleteStream complete(CompleteRequest request) {
    return complete(request, null);
  }

  /**
   * The Complete stream: first the decision, then text deltas, then one completion. A cascade may
   * send an escalation before the deltas (one per step passed); the deltas that follow are the next
   * model's, or, if it failed before any text, the rejected answer's: the completion's {@code
   * model} says whose. Read it in
   * try-with-resources: closing it before its end cancels the call ({@link CompleteStream}), as
   * does cancelling a {@code Context.CancellableContext} it was started in.
   */
  public CompleteStream complete(CompleteRequest request, Duration timeout) {
    Context.CancellableContext context = Context.current().withCancellation();
    Context previous = context.attach();
    try {
      return new CompleteStream(context, withDeadline(stub, timeout).complete(request));
    } catch (RuntimeException e) {
      context.cancel(e);
      throw e;
    } finally {
      context.detach(previous);
    }
  }

  /** The model catalog, within the calling {@code Context}'s deadline, else the default timeout. */
  public List<ModelInfo> listModels() {
    return listModels(null);
  }

  /** The model catalog. */
  public List<ModelInfo> listModels(Duration timeout) {
    return withDeadline(stub, timeout).listModels(ListModelsRequest.getDefaultInstance()).getModelsList();
  }

  /**
   * The server's grpc.health.v1 status for RouterService, within the calling {@code Context}'s
   * deadline, else the default timeout.
   */
  public HealthCheckResponse.ServingStatus health() {
    return health(null);
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
    return details(error, ErrorInfo.class).stream().filter(info -> ERROR_DOMAIN.equals(info.getDomain())).findFirst();
  }

  /**
   * The {@code google.rpc.RetryInfo} of a failed call, if any: how long to wait before trying
   * again ({@code getRetryDelay()}), on RESOURCE_EXHAUSTED (RATE_LIMITED, OVERLOADED, ...) and
   * some UNAVAILABLE errors.
   */
  public static Optional<RetryInfo> retryInfo(Throwable error) {
    return details(error, RetryInfo.class).stream().findFirst();
  }

  /** The status details of {@code type} in a failed call's error, in order; unreadable ones skipped. */
  private static <T extends com.google.protobuf.Message> List<T> details(Throwable error, Class<T> type) {
    List<T> found = new ArrayList<>();
    com.google.rpc.Status status = StatusProto.fromThrowable(error);
    if (status == null) {
      return found;
    }
    for (Any detail : status.getDetailsList()) {
      if (detail.is(type)) {
        try {
          found.add(detail.unpack(type));
        } catch (InvalidProtocolBufferException e) {
          // a detail we cannot read says nothing
        }
      }
    }
    return found;
  }

  /**
   * {@code stub} with a deadline {@code timeout} from now; as it is when {@code timeout} is null,
   * so that the stub's {@link DefaultDeadline} gives the call the calling Context's deadline or the
   * default (a deadline on the call would cut a longer one on the Context: grpc-java takes the
   * earlier).
   */
  private static <S extends io.grpc.stub.AbstractStub<S>> S withDeadline(S stub, Duration timeout) {
    return timeout == null ? stub : stub.withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS);
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
