"""Helpers of tests/test_e2e.py: kubectl and helm against the e2e cluster of tests/e2e/cluster/."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
E2E = REPO / "tests" / "e2e" / "cluster"
CHART = REPO / "deploy" / "helm" / "pricestream"
sys.path.insert(0, str(E2E))
from shell_vars import shell_vars  # noqa: E402 - the cluster folder is not a package

V = shell_vars()
STATE = Path(os.environ.get("E2E_STATE", V["STATE"]))
KUBECONFIG = str(STATE / "pki" / "admin.kubeconfig")
KUBECTL = V["KUBECTL"]
HELM = os.environ.get("HELM", V["HELM"])
NODE_IP = V["NODE_IP"]
APP_IMAGE = V["APP_IMAGE"]
REDIS_IMAGE = V["REDIS_IMAGE"]


def run(
    cmd: list[str], *, check: bool = True, timeout: float = 300, stdin: str | None = None
) -> str:
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        env={**os.environ, "KUBECONFIG": KUBECONFIG},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def kubectl(*args: str, check: bool = True, timeout: float = 120, stdin: str | None = None) -> str:
    return run([KUBECTL, *args], check=check, timeout=timeout, stdin=stdin)


def kubectl_json(*args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json"))


def apply(manifest: str) -> None:
    kubectl("apply", "-f", "-", stdin=manifest)


def helm(*args: str, check: bool = True, timeout: float = 400) -> str:
    return run([HELM, *args], check=check, timeout=timeout)


def image_values() -> list[str]:
    """--set flags naming the images built by tests/e2e/cluster/build-images.sh."""
    repo, tag = APP_IMAGE.rsplit(":", 1)
    redis_repo, redis_tag = REDIS_IMAGE.rsplit(":", 1)
    return [
        "--set",
        f"image.repository={repo},image.tag={tag}",
        "--set",
        f"redis.image.repository={redis_repo},redis.image.tag={redis_tag}",
    ]


def wait_until(
    what: str, check: Callable[[], Any], timeout: float = 120, interval: float = 2
) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (AssertionError, subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}"
            )
        time.sleep(interval)


# Every kind a release of the chart can leave behind (namespaced).
LEFTOVER_KINDS = (
    "pods,services,endpointslices,deployments,replicasets,statefulsets,configmaps,secrets,"
    "persistentvolumeclaims,serviceaccounts,roles,rolebindings,poddisruptionbudgets,"
    "horizontalpodautoscalers,networkpolicies,jobs"
)


def namespace_leftovers(namespace: str, extra_kinds: str = "") -> list[str]:
    """Objects in ``namespace`` beyond what Kubernetes puts in every namespace."""
    kinds = LEFTOVER_KINDS + ("," + extra_kinds if extra_kinds else "")
    names = kubectl("-n", namespace, "get", kinds, "-o", "name", "--ignore-not-found").split()
    builtin = {"configmap/kube-root-ca.crt", "serviceaccount/default"}
    return sorted(n for n in names if n not in builtin)


def pod_log(namespace: str, pod: str) -> str:
    """A pod's container logs, read from the kubelet's log folder on this host."""
    logs = sorted((STATE / "pod-logs").glob(f"{namespace}_{pod}_*/*/*.log"))
    return "\n".join(p.read_text(errors="replace") for p in logs)


def ready_pods(namespace: str, selector: str) -> list[dict[str, Any]]:
    pods = kubectl_json("-n", namespace, "get", "pods", "-l", selector)["items"]
    return [
        p
        for p in pods
        if p["metadata"].get("deletionTimestamp") is None
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
    ]


PROMETHEUS = f"http://127.0.0.1:{V['PROMETHEUS_PORT']}"
ALERTMANAGER = f"http://{NODE_IP}:{V['ALERTMANAGER_PORT']}"
WEBHOOK_PORT = int(V["WEBHOOK_PORT"])
# The paths of the webhook that tests/e2e/cluster/alertmanager-config.py gives the shipped
# routing tree's receivers (deploy/alertmanager/alertmanager.yml).
PAGER = "/pager"  # pricestream-pager: severity page (SLO) and critical
TICKETS = "/tickets"  # pricestream-tickets: severity ticket (SLO) and warning


def prom(path: str, **params: str) -> Any:
    """GET Prometheus's HTTP API; the `data` of a successful answer."""
    url = f"{PROMETHEUS}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def prom_query(expr: str) -> list[dict[str, Any]]:
    return prom("/api/v1/query", query=expr)["result"]


def alertmanager_alerts(*matchers: str) -> list[dict[str, Any]]:
    """The cluster Alertmanager's `/api/v2/alerts` (active, silenced and inhibited ones)
    filtered by ``matchers`` (`severity="ticket"`): each with `labels` and `status` (`state`,
    `inhibitedBy`)."""
    query = urllib.parse.urlencode([("filter", m) for m in matchers])
    with urllib.request.urlopen(f"{ALERTMANAGER}/api/v2/alerts?{query}", timeout=10) as resp:
        return json.load(resp)


def pod_exposition(pod_ip: str, port: int = 9464) -> str:
    """A pod's /metrics, fetched straight from its IP (a test host on the e2e bridge)."""
    with urllib.request.urlopen(f"http://{pod_ip}:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


class Webhook:
    """Alertmanager's receivers: records every notification POSTed to 127.0.0.1:WEBHOOK_PORT,
    with the time it arrived (`received_at`) and the path it was POSTed to (`path`: PAGER or
    TICKETS, the receiver that the routing tree chose)."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        received = self.notifications

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append({"received_at": time.time(), "path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", WEBHOOK_PORT), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alerts(
        self, alertname: str, path: str | None = None
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(notification, alert) of every ``alertname`` alert received (at ``path`` only, if
        given)."""
        return [
            (n, a)
            for n in list(self.notifications)
            if path is None or n["path"] == path
            for a in n["alerts"]
            if a["labels"].get("alertname") == alertname
        ]
