package routesvc_test

// Interop tests against a live routesvc: set ROUTESVC_TARGET=host:port (plaintext) and,
// for the slow-provider cases, ROUTESVC_FAKE_URL=http://host:port of the fake provider
// (python -m routesvc.testing) behind it. .ci/clients.sh starts both.

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	routesvc "github.com/routesvc/routesvc/clients/go"
	routesvcv1 "github.com/routesvc/routesvc/clients/go/routesvcv1"
)

// The scripted tests pin pinnedModel, so that the fake provider's script queue
// for its provider model name is consumed only by them, never by the unscripted
// tests (routed to the default gpt-4o-mini).
const pinnedModel = "claude-sonnet"

func dial(t *testing.T, opts ...routesvc.Option) *routesvc.Client {
	t.Helper()
	target := os.Getenv("ROUTESVC_TARGET")
	if target == "" {
		t.Skip("ROUTESVC_TARGET not set: no live service to test against")
	}
	client, err := routesvc.Dial(target, append([]routesvc.Option{routesvc.WithInsecure(), routesvc.WithAPIKey("interop-key")}, opts...)...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func withTimeout(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// script resets the fake provider, then queues one scripted answer for the
// provider model that serves pinnedModel (as ListModels reports it).
func script(t *testing.T, client *routesvc.Client, fields map[string]any) {
	t.Helper()
	fake := strings.TrimRight(os.Getenv("ROUTESVC_FAKE_URL"), "/")
	if fake == "" {
		t.Skip("ROUTESVC_FAKE_URL not set: cannot script a slow provider")
	}
	models, err := client.ListModels(withTimeout(t, 10*time.Second))
	if err != nil {
		t.Fatalf("ListModels: %v", err)
	}
	providerModel := ""
	for _, model := range models {
		if model.GetId() == pinnedModel {
			providerModel = model.GetProviderModel()
		}
	}
	if providerModel == "" {
		t.Fatalf("catalog has no %s", pinnedModel)
	}
	body, _ := json.Marshal(map[string]any{"script": fields, "model": providerModel, "mode": "enqueue"})
	for _, call := range []struct{ path, body string }{{"/_fake/reset", "{}"}, {"/_fake/script", string(body)}} {
		resp, err := http.Post(fake+call.path, "application/json", strings.NewReader(call.body))
		if err != nil {
			t.Fatalf("scripting the fake provider: %v", err)
		}
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("scripting the fake provider: %s %s: %s", call.path, resp.Status, msg)
		}
	}
}

// upstreamRecord is what the fake provider recorded of one request it received.
type upstreamRecord struct {
	ChunksSent int  `json:"chunks_sent"`
	Completed  bool `json:"completed"`
	Aborted    bool `json:"aborted"`
	Ended      bool `json:"ended"`
}

// upstream returns the fake provider's record of the one request it received since
// script, once that request has ended (completed, or aborted by routesvc); each poll
// first runs pending, for the tests that wait on the garbage collector. A bounded
// poll (the fake is another process), well past a scripted 5 s answer, so an
// uncancelled request ends completed rather than timing out.
func upstream(t *testing.T, poll func()) upstreamRecord {
	t.Helper()
	fake := strings.TrimRight(os.Getenv("ROUTESVC_FAKE_URL"), "/")
	deadline := time.Now().Add(20 * time.Second)
	for {
		poll()
		resp, err := http.Get(fake + "/_fake/requests")
		if err != nil {
			t.Fatalf("reading the fake provider's requests: %v", err)
		}
		var body struct{ Requests []upstreamRecord }
		err = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("reading the fake provider's requests: %v", err)
		}
		if len(body.Requests) > 1 {
			t.Fatalf("more than one provider request: %+v", body.Requests)
		}
		if len(body.Requests) == 1 && body.Requests[0].Ended {
			return body.Requests[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("the provider request did not end within 20 s: %+v", body.Requests)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readDecisionAndDelta reads the first two messages of stream: the decision, then a delta.
func readDecisionAndDelta(t *testing.T, stream *routesvc.CompleteStream) {
	t.Helper()
	for _, want := range []string{"decision", "delta"} {
		msg, err := stream.Recv()
		if err != nil {
			t.Fatalf("Recv %s: %v", want, err)
		}
		if (want == "decision") != (msg.GetDecision() != nil) {
			t.Fatalf("want %s first, got %v", want, msg)
		}
	}
}

func pinned(prompt string) *routesvcv1.CompleteRequest {
	return &routesvcv1.CompleteRequest{
		Chat:    routesvc.UserPrompt(prompt),
		Context: &routesvcv1.RoutingContext{Model: pinnedModel},
	}
}

func TestRouteReturnsADecision(t *testing.T) {
	client := dial(t)
	decision, err := client.Route(withTimeout(t, 10*time.Second), &routesvcv1.RouteRequest{Chat: routesvc.UserPrompt("Say hello")})
	if err != nil {
		t.Fatalf("Route: %v", err)
	}
	if decision.GetModel() == "" || decision.GetDecisionId() == "" || decision.GetEstimatedCostUsd() == "" {
		t.Fatalf("incomplete decision: %v", decision)
	}
	if len(decision.GetCandidates()) == 0 {
		t.Fatalf("decision lists no candidates: %v", decision)
	}
}

func TestListModelsReturnsTheCatalog(t *testing.T) {
	client := dial(t)
	models, err := client.ListModels(withTimeout(t, 10*time.Second))
	if err != nil {
		t.Fatalf("ListModels: %v", err)
	}
	if len(models) == 0 || models[0].GetId() == "" || models[0].GetInputPricePerMtok() == "" {
		t.Fatalf("unexpected catalog: %v", models)
	}
}

func TestCompleteStreamsDecisionDeltasThenCompletion(t *testing.T) {
	client := dial(t)
	stream, err := client.Complete(withTimeout(t, 20*time.Second), &routesvcv1.CompleteRequest{Chat: routesvc.UserPrompt("Say hello")})
	if err != nil {
		t.Fatalf("Complete: %v", err)
	}
	var kinds []string
	var text strings.Builder
	var completion *routesvcv1.Completion
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		switch event := msg.GetEvent().(type) {
		case *routesvcv1.CompleteResponse_Decision:
			kinds = append(kinds, "decision")
		case *routesvcv1.CompleteResponse_Delta:
			kinds = append(kinds, "delta")
			text.WriteString(event.Delta.GetText())
		case *routesvcv1.CompleteResponse_Completion:
			kinds = append(kinds, "completion")
			completion = event.Completion
		}
	}
	if len(kinds) < 3 || kinds[0] != "decision" || kinds[len(kinds)-1] != "completion" {
		t.Fatalf("want decision, deltas, completion; got %v", kinds)
	}
	for _, kind := range kinds[1 : len(kinds)-1] {
		if kind != "delta" {
			t.Fatalf("want only deltas between decision and completion; got %v", kinds)
		}
	}
	if text.Len() == 0 {
		t.Fatal("no text streamed")
	}
	if completion.GetUsage().GetOutputTokens() <= 0 || completion.GetUsage().GetInputTokens() <= 0 {
		t.Fatalf("completion without usage: %v", completion)
	}
	if completion.GetCostUsd() == "" || completion.GetFinishReason() != routesvcv1.FinishReason_FINISH_REASON_STOP {
		t.Fatalf("completion without cost or finish reason: %v", completion)
	}
}

func TestDeadlineExceededWhenTheProviderIsSlow(t *testing.T) {
	client := dial(t)
	// script connects first, so that the deadline is spent waiting for the provider.
	script(t, client, map[string]any{"first_chunk_delay": 10.0})
	stream, err := client.Complete(withTimeout(t, time.Second), pinned("Say hello slowly"))
	for err == nil {
		_, err = stream.Recv()
	}
	if got := status.Code(err); got != codes.DeadlineExceeded {
		t.Fatalf("want DEADLINE_EXCEEDED, got %v", err)
	}
}

func TestUnaryCallsWithoutADeadlineGetTheDefault(t *testing.T) {
	client := dial(t, routesvc.WithDefaultTimeout(time.Nanosecond))
	_, err := client.ListModels(context.Background())
	if got := status.Code(err); got != codes.DeadlineExceeded {
		t.Fatalf("want DEADLINE_EXCEEDED from a 1 ns default, got %v", err)
	}
	// A deadline of the caller's own replaces the default.
	if _, err := client.ListModels(withTimeout(t, 10*time.Second)); err != nil {
		t.Fatalf("ListModels with its own deadline: %v", err)
	}
}

func TestCompleteWithoutADeadlineEndsAtTheDefaultStreamTimeout(t *testing.T) {
	client := dial(t, routesvc.WithDefaultStreamTimeout(time.Second))
	script(t, client, map[string]any{"first_chunk_delay": 10.0})
	stream, err := client.Complete(context.Background(), pinned("Say hello slowly"))
	for err == nil {
		_, err = stream.Recv()
	}
	if got := status.Code(err); got != codes.DeadlineExceeded {
		t.Fatalf("want DEADLINE_EXCEEDED, got %v", err)
	}
}

func TestRetryInfoReadsTheRetryDelay(t *testing.T) {
	st, err := status.New(codes.ResourceExhausted, "tenant 'a' is over its 1 requests per minute").WithDetails(
		&errdetails.ErrorInfo{Reason: "RATE_LIMITED", Domain: routesvc.ErrorDomain},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(42500 * time.Millisecond)},
	)
	if err != nil {
		t.Fatal(err)
	}
	if got := routesvc.RetryInfo(st.Err()).GetRetryDelay().AsDuration(); got != 42500*time.Millisecond {
		t.Fatalf("retry delay = %v, want 42.5s", got)
	}
	if got := routesvc.ErrorInfo(st.Err()).GetReason(); got != "RATE_LIMITED" {
		t.Fatalf("reason = %q, want RATE_LIMITED", got)
	}
	if info := routesvc.RetryInfo(status.Error(codes.Unavailable, "no details")); info != nil {
		t.Fatalf("RetryInfo of an error without one = %v, want nil", info)
	}
}

func TestCancelMidStream(t *testing.T) {
	client := dial(t)
	script(t, client, map[string]any{"chunk_count": 100, "chunk_delay": 0.05})
	ctx, cancel := context.WithCancel(withTimeout(t, 20*time.Second))
	stream, err := client.Complete(ctx, pinned("Count slowly"))
	if err != nil {
		t.Fatalf("Complete: %v", err)
	}
	for _, want := range []string{"decision", "delta"} {
		msg, err := stream.Recv()
		if err != nil {
			t.Fatalf("Recv %s: %v", want, err)
		}
		if (want == "decision") != (msg.GetDecision() != nil) {
			t.Fatalf("want %s first, got %v", want, msg)
		}
	}
	cancel()
	for err == nil {
		_, err = stream.Recv()
	}
	if got := status.Code(err); got != codes.Canceled {
		t.Fatalf("want CANCELLED after cancel, got %v", err)
	}
}

func TestCloseCancelsTheCallUpstream(t *testing.T) {
	client := dial(t)
	script(t, client, map[string]any{"chunk_count": 100, "chunk_delay": 0.05})
	// No deadline of the caller's own and nothing to cancel: Close is the only way to stop.
	stream, err := client.Complete(context.Background(), pinned("Count slowly"))
	if err != nil {
		t.Fatalf("Complete: %v", err)
	}
	readDecisionAndDelta(t, stream)
	stream.Close()
	if _, err := stream.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("want CANCELLED from Recv after Close, got %v", err)
	}
	recorded := upstream(t, func() {})
	if !recorded.Aborted || recorded.Completed || recorded.ChunksSent >= 100 {
		t.Fatalf("want the provider request aborted by routesvc, got %+v", recorded)
	}
}

func TestADroppedStreamIsCancelledWhenCollected(t *testing.T) {
	client := dial(t)
	script(t, client, map[string]any{"chunk_count": 100, "chunk_delay": 0.05})
	func() {
		stream, err := client.Complete(context.Background(), pinned("Count slowly"))
		if err != nil {
			t.Fatalf("Complete: %v", err)
		}
		readDecisionAndDelta(t, stream)
	}() // dropped unclosed, still running
	recorded := upstream(t, runtime.GC)
	if !recorded.Aborted || recorded.Completed || recorded.ChunksSent >= 100 {
		t.Fatalf("want the provider request aborted by routesvc, got %+v", recorded)
	}
}

func TestDialRefusesANegativeDefaultTimeout(t *testing.T) {
	for name, option := range map[string]routesvc.Option{
		"WithDefaultTimeout":       routesvc.WithDefaultTimeout(-time.Second),
		"WithDefaultStreamTimeout": routesvc.WithDefaultStreamTimeout(-time.Second),
	} {
		client, err := routesvc.Dial("127.0.0.1:1", routesvc.WithInsecure(), option)
		if err == nil {
			client.Close()
			t.Fatalf("%s(-1s): Dial accepted it", name)
		}
		if !strings.Contains(err.Error(), name) {
			t.Fatalf("%s(-1s): error %q does not name the option", name, err)
		}
	}
}

func TestInvalidArgumentCarriesErrorInfoReason(t *testing.T) {
	client := dial(t)
	_, err := client.Route(withTimeout(t, 10*time.Second), &routesvcv1.RouteRequest{Chat: &routesvcv1.ChatRequest{}})
	if got := status.Code(err); got != codes.InvalidArgument {
		t.Fatalf("want INVALID_ARGUMENT for empty messages, got %v", err)
	}
	info := routesvc.ErrorInfo(err)
	if info == nil {
		t.Fatalf("no routesvc ErrorInfo in %v", err)
	}
	if info.GetReason() != "INVALID_REQUEST" || info.GetDomain() != "routesvc" {
		t.Fatalf("want reason INVALID_REQUEST in domain routesvc, got %v", info)
	}
}

func TestRequestIDRoundTripsInHeadersAndTrailers(t *testing.T) {
	client := dial(t)
	const id = "go-interop-7f3a"
	ctx := metadata.AppendToOutgoingContext(withTimeout(t, 10*time.Second), "x-request-id", id)
	var header, trailer metadata.MD
	_, err := client.Route(ctx, &routesvcv1.RouteRequest{Chat: routesvc.UserPrompt("Say hello")}, grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		t.Fatalf("Route: %v", err)
	}
	if got := header.Get("x-request-id"); len(got) != 1 || got[0] != id {
		t.Fatalf("initial metadata x-request-id = %v, want %q", got, id)
	}
	if got := trailer.Get("x-request-id"); len(got) != 1 || got[0] != id {
		t.Fatalf("trailing metadata x-request-id = %v, want %q", got, id)
	}
}

func TestHealthCheckReportsServing(t *testing.T) {
	client := dial(t)
	got, err := client.Healthy(withTimeout(t, 10*time.Second))
	if err != nil {
		t.Fatalf("health check: %v", err)
	}
	if got != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health = %v, want SERVING", got)
	}
}
