// Command loadclient is the receiving side of `make bench`: many StreamPriceUpdates streams
// held open by one light Go process, so that on a small machine the measurement shows the
// server's limits and not the load generator's. It ramps users up (CreateSession, then the
// stream), measures delivered updates and their end-to-end latency (the feed's publish
// timestamp to receipt) over a hold window, then lets every user leave (half by CloseSession,
// half by cancelling the stream) and prints one JSON object on stdout. With -protocol
// centrifugo it holds Centrifugo's uni-directional gRPC streams instead (centrifugo.go), with
// the same measurements and the same JSON. The browser path (web.go): -protocol ws creates each
// session over REST and streams it over a WebSocket, -protocol sse over Server-Sent Events, and
// -protocol centrifugo-ws holds Centrifugo's unidirectional WebSocket (centrifugo_ws.go); the
// same counters and the same JSON again, -target then being the server's HTTP host:port.
//
// The pricestream messages are encoded and decoded by hand with bench/grpcwire (no generated
// code), the module tests/grpcgo uses too.
//
// `pricestream loadtest` is the full-featured load tester (stages, leave mixes, slow
// readers, reports); this client does the one thing the benchmark needs, cheaply.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"pricestream/bench/grpcwire"
)

// closeAttempts is how often a user tries CloseSession before it cancels its stream instead.
const closeAttempts = 3

type config struct {
	protocol          string // one of protocols
	channelPrefix     string // centrifugo: channel = prefix + ticker
	target            string
	streams           int
	connections       int
	tickers           []string
	tickersPerSession int
	ramp              time.Duration
	settle            time.Duration
	hold              time.Duration
	leaveTimeout      time.Duration
	stormAt           time.Duration // ws: drop every socket this long after the hold started
	stormBackoff      time.Duration // ws: ceiling of the first reconnect delay after the drop (full jitter)
	stormBackoffMax   time.Duration // ws: cap of the exponential reconnect delay
}

// protocols are the -protocol values: gRPC (pricestream, centrifugo) and the browser path.
var protocols = []string{"pricestream", "centrifugo", "ws", "sse", "centrifugo-ws"}

type result struct {
	Streams            int                `json:"streams"`
	StreamsAtHoldStart int64              `json:"streams_at_hold_start"`
	StreamsAtHoldEnd   int64              `json:"streams_at_hold_end"`
	HoldSeconds        float64            `json:"hold_seconds"`
	Updates            int64              `json:"updates"`
	Batches            int64              `json:"batches"`
	UpdatesPerSecond   float64            `json:"updates_per_second"`
	BatchesPerSecond   float64            `json:"batches_per_second"`
	LatencyMs          map[string]float64 `json:"delivery_latency_ms"`
	Snapshots          int64              `json:"snapshots"`
	Errors             map[string]int64   `json:"errors"`
	LeftByClose        int64              `json:"left_by_close_session"`
	LeftByCancel       int64              `json:"left_by_cancel"`
	LeftByCloseFrame   int64              `json:"left_by_close_frame"`
	Storm              *stormResult       `json:"storm,omitempty"`
	ClientCPUSeconds   float64            `json:"client_cpu_seconds"`
	ClientCores        float64            `json:"client_cores"`
}

type run struct {
	cfg       config
	conns     []*grpc.ClientConn
	measuring atomic.Bool
	streaming atomic.Int64
	updates   atomic.Int64
	batches   atomic.Int64
	latency   latencyHistogram
	errMu     sync.Mutex
	errors    map[string]int64
	closed    atomic.Int64
	cancelled atomic.Int64
	created   atomic.Int64
	// the browser path (web.go, centrifugo_ws.go)
	web           webClients
	snapshots     atomic.Int64
	closedByFrame atomic.Int64
	streamed      []atomic.Bool // per user: its stream was up once
	storm         storm
}

