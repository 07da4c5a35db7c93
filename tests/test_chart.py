"""The Helm chart: lint, schema validation of every rendered object against two Kubernetes
versions and the prometheus-operator CRDs, and assertions on what the objects say."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pricestream.api.server import Server
from pricestream.settings import check_environment, proxy_networks
from support.chart import CHART, escape, find, helm, owned, render, render_against, rules_file
from support.fake_apiserver import FakeApiServer
from support.metric_names import exported_names
from support.processes import pricestream_command

from dashboards import generate

ROOT = Path(__file__).resolve().parents[1]
CI_VALUES = sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
CRDS = ROOT / "tests/data/crds"
CRD_FILES = {
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}


def values(name: str) -> list[str]:
    return ["-f", str(CHART / "ci" / name)]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema, rejecting undeclared fields (as `kubectl --validate=strict` does)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


@pytest.mark.parametrize("name", CI_VALUES)
def test_helm_lint_strict(name: str) -> None:
    result = subprocess.run(
        [helm(), "lint", "--strict", str(CHART), *values(name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("monitoring_api", [True, False], ids=["with-crds", "without-crds"])
@pytest.mark.parametrize("name", CI_VALUES)
def test_rendered_objects_are_valid(name: str, monitoring_api: bool) -> None:
    objects = render(*values(name), monitoring_api=monitoring_api)
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    monitoring_on = "monitoring-off" not in name
    assert ("ServiceMonitor" in kinds) == (monitoring_api and monitoring_on)
    assert ("PrometheusRule" in kinds) == (monitoring_api and monitoring_on)
    for obj in objects:
        if obj["kind"] in CRD_FILES:
            errors = list(crd_validator(obj["kind"]).iter_errors(obj))
            assert not errors, f"{obj['kind']}: {errors[0].message} at {list(errors[0].path)}"
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} on {version}: {exc}")


def test_validation_can_fail() -> None:
    (deployment,) = find(render(), "Deployment")[:1]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    (monitor,) = find(render(), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "5s"
    assert list(crd_validator("ServiceMonitor").iter_errors(monitor))


def server_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [
        d
        for d in find(objects, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    ]
    return deployment


def test_deployment_probes_drain_and_security() -> None:
    objects = render()
    deployment = server_deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": 50051,
        "metrics": 9464,
        "http": 8080,
    }
    assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert container["readinessProbe"]["grpc"] == {
        "port": 50051,
        "service": "pricestream.v1.PriceStreamService",
    }
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = dict((e["name"], e.get("value")) for e in container["env"])
    (config,) = [c for c in find(objects, "ConfigMap") if "PRICESTREAM_DRAIN_TIMEOUT" in c["data"]]
    drain = float(config["data"]["PRICESTREAM_DRAIN_TIMEOUT"])
    web_drain = float(config["data"]["PRICESTREAM_WEB_DRAIN_WINDOW"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + web_drain
    assert env["PRICESTREAM_REDIS_URL"] == "redis://pricestream-redis:6379/0"
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    security = container["securityContext"]
    assert (
        security["runAsNonRoot"]
        if "runAsNonRoot" in security
        else pod["securityContext"]["runAsNonRoot"]
    )
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert "cpu" not in container["resources"]["limits"]
    assert pod["topologySpreadConstraints"]
    (service,) = [s for s in find(objects, "Service") if s["metadata"]["name"] == "pricestream"]
    assert {p["name"]: p.get("appProtocol") for p in service["spec"]["ports"]}["grpc"] == "grpc"


def test_no_pod_gets_service_link_variables() -> None:
    """The chart's Services (pricestream, pricestream-redis) would otherwise inject
    PRICESTREAM_PORT, PRICESTREAM_REDIS_SERVICE_HOST… into every pod of the namespace."""
    specs = {}
    for obj in render():
        if obj["kind"] == "Deployment":
            specs[obj["metadata"]["name"]] = obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":  # the helm test Pod and its uninstall sweeper
            component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            specs[f"{obj['metadata']['name']}/{component}"] = obj["spec"]
    assert set(specs) == {
        "pricestream",
        "pricestream-feed",
        "pricestream-redis",
        "pricestream-test-grpc-health/helm-test",
        "pricestream-test-grpc-health/helm-test-sweeper",
    }
    assert {name: spec.get("enableServiceLinks") for name, spec in specs.items()} == {
        name: False for name in specs
    }


def test_readiness_over_http_when_asked() -> None:
    container = server_deployment(render(*values("tracing-headless-values.yaml")))["spec"][
        "template"
    ]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


async def test_hpa_scales_on_metrics_the_service_exports(server: Server) -> None:
    objects = render(*values("hpa-custom-metric-values.yaml"))
    (hpa,) = find(objects, "HorizontalPodAutoscaler")
    assert "replicas" not in server_deployment(objects)["spec"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    pods_metrics = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert pods_metrics == ["pricestream_sessions_active"]
    exported = exported_names(server.engine.metrics.exposition().decode())
    assert set(pods_metrics) <= exported


AUTOSCALING = ["--set", "autoscaling.enabled=true"]


def rendered_against(api: FakeApiServer, tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    with api.running():
        result = render_against(api, tmp_path, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_turning_autoscaling_on_keeps_the_live_replica_count(tmp_path: Path) -> None:
    """An upgrade that drops spec.replicas makes the API server reset a live Deployment to 1:
    with the HPA on, the chart renders the live count (lookup), omits it on a fresh install."""
    assert "replicas" not in server_deployment(render(*AUTOSCALING))["spec"]
    offline = render(*AUTOSCALING, "--set", "autoscaling.replicasWithoutLookup=4")
    assert server_deployment(offline)["spec"]["replicas"] == 4
    assert server_deployment(render("--set", "replicaCount=3"))["spec"]["replicas"] == 3

    live = owned("Deployment", "apps/v1", "pricestream", spec={"replicas": 5})
    api = FakeApiServer([live])
    objects = rendered_against(
        api, tmp_path, *AUTOSCALING, "--set", "autoscaling.replicasWithoutLookup=4"
    )
    assert server_deployment(objects)["spec"]["replicas"] == 5, "the live count wins"
    assert "/apis/apps/v1/namespaces/prod/deployments/pricestream" in api.requests
    fresh = rendered_against(FakeApiServer([]), tmp_path, *AUTOSCALING)
    assert "replicas" not in server_deployment(fresh)["spec"]


PERSISTENCE = ["--set", "redis.persistence.enabled=true"]


def storage_class(name: str, default: bool = False) -> dict[str, Any]:
    annotations = {"storageclass.kubernetes.io/is-default-class": "true"} if default else {}
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name, "annotations": annotations},
        "provisioner": "example.com/disk",
    }


def test_redis_claim_survives_uninstall_and_takes_a_storage_class() -> None:
    (claim,) = find(render(*PERSISTENCE), "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "storageClassName" not in claim["spec"], "empty: the cluster default"
    named = render(*PERSISTENCE, "--set", "redis.persistence.storageClassName=fast-ssd")
    (claim,) = find(named, "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "fast-ssd"


@pytest.mark.parametrize(
    ("classes", "args", "message"),
    [
        (
            [storage_class("slow")],
            [],
            "redis.persistence.enabled needs a StorageClass and this cluster has no default one:"
            " set redis.persistence.storageClassName (it has: slow)",
        ),
        (
            [storage_class("slow", default=True)],
            ["--set", "redis.persistence.storageClassName=fast"],
            'redis.persistence.storageClassName "fast" names no StorageClass of this cluster'
            " (it has: slow), so the claim would stay Pending",
        ),
        ([storage_class("slow", default=True)], [], None),
        ([storage_class("fast")], ["--set", "redis.persistence.storageClassName=fast"], None),
        ([], ["--set", "redis.persistence.checkStorageClass=false"], None),
    ],
    ids=["no-default", "unknown-name", "default", "named", "check-off"],
)
def test_redis_persistence_fails_clearly_without_a_usable_storage_class(
    tmp_path: Path, classes: list[dict[str, Any]], args: list[str], message: str | None
) -> None:
    api = FakeApiServer(classes)
    with api.running():
        result = render_against(api, tmp_path, *PERSISTENCE, *args)
    if message is None:
        assert result.returncode == 0, result.stderr
        assert find([d for d in yaml.safe_load_all(result.stdout) if d], "PersistentVolumeClaim")
    else:
        assert result.returncode != 0
        assert message in result.stderr


def test_a_kept_claim_keeps_its_storage_class(tmp_path: Path) -> None:
    claim = owned(
        "PersistentVolumeClaim", "v1", "pricestream-redis", spec={"storageClassName": "slow"}
    )
    api = FakeApiServer([claim, storage_class("fast", default=True)])
    with api.running():
        result = render_against(
            api, tmp_path, *PERSISTENCE, "--set", "redis.persistence.storageClassName=fast"
        )
    assert result.returncode != 0
    assert 'the existing claim prod/pricestream-redis uses "slow"' in result.stderr


def test_prometheus_rule_is_the_rules_file_and_dashboards_are_the_generated_json() -> None:
    objects = render()
    (rule,) = find(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(rules_file())["groups"]
    for group in rule["spec"]["groups"]:
        for each in group["rules"]:
            # Every expression, recorded series included, reads only this release's series: two
            # releases' rules must never write the same recorded series (out-of-order samples).
            assert 'job="pricestream",namespace="prod"' in each["expr"], each["expr"]
    (dashboards,) = [
        c for c in find(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboards")
    ]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    for name in generate.DASHBOARDS:
        committed = json.loads((generate.OUT / name).read_text())
        assert json.loads(dashboards["data"][name]) == committed


def test_monitoring_labels_reach_servicemonitor_and_rule() -> None:
    objects = render(*values("kind-values.yaml"))
    for kind in ("ServiceMonitor", "PrometheusRule"):
        (obj,) = find(objects, kind)
        assert obj["metadata"]["labels"]["release"] == "kps"


def test_secrets_only_by_reference() -> None:
    objects = render(*values("external-redis-values.yaml"))
    assert not find(objects, "Secret")
    container = server_deployment(objects)["spec"]["template"]["spec"]["containers"][0]
    (redis_url,) = [e for e in container["env"] if e["name"] == "PRICESTREAM_REDIS_URL"]
    assert redis_url["valueFrom"]["secretKeyRef"] == {
        "name": "pricestream-redis",
        "key": "redis-url",
    }
    volumes = server_deployment(objects)["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "pricestream-auth", "items": [{"key": "tokens", "path": "tokens"}]} in [
        v.get("secret") for v in volumes
    ]
    assert not [d for d in find(objects, "Deployment") if "redis" in d["metadata"]["name"]]


def secret(name: str, *keys: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "prod"},
        "data": dict.fromkeys(keys, "eA=="),
    }


EXISTING_SECRETS = [
    secret("pricestream-redis", "redis-url"),
    secret("pricestream-auth", "tokens"),
    secret("pricestream-tls", "tls.crt", "tls.key", "ca.crt"),
]


@pytest.mark.parametrize(
    ("drop", "replace", "message"),
    [
        (None, None, None),
        (
            "pricestream-auth",
            None,
            'Secret "pricestream-auth", named by auth.existingSecret, does not exist in '
            'namespace "prod": create it before installing',
        ),
        (
            "pricestream-redis",
            None,
            'Secret "pricestream-redis", named by redis.external.existingSecret, does not exist',
        ),
        (
            "pricestream-tls",
            secret("pricestream-tls", "tls.crt", "tls.key"),
            'Secret "pricestream-tls" in namespace "prod", named by tls.existingSecret, has no key'
            ' "ca.crt"',
        ),
    ],
    ids=["all-present", "auth-missing", "redis-missing", "tls-key-missing"],
)
def test_install_fails_naming_a_missing_secret(
    tmp_path: Path, drop: str | None, replace: dict[str, Any] | None, message: str | None
) -> None:
    """Pods waiting for a missing Secret sit in ContainerCreating until `--wait` times out."""
    objects = [s for s in EXISTING_SECRETS if s["metadata"]["name"] != drop]
    api = FakeApiServer(objects + ([replace] if replace else []))
    with api.running():
        result = render_against(api, tmp_path, *values("external-redis-values.yaml"))
    if message is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert message in result.stderr
    # offline (`helm template`, no cluster) the same values render: see
    # test_secrets_only_by_reference


def test_network_policy_admits_monitoring_and_redis_only() -> None:
    (server_policy, redis_policy, feed_policy) = find(render(), "NetworkPolicy")
    metrics_rule = server_policy["spec"]["ingress"][1]
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    redis_egress = server_policy["spec"]["egress"][1]
    assert redis_egress["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "redis"
    )
    assert redis_policy["spec"]["ingress"][0]["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert feed_policy["spec"]["ingress"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicaCont=3"], "additional properties 'replicaCont' not allowed"),
        (["--set", "image.tag=latest"], "/image/tag"),
        (["--set", "readinessProbeMode=tcp"], "/readinessProbeMode"),
        (["--set", "terminationGracePeriodSeconds=5"], "must exceed preStopSleepSeconds"),
        (
            ["--set", "config.webDrainWindow=16"],
            "terminationGracePeriodSeconds (30) must exceed preStopSleepSeconds + "
            "config.drainTimeout + config.webDrainWindow (32)",
        ),
        (["--set-json", "config.webDrainWindow=15.5"], "config.webDrainWindow (32)"),
        (["--set", "ports.http=x"], "/ports/http"),
        (["--set", "ports.http=70000"], "/ports/http"),
        (["--set", "config.webAcceptBurst=1.5"], "/config/webAcceptBurst"),
        (["--set", "config.trustedProxies=ingress-nginx"], "/config/trustedProxies"),
        (["--set", "ingress.path=v1"], "/ingress/path"),
        (["--set", "ingress.annotations.x=3600"], "/ingress/annotations/x"),
        (["--set", "networkPolicy.httpFrom=x"], "/networkPolicy/httpFrom"),
        (
            ["--set", "grpcIngress.enabled=true,grpcIngress.host=g.example.com"],
            "grpcIngress.enabled needs grpcIngress.host and grpcIngress.tls.secretName",
        ),
        (["--set", "redis.enabled=false"], "set redis.external.existingSecret"),
        (
            [
                *["--set", "redis.enabled=false,redis.external.url=redis://r:6379/0"],
                *["--set", "redis.persistence.enabled=true"],
            ],
            "redis.persistence.enabled applies to the in-chart Redis only",
        ),
    ],
)
def test_bad_values_are_rejected_with_a_reason(args: list[str], message: str) -> None:
    command = [helm(), "template", "x", str(CHART), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr


def test_no_latest_image_anywhere() -> None:
    for name in CI_VALUES:
        for obj in render(*values(name)):
            spec = obj.get("spec", {})
            pod = spec.get("template", {}).get("spec") or (spec if obj["kind"] == "Pod" else {})
            for container in pod.get("containers", []):
                image = container["image"]
                assert ":" in image and not image.endswith(":latest"), image


def test_values_schema_is_fresh() -> None:
    result = subprocess.run(
        [ROOT / ".venv/bin/python", ROOT / "scripts/values_schema.py", "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_passes_hadolint() -> None:
    hadolint = ROOT / ".venv/bin/hadolint"
    result = subprocess.run(
        [hadolint, ROOT / "Dockerfile"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and 'ENTRYPOINT ["pricestream"]' in text


def test_kind_workflow_is_visible_with_make_n() -> None:
    result = subprocess.run(
        ["make", "-n", "kind-up", "image", "kind-load", "deploy", "grafana", "kind-down"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for step in [
        "kind create cluster",
        "helm repo add prometheus-community",
        "kube-prometheus-stack",
        "prometheus-adapter",
        "docker build",
        "kind load docker-image",
        "upgrade --install",
        "ci/kind-values.yaml",
        "port-forward",
        "kind delete cluster",
    ]:
        assert step in result.stdout, step


def hook(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("annotations", {}).get("helm.sh/hook")


def test_a_failed_helm_test_pod_does_not_outlive_uninstall() -> None:
    """A passed test Pod goes at once; a failed one stays for debugging until the next
    `helm test` or `helm uninstall`, whose pre-delete sweeper (a Pod of the same name) makes Helm
    delete it (before-hook-creation) and then deletes itself, whatever its outcome."""
    pods = find(render(), "Pod")
    (test,) = [p for p in pods if hook(p) == "test"]
    (sweeper,) = [p for p in pods if hook(p) == "pre-delete"]
    policy = test["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(",")
    assert set(policy) == {"before-hook-creation", "hook-succeeded"}
    assert (sweeper["kind"], sweeper["metadata"]["name"]) == (
        test["kind"],
        test["metadata"]["name"],
    )
    policy = sweeper["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(",")
    assert set(policy) == {"before-hook-creation", "hook-succeeded", "hook-failed"}
    (container,) = sweeper["spec"]["containers"]
    assert container["image"] == test["spec"]["containers"][0]["image"]
    # the image's entrypoint with these args exits 0 at once
    result = subprocess.run(pricestream_command(*container["args"]), capture_output=True)
    assert result.returncode == 0, result.stderr
    assert sweeper["spec"]["activeDeadlineSeconds"] <= 120


def test_image_healthcheck_follows_the_grpc_port(tmp_path: Path) -> None:
    """The HEALTHCHECK runs in a shell: run it with a stand-in `pricestream` printing its args."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.startswith("HEALTHCHECK")]
    command = line.split(" CMD ", 1)[1].strip()
    assert not command.startswith("["), "exec form cannot read PRICESTREAM_GRPC_PORT"
    fake = tmp_path / "pricestream"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    for port, expected in [("50123", "127.0.0.1:50123"), (None, "127.0.0.1:50051")]:
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
        if port:
            env["PRICESTREAM_GRPC_PORT"] = port
        result = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
        assert result.stdout.split()[:3] == ["health", "--target", expected], result.stdout


