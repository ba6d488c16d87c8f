package dev.routesvc.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import com.google.rpc.ErrorInfo;
import dev.routesvc.v1.ChatRequest;
import dev.routesvc.v1.CompleteRequest;
import dev.routesvc.v1.CompleteResponse;
import dev.routesvc.v1.Completion;
import dev.routesvc.v1.FinishReason;
import dev.routesvc.v1.ListModelsRequest;
import dev.routesvc.v1.ModelInfo;
import dev.routesvc.v1.RouteDecision;
import dev.routesvc.v1.RouteRequest;
import dev.routesvc.v1.RoutingContext;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.Context;
import io.grpc.Deadline;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckResponse;
import io.grpc.stub.MetadataUtils;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.DisplayName;
import org.junit.jupiter.api.Test;

/**
 * Interop tests against a live routesvc: ROUTESVC_TARGET=host:port (plaintext) and, for the
 * slow-provider cases, ROUTESVC_FAKE_URL of the fake provider behind it.
 */
class InteropTest {
  /**
   * The scripted tests pin this model, so that the fake provider's script queue for its provider
   * model name is consumed only by them, never by the unscripted tests (routed to the default
   * gpt-4o-mini).
   */
  private static final String PINNED = "claude-sonnet";
  private static final Duration TIMEOUT = Duration.ofSeconds(20);
  private static final String TARGET = System.getenv("ROUTESVC_TARGET");
  private static final String FAKE_URL = System.getenv("ROUTESVC_FAKE_URL");

  private static RouterClient client;

  @BeforeAll
  static void dial() {
    assumeTrue(TARGET != null && !TARGET.isEmpty(), "ROUTESVC_TARGET not set: no live service to test against");
    client = RouterClient.newBuilder(TARGET).usePlaintext().apiKey("interop-key").build();
  }

  @AfterAll
  static void close() throws InterruptedException {
    if (client != null) {
      client.close();
    }
  }

  /** Resets the fake provider, then queues one scripted answer for the provider model serving PINNED. */
  private static void script(String json) throws Exception {
    assumeTrue(FAKE_URL != null && !FAKE_URL.isEmpty(), "ROUTESVC_FAKE_URL not set: cannot script a slow provider");
    String providerModel = client.listModels(TIMEOUT).stream()
        .filter(model -> model.getId().equals(PINNED))
        .findFirst()
        .orElseThrow(() -> new AssertionError("catalog has no " + PINNED))
        .getProviderModel();
    post("/_fake/reset", "{}");
    post("/_fake/script", "{\"model\": \"" + providerModel + "\", \"mode\": \"enqueue\", \"script\": " + json + "}");
  }

  /** What the fake provider recorded of the one request it received since the last reset. */
  private record Upstream(boolean completed, boolean aborted, int chunksSent) {}

  private static final Pattern RECORD = Pattern.compile(
      "\"chunks_sent\": (\\d+), \"completed\": (true|false), \"aborted\": (true|false), .*?\"ended\": (true|false)");

  /**
   * The fake provider's record of the request it received since {@link #script}, once that
   * request has ended (completed, cut or aborted by routesvc): {@code aborted} says whether
   * routesvc closed it early. A bounded poll (the fake is another process), well past a scripted
   * 5 s answer, so an uncancelled request ends completed rather than timing out.
   */
  private static Upstream upstream() throws Exception {
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
    while (true) {
      HttpResponse<String> response = HttpClient.newHttpClient().send(
          HttpRequest.newBuilder(URI.create(FAKE_URL + "/_fake/requests")).build(), HttpResponse.BodyHandlers.ofString());
      assertEquals(200, response.statusCode(), response.body());
      Matcher record = RECORD.matcher(response.body());
      if (record.find()) {
        assertFalse(record.find(), "more than one provider request: " + response.body());
        record.reset().find();
        if (record.group(4).equals("true")) {
          return new Upstream(
              record.group(2).equals("true"), record.group(3).equals("true"), Integer.parseInt(record.group(1)));
        }
      }
      assertTrue(System.nanoTime() < deadline, "the provider request did not end within 20 s: " + response.body());
      Thread.sleep(50);
    }
  }