// progress prints one line to stderr every interval until stop is closed.
func (r *run) progress(start time.Time, interval time.Duration, stop <-chan struct{}) {
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-stop:
			return
		case <-ticker.C:
		}
		r.errMu.Lock()
		errs := fmt.Sprint(r.errors)
		r.errMu.Unlock()
		fmt.Fprintf(os.Stderr, "loadclient: %4.0fs created %d streaming %d errors %s\n",
			time.Since(start).Seconds(), r.created.Load(), r.streaming.Load(), errs)
	}
}

func (r *run) fail(what string, err error) {
	code := status.Code(err).String()
	r.errMu.Lock()
	r.errors[what+":"+code]++
	r.errMu.Unlock()
}

// user is one virtual user: create a session, stream until told to leave, then leave.
func (r *run) user(index int, createBy time.Time, leave <-chan struct{}, rng *rand.Rand) {
	conn := r.conns[index%len(r.conns)]
	tickers := make([]string, 0, r.cfg.tickersPerSession)
	for _, i := range rng.Perm(len(r.cfg.tickers))[:r.cfg.tickersPerSession] {
		tickers = append(tickers, r.cfg.tickers[i])
	}
	request := grpcwire.CreateSessionRequest(tickers)
	var id string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var reply []byte
		err := conn.Invoke(ctx, grpcwire.MethodCreateSession, &request, &reply)
		cancel()
		if err == nil {
			if id, err = grpcwire.SessionID(reply); err == nil {
				r.created.Add(1)
				break
			}
		}
		r.fail("create", err)
		pause := time.Duration(500+rng.IntN(1000)) * time.Millisecond
		if time.Now().Add(pause).After(createBy) {
			return
		}
		select {
		case <-leave:
			return
		case <-time.After(pause):
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.stream(ctx, conn, id)
	}()
	select {
	case <-leave:
	case <-done:
		return
	}
	if index%2 == 0 && r.closeSession(conn, id) {
		r.closed.Add(1)
	} else {
		cancel() // the other half, and anyone whose CloseSession failed: drop the stream
		r.cancelled.Add(1)
	}
	<-done
}

func (r *run) stream(ctx context.Context, conn *grpc.ClientConn, id string) {
	desc := &grpc.StreamDesc{StreamName: "StreamPriceUpdates", ServerStreams: true}
	stream, err := conn.NewStream(ctx, desc, grpcwire.MethodStream)
	if err != nil {
		r.fail("stream", err)
		return
	}
	request := grpcwire.SessionIDRequest(id)
	if err := stream.SendMsg(&request); err != nil {
		if !errors.Is(err, io.EOF) {
			r.fail("stream", err)
			return
		}
	}
	if err := stream.CloseSend(); err != nil {
		r.fail("stream", err)
		return
	}
	r.streaming.Add(1)
	defer r.streaming.Add(-1)
	var batch []byte
	for {
		if err := stream.RecvMsg(&batch); err != nil {
			if !errors.Is(err, io.EOF) && ctx.Err() == nil {
				r.fail("stream", err)
			}
			return
		}
		if !r.measuring.Load() {
			continue
		}
		now := time.Now().UnixNano()
		n, err := grpcwire.PublishTimes(batch, func(published int64) {
			r.latency.observe(time.Duration(now - published))
		})
		if err != nil {
			r.fail("decode", status.Error(codes.DataLoss, err.Error()))
		}
		r.updates.Add(int64(n))
		r.batches.Add(1)
	}
}

// closeSession ends the session, retrying what a saturated server may answer with; false
// when it did not succeed.
func (r *run) closeSession(conn *grpc.ClientConn, id string) bool {
	request := grpcwire.SessionIDRequest(id)
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), r.cfg.leaveTimeout)
		var reply []byte
		err := conn.Invoke(ctx, grpcwire.MethodCloseSession, &request, &reply)
		cancel()
		if err == nil {
			return true
		}
		code := status.Code(err)
		retryable := code == codes.Canceled || code == codes.Unavailable ||
			code == codes.DeadlineExceeded || code == codes.ResourceExhausted
		if !retryable || attempt == closeAttempts {
			r.fail("close", err)
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func cpuSeconds() float64 {
	var u syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &u); err != nil {
		return 0
	}
	return float64(u.Utime.Nano()+u.Stime.Nano()) / 1e9
}

