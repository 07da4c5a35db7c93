package main

// The three messages the benchmark client speaks, encoded and decoded with protowire, so the
// client needs no generated code: the wire format of proto/pricestream/v1/pricestream.proto.

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

const (
	methodCreateSession = "/pricestream.v1.PriceStreamService/CreateSession"
	methodStream        = "/pricestream.v1.PriceStreamService/StreamPriceUpdates"
	methodCloseSession  = "/pricestream.v1.PriceStreamService/CloseSession"
)

// rawCodec hands bytes through unchanged: requests are encoded here, replies decoded here.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

// createSessionRequest encodes CreateSessionRequest{tickers: tickers}.
func createSessionRequest(tickers []string) []byte {
	var b []byte
	for _, t := range tickers {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, t)
	}
	return b
}

// sessionIDRequest encodes StreamPriceUpdatesRequest or CloseSessionRequest (field 1 both).
func sessionIDRequest(id string) []byte {
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	return protowire.AppendString(b, id)
}

// sessionID reads Session.session_id (field 1).
func sessionID(b []byte) (string, error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, n := protowire.ConsumeString(b)
			if n < 0 {
				return "", protowire.ParseError(n)
			}
			return v, nil
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		b = b[n:]
	}
	return "", errors.New("Session without session_id")
}

// publishTimes calls visit with published_at_unix_nanos of every PriceUpdate in a
// PriceUpdateBatch and returns how many updates it held.
func publishTimes(batch []byte, visit func(int64)) (int, error) {
	count := 0
	for len(batch) > 0 {
		num, typ, n := protowire.ConsumeTag(batch)
		if n < 0 {
			return count, protowire.ParseError(n)
		}
		batch = batch[n:]
		if num != 1 || typ != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, typ, batch)
			if n < 0 {
				return count, protowire.ParseError(n)
			}
			batch = batch[n:]
			continue
		}
		update, n := protowire.ConsumeBytes(batch)
		if n < 0 {
			return count, protowire.ParseError(n)
		}
		batch = batch[n:]
		count++
		visit(updatePublishedAt(update))
	}
	return count, nil
}

func updatePublishedAt(update []byte) int64 {
	for len(update) > 0 {
		num, typ, n := protowire.ConsumeTag(update)
		if n < 0 {
			return 0
		}
		update = update[n:]
		if num == 3 && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(update)
			if n < 0 {
				return 0
			}
			return int64(v)
		}
		n = protowire.ConsumeFieldValue(num, typ, update)
		if n < 0 {
			return 0
		}
		update = update[n:]
	}
	return 0
}
