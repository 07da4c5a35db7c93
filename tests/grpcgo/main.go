// Command grpcgo checks pricestream's gRPC port with a stock grpc-go client: it runs named
// checks against -target and prints one JSON line per check, {"name", "ok", "detail"}, then
// exits 0 when every check passed and 1 otherwise. tests/test_grpc_clients.py runs it against
// in-process servers, plaintext, TLS (-ca, -server-name) and mutual TLS (-cert, -key).
//
// The pricestream messages are encoded by hand (bench/grpcwire: no generated code); health and
// reflection use grpc-go's own clients, as kubelet's native gRPC probe and grpcurl do.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"

	"pricestream/bench/grpcwire"
)

// kubeProbeAgent is the user agent kubelet's gRPC probe sends (k8s.io/kubernetes/pkg/probe/grpc).
const kubeProbeAgent = "kube-probe/1.33"

// unknownSession is a well-formed session id that no server ever issued.
const unknownSession = "AAAAAAAAAAAAAAAAAAAAAA"

// drainReady is printed on stderr by the drain check once its stream has a batch: the caller
// drains the server then.
const drainReady = "grpcgo: drain check streaming; drain the server now"

type client struct {
	raw     *grpc.ClientConn // pricestream calls, bytes through grpcwire.RawCodec
	std     *grpc.ClientConn // health and reflection with grpc-go's generated clients
	tickers []string
}

type check struct {
	name  string
	run   func(ctx context.Context, c *client) (string, error)
	optIn bool // not part of "all"
}

var checks = []check{
	{name: "create_session", run: checkCreateSession},
	{name: "stream_batch", run: checkStreamBatch},
	{name: "deadline", run: checkDeadline},
	{name: "cancel", run: checkCancel},
	{name: "invalid_argument", run: checkInvalidArgument},
	{name: "invalid_argument_message", run: checkInvalidArgumentMessage},
	{name: "not_found", run: checkNotFound},
	{name: "unimplemented", run: checkUnimplemented},
	{name: "large_request_under_limit", run: checkLargeUnderLimit},
	{name: "large_request_over_limit", run: checkLargeOverLimit},
	{name: "health_check", run: checkHealth},
	{name: "health_check_unknown", run: checkHealthUnknown},
	{name: "health_watch", run: checkHealthWatch},
	{name: "reflection_v1", run: checkReflectionV1},
	{name: "reflection_v1alpha", run: checkReflectionV1alpha},
	{name: "drain_trailer", run: checkDrainTrailer, optIn: true},
}

type outcome struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "host:port of the gRPC server")
	names := flag.String("checks", "all", "comma-separated checks, or all (every check not opt-in)")
	ca := flag.String("ca", "", "CA certificate (PEM): use TLS and verify the server with it")
	cert := flag.String("cert", "", "client certificate (PEM) for mutual TLS; needs -key and -ca")
	key := flag.String("key", "", "client private key (PEM) for mutual TLS")
	serverName := flag.String("server-name", "", "TLS server name to verify (default: the target's host)")
	tickers := flag.String("tickers", "AAPL,MSFT", "upper-case tickers the server has prices for")
	timeout := flag.Duration("timeout", 15*time.Second, "time limit of each check")
	list := flag.Bool("list", false, "print the names of the checks and exit")
	flag.Parse()
	if *list {
		for _, c := range checks {
			suffix := ""
			if c.optIn {
				suffix = " (opt-in)"
			}
			fmt.Println(c.name + suffix)
		}
		return
	}
	selected, err := selectChecks(*names)
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpcgo:", err)
		os.Exit(2)
	}
	creds, err := transportCredentials(*ca, *cert, *key, *serverName)
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpcgo:", err)
		os.Exit(2)
	}
	raw, err := grpc.NewClient(*target, grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(grpcwire.RawCodec{})))
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpcgo:", err)
		os.Exit(2)
	}
	defer raw.Close()
	std, err := grpc.NewClient(*target, grpc.WithTransportCredentials(creds),
		grpc.WithUserAgent(kubeProbeAgent))
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpcgo:", err)
		os.Exit(2)
	}
	defer std.Close()
	c := &client{raw: raw, std: std, tickers: strings.Split(*tickers, ",")}

	out := json.NewEncoder(os.Stdout)
	failed := false
	for _, chk := range selected {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		detail, err := chk.run(ctx, c)
		cancel()
		result := outcome{Name: chk.name, OK: err == nil, Detail: detail}
		if err != nil {
			failed = true
			result.Detail = err.Error()
		}
		_ = out.Encode(result)
	}
	if failed {
		os.Exit(1)
	}
}