def cpu_millis(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000


KIND_NODE_CPU = 2000
# what a kind node's own pods request: etcd 100m, kube-apiserver 250m, controller-manager 200m,
# scheduler 100m, two CoreDNS 100m each, kindnet 100m
KIND_SYSTEM_CPU = 950


def test_kind_values_fit_two_releases_on_a_two_cpu_node() -> None:
    objects = render(*values("kind-values.yaml"))
    (hpa,) = find(objects, "HorizontalPodAutoscaler")
    total = 0.0
    for deployment in find(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        if deployment is server_deployment(objects):
            # at the HPA's maximum, plus the surge pods of a rolling update (maxSurge 25%)
            replicas = hpa["spec"]["maxReplicas"]
            replicas += math.ceil(replicas * 0.25)
        else:
            replicas = deployment["spec"]["replicas"]
        total += replicas * sum(
            cpu_millis(c["resources"]["requests"]["cpu"]) for c in pod["containers"]
        )
    for pod in find(objects, "Pod"):  # the helm test Pod and the uninstall sweeper
        total += sum(
            cpu_millis(c["resources"]["requests"]["cpu"]) for c in pod["spec"]["containers"]
        )
    assert 2 * total + KIND_SYSTEM_CPU <= KIND_NODE_CPU, f"{total}m per release"


def test_tls_mounts_the_secret_and_probes_over_http() -> None:
    objects = render(*values("external-redis-values.yaml"))
    pod = server_deployment(objects)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "tls", "secret": {"secretName": "pricestream-tls"}} in pod["volumes"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (config,) = [c for c in find(objects, "ConfigMap") if "PRICESTREAM_TLS_CERT_FILE" in c["data"]]
    assert config["data"]["PRICESTREAM_TLS_CLIENT_CA_FILE"] == "/etc/pricestream/tls/ca.crt"
    (test_pod,) = [p for p in find(objects, "Pod") if hook(p) == "test"]
    assert "--tls-ca" in test_pod["spec"]["containers"][0]["args"]


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def from_secret(name: str, key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key}}


@pytest.mark.parametrize(
    ("values_file", "expected"),
    [
        (
            "sentinel-values.yaml",
            {
                "PRICESTREAM_REDIS_MODE": "sentinel",
                "PRICESTREAM_REDIS_SENTINELS": from_secret(
                    "pricestream-redis-sentinel", "sentinels"
                ),
                "PRICESTREAM_REDIS_SENTINEL_MASTER": from_secret(
                    "pricestream-redis-sentinel", "master-name"
                ),
                "PRICESTREAM_REDIS_URL": from_secret("pricestream-redis-sentinel", "redis-url"),
            },
        ),
        (
            "cluster-values.yaml",
            {
                "PRICESTREAM_REDIS_MODE": "cluster",
                "PRICESTREAM_REDIS_URL": from_secret("pricestream-redis-cluster", "redis-url"),
            },
        ),
        (
            "external-redis-values.yaml",
            {"PRICESTREAM_REDIS_URL": from_secret("pricestream-redis", "redis-url")},
        ),
    ],
)
def test_redis_mode_reaches_serve_and_feed_from_the_secret(
    values_file: str, expected: dict[str, Any]
) -> None:
    """Server and feed get the same topology settings, endpoints by Secret reference only."""
    objects = render(*values(values_file), "--set", "feed.enabled=true")
    assert not find(objects, "Secret")
    assert not [d for d in find(objects, "Deployment") if "redis" in d["metadata"]["name"]]
    names = {d["metadata"]["name"] for d in find(objects, "Deployment")}
    assert names == {"pricestream", "pricestream-feed"}
    for deployment in find(objects, "Deployment"):
        env = env_of(deployment)
        redis_env = {k: v for k, v in env.items() if k.startswith("PRICESTREAM_REDIS_")}
        redis_env.pop("PRICESTREAM_REDIS_TIMEOUT", None)
        redis_env.pop("PRICESTREAM_REDIS_OUTAGE_LIMIT", None)
        assert redis_env == expected, deployment["metadata"]["name"]


@pytest.mark.parametrize(
    ("args", "ports", "to"),
    [
        ([], [6379], "redis-pod"),
        (values("external-redis-values.yaml"), [6380], [{"ipBlock": {"cidr": "10.20.0.0/16"}}]),
        (values("sentinel-values.yaml"), [6379, 26379], [{"ipBlock": {"cidr": "10.30.0.0/16"}}]),
        (values("cluster-values.yaml"), [6379], [{"ipBlock": {"cidr": "10.40.0.0/16"}}]),
        (
            [*values("sentinel-values.yaml"), "--set", "networkPolicy.sentinelPort=5000"],
            [6379, 5000],
            [{"ipBlock": {"cidr": "10.30.0.0/16"}}],
        ),
    ],
    ids=["in-chart", "standalone-external", "sentinel", "cluster", "sentinel-port"],
)
def test_network_policy_egress_follows_the_redis_mode(
    args: list[str], ports: list[int], to: Any
) -> None:
    objects = render(*args, "--set", "feed.enabled=true")
    policies = {p["metadata"]["name"]: p for p in find(objects, "NetworkPolicy")}
    for name in ("pricestream", "pricestream-feed"):
        (dns, redis_rule, *_) = policies[name]["spec"]["egress"]
        assert {p["port"] for p in dns["ports"]} == {53}
        assert redis_rule["ports"] == [{"port": p, "protocol": "TCP"} for p in ports]
        if to == "redis-pod":
            labels = redis_rule["to"][0]["podSelector"]["matchLabels"]
            assert labels["app.kubernetes.io/component"] == "redis"
        else:
            assert redis_rule["to"] == to


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "redis.mode=sentinal"], "/redis/mode"),
        (
            ["--set", "redis.mode=sentinel"],
            "redis.mode=sentinel needs redis.enabled=false: the in-chart Redis is one standalone",
        ),
        (
            ["--set", "redis.mode=sentinel,redis.enabled=false"],
            "redis.mode=sentinel: set redis.sentinel.existingSecret",
        ),
        (
            ["--set", "redis.mode=cluster,redis.enabled=false"],
            "redis.mode=cluster: set redis.cluster.existingSecret",
        ),
    ],
    ids=["unknown-mode", "sentinel-with-in-chart-redis", "sentinel-no-secret", "cluster-no-secret"],
)
def test_bad_redis_mode_values_are_rejected_with_a_reason(args: list[str], message: str) -> None:
    command = [helm(), "template", "x", str(CHART), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    ("values_file", "present", "message"),
    [
        (
            "sentinel-values.yaml",
            secret("pricestream-redis-sentinel", "sentinels", "master-name", "redis-url"),
            None,
        ),
        (
            "sentinel-values.yaml",
            secret("pricestream-redis-sentinel", "sentinels", "redis-url"),
            'Secret "pricestream-redis-sentinel" in namespace "prod", named by '
            'redis.sentinel.existingSecret, has no key "master-name"',
        ),
        ("cluster-values.yaml", secret("pricestream-redis-cluster", "redis-url"), None),
        (
            "cluster-values.yaml",
            None,
            'Secret "pricestream-redis-cluster", named by redis.cluster.existingSecret, does not '
            "exist",
        ),
    ],
    ids=["sentinel-ok", "sentinel-key-missing", "cluster-ok", "cluster-missing"],
)
def test_install_checks_the_redis_mode_secret(
    tmp_path: Path, values_file: str, present: dict[str, Any] | None, message: str | None
) -> None:
    api = FakeApiServer([present] if present else [])
    with api.running():
        result = render_against(api, tmp_path, *values(values_file))
    if message is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert message in result.stderr


