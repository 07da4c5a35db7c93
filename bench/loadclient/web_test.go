package main

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// The storm's reconnects are spread: full jitter from the first attempt on, within the
// doubling ceiling and the cap (a first pause of exactly the base sent every socket of a
// drop back at one moment).
func TestBackoffIsFullJitterUnderTheCeiling(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base, limit := 200*time.Millisecond, 5*time.Second
	for attempt, ceiling := range []time.Duration{base, 2 * base, 4 * base, limit} {
		if attempt == 3 {
			attempt = 10 // far past the cap
		}
		seen := map[time.Duration]bool{}
		low := ceiling
		for i := 0; i < 2000; i++ {
			pause := backoff(rng, attempt, base, limit)
			if pause < 0 || pause >= ceiling {
				t.Fatalf("attempt %d: pause %v outside [0, %v)", attempt, pause, ceiling)
			}
			seen[pause] = true
			low = min(low, pause)
		}
		if len(seen) < 1000 || low > ceiling/20 {
			t.Errorf("attempt %d: %d distinct pauses, lowest %v: not spread over [0, %v)",
				attempt, len(seen), low, ceiling)
		}
	}
}

func TestOnlyTheClosedSessionAndClientBugsStopAUser(t *testing.T) {
	for code, stops := range map[websocket.StatusCode]bool{
		1000: true, 1002: true, 1007: true, 1008: true, 1009: true,
		1001: false, 1011: false, 1013: false, 4001: false, 4008: false, 4009: false, -1: false,
	} {
		if stopsClient(code) != stops {
			t.Errorf("stopsClient(%d) = %v, want %v", code, !stops, stops)
		}
	}
}
