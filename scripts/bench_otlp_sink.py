"""An OTLP/gRPC trace receiver for `make bench`'s tracing cases: takes every export, keeps
nothing but the count of spans, and writes that count to --count-file when terminated.

    python scripts/bench_otlp_sink.py --port 4317 --count-file spans.txt
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        resources = request.resource_spans
        self.spans += sum(len(scope.spans) for r in resources for scope in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def serve(port: int) -> int:
    """Serve until SIGTERM or SIGINT; the spans received."""
    sink = Sink()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(1)
    return sink.spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count-file", type=Path, required=True)
    args = parser.parse_args()
    spans = asyncio.run(serve(args.port))
    args.count_file.write_text(f"{spans}\n")


if __name__ == "__main__":
    main()
