"""A real Sentinel deployment for the tests: a master, a replica and three sentinels, each a
process of our own on a free loopback port with its files in a temp dir, stopped by PID.

Sentinels run as ``redis-server <conf> --sentinel`` (the Debian ``redis-sentinel`` package
installs the same binary under another name), so redis-server is all the tests need.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from redis import Redis

from support.waiting import OwnedProcess, free_port, require_binary

MASTER_NAME = "prices"
DOWN_AFTER_MS = 2000


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


class Node(OwnedProcess):
    """One redis-server (data node or sentinel) with its config file in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        lines: list[str],
        sentinel: bool = False,
        password: str | None = None,
    ):
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.sentinel = sentinel
        self.password = password
        self.conf = self.workdir / "redis.conf"
        base = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.workdir}",
            'save ""',
            "appendonly no",
            # A replica's first sync starts at once (Redis waits 5 s for more replicas by default).
            "repl-diskless-sync-delay 0",
            "daemonize no",
            f"logfile {self.workdir / 'log'}",
        ]
        self.conf.write_text("\n".join(base + lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, str(self.conf)] + (["--sentinel"] if self.sentinel else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self.ping, 10, f"{self.name} answers PING")

    def ping(self) -> bool:
        with self.client() as client:
            return bool(client.ping())

    def client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)

    def role(self) -> str:
        with self.client() as client:
            return client.execute_command("ROLE")[0].decode()

    def pod_clients(self) -> list[dict]:
        """Clients that are neither sentinels, replication links nor this query."""
        with self.client() as client:
            return [
                c
                for c in client.client_list()
                if not c.get("name", "").startswith("sentinel-")
                and not set(c.get("flags", "")) & {"M", "S"}
                and c.get("cmd") != "client|list"
            ]

    def pubsub_clients(self) -> int:
        return sum(1 for c in self.pod_clients() if int(c.get("sub", 0)) > 0)

    def numsub(self, channel: str) -> int:
        with self.client() as client:
            return int(dict(client.pubsub_numsub(channel))[channel.encode()])


class SentinelDeployment:
    """Master + replica + 3 sentinels (quorum 2) watching ``MASTER_NAME``."""

    def __init__(
        self, workdir: Path, *, master_obeys_sentinels: bool = True, password: str | None = None
    ) -> None:
        # A master that refuses REPLICAOF stands for one the sentinels cannot reach to demote
        # (a partition): after a failover it stays a master that nobody publishes to.
        refuse = [] if master_obeys_sentinels else ['rename-command REPLICAOF ""',
                                                    'rename-command SLAVEOF ""']  # fmt: skip
        self.workdir = workdir
        # With a password: every node and sentinel asks for it, as a managed deployment does.
        auth = [f"requirepass {password}", f"masterauth {password}"] if password else []
        self.master = Node(workdir, "master", refuse + auth, password=password)
        self.replica = Node(
            workdir,
            "replica",
            [f"replicaof 127.0.0.1 {self.master.port}", *auth],
            password=password,
        )
        sentinel_auth = (
            [
                f"requirepass {password}",
                f"sentinel auth-pass {MASTER_NAME} {password}",
                f"sentinel sentinel-pass {password}",
            ]
            if password
            else []
        )
        monitor = [
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} 10000",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        self.sentinels = [
            Node(
                workdir, f"sentinel-{i}", monitor + sentinel_auth, sentinel=True, password=password
            )
            for i in range(3)
        ]

    @property
    def data_nodes(self) -> list[Node]:
        return [self.master, self.replica]

    @property
    def sentinel_list(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        _wait(self._replica_in_sync, 15, "replica in sync")
        for sentinel in self.sentinels:
            sentinel.start()
        # Every sentinel knows the replica and the other two before a test fails anything over.
        for sentinel in self.sentinels:
            _wait(lambda s=sentinel: self._ready(s), 20, f"{sentinel.name} sees the deployment")

    def _replica_in_sync(self) -> bool:
        with self.replica.client() as client:
            return client.info("replication")["master_link_status"] == "up"

    def _ready(self, sentinel: Node) -> bool:
        with sentinel.client() as client:
            state = client.sentinel_master(MASTER_NAME)
            replicas = client.sentinel_slaves(MASTER_NAME)
        return int(state["num-other-sentinels"]) == 2 and len(replicas) == 1

    def named_master(self) -> tuple[str, int] | None:
        """The master as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            if sentinel.proc is None:
                continue
            with sentinel.client() as client:
                host, port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            return host.decode() if isinstance(host, bytes) else host, int(port)
        return None

    def node_at(self, address: tuple[str, int]) -> Node:
        return next(n for n in self.data_nodes if n.address == address)

    def wait_master(self, address: tuple[str, int], timeout: float) -> None:
        """Until every running sentinel names ``address`` as the master."""

        def agreed() -> bool:
            for sentinel in self.sentinels:
                if sentinel.proc is None:
                    continue
                with sentinel.client() as client:
                    host, port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
                if (host.decode() if isinstance(host, bytes) else host, int(port)) != address:
                    return False
            return True

        _wait(agreed, timeout, f"sentinels name {address} as master")

    def failover(self) -> None:
        """SENTINEL FAILOVER (planned) through a running sentinel."""
        sentinel = next(s for s in self.sentinels if s.proc is not None)
        with sentinel.client() as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

    def settings(self) -> dict[str, object]:
        return {
            "redis_mode": "sentinel",
            "redis_sentinels": self.sentinel_list,
            "redis_sentinel_master": MASTER_NAME,
        }

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data_nodes]:
            node.kill()


def sockets_to(pid: int, port: int) -> list[str]:
    """TCP sockets (IPv4) that process ``pid`` holds open to loopback port ``port``, with their
    state (from /proc: the fds' socket inodes matched in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    states = {"01": "ESTABLISHED", "08": "CLOSE_WAIT", "02": "SYN_SENT", "06": "TIME_WAIT"}
    found = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[9] in inodes:
            found.append(states.get(fields[3], fields[3]))
    return found
