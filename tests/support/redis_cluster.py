"""A local Redis Cluster of real redis-server processes: 3 masters + 3 replicas (by default) on
free loopback ports in a temp dir, each process started and stopped by its PID. Used by
tests/test_cluster.py and by scripts/bench_shards.py (masters only, pinned to a core)."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from redis import Redis
from redis.crc import key_slot

from support.waiting import OwnedProcess, require_binary


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """``count`` loopback ports P that are free with P + 10000 (the node's cluster bus port)
    free too; below the kernel's ephemeral range so that P + 10000 stays a valid port."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 30000)
        taken = {p for q in ports for p in (q, q + 10000)}
        free = port not in taken and port + 10000 not in taken
        if free and _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    return ports


class ClusterNode(OwnedProcess):
    """One redis-server, started under ``setpriv --pdeathsig KILL``: it gets SIGKILL when the
    thread that started it ends, so a test process that is killed (a pytest-timeout abort
    skips fixture teardown) leaves no node behind. setpriv sets the signal and execs
    redis-server, so ``proc.pid`` is the server's.

    Not a ``preexec_fn`` doing the prctl: that makes subprocess fork (not vfork) and run
    Python in the child of a process whose gRPC threads are busy (the tests' pods): such a
    child can die of SIGSEGV or SIGABRT before exec (26 of 1500 with a gRPC server streaming
    in the process), leaving an empty log and no nodes.conf: "cluster node N did not start",
    most often in ``add_master``, which runs while a pod streams."""

    def __init__(
        self, binary: str, workdir: Path, port: int, wrapper: tuple[str, ...] = ()
    ) -> None:
        self.binary = binary
        self.setpriv = require_binary("setpriv")
        self.wrapper = wrapper  # a command that execs the rest (taskset -c CPUS): same PID
        self.port = port
        self.dir = workdir / str(port)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The node's stdout and stderr (its log), appended to across restarts."""
        return self.dir / "redis.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, node_timeout_ms: int) -> None:
        with open(self.log_path, "ab") as log:  # the child has its own copy of the descriptor
            self.proc = subprocess.Popen(
                [
                    self.setpriv, "--pdeathsig", "KILL", *self.wrapper,
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(self.dir / "nodes.conf"),
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--save", "",
                    "--appendonly", "no",
                    # A replica's first sync at once (by default Redis waits 5 s for more).
                    "--repl-diskless-sync-delay", "0",
                    "--dir", str(self.dir),
                    "--daemonize", "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def wait_up(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as client:
                    client.ping()
                return
            except Exception:
                exited = self.proc is not None and self.proc.poll() is not None
                if exited or time.monotonic() > deadline:
                    how = f"exited with {self.proc.returncode}" if exited else "did not answer"
                    raise RuntimeError(
                        f"cluster node {self.port} did not start ({how} within {timeout}s); "
                        f"its log ends:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, created by ``redis-cli --cluster``.
    ``node_timeout_ms``: cluster-node-timeout (1 s: quick failovers; Redis's default is
    15000); ``cpus``: pin every redis-server to these cores (``taskset -c``)."""

    def __init__(
        self,
        workdir: Path,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        cpus: str | None = None,
    ) -> None:
        server = require_binary("redis-server")
        self.cli = require_binary("redis-cli")
        self.wrapper = (require_binary("taskset"), "-c", cpus) if cpus is not None else ()
        self.masters, self.replicas = masters, replicas
        self.nodes = [
            ClusterNode(server, workdir, port, self.wrapper)
            for port in free_cluster_ports(masters * (1 + replicas))
        ]
        self.node_timeout_ms = node_timeout_ms

    def log_tails(self, nodes: Iterable[ClusterNode] | None = None, lines: int = 10) -> str:
        """The end of each node's log (of ``nodes``, or all), for a failure message."""
        chosen = self.nodes if nodes is None else list(nodes)
        return "".join(
            f"\n--- node {n.port} ({'running' if n.running else 'not running'}), log ends:\n"
            f"{n.log_tail(lines)}"
            for n in chosen
        )

    def run_cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """``redis-cli`` with ``args``; a failure says what it printed and the nodes' logs."""
        try:
            return subprocess.run(
                [self.cli, *args], check=True, capture_output=True, timeout=timeout, text=True
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(
                f"redis-cli {' '.join(args)} failed: {exc}\nstdout: {exc.stdout}\n"
                f"stderr: {exc.stderr}{self.log_tails()}"
            ) from None

    @property
    def url(self) -> str:
        """Seed URL naming the first two nodes (any node would do)."""
        return ",".join(f"redis://{n.address}" for n in self.nodes[:2])

    def start(self) -> None:
        for node in self.nodes:
            node.start(self.node_timeout_ms)
        for node in self.nodes:
            node.wait_up()
        if self.replicas == 0 and self.masters == 1:
            self.redis_cli("CLUSTER", "ADDSLOTSRANGE", "0", "16383", port=self.nodes[0].port)
        else:
            self.run_cli(
                "--cluster", "create", *(n.address for n in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes", timeout=60,
            )  # fmt: skip
        self.wait_healthy()
        self.wait_replicas_synced()

    def wait_replicas_synced(self, timeout: float = 30) -> None:
        """Until every replica's link to its master is up: a replica that never synced does
        not stand for election (its data age is unknown), so no failover would happen."""
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for node in self.live_nodes():
                with node.client() as client:
                    info = client.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    pending.append(node.port)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"replicas {pending} did not sync with their masters"
                    + self.log_tails(self.node(port) for port in pending)
                )
            time.sleep(0.1)

    def redis_cli(self, *args: str, port: int) -> str:
        return self.run_cli("-h", "127.0.0.1", "-p", str(port), *args, timeout=30).stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def live_nodes(self) -> Iterator[ClusterNode]:
        return (node for node in self.nodes if node.running)

    def node(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def slots(self) -> dict[int, int]:
        """Slot -> port of its master, as a live node sees it."""
        for node in self.live_nodes():
            try:
                with node.client() as client:
                    reply = client.execute_command("CLUSTER SLOTS")
            except Exception:
                continue
            owners: dict[int, int] = {}
            for start, end, master, *_ in reply:
                for slot in range(start, end + 1):
                    owners[slot] = int(master[1])
            return owners
        raise RuntimeError("no live cluster node answers CLUSTER SLOTS")

    def master_ports(self) -> list[int]:
        return sorted(set(self.slots().values()))

    def owner(self, key: str) -> ClusterNode:
        return self.node(self.slots()[key_slot(key.encode())])

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        with master.client() as client:
            master_id = client.execute_command("CLUSTER MYID").decode()
        for node in self.live_nodes():
            with node.client() as client:
                nodes = client.execute_command("CLUSTER NODES")  # redis-py parses it
            for info in nodes.values():
                flags = info["flags"]
                if "myself" in flags and "slave" in flags and info["master_id"] == master_id:
                    return node
        raise RuntimeError(f"no live replica of {master.port}")

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every live node reports cluster_state:ok and agrees on the slot owners."""
        deadline = time.monotonic() + timeout
        problem = "no live node"
        while True:
            try:
                views = []
                for node in self.live_nodes():
                    with node.client() as client:
                        info = client.execute_command("CLUSTER INFO")  # parsed: a dict
                        if info.get("cluster_state") != "ok":
                            raise RuntimeError(f"{node.port} not ok")
                        views.append(
                            sorted(
                                (s, int(m[1]))
                                for s, _, m, *_ in client.execute_command("CLUSTER SLOTS")
                            )
                        )
                if views and all(v == views[0] for v in views):
                    return
                if views:
                    problem = "the nodes disagree on the slot owners"
            except Exception as exc:
                problem = f"{exc!r}"
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"cluster did not become healthy within {timeout}s ({problem})"
                    + self.log_tails()
                )
            time.sleep(0.1)

    def add_master(self) -> ClusterNode:
        """A new, empty master joined to the cluster (``redis-cli --cluster add-node``); it
        owns no slot until a reshard gives it some."""
        taken = {n.port for n in self.nodes}
        port = next(p for p in free_cluster_ports(len(taken) + 1) if p not in taken)
        node = ClusterNode(self.nodes[0].binary, self.nodes[0].dir.parent, port, self.wrapper)
        self.nodes.append(node)
        node.start(self.node_timeout_ms)
        node.wait_up()
        seed = next(self.live_nodes())
        self.run_cli("--cluster", "add-node", node.address, seed.address, timeout=60)
        deadline = time.monotonic() + 30
        while True:  # until every node has met it
            known = []
            for other in self.live_nodes():
                with other.client() as client:
                    known.append(len(client.execute_command("CLUSTER NODES")))
            if all(count == len(self.nodes) for count in known):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {port} did not join: {known}{self.log_tails()}")
            time.sleep(0.1)
        self.wait_healthy()
        return node

    def node_id(self, node: ClusterNode) -> str:
        with node.client() as client:
            return client.execute_command("CLUSTER MYID").decode()

    def slot_range(self, master: ClusterNode) -> list[int]:
        """The slots a master owns, in order."""
        return sorted(slot for slot, port in self.slots().items() if port == master.port)

    def reshard(self, source: ClusterNode, target: ClusterNode, count: int) -> None:
        """``redis-cli --cluster reshard``: move ``count`` slots (and their keys) from source
        to target, the way an operator does it."""
        self.run_cli(
            "--cluster", "reshard", source.address,
            "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
            "--cluster-slots", str(count), "--cluster-yes", timeout=120,
        )  # fmt: skip


def shardnumsub(node: ClusterNode, channel: str) -> int:
    """Subscribers of a shard channel on one node (PUBSUB SHARDNUMSUB)."""
    with node.client() as client:
        reply = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


def sharded_subscribers(node: ClusterNode) -> int:
    """Clients of a node subscribed to at least one shard channel."""
    with node.client() as client:
        return sum(1 for c in client.client_list() if int(c.get("ssub", 0)) > 0)


def wait_promoted(cluster: LocalCluster, node: ClusterNode, timeout: float = 30) -> None:
    """Until ``node`` is a master that owns slots in the view of every live node."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cluster.wait_healthy(timeout=max(0.1, deadline - time.monotonic()))
            if node.port in cluster.master_ports():
                return
        except RuntimeError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node.port} was not promoted within {timeout}s")
        time.sleep(0.05)
