"""End-to-end checks on a real single-node Kubernetes cluster (tests/e2e/cluster/), run by
`make e2e` only: the chart installed on real containers, its `helm test`, upgrade, rollback and
uninstall for every file in the chart's ci/ folder, and nothing left behind."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import aiohttp
import grpc
import pytest
import websockets
from pricestream.tools.feed import ticker_universe
from pricestream.tools.leak_check import samples, violations
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.burn import BURN_ALERT, burning
from support.e2e_kube import (
    CHART,
    PAGER,
    REDIS_IMAGE,
    REPO,
    STATE,
    TICKETS,
    Webhook,
    alertmanager_alerts,
    apply,
    helm,
    image_values,
    kubectl,
    kubectl_json,
    namespace_leftovers,
    pod_exposition,
    prom,
    prom_query,
    ready_pods,
    run,
    wait_until,
)

from dashboards.grafana import promql_queries

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("PRICESTREAM_E2E") != "1", reason="runs only under `make e2e`"
    ),
    pytest.mark.timeout(900),
]


def drop_namespace(namespace: str) -> None:
    kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)


# Values for external Redis topologies this cluster does not run (three sentinels with a master
# and replica, a six-node Redis Cluster): not installed here. Their objects are rendered and
# schema-checked offline (tests/test_chart.py) and both modes run against real servers in
# tests/test_sentinel.py and tests/test_cluster.py.
NOT_ON_THIS_CLUSTER = {"sentinel-values.yaml", "cluster-values.yaml"}
CI_VALUES = sorted(
    p.name for p in (CHART / "ci").glob("*-values.yaml") if p.name not in NOT_ON_THIS_CLUSTER
)


@pytest.fixture(scope="session", autouse=True)
def cluster() -> None:
    """The cluster of tests/e2e/cluster/cluster-up.sh is up and its node Ready."""
    assert (STATE / "pki" / "admin.kubeconfig").exists(), (
        "no e2e cluster: tests/e2e/cluster/cluster-up.sh"
    )
    node = kubectl_json("get", "nodes")["items"]
    assert len(node) == 1
    ready = {c["type"]: c["status"] for c in node[0]["status"]["conditions"]}["Ready"]
    assert ready == "True"


@pytest.fixture(scope="session")
def storage() -> str:
    """A default StorageClass with pre-made hostPath volumes (no provisioner on this node)."""
    apply(
        textwrap.dedent(
            """\
            apiVersion: storage.k8s.io/v1
            kind: StorageClass
            metadata:
              name: e2e-local
              annotations: {storageclass.kubernetes.io/is-default-class: "true"}
            provisioner: kubernetes.io/no-provisioner
            volumeBindingMode: WaitForFirstConsumer
            reclaimPolicy: Delete
            """
        )
    )
    for i in range(3):
        path = STATE / "volumes" / f"pv{i}"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        apply(
            textwrap.dedent(
                f"""\
                apiVersion: v1
                kind: PersistentVolume
                metadata: {{name: e2e-pv{i}}}
                spec:
                  capacity: {{storage: 5Gi}}
                  accessModes: [ReadWriteOnce]
                  persistentVolumeReclaimPolicy: Retain
                  storageClassName: e2e-local
                  hostPath: {{path: {path}, type: Directory}}
                """
            )
        )
    return "e2e-local"


def external_redis_and_secrets(namespace: str) -> None:
    """What ci/external-redis-values.yaml expects to exist: a Redis outside the release, the
    Secret with its URL, a tokens Secret and a TLS Secret (mutual TLS: tls.crt, tls.key, ca.crt)."""
    apply(
        textwrap.dedent(
            f"""\
            apiVersion: v1
            kind: Pod
            metadata: {{name: ext-redis, namespace: {namespace}, labels: {{app: ext-redis}}}}
            spec:
              securityContext: {{runAsUser: 999, runAsGroup: 999, runAsNonRoot: true}}
              containers:
                - name: redis
                  image: {REDIS_IMAGE}
                  args: [--save, "", --appendonly, "no", --protected-mode, "no", --port, "6380"]
                  ports: [{{containerPort: 6380}}]
            ---
            apiVersion: v1
            kind: Service
            metadata: {{name: ext-redis, namespace: {namespace}}}
            spec:
              selector: {{app: ext-redis}}
              ports: [{{port: 6380, targetPort: 6380}}]
            """
        )
    )
    kubectl(
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "pricestream-redis",
        f"--from-literal=redis-url=redis://ext-redis.{namespace}.svc.cluster.local:6380/0",
    )
    kubectl(
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "pricestream-auth",
        "--from-literal=tokens=e2e-token",
    )
    tls = STATE / "tls" / namespace
    tls.mkdir(parents=True, exist_ok=True)
    server = "pricestream"  # the release's fullname: the helm test's --tls-server-name
    ext = f"subjectAltName=DNS:{server}\nextendedKeyUsage=serverAuth,clientAuth\n"
    (tls / "ext.cnf").write_text(ext)
    req = ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    run([*req, "-x509", "-keyout", f"{tls}/ca.key", "-out", f"{tls}/ca.crt", "-subj", "/CN=e2e"])
    run([*req, "-keyout", f"{tls}/tls.key", "-out", f"{tls}/tls.csr", "-subj", f"/CN={server}"])
    sign = ["-CA", f"{tls}/ca.crt", "-CAkey", f"{tls}/ca.key", "-CAcreateserial", "-days", "1"]
    out = ["-extfile", f"{tls}/ext.cnf", "-out", f"{tls}/tls.crt"]
    run(["openssl", "x509", "-req", "-in", f"{tls}/tls.csr", *sign, *out])
    kubectl(
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "pricestream-tls",
        "--type=kubernetes.io/tls",
        f"--from-file=tls.crt={tls}/tls.crt",
        f"--from-file=tls.key={tls}/tls.key",
        f"--from-file=ca.crt={tls}/ca.crt",
    )


def monitoring_kinds() -> str:
    """The prometheus-operator kinds the chart renders, when their CRDs are installed."""
    crds = kubectl("get", "crd", "-o", "name").split()
    kinds = ("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com")
    return ",".join(
        k for k in kinds if f"customresourcedefinition.apiextensions.k8s.io/{k}" in crds
    )


def release_objects(namespace: str, release: str) -> list[str]:
    extra = monitoring_kinds()
    return kubectl(
        "-n",
        namespace,
        "get",
        "all,configmaps,secrets,pvc,pdb,hpa,networkpolicies,serviceaccounts"
        + ("," + extra if extra else ""),
        "-l",
        f"app.kubernetes.io/instance={release}",
        "-o",
        "name",
    ).split()


# The lifecycles run side by side (one namespace each), E2E_LIFECYCLES_AT_ONCE at a time, and
# beside the monitoring checks (their own namespaces): every step waits on pods starting, probes
# and drains, not on this host's CPU.
LIFECYCLES_AT_ONCE = int(os.environ.get("E2E_LIFECYCLES_AT_ONCE", "7"))
# Seven releases at once on a 2-CPU node: each demo feed publishes 50 updates/s instead of 500
# (seven feeds at 500/s and the servers fanning them out took about a core), and the releases
# whose files leave the CPU requests at the chart's defaults (250m per server) ask for less, so
# that all of them and their surge pods can be scheduled together. Files with an HPA keep their
# requests: its CPU target is a share of them. Nothing the lifecycle asserts depends on these.
LIGHT_FEED = ["--set", "feed.rate=50"]
SMALL_REQUESTS = [
    "--set",
    "resources.requests.cpu=25m,feed.resources.requests.cpu=10m,redis.resources.requests.cpu=10m",
]
LIFECYCLE_STEPS = [
    "install",
    "helm test",
    "upgrade",
    "helm test",
    "rollback",
    "uninstall",
    "objects gone",
    "namespace empty",
]


class Lifecycle:
    """One ci file's lifecycle, as run in its thread: the steps done (with seconds)."""

    def __init__(self, values_file: str) -> None:
        self.values_file = values_file
        self.steps: list[tuple[str, float]] = []
        self._t0 = time.monotonic()

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.steps.append((name, now - self._t0))
        self._t0 = now


