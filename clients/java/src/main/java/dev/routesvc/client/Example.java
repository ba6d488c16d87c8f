package dev.routesvc.client;

import dev.routesvc.v1.CompleteRequest;
import dev.routesvc.v1.CompleteResponse;
import dev.routesvc.v1.Completion;
import dev.routesvc.v1.RouteDecision;
import dev.routesvc.v1.RouteRequest;
import io.grpc.StatusRuntimeException;
import java.time.Duration;
import java.util.Arrays;

/**
 * Routes a prompt, then streams a completion for it.
 *
 * <pre>java -cp ... dev.routesvc.client.Example 127.0.0.1:50051 "Explain gRPC in one line"</pre>
 *
 * Plaintext unless ROUTESVC_TLS=1; ROUTESVC_API_KEY is sent as a bearer token.
 */
public final class Example {
  private Example() {}

  public static void main(String[] args) throws InterruptedException {
    String target = args.length > 0 ? args[0] : "127.0.0.1:50051";
    String prompt = args.length > 1 ? String.join(" ", Arrays.copyOfRange(args, 1, args.length)) : "Say hello in five words.";
    RouterClient.Builder builder = RouterClient.newBuilder(target).apiKey(System.getenv("ROUTESVC_API_KEY"));
    if (!"1".equals(System.getenv("ROUTESVC_TLS"))) {
      builder.usePlaintext();
    }
    try (RouterClient client = builder.build()) {
      RouteDecision decision =
          client.route(RouteRequest.newBuilder().setChat(RouterClient.userPrompt(prompt)).build(), Duration.ofSeconds(30));
      System.out.printf("route: %s (%s), estimated %s USD%n", decision.getModel(), decision.getRule(), decision.getEstimatedCostUsd());

      try (CompleteStream stream =
          client.complete(CompleteRequest.newBuilder().setChat(RouterClient.userPrompt(prompt)).build(), Duration.ofSeconds(30))) {
        while (stream.hasNext()) {
          CompleteResponse message = stream.next();
          switch (message.getEventCase()) {
            case DECISION -> System.out.printf("[%s]%n", message.getDecision().getModel());
            case DELTA -> System.out.print(message.getDelta().getText());
            case COMPLETION -> {
              Completion c = message.getCompletion();
              System.out.printf("%n[%d in / %d out tokens, %s USD]%n",
                  c.getUsage().getInputTokens(), c.getUsage().getOutputTokens(), c.getCostUsd());
            }
            default -> { }
          }
        }
      }
    } catch (StatusRuntimeException e) {
      String reason = RouterClient.errorInfo(e).map(info -> info.getReason()).orElse("none");
      System.err.printf("%s (reason %s)%n", e.getStatus(), reason);
      System.exit(1);
    }
  }
}
