// Command example routes a prompt, then streams a completion for it.
//
//	go run ./cmd/example -target 127.0.0.1:50051 -insecure "Explain gRPC in one line"
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"strings"
	"time"

	routesvc "github.com/routesvc/routesvc/clients/go"
	routesvcv1 "github.com/routesvc/routesvc/clients/go/routesvcv1"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "routesvc address, host:port")
	plaintext := flag.Bool("insecure", false, "use plaintext instead of TLS")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline for the whole run (Route, then the Complete stream)")
	flag.Parse()
	prompt := strings.Join(flag.Args(), " ")
	if prompt == "" {
		prompt = "Say hello in five words."
	}

	opts := []routesvc.Option{routesvc.WithAPIKey(os.Getenv("ROUTESVC_API_KEY"))}
	if *plaintext {
		opts = append(opts, routesvc.WithInsecure())
	}
	client, err := routesvc.Dial(*target, opts...)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	decision, err := client.Route(ctx, &routesvcv1.RouteRequest{Chat: routesvc.UserPrompt(prompt)})
	if err != nil {
		fail(err)
	}
	fmt.Printf("route: %s (%s), estimated %s USD\n", decision.GetModel(), decision.GetRule(), decision.GetEstimatedCostUsd())

	stream, err := client.Complete(ctx, &routesvcv1.CompleteRequest{Chat: routesvc.UserPrompt(prompt)})
	if err != nil {
		fail(err)
	}
	defer stream.Close() // cancels the call if the loop is left before its end
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			fail(err)
		}
		switch event := msg.GetEvent().(type) {
		case *routesvcv1.CompleteResponse_Decision:
			fmt.Printf("[%s]\n", event.Decision.GetModel())
		case *routesvcv1.CompleteResponse_Delta:
			fmt.Print(event.Delta.GetText())
		case *routesvcv1.CompleteResponse_Completion:
			c := event.Completion
			fmt.Printf("\n[%d in / %d out tokens, %s USD]\n", c.GetUsage().GetInputTokens(), c.GetUsage().GetOutputTokens(), c.GetCostUsd())
		}
	}
}

func fail(err error) {
	if info := routesvc.ErrorInfo(err); info != nil {
		log.Fatalf("%v (reason %s)", err, info.GetReason())
	}
	log.Fatal(err)
}