def chart_lifecycle(values_file: str, done: Lifecycle) -> None:
    """install --wait, `helm test`, upgrade, `helm test`, rollback, uninstall: all pass, the pods
    serve, and uninstall leaves nothing but what the chart documents it keeps."""
    name = values_file.removesuffix("-values.yaml")
    namespace = f"e2e-{name}"
    release = "pricestream"
    kubectl("create", "namespace", namespace)
    try:
        if name == "external-redis":
            external_redis_and_secrets(namespace)
        text = (CHART / "ci" / values_file).read_text()
        small = [] if "autoscaling:" in text else SMALL_REQUESTS
        values = ["-f", str(CHART / "ci" / values_file), *image_values(), *LIGHT_FEED, *small]
        helm(
            "install", release, str(CHART), "-n", namespace, *values, "--wait", "--timeout", "240s"
        )
        deployment = kubectl_json("-n", namespace, "get", "deployment", release)
        want = deployment["spec"]["replicas"]
        assert want >= 1
        pods = ready_pods(
            namespace, f"app.kubernetes.io/instance={release},app.kubernetes.io/component=server"
        )
        assert len(pods) == want
        done.step("install")
        helm("test", release, "-n", namespace, "--timeout", "120s")
        done.step("helm test")

        # An upgrade that changes the pods (a rollout), then a rollback to the first revision.
        helm(
            "upgrade",
            release,
            str(CHART),
            "-n",
            namespace,
            *values,
            "--set-string",
            "podAnnotations.e2e/revision=2",
            "--wait",
            "--timeout",
            "240s",
        )
        annotations = kubectl_json("-n", namespace, "get", "deployment", release)["spec"][
            "template"
        ]["metadata"]
        assert annotations.get("annotations", {}).get("e2e/revision") == "2"
        done.step("upgrade")
        helm("test", release, "-n", namespace, "--timeout", "120s")
        done.step("helm test")
        helm("rollback", release, "1", "-n", namespace, "--wait", "--timeout", "240s")
        template = kubectl_json("-n", namespace, "get", "deployment", release)["spec"]["template"][
            "metadata"
        ]
        assert "e2e/revision" not in template.get("annotations", {})
        history = helm("history", release, "-n", namespace, "-o", "json")
        assert history.count('"revision"') == 3
        done.step("rollback")

        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s")
        done.step("uninstall")
        wait_until(
            f"{release} objects gone from {namespace}",
            lambda: (
                not [
                    o
                    for o in release_objects(namespace, release)
                    if not o.startswith("persistentvolumeclaim/")
                ]
            ),
            timeout=90,
        )
        keep = [
            o for o in release_objects(namespace, release) if o.startswith("persistentvolumeclaim/")
        ]
        persistent = "persistence" in text
        # redis.persistence's claim is kept on purpose (resource-policy: keep), nothing else.
        assert keep == ([f"persistentvolumeclaim/{release}-redis"] if persistent else [])
        done.step("objects gone")
        if keep:
            kubectl("-n", namespace, "delete", *keep, "--wait=true")
        if name == "external-redis":
            kubectl(
                "-n",
                namespace,
                "delete",
                "pod/ext-redis",
                "service/ext-redis",
                "secret/pricestream-redis",
                "secret/pricestream-auth",
                "secret/pricestream-tls",
                "--wait=true",
            )
        wait_until(
            f"{namespace} empty",
            lambda: namespace_leftovers(namespace, monitoring_kinds()) == [],
            timeout=90,
        )
        assert helm("list", "-n", namespace, "-a", "-q").strip() == ""
        done.step("namespace empty")
    finally:
        drop_namespace(namespace)


