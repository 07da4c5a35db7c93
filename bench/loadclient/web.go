package main

// The browser path (docs/browser.md), the original system's flow: each virtual user creates its
// session over REST (POST /v1/sessions with its K tickers), then streams it over a WebSocket
// (-protocol ws, subprotocol pricestream.v1.json, github.com/coder/websocket) or over SSE
// (-protocol sse, a streaming GET read line by line). Every frame is
// {"type":"snapshot"|"prices","seq":n,"updates":[{...,"publishedAtUnixNanos":"<int64>",...}]};
// latency is measured from publishedAtUnixNanos exactly as the gRPC mode measures it from
// published_at_unix_nanos. Snapshots (the first frame of each stream) carry old prices: they
// are counted apart and never enter the latency histogram.
//
// Users leave in three ways, by index: a third DELETE their session (the server closes the
// socket with 1000: counted in left_by_close_session), a third send a close frame
// (left_by_close_frame), a third drop the TCP connection without one (left_by_cancel). SSE has no
// close frame: half DELETE, half drop.
//
// With -storm-at, every WebSocket is dropped at once that long after the hold started (as an
// ingress reload does) and reconnects to the same session with jittered exponential backoff;
// the report's "storm" object says how long until every socket streamed again.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

const subprotocol = "pricestream.v1.json"

// Web close codes the client acts on (docs/browser.md, "Close codes and what a client does").
const (
	closeTryLater       = 1013
	closeUnknownSession = 4004
	closeBusy           = 4009
)

var (
	keyPublished = []byte(`"publishedAtUnixNanos":"`)
	keySeq       = []byte(`"seq":`)
	typeSnapshot = []byte(`{"type":"snapshot"`)
	errNoSession = errors.New("no session")
)

// webClients are the HTTP clients of the browser modes: REST calls share keep-alive
// connections, each stream has a connection of its own (as each browser tab has).
type webClients struct {
	rest   *http.Client
	stream *http.Client
}

func newWebClients() webClients {
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: -1}
	rest := &http.Transport{
		DialContext:         dialer.DialContext,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     30 * time.Second,
	}
	stream := &http.Transport{
		DialContext:         dialer.DialContext,
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
	}
	return webClients{
		rest:   &http.Client{Transport: rest, Timeout: 15 * time.Second},
		stream: &http.Client{Transport: stream},
	}
}

// storm is the reconnect storm's bookkeeping: when every socket was dropped, and when each
// streamed again.
type storm struct {
	at      chan struct{} // closed when the sockets are dropped
	when    atomic.Int64  // Unix nanoseconds of the drop
	dropped atomic.Int64
	resumed atomic.Int64
	lost    atomic.Int64 // sessions the server no longer knew (4004) after the drop
	retries atomic.Int64 // reconnect attempts refused or failed before a stream resumed
	last    atomic.Int64 // nanoseconds from the drop to the last resumed socket's snapshot
	resume  latencyHistogram
}

type stormResult struct {
	Dropped     int64              `json:"dropped"`
	Resumed     int64              `json:"resumed"`
	Lost        int64              `json:"sessions_lost"`
	Retries     int64              `json:"reconnect_retries"`
	AllResumedS float64            `json:"seconds_until_all_resumed"`
	ResumeMs    map[string]float64 `json:"resume_ms"`
}

func (s *storm) result() *stormResult {
	qs := s.resume.quantiles(0.5, 0.99)
	out := &stormResult{
		Dropped: s.dropped.Load(), Resumed: s.resumed.Load(), Lost: s.lost.Load(),
		Retries:  s.retries.Load(),
		ResumeMs: map[string]float64{"p50": qs[0], "p99": qs[1], "max": float64(s.resume.max.Load()) / 1e6},
	}
	if out.Resumed == out.Dropped && out.Dropped > 0 {
		out.AllResumedS = float64(s.last.Load()) / 1e9
	} else {
		out.AllResumedS = -1 // not every dropped socket came back
	}
	return out
}

