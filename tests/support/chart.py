"""Render the Helm chart with the project-local helm and pick objects out of the output."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.fake_apiserver import FakeApiServer
from support.waiting import IN_CI

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools/bin/helm"
CHART = ROOT / "deploy/helm/pricestream"
MONITORING_API = "monitoring.coreos.com/v1"


def helm() -> str:
    """The project-local helm (`make helm`): missing fails in CI, skips elsewhere."""
    if not HELM.exists():
        message = "helm is not built: run `make helm`"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return str(HELM)


def render(
    *args: str, release: str = "pricestream", namespace: str = "prod", monitoring_api: bool = True
) -> list[dict[str, Any]]:
    """`helm template` → the rendered objects (empty documents dropped)."""
    command = [helm(), "template", release, str(CHART), "--namespace", namespace, *args]
    if monitoring_api:
        command += ["--api-versions", MONITORING_API]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj.get("kind") == kind]


def escape(value: str) -> str:
    """A value for `--set`: a comma would otherwise split it into two values."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def rules_file(params: dict[str, str] | None = None, selector: str | None = None, **kw: Any) -> str:
    """The rules file as the chart's PrometheusRule carries it, as a Prometheus rules file."""
    args: list[str] = ["--show-only", "templates/prometheusrule.yaml"]
    for name, value in (params or {}).items():
        args += ["--set-string", f"monitoring.rules.params.{name}={escape(value)}"]
    if selector is not None:
        args += ["--set-string", f"monitoring.rules.selector={escape(selector)}"]
    (rule,) = render(*args, **kw)
    return yaml.safe_dump(rule["spec"], sort_keys=False)


def render_against(
    api: FakeApiServer, workdir: Path, *args: str, release: str = "pricestream", ns: str = "prod"
) -> subprocess.CompletedProcess[str]:
    """`helm template --dry-run=server` against the stand-in API server: `lookup` answers from
    its objects (OpenAPI validation off: the stand-in serves no schemas)."""
    kubeconfig = api.kubeconfig(workdir)
    command = [helm(), "template", release, str(CHART), "--namespace", ns, *args]
    command += ["--dry-run=server", "--validate", "--disable-openapi-validation"]
    command += ["--kubeconfig", str(kubeconfig)]
    env = {"HOME": str(workdir), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def owned(
    kind: str,
    api_version: str,
    name: str,
    release: str = "pricestream",
    ns: str = "prod",
    **fields: Any,
) -> dict[str, Any]:
    """A live object as this release's earlier install left it (Helm's ownership metadata)."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {
                "meta.helm.sh/release-name": release,
                "meta.helm.sh/release-namespace": ns,
            },
        },
        **fields,
    }
