"""pricestream: live stock prices streamed over gRPC, fanned out from Redis Pub/Sub."""

__version__ = "0.1.0"