// backoff is full jitter, as the page's: uniform in [0, min(limit, base*2^attempt)), so the
// sockets of one drop do not all come back at one moment.
func backoff(rng *rand.Rand, attempt int, base, limit time.Duration) time.Duration {
	ceiling := base << min(attempt, 16)
	if ceiling > limit || ceiling <= 0 {
		ceiling = limit
	}
	return time.Duration(rng.Int64N(int64(ceiling)))
}

// tryLaterPause is what the page adds to its backoff after 1011 and 1013 (try later).
const tryLaterPause = time.Second

// stopsClient tells whether a close code ends a user for good rather than a reconnect: 1000
// (the session was closed) and the codes of a client bug (docs/browser.md's table).
func stopsClient(code websocket.StatusCode) bool {
	switch code {
	case websocket.StatusNormalClosure, websocket.StatusProtocolError,
		websocket.StatusInvalidFramePayloadData, websocket.StatusPolicyViolation,
		websocket.StatusMessageTooBig:
		return true
	}
	return false
}

func (r *run) count(key string) {
	r.errMu.Lock()
	r.errors[key]++
	r.errMu.Unlock()
}

func (r *run) pickTickers(rng *rand.Rand) []string {
	tickers := make([]string, 0, r.cfg.tickersPerSession)
	for _, i := range rng.Perm(len(r.cfg.tickers))[:r.cfg.tickersPerSession] {
		tickers = append(tickers, r.cfg.tickers[i])
	}
	return tickers
}

// createWebSession is POST /v1/sessions, retried like CreateSession until createBy; "" when the
// user gave up or was told to leave.
func (r *run) createWebSession(tickers []string, createBy time.Time, leave <-chan struct{}, rng *rand.Rand) string {
	body, _ := json.Marshal(map[string][]string{"tickers": tickers})
	url := "http://" + r.cfg.target + "/v1/sessions"
	for {
		id, err := r.postSession(url, body)
		if err == nil {
			r.created.Add(1)
			return id
		}
		r.count("create:" + err.Error())
		pause := time.Duration(500+rng.IntN(1000)) * time.Millisecond
		if time.Now().Add(pause).After(createBy) {
			return ""
		}
		select {
		case <-leave:
			return ""
		case <-time.After(pause):
		}
	}
}

func (r *run) postSession(url string, body []byte) (string, error) {
	resp, err := r.web.rest.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		return "", errors.New("transport")
	}
	defer resp.Body.Close()
	reply, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", errors.New("transport")
	}
	if resp.StatusCode != http.StatusCreated {
		return "", fmt.Errorf("HTTP%d", resp.StatusCode)
	}
	var created struct {
		SessionID string `json:"session_id"`
	}
	if err := json.Unmarshal(reply, &created); err != nil || created.SessionID == "" {
		return "", errors.New("bad_reply")
	}
	return created.SessionID, nil
}

// deleteWebSession is DELETE /v1/sessions/{id}: true on 204.
func (r *run) deleteWebSession(id string) bool {
	request, _ := http.NewRequest(http.MethodDelete, "http://"+r.cfg.target+"/v1/sessions/"+id, nil)
	resp, err := r.web.rest.Do(request)
	if err != nil {
		r.count("close:transport")
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		r.count(fmt.Sprintf("close:HTTP%d", resp.StatusCode))
		return false
	}
	return true
}

// frame reads one pricestream frame: its updates' publish times into the histogram (unless it
// is the snapshot), and whether seq followed the previous one. It returns the frame's seq.
func (r *run) frame(data []byte, now int64, previousSeq int64) (int64, bool) {
	seq := int64(-1)
	if i := bytes.Index(data, keySeq); i >= 0 {
		seq = leadingInt(data[i+len(keySeq):])
	}
	snapshot := bytes.HasPrefix(data, typeSnapshot)
	if seq < 0 || (snapshot && seq != 1) || (!snapshot && seq != previousSeq+1) {
		r.count("decode:seq")
	}
	if snapshot {
		r.snapshots.Add(1)
		return seq, true
	}
	if !r.measuring.Load() {
		return seq, false
	}
	n := eachPublishTime(data, func(published int64) {
		r.latency.observe(time.Duration(now - published))
	})
	if n < 0 {
		r.count("decode:publishedAtUnixNanos")
		return seq, false
	}
	r.updates.Add(int64(n))
	r.batches.Add(1)
	return seq, false
}

