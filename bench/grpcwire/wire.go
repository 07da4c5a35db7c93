// Package grpcwire is the wire format of proto/pricestream/v1/pricestream.proto for the Go
// clients of this repository (bench/loadclient, tests/grpcgo), encoded and decoded with
// protowire, so neither needs generated code. Calls go through RawCodec with the request bytes
// built here and the reply bytes decoded here.
//
// Two ways to read replies: SessionID, PublishTimes and UpdatePublishedAt read only what the
// load client measures and allocate nothing per update (its hot path); DecodeSession and
// DecodeBatch read every field, for the conformance checks.
package grpcwire

import (
	"errors"
	"fmt"
	"math"

	"google.golang.org/protobuf/encoding/protowire"
)

const (
	Service             = "pricestream.v1.PriceStreamService"
	MethodCreateSession = "/" + Service + "/CreateSession"
	MethodStream        = "/" + Service + "/StreamPriceUpdates"
	MethodCloseSession  = "/" + Service + "/CloseSession"
)

// RawCodec hands bytes through unchanged: requests are encoded here, replies decoded here.
// Use it with grpc.ForceCodec(RawCodec{}) and *[]byte as request and reply.
type RawCodec struct{}

func (RawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (RawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (RawCodec) Name() string { return "proto" }

// CreateSessionRequest encodes CreateSessionRequest{tickers: tickers}.
func CreateSessionRequest(tickers []string) []byte {
	var b []byte
	for _, t := range tickers {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, t)
	}
	return b
}

// SessionIDRequest encodes StreamPriceUpdatesRequest or CloseSessionRequest (field 1 both).
func SessionIDRequest(id string) []byte {
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	return protowire.AppendString(b, id)
}

// --- The load client's readers: only what it measures, nothing allocated per update. ---

// SessionID reads Session.session_id (field 1).
func SessionID(b []byte) (string, error) {
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

// PublishTimes calls visit with published_at_unix_nanos of every PriceUpdate in a
// PriceUpdateBatch and returns how many updates it held.
func PublishTimes(batch []byte, visit func(int64)) (int, error) {
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
		visit(UpdatePublishedAt(update))
	}
	return count, nil
}

// UpdatePublishedAt reads PriceUpdate.published_at_unix_nanos (field 3); 0 if absent or
// malformed.
func UpdatePublishedAt(update []byte) int64 {
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

// --- Full decoders, for the conformance checks. ---

// fields calls visit with every field of a message; visit gets the raw value bytes of
// length-delimited fields and the number of varint and fixed64 fields.
func fields(b []byte, visit func(num protowire.Number, typ protowire.Type, bytes []byte, number uint64)) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		switch typ {
		case protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return protowire.ParseError(n)
			}
			visit(num, typ, v, 0)
			b = b[n:]
		case protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return protowire.ParseError(n)
			}
			visit(num, typ, nil, v)
			b = b[n:]
		case protowire.Fixed64Type:
			v, n := protowire.ConsumeFixed64(b)
			if n < 0 {
				return protowire.ParseError(n)
			}
			visit(num, typ, nil, v)
			b = b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return protowire.ParseError(n)
			}
			b = b[n:]
		}
	}
	return nil
}

// Session is pricestream.v1.Session.
type Session struct {
	ID             string
	Tickers        []string
	ExpiresSeconds int64
}

// DecodeSession reads Session{session_id, tickers, expires_at{seconds}}.
func DecodeSession(b []byte) (Session, error) {
	var s Session
	var inner error
	err := fields(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) {
		switch {
		case num == 1 && typ == protowire.BytesType:
			s.ID = string(v)
		case num == 2 && typ == protowire.BytesType:
			s.Tickers = append(s.Tickers, string(v))
		case num == 3 && typ == protowire.BytesType:
			inner = fields(v, func(num protowire.Number, typ protowire.Type, _ []byte, n uint64) {
				if num == 1 && typ == protowire.VarintType {
					s.ExpiresSeconds = int64(n)
				}
			})
		}
	})
	if err == nil {
		err = inner
	}
	return s, err
}

// PriceUpdate is pricestream.v1.PriceUpdate.
type PriceUpdate struct {
	Ticker      string
	Price       float64
	PublishedAt int64
	Sequence    uint64
}

// DecodeBatch reads PriceUpdateBatch{repeated PriceUpdate updates}.
func DecodeBatch(b []byte) ([]PriceUpdate, error) {
	var updates []PriceUpdate
	var inner error
	err := fields(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) {
		if num != 1 || typ != protowire.BytesType {
			return
		}
		var u PriceUpdate
		if e := fields(v, func(num protowire.Number, typ protowire.Type, s []byte, n uint64) {
			switch {
			case num == 1 && typ == protowire.BytesType:
				u.Ticker = string(s)
			case num == 2 && typ == protowire.Fixed64Type:
				u.Price = math.Float64frombits(n)
			case num == 3 && typ == protowire.VarintType:
				u.PublishedAt = int64(n)
			case num == 4 && typ == protowire.VarintType:
				u.Sequence = n
			}
		}); e != nil && inner == nil {
			inner = e
		}
		updates = append(updates, u)
	})
	if err == nil {
		err = inner
	}
	return updates, err
}
