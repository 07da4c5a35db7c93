"""A real Prometheus and Alertmanager on free loopback ports, and a webhook receiver."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from support.waiting import free_port, require_binary


def _get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout}s: {log.read_text()[-2000:]}")


class Daemon:
    """A monitoring binary with its own folder, port and log; stopped by `stop()`."""

    def __init__(self, command: list[str], workdir: Path, ready_url: str) -> None:
        self.log_path = workdir / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(ready_url, self.proc, self.log_path)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Alertmanager(Daemon):
    def __init__(
        self, workdir: Path, webhook_url: str = "", config: dict[str, Any] | None = None
    ) -> None:
        """Every alert to `webhook_url`, or `config` (an alertmanager.yml) as it is."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = config or {
            "route": {
                "receiver": "test-webhook",
                "group_by": ["alertname", "namespace", "pod"],
                "group_wait": "1s",
                "group_interval": "2s",
                "repeat_interval": "1h",
            },
            "receivers": [
                {
                    "name": "test-webhook",
                    "webhook_configs": [{"url": webhook_url, "send_resolved": False}],
                }
            ],
        }
        config_path = workdir / "alertmanager.yml"
        config_path.write_text(yaml.safe_dump(config))
        command = [
            require_binary("prometheus-alertmanager"),  # Debian's name for alertmanager
            f"--config.file={config_path}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # no gossip port: a single test instance
        ]
        super().__init__(command, workdir, f"{self.url}/-/ready")

    def alerts(self, *matchers: str) -> list[dict[str, Any]]:
        """`/api/v2/alerts` (active, silenced and inhibited ones), filtered by `matchers`
        (`severity="ticket"`): each with `labels` and `status` (`state`, `inhibitedBy`)."""
        query = urllib.parse.urlencode([("filter", m) for m in matchers])
        return _get_json(f"{self.url}/api/v2/alerts?{query}")


class Prometheus(Daemon):
    def __init__(
        self,
        workdir: Path,
        targets: dict[str, str],
        labels: dict[str, str],
        rules: str | None = None,
        alertmanager: str | None = None,
    ) -> None:
        """`targets`: pod name -> host:port of its /metrics; `labels` added to every target.
        Exemplar storage is on: a scrape asks for OpenMetrics and keeps its exemplars."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        }
        if rules is not None:
            rules_path = workdir / "pricestream.rules.yaml"
            rules_path.write_text(rules)
            config["rule_files"] = [str(rules_path)]
        if alertmanager is not None:
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]
            }
        config |= {
            "scrape_configs": [
                {
                    "job_name": "pricestream",
                    "scrape_timeout": "900ms",
                    "static_configs": [
                        {"targets": [address], "labels": {**labels, "pod": pod}}
                        for pod, address in targets.items()
                    ],
                }
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        command = [
            require_binary("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--rules.alert.for-grace-period=1s",
            "--rules.alert.resend-delay=1s",
            "--enable-feature=exemplar-storage",
        ]
        super().__init__(command, workdir, f"{self.url}/-/ready")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; raises on a PromQL error."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = _get_json(url)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        """`/api/v1/query_exemplars`: per series, {"seriesLabels", "exemplars": [{"labels",
        "value", "timestamp"}]} of the exemplars stored between `start` and `end` (Unix s)."""
        query = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}"}
        body = _get_json(f"{self.url}/api/v1/query_exemplars?" + urllib.parse.urlencode(query))
        assert body["status"] == "success", body
        return body["data"]

    def firing(self) -> list[dict[str, str]]:
        return [r["metric"] for r in self.query('ALERTS{alertstate="firing"}')]

    def rule_health(self) -> list[tuple[str, str]]:
        """(rule name, lastError) of every rule that failed its last evaluation."""
        body = _get_json(f"{self.url}/api/v1/rules")
        return [
            (rule["name"], rule.get("lastError", ""))
            for group in body["data"]["groups"]
            for rule in group["rules"]
            if rule.get("health") not in ("ok", "unknown")
        ]


@dataclass
class Notification:
    received_at: float  # time.time()
    payload: dict[str, Any]

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return self.payload["alerts"]


@dataclass
class WebhookReceiver:
    """An HTTP server that records every Alertmanager notification it is sent."""

    notifications: list[Notification] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    async def __aenter__(self) -> WebhookReceiver:
        async def receive(request: web.Request) -> web.Response:
            self.notifications.append(Notification(time.time(), await request.json()))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/alerts", receive)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def wait_for(self, alertname: str, timeout: float) -> tuple[Notification, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for notification in self.notifications:
                for alert in notification.alerts:
                    if alert["labels"].get("alertname") == alertname:
                        return notification, alert
            await asyncio.sleep(0.2)
        raise AssertionError(f"no {alertname} notification within {timeout}s")
