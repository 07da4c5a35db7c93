"""Hand the configuration prometheus-operator generates to the e2e cluster's host Prometheus.

The operator writes, for the Prometheus object monitoring/e2e, a Secret `prometheus-e2e` (key
`prometheus.yaml.gz`: the scrape configuration it derives from every selected ServiceMonitor) and
ConfigMaps `prometheus-e2e-rulefiles-N` (one file per selected PrometheusRule). In a pod, its
config-reloader sidecar would write those to the Prometheus container's disk. Here Prometheus is
Debian's binary on the host, so this loop does that part.

Debian's Prometheus 2.42 (+ds) is built without Kubernetes service discovery
(`kubernetes_sd_configs` does not parse). So each `kubernetes_sd_configs` entry the operator wrote
(role endpoints) becomes a `file_sd_configs` entry whose file this loop keeps filled with the
targets Prometheus's own endpoints discovery would produce, carrying the same
`__meta_kubernetes_*` labels (endpoints, service, pod and container port), read from the API
server. The operator's relabel rules, which pick the ServiceMonitor's targets and set job,
namespace, pod and service, then run unchanged in Prometheus. The rule file paths point at the
host folder, and $(SHARD) and $(POD_NAME) are expanded as the config-reloader does. Everything
else is the operator's configuration as generated. Prometheus is
reloaded (POST /-/reload) when the configuration or a rule file changed; file_sd files are
re-read by Prometheus itself.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml
from shell_vars import shell_vars  # beside this script: its folder is on sys.path

V = shell_vars()
STATE = Path(os.environ.get("E2E_STATE", V["STATE"]))
PROM_DIR = STATE / "prometheus"
RULES_DIR = PROM_DIR / "rules"
SD_DIR = PROM_DIR / "sd"
KUBECONFIG = str(STATE / "pki" / "monitoring.kubeconfig")
RELOAD_URL = f"http://127.0.0.1:{V['PROMETHEUS_PORT']}/-/reload"
# Where the operator's pods would mount the rule ConfigMaps.
POD_RULES_DIR = "/etc/prometheus/rules/"


def kubectl_json(*args: str) -> dict:
    out = subprocess.run(
        [V["KUBECTL"], "--kubeconfig", KUBECONFIG, *args, "-o", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return json.loads(out)


def sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def object_labels(prefix: str, meta: dict) -> dict[str, str]:
    out = {}
    for kind, key in (("label", "labels"), ("annotation", "annotations")):
        for k, v in (meta.get(key) or {}).items():
            out[f"{prefix}_{kind}_{sanitize(k)}"] = v
            out[f"{prefix}_{kind}present_{sanitize(k)}"] = "true"
    return out


def endpoints_targets(namespaces: list[str]) -> list[dict]:
    """What Prometheus's kubernetes_sd role `endpoints` yields for these namespaces."""
    groups = []
    for ns in namespaces:
        services = {
            s["metadata"]["name"]: s for s in kubectl_json("-n", ns, "get", "services")["items"]
        }
        pods = {p["metadata"]["name"]: p for p in kubectl_json("-n", ns, "get", "pods")["items"]}
        for ep in kubectl_json("-n", ns, "get", "endpoints")["items"]:
            name = ep["metadata"]["name"]
            base = {
                "__meta_kubernetes_namespace": ns,
                "__meta_kubernetes_endpoints_name": name,
                **object_labels("__meta_kubernetes_endpoints", ep["metadata"]),
            }
            if name in services:
                svc = services[name]
                base["__meta_kubernetes_service_name"] = name
                base.update(object_labels("__meta_kubernetes_service", svc["metadata"]))
            targets = []
            for subset in ep.get("subsets") or []:
                for ready, key in (("true", "addresses"), ("false", "notReadyAddresses")):
                    for addr in subset.get(key) or []:
                        for port in subset.get("ports") or []:
                            labels = {
                                **base,
                                "__address__": f"{addr['ip']}:{port['port']}",
                                "__meta_kubernetes_endpoint_ready": ready,
                                "__meta_kubernetes_endpoint_port_name": port.get("name", ""),
                                "__meta_kubernetes_endpoint_port_protocol": port.get(
                                    "protocol", "TCP"
                                ),
                            }
                            ref = addr.get("targetRef") or {}
                            if ref:
                                labels["__meta_kubernetes_endpoint_address_target_kind"] = ref[
                                    "kind"
                                ]
                                labels["__meta_kubernetes_endpoint_address_target_name"] = ref[
                                    "name"
                                ]
                            if addr.get("nodeName"):
                                labels["__meta_kubernetes_endpoint_node_name"] = addr["nodeName"]
                            pod = (
                                pods.get(ref.get("name", "")) if ref.get("kind") == "Pod" else None
                            )
                            if pod is not None:
                                labels.update(pod_labels(pod, port["port"]))
                            targets.append(labels)
            for t in targets:
                groups.append({"targets": [t.pop("__address__")], "labels": t})
    return groups


