package main

// The -protocol centrifugo mode: each user holds one Centrifugo uni-directional gRPC stream
// (CentrifugoUniStream.Consume) whose ConnectRequest subscribes its channels, and reads the
// Push messages. The messages are encoded and decoded here with protowire, from the wire
// format of Centrifugo's unistream.proto (internal/unigrpc/unistream in centrifugal/centrifugo
// v6) and of protocol.Publication (centrifugal/protocol); no generated code.
//
// The feed publishes our own serialized PriceUpdate as each Publication's data, so latency is
// measured from published_at_unix_nanos exactly as in the pricestream mode. Centrifugo sends
// one Push per publication: an update is a message (a "batch" of one).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"pricestream/bench/grpcwire"
)

const methodConsume = "/centrifugal.centrifugo.unistream.CentrifugoUniStream/Consume"

// Field numbers of unistream.Push and of the messages inside it.
const (
	pushPub         = 4  // Publication
	pushUnsubscribe = 7  // Unsubscribe
	pushConnect     = 10 // Connect
	pushDisconnect  = 11 // Disconnect

	publicationData = 4 // bytes: our serialized PriceUpdate
	connectSubs     = 4 // map<string, SubscribeResult>
	disconnectCode  = 1 // uint32
)

// connectRequest encodes ConnectRequest{subs: {channel: SubscribeRequest{}} for each channel}.
// A map field is a repeated entry message {1: key, 2: value}.
func connectRequest(channels []string) []byte {
	var b []byte
	for _, ch := range channels {
		var entry []byte
		entry = protowire.AppendTag(entry, 1, protowire.BytesType)
		entry = protowire.AppendString(entry, ch)
		entry = protowire.AppendTag(entry, 2, protowire.BytesType)
		entry = protowire.AppendBytes(entry, nil) // SubscribeRequest{}: no recovery
		b = protowire.AppendTag(b, 3, protowire.BytesType)
		b = protowire.AppendBytes(b, entry)
	}
	return b
}

// push is what a Push message carries that the client acts on.
type push struct {
	publication []byte // Publication.data when the push is a publication
	connect     bool
	subscribed  int    // channels in Connect.subs
	disconnect  uint64 // Disconnect.code, when the push is a disconnect
	closed      bool   // a Disconnect or an Unsubscribe push
}

// decodePush reads one Push message.
func decodePush(b []byte) (push, error) {
	var p push
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case pushPub:
			return eachField(v, func(n protowire.Number, t protowire.Type, data []byte, _ uint64) error {
				if n == publicationData && t == protowire.BytesType {
					p.publication = data
				}
				return nil
			})
		case pushConnect:
			p.connect = true
			return eachField(v, func(n protowire.Number, t protowire.Type, _ []byte, _ uint64) error {
				if n == connectSubs && t == protowire.BytesType {
					p.subscribed++
				}
				return nil
			})
		case pushDisconnect:
			p.closed = true
			return eachField(v, func(n protowire.Number, t protowire.Type, _ []byte, code uint64) error {
				if n == disconnectCode && t == protowire.VarintType {
					p.disconnect = code
				}
				return nil
			})
		case pushUnsubscribe:
			p.closed = true
		}
		return nil
	})
	return p, err
}

// eachField calls visit for every field of a message with its payload: the bytes of a
// length-delimited field, the value of a varint (other wire types are skipped over).
func eachField(b []byte, visit func(protowire.Number, protowire.Type, []byte, uint64) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		var payload []byte
		var varint uint64
		switch typ {
		case protowire.BytesType:
			payload, n = protowire.ConsumeBytes(b)
		case protowire.VarintType:
			varint, n = protowire.ConsumeVarint(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		if err := visit(num, typ, payload, varint); err != nil {
			return err
		}
	}
	return nil
}

// centrifugoUser is one virtual user on Centrifugo: connect with its channels (retrying until
// createBy, as a pricestream user retries CreateSession), read pushes until told to leave,
// then cancel the stream.
func (r *run) centrifugoUser(index int, createBy time.Time, leave <-chan struct{}, rng *rand.Rand) {
	conn := r.conns[index%len(r.conns)]
	channels := make([]string, 0, r.cfg.tickersPerSession)
	for _, i := range rng.Perm(len(r.cfg.tickers))[:r.cfg.tickersPerSession] {
		channels = append(channels, r.cfg.channelPrefix+r.cfg.tickers[i])
	}
	request := connectRequest(channels)
	for {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan bool, 1)
		go func() { done <- r.consume(ctx, conn, &request, len(channels)) }()
		select {
		case <-leave:
			cancel()
			<-done
			r.cancelled.Add(1)
			return
		case connected := <-done:
			cancel()
			if connected {
				return // the stream ended after it was up: counted as an error, not retried
			}
		}
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
}

// consume holds one Consume stream until it ends or ctx is cancelled; true when the stream
// got as far as Centrifugo's Connect push.
func (r *run) consume(ctx context.Context, conn *grpc.ClientConn, request *[]byte, channels int) bool {
	desc := &grpc.StreamDesc{StreamName: "Consume", ServerStreams: true}
	stream, err := conn.NewStream(ctx, desc, methodConsume)
	if err != nil {
		r.fail("connect", err)
		return false
	}
	if err := stream.SendMsg(request); err != nil && !errors.Is(err, io.EOF) {
		r.fail("connect", err)
		return false
	}
	if err := stream.CloseSend(); err != nil {
		r.fail("connect", err)
		return false
	}
	connected := false
	defer func() {
		if connected {
			r.streaming.Add(-1)
		}
	}()
	var message []byte
	for {
		if err := stream.RecvMsg(&message); err != nil {
			if ctx.Err() == nil {
				if errors.Is(err, io.EOF) {
					err = status.Error(codes.Unavailable, "stream ended by the server")
				}
				what := "connect"
				if connected {
					what = "stream"
				}
				r.fail(what, err)
			}
			return connected
		}
		p, err := decodePush(message)
		if err != nil {
			r.fail("decode", status.Error(codes.DataLoss, err.Error()))
			continue
		}
		switch {
		case p.connect:
			if p.subscribed != channels {
				r.fail("subscribe", status.Error(codes.PermissionDenied,
					fmt.Sprintf("subscribed %d of %d channels", p.subscribed, channels)))
			}
			connected = true
			r.created.Add(1)
			r.streaming.Add(1)
		case p.closed: // the server refused or ended the connection or a subscription
			what, code := "connect:", "Unsubscribe"
			if connected {
				what = "stream:"
			}
			if p.disconnect != 0 {
				code = fmt.Sprintf("Disconnect%d", p.disconnect)
			}
			r.errMu.Lock()
			r.errors[what+code]++
			r.errMu.Unlock()
			return connected
		case p.publication != nil && r.measuring.Load():
			now := time.Now().UnixNano()
			r.latency.observe(time.Duration(now - grpcwire.UpdatePublishedAt(p.publication)))
			r.updates.Add(1)
			r.batches.Add(1)
		}
	}
}