// eachPublishTime calls visit with every "publishedAtUnixNanos":"<int64>" of a frame (the proto3
// JSON mapping writes int64 as a string); the count, or -1 if one did not parse.
func eachPublishTime(data []byte, visit func(int64)) int {
	n := 0
	for {
		i := bytes.Index(data, keyPublished)
		if i < 0 {
			return n
		}
		data = data[i+len(keyPublished):]
		end := bytes.IndexByte(data, '"')
		if end < 0 {
			return -1
		}
		published, err := strconv.ParseInt(string(data[:end]), 10, 64)
		if err != nil {
			return -1
		}
		visit(published)
		n++
		data = data[end:]
	}
}

func leadingInt(b []byte) int64 {
	var v int64
	i := 0
	for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
		v = v*10 + int64(b[i]-'0')
	}
	if i == 0 {
		return -1
	}
	return v
}

// webUser is one virtual user of -protocol ws or sse: create the session, stream it until told
// to leave (reconnecting through the storm), then leave its way.
func (r *run) webUser(index int, createBy time.Time, leave <-chan struct{}, rng *rand.Rand) {
	id := r.createWebSession(r.pickTickers(rng), createBy, leave, rng)
	if id == "" {
		return
	}
	if r.cfg.protocol == "sse" {
		r.sseUser(index, id, createBy, leave, rng)
		return
	}
	stormed := false
	resumed := false // this user's socket streamed again after the storm (counted once)
	attempt := 0
	for {
		var end error // how the last socket ended
		s, err := r.dialWS(id)
		if err != nil {
			r.count("connect:" + err.Error())
		} else {
			inStorm := stormed && !resumed // a connection after the drop, not yet streaming
			end = r.holdWS(index, id, s, leave, inStorm, &stormed)
			if inStorm && s.started {
				resumed = true
			}
			switch {
			case end == nil:
				return // left
			case errors.Is(end, errNoSession):
				return
			case stopsClient(websocket.CloseStatus(end)):
				if websocket.CloseStatus(end) != websocket.StatusNormalClosure {
					r.deleteWebSession(id) // a client bug: its session is not kept
				}
				return // 1000: the session was closed
			}
			if !s.started && stormed {
				r.storm.retries.Add(1)
			}
			if s.started {
				attempt = 0
			}
		}
		// Refused (1013 at the admission rate, 4009 busy) or dropped: back off with jitter and
		// reconnect to the same session, as the page does.
		var pause time.Duration
		if stormed {
			pause = backoff(rng, attempt, r.cfg.stormBackoff, r.cfg.stormBackoffMax)
			if code := websocket.CloseStatus(end); code == closeTryLater || code == 1011 {
				pause += tryLaterPause
			}
		} else {
			pause = time.Duration(500+rng.IntN(1000)) * time.Millisecond
			if time.Now().Add(pause).After(createBy) && !r.everStreamed(index) {
				r.deleteWebSession(id)
				return
			}
		}
		attempt++
		select {
		case <-leave:
			r.deleteWebSession(id)
			return
		case <-time.After(pause):
		}
	}
}

// wsStream is one WebSocket of a user.
type wsStream struct {
	conn    *websocket.Conn
	started bool // its snapshot arrived
}

func (r *run) dialWS(id string) (*wsStream, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, resp, err := websocket.Dial(ctx, "ws://"+r.cfg.target+"/v1/sessions/"+id+"/ws",
		&websocket.DialOptions{
			HTTPClient:      r.web.stream,
			Subprotocols:    []string{subprotocol},
			CompressionMode: websocket.CompressionDisabled,
		})
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("HTTP%d", resp.StatusCode)
		}
		return nil, errors.New("transport")
	}
	conn.SetReadLimit(1 << 20)
	return &wsStream{conn: conn}, nil
}

