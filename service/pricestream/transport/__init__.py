"""The pod's transports: ``http2`` (gRPC on our own HTTP/2 server) and ``web`` (HTTP/1.1,
WebSocket and SSE for browsers), and what they share: listening sockets, token buckets.
"""