func selectChecks(names string) ([]check, error) {
	if names == "all" {
		var out []check
		for _, c := range checks {
			if !c.optIn {
				out = append(out, c)
			}
		}
		return out, nil
	}
	var out []check
	for _, name := range strings.Split(names, ",") {
		i := slices.IndexFunc(checks, func(c check) bool { return c.name == name })
		if i < 0 {
			return nil, fmt.Errorf("unknown check %q (see -list)", name)
		}
		out = append(out, checks[i])
	}
	return out, nil
}

func transportCredentials(ca, cert, key, serverName string) (credentials.TransportCredentials, error) {
	if ca == "" {
		if cert != "" || key != "" || serverName != "" {
			return nil, errors.New("-cert, -key and -server-name need -ca")
		}
		return insecure.NewCredentials(), nil
	}
	pem, err := os.ReadFile(ca)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", ca)
	}
	config := &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12}
	if cert != "" || key != "" {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return credentials.NewTLS(config), nil
}

// --- helpers ------------------------------------------------------------------------------

// wantStatus is nil when err is a status with code and a message containing part.
func wantStatus(err error, code codes.Code, part string) error {
	if err == nil {
		return fmt.Errorf("succeeded, want %s", code)
	}
	st, _ := status.FromError(err)
	if st.Code() != code {
		return fmt.Errorf("got %s %q, want %s", st.Code(), st.Message(), code)
	}
	if !strings.Contains(st.Message(), part) {
		return fmt.Errorf("got %s with message %q, want one containing %q", code, st.Message(), part)
	}
	return nil
}

func (c *client) createSession(ctx context.Context, tickers []string) (grpcwire.Session, error) {
	request := grpcwire.CreateSessionRequest(tickers)
	var reply []byte
	if err := c.raw.Invoke(ctx, grpcwire.MethodCreateSession, &request, &reply); err != nil {
		return grpcwire.Session{}, fmt.Errorf("CreateSession: %w", err)
	}
	return grpcwire.DecodeSession(reply)
}

func (c *client) closeSession(ctx context.Context, id string) error {
	request := grpcwire.SessionIDRequest(id)
	var reply []byte
	if err := c.raw.Invoke(ctx, grpcwire.MethodCloseSession, &request, &reply); err != nil {
		return fmt.Errorf("CloseSession: %w", err)
	}
	if len(reply) != 0 {
		return fmt.Errorf("CloseSession answered %d bytes, want an empty google.protobuf.Empty", len(reply))
	}
	return nil
}

// openStream starts StreamPriceUpdates for a session (request sent, send side closed).
func (c *client) openStream(ctx context.Context, id string) (grpc.ClientStream, error) {
	desc := &grpc.StreamDesc{StreamName: "StreamPriceUpdates", ServerStreams: true}
	stream, err := c.raw.NewStream(ctx, desc, grpcwire.MethodStream)
	if err != nil {
		return nil, err
	}
	request := grpcwire.SessionIDRequest(id)
	if err := stream.SendMsg(&request); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if err := stream.CloseSend(); err != nil {
		return nil, err
	}
	return stream, nil
}

// nextBatch receives one PriceUpdateBatch and checks it against the session's tickers.
func nextBatch(stream grpc.ClientStream, tickers []string) ([]grpcwire.PriceUpdate, error) {
	var raw []byte
	if err := stream.RecvMsg(&raw); err != nil {
		return nil, err
	}
	updates, err := grpcwire.DecodeBatch(raw)
	if err != nil {
		return nil, fmt.Errorf("PriceUpdateBatch does not decode: %w", err)
	}
	if len(updates) == 0 {
		return nil, errors.New("an empty batch")
	}
	for _, u := range updates {
		if !slices.Contains(tickers, u.Ticker) || u.Price <= 0 || u.Sequence == 0 || u.PublishedAt <= 0 {
			return nil, fmt.Errorf("unexpected update %+v for tickers %v", u, tickers)
		}
	}
	return updates, nil
}

