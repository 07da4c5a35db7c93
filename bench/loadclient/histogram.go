package main

import (
	"sync/atomic"
	"time"
)

// latencyHistogram counts latencies in 100 µs buckets up to two minutes; later ones land in
// the last bucket. Safe for concurrent use without a lock.
type latencyHistogram struct {
	buckets [1_200_000]atomic.Int64
	max     atomic.Int64
}

const bucketWidth = 100 * time.Microsecond

func (h *latencyHistogram) observe(d time.Duration) {
	if d < 0 {
		d = 0
	}
	i := int(d / bucketWidth)
	if i >= len(h.buckets) {
		i = len(h.buckets) - 1
	}
	h.buckets[i].Add(1)
	for {
		old := h.max.Load()
		if int64(d) <= old || h.max.CompareAndSwap(old, int64(d)) {
			return
		}
	}
}

// quantiles returns the upper edge, in milliseconds, of the bucket holding each quantile, or the
// largest latency observed if that is lower: no quantile is reported above the maximum.
func (h *latencyHistogram) quantiles(qs ...float64) []float64 {
	var total int64
	for i := range h.buckets {
		total += h.buckets[i].Load()
	}
	out := make([]float64, len(qs))
	if total == 0 {
		return out
	}
	highest := float64(h.max.Load()) / float64(time.Millisecond)
	for j, q := range qs {
		rank := int64(q*float64(total) + 0.5)
		if rank < 1 {
			rank = 1
		}
		var seen int64
		for i := range h.buckets {
			seen += h.buckets[i].Load()
			if seen >= rank {
				out[j] = min(float64(time.Duration(i+1)*bucketWidth)/float64(time.Millisecond), highest)
				break
			}
		}
	}
	return out
}
