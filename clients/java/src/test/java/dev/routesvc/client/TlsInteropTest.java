package dev.routesvc.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import dev.routesvc.v1.RouteRequest;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckResponse;
import java.nio.file.Path;
import java.time.Duration;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.DisplayName;
import org.junit.jupiter.api.Test;

/**
 * The TLS options against a live routesvc that requires client certificates (mutual TLS):
 * ROUTESVC_TLS_TARGET=host:port, and ROUTESVC_TLS_DIR holding the CA that signed its certificate
 * ({@code ca.pem}) and a client certificate it signed ({@code client.pem}, {@code client.key}).
 * .ci/clients.sh makes both.
 */
class TlsInteropTest {
  private static final Duration TIMEOUT = Duration.ofSeconds(20);
  private static final String TARGET = System.getenv("ROUTESVC_TLS_TARGET");
  private static final String DIR = System.getenv("ROUTESVC_TLS_DIR");

  @BeforeAll
  static void requireService() {
    assumeTrue(TARGET != null && !TARGET.isEmpty() && DIR != null && !DIR.isEmpty(),
        "ROUTESVC_TLS_TARGET or ROUTESVC_TLS_DIR not set: no TLS service to test against");
  }

  private static Path pki(String name) {
    return Path.of(DIR, name);
  }

  private static StatusRuntimeException healthFails(RouterClient client) {
    return assertThrows(StatusRuntimeException.class, () -> client.health(TIMEOUT));
  }

  @Test
  @DisplayName("a private CA and a client certificate reach a server that requires mutual TLS")
  void mutualTls() throws InterruptedException {
    try (RouterClient client = RouterClient.newBuilder(TARGET)
        .tlsCaFile(pki("ca.pem"))
        .tlsClientCertificate(pki("client.pem"), pki("client.key"))
        .build()) {
      assertEquals(HealthCheckResponse.ServingStatus.SERVING, client.health());
      assertFalse(client.route(RouteRequest.newBuilder().setChat(RouterClient.userPrompt("Say hello")).build())
          .getModel().isEmpty());
    }
  }

  @Test
  @DisplayName("without the client certificate the handshake fails: UNAVAILABLE")
  void noClientCertificate() throws InterruptedException {
    try (RouterClient client = RouterClient.newBuilder(TARGET).tlsCaFile(pki("ca.pem")).build()) {
      assertEquals(Status.Code.UNAVAILABLE, healthFails(client).getStatus().getCode());
    }
  }

  @Test
  @DisplayName("without the private CA (the system roots) the server is not trusted: UNAVAILABLE")
  void systemRootsOnly() throws InterruptedException {
    try (RouterClient client = RouterClient.newBuilder(TARGET)
        .tlsClientCertificate(pki("client.pem"), pki("client.key"))
        .build()) {
      assertEquals(Status.Code.UNAVAILABLE, healthFails(client).getStatus().getCode());
    }
  }
}