def test_browser_port_reaches_container_service_and_network_policy() -> None:
    """ports.http is the container port `http`, PRICESTREAM_WEB_PORT, and a Service port (the
    headless one too); the NetworkPolicy admits it from networkPolicy.httpFrom (anyone when
    empty); every config.web* value reaches the container's environment."""
    args = [*values("tracing-headless-values.yaml"), "--set", "ports.http=8181"]
    origins = escape("https://a.example,https://b.example")
    objects = render(*args, "--set", f"config.webAllowedOrigins={origins}")
    deployment = server_deployment(objects)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "http", "containerPort": 8181, "protocol": "TCP"} in container["ports"]
    (config,) = [c for c in find(objects, "ConfigMap") if "PRICESTREAM_WEB_PORT" in c["data"]]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert {k: v for k, v in config["data"].items() if k.startswith("PRICESTREAM_WEB_")} == {
        "PRICESTREAM_WEB_PORT": "8181",
        "PRICESTREAM_WEB_ALLOWED_ORIGINS": "https://a.example,https://b.example",
        "PRICESTREAM_WEB_PING_INTERVAL": "25",
        "PRICESTREAM_WEB_PONG_TIMEOUT": "10",
        "PRICESTREAM_WEB_ACCEPT_RATE": "1000",
        "PRICESTREAM_WEB_ACCEPT_BURST": "1000",
        "PRICESTREAM_WEB_DRAIN_WINDOW": "5",
    }
    services = {s["metadata"]["name"]: s for s in find(objects, "Service")}
    for name in ("pricestream", "pricestream-headless"):
        ports = {p["name"]: p for p in services[name]["spec"]["ports"]}
        assert ports["http"] == {
            "name": "http",
            "port": 8181,
            "targetPort": "http",
            "protocol": "TCP",
            "appProtocol": "http",
        }, name
    (policy, *_) = find(objects, "NetworkPolicy")
    (http_rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "http"]
    assert "from" not in http_rule, "httpFrom empty: any peer"
    (policy, *_) = find(render(*values("ingress-values.yaml")), "NetworkPolicy")
    (http_rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "http"]
    assert http_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]


