// Package routesvc is a small Go client for the routesvc RouterService.
//
// It wraps the generated stubs in routesvcv1 with what every caller needs: a
// connection with TLS (or plaintext for loopback), an API key sent as
// "authorization: Bearer" metadata, and access to the google.rpc.ErrorInfo that
// the service attaches to every error (RetryInfo too: how long to wait). Deadlines
// and cancellation come from the context passed to each call; a call whose context
// has no deadline gets the client's default: DefaultTimeout (30 s) for unary calls,
// DefaultStreamTimeout (5 minutes) for a whole Complete stream, calls through Stub
// included (WithDefaultTimeout and WithDefaultStreamTimeout change them, 0 turns
// them off).
//
//	client, err := routesvc.Dial("routesvc.internal:443", routesvc.WithAPIKey(key))
//	...
//	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
//	defer cancel()
//	decision, err := client.Route(ctx, &routesvcv1.RouteRequest{Chat: routesvc.UserPrompt("hi")})
package routesvc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"runtime"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	routesvcv1 "github.com/routesvc/routesvc/clients/go/routesvcv1"
)

// ErrorDomain is the ErrorInfo domain of errors raised by routesvc itself.
const ErrorDomain = "routesvc"

// DefaultTimeout is the deadline of a unary call whose context has none, unless
// WithDefaultTimeout says otherwise.
const DefaultTimeout = 30 * time.Second

// DefaultStreamTimeout is the deadline of a Complete stream whose context has none,
// unless WithDefaultStreamTimeout says otherwise. It bounds the whole answer, so it
// is longer than DefaultTimeout: 30 s would cut long answers, paid for, short.
const DefaultStreamTimeout = 5 * time.Minute

// Client is a connection to a routesvc server. It is safe for concurrent use.
type Client struct {
	conn   *grpc.ClientConn
	router routesvcv1.RouterServiceClient
	health healthpb.HealthClient
}

type options struct {
	tls           *tls.Config
	insecure      bool
	apiKey        string
	timeout       time.Duration // 0: none
	streamTimeout time.Duration // 0: none
	dialOpts      []grpc.DialOption
}

// Option configures Dial.
type Option func(*options)

// WithTLS uses TLS with the given configuration (nil means the system roots).
// TLS is the default.
func WithTLS(config *tls.Config) Option {
	return func(o *options) { o.tls, o.insecure = config, false }
}

// WithInsecure uses plaintext, for loopback and tests. An API key is still sent.
func WithInsecure() Option {
	return func(o *options) { o.insecure = true }
}

// WithAPIKey sends key as "authorization: Bearer <key>" on every call.
func WithAPIKey(key string) Option {
	return func(o *options) { o.apiKey = key }
}

// WithDefaultTimeout sets the deadline of every unary call whose context has none
// (DefaultTimeout unless set), calls through Stub included. 0 turns it off: such a
// call has no deadline. Dial refuses a negative d.
func WithDefaultTimeout(d time.Duration) Option {
	return func(o *options) { o.timeout = d }
}

// WithDefaultStreamTimeout sets the deadline of every Complete stream whose context
// has none (DefaultStreamTimeout unless set), calls through Stub included. 0 turns
// it off. Dial refuses a negative d.
func WithDefaultStreamTimeout(d time.Duration) Option {
	return func(o *options) { o.streamTimeout = d }
}

// WithDialOptions passes extra options to grpc.NewClient (interceptors, keepalive, ...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

