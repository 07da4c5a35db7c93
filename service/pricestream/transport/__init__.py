"""Our own HTTP/2 gRPC server on h2: framing, flow control, connections, calls and limits."""