def pod_labels(pod: dict, port: int) -> dict[str, str]:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    ready = any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
    )
    out = {
        "__meta_kubernetes_pod_name": meta["name"],
        "__meta_kubernetes_pod_ip": status.get("podIP", ""),
        "__meta_kubernetes_pod_ready": str(ready).lower(),
        "__meta_kubernetes_pod_phase": status.get("phase", ""),
        "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
        "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""),
        "__meta_kubernetes_pod_uid": meta["uid"],
        **object_labels("__meta_kubernetes_pod", meta),
    }
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller"):
            out["__meta_kubernetes_pod_controller_kind"] = owner["kind"]
            out["__meta_kubernetes_pod_controller_name"] = owner["name"]
    for c in spec.get("containers", []):
        for p in c.get("ports") or []:
            if p["containerPort"] == port:
                out["__meta_kubernetes_pod_container_name"] = c["name"]
                out["__meta_kubernetes_pod_container_image"] = c["image"]
                out["__meta_kubernetes_pod_container_port_name"] = p.get("name", "")
                out["__meta_kubernetes_pod_container_port_number"] = str(port)
                out["__meta_kubernetes_pod_container_port_protocol"] = p.get("protocol", "TCP")
    return out


def file_sd(sds: list[dict], name: str, discovered: dict[Path, list[dict]]) -> list[dict]:
    """Replace kubernetes_sd_configs by file_sd_configs; remember what each file must hold."""
    out = []
    for i, sd in enumerate(sds):
        if sd.get("role") not in ("endpoints", "endpointslice"):
            raise ValueError(f"{name}: role {sd.get('role')} is not reproduced")
        path = SD_DIR / f"{sanitize(name)}-{i}.json"
        discovered[path] = endpoints_targets(sd.get("namespaces", {}).get("names") or [])
        out.append({"files": [str(path)], "refresh_interval": "5s"})
    return out


def host_config(generated: str, discovered: dict[Path, list[dict]]) -> str:
    # The config-reloader expands $(VAR) from the pod's environment: the shard number (one
    # shard: 0) and the pod's name.
    for var, value in (("$(SHARD)", "0"), ("$(POD_NAME)", "e2e-host")):
        generated = generated.replace(var, value)
    config = yaml.safe_load(generated)
    for job in config.get("scrape_configs") or []:
        if "kubernetes_sd_configs" in job:
            job["file_sd_configs"] = file_sd(
                job.pop("kubernetes_sd_configs"), job["job_name"], discovered
            )
    for i, am in enumerate((config.get("alerting") or {}).get("alertmanagers") or []):
        if "kubernetes_sd_configs" in am:
            am["file_sd_configs"] = file_sd(
                am.pop("kubernetes_sd_configs"), f"alertmanager-{i}", discovered
            )
    config["rule_files"] = [
        str(RULES_DIR) + "/" + f.removeprefix(POD_RULES_DIR) for f in config.get("rule_files") or []
    ]
    return yaml.safe_dump(config, sort_keys=False)


def write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def sync_once() -> bool:
    secret = kubectl_json("-n", "monitoring", "get", "secret", "prometheus-e2e")
    generated = gzip.decompress(base64.b64decode(secret["data"]["prometheus.yaml.gz"])).decode()
    changed = False
    cms = kubectl_json("-n", "monitoring", "get", "configmaps", "-l", "prometheus-name=e2e")
    wanted: set[Path] = set()
    for cm in cms["items"]:
        for key, text in (cm.get("data") or {}).items():
            path = RULES_DIR / cm["metadata"]["name"] / key
            wanted.add(path)
            changed |= write_if_changed(path, text)
    for path in RULES_DIR.glob("*/*"):
        if path not in wanted:
            path.unlink()
            changed = True
    discovered: dict[Path, list[dict]] = {}
    changed |= write_if_changed(PROM_DIR / "prometheus.yaml", host_config(generated, discovered))
    for path, groups in discovered.items():
        write_if_changed(path, json.dumps(groups, indent=1, sort_keys=True))
    return changed


def main() -> None:
    while True:
        try:
            if sync_once():
                print(time.strftime("%H:%M:%S"), "configuration changed", flush=True)
                try:
                    urllib.request.urlopen(
                        urllib.request.Request(RELOAD_URL, method="POST"), timeout=5
                    )
                except OSError as exc:  # Prometheus not started yet: it reads the file at start
                    print("reload:", exc, flush=True)
        except (subprocess.SubprocessError, KeyError, ValueError) as exc:
            print(time.strftime("%H:%M:%S"), "not synced:", exc, flush=True)
        time.sleep(2)


if __name__ == "__main__":
    main()