// Dial creates a client for target ("host:port"). Like grpc.NewClient it does not
// connect until the first call.
func Dial(target string, opts ...Option) (*Client, error) {
	o := options{timeout: DefaultTimeout, streamTimeout: DefaultStreamTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	if o.timeout < 0 {
		return nil, fmt.Errorf("routesvc: WithDefaultTimeout(%v): must be 0 (none) or above", o.timeout)
	}
	if o.streamTimeout < 0 {
		return nil, fmt.Errorf("routesvc: WithDefaultStreamTimeout(%v): must be 0 (none) or above", o.streamTimeout)
	}
	// First in the chain, so that the caller's interceptors see the deadline the call has.
	dialOpts := []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(defaultUnaryDeadline(o.timeout)),
		grpc.WithChainStreamInterceptor(defaultStreamDeadline(o.streamTimeout)),
	}
	if o.insecure {
		dialOpts = append(dialOpts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	} else {
		config := o.tls
		if config == nil {
			config = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		dialOpts = append(dialOpts, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	}
	if o.apiKey != "" {
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(bearer{key: o.apiKey, requireTLS: !o.insecure}))
	}
	conn, err := grpc.NewClient(target, append(dialOpts, o.dialOpts...)...)
	if err != nil {
		return nil, err
	}
	return &Client{
		conn:   conn,
		router: routesvcv1.NewRouterServiceClient(conn),
		health: healthpb.NewHealthClient(conn),
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Stub returns the generated client, for calls the wrapper does not cover.
func (c *Client) Stub() routesvcv1.RouterServiceClient { return c.router }

// Route returns the routing decision for req without calling any model.
func (c *Client) Route(ctx context.Context, req *routesvcv1.RouteRequest, opts ...grpc.CallOption) (*routesvcv1.RouteDecision, error) {
	resp, err := c.router.Route(ctx, req, opts...)
	if err != nil {
		return nil, err
	}
	return resp.GetDecision(), nil
}

// Complete starts a completion. Read it with Recv until io.EOF: first the decision,
// then text deltas, then one Completion. A cascade may send an Escalation before the
// deltas (one per step passed); the deltas that follow are the next model's, or, if it
// failed before any text, the rejected answer's: the Completion's Model says whose.
// To stop early, Close the stream (defer stream.Close() right after Complete) or
// cancel ctx: either cancels the call, and routesvc the provider's request. A stream dropped unclosed is cancelled when the
// garbage collector finds it unreachable, which may be much later: close it.
func (c *Client) Complete(ctx context.Context, req *routesvcv1.CompleteRequest, opts ...grpc.CallOption) (*CompleteStream, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.router.Complete(ctx, req, opts...)
	if err != nil {
		cancel()
		return nil, err
	}
	s := &CompleteStream{stream: stream, cancel: cancel}
	// The cleanup holds cancel, not s, so s can become unreachable.
	runtime.AddCleanup(s, func(cancel context.CancelFunc) { cancel() }, cancel)
	return s, nil
}

// CompleteStream is a started Complete call: Recv its messages until io.EOF (or an
// error), or Close it to stop early. It is a grpc.ServerStreamingClient; the gRPC
// stream inside is not exposed, since the call is cancelled once the CompleteStream
// is unreachable: keep the CompleteStream while reading.
type CompleteStream struct {
	stream grpc.ServerStreamingClient[routesvcv1.CompleteResponse]
	cancel context.CancelFunc
}

var _ grpc.ServerStreamingClient[routesvcv1.CompleteResponse] = (*CompleteStream)(nil)

// Recv returns the next message; io.EOF after the last one. Once it has returned an
// error (io.EOF included) the call has ended and its resources are released.
func (s *CompleteStream) Recv() (*routesvcv1.CompleteResponse, error) {
	msg, err := s.stream.Recv()
	if err != nil {
		s.cancel()
	}
	return msg, err
}

// RecvMsg receives the next message into m (a *routesvcv1.CompleteResponse), as Recv.
func (s *CompleteStream) RecvMsg(m any) error {
	err := s.stream.RecvMsg(m)
	if err != nil {
		s.cancel()
	}
	return err
}

// Header returns the call's initial metadata, waiting for it if need be.
func (s *CompleteStream) Header() (metadata.MD, error) { return s.stream.Header() }

// Trailer returns the call's trailing metadata, once Recv has returned an error.
func (s *CompleteStream) Trailer() metadata.MD { return s.stream.Trailer() }

// Context returns the call's context.
func (s *CompleteStream) Context() context.Context { return s.stream.Context() }

// CloseSend closes the sending side (the request was already sent whole: a no-op in effect).
func (s *CompleteStream) CloseSend() error { return s.stream.CloseSend() }

// SendMsg is part of grpc.ClientStream; Complete's one request was already sent.
func (s *CompleteStream) SendMsg(m any) error { return s.stream.SendMsg(m) }

// Close cancels the call if it is still running (Recv then returns CANCELLED); a
// no-op once it has ended. It always returns nil.
func (s *CompleteStream) Close() error {
	s.cancel()
	return nil
}

// ListModels returns the model catalog.
func (c *Client) ListModels(ctx context.Context, opts ...grpc.CallOption) ([]*routesvcv1.ModelInfo, error) {
	resp, err := c.router.ListModels(ctx, &routesvcv1.ListModelsRequest{}, opts...)
	if err != nil {
		return nil, err
	}
	return resp.GetModels(), nil
}

// Healthy reports the server's grpc.health.v1 status for RouterService.
func (c *Client) Healthy(ctx context.Context) (healthpb.HealthCheckResponse_ServingStatus, error) {
	resp, err := c.health.Check(ctx, &healthpb.HealthCheckRequest{Service: routesvcv1.RouterService_ServiceDesc.ServiceName})
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN, err
	}
	return resp.GetStatus(), nil
}

// UserPrompt is a ChatRequest with one user message.
func UserPrompt(prompt string) *routesvcv1.ChatRequest {
	return &routesvcv1.ChatRequest{Messages: []*routesvcv1.Message{{Role: routesvcv1.Role_ROLE_USER, Content: prompt}}}
}

// ErrorInfo returns the google.rpc.ErrorInfo that routesvc attached to err, or nil
// when err is not a gRPC status from routesvc. Switch on its Reason
// ("INVALID_REQUEST", "MODEL_NOT_FOUND", ...).
func ErrorInfo(err error) *errdetails.ErrorInfo {
	var withStatus interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &withStatus) {
		return nil
	}
	for _, detail := range withStatus.GRPCStatus().Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.GetDomain() == ErrorDomain {
			return info
		}
	}
	return nil
}

// RetryInfo returns the google.rpc.RetryInfo of err, or nil when it has none: how
// long to wait before trying again (GetRetryDelay().AsDuration()), on
// RESOURCE_EXHAUSTED (RATE_LIMITED, OVERLOADED, ...) and some UNAVAILABLE errors.
func RetryInfo(err error) *errdetails.RetryInfo {
	var withStatus interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &withStatus) {
		return nil
	}
	for _, detail := range withStatus.GRPCStatus().Details() {
		if info, ok := detail.(*errdetails.RetryInfo); ok {
			return info
		}
	}
	return nil
}

