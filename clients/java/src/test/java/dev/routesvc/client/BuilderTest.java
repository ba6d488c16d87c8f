package dev.routesvc.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.protobuf.Any;
import com.google.rpc.ErrorInfo;
import com.google.rpc.RetryInfo;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import java.io.UncheckedIOException;
import java.nio.file.Path;
import java.time.Duration;
import org.junit.jupiter.api.DisplayName;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** What {@link RouterClient.Builder} refuses, and the error helpers, without a server. */
class BuilderTest {
  @Test
  @DisplayName("TLS files with usePlaintext() are refused")
  void tlsFilesWithPlaintext() {
    IllegalStateException error = assertThrows(IllegalStateException.class,
        () -> RouterClient.newBuilder("127.0.0.1:1").usePlaintext().tlsCaFile(Path.of("ca.pem")).build());
    assertTrue(error.getMessage().contains("usePlaintext()"), error.getMessage());
  }

  @Test
  @DisplayName("a CA file that cannot be read is an UncheckedIOException naming it")
  void unreadableCaFile(@TempDir Path folder) {
    Path missing = folder.resolve("missing-ca.pem");
    UncheckedIOException error = assertThrows(UncheckedIOException.class,
        () -> RouterClient.newBuilder("127.0.0.1:1").tlsCaFile(missing).build());
    assertEquals("TLS CA file " + missing + ": cannot read", error.getMessage());
  }

  @Test
  @DisplayName("a client certificate without its key (or a key without its certificate) is an IllegalArgumentException")
  void clientCertificateNeedsBoth() {
    IllegalArgumentException error = assertThrows(IllegalArgumentException.class,
        () -> RouterClient.newBuilder("127.0.0.1:1").tlsClientCertificate(Path.of("client.pem"), null));
    assertTrue(error.getMessage().contains("key"), error.getMessage());
    assertThrows(IllegalArgumentException.class,
        () -> RouterClient.newBuilder("127.0.0.1:1").tlsClientCertificate(null, Path.of("client.key")));
  }

  @Test
  @DisplayName("the default timeouts must be above zero")
  void defaultTimeoutAboveZero() {
    assertThrows(IllegalArgumentException.class,
        () -> RouterClient.newBuilder("127.0.0.1:1").defaultTimeout(Duration.ZERO));
    assertThrows(IllegalArgumentException.class,
        () -> RouterClient.newBuilder("127.0.0.1:1").defaultStreamTimeout(Duration.ofSeconds(-1)));
  }

  @Test
  @DisplayName("retryInfo reads the delay a RESOURCE_EXHAUSTED error carries; errorInfo its reason")
  void retryInfo() {
    com.google.rpc.Status status = com.google.rpc.Status.newBuilder()
        .setCode(Status.Code.RESOURCE_EXHAUSTED.value())
        .setMessage("tenant 'a' is over its 1 requests per minute")
        .addDetails(Any.pack(ErrorInfo.newBuilder().setReason("RATE_LIMITED").setDomain("routesvc").build()))
        .addDetails(Any.pack(RetryInfo.newBuilder()
            .setRetryDelay(com.google.protobuf.Duration.newBuilder().setSeconds(42).setNanos(500_000_000))
            .build()))
        .build();
    StatusRuntimeException error = StatusProto.toStatusRuntimeException(status);
    assertEquals(42_500, RouterClient.retryInfo(error).orElseThrow().getRetryDelay().getSeconds() * 1000
        + RouterClient.retryInfo(error).orElseThrow().getRetryDelay().getNanos() / 1_000_000);
    assertEquals("RATE_LIMITED", RouterClient.errorInfo(error).orElseThrow().getReason());
    assertTrue(RouterClient.retryInfo(Status.UNAVAILABLE.asRuntimeException()).isEmpty());
  }
}
