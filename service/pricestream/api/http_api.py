"""HTTP side of a pod: /metrics for Prometheus, /healthz (liveness), /readyz (readiness)."""

from __future__ import annotations

from aiohttp import web

from pricestream.engine.engine import Engine


def make_app(engine: Engine) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        # OpenMetrics (with the latency histogram's exemplars) to a scraper that asks for it,
        # as Prometheus always does; the text format to anyone else (curl, urllib, aiohttp).
        body, content_type = engine.metrics.exposition_for(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        """Ready, and each reason a pod may not be: draining, Redis Pub/Sub down,
        overloaded (then also why, as the refused CreateSession calls are told)."""
        overloaded = engine.overloaded
        body: dict[str, object] = {
            "ready": engine.ready,
            "redis_pubsub_healthy": engine.broker.healthy,
            "draining": engine.draining,
            "overloaded": overloaded,
        }
        if overloaded:
            body["overload_reason"] = engine.clock.overload_reason()
        return web.json_response(body, status=200 if engine.ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class HttpServer:
    """Owns the aiohttp runner; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, engine: Engine, host: str, port: int) -> None:
        self._runner = web.AppRunner(make_app(engine), access_log=None, handle_signals=False)
        self._host = host
        self._port = port
        self.port = port

    async def __aenter__(self) -> HttpServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        if server is not None and server.sockets:  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()
