package main

import (
	"testing"
	"time"
)

func TestQuantilesAreBucketEdgesButNeverAboveTheMaximum(t *testing.T) {
	h := new(latencyHistogram)
	for i := 0; i < 98; i++ {
		h.observe(250 * time.Microsecond) // bucket [0.2 ms, 0.3 ms)
	}
	h.observe(1400 * time.Microsecond)
	h.observe(1450 * time.Microsecond) // bucket [1.4 ms, 1.5 ms): its edge is above the maximum
	qs := h.quantiles(0.5, 0.99, 1)
	if qs[0] != 0.3 {
		t.Errorf("p50 = %v ms, want the bucket's upper edge 0.3", qs[0])
	}
	if qs[1] != 1.45 || qs[2] != 1.45 {
		t.Errorf("p99, p100 = %v, %v ms, want both clamped to the maximum 1.45", qs[1], qs[2])
	}
}

func TestQuantilesOfNothingAreZero(t *testing.T) {
	if qs := new(latencyHistogram).quantiles(0.5, 0.99); qs[0] != 0 || qs[1] != 0 {
		t.Errorf("quantiles of an empty histogram = %v, want zeros", qs)
	}
}