func execute(cfg config) (result, error) {
	r := &run{cfg: cfg, errors: map[string]int64{}, streamed: make([]atomic.Bool, cfg.streams)}
	grpcMode := cfg.protocol == "pricestream" || cfg.protocol == "centrifugo"
	if !grpcMode {
		r.web = newWebClients()
	}
	if cfg.stormAt > 0 {
		r.storm.at = make(chan struct{})
	}
	for i := 0; grpcMode && i < cfg.connections; i++ {
		conn, err := grpc.NewClient(cfg.target,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(grpcwire.RawCodec{})),
			grpc.WithSharedWriteBuffer(true),
		)
		if err != nil {
			return result{}, fmt.Errorf("cannot dial %s: %w", cfg.target, err)
		}
		defer conn.Close()
		r.conns = append(r.conns, conn)
	}
	start := time.Now()
	holdStart := start.Add(cfg.ramp + cfg.settle)
	leave := make(chan struct{})
	stopProgress := make(chan struct{})
	defer close(stopProgress)
	go r.progress(start, 5*time.Second, stopProgress)
	var users sync.WaitGroup
	for i := 0; i < cfg.streams; i++ {
		at := start.Add(time.Duration(int64(cfg.ramp) * int64(i) / int64(cfg.streams)))
		time.Sleep(time.Until(at))
		users.Add(1)
		go func(index int) {
			defer users.Done()
			rng := rand.New(rand.NewPCG(uint64(index), 7))
			switch cfg.protocol {
			case "centrifugo":
				r.centrifugoUser(index, holdStart, leave, rng)
			case "ws", "sse":
				r.webUser(index, holdStart, leave, rng)
			case "centrifugo-ws":
				r.centrifugoWSUser(index, holdStart, leave, rng)
			default:
				r.user(index, holdStart, leave, rng)
			}
		}(i)
	}
	time.Sleep(time.Until(holdStart))
	cpuBefore, t0 := cpuSeconds(), time.Now()
	atHoldStart := r.streaming.Load()
	r.measuring.Store(true)
	fmt.Fprintln(os.Stderr, "loadclient: hold started")
	if cfg.stormAt > 0 {
		go r.startStorm(t0.Add(cfg.stormAt))
	}
	time.Sleep(cfg.hold)
	r.measuring.Store(false)
	fmt.Fprintln(os.Stderr, "loadclient: hold ended")
	window, cpu := time.Since(t0).Seconds(), cpuSeconds()-cpuBefore
	atHoldEnd := r.streaming.Load()
	close(leave)
	left := make(chan struct{})
	go func() { users.Wait(); close(left) }()
	select {
	case <-left:
	case <-time.After(closeAttempts*cfg.leaveTimeout + 30*time.Second):
		return result{}, errors.New("users did not leave within the leave timeout")
	}
	qs := r.latency.quantiles(0.5, 0.95, 0.99)
	var stormOut *stormResult
	if cfg.stormAt > 0 {
		stormOut = r.storm.result()
	}
	return result{
		Streams:            cfg.streams,
		StreamsAtHoldStart: atHoldStart,
		StreamsAtHoldEnd:   atHoldEnd,
		HoldSeconds:        window,
		Updates:            r.updates.Load(),
		Batches:            r.batches.Load(),
		UpdatesPerSecond:   float64(r.updates.Load()) / window,
		BatchesPerSecond:   float64(r.batches.Load()) / window,
		LatencyMs: map[string]float64{
			"p50": qs[0], "p95": qs[1], "p99": qs[2],
			"max": float64(r.latency.max.Load()) / 1e6,
		},
		Snapshots:        r.snapshots.Load(),
		Errors:           r.errors,
		LeftByClose:      r.closed.Load(),
		LeftByCancel:     r.cancelled.Load(),
		LeftByCloseFrame: r.closedByFrame.Load(),
		Storm:            stormOut,
		ClientCPUSeconds: cpu,
		ClientCores:      cpu / window,
	}, nil
}