@pytest.fixture(scope="session", autouse=True)
def lifecycles(
    request: pytest.FixtureRequest, storage: str
) -> Iterator[dict[str, tuple[Lifecycle, Future[None]]]]:
    """The lifecycle of every ci file selected (`-k`), started in the background when the
    session's first test starts and run concurrently with the monitoring, autoscaling and
    alerting checks below (each in its own namespace); the tests at the end of this file
    collect one file's result each. Waited for at the end of the session, pass or fail."""
    selected = sorted(
        {
            item.callspec.params["values_file"]
            for item in request.session.items
            if getattr(item, "originalname", "") == "test_chart_lifecycle"
        }
    )
    pool = ThreadPoolExecutor(max_workers=LIFECYCLES_AT_ONCE, thread_name_prefix="lifecycle")
    try:
        running = {}
        for values_file in selected:
            done = Lifecycle(values_file)
            running[values_file] = (done, pool.submit(chart_lifecycle, values_file, done))
        yield running
    finally:
        pool.shutdown(wait=True)


# --- Monitoring, autoscaling and alerting on real pods (tests/e2e/cluster/monitoring-up.sh) ---

SRE_NAMESPACE = "e2e-sre"
RELEASE = "pricestream"
SERVER = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=server"
# Short rule windows so the alerts can fire within a test; the rest as shipped.
SHORT_PARAMS = {
    "rateWindow": "20s",
    "orphanFor": "20s",
    "wsLeakSessionsMin": "5",
    "wsLeakWindow": "3m",
    "wsLeakFor": "20s",
}
SESSIONS_PER_POD = 20


@pytest.fixture(scope="module")
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def sre_values(*extra: str) -> list[str]:
    params = ",".join(f"monitoring.rules.params.{k}={v}" for k, v in SHORT_PARAMS.items())
    return [
        "-f",
        str(CHART / "ci" / "kind-values.yaml"),
        *image_values(),
        "--set",
        "image.pullPolicy=IfNotPresent,monitoring.labels=null,monitoring.serviceMonitor.interval=5s",
        "--set",
        params,
        "--set",
        f"autoscaling.sessionsPerPod.averageValue={SESSIONS_PER_POD},autoscaling.maxReplicas=4",
        # Scale down within the test: 10 s of stability, then one pod per 5 s.
        "--set",
        "autoscaling.behavior.scaleDown.stabilizationWindowSeconds=10",
        "--set",
        "autoscaling.behavior.scaleDown.policies[0].type=Pods,"
        "autoscaling.behavior.scaleDown.policies[0].value=1,"
        "autoscaling.behavior.scaleDown.policies[0].periodSeconds=5",
        *extra,
    ]


@pytest.fixture(scope="module")
def sre_release():
    """The chart with kind values (HPA on sessions per pod) in its own namespace."""
    assert prom("/api/v1/status/buildinfo")["version"].startswith("2.")
    kubectl("create", "namespace", SRE_NAMESPACE)
    helm("install", RELEASE, str(CHART), "-n", SRE_NAMESPACE, *sre_values(), "--wait")
    yield
    helm("uninstall", RELEASE, "-n", SRE_NAMESPACE, "--wait", check=False)
    drop_namespace(SRE_NAMESPACE)


@contextlib.contextmanager
def single_pod_release(namespace: str, *sets: str) -> Iterator[tuple[str, str]]:
    """The chart with the SRE values as one pod without autoscaling (``sets``: more `--set`
    values), in ``namespace`` made for it; yields the pod's name and IP. Uninstalled and the
    namespace deleted afterwards, pass or fail."""
    kubectl("create", "namespace", namespace)
    try:
        single = ["--set", "autoscaling.enabled=false,replicaCount=1"]
        more = [arg for value in sets for arg in ("--set", value)]
        helm("install", RELEASE, str(CHART), "-n", namespace, *sre_values(*single, *more), "--wait")
        (pod,) = ready_pods(namespace, SERVER)
        yield pod["metadata"]["name"], pod["status"]["podIP"]
    finally:
        helm("uninstall", RELEASE, "-n", namespace, "--wait", check=False)
        drop_namespace(namespace)


