package grpcwire

import (
	"math"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

func update(ticker string, price float64, published int64, seq uint64) []byte {
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	b = protowire.AppendString(b, ticker)
	b = protowire.AppendTag(b, 2, protowire.Fixed64Type)
	b = protowire.AppendFixed64(b, math.Float64bits(price))
	b = protowire.AppendTag(b, 3, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(published))
	b = protowire.AppendTag(b, 4, protowire.VarintType)
	return protowire.AppendVarint(b, seq)
}

// The load client's lean readers and the full decoders read the same batch alike.
func TestBatchReadersAgree(t *testing.T) {
	var batch []byte
	for i, u := range [][]byte{update("AAPL", 1.5, 100, 1), update("MSFT", 2.25, 200, 2)} {
		batch = protowire.AppendTag(batch, 1, protowire.BytesType)
		batch = protowire.AppendBytes(batch, u)
		if i == 0 { // an unknown field between updates is skipped
			batch = protowire.AppendTag(batch, 9, protowire.VarintType)
			batch = protowire.AppendVarint(batch, 7)
		}
	}
	var times []int64
	n, err := PublishTimes(batch, func(p int64) { times = append(times, p) })
	if err != nil || n != 2 || !slices.Equal(times, []int64{100, 200}) {
		t.Fatalf("PublishTimes = %d %v %v", n, times, err)
	}
	updates, err := DecodeBatch(batch)
	want := []PriceUpdate{{"AAPL", 1.5, 100, 1}, {"MSFT", 2.25, 200, 2}}
	if err != nil || !slices.Equal(updates, want) {
		t.Fatalf("DecodeBatch = %v %v", updates, err)
	}
	if _, err := DecodeBatch(batch[:len(batch)-1]); err == nil {
		t.Fatal("DecodeBatch of a truncated batch: no error")
	}
}

func TestSessionReadersAgree(t *testing.T) {
	expires := protowire.AppendTag(nil, 1, protowire.VarintType)
	expires = protowire.AppendVarint(expires, 1234)
	b := protowire.AppendTag(nil, 2, protowire.BytesType)
	b = protowire.AppendString(b, "AAPL")
	b = append(b, SessionIDRequest("s-1")...) // session_id is field 1 as in the requests
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	b = protowire.AppendBytes(b, expires)
	id, err := SessionID(b)
	if err != nil || id != "s-1" {
		t.Fatalf("SessionID = %q %v", id, err)
	}
	s, err := DecodeSession(b)
	if err != nil || s.ID != "s-1" || !slices.Equal(s.Tickers, []string{"AAPL"}) || s.ExpiresSeconds != 1234 {
		t.Fatalf("DecodeSession = %+v %v", s, err)
	}
	if _, err := SessionID(CreateSessionRequest(nil)); err == nil {
		t.Fatal("SessionID of an empty Session: no error")
	}
}
