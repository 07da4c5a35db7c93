"""gRPC over our own HTTP/2 server on h2: connections, calls, flow control, framing."""
