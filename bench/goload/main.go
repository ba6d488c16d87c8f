// Command goload drives Route load at a routesvc (or any RouterService) address and prints one
// JSON object with every measured latency, so that the Python benchmark computes the statistics
// with the same code as for its Python load.
//
// It exists because a Python gRPC client spends about as much CPU per call as the server it
// measures: on a 2-core machine the Python load takes a core the server could use. A Go client
// needs a small fraction of that.
//
//	goload -target 127.0.0.1:50051 -prompts prompts.json -concurrency 16 -duration 3s [-connections 2] [-rate 0] [-unique]
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	routesvcv1 "github.com/routesvc/routesvc/clients/go/routesvcv1"
)

type prompt struct {
	Text string `json:"text"`
	Hint string `json:"hint"`
}

type result struct {
	Requests  int       `json:"requests"`
	Primed    int       `json:"primed"`
	Errors    int       `json:"errors"`
	ElapsedS  float64   `json:"elapsed_s"`
	Latencies []float64 `json:"latencies_s"`
	SendLagS  float64   `json:"send_lag_s,omitempty"`
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "host:port")
	promptFile := flag.String("prompts", "", "JSON list of {text, hint}")
	concurrency := flag.Int("concurrency", 1, "closed-loop callers")
	connections := flag.Int("connections", 1, "TCP connections, callers spread over them in turn")
	duration := flag.Duration("duration", 3*time.Second, "measured time")
	maxRequests := flag.Int("max", 50000, "measured calls at most")
	rate := flag.Float64("rate", 0, "open loop: calls per second (0: closed loop)")
	warmup := flag.Duration("warmup", 500*time.Millisecond, "open loop: unmeasured lead-in")
	unique := flag.Bool("unique", false, "every call's text is new")
	flag.Parse()

	raw, err := os.ReadFile(*promptFile)
	if err != nil {
		log.Fatal(err)
	}
	var prompts []prompt
	if err := json.Unmarshal(raw, &prompts); err != nil || len(prompts) == 0 {
		log.Fatalf("prompts: %v", err)
	}
	stubs := make([]routesvcv1.RouterServiceClient, *connections)
	for i := range stubs {
		conn, err := grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			log.Fatal(err)
		}
		defer conn.Close()
		stubs[i] = routesvcv1.NewRouterServiceClient(conn)
	}
	tag := make([]byte, 4)
	_, _ = rand.Read(tag)
	var serial atomic.Int64
	request := func(index int) *routesvcv1.RouteRequest {
		p := prompts[index%len(prompts)]
		text := p.Text
		if *unique {
			text = fmt.Sprintf("%s (request %s-%d)", text, hex.EncodeToString(tag), serial.Add(1))
		}
		return &routesvcv1.RouteRequest{
			Chat:    &routesvcv1.ChatRequest{Messages: []*routesvcv1.Message{{Role: routesvcv1.Role_ROLE_USER, Content: text}}},
			Context: &routesvcv1.RoutingContext{TaskHint: p.Hint},
		}
	}
	call := func(stub routesvcv1.RouterServiceClient, index int) error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := stub.Route(ctx, request(index))
		return err
	}

	var out result
	if *rate > 0 {
		out = openLoop(stubs, call, *rate, *duration, *warmup)
	} else {
		out = closedLoop(stubs, call, *concurrency, *duration, *maxRequests)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		log.Fatal(err)
	}
}

// closedLoop: each caller primes once (not measured), then sends call after call until the
// duration or the request budget runs out.
func closedLoop(stubs []routesvcv1.RouterServiceClient, call func(routesvcv1.RouterServiceClient, int) error, concurrency int, duration time.Duration, maxRequests int) result {
	var primeWait sync.WaitGroup
	for i := 0; i < concurrency; i++ {
		primeWait.Add(1)
		go func(i int) {
			defer primeWait.Done()
			_ = call(stubs[i%len(stubs)], i)
		}(i)
	}
	primeWait.Wait()
	var sent, errs atomic.Int64
	perCaller := make([][]float64, concurrency)
	began := time.Now()
	stopAt := began.Add(duration)
	var wait sync.WaitGroup
	for i := 0; i < concurrency; i++ {
		wait.Add(1)
		go func(i int) {
			defer wait.Done()
			stub := stubs[i%len(stubs)]
			for index := i; time.Now().Before(stopAt) && sent.Load() < int64(maxRequests); index++ {
				started := time.Now()
				if err := call(stub, index); err != nil {
					errs.Add(1)
					continue
				}
				perCaller[i] = append(perCaller[i], time.Since(started).Seconds())
				sent.Add(1)
			}
		}(i)
	}
	wait.Wait()
	out := result{Primed: concurrency, Errors: int(errs.Load()), ElapsedS: time.Since(began).Seconds()}
	for _, values := range perCaller {
		out.Latencies = append(out.Latencies, values...)
	}
	out.Requests = len(out.Latencies)
	return out
}

// openLoop: calls at fixed arrival times; latency counts from each call's scheduled time, so a
// slow server cannot hide its queue. Calls in the warm-up are made but not measured.
func openLoop(stubs []routesvcv1.RouterServiceClient, call func(routesvcv1.RouterServiceClient, int) error, rate float64, duration, warmup time.Duration) result {
	total := int(rate * (warmup + duration).Seconds())
	skip := int(rate * warmup.Seconds())
	interval := time.Duration(float64(time.Second) / rate)
	latencies := make([]float64, total)
	var errs atomic.Int64
	var wait sync.WaitGroup
	began := time.Now()
	for index := 0; index < total; index++ {
		scheduled := began.Add(time.Duration(index) * interval)
		if delay := time.Until(scheduled); delay > 0 {
			time.Sleep(delay)
		}
		wait.Add(1)
		go func(index int, scheduled time.Time) {
			defer wait.Done()
			if err := call(stubs[index%len(stubs)], index); err != nil {
				errs.Add(1)
				latencies[index] = -1
				return
			}
			latencies[index] = time.Since(scheduled).Seconds()
		}(index, scheduled)
	}
	sendLag := time.Since(began.Add(time.Duration(total-1) * interval)).Seconds()
	wait.Wait()
	out := result{Primed: skip, Errors: int(errs.Load()), ElapsedS: time.Since(began).Seconds(), SendLagS: sendLag}
	for index, value := range latencies {
		if index >= skip && value >= 0 {
			out.Latencies = append(out.Latencies, value)
		}
	}
	out.Requests = len(out.Latencies)
	return out
}