// recvEnd reads until the stream ends; nil when it ended with OK.
func recvEnd(stream grpc.ClientStream) error {
	var raw []byte
	for {
		if err := stream.RecvMsg(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// --- checks -------------------------------------------------------------------------------

func checkCreateSession(ctx context.Context, c *client) (string, error) {
	// Lower case upper-cased, duplicates dropped, first-occurrence order kept.
	request := grpcwire.CreateSessionRequest(append([]string{strings.ToLower(c.tickers[0])}, c.tickers...))
	var reply []byte
	var header, trailer metadata.MD
	err := c.raw.Invoke(ctx, grpcwire.MethodCreateSession, &request, &reply, grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		return "", fmt.Errorf("CreateSession: %w", err)
	}
	s, err := grpcwire.DecodeSession(reply)
	if err != nil {
		return "", fmt.Errorf("Session does not decode: %w", err)
	}
	if len(s.ID) != 22 || !slices.Equal(s.Tickers, c.tickers) || s.ExpiresSeconds <= time.Now().Unix() {
		return "", fmt.Errorf("unexpected Session %+v for tickers %v", s, c.tickers)
	}
	if ct := header.Get("content-type"); len(ct) != 1 || !strings.HasPrefix(ct[0], "application/grpc") {
		return "", fmt.Errorf("response content-type %v", ct)
	}
	if err := c.closeSession(ctx, s.ID); err != nil {
		return "", err
	}
	return fmt.Sprintf("session %s tickers %v expires in %ds; CloseSession OK",
		s.ID, s.Tickers, s.ExpiresSeconds-time.Now().Unix()), nil
}

func checkStreamBatch(ctx context.Context, c *client) (string, error) {
	s, err := c.createSession(ctx, c.tickers)
	if err != nil {
		return "", err
	}
	started := time.Now()
	stream, err := c.openStream(ctx, s.ID)
	if err != nil {
		return "", err
	}
	updates, err := nextBatch(stream, s.Tickers)
	if err != nil {
		return "", fmt.Errorf("first batch: %w", err)
	}
	first := time.Since(started)
	header, err := stream.Header()
	if err != nil {
		return "", fmt.Errorf("response headers: %w", err)
	}
	if ct := header.Get("content-type"); len(ct) != 1 || !strings.HasPrefix(ct[0], "application/grpc") {
		return "", fmt.Errorf("response content-type %v", ct)
	}
	if err := c.closeSession(ctx, s.ID); err != nil {
		return "", err
	}
	if err := recvEnd(stream); err != nil {
		return "", fmt.Errorf("after CloseSession the stream ended with %v, want OK", err)
	}
	return fmt.Sprintf("first batch of %d updates after %d ms; CloseSession ended the stream with OK",
		len(updates), first.Milliseconds()), nil
}

func checkDeadline(ctx context.Context, c *client) (string, error) {
	s, err := c.createSession(ctx, c.tickers)
	if err != nil {
		return "", err
	}
	defer func() { _ = c.closeSession(ctx, s.ID) }()
	const deadline = 300 * time.Millisecond
	streamCtx, cancel := context.WithTimeout(ctx, deadline)
	defer cancel()
	started := time.Now()
	stream, err := c.openStream(streamCtx, s.ID)
	if err != nil {
		return "", err
	}
	batches := 0
	var raw []byte
	for {
		if err = stream.RecvMsg(&raw); err != nil {
			break
		}
		batches++
	}
	elapsed := time.Since(started)
	if err := wantStatus(err, codes.DeadlineExceeded, ""); err != nil {
		return "", err
	}
	if elapsed < deadline-20*time.Millisecond || elapsed > deadline+2*time.Second {
		return "", fmt.Errorf("DEADLINE_EXCEEDED after %d ms for a %d ms deadline", elapsed.Milliseconds(), deadline.Milliseconds())
	}
	return fmt.Sprintf("%d batches, then DEADLINE_EXCEEDED after %d ms (deadline %d ms)",
		batches, elapsed.Milliseconds(), deadline.Milliseconds()), nil
}

func checkCancel(ctx context.Context, c *client) (string, error) {
	s, err := c.createSession(ctx, c.tickers)
	if err != nil {
		return "", err
	}
	streamCtx, cancel := context.WithCancel(ctx)
	stream, err := c.openStream(streamCtx, s.ID)
	if err != nil {
		cancel()
		return "", err
	}
	if _, err := nextBatch(stream, s.Tickers); err != nil {
		cancel()
		return "", fmt.Errorf("first batch: %w", err)
	}
	cancel()
	if err := wantStatus(recvEnd(stream), codes.Canceled, ""); err != nil {
		return "", fmt.Errorf("after cancel: %w", err)
	}
	// The server must let go of the session's lease: the same session streams again.
	cancelled := time.Now()
	var again grpc.ClientStream
	attempts := 0
	for {
		attempts++
		again, err = c.openStream(ctx, s.ID)
		if err == nil {
			_, err = nextBatch(again, s.Tickers)
		}
		if err == nil {
			break
		}
		if status.Code(err) != codes.FailedPrecondition || time.Since(cancelled) > 5*time.Second {
			return "", fmt.Errorf("streaming the session again after cancelling: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	released := time.Since(cancelled)
	if err := c.closeSession(ctx, s.ID); err != nil {
		return "", err
	}
	if err := recvEnd(again); err != nil {
		return "", fmt.Errorf("after CloseSession the resumed stream ended with %v, want OK", err)
	}
	return fmt.Sprintf("CANCELLED locally; the session streamed again %d ms later (attempt %d)",
		released.Milliseconds(), attempts), nil
}

func checkInvalidArgument(ctx context.Context, c *client) (string, error) {
	_, err := c.createSession(ctx, nil)
	if err := wantStatus(err, codes.InvalidArgument, "at least one ticker is required"); err != nil {
		return "", err
	}
	return status.Convert(errors.Unwrap(err)).Message(), nil
}

func checkInvalidArgumentMessage(ctx context.Context, c *client) (string, error) {
	// grpc-message is percent-encoded UTF-8: spaces, quotes and non-ASCII must come back intact.
	_, err := c.createSession(ctx, []string{"äpfel kurs"})
	want := "ticker 'äpfel kurs' is invalid: use A-Z, 0-9 and inner '.', '-' or '_' only"
	if err := wantStatus(err, codes.InvalidArgument, ""); err != nil {
		return "", err
	}
	if got := status.Convert(errors.Unwrap(err)).Message(); got != want {
		return "", fmt.Errorf("message %q, want %q", got, want)
	}
	return want, nil
}

func checkNotFound(ctx context.Context, c *client) (string, error) {
	want := "session " + unknownSession + " does not exist or has expired"
	stream, err := c.openStream(ctx, unknownSession)
	if err == nil {
		err = recvEnd(stream)
	}
	if err := wantStatus(err, codes.NotFound, want); err != nil {
		return "", fmt.Errorf("StreamPriceUpdates: %w", err)
	}
	if err := wantStatus(c.closeSession(ctx, unknownSession), codes.NotFound, want); err != nil {
		return "", fmt.Errorf("CloseSession: %w", err)
	}
	return "StreamPriceUpdates and CloseSession: NOT_FOUND " + want, nil
}

func checkUnimplemented(ctx context.Context, c *client) (string, error) {
	var details []string
	for _, method := range []string{"/" + grpcwire.Service + "/NoSuchMethod", "/no.such.Service/Call"} {
		request := []byte{}
		var reply []byte
		err := c.raw.Invoke(ctx, method, &request, &reply)
		if err := wantStatus(err, codes.Unimplemented, ""); err != nil {
			return "", fmt.Errorf("%s: %w", method, err)
		}
		details = append(details, fmt.Sprintf("%s: %q", method, status.Convert(err).Message()))
	}
	return "UNIMPLEMENTED " + strings.Join(details, "; "), nil
}

// manyTickers is a CreateSessionRequest of about size bytes (7 bytes per ticker).
func manyTickers(size int) []string {
	tickers := make([]string, 0, size/7)
	for i := 0; i < size/7; i++ {
		tickers = append(tickers, fmt.Sprintf("T%04d", i%10000))
	}
	return tickers
}

func checkLargeUnderLimit(ctx context.Context, c *client) (string, error) {
	// 60 KiB: under the 64 KiB limit, in several DATA frames; the server reads it whole and
	// refuses it on its content.
	tickers := manyTickers(60 * 1024)
	_, err := c.createSession(ctx, tickers)
	if err := wantStatus(err, codes.InvalidArgument, "too many tickers"); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d bytes: %s", len(grpcwire.CreateSessionRequest(tickers)), status.Convert(errors.Unwrap(err)).Message()), nil
}

func checkLargeOverLimit(ctx context.Context, c *client) (string, error) {
	tickers := manyTickers(70 * 1024)
	size := len(grpcwire.CreateSessionRequest(tickers))
	_, err := c.createSession(ctx, tickers)
	if err := wantStatus(err, codes.ResourceExhausted, ""); err != nil {
		return "", err
	}
	message := status.Convert(errors.Unwrap(err)).Message()
	// The connection is still good for the next call.
	s, err := c.createSession(ctx, c.tickers)
	if err != nil {
		return "", fmt.Errorf("the call after the refused one: %w", err)
	}
	if err := c.closeSession(ctx, s.ID); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d bytes: RESOURCE_EXHAUSTED %q; the next call on the connection succeeded", size, message), nil
}

func checkHealth(ctx context.Context, c *client) (string, error) {
	health := healthpb.NewHealthClient(c.std)
	var details []string
	for _, name := range []string{"", grpcwire.Service} {
		started := time.Now()
		for {
			reply, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: name})
			if err != nil {
				return "", fmt.Errorf("Check(%q): %w", name, err)
			}
			if reply.GetStatus() == healthpb.HealthCheckResponse_SERVING {
				break
			}
			if time.Since(started) > 3*time.Second {
				return "", fmt.Errorf("Check(%q) = %s", name, reply.GetStatus())
			}
			time.Sleep(50 * time.Millisecond)
		}
		details = append(details, fmt.Sprintf("%q SERVING", name))
	}
	return "user agent " + kubeProbeAgent + ": " + strings.Join(details, ", "), nil
}

func checkHealthUnknown(ctx context.Context, c *client) (string, error) {
	_, err := healthpb.NewHealthClient(c.std).Check(ctx, &healthpb.HealthCheckRequest{Service: "no.such.Service"})
	if err := wantStatus(err, codes.NotFound, ""); err != nil {
		return "", err
	}
	return "NOT_FOUND " + status.Convert(err).Message(), nil
}

func checkHealthWatch(ctx context.Context, c *client) (string, error) {
	watchCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	health := healthpb.NewHealthClient(c.std)
	watch, err := health.Watch(watchCtx, &healthpb.HealthCheckRequest{Service: grpcwire.Service})
	if err != nil {
		return "", err
	}
	reply, err := watch.Recv()
	if err != nil {
		return "", fmt.Errorf("first status: %w", err)
	}
	if reply.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return "", fmt.Errorf("first status %s", reply.GetStatus())
	}
	unknown, err := health.Watch(watchCtx, &healthpb.HealthCheckRequest{Service: "no.such.Service"})
	if err != nil {
		return "", err
	}
	reply, err = unknown.Recv()
	if err != nil {
		return "", fmt.Errorf("first status of an unknown service: %w", err)
	}
	if reply.GetStatus() != healthpb.HealthCheckResponse_SERVICE_UNKNOWN {
		return "", fmt.Errorf("first status of an unknown service %s", reply.GetStatus())
	}
	return "first status SERVING; an unknown service SERVICE_UNKNOWN", nil
}

// reflectionStream is what both reflection versions' ServerReflectionInfo streams offer.
type reflectionStream[Req, Resp any] interface {
	Send(*Req) error
	Recv() (*Resp, error)
	CloseSend() error
}

var wantServices = []string{
	grpcwire.Service, "grpc.health.v1.Health",
	"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
}

// reflect lists the services and fetches the file of PriceStreamService; a summary.
func reflect[Req, Resp any](
	stream reflectionStream[Req, Resp],
	list, symbol *Req,
	names func(*Resp) ([]string, error),
	files func(*Resp) ([][]byte, error),
) (string, error) {
	if err := stream.Send(list); err != nil {
		return "", err
	}
	reply, err := stream.Recv()
	if err != nil {
		return "", fmt.Errorf("list_services: %w", err)
	}
	services, err := names(reply)
	if err != nil {
		return "", err
	}
	for _, want := range wantServices {
		if !slices.Contains(services, want) {
			return "", fmt.Errorf("list_services %v has no %s", services, want)
		}
	}
	if err := stream.Send(symbol); err != nil {
		return "", err
	}
	reply, err = stream.Recv()
	if err != nil {
		return "", fmt.Errorf("file_containing_symbol: %w", err)
	}
	raw, err := files(reply)
	if err != nil {
		return "", err
	}
	var methods []string
	for _, b := range raw {
		var file descriptorpb.FileDescriptorProto
		if err := proto.Unmarshal(b, &file); err != nil {
			return "", fmt.Errorf("a FileDescriptorProto does not decode: %w", err)
		}
		for _, svc := range file.GetService() {
			if file.GetPackage()+"."+svc.GetName() == grpcwire.Service {
				for _, m := range svc.GetMethod() {
					methods = append(methods, m.GetName())
				}
			}
		}
	}
	slices.Sort(methods)
	if !slices.Equal(methods, []string{"CloseSession", "CreateSession", "StreamPriceUpdates"}) {
		return "", fmt.Errorf("%s has methods %v", grpcwire.Service, methods)
	}
	if err := stream.CloseSend(); err != nil {
		return "", err
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("after CloseSend the stream ended with %v, want OK", err)
	}
	return fmt.Sprintf("services %v; %s has %v (%d files)", services, grpcwire.Service, methods, len(raw)), nil
}

func checkReflectionV1(ctx context.Context, c *client) (string, error) {
	type req = reflectionv1.ServerReflectionRequest
	type resp = reflectionv1.ServerReflectionResponse
	stream, err := reflectionv1.NewServerReflectionClient(c.std).ServerReflectionInfo(ctx)
	if err != nil {
		return "", err
	}
	return reflect[req, resp](stream,
		&req{MessageRequest: &reflectionv1.ServerReflectionRequest_ListServices{}},
		&req{MessageRequest: &reflectionv1.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: grpcwire.Service}},
		func(r *resp) ([]string, error) {
			if e := r.GetErrorResponse(); e != nil {
				return nil, fmt.Errorf("error response %d %q", e.GetErrorCode(), e.GetErrorMessage())
			}
			var out []string
			for _, s := range r.GetListServicesResponse().GetService() {
				out = append(out, s.GetName())
			}
			return out, nil
		},
		func(r *resp) ([][]byte, error) {
			if e := r.GetErrorResponse(); e != nil {
				return nil, fmt.Errorf("error response %d %q", e.GetErrorCode(), e.GetErrorMessage())
			}
			return r.GetFileDescriptorResponse().GetFileDescriptorProto(), nil
		})
}

func checkReflectionV1alpha(ctx context.Context, c *client) (string, error) {
	type req = reflectionv1alpha.ServerReflectionRequest
	type resp = reflectionv1alpha.ServerReflectionResponse
	stream, err := reflectionv1alpha.NewServerReflectionClient(c.std).ServerReflectionInfo(ctx)
	if err != nil {
		return "", err
	}
	return reflect[req, resp](stream,
		&req{MessageRequest: &reflectionv1alpha.ServerReflectionRequest_ListServices{}},
		&req{MessageRequest: &reflectionv1alpha.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: grpcwire.Service}},
		func(r *resp) ([]string, error) {
			if e := r.GetErrorResponse(); e != nil {
				return nil, fmt.Errorf("error response %d %q", e.GetErrorCode(), e.GetErrorMessage())
			}
			var out []string
			for _, s := range r.GetListServicesResponse().GetService() {
				out = append(out, s.GetName())
			}
			return out, nil
		},
		func(r *resp) ([][]byte, error) {
			if e := r.GetErrorResponse(); e != nil {
				return nil, fmt.Errorf("error response %d %q", e.GetErrorCode(), e.GetErrorMessage())
			}
			return r.GetFileDescriptorResponse().GetFileDescriptorProto(), nil
		})
}

// checkDrainTrailer streams, says so on stderr (drainReady), and expects the server's drain
// to end the stream with UNAVAILABLE and the trailer pricestream-reconnect: resume-session.
func checkDrainTrailer(ctx context.Context, c *client) (string, error) {
	s, err := c.createSession(ctx, c.tickers)
	if err != nil {
		return "", err
	}
	stream, err := c.openStream(ctx, s.ID)
	if err != nil {
		return "", err
	}
	if _, err := nextBatch(stream, s.Tickers); err != nil {
		return "", fmt.Errorf("first batch: %w", err)
	}
	fmt.Fprintln(os.Stderr, drainReady)
	err = recvEnd(stream)
	if err := wantStatus(err, codes.Unavailable, ""); err != nil {
		return "", err
	}
	trailer := stream.Trailer()
	if got := trailer.Get("pricestream-reconnect"); !slices.Equal(got, []string{"resume-session"}) {
		return "", fmt.Errorf("UNAVAILABLE with trailer pricestream-reconnect %v, want [resume-session] (trailer %v)", got, trailer)
	}
	return fmt.Sprintf("UNAVAILABLE %q with trailer pricestream-reconnect: resume-session",
		status.Convert(err).Message()), nil
}