func main() {
	var cfg config
	var tickers string
	flag.StringVar(&cfg.protocol, "protocol", "pricestream",
		"pricestream (CreateSession + StreamPriceUpdates), centrifugo (uni-directional gRPC Consume), "+
			"ws (REST + WebSocket), sse (REST + Server-Sent Events) or centrifugo-ws (uni_websocket)")
	flag.StringVar(&cfg.channelPrefix, "channel-prefix", "prices:",
		"centrifugo: each ticker's channel is this prefix + the ticker")
	flag.StringVar(&cfg.target, "target", "127.0.0.1:50051",
		"server host:port (its gRPC port, or its HTTP port for ws, sse and centrifugo-ws)")
	flag.IntVar(&cfg.streams, "streams", 100, "virtual users, one stream each")
	flag.IntVar(&cfg.connections, "connections", 16,
		"gRPC connections the users share (the browser modes have one per user)")
	flag.StringVar(&tickers, "tickers", "", "comma-separated ticker universe (the feed's)")
	flag.IntVar(&cfg.tickersPerSession, "tickers-per-session", 5, "tickers per session")
	flag.DurationVar(&cfg.ramp, "ramp", 10*time.Second, "time to start all users")
	flag.DurationVar(&cfg.settle, "settle", 3*time.Second, "wait after the ramp before measuring")
	flag.DurationVar(&cfg.hold, "hold", 10*time.Second, "measurement window")
	flag.DurationVar(&cfg.leaveTimeout, "leave-timeout", 30*time.Second,
		"per CloseSession call; ws, sse: for the server's close after DELETE")
	flag.DurationVar(&cfg.stormAt, "storm-at", 0,
		"ws: drop every socket at once this long after the hold started, then reconnect (0: no storm)")
	flag.DurationVar(&cfg.stormBackoff, "storm-backoff", 200*time.Millisecond,
		"ws: the ceiling of the storm's first reconnect delay (full jitter: uniform below it); each retry doubles the ceiling")
	flag.DurationVar(&cfg.stormBackoffMax, "storm-backoff-max", 5*time.Second,
		"ws: the storm's reconnect delay ceiling")
	flag.Parse()
	if tickers != "" {
		cfg.tickers = strings.Split(tickers, ",")
	}
	switch {
	case !slices.Contains(protocols, cfg.protocol):
		fmt.Fprintln(os.Stderr, "loadclient: -protocol must be one of "+strings.Join(protocols, ", "))
		os.Exit(2)
	case cfg.stormAt < 0 || (cfg.stormAt > 0 && (cfg.protocol != "ws" || cfg.stormAt >= cfg.hold)):
		fmt.Fprintln(os.Stderr, "loadclient: -storm-at needs -protocol ws and must fall within -hold")
		os.Exit(2)
	case cfg.stormBackoff <= 0 || cfg.stormBackoffMax < cfg.stormBackoff:
		fmt.Fprintln(os.Stderr, "loadclient: -storm-backoff must be positive and at most -storm-backoff-max")
		os.Exit(2)
	case len(cfg.tickers) == 0:
		fmt.Fprintln(os.Stderr, "loadclient: -tickers is required (the feed's universe)")
		os.Exit(2)
	case cfg.tickersPerSession < 1 || cfg.tickersPerSession > len(cfg.tickers):
		fmt.Fprintf(os.Stderr, "loadclient: -tickers-per-session must be 1..%d\n", len(cfg.tickers))
		os.Exit(2)
	case cfg.streams < 1 || cfg.connections < 1 || cfg.hold <= 0:
		fmt.Fprintln(os.Stderr, "loadclient: -streams, -connections and -hold must be positive")
		os.Exit(2)
	}
	out, err := execute(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadclient:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "loadclient:", err)
		os.Exit(1)
	}
}