def test_trusted_proxies_reach_the_environment() -> None:
    """config.trustedProxies is PRICESTREAM_TRUSTED_PROXIES: empty by default (the session
    create limit applies to the TCP peer), the ingress controller's pod network in the Ingress
    example, in a form the server accepts."""

    def config(*args: str) -> dict[str, str]:
        (configmap,) = [
            c for c in find(render(*args), "ConfigMap") if "PRICESTREAM_WEB_PORT" in c["data"]
        ]
        return configmap["data"]

    assert config()["PRICESTREAM_TRUSTED_PROXIES"] == ""
    proxies = escape("10.0.0.0/8, 2001:db8::/32")
    assert config("--set", f"config.trustedProxies={proxies}")["PRICESTREAM_TRUSTED_PROXIES"] == (
        "10.0.0.0/8, 2001:db8::/32"
    )
    example = config(*values("ingress-values.yaml"))
    check_environment(example)  # every variable names a setting
    assert proxy_networks(example["PRICESTREAM_TRUSTED_PROXIES"]) == proxy_networks(
        "10.244.0.0/16,fd00:10:244::/56"
    )


NGINX_STREAMING = {
    "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-buffering": "off",
}


def backend_port(ingress: dict[str, Any]) -> tuple[str, str, str]:
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    service = path["backend"]["service"]
    return path["path"], service["name"], service["port"]["name"]