def server_pods() -> dict[str, str]:
    """Ready server pods of the SRE release: name -> IP."""
    return {p["metadata"]["name"]: p["status"]["podIP"] for p in ready_pods(SRE_NAMESPACE, SERVER)}


def test_servicemonitor_discovered_and_every_pod_scraped(sre_release: None) -> None:
    def scraped() -> bool:
        targets = prom("/api/v1/targets", state="active")["activeTargets"]
        ours = {
            t["labels"].get("pod"): t["health"]
            for t in targets
            if t["labels"].get("namespace") == SRE_NAMESPACE and t["labels"].get("job") == RELEASE
        }
        pods = server_pods()
        return bool(pods) and ours == dict.fromkeys(pods, "up")

    wait_until("a healthy target for every server pod", scraped, timeout=120)
    # The operator derived the job from the ServiceMonitor (its generated name).
    jobs = {t["scrapePool"] for t in prom("/api/v1/targets")["activeTargets"]}
    assert f"serviceMonitor/{SRE_NAMESPACE}/{RELEASE}/0" in jobs
    pods = server_pods()
    up = prom_query(f'up{{namespace="{SRE_NAMESPACE}",job="{RELEASE}",pod=~"{"|".join(pods)}"}}')
    assert {s["metric"]["pod"]: s["value"][1] for s in up} == dict.fromkeys(pods, "1")


def test_prometheusrule_alerts_loaded(sre_release: None) -> None:
    # Every rules file the PrometheusRule embeds: the hand-written rules and the generated SLOs.
    rules_text = "".join(p.read_text() for p in (CHART / "files" / "rules").glob("*.yaml"))
    shipped = set(re.findall(r"^\s*- alert: (\w+)", rules_text, flags=re.M))
    assert len(shipped) > 5 and any(name.endswith("ErrorBudgetBurn") for name in shipped)

    def loaded() -> set[str]:
        groups = prom("/api/v1/rules", type="alert")["groups"]
        return {r["name"] for g in groups if SRE_NAMESPACE in g["file"] for r in g["rules"]}

    wait_until("the chart's alerts in Prometheus", lambda: loaded() == shipped, timeout=90)
    health = [
        (r["name"], r.get("lastError"))
        for g in prom("/api/v1/rules")["groups"]
        for r in g["rules"]
        if r.get("health") == "err"
    ]
    assert health == []


def service_address(port_name: str) -> str:
    """``clusterIP:port`` of the SRE release's Service port ``port_name`` (via kube-proxy)."""
    svc = kubectl_json("-n", SRE_NAMESPACE, "get", "service", RELEASE)
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == port_name)
    return f"{svc['spec']['clusterIP']}:{port}"


async def test_browser_path_through_the_service(sre_release: None) -> None:
    """The original system's two flows through the cluster Service's `http` port: REST creates
    a session, a WebSocket streams it (snapshot, then live prices from the chart's feed), DELETE
    closes it with 1000; a socket for an unknown session is refused with 4004. Runs before the
    dashboard check, whose browser panels need this traffic."""
    address = service_address("http")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://{address}/v1/sessions", json={"tickers": ticker_universe(3)}
        ) as response:
            assert response.status == 201, await response.text()
            session = await response.json()
        assert session["stream_url"] == f"ws://{address}/v1/sessions/{session['session_id']}/ws"
        async with websockets.connect(
            session["stream_url"], subprotocols=["pricestream.v1.json"]
        ) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (first["type"], first["seq"]) == ("snapshot", 1)
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["type"] == "prices" and frame["seq"] == 2 and frame["updates"]
            async with http.delete(
                f"http://{address}/v1/sessions/{session['session_id']}"
            ) as response:
                assert response.status == 204
            with pytest.raises(websockets.ConnectionClosedOK):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1000
        unknown = f"ws://{address}/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/ws"
        async with websockets.connect(unknown, subprotocols=["pricestream.v1.json"]) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 4004


def dashboard_queries(namespace: str) -> list[tuple[str, str]]:
    """(file, PromQL) for every query of the shipped dashboard JSON, variables filled in."""
    out = []
    for path in sorted((CHART / "files" / "dashboards").glob("*.json")):
        for expr in promql_queries(json.loads(path.read_text())):
            query = (
                expr.replace("$namespace", namespace)
                .replace("$pod", ".*")
                .replace("$job", ".*")
                .replace("$__rate_interval", "30s")
            )
            out.append((path.name, query))
    return out


def firing_alerts_query(query: str) -> bool:
    return query.startswith("ALERTS{") and 'alertstate="firing"' in query


