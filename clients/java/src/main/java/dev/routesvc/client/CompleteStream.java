package dev.routesvc.client;

import dev.routesvc.v1.CompleteResponse;
import io.grpc.Context;
import java.lang.ref.Cleaner;
import java.util.ArrayDeque;
import java.util.Iterator;
import java.util.NoSuchElementException;

/**
 * The messages of one Complete call: the decision, text deltas, then the completion (or, in batch
 * mode, the decision and the batch job); a cascade may send an escalation before the deltas, which
 * are then the next model's, or, if it failed before any text, the rejected answer's (the
 * completion's {@code model} says whose). The call starts when {@link RouterClient#complete} is
 * called, so its deadline counts from then. Read it inside try-with-resources:
 *
 * <pre>{@code
 * try (CompleteStream stream = client.complete(request)) {
 *   while (stream.hasNext()) {
 *     CompleteResponse message = stream.next();
 *     ...
 *   }
 * }
 * }</pre>
 *
 * <p>Leaving the block before the end ({@code break}, {@code return}, an exception) cancels the
 * call, and routesvc then aborts the provider's request; so does {@link #close()}. A stream neither
 * read to its end nor closed runs on (and the provider keeps generating, and billing) until its
 * deadline, or until it is garbage-collected, which may be much later: close it.
 *
 * <p>The last message (the completion, or the batch job) is followed at once by the call's status:
 * it is handed over only once the call has ended, so a caller that stops at it cancels nothing (a
 * cancel there makes the server's final status fail, and grpcio leaks native memory for every such
 * call: grpc/grpc#43360). When the call ends in an error after it, it is handed over before the
 * error is thrown. Not thread-safe: read it from one thread.
 */
public final class CompleteStream implements Iterator<CompleteResponse>, AutoCloseable {
  private static final Cleaner CLEANER = Cleaner.create();

  private final Iterator<CompleteResponse> messages;
  private final Cleaner.Cleanable cancel; // cancels the call's context; idempotent
  private final ArrayDeque<CompleteResponse> ready = new ArrayDeque<>();
  private RuntimeException error; // thrown once ready is handed over
  private boolean ended;

  /** The stream of a call started in {@code context}, which cancelling cancels. */
  CompleteStream(Context.CancellableContext context, Iterator<CompleteResponse> messages) {
    this.messages = messages;
    // The action holds the context, never this stream: a stream dropped unclosed is cancelled
    // when it is collected.
    this.cancel = CLEANER.register(this, () -> context.cancel(null));
  }

  @Override
  public boolean hasNext() {
    while (ready.isEmpty()) {
      if (error != null) {
        RuntimeException thrown = error;
        error = null;
        throw thrown;
      }
      if (ended) {
        return false;
      }
      read();
    }
    return true;
  }

  @Override
  public CompleteResponse next() {
    if (!hasNext()) {
      throw new NoSuchElementException("the Complete stream has ended");
    }
    return ready.poll();
  }

  /** Reads one message of the call into {@code ready}, or its end. */
  private void read() {
    try {
      if (!messages.hasNext()) {
        end(null);
        return;
      }
      CompleteResponse message = messages.next();
      ready.add(message);
      CompleteResponse.EventCase kind = message.getEventCase();
      if ((kind == CompleteResponse.EventCase.COMPLETION || kind == CompleteResponse.EventCase.BATCH)
          && !messages.hasNext()) {
        end(null); // the status came: the last message is handed over on a finished call
      }
    } catch (RuntimeException e) {
      end(e);
    }
  }

  private void end(RuntimeException failure) {
    ended = true;
    error = failure;
    cancel.clean(); // the call has ended: this only releases its context
  }

  /** Cancels the call if it is still running; the stream yields nothing more. Idempotent. */
  @Override
  public void close() {
    ended = true;
    ready.clear();
    error = null;
    cancel.clean();
  }
}