// holdWS reads the socket until the user leaves (nil), the storm drops it, or the server ends
// it (the error says how; errNoSession when the session is gone for good).
func (r *run) holdWS(index int, id string, s *wsStream, leave <-chan struct{}, inStorm bool, stormed *bool) error {
	done := make(chan error, 1)
	started := make(chan struct{})
	go func() { done <- r.readWS(s, started) }()
	// Only a socket open when the storm comes is dropped by it (once).
	var stormAt <-chan struct{}
	if !*stormed && r.storm.at != nil && r.storm.when.Load() == 0 {
		stormAt = r.storm.at
	}
	var counted bool
	defer func() {
		if counted {
			r.streaming.Add(-1)
		}
	}()
	for {
		select {
		case <-started:
			started = nil
			counted = true
			r.streaming.Add(1)
			s.started = true
			r.markStreamed(index)
			if inStorm {
				since := time.Now().UnixNano() - r.storm.when.Load()
				r.storm.resume.observe(time.Duration(since))
				for {
					last := r.storm.last.Load()
					if since <= last || r.storm.last.CompareAndSwap(last, since) {
						break
					}
				}
				r.storm.resumed.Add(1)
			}
		case <-stormAt:
			*stormed = true
			r.storm.dropped.Add(1) // (a socket still before its snapshot counts too: it has to come back)
			_ = s.conn.CloseNow()
			<-done
			return errors.New("dropped")
		case <-leave:
			r.leaveWS(index, id, s)
			select {
			case <-done:
			case <-time.After(r.cfg.leaveTimeout): // the server's 1000 after DELETE never came
				r.count("close:no_1000")
				_ = s.conn.CloseNow()
				<-done
			}
			return nil
		case err := <-done:
			code := websocket.CloseStatus(err)
			switch {
			case code == -1:
				r.count("stream:1006")
			case code == closeUnknownSession:
				r.count("stream:4004")
				if *stormed {
					r.storm.lost.Add(1)
				}
				return errNoSession
			case (code == closeTryLater || code == closeBusy) && !s.started:
				if !*stormed {
					r.count(fmt.Sprintf("connect:%d", code)) // refused before it streamed
				}
			case stopsClient(code) && code != websocket.StatusNormalClosure:
				r.count(fmt.Sprintf("client_bug:%d", code))
			default:
				r.count(fmt.Sprintf("stream:%d", code))
			}
			return err
		}
	}
}

// leaveWS leaves one of the three ways (see the file's comment).
func (r *run) leaveWS(index int, id string, s *wsStream) {
	switch index % 3 {
	case 0:
		if r.deleteWebSession(id) {
			r.closed.Add(1)
			// the server closes the socket with 1000: wait for it (readWS returns)
			return
		}
		_ = s.conn.CloseNow()
		r.cancelled.Add(1)
	case 1:
		if err := s.conn.Close(websocket.StatusNormalClosure, "bye"); err != nil &&
			websocket.CloseStatus(err) != websocket.StatusNormalClosure {
			r.count("close:frame")
		}
		r.closedByFrame.Add(1)
	default:
		_ = s.conn.CloseNow()
		r.cancelled.Add(1)
	}
}

// readWS reads frames until the socket ends; started is closed at the snapshot.
func (r *run) readWS(s *wsStream, started chan struct{}) error {
	var buf bytes.Buffer
	previous := int64(0)
	for {
		typ, reader, err := s.conn.Reader(context.Background())
		if err != nil {
			return err
		}
		buf.Reset()
		if _, err := buf.ReadFrom(reader); err != nil {
			return err
		}
		if typ != websocket.MessageText {
			r.count("decode:binary")
			continue
		}
		seq, snapshot := r.frame(buf.Bytes(), time.Now().UnixNano(), previous)
		previous = seq
		if snapshot && started != nil {
			close(started)
			started = nil
		}
	}
}

