"""Metrics, gRPC server metrics, latency histogram, tracing and JSON logs."""
