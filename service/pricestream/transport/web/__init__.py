"""The browser transport: HTTP/1.1 (h11) for REST and the page, WebSocket (wsproto for the
handshake, control and client frames; server frames packed by hand) and Server-Sent Events.

It knows HTTP and the two stream protocols, not sessions: an application (``WebApplication``,
implemented by ``pricestream.api.web``) answers requests and drives streams, and each stream's
batches reach the socket through a ``BatchSink`` (``sinks.py``) exactly as gRPC streams do.
"""