// defaultUnaryDeadline gives a unary call whose context has no deadline one of d
// from now (none when d is 0).
func defaultUnaryDeadline(d time.Duration) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if _, ok := ctx.Deadline(); ok || d == 0 {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		ctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

// defaultStreamDeadline gives a stream whose context has no deadline one of d from
// now (none when d is 0); its timer is released when the stream ends.
func defaultStreamDeadline(d time.Duration) grpc.StreamClientInterceptor {
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		if _, ok := ctx.Deadline(); ok || d == 0 {
			return streamer(ctx, desc, cc, method, opts...)
		}
		ctx, cancel := context.WithTimeout(ctx, d)
		stream, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			cancel()
			return nil, err
		}
		s := &deadlineStream{ClientStream: stream, cancel: cancel}
		runtime.AddCleanup(s, func(cancel context.CancelFunc) { cancel() }, cancel)
		return s, nil
	}
}

// deadlineStream releases its deadline's timer once the stream has ended (RecvMsg
// returned io.EOF or the call's error). A stream dropped unread is cancelled when the
// garbage collector finds it unreachable, else at its deadline.
type deadlineStream struct {
	grpc.ClientStream
	cancel context.CancelFunc
}

func (s *deadlineStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil {
		s.cancel()
	}
	return err
}

// bearer sends the API key on every call; it refuses plaintext unless the caller
// chose WithInsecure.
type bearer struct {
	key        string
	requireTLS bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.key}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.requireTLS }