def test_every_dashboard_query_returns_data(sre_release: None) -> None:
    """Each PromQL expression of the shipped dashboard JSON, variables filled in, has samples
    (after a short load, so that every rate has something to rate). The firing-alerts query has
    data only while an alert fires: it runs here, and must return data in the fault test."""
    run_loadtest("20s:40,10s:0", timeout=120)
    queries = dashboard_queries(SRE_NAMESPACE)
    assert len(queries) > 20
    empty = [f"{name}: {q}" for name, q in queries if not prom_query(q)]
    assert [e for e in empty if not firing_alerts_query(e.split(": ", 1)[1])] == []


def service_target() -> str:
    svc = kubectl_json("-n", SRE_NAMESPACE, "get", "service", RELEASE)
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    return f"{svc['spec']['clusterIP']}:{port}"


def run_loadtest(stages: str, timeout: float, *extra: str) -> subprocess.Popen[str]:
    """`pricestream loadtest` from this host through the Service's ClusterIP (kube-proxy);
    waits for it when ``timeout`` is set, else returns the running process."""
    out = STATE / "loadtest" / str(time.monotonic_ns())
    cmd = [
        sys.executable,
        "-m",
        "pricestream",
        "loadtest",
        "--target",
        service_target(),
        # One pod's /metrics for its leak verdict (by default it would read 127.0.0.1:9464);
        # the checks below read every pod's.
        "--metrics-url",
        f"http://{next(iter(server_pods().values()))}:9464/metrics",
        "--stages",
        stages,
        "--universe",
        "50",
        "--tickers-per-session",
        "3",
        "--workers",
        "1",
        "--no-plots",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "service")}
    proc = subprocess.Popen(
        cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    proc.out_dir = out  # type: ignore[attr-defined]
    if timeout:
        output, _ = proc.communicate(timeout=timeout)
        print(output)
    return proc


def loadtest_report(proc: subprocess.Popen[str], timeout: float) -> dict:
    output, _ = proc.communicate(timeout=timeout)
    print(output)
    return json.loads((proc.out_dir / "report.json").read_text())  # type: ignore[attr-defined]


def invariant_1_on_every_pod() -> dict[str, list[str]]:
    """Invariant 1 (DESIGN.md) on each ready server pod, read from its own /metrics."""
    return {name: violations(samples(pod_exposition(ip))) for name, ip in server_pods().items()}


def hpa_status() -> dict:
    return kubectl_json("-n", SRE_NAMESPACE, "get", "hpa", RELEASE)["status"]


def test_hpa_scales_up_and_down_on_sessions_per_pod(sre_release: None) -> None:
    api = f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{SRE_NAMESPACE}"
    raw = f"{api}/pods/*/pricestream_sessions_active"

    def served() -> bool:
        # "items": null until Prometheus has scraped a pod of the release
        items = json.loads(kubectl("get", "--raw", raw))["items"] or []
        return {i["describedObject"]["name"] for i in items} == set(server_pods())

    wait_until("pricestream_sessions_active per pod from the custom-metrics API", served, 90)
    start = hpa_status()
    assert start["desiredReplicas"] == 2, start
    # 6 pods' worth of sessions at the target per pod: the HPA goes to its maximum (4).
    users = SESSIONS_PER_POD * 6
    load = run_loadtest(
        f"10s:{users},80s:{users},5s:0", 0, "--keep-users", "--leave-mix", "close_session=1"
    )

    def scaled_up() -> int:
        ready = kubectl_json("-n", SRE_NAMESPACE, "get", "deployment", RELEASE)["status"]
        return ready.get("readyReplicas", 0) if ready.get("readyReplicas", 0) > 2 else 0

    loaded_at = time.monotonic()
    peak = wait_until("the HPA to scale up on sessions per pod", scaled_up, timeout=90)
    print(f"{peak} ready pods {time.monotonic() - loaded_at:.1f}s after the load started")
    metric = next(m for m in hpa_status()["currentMetrics"] if m["type"] == "Pods")
    assert metric["pods"]["metric"]["name"] == "pricestream_sessions_active"
    report = loadtest_report(load, timeout=200)
    total = report["total"]
    assert total["sessions_created"] >= users, total
    print(f"scaled up to {peak} ready pods; loadtest totals {total}")

    def scaled_down() -> bool:
        status = kubectl_json("-n", SRE_NAMESPACE, "get", "deployment", RELEASE)["status"]
        return status.get("replicas") == 2 and status.get("readyReplicas") == 2

    unloaded_at = time.monotonic()
    wait_until("the HPA to scale back down to minReplicas", scaled_down, timeout=240, interval=5)
    print(f"back to 2 pods {time.monotonic() - unloaded_at:.1f}s after the load ended")
    assert invariant_1_on_every_pod() == {pod: [] for pod in server_pods()}


FAULT_NAMESPACE = "e2e-fault"
WS_FAULT_NAMESPACE = "e2e-wsfault"


def firing_at_webhook(
    webhook: Webhook, alertname: str, namespace: str, timeout: float
) -> tuple[dict, dict]:
    """The first (notification, alert) of ``alertname`` firing in ``namespace`` that the
    webhook received through Alertmanager, waited for up to ``timeout`` seconds."""
    found = wait_until(
        f"{alertname} at the webhook",
        lambda: [
            (n, a)
            for n, a in webhook.alerts(alertname)
            if a["labels"].get("namespace") == namespace
            and n["status"] == "firing"
            and a["status"] == "firing"
        ],
        timeout,
    )
    return found[0]


async def test_seed_fault_fires_orphaned_alert_to_webhook(webhook: Webhook) -> None:
    """A pod with the seed's bug (`skip_cleanup_on_send_error`) and clients vanishing mid-stream:
    PriceStreamPubSubSubscriptionsOrphaned fires in Prometheus and its notification reaches the
    webhook through Alertmanager, at the pager (critical, by the shipped routing tree)."""
    with single_pod_release(
        FAULT_NAMESPACE,
        "extraEnv[0].name=PRICESTREAM_FAULTS,extraEnv[0].value=skip_cleanup_on_send_error",
    ) as (name, ip):
        universe = ticker_universe(50)
        async with grpc.aio.insecure_channel(f"{ip}:50051") as channel:
            stub = PriceStreamServiceStub(channel)
            calls = []
            for i in range(8):
                session = await stub.CreateSession(
                    pb.CreateSessionRequest(tickers=universe[i * 3 : i * 3 + 3])
                )
                call = stub.StreamPriceUpdates(
                    pb.StreamPriceUpdatesRequest(session_id=session.session_id)
                )
                assert await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF
                calls.append(call)
            for call in calls:
                call.cancel()
        vanished_at = time.time()
        notification, alert = await asyncio.to_thread(
            firing_at_webhook,
            webhook,
            "PriceStreamPubSubSubscriptionsOrphaned",
            FAULT_NAMESPACE,
            150,
        )
        assert notification["version"] == "4"
        assert notification["status"] == "firing"
        assert alert["labels"]["pod"] == name
        assert alert["labels"]["severity"] == "critical"
        # The shipped routing tree pages a critical alert.
        assert notification["path"] == PAGER, notification["path"]
        assert alert["annotations"]["runbook_url"].endswith(
            "PriceStreamPubSubSubscriptionsOrphaned.md"
        )
        firing = prom("/api/v1/alerts")["alerts"]
        assert any(
            a["labels"]["alertname"] == "PriceStreamPubSubSubscriptionsOrphaned"
            and a["labels"].get("pod") == name
            and a["state"] == "firing"
            for a in firing
        )
        # The dashboards' firing-alerts query shows it (the SLO dashboard's lists only the
        # error-budget burns, which this fault does not cause).
        alert_queries = [
            q
            for _, q in dashboard_queries(FAULT_NAMESPACE)
            if firing_alerts_query(q) and "ErrorBudgetBurn" not in q
        ]
        assert alert_queries
        for query in alert_queries:
            assert prom_query(query), query
        print(f"orphaned alert delivered {notification['received_at'] - vanished_at:.1f}s after")


async def test_ws_close_fault_fires_websocket_leak_alert_to_webhook(webhook: Webhook) -> None:
    """The original system's bug on its own path: a pod whose WebSocket closes skip the session
    cleanup (`skip_cleanup_on_ws_close`); 8 browsers stream and close their sockets;
    PriceStreamWebSocketSessionLeak reaches the webhook through Alertmanager, at the tickets
    (warning, by the shipped routing tree)."""
    namespace = WS_FAULT_NAMESPACE
    with single_pod_release(
        namespace,
        "extraEnv[0].name=PRICESTREAM_FAULTS,extraEnv[0].value=skip_cleanup_on_ws_close",
    ) as (name, ip):
        universe = ticker_universe(50)
        # The alert reads the increase of the pod's close counter: Prometheus must have scraped
        # it before the sockets close (a series first seen at 8 is no increase to Prometheus).
        await asyncio.to_thread(
            wait_until,
            "the fault pod scraped",
            lambda: prom_query(f'up{{namespace="{namespace}",pod="{name}"}} == 1'),
            120,
        )
        async with aiohttp.ClientSession() as http:
            for i in range(8):
                async with http.post(
                    f"http://{ip}:8080/v1/sessions", json={"tickers": universe[i * 3 : i * 3 + 3]}
                ) as response:
                    assert response.status == 201, await response.text()
                    session = await response.json()
                async with websockets.connect(
                    session["stream_url"], subprotocols=["pricestream.v1.json"]
                ) as ws:
                    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["seq"] == 1
        closed_at = time.time()
        notification, alert = await asyncio.to_thread(
            firing_at_webhook, webhook, "PriceStreamWebSocketSessionLeak", namespace, 180
        )
        assert alert["labels"]["pod"] == name
        assert alert["labels"]["severity"] == "warning"
        # The shipped routing tree opens a ticket for a warning.
        assert notification["path"] == TICKETS, notification["path"]
        assert alert["annotations"]["runbook_url"].endswith("PriceStreamWebSocketSessionLeak.md")
        after = notification["received_at"] - closed_at
        print(f"WebSocket leak alert delivered {after:.1f}s after the sockets closed")


BURN_NAMESPACE = "e2e-burn"
# The SLO rules' windows shrunk for this cluster, which scrapes and evaluates every 5 s: each at
# least four scrape intervals, in the order of the production windows they stand for (their
# names); objectives and burn rates as shipped. The tickets' `for:` are as short as the page's,
# so Prometheus fires them while the page fires (the inhibition is then there to be seen).
SLO_CLUSTER_WINDOWS = {
    "sloWindow5m": "20s",
    "sloWindow30m": "30s",
    "sloWindow1h": "40s",
    "sloWindow2h": "50s",
    "sloWindow6h": "60s",
    "sloWindow1d": "90s",
    "sloWindow3d": "120s",
    "sloPageFastFor": "5s",
    "sloPageSlowFor": "10s",
    "sloTicketFastFor": "5s",
    "sloTicketSlowFor": "10s",
}


def burn_alerts_in_prometheus(namespace: str) -> set[str]:
    """Severities of the availability burn alert firing in Prometheus for ``namespace``."""
    return {
        a["labels"]["severity"]
        for a in prom("/api/v1/alerts")["alerts"]
        if a["labels"].get("alertname") == BURN_ALERT
        and a["labels"].get("namespace") == namespace
        and a["state"] == "firing"
    }


async def test_fast_burn_pages_the_pager_and_inhibits_the_ticket(webhook: Webhook) -> None:
    """The shipped routing tree on the cluster (tests/e2e/cluster/alertmanager-config.py): a
    pod with config.maxSessions=1 whose only session one stream holds, while CreateSession is
    hammered over gRPC (RESOURCE_EXHAUSTED) and REST (503 `pod_full`). The availability page
    (PriceStreamAvailabilityErrorBudgetBurn, severity page) reaches the pager; Prometheus fires
    the tickets too, Alertmanager holds them back, inhibited by the page, and the ticket
    receiver gets nothing of this release's burn."""
    namespace = BURN_NAMESPACE
    slo_params = ",".join(
        f"monitoring.rules.params.{k}={v}" for k, v in SLO_CLUSTER_WINDOWS.items()
    )
    with single_pod_release(namespace, "config.maxSessions=1", slo_params) as (name, ip):
        target = f"{ip}:50051"
        await asyncio.to_thread(
            wait_until,
            "the burn pod scraped",
            lambda: prom_query(f'up{{namespace="{namespace}",pod="{name}"}} == 1'),
            120,
        )
        good_ratio = (
            "namespace_job:pricestream_slo_errors:ratio_rate1h"
            f'{{namespace="{namespace}",slo="availability"}} == 0'
        )
        async with grpc.aio.insecure_channel(target) as channel:
            stub = PriceStreamServiceStub(channel)
            # Good session starts (created and closed), at least 20 and until the release's
            # SLO rules, loaded by now, read an availability error ratio of 0: the page below
            # is the burn's alone.
            good = 0
            deadline = time.monotonic() + 120
            while good < 20 or not await asyncio.to_thread(prom_query, good_ratio):
                assert time.monotonic() < deadline, "no availability error ratio of 0"
                session = await stub.CreateSession(
                    pb.CreateSessionRequest(tickers=["AAPL"]), timeout=10
                )
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
                good += 1
                await asyncio.sleep(0.5)

            # The burn: one client takes the pod's only slot and streams; every other session
            # start is refused as the pod is full (the server's fault).
            async with burning(stub, target, 8080, 180, web_host=ip) as burn:
                notification, alert = await asyncio.to_thread(
                    firing_at_webhook, webhook, BURN_ALERT, namespace, 120
                )
                # While the burn goes on: Prometheus fires the tickets too (3x and 1x are
                # crossed as well), and Alertmanager holds them back while the page fires.
                await asyncio.to_thread(
                    wait_until,
                    "the page and the tickets firing in Prometheus",
                    lambda: burn_alerts_in_prometheus(namespace) == {"page", "ticket"},
                    60,
                )
                ticket_matchers = (
                    f'alertname="{BURN_ALERT}"',
                    'severity="ticket"',
                    f'namespace="{namespace}"',
                )
                suppressed = await asyncio.to_thread(
                    wait_until,
                    "the tickets suppressed in Alertmanager",
                    lambda: [
                        a
                        for a in alertmanager_alerts(*ticket_matchers)
                        if a["status"]["state"] == "suppressed"
                    ],
                    60,
                )
                ticket_states = [
                    (a["labels"]["long_window"], a["status"]["state"], a["status"]["inhibitedBy"])
                    for a in alertmanager_alerts(*ticket_matchers)
                ]

        refusals = burn.refusals
        detected_after = notification["received_at"] - burn.started_at
        fired_after = dt.datetime.fromisoformat(alert["startsAt"]).timestamp() - burn.started_at
        assert refusals.grpc["RESOURCE_EXHAUSTED"] > 100, refusals
        assert refusals.rest[503] > 100, refusals
        assert notification["path"] == PAGER, notification
        assert alert["labels"]["alertname"] == BURN_ALERT
        assert alert["labels"]["severity"] == "page"
        assert alert["labels"]["slo"] == "availability"
        assert alert["labels"]["namespace"] == namespace
        assert alert["annotations"]["runbook_url"].endswith(f"{BURN_ALERT}.md")
        paged = [
            a["labels"]
            for _, a in webhook.alerts(BURN_ALERT, PAGER)
            if a["labels"]["namespace"] == namespace
        ]
        assert all((p["severity"], p["slo"]) == ("page", "availability") for p in paged), paged
        assert all(a["status"]["inhibitedBy"] for a in suppressed), ticket_states
        ticketed = [
            (n["path"], a["labels"])
            for n, a in webhook.alerts(BURN_ALERT)
            if a["labels"].get("namespace") == namespace and n["path"] != PAGER
        ]
        assert ticketed == []
        print(
            f"fast burn on the cluster after {good} good session starts: "
            f"{sum(refusals.grpc.values())} gRPC CreateSession "
            f"{dict(refusals.grpc)}, {sum(refusals.rest.values())} REST {dict(refusals.rest)}; "
            f"page fired {fired_after:.1f}s and reached the pager {detected_after:.1f}s after "
            f"the burn began (windows {SLO_CLUSTER_WINDOWS['sloWindow1h']}/"
            f"{SLO_CLUSTER_WINDOWS['sloWindow5m']}, for {SLO_CLUSTER_WINDOWS['sloPageFastFor']}, "
            f"the shipped group_wait 30s); {len(suppressed)} ticket alert(s) inhibited "
            f"{ticket_states}; {len(ticketed)} ticket notifications"
        )


async def test_rolling_update_under_load_loses_no_session(sre_release: None) -> None:
    """While a load test runs through the Service, `helm upgrade` rolls every pod. Each of our
    own sessions, whose stream is drained off a stopping pod, resumes on another pod with the
    same session id and receives prices again: no session is lost."""
    target = service_target()
    universe = ticker_universe(50)
    before = set(server_pods())
    # The pod whose /metrics gives the load test its own leak verdict is replaced by the roll:
    # do not wait 30 s for it (the checks below read every pod that is left).
    # Load from before the upgrade (10 s in) to well after the roll (about 15 s) and the 10 s
    # after it.
    load = run_loadtest(
        "10s:40,45s:40,5s:0",
        0,
        "--keep-users",
        "--leave-mix",
        "close_session=1",
        "--leak-timeout",
        "1",
    )
    lost: list[str] = []
    resumes: list[int] = []
    last_batch: dict[str, float] = {}
    stop = asyncio.Event()

    async def follow(index: int) -> None:
        """One user who resumes its session whenever its stream ends."""
        resumed = 0
        async with grpc.aio.insecure_channel(target) as channel:
            session = await PriceStreamServiceStub(channel).CreateSession(
                pb.CreateSessionRequest(tickers=universe[index % 40 : index % 40 + 3]), timeout=10
            )
        sid = session.session_id
        while not stop.is_set():
            # A new channel each time: the Service may then pick another pod.
            async with grpc.aio.insecure_channel(target) as channel:
                stub = PriceStreamServiceStub(channel)
                call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=sid))
                try:
                    while not stop.is_set():
                        batch = await asyncio.wait_for(call.read(), 5)
                        if batch is grpc.aio.EOF:
                            break
                        last_batch[sid] = time.time()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.NOT_FOUND:
                        lost.append(f"{sid}: {exc.details()}")
                        return
                    # UNAVAILABLE (draining) or FAILED_PRECONDITION (the old lease): try again
                    await asyncio.sleep(0.5)
                except TimeoutError:
                    pass
                finally:
                    call.cancel()
                if stop.is_set():
                    await stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
                    break
            resumed += 1
        resumes.append(resumed)

    users = [asyncio.create_task(follow(i)) for i in range(20)]
    await asyncio.sleep(10)
    upgrade_at = time.monotonic()
    await asyncio.to_thread(
        helm,
        "upgrade",
        RELEASE,
        str(CHART),
        "-n",
        SRE_NAMESPACE,
        *sre_values("--set-string", "podAnnotations.e2e/rollout=1"),
        "--wait",
    )
    rolled_at = time.time()
    print(f"rolled in {time.monotonic() - upgrade_at:.1f}s")
    assert load.poll() is None, "the load test ended before the roll did"
    after = set(server_pods())
    assert after and not before & after, (before, after)
    await asyncio.sleep(10)
    stop.set()
    await asyncio.gather(*users)
    assert lost == []
    assert len(last_batch) == 20
    assert all(t > rolled_at for t in last_batch.values()), "a session got no price after the roll"
    # Every pod was replaced, so every session was drained off one and resumed on another.
    assert len(resumes) == 20 and min(resumes) >= 1, resumes
    report = await asyncio.to_thread(loadtest_report, load, 200)
    print(f"resumes per session {resumes}; loadtest totals {report['total']}")
    await asyncio.sleep(3)  # the hub's linger
    assert invariant_1_on_every_pod() == {pod: [] for pod in server_pods()}


# --- The chart's lifecycles (run in the background since the session's first test) ---


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_chart_lifecycle(
    values_file: str, lifecycles: dict[str, tuple[Lifecycle, Future[None]]]
) -> None:
    """The lifecycle of one ci file (chart_lifecycle), started by the `lifecycles` fixture:
    every step passed, in order."""
    done, running = lifecycles[values_file]
    try:
        running.result(timeout=600)  # re-raises the lifecycle's failure
    finally:
        print(", ".join(f"{step} {secs:.1f}s" for step, secs in done.steps))
    assert [step for step, _ in done.steps] == LIFECYCLE_STEPS