func (r *run) markStreamed(index int) { r.streamed[index].Store(true) }

func (r *run) everStreamed(index int) bool { return r.streamed[index].Load() }

// sseUser streams the session over GET /v1/sessions/{id}/events until told to leave.
func (r *run) sseUser(index int, id string, createBy time.Time, leave <-chan struct{}, rng *rand.Rand) {
	for {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		started := make(chan struct{})
		go func() { done <- r.readSSE(ctx, id, started) }()
		counted := false
		var end error
	wait:
		for {
			select {
			case <-started:
				started = nil
				counted = true
				r.streaming.Add(1)
				r.markStreamed(index)
			case <-leave:
				if index%2 == 0 && r.deleteWebSession(id) {
					r.closed.Add(1)
					select {
					case end = <-done: // the server ends the stream: event close 1000
						if end != nil && !errors.Is(end, errClosed1000) {
							r.count("close:" + end.Error())
						}
					case <-time.After(r.cfg.leaveTimeout):
						r.count("close:no_1000")
						cancel()
						<-done
					}
				} else {
					cancel()
					<-done
					r.cancelled.Add(1)
				}
				end = nil
				break wait
			case end = <-done:
				break wait
			}
		}
		cancel()
		if counted {
			r.streaming.Add(-1)
		}
		if end == nil {
			return
		}
		r.count("stream:" + end.Error())
		if errors.Is(end, errNoSession) || errors.Is(end, errClosed1000) {
			return // the session is gone (1000: closed)
		}
		pause := time.Duration(500+rng.IntN(1000)) * time.Millisecond
		if time.Now().Add(pause).After(createBy) && !r.everStreamed(index) {
			r.deleteWebSession(id)
			return
		}
		select {
		case <-leave:
			r.deleteWebSession(id)
			return
		case <-time.After(pause):
		}
	}
}

var errClosed1000 = errors.New("1000")

// readSSE holds one event stream; it ends with errClosed1000 on `event: close` 1000,
// errNoSession on 404, another error otherwise (nil only when ctx was cancelled).
func (r *run) readSSE(ctx context.Context, id string, started chan struct{}) error {
	request, _ := http.NewRequestWithContext(ctx, http.MethodGet,
		"http://"+r.cfg.target+"/v1/sessions/"+id+"/events", nil)
	request.Header.Set("Accept", "text/event-stream")
	resp, err := r.web.stream.Do(request)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("transport")
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, resp.Body)
		if resp.StatusCode == http.StatusNotFound {
			return fmt.Errorf("HTTP404: %w", errNoSession)
		}
		return fmt.Errorf("HTTP%d", resp.StatusCode)
	}
	lines := bufio.NewReaderSize(resp.Body, 16<<10)
	closing := false
	previous := int64(0)
	for {
		line, err := lines.ReadSlice('\n')
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return errors.New("1006")
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case bytes.Equal(line, []byte("event: close")):
			closing = true
		case bytes.HasPrefix(line, []byte("data: ")):
			data := line[len("data: "):]
			if closing {
				var c struct {
					Code int `json:"code"`
				}
				_ = json.Unmarshal(data, &c)
				if c.Code == 1000 {
					return errClosed1000
				}
				if c.Code == closeUnknownSession {
					return fmt.Errorf("%d: %w", c.Code, errNoSession)
				}
				return fmt.Errorf("%d", c.Code)
			}
			seq, snapshot := r.frame(data, time.Now().UnixNano(), previous)
			previous = seq
			if snapshot && started != nil {
				close(started)
				started = nil
			}
		}
	}
}

// startStorm drops every socket at the given moment.
func (r *run) startStorm(at time.Time) {
	time.Sleep(time.Until(at))
	r.storm.when.Store(time.Now().UnixNano())
	fmt.Fprintln(os.Stderr, "loadclient: storm: dropping every socket")
	close(r.storm.at)
}
