package dev.routesvc.v1;

import static io.grpc.MethodDescriptor.generateFullMethodName;

/**
 * <pre>
 * RouterService routes chat requests to the cheapest model that can serve them.
 * </pre>
 */
@io.grpc.stub.annotations.GrpcGenerated
public final class RouterServiceGrpc {

  private RouterServiceGrpc() {}

  public static final java.lang.String SERVICE_NAME = "routesvc.v1.RouterService";

  // Static method descriptors that strictly reflect the proto.
  private static volatile io.grpc.MethodDescriptor<dev.routesvc.v1.RouteRequest,
      dev.routesvc.v1.RouteResponse> getRouteMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "Route",
      requestType = dev.routesvc.v1.RouteRequest.class,
      responseType = dev.routesvc.v1.RouteResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<dev.routesvc.v1.RouteRequest,
      dev.routesvc.v1.RouteResponse> getRouteMethod() {
    io.grpc.MethodDescriptor<dev.routesvc.v1.RouteRequest, dev.routesvc.v1.RouteResponse> getRouteMethod;
    if ((getRouteMethod = RouterServiceGrpc.getRouteMethod) == null) {
      synchronized (RouterServiceGrpc.class) {
        if ((getRouteMethod = RouterServiceGrpc.getRouteMethod) == null) {
          RouterServiceGrpc.getRouteMethod = getRouteMethod =
              io.grpc.MethodDescriptor.<dev.routesvc.v1.RouteRequest, dev.routesvc.v1.RouteResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "Route"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.RouteRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.RouteResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RouterServiceMethodDescriptorSupplier("Route"))
              .build();
        }
      }
    }
    return getRouteMethod;
  }

  private static volatile io.grpc.MethodDescriptor<dev.routesvc.v1.CompleteRequest,
      dev.routesvc.v1.CompleteResponse> getCompleteMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "Complete",
      requestType = dev.routesvc.v1.CompleteRequest.class,
      responseType = dev.routesvc.v1.CompleteResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.SERVER_STREAMING)
  public static io.grpc.MethodDescriptor<dev.routesvc.v1.CompleteRequest,
      dev.routesvc.v1.CompleteResponse> getCompleteMethod() {
    io.grpc.MethodDescriptor<dev.routesvc.v1.CompleteRequest, dev.routesvc.v1.CompleteResponse> getCompleteMethod;
    if ((getCompleteMethod = RouterServiceGrpc.getCompleteMethod) == null) {
      synchronized (RouterServiceGrpc.class) {
        if ((getCompleteMethod = RouterServiceGrpc.getCompleteMethod) == null) {
          RouterServiceGrpc.getCompleteMethod = getCompleteMethod =
              io.grpc.MethodDescriptor.<dev.routesvc.v1.CompleteRequest, dev.routesvc.v1.CompleteResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.SERVER_STREAMING)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "Complete"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.CompleteRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.CompleteResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RouterServiceMethodDescriptorSupplier("Complete"))
              .build();
        }
      }
    }
    return getCompleteMethod;
  }

  private static volatile io.grpc.MethodDescriptor<dev.routesvc.v1.ListModelsRequest,
      dev.routesvc.v1.ListModelsResponse> getListModelsMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "ListModels",
      requestType = dev.routesvc.v1.ListModelsRequest.class,
      responseType = dev.routesvc.v1.ListModelsResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<dev.routesvc.v1.ListModelsRequest,
      dev.routesvc.v1.ListModelsResponse> getListModelsMethod() {
    io.grpc.MethodDescriptor<dev.routesvc.v1.ListModelsRequest, dev.routesvc.v1.ListModelsResponse> getListModelsMethod;
    if ((getListModelsMethod = RouterServiceGrpc.getListModelsMethod) == null) {
      synchronized (RouterServiceGrpc.class) {
        if ((getListModelsMethod = RouterServiceGrpc.getListModelsMethod) == null) {
          RouterServiceGrpc.getListModelsMethod = getListModelsMethod =
              io.grpc.MethodDescriptor.<dev.routesvc.v1.ListModelsRequest, dev.routesvc.v1.ListModelsResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "ListModels"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.ListModelsRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.ListModelsResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RouterServiceMethodDescriptorSupplier("ListModels"))
              .build();
        }
      }
    }
    return getListModelsMethod;
  }

  private static volatile io.grpc.MethodDescriptor<dev.routesvc.v1.GetStatsRequest,
      dev.routesvc.v1.GetStatsResponse> getGetStatsMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "GetStats",
      requestType = dev.routesvc.v1.GetStatsRequest.class,
      responseType = dev.routesvc.v1.GetStatsResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<dev.routesvc.v1.GetStatsRequest,
      dev.routesvc.v1.GetStatsResponse> getGetStatsMethod() {
    io.grpc.MethodDescriptor<dev.routesvc.v1.GetStatsRequest, dev.routesvc.v1.GetStatsResponse> getGetStatsMethod;
    if ((getGetStatsMethod = RouterServiceGrpc.getGetStatsMethod) == null) {
      synchronized (RouterServiceGrpc.class) {
        if ((getGetStatsMethod = RouterServiceGrpc.getGetStatsMethod) == null) {
          RouterServiceGrpc.getGetStatsMethod = getGetStatsMethod =
              io.grpc.MethodDescriptor.<dev.routesvc.v1.GetStatsRequest, dev.routesvc.v1.GetStatsResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "GetStats"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.GetStatsRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.GetStatsResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RouterServiceMethodDescriptorSupplier("GetStats"))
              .build();
        }
      }
    }
    return getGetStatsMethod;
  }

  private static volatile io.grpc.MethodDescriptor<dev.routesvc.v1.GetBatchRequest,
      dev.routesvc.v1.GetBatchResponse> getGetBatchMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "GetBatch",
      requestType = dev.routesvc.v1.GetBatchRequest.class,
      responseType = dev.routesvc.v1.GetBatchResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<dev.routesvc.v1.GetBatchRequest,
      dev.routesvc.v1.GetBatchResponse> getGetBatchMethod() {
    io.grpc.MethodDescriptor<dev.routesvc.v1.GetBatchRequest, dev.routesvc.v1.GetBatchResponse> getGetBatchMethod;
    if ((getGetBatchMethod = RouterServiceGrpc.getGetBatchMethod) == null) {
      synchronized (RouterServiceGrpc.class) {
        if ((getGetBatchMethod = RouterServiceGrpc.getGetBatchMethod) == null) {
          RouterServiceGrpc.getGetBatchMethod = getGetBatchMethod =
              io.grpc.MethodDescriptor.<dev.routesvc.v1.GetBatchRequest, dev.routesvc.v1.GetBatchResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "GetBatch"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.GetBatchRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.GetBatchResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RouterServiceMethodDescriptorSupplier("GetBatch"))
              .build();
        }
      }
    }
    return getGetBatchMethod;
  }

  private static volatile io.grpc.MethodDescriptor<dev.routesvc.v1.CancelBatchRequest,
      dev.routesvc.v1.CancelBatchResponse> getCancelBatchMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "CancelBatch",
      requestType = dev.routesvc.v1.CancelBatchRequest.class,
      responseType = dev.routesvc.v1.CancelBatchResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<dev.routesvc.v1.CancelBatchRequest,
      dev.routesvc.v1.CancelBatchResponse> getCancelBatchMethod() {
    io.grpc.MethodDescriptor<dev.routesvc.v1.CancelBatchRequest, dev.routesvc.v1.CancelBatchResponse> getCancelBatchMethod;
    if ((getCancelBatchMethod = RouterServiceGrpc.getCancelBatchMethod) == null) {
      synchronized (RouterServiceGrpc.class) {
        if ((getCancelBatchMethod = RouterServiceGrpc.getCancelBatchMethod) == null) {
          RouterServiceGrpc.getCancelBatchMethod = getCancelBatchMethod =
              io.grpc.MethodDescriptor.<dev.routesvc.v1.CancelBatchRequest, dev.routesvc.v1.CancelBatchResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "CancelBatch"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.CancelBatchRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.CancelBatchResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RouterServiceMethodDescriptorSupplier("CancelBatch"))
              .build();
        }
      }
    }
    return getCancelBatchMethod;
  }

  private static volatile io.grpc.MethodDescriptor<dev.routesvc.v1.FeedbackRequest,
      dev.routesvc.v1.FeedbackResponse> getFeedbackMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "Feedback",
      requestType = dev.routesvc.v1.FeedbackRequest.class,
      responseType = dev.routesvc.v1.FeedbackResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<dev.routesvc.v1.FeedbackRequest,
      dev.routesvc.v1.FeedbackResponse> getFeedbackMethod() {
    io.grpc.MethodDescriptor<dev.routesvc.v1.FeedbackRequest, dev.routesvc.v1.FeedbackResponse> getFeedbackMethod;
    if ((getFeedbackMethod = RouterServiceGrpc.getFeedbackMethod) == null) {
      synchronized (RouterServiceGrpc.class) {
        if ((getFeedbackMethod = RouterServiceGrpc.getFeedbackMethod) == null) {
          RouterServiceGrpc.getFeedbackMethod = getFeedbackMethod =
              io.grpc.MethodDescriptor.<dev.routesvc.v1.FeedbackRequest, dev.routesvc.v1.FeedbackResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "Feedback"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.FeedbackRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  dev.routesvc.v1.FeedbackResponse.getDefaultInstance()))
              .setSchemaDescriptor(new RouterServiceMethodDescriptorSupplier("Feedback"))
              .build();
        }
      }
    }
    return getFeedbackMethod;
  }

  /**
   * Creates a new async stub that supports all call types for the service
   */
  public static RouterServiceStub newStub(io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<RouterServiceStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<RouterServiceStub>() {
        @java.lang.Override
        public RouterServiceStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new RouterServiceStub(channel, callOptions);
        }
      };
    return RouterServiceStub.newStub(factory, channel);
  }

  /**
   * Creates a new blocking-style stub that supports all types of calls on the service
   */
  public static RouterServiceBlockingV2Stub newBlockingV2Stub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<RouterServiceBlockingV2Stub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<RouterServiceBlockingV2Stub>() {
        @java.lang.Override
        public RouterServiceBlockingV2Stub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new RouterServiceBlockingV2Stub(channel, callOptions);
        }
      };
    return RouterServiceBlockingV2Stub.newStub(factory, channel);
  }

  /**
   * Creates a new blocking-style stub that supports unary and streaming output calls on the service
   */
  public static RouterServiceBlockingStub newBlockingStub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<RouterServiceBlockingStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<RouterServiceBlockingStub>() {
        @java.lang.Override
        public RouterServiceBlockingStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new RouterServiceBlockingStub(channel, callOptions);
        }
      };
    return RouterServiceBlockingStub.newStub(factory, channel);
  }

  /**
   * Creates a new ListenableFuture-style stub that supports unary calls on the service
   */
  public static RouterServiceFutureStub newFutureStub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<RouterServiceFutureStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<RouterServiceFutureStub>() {
        @java.lang.Override
        public RouterServiceFutureStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new RouterServiceFutureStub(channel, callOptions);
        }
      };
    return RouterServiceFutureStub.newStub(factory, channel);
  }

  /**
   * <pre>
   * RouterService routes chat requests to the cheapest model that can serve them.
   * </pre>
   */
  public interface AsyncService {

    /**
     * <pre>
     * Route decides which model would serve the request, why, and at what estimated
     * cost, without calling any provider.
     * </pre>
     */
    default void route(dev.routesvc.v1.RouteRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.RouteResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getRouteMethod(), responseObserver);
    }

    /**
     * <pre>
     * Complete decides, calls the chosen model and streams its answer: first the
     * decision, then text deltas, then one final message with usage, exact cost and any
     * tool calls the model made.
     * Cascade (decision.cascade_models has two or more models): the cheap model's answer
     * is buffered while it is scored and is never sent unless accepted. An accepted
     * answer streams as deltas then the completion; a rejected one is announced by one
     * Escalation message, after which the next model's answer streams (or is buffered
     * and scored in turn). The completion lists every attempt and sums their cost.
     * Batch (decision.mode is MODE_BATCH): the stream is the decision then one
     * BatchJob message and ends; the answer is fetched later with GetBatch.
     * </pre>
     */
    default void complete(dev.routesvc.v1.CompleteRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.CompleteResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getCompleteMethod(), responseObserver);
    }

    /**
     * <pre>
     * ListModels returns the model catalog with prices, limits, capabilities and
     * whether each model can be used: its provider has credentials configured and, for
     * a caller authenticated as a tenant with allowed_models, the model is on that list.
     * </pre>
     */
    default void listModels(dev.routesvc.v1.ListModelsRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.ListModelsResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getListModelsMethod(), responseObserver);
    }

    /**
     * <pre>
     * GetStats reports routing effectiveness over a recent window: requests and share
     * per model, cost against the baseline model, savings, escalations, fallbacks,
     * cascade releases, latency and time to first token, overall and per tenant.
     * </pre>
     */
    default void getStats(dev.routesvc.v1.GetStatsRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.GetStatsResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getGetStatsMethod(), responseObserver);
    }

    /**
     * <pre>
     * GetBatch reports a batch job's state and, once it succeeded, its answer, usage and
     * cost at the batch price. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    default void getBatch(dev.routesvc.v1.GetBatchRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.GetBatchResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getGetBatchMethod(), responseObserver);
    }

    /**
     * <pre>
     * CancelBatch cancels a batch job that has not ended and returns its state; a job that
     * already ended is returned unchanged. Nothing is charged for it unless the provider had
     * already answered it (and bills it): a job cancelled after it was sent is charged that
     * bill once its provider batch ends. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    default void cancelBatch(dev.routesvc.v1.CancelBatchRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.CancelBatchResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getCancelBatchMethod(), responseObserver);
    }

    /**
     * <pre>
     * Feedback records how good the answer of an earlier decision was. The embedding
     * router learns from it (its example library grows, persisted in SQLite) and GetStats
     * reports it per model. An unknown decision is NOT_FOUND; without an embedding stage
     * with a feedback store the call is FAILED_PRECONDITION.
     * </pre>
     */
    default void feedback(dev.routesvc.v1.FeedbackRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.FeedbackResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getFeedbackMethod(), responseObserver);
    }
  }

  /**
   * Base class for the server implementation of the service RouterService.
   * <pre>
   * RouterService routes chat requests to the cheapest model that can serve them.
   * </pre>
   */
  public static abstract class RouterServiceImplBase
      implements io.grpc.BindableService, AsyncService {

    @java.lang.Override public final io.grpc.ServerServiceDefinition bindService() {
      return RouterServiceGrpc.bindService(this);
    }
  }

  /**
   * A stub to allow clients to do asynchronous rpc calls to service RouterService.
   * <pre>
   * RouterService routes chat requests to the cheapest model that can serve them.
   * </pre>
   */
  public static final class RouterServiceStub
      extends io.grpc.stub.AbstractAsyncStub<RouterServiceStub> {
    private RouterServiceStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected RouterServiceStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new RouterServiceStub(channel, callOptions);
    }

    /**
     * <pre>
     * Route decides which model would serve the request, why, and at what estimated
     * cost, without calling any provider.
     * </pre>
     */
    public void route(dev.routesvc.v1.RouteRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.RouteResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getRouteMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * Complete decides, calls the chosen model and streams its answer: first the
     * decision, then text deltas, then one final message with usage, exact cost and any
     * tool calls the model made.
     * Cascade (decision.cascade_models has two or more models): the cheap model's answer
     * is buffered while it is scored and is never sent unless accepted. An accepted
     * answer streams as deltas then the completion; a rejected one is announced by one
     * Escalation message, after which the next model's answer streams (or is buffered
     * and scored in turn). The completion lists every attempt and sums their cost.
     * Batch (decision.mode is MODE_BATCH): the stream is the decision then one
     * BatchJob message and ends; the answer is fetched later with GetBatch.
     * </pre>
     */
    public void complete(dev.routesvc.v1.CompleteRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.CompleteResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncServerStreamingCall(
          getChannel().newCall(getCompleteMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * ListModels returns the model catalog with prices, limits, capabilities and
     * whether each model can be used: its provider has credentials configured and, for
     * a caller authenticated as a tenant with allowed_models, the model is on that list.
     * </pre>
     */
    public void listModels(dev.routesvc.v1.ListModelsRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.ListModelsResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getListModelsMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * GetStats reports routing effectiveness over a recent window: requests and share
     * per model, cost against the baseline model, savings, escalations, fallbacks,
     * cascade releases, latency and time to first token, overall and per tenant.
     * </pre>
     */
    public void getStats(dev.routesvc.v1.GetStatsRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.GetStatsResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getGetStatsMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * GetBatch reports a batch job's state and, once it succeeded, its answer, usage and
     * cost at the batch price. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    public void getBatch(dev.routesvc.v1.GetBatchRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.GetBatchResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getGetBatchMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * CancelBatch cancels a batch job that has not ended and returns its state; a job that
     * already ended is returned unchanged. Nothing is charged for it unless the provider had
     * already answered it (and bills it): a job cancelled after it was sent is charged that
     * bill once its provider batch ends. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    public void cancelBatch(dev.routesvc.v1.CancelBatchRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.CancelBatchResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getCancelBatchMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * Feedback records how good the answer of an earlier decision was. The embedding
     * router learns from it (its example library grows, persisted in SQLite) and GetStats
     * reports it per model. An unknown decision is NOT_FOUND; without an embedding stage
     * with a feedback store the call is FAILED_PRECONDITION.
     * </pre>
     */
    public void feedback(dev.routesvc.v1.FeedbackRequest request,
        io.grpc.stub.StreamObserver<dev.routesvc.v1.FeedbackResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getFeedbackMethod(), getCallOptions()), request, responseObserver);
    }
  }

  /**
   * A stub to allow clients to do synchronous rpc calls to service RouterService.
   * <pre>
   * RouterService routes chat requests to the cheapest model that can serve them.
   * </pre>
   */
  public static final class RouterServiceBlockingV2Stub
      extends io.grpc.stub.AbstractBlockingStub<RouterServiceBlockingV2Stub> {
    private RouterServiceBlockingV2Stub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected RouterServiceBlockingV2Stub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new RouterServiceBlockingV2Stub(channel, callOptions);
    }

    /**
     * <pre>
     * Route decides which model would serve the request, why, and at what estimated
     * cost, without calling any provider.
     * </pre>
     */
    public dev.routesvc.v1.RouteResponse route(dev.routesvc.v1.RouteRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getRouteMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * Complete decides, calls the chosen model and streams its answer: first the
     * decision, then text deltas, then one final message with usage, exact cost and any
     * tool calls the model made.
     * Cascade (decision.cascade_models has two or more models): the cheap model's answer
     * is buffered while it is scored and is never sent unless accepted. An accepted
     * answer streams as deltas then the completion; a rejected one is announced by one
     * Escalation message, after which the next model's answer streams (or is buffered
     * and scored in turn). The completion lists every attempt and sums their cost.
     * Batch (decision.mode is MODE_BATCH): the stream is the decision then one
     * BatchJob message and ends; the answer is fetched later with GetBatch.
     * </pre>
     */
    @io.grpc.ExperimentalApi("https://github.com/grpc/grpc-java/issues/10918")
    public io.grpc.stub.BlockingClientCall<?, dev.routesvc.v1.CompleteResponse>
        complete(dev.routesvc.v1.CompleteRequest request) {
      return io.grpc.stub.ClientCalls.blockingV2ServerStreamingCall(
          getChannel(), getCompleteMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * ListModels returns the model catalog with prices, limits, capabilities and
     * whether each model can be used: its provider has credentials configured and, for
     * a caller authenticated as a tenant with allowed_models, the model is on that list.
     * </pre>
     */
    public dev.routesvc.v1.ListModelsResponse listModels(dev.routesvc.v1.ListModelsRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getListModelsMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * GetStats reports routing effectiveness over a recent window: requests and share
     * per model, cost against the baseline model, savings, escalations, fallbacks,
     * cascade releases, latency and time to first token, overall and per tenant.
     * </pre>
     */
    public dev.routesvc.v1.GetStatsResponse getStats(dev.routesvc.v1.GetStatsRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getGetStatsMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * GetBatch reports a batch job's state and, once it succeeded, its answer, usage and
     * cost at the batch price. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    public dev.routesvc.v1.GetBatchResponse getBatch(dev.routesvc.v1.GetBatchRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getGetBatchMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * CancelBatch cancels a batch job that has not ended and returns its state; a job that
     * already ended is returned unchanged. Nothing is charged for it unless the provider had
     * already answered it (and bills it): a job cancelled after it was sent is charged that
     * bill once its provider batch ends. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    public dev.routesvc.v1.CancelBatchResponse cancelBatch(dev.routesvc.v1.CancelBatchRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getCancelBatchMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * Feedback records how good the answer of an earlier decision was. The embedding
     * router learns from it (its example library grows, persisted in SQLite) and GetStats
     * reports it per model. An unknown decision is NOT_FOUND; without an embedding stage
     * with a feedback store the call is FAILED_PRECONDITION.
     * </pre>
     */
    public dev.routesvc.v1.FeedbackResponse feedback(dev.routesvc.v1.FeedbackRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getFeedbackMethod(), getCallOptions(), request);
    }
  }

  /**
   * A stub to allow clients to do limited synchronous rpc calls to service RouterService.
   * <pre>
   * RouterService routes chat requests to the cheapest model that can serve them.
   * </pre>
   */
  public static final class RouterServiceBlockingStub
      extends io.grpc.stub.AbstractBlockingStub<RouterServiceBlockingStub> {
    private RouterServiceBlockingStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected RouterServiceBlockingStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new RouterServiceBlockingStub(channel, callOptions);
    }

    /**
     * <pre>
     * Route decides which model would serve the request, why, and at what estimated
     * cost, without calling any provider.
     * </pre>
     */
    public dev.routesvc.v1.RouteResponse route(dev.routesvc.v1.RouteRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getRouteMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * Complete decides, calls the chosen model and streams its answer: first the
     * decision, then text deltas, then one final message with usage, exact cost and any
     * tool calls the model made.
     * Cascade (decision.cascade_models has two or more models): the cheap model's answer
     * is buffered while it is scored and is never sent unless accepted. An accepted
     * answer streams as deltas then the completion; a rejected one is announced by one
     * Escalation message, after which the next model's answer streams (or is buffered
     * and scored in turn). The completion lists every attempt and sums their cost.
     * Batch (decision.mode is MODE_BATCH): the stream is the decision then one
     * BatchJob message and ends; the answer is fetched later with GetBatch.
     * </pre>
     */
    public java.util.Iterator<dev.routesvc.v1.CompleteResponse> complete(
        dev.routesvc.v1.CompleteRequest request) {
      return io.grpc.stub.ClientCalls.blockingServerStreamingCall(
          getChannel(), getCompleteMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * ListModels returns the model catalog with prices, limits, capabilities and
     * whether each model can be used: its provider has credentials configured and, for
     * a caller authenticated as a tenant with allowed_models, the model is on that list.
     * </pre>
     */
    public dev.routesvc.v1.ListModelsResponse listModels(dev.routesvc.v1.ListModelsRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getListModelsMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * GetStats reports routing effectiveness over a recent window: requests and share
     * per model, cost against the baseline model, savings, escalations, fallbacks,
     * cascade releases, latency and time to first token, overall and per tenant.
     * </pre>
     */
    public dev.routesvc.v1.GetStatsResponse getStats(dev.routesvc.v1.GetStatsRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getGetStatsMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * GetBatch reports a batch job's state and, once it succeeded, its answer, usage and
     * cost at the batch price. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    public dev.routesvc.v1.GetBatchResponse getBatch(dev.routesvc.v1.GetBatchRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getGetBatchMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * CancelBatch cancels a batch job that has not ended and returns its state; a job that
     * already ended is returned unchanged. Nothing is charged for it unless the provider had
     * already answered it (and bills it): a job cancelled after it was sent is charged that
     * bill once its provider batch ends. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    public dev.routesvc.v1.CancelBatchResponse cancelBatch(dev.routesvc.v1.CancelBatchRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getCancelBatchMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * Feedback records how good the answer of an earlier decision was. The embedding
     * router learns from it (its example library grows, persisted in SQLite) and GetStats
     * reports it per model. An unknown decision is NOT_FOUND; without an embedding stage
     * with a feedback store the call is FAILED_PRECONDITION.
     * </pre>
     */
    public dev.routesvc.v1.FeedbackResponse feedback(dev.routesvc.v1.FeedbackRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getFeedbackMethod(), getCallOptions(), request);
    }
  }

  /**
   * A stub to allow clients to do ListenableFuture-style rpc calls to service RouterService.
   * <pre>
   * RouterService routes chat requests to the cheapest model that can serve them.
   * </pre>
   */
  public static final class RouterServiceFutureStub
      extends io.grpc.stub.AbstractFutureStub<RouterServiceFutureStub> {
    private RouterServiceFutureStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected RouterServiceFutureStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new RouterServiceFutureStub(channel, callOptions);
    }

    /**
     * <pre>
     * Route decides which model would serve the request, why, and at what estimated
     * cost, without calling any provider.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<dev.routesvc.v1.RouteResponse> route(
        dev.routesvc.v1.RouteRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getRouteMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * ListModels returns the model catalog with prices, limits, capabilities and
     * whether each model can be used: its provider has credentials configured and, for
     * a caller authenticated as a tenant with allowed_models, the model is on that list.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<dev.routesvc.v1.ListModelsResponse> listModels(
        dev.routesvc.v1.ListModelsRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getListModelsMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * GetStats reports routing effectiveness over a recent window: requests and share
     * per model, cost against the baseline model, savings, escalations, fallbacks,
     * cascade releases, latency and time to first token, overall and per tenant.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<dev.routesvc.v1.GetStatsResponse> getStats(
        dev.routesvc.v1.GetStatsRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getGetStatsMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * GetBatch reports a batch job's state and, once it succeeded, its answer, usage and
     * cost at the batch price. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<dev.routesvc.v1.GetBatchResponse> getBatch(
        dev.routesvc.v1.GetBatchRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getGetBatchMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * CancelBatch cancels a batch job that has not ended and returns its state; a job that
     * already ended is returned unchanged. Nothing is charged for it unless the provider had
     * already answered it (and bills it): a job cancelled after it was sent is charged that
     * bill once its provider batch ends. An unknown job, or another tenant's, is NOT_FOUND.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<dev.routesvc.v1.CancelBatchResponse> cancelBatch(
        dev.routesvc.v1.CancelBatchRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getCancelBatchMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * Feedback records how good the answer of an earlier decision was. The embedding
     * router learns from it (its example library grows, persisted in SQLite) and GetStats
     * reports it per model. An unknown decision is NOT_FOUND; without an embedding stage
     * with a feedback store the call is FAILED_PRECONDITION.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<dev.routesvc.v1.FeedbackResponse> feedback(
        dev.routesvc.v1.FeedbackRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getFeedbackMethod(), getCallOptions()), request);
    }
  }

  private static final int METHODID_ROUTE = 0;
  private static final int METHODID_COMPLETE = 1;
  private static final int METHODID_LIST_MODELS = 2;
  private static final int METHODID_GET_STATS = 3;
  private static final int METHODID_GET_BATCH = 4;
  private static final int METHODID_CANCEL_BATCH = 5;
  private static final int METHODID_FEEDBACK = 6;

  private static final class MethodHandlers<Req, Resp> implements
      io.grpc.stub.ServerCalls.UnaryMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.ServerStreamingMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.ClientStreamingMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.BidiStreamingMethod<Req, Resp> {
    private final AsyncService serviceImpl;
    private final int methodId;

    MethodHandlers(AsyncService serviceImpl, int methodId) {
      this.serviceImpl = serviceImpl;
      this.methodId = methodId;
    }

    @java.lang.Override
    @java.lang.SuppressWarnings("unchecked")
    public void invoke(Req request, io.grpc.stub.StreamObserver<Resp> responseObserver) {
      switch (methodId) {
        case METHODID_ROUTE:
          serviceImpl.route((dev.routesvc.v1.RouteRequest) request,
              (io.grpc.stub.StreamObserver<dev.routesvc.v1.RouteResponse>) responseObserver);
          break;
        case METHODID_COMPLETE:
          serviceImpl.complete((dev.routesvc.v1.CompleteRequest) request,
              (io.grpc.stub.StreamObserver<dev.routesvc.v1.CompleteResponse>) responseObserver);
          break;
        case METHODID_LIST_MODELS:
          serviceImpl.listModels((dev.routesvc.v1.ListModelsRequest) request,
              (io.grpc.stub.StreamObserver<dev.routesvc.v1.ListModelsResponse>) responseObserver);
          break;
        case METHODID_GET_STATS:
          serviceImpl.getStats((dev.routesvc.v1.GetStatsRequest) request,
              (io.grpc.stub.StreamObserver<dev.routesvc.v1.GetStatsResponse>) responseObserver);
          break;
        case METHODID_GET_BATCH:
          serviceImpl.getBatch((dev.routesvc.v1.GetBatchRequest) request,
              (io.grpc.stub.StreamObserver<dev.routesvc.v1.GetBatchResponse>) responseObserver);
          break;
        case METHODID_CANCEL_BATCH:
          serviceImpl.cancelBatch((dev.routesvc.v1.CancelBatchRequest) request,
              (io.grpc.stub.StreamObserver<dev.routesvc.v1.CancelBatchResponse>) responseObserver);
          break;
        case METHODID_FEEDBACK:
          serviceImpl.feedback((dev.routesvc.v1.FeedbackRequest) request,
              (io.grpc.stub.StreamObserver<dev.routesvc.v1.FeedbackResponse>) responseObserver);
          break;
        default:
          throw new AssertionError();
      }
    }

    @java.lang.Override
    @java.lang.SuppressWarnings("unchecked")
    public io.grpc.stub.StreamObserver<Req> invoke(
        io.grpc.stub.StreamObserver<Resp> responseObserver) {
      switch (methodId) {
        default:
          throw new AssertionError();
      }
    }
  }

  public static final io.grpc.ServerServiceDefinition bindService(AsyncService service) {
    return io.grpc.ServerServiceDefinition.builder(getServiceDescriptor())
        .addMethod(
          getRouteMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              dev.routesvc.v1.RouteRequest,
              dev.routesvc.v1.RouteResponse>(
                service, METHODID_ROUTE)))
        .addMethod(
          getCompleteMethod(),
          io.grpc.stub.ServerCalls.asyncServerStreamingCall(
            new MethodHandlers<
              dev.routesvc.v1.CompleteRequest,
              dev.routesvc.v1.CompleteResponse>(
                service, METHODID_COMPLETE)))
        .addMethod(
          getListModelsMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              dev.routesvc.v1.ListModelsRequest,
              dev.routesvc.v1.ListModelsResponse>(
                service, METHODID_LIST_MODELS)))
        .addMethod(
          getGetStatsMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              dev.routesvc.v1.GetStatsRequest,
              dev.routesvc.v1.GetStatsResponse>(
                service, METHODID_GET_STATS)))
        .addMethod(
          getGetBatchMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              dev.routesvc.v1.GetBatchRequest,
              dev.routesvc.v1.GetBatchResponse>(
                service, METHODID_GET_BATCH)))
        .addMethod(
          getCancelBatchMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              dev.routesvc.v1.CancelBatchRequest,
              dev.routesvc.v1.CancelBatchResponse>(
                service, METHODID_CANCEL_BATCH)))
        .addMethod(
          getFeedbackMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              dev.routesvc.v1.FeedbackRequest,
              dev.routesvc.v1.FeedbackResponse>(
                service, METHODID_FEEDBACK)))
        .build();
  }

  private static abstract class RouterServiceBaseDescriptorSupplier
      implements io.grpc.protobuf.ProtoFileDescriptorSupplier, io.grpc.protobuf.ProtoServiceDescriptorSupplier {
    RouterServiceBaseDescriptorSupplier() {}

    @java.lang.Override
    public com.google.protobuf.Descriptors.FileDescriptor getFileDescriptor() {
      return dev.routesvc.v1.RouterProto.getDescriptor();
    }

    @java.lang.Override
    public com.google.protobuf.Descriptors.ServiceDescriptor getServiceDescriptor() {
      return getFileDescriptor().findServiceByName("RouterService");
    }
  }

  private static final class RouterServiceFileDescriptorSupplier
      extends RouterServiceBaseDescriptorSupplier {
    RouterServiceFileDescriptorSupplier() {}
  }

  private static final class RouterServiceMethodDescriptorSupplier
      extends RouterServiceBaseDescriptorSupplier
      implements io.grpc.protobuf.ProtoMethodDescriptorSupplier {
    private final java.lang.String methodName;

    RouterServiceMethodDescriptorSupplier(java.lang.String methodName) {
      this.methodName = methodName;
    }

    @java.lang.Override
    public com.google.protobuf.Descriptors.MethodDescriptor getMethodDescriptor() {
      return getServiceDescriptor().findMethodByName(methodName);
    }
  }

  private static volatile io.grpc.ServiceDescriptor serviceDescriptor;

  public static io.grpc.ServiceDescriptor getServiceDescriptor() {
    io.grpc.ServiceDescriptor result = serviceDescriptor;
    if (result == null) {
      synchronized (RouterServiceGrpc.class) {
        result = serviceDescriptor;
        if (result == null) {
          serviceDescriptor = result = io.grpc.ServiceDescriptor.newBuilder(SERVICE_NAME)
              .setSchemaDescriptor(new RouterServiceFileDescriptorSupplier())
              .addMethod(getRouteMethod())
              .addMethod(getCompleteMethod())
              .addMethod(getListModelsMethod())
              .addMethod(getGetStatsMethod())
              .addMethod(getGetBatchMethod())
              .addMethod(getCancelBatchMethod())
              .addMethod(getFeedbackMethod())
              .build();
        }
      }
    }
    return result;
  }
}
