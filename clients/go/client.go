// Package routesvc is a small Go client for the routesvc RouterService.
//
// It wraps the generated stubs in routesvcv1 with what every caller needs: a
// connection with TLS (or plaintext for loopback), an API key sent as
// "authorization: Bearer" metadata, and access to the google.rpc.ErrorInfo that
// the service attaches to every error. Deadlines and cancellation come from the
// context passed to each call.
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

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	routesvcv1 "github.com/routesvc/routesvc/clients/go/routesvcv1"
)

// ErrorDomain is the ErrorInfo domain of errors raised by routesvc itself.
const ErrorDomain = "routesvc"

// Client is a connection to a routesvc server. It is safe for concurrent use.
type Client struct {
	conn   *grpc.ClientConn
	router routesvcv1.RouterServiceClient
	health healthpb.HealthClient
}

type options struct {
	tls      *tls.Config
	insecure bool
	apiKey   string
	dialOpts []grpc.DialOption
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

// WithDialOptions passes extra options to grpc.NewClient (interceptors, keepalive, ...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

// Dial creates a client for target ("host:port"). Like grpc.NewClient it does not
// connect until the first call.
func Dial(target string, opts ...Option) (*Client, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	dialOpts := []grpc.DialOption{}
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
// then text deltas, then one Completion. Cancel ctx to stop early.
func (c *Client) Complete(ctx context.Context, req *routesvcv1.CompleteRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[routesvcv1.CompleteResponse], error) {
	return c.router.Complete(ctx, req, opts...)
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
