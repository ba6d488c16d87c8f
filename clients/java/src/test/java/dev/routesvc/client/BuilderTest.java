package dev.routesvc.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.UncheckedIOException;
import java.nio.file.Path;
import java.time.Duration;
import org.junit.jupiter.api.DisplayName;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** What {@link RouterClient.Builder} refuses, before any call. */
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
  @DisplayName("the default timeout must be above zero")
  void defaultTimeoutAboveZero() {
    assertThrows(IllegalArgumentException.class,
        () -> RouterClient.newBuilder("127.0.0.1:1").defaultTimeout(Duration.ZERO));
  }
}
