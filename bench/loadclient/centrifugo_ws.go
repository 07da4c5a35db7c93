package main

// The -protocol centrifugo-ws mode: each user holds one Centrifugo unidirectional WebSocket
// (/connection/uni_websocket, JSON protocol; internal/uniws in centrifugal/centrifugo v6): the
// first message it sends is a ConnectRequest whose subs map names its channels
// ({"subs":{"prices:AAPL":{},...}}), then it reads Push messages: {"connect":{...,"subs":{...}}},
// {"channel":"prices:AAPL","pub":{"data":<the update's JSON>,...}}, {} (Centrifugo's ping), or
// {"disconnect":{"code":N,...}}. With uni_websocket.join_push_messages several pushes share one
// frame, one per line.
//
// The feed (scripts/bench_feed.py --format centrifugo-json) publishes each tick as the same
// JSON object pricestream's browser frames carry, so latency is read from its
// publishedAtUnixNanos exactly as in the ws mode. Centrifugo does not coalesce: an update is a
// push; a frame is a "batch" (one push, or several joined).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/coder/websocket"
)

var (
	pushConnectPrefix    = []byte(`{"connect":`)
	pushDisconnectPrefix = []byte(`{"disconnect":`)
	pushPubKey           = []byte(`"pub":`)
	pushUnsubscribeKey   = []byte(`"unsubscribe":`)
)

// uniConnectRequest is Centrifugo's ConnectRequest in JSON: one SubscribeRequest{} per channel.
func uniConnectRequest(channels []string) []byte {
	subs := make(map[string]struct{}, len(channels))
	for _, ch := range channels {
		subs[ch] = struct{}{}
	}
	b, _ := json.Marshal(map[string]any{"subs": subs})
	return b
}

// centrifugoWSUser connects (retrying until createBy, as the gRPC user retries), reads pushes
// until told to leave, then drops the socket (as the uni-gRPC mode cancels its stream).
func (r *run) centrifugoWSUser(index int, createBy time.Time, leave <-chan struct{}, rng *rand.Rand) {
	channels := r.pickTickers(rng)
	for i := range channels {
		channels[i] = r.cfg.channelPrefix + channels[i]
	}
	request := uniConnectRequest(channels)
	for {
		connected, ok := r.uniWebSocket(request, len(channels), leave)
		if ok || connected {
			return // left, or the socket ended after it was up (counted as an error, not retried)
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

// uniWebSocket holds one socket: (whether Centrifugo's connect push came, whether the user
// left).
func (r *run) uniWebSocket(request []byte, channels int, leave <-chan struct{}) (bool, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	conn, resp, err := websocket.Dial(ctx, "ws://"+r.cfg.target+"/connection/uni_websocket",
		&websocket.DialOptions{
			HTTPClient:      r.web.stream,
			CompressionMode: websocket.CompressionDisabled,
		})
	if err == nil {
		err = conn.Write(ctx, websocket.MessageText, request)
	}
	cancel()
	if err != nil {
		if resp != nil && resp.StatusCode != 101 {
			r.count(fmt.Sprintf("connect:HTTP%d", resp.StatusCode))
		} else {
			r.count("connect:transport")
		}
		if conn != nil {
			_ = conn.CloseNow()
		}
		return false, false
	}
	conn.SetReadLimit(1 << 20)
	done := make(chan error, 1)
	connectedCh := make(chan struct{})
	go func() { done <- r.readUni(conn, channels, connectedCh) }()
	connected := false
	defer func() {
		if connected {
			r.streaming.Add(-1)
		}
	}()
	for {
		select {
		case <-connectedCh:
			connectedCh = nil
			connected = true
			r.created.Add(1)
			r.streaming.Add(1)
		case <-leave:
			_ = conn.CloseNow()
			<-done
			r.cancelled.Add(1)
			return connected, true
		case err := <-done:
			what := "connect:"
			if connected {
				what = "stream:"
			}
			var disconnect uniDisconnect
			switch {
			case errors.As(err, &disconnect):
				r.count(fmt.Sprintf("%sDisconnect%d", what, disconnect.Code))
			case websocket.CloseStatus(err) != -1:
				r.count(fmt.Sprintf("%s%d", what, websocket.CloseStatus(err)))
			default:
				r.count(what + "1006")
			}
			_ = conn.CloseNow()
			return connected, false
		}
	}
}

type uniDisconnect struct {
	Code   int    `json:"code"`
	Reason string `json:"reason"`
}

func (d uniDisconnect) Error() string { return fmt.Sprintf("disconnect %d %s", d.Code, d.Reason) }

// readUni reads frames until the socket ends, each frame one push or several joined by '\n'.
func (r *run) readUni(conn *websocket.Conn, channels int, connected chan struct{}) error {
	var buf bytes.Buffer
	for {
		_, reader, err := conn.Reader(context.Background())
		if err != nil {
			return err
		}
		buf.Reset()
		if _, err := buf.ReadFrom(reader); err != nil {
			return err
		}
		now := time.Now().UnixNano()
		data := buf.Bytes()
		publications := 0
		for len(data) > 0 {
			line := data
			if i := bytes.IndexByte(data, '\n'); i >= 0 {
				line, data = data[:i], data[i+1:]
			} else {
				data = nil
			}
			switch {
			case len(line) == 0 || bytes.Equal(line, []byte("{}")): // a ping
			case bytes.HasPrefix(line, pushConnectPrefix):
				var push struct {
					Connect struct {
						Subs map[string]json.RawMessage `json:"subs"`
					} `json:"connect"`
				}
				if err := json.Unmarshal(line, &push); err != nil {
					r.count("decode:connect")
				}
				if len(push.Connect.Subs) != channels {
					r.count(fmt.Sprintf("subscribe:%d_of_%d", len(push.Connect.Subs), channels))
				}
				if connected != nil {
					close(connected)
					connected = nil
				}
			case bytes.HasPrefix(line, pushDisconnectPrefix):
				var push struct {
					Disconnect uniDisconnect `json:"disconnect"`
				}
				_ = json.Unmarshal(line, &push)
				return push.Disconnect
			case bytes.Contains(line, pushUnsubscribeKey):
				r.count("stream:Unsubscribe")
			case bytes.Contains(line, pushPubKey):
				if !r.measuring.Load() {
					continue
				}
				n := eachPublishTime(line, func(published int64) {
					r.latency.observe(time.Duration(now - published))
				})
				if n != 1 {
					r.count("decode:publication")
					continue
				}
				publications++
			}
		}
		if publications > 0 {
			r.updates.Add(int64(publications))
			r.batches.Add(1)
		}
	}
}
