package main

// The pricestream messages this program speaks, encoded and decoded with protowire, so it
// needs no generated code: the wire format of proto/pricestream/v1/pricestream.proto.

import (
	"fmt"
	"math"

	"google.golang.org/protobuf/encoding/protowire"
)

const (
	service             = "pricestream.v1.PriceStreamService"
	methodCreateSession = "/" + service + "/CreateSession"
	methodStream        = "/" + service + "/StreamPriceUpdates"
	methodCloseSession  = "/" + service + "/CloseSession"
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

type session struct {
	ID             string
	Tickers        []string
	ExpiresSeconds int64
}

// decodeSession reads Session{session_id, tickers, expires_at{seconds}}.
func decodeSession(b []byte) (session, error) {
	var s session
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

type priceUpdate struct {
	Ticker      string
	Price       float64
	PublishedAt int64
	Sequence    uint64
}

// decodeBatch reads PriceUpdateBatch{repeated PriceUpdate updates}.
func decodeBatch(b []byte) ([]priceUpdate, error) {
	var updates []priceUpdate
	var inner error
	err := fields(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) {
		if num != 1 || typ != protowire.BytesType {
			return
		}
		var u priceUpdate
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
