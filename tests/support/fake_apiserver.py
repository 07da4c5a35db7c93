"""A stand-in Kubernetes API server on loopback, just enough for `helm template --dry-run=server`:
discovery of the kinds the chart renders, GET of single objects, LIST of a namespace or of a
cluster-scoped kind. It lets the chart's `lookup` calls (live replicas, StorageClasses, existing
Secrets) be tested without a cluster; it proves the template logic, not the API server's."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# group/version → (kind, plural, namespaced) of what the chart renders or looks up
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("ConfigMap", "configmaps", True),
        ("Secret", "secrets", True),
        ("Service", "services", True),
        ("ServiceAccount", "serviceaccounts", True),
        ("Pod", "pods", True),
        ("PersistentVolumeClaim", "persistentvolumeclaims", True),
        ("Namespace", "namespaces", False),
    ],
    "apps/v1": [("Deployment", "deployments", True)],
    "autoscaling/v2": [("HorizontalPodAutoscaler", "horizontalpodautoscalers", True)],
    "policy/v1": [("PodDisruptionBudget", "poddisruptionbudgets", True)],
    "networking.k8s.io/v1": [("NetworkPolicy", "networkpolicies", True)],
    "storage.k8s.io/v1": [("StorageClass", "storageclasses", False)],
    "monitoring.coreos.com/v1": [
        ("ServiceMonitor", "servicemonitors", True),
        ("PrometheusRule", "prometheusrules", True),
    ],
}
PATH = re.compile(
    r"/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?"
)


class FakeApiServer:
    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    def _answer(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "x"}
        if path == "/api":
            return 200, {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [],
            }
        if path == "/apis":
            groups = [gv for gv in RESOURCES if "/" in gv]
            return 200, {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": gv.split("/")[0],
                        "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                        "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]},
                    }
                    for gv in groups
                ],
            }
        for gv, kinds in RESOURCES.items():
            if path == ("/api/v1" if gv == "v1" else f"/apis/{gv}"):
                return 200, {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": gv,
                    "resources": [
                        {
                            "name": plural,
                            "singularName": kind.lower(),
                            "namespaced": namespaced,
                            "kind": kind,
                            "verbs": ["get", "list", "create", "update", "patch", "delete"],
                        }
                        for kind, plural, namespaced in kinds
                    ],
                }
        match = PATH.fullmatch(path)
        if not match:
            return 404, status(404, "NotFound", path)
        gv = match["core"] or f"{match['group']}/{match['version']}"
        kinds = {plural: kind for kind, plural, _ in RESOURCES.get(gv, [])}
        kind = kinds.get(match["plural"])
        if kind is None:
            return 404, status(404, "NotFound", path)
        found = [
            o
            for o in self.objects
            if o["apiVersion"] == gv
            and o["kind"] == kind
            and o["metadata"].get("namespace") == match["ns"]
        ]
        if match["name"] is None:
            return 200, {
                "apiVersion": gv,
                "kind": f"{kind}List",
                "metadata": {"resourceVersion": "1"},
                "items": found,
            }
        for obj in found:
            if obj["metadata"]["name"] == match["name"]:
                return 200, obj
        return 404, status(404, "NotFound", f'{match["plural"]} "{match["name"]}" not found')

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                fake.requests.append(path)
                code, body = fake._answer(path)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    @contextmanager
    def running(self) -> Iterator[FakeApiServer]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join(timeout=5)


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