  private static void post(String path, String body) throws Exception {
    HttpResponse<String> response = HttpClient.newHttpClient().send(
        HttpRequest.newBuilder(URI.create(FAKE_URL + path))
            .header("content-type", "application/json")
            .POST(HttpRequest.BodyPublishers.ofString(body))
            .build(),
        HttpResponse.BodyHandlers.ofString());
    assertEquals(200, response.statusCode(), path + ": " + response.body());
  }

  private static CompleteRequest pinned(String prompt) {
    return CompleteRequest.newBuilder()
        .setChat(RouterClient.userPrompt(prompt))
        .setContext(RoutingContext.newBuilder().setModel(PINNED))
        .build();
  }

  /** An interceptor that keeps the deadline each call's options carry when it reaches the channel. */
  private static ClientInterceptor deadlineOf(AtomicReference<Deadline> seen) {
    return new ClientInterceptor() {
      @Override
      public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
          MethodDescriptor<ReqT, RespT> method, CallOptions options, Channel next) {
        seen.set(options.getDeadline());
        return next.newCall(method, options);
      }
    };
  }

  @Test
  @DisplayName("Route returns a decision")
  void route() {
    RouteDecision decision =
        client.route(RouteRequest.newBuilder().setChat(RouterClient.userPrompt("Say hello")).build(), TIMEOUT);
    assertFalse(decision.getModel().isEmpty());
    assertFalse(decision.getDecisionId().isEmpty());
    assertFalse(decision.getEstimatedCostUsd().isEmpty());
    assertTrue(decision.getCandidatesCount() > 0);
  }

  @Test
  @DisplayName("ListModels returns the catalog")
  void listModels() {
    List<ModelInfo> models = client.listModels(TIMEOUT);
    assertFalse(models.isEmpty());
    assertFalse(models.get(0).getId().isEmpty());
  }

  @Test
  @DisplayName("Complete streams the decision, deltas, then the completion")
  void completeStreamsToTheEnd() {
    List<CompleteResponse.EventCase> kinds = new ArrayList<>();
    Completion completion = null;
    StringBuilder text = new StringBuilder();
    Iterator<CompleteResponse> stream = client.complete(
        CompleteRequest.newBuilder().setChat(RouterClient.userPrompt("Say hello")).build(), TIMEOUT);
    while (stream.hasNext()) {
      CompleteResponse message = stream.next();
      kinds.add(message.getEventCase());
      if (message.hasDelta()) {
        text.append(message.getDelta().getText());
      }
      if (message.hasCompletion()) {
        completion = message.getCompletion();
      }
    }
    assertTrue(kinds.size() >= 3, kinds.toString());
    assertEquals(CompleteResponse.EventCase.DECISION, kinds.get(0));
    assertEquals(CompleteResponse.EventCase.COMPLETION, kinds.get(kinds.size() - 1));
    for (CompleteResponse.EventCase kind : kinds.subList(1, kinds.size() - 1)) {
      assertEquals(CompleteResponse.EventCase.DELTA, kind, kinds.toString());
    }
    assertFalse(text.isEmpty());
    assertTrue(completion.getUsage().getInputTokens() > 0);
    assertTrue(completion.getUsage().getOutputTokens() > 0);
    assertFalse(completion.getCostUsd().isEmpty());
    assertEquals(FinishReason.FINISH_REASON_STOP, completion.getFinishReason());
  }

  @Test
  @DisplayName("a slow provider ends in DEADLINE_EXCEEDED")
  void deadlineExceeded() throws Exception {
    script("{\"first_chunk_delay\": 10.0}"); // also connects: the deadline is for the provider
    StatusRuntimeException error = assertThrows(StatusRuntimeException.class, () -> {
      Iterator<CompleteResponse> stream = client.complete(pinned("Say hello slowly"), Duration.ofSeconds(1));
      while (stream.hasNext()) {
        stream.next();
      }
    });
    assertEquals(Status.Code.DEADLINE_EXCEEDED, error.getStatus().getCode(), error.toString());
  }

  @Test
  @DisplayName("a call through stub() without a deadline gets the client's default")
  void stubCallsGetTheDefaultDeadline() throws InterruptedException {
    AtomicReference<Deadline> seen = new AtomicReference<>();
    try (RouterClient capturing = RouterClient.newBuilder(TARGET).usePlaintext().intercept(deadlineOf(seen)).build()) {
      capturing.stub().listModels(ListModelsRequest.getDefaultInstance());
    }
    assertNotNull(seen.get(), "the stub() call had no deadline");
    // Set before this one, with the same 30 s: not after it.
    assertFalse(Deadline.after(RouterClient.DEFAULT_TIMEOUT.toNanos(), TimeUnit.NANOSECONDS).isBefore(seen.get()));
  }

  @Test
  @DisplayName("a deadline on the stub or on the calling Context replaces the default")
  void ownDeadlinesReplaceTheDefault() throws InterruptedException {
    AtomicReference<Deadline> seen = new AtomicReference<>();
    Deadline own = Deadline.after(1, TimeUnit.HOURS);
    ScheduledExecutorService scheduler = Executors.newSingleThreadScheduledExecutor();
    try (RouterClient capturing = RouterClient.newBuilder(TARGET).usePlaintext().intercept(deadlineOf(seen)).build()) {
      capturing.stub().withDeadline(own).listModels(ListModelsRequest.getDefaultInstance());
      assertSame(own, seen.get());
      Context.CancellableContext context = Context.current().withDeadline(own, scheduler);
      try {
        context.run(() -> capturing.stub().listModels(ListModelsRequest.getDefaultInstance()));
      } finally {
        context.cancel(null);
      }
      assertNull(seen.get(), "the Context's deadline applies; none is added to the call");
    } finally {
      scheduler.shutdownNow();
    }
  }

  @Test
  @DisplayName("a stub() Complete ends at the default stream deadline: a slow provider is DEADLINE_EXCEEDED")
  void stubCallsEndAtTheDefaultDeadline() throws Exception {
    script("{\"first_chunk_delay\": 10.0}");
    try (RouterClient quick =
        RouterClient.newBuilder(TARGET).usePlaintext().defaultStreamTimeout(Duration.ofSeconds(1)).build()) {
      StatusRuntimeException error = assertThrows(StatusRuntimeException.class, () -> {
        Iterator<CompleteResponse> stream = quick.stub().complete(pinned("Say hello slowly"));
        while (stream.hasNext()) {
          stream.next();
        }
      });
      assertEquals(Status.Code.DEADLINE_EXCEEDED, error.getStatus().getCode(), error.toString());
    }
  }

  @Test
  @DisplayName("complete() without a timeout ends at the default stream deadline: a slow provider is DEADLINE_EXCEEDED")
  void completeEndsAtTheDefaultStreamDeadline() throws Exception {
    script("{\"first_chunk_delay\": 10.0}");
    try (RouterClient quick =
        RouterClient.newBuilder(TARGET).usePlaintext().defaultStreamTimeout(Duration.ofSeconds(1)).build()) {
      StatusRuntimeException error = assertThrows(StatusRuntimeException.class, () -> {
        try (CompleteStream stream = quick.complete(pinned("Say hello slowly"))) {
          while (stream.hasNext()) {
            stream.next();
          }
        }
      });
      assertEquals(Status.Code.DEADLINE_EXCEEDED, error.getStatus().getCode(), error.toString());
    }
  }

  @Test
  @DisplayName("complete() without a timeout inside a Context with a longer deadline runs past the default stream timeout")
  void completeKeepsTheContextsLongerDeadline() throws Exception {
    script("{\"first_chunk_delay\": 2.0}");
    ScheduledExecutorService scheduler = Executors.newSingleThreadScheduledExecutor();
    Context.CancellableContext context = Context.current().withDeadlineAfter(TIMEOUT.toMillis(), TimeUnit.MILLISECONDS, scheduler);
    try (RouterClient quick =
        RouterClient.newBuilder(TARGET).usePlaintext().defaultStreamTimeout(Duration.ofSeconds(1)).build()) {
      Completion completion = context.call(() -> {
        try (CompleteStream stream = quick.complete(pinned("Say hello slowly"))) {
          Completion last = null;
          while (stream.hasNext()) {
            CompleteResponse message = stream.next();
            if (message.hasCompletion()) {
              last = message.getCompletion();
            }
          }
          return last;
        }
      });
      assertNotNull(completion, "the stream ended without a completion");
      assertEquals(FinishReason.FINISH_REASON_STOP, completion.getFinishReason());
    } finally {
      context.cancel(null);
      scheduler.shutdownNow();
    }
  }

  @Test
  @DisplayName("route() and listModels() without a timeout leave the calling Context's deadline in charge")
  void unaryHelpersKeepTheContextsDeadline() throws Exception {
    AtomicReference<Deadline> seen = new AtomicReference<>(Deadline.after(1, TimeUnit.SECONDS));
    ScheduledExecutorService scheduler = Executors.newSingleThreadScheduledExecutor();
    Context.CancellableContext context = Context.current().withDeadlineAfter(1, TimeUnit.HOURS, scheduler);
    try (RouterClient capturing = RouterClient.newBuilder(TARGET).usePlaintext().intercept(deadlineOf(seen)).build()) {
      context.run(() -> capturing.listModels());
      assertNull(seen.get(), "listModels(): the call got a deadline of its own, cutting the Context's");
      seen.set(Deadline.after(1, TimeUnit.SECONDS));
      context.run(() -> capturing.route(RouteRequest.newBuilder().setChat(RouterClient.userPrompt("Say hello")).build()));
      assertNull(seen.get(), "route(): the call got a deadline of its own, cutting the Context's");
    } finally {
      context.cancel(null);
      scheduler.shutdownNow();
    }
  }

  @Test
  @DisplayName("an exception inside try-with-resources cancels the stream upstream")
  void exceptionInTheLoopCancelsUpstream() throws Exception {
    script("{\"chunk_count\": 100, \"chunk_delay\": 0.05}");
    List<CompleteResponse.EventCase> seen = new ArrayList<>();
    IllegalStateException error = assertThrows(IllegalStateException.class, () -> {
      try (CompleteStream stream = client.complete(pinned("Count slowly"), TIMEOUT)) {
        while (stream.hasNext()) {
          CompleteResponse message = stream.next();
          seen.add(message.getEventCase());
          if (message.hasDelta()) {
            throw new IllegalStateException("caller gave up");
          }
        }
      }
    });
    assertEquals("caller gave up", error.getMessage());
    Upstream recorded = upstream();
    assertEquals(List.of(CompleteResponse.EventCase.DECISION, CompleteResponse.EventCase.DELTA), seen);
    assertEquals(List.of(true, false), List.of(recorded.aborted(), recorded.completed()), recorded.toString());
    assertTrue(recorded.chunksSent() < 100, recorded.toString());
  }

  @Test
  @DisplayName("close() on a stream held in a variable cancels it upstream; it yields nothing more")
  void closeCancelsUpstream() throws Exception {
    script("{\"chunk_count\": 100, \"chunk_delay\": 0.05}");
    CompleteStream stream = client.complete(pinned("Count slowly"), TIMEOUT);
    assertTrue(stream.next().hasDecision());
    assertTrue(stream.next().hasDelta());
    stream.close();
    Upstream recorded = upstream();
    assertEquals(List.of(true, false), List.of(recorded.aborted(), recorded.completed()), recorded.toString());
    assertTrue(recorded.chunksSent() < 100, recorded.toString());
    assertFalse(stream.hasNext());
  }

  @Test
  @DisplayName("the completion is handed over once the call has ended, so stopping at it cancels nothing")
  void completionComesAfterTheStatus() throws InterruptedException {
    AtomicReference<Metadata> headers = new AtomicReference<>();
    AtomicReference<Metadata> trailers = new AtomicReference<>();
    Metadata trailersAtCompletion = null;
    try (RouterClient capturing = RouterClient.newBuilder(TARGET).usePlaintext()
            .intercept(MetadataUtils.newCaptureMetadataInterceptor(headers, trailers)).build();
        CompleteStream stream =
            capturing.complete(CompleteRequest.newBuilder().setChat(RouterClient.userPrompt("Say hello")).build(), TIMEOUT)) {
      while (stream.hasNext()) {
        if (stream.next().hasCompletion()) {
          trailersAtCompletion = trailers.get();
          break;
        }
      }
    }
    assertNotNull(trailersAtCompletion, "the completion came before the call's status");
  }

  @Test
  @DisplayName("cancelling mid-stream ends the call as CANCELLED")
  void cancelMidStream() throws Exception {
    script("{\"chunk_count\": 100, \"chunk_delay\": 0.05}");
    Context.CancellableContext context = Context.current().withCancellation();
    Iterator<CompleteResponse> stream = context.call(() -> client.complete(pinned("Count slowly"), TIMEOUT));
    assertTrue(stream.next().hasDecision());
    assertTrue(stream.next().hasDelta());
    context.cancel(null);
    StatusRuntimeException error = assertThrows(StatusRuntimeException.class, () -> {
      while (stream.hasNext()) {
        stream.next();
      }
    });
    assertEquals(Status.Code.CANCELLED, error.getStatus().getCode(), error.toString());
  }

  @Test
  @DisplayName("empty messages are INVALID_ARGUMENT with ErrorInfo reason INVALID_REQUEST")
  void invalidArgument() {
    StatusRuntimeException error = assertThrows(StatusRuntimeException.class,
        () -> client.route(RouteRequest.newBuilder().setChat(ChatRequest.getDefaultInstance()).build(), TIMEOUT));
    assertEquals(Status.Code.INVALID_ARGUMENT, error.getStatus().getCode(), error.toString());
    ErrorInfo info = RouterClient.errorInfo(error).orElseThrow();
    assertEquals("INVALID_REQUEST", info.getReason());
    assertEquals("routesvc", info.getDomain());
  }

  @Test
  @DisplayName("x-request-id round-trips in initial and trailing metadata")
  void requestIdRoundTrip() {
    Metadata.Key<String> key = Metadata.Key.of("x-request-id", Metadata.ASCII_STRING_MARSHALLER);
    String id = "java-interop-7f3a";
    Metadata outgoing = new Metadata();
    outgoing.put(key, id);
    AtomicReference<Metadata> headers = new AtomicReference<>();
    AtomicReference<Metadata> trailers = new AtomicReference<>();
    client.stub()
        .withDeadlineAfter(TIMEOUT.toMillis(), java.util.concurrent.TimeUnit.MILLISECONDS)
        .withInterceptors(
            MetadataUtils.newAttachHeadersInterceptor(outgoing),
            MetadataUtils.newCaptureMetadataInterceptor(headers, trailers))
        .route(RouteRequest.newBuilder().setChat(RouterClient.userPrompt("Say hello")).build());
    assertEquals(id, headers.get().get(key));
    assertEquals(id, trailers.get().get(key));
  }

  @Test
  @DisplayName("the health check reports SERVING")
  void health() {
    assertEquals(HealthCheckResponse.ServingStatus.SERVING, client.health(TIMEOUT));
  }
}