def test_ingresses_render_only_when_enabled() -> None:
    assert not find(render(), "Ingress")
    web, grpc = find(render(*values("ingress-values.yaml")), "Ingress")
    assert web["metadata"]["name"] == "pricestream"
    assert web["metadata"]["annotations"] == NGINX_STREAMING
    assert web["spec"]["ingressClassName"] == "nginx"
    assert web["spec"]["tls"] == [
        {"secretName": "prices-example-com-tls", "hosts": ["prices.example.com"]}
    ]
    assert web["spec"]["rules"][0]["host"] == "prices.example.com"
    assert backend_port(web) == ("/", "pricestream", "http")
    assert grpc["metadata"]["name"] == "pricestream-grpc"
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == (
        "GRPC"
    )
    assert grpc["spec"]["tls"] == [
        {"secretName": "grpc-prices-example-com-tls", "hosts": ["grpc.prices.example.com"]}
    ]
    assert backend_port(grpc) == ("/", "pricestream", "grpc")
    # the browser Ingress alone, no class, host or TLS: the class default, any host, plain HTTP
    (bare,) = find(render("--set", "ingress.enabled=true"), "Ingress")
    assert bare["metadata"]["annotations"] == NGINX_STREAMING
    assert not {"ingressClassName", "tls"} & set(bare["spec"])
    assert "host" not in bare["spec"]["rules"][0]
    (plain,) = find(
        render("--set", "ingress.enabled=true", "--set-json", "ingress.annotations=null"), "Ingress"
    )
    assert "annotations" not in plain["metadata"]
