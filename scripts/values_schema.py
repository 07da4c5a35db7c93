"""Generate deploy/helm/pricestream/values.schema.json from values.yaml.

Every key of values.yaml becomes a property with the type of its default and
`additionalProperties: false`, so a misspelled value fails `helm install/lint/template`.
Kubernetes objects and free-form maps are listed in FREE_FORM; enums and special cases in
OVERRIDES. Run `make schema` after changing values.yaml; a test fails when the file is stale.

    python scripts/values_schema.py          # write
    python scripts/values_schema.py --check  # exit 1 if stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "deploy/helm/pricestream"
FREE_FORM = {
    "imagePullSecrets",
    "extraEnv",
    "service.annotations",
    "resources",
    "topologySpreadConstraints",
    "nodeSelector",
    "tolerations",
    "affinity",
    "podAnnotations",
    "podLabels",
    "autoscaling.behavior",
    "serviceAccount.annotations",
    "networkPolicy.grpcFrom",
    "networkPolicy.httpFrom",
    "networkPolicy.metricsFrom",
    "networkPolicy.externalRedisTo",
    "networkPolicy.otlpTo",
    "podSecurityContext",
    "securityContext",
    "monitoring.labels",
    "feed.resources",
    "redis.resources",
}
DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
# Settings the server requires above zero (pydantic `gt=0`): the schema says so too.
POSITIVE = frozenset({"config.webPingInterval", "config.webPongTimeout"})
# Annotations are strings to the API server: an unquoted `3600` would fail at install.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OVERRIDES: dict[str, dict[str, Any]] = {
    "image.tag": {"type": "string", "not": {"const": "latest"}},
    "image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "redis.image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "readinessProbeMode": {"enum": ["grpc", "http"]},
    "service.type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "config.logLevel": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
    # Addresses and CIDR networks only (the server checks each entry at start; a host name
    # fails here, at install, instead of in a crash-looping pod).
    "config.trustedProxies": {"type": "string", "pattern": r"^[0-9A-Fa-f:.,/ ]*$"},
    "autoscaling.sessionsPerPod.averageValue": {"type": ["string", "integer"]},
    "monitoring.serviceMonitor.interval": DURATION,
    "monitoring.serviceMonitor.scrapeTimeout": DURATION,
    "redis.external.url": {"type": "string", "pattern": r"^$|^(redis|rediss)://"},
    "redis.mode": {"enum": ["standalone", "sentinel", "cluster"]},
    "monitoring.rules.runbookUrl": {"type": "string", "pattern": r"^https?://"},
    "ports.grpc": PORT,
    "ports.metrics": PORT,
    "ports.http": PORT,
    "ingress.path": {"type": "string", "pattern": "^/"},
    "ingress.annotations": STRING_MAP,
    "grpcIngress.annotations": STRING_MAP,
    "slo.period": DURATION,
    # Objectives in percent: 100 would leave no error budget (every burn rate infinite).
    **{
        f"slo.{name}.objective": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100}
        for name in ("freshness", "availability", "continuity")
    },
}
MINIMUM_ONE = {"replicaCount", "autoscaling.minReplicas", "autoscaling.maxReplicas"}
# Settings that are counts; every other number under config is seconds or a rate (fractions ok).
WHOLE_NUMBERS = {
    "config.maxSessions",
    "config.maxTickersPerSession",
    "config.sessionCreateBurst",
    "config.pubsubConnections",
    "config.webAcceptBurst",
}


def schema_for(value: Any, path: str) -> dict[str, Any]:
    if path in OVERRIDES:
        return dict(OVERRIDES[path])
    if path in FREE_FORM:
        return {"type": "array" if isinstance(value, list) else "object"}
    if path.startswith("monitoring.rules.params."):
        return {"type": ["string", "number"]}
    if isinstance(value, dict):
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                key: schema_for(child, f"{path}.{key}" if path else key)
                for key, child in value.items()
            },
        }
    if isinstance(value, bool):
        return {"type": "boolean"}
    if path in POSITIVE:
        return {"type": "number", "exclusiveMinimum": 0}
    if path.startswith("config.") and isinstance(value, int | float) and path not in WHOLE_NUMBERS:
        return {"type": "number", "minimum": 0}
    if isinstance(value, int):
        return {"type": "integer", "minimum": 1 if path in MINIMUM_ONE else 0}
    if isinstance(value, float):
        return {"type": "number", "exclusiveMinimum": 0}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        return {"type": "array"}
    raise TypeError(f"{path}: no schema for {value!r}")


def render() -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "pricestream chart values",
        **schema_for(values, ""),
    }
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> int:
    path, text = CHART / "values.schema.json", render()
    if "--check" in argv:
        if not path.exists() or path.read_text() != text:
            print("values.schema.json is stale: run `make schema`", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
