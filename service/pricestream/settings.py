"""Server settings: flags and ``PRICESTREAM_*`` environment variables, validated once at start."""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "PRICESTREAM_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
KNOWN_FAULTS = frozenset({"skip_cleanup_on_send_error", "skip_cleanup_on_ws_close"})

Seconds = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """Every tunable of ``pricestream serve``; env var: ``PRICESTREAM_`` + the upper-case name."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Redis URL (redis:// or rediss://); cluster mode: one or more seed nodes, "
        "comma-separated (redis://host:port,host:port).",
    )
    redis_mode: Literal["standalone", "sentinel", "cluster"] = Field(
        "standalone",
        description="Redis topology: standalone (the URL's server), sentinel (the master the "
        "sentinels name) or cluster (sharded Pub/Sub; the URL names a seed node).",
    )
    redis_sentinels: str = Field(
        "", description="Sentinel mode: the sentinels, host:port,host:port,..."
    )
    redis_sentinel_master: str = Field(
        "", description="Sentinel mode: the master's name the sentinels monitor."
    )
    grpc_host: str = Field("[::]", description="Address the gRPC server binds.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    http_host: str = Field(
        "0.0.0.0", description="Address of the /metrics, /healthz, /readyz server."
    )
    http_port: int = Field(9464, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    web_host: str = Field(
        "[::]", description="Address of the browser port (REST, WebSocket, SSE, the live page)."
    )
    web_port: int = Field(
        8080, ge=0, le=65535, description="Browser port: HTTP/1.1 (0 picks a free one)."
    )
    web_allowed_origins: str = Field(
        "",
        description="Comma-separated origins (scheme://host[:port]) whose pages may open "
        "streams and call REST; '*' allows any; empty: the page's own host only.",
    )
    web_ping_interval: Seconds = Field(
        25.0, description="Seconds between the server's WebSocket pings."
    )
    web_pong_timeout: Seconds = Field(
        10.0, description="Seconds a pong may take before the socket closes with 4001."
    )
    web_accept_rate: float = Field(
        1000.0,
        ge=0.0,
        description="New browser streams per second this pod admits (reconnect storms); "
        "0: no limit.",
    )
    web_accept_burst: int = Field(
        1000, ge=1, description="New browser streams this pod admits at once."
    )
    web_drain_window: float = Field(
        5.0,
        ge=0.0,
        description="Seconds over which SIGTERM closes open browser streams (1001), jittered, "
        "so their clients do not reconnect elsewhere all at once.",
    )
    flush_interval: float = Field(0.1, ge=0.01, le=10.0, description="Seconds between batches.")
    freshness_margin: float = Field(
        0.1,
        gt=0.0,
        le=10.0,
        description="Seconds beyond the flush interval a delivery may take and still count as "
        "fresh (the freshness SLO): the delivery-latency histogram gets a bucket bound at flush "
        "interval + this. The chart sets it from slo.freshness.marginSeconds.",
    )
    session_ttl: Seconds = Field(60.0, description="Seconds a never-streamed session lives.")
    resume_grace: Seconds = Field(
        30.0, description="Seconds a session stays resumable after its stream ends."
    )
    lease_ttl: float = Field(
        10.0, ge=1.0, description="Seconds a stream's lease lives unless refreshed."
    )
    linger: float = Field(
        1.0, ge=0.0, description="Seconds a ticker stays subscribed after its last subscriber."
    )
    pubsub_connections: int = Field(
        2, ge=1, le=16, description="Redis Pub/Sub connections per pod."
    )
    max_tickers_per_session: int = Field(
        100, ge=1, le=10_000, description="Tickers one session may ask for."
    )
    max_send_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64,
        description="Largest message sent; a larger batch ends the stream.",
    )
    max_update_bytes: int = Field(
        1024,
        ge=64,
        description="Largest Pub/Sub price payload accepted; larger ones are dropped unread.",
    )
    max_sessions: int = Field(20_000, ge=1, description="Sessions one pod holds at most.")
    session_create_rate: float = Field(
        0.0, ge=0.0, description="CreateSession calls per second per client IP (0: no limit)."
    )
    session_create_burst: int = Field(
        100, ge=1, description="CreateSession calls a client IP may make at once."
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated IP addresses or CIDR networks of the proxies in front (the "
        "ingress controller's pods) whose X-Forwarded-For names the client IP the session create "
        "rate applies to; empty: trust none, the limit applies to the TCP peer.",
    )
    overload_lag: float = Field(
        0.5,
        ge=0.0,
        description="Seconds the flush clock may run late before the pod refuses new sessions "
        "and turns not ready (0: never).",
    )
    overload_backlog: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Share of streams with news that may be busy with an earlier batch for over "
        "a flush interval (at least 250 ms) before the pod refuses new sessions and turns not "
        "ready (0: never).",
    )
    stall_timeout: Seconds = Field(
        10.0, description="Seconds a client may leave a batch unread before it is cut off."
    )
    drain_timeout: Seconds = Field(
        10.0, description="Seconds SIGTERM waits for streams to end before exiting."
    )
    redis_timeout: Seconds = Field(2.0, description="Timeout of every Redis command and connect.")
    probe_interval: Seconds = Field(
        5.0, description="Idle seconds before a Pub/Sub connection is probed."
    )
    probe_timeout: Seconds = Field(
        2.0, description="Seconds a liveness probe may take before reconnecting."
    )
    redis_outage_limit: Seconds = Field(
        30.0, description="Seconds streams stay open while Redis is unreachable, then UNAVAILABLE."
    )
    max_connection_age: Seconds = Field(
        900.0, description="Seconds before a client connection is asked to reconnect (rebalancing)."
    )
    max_connection_age_grace: Seconds = Field(
        10.0, description="Seconds streams get to finish after that; then the connection closes."
    )
    auth_tokens: str = Field(
        "", description="Comma-separated bearer tokens; when set (or a file), every RPC needs one."
    )
    auth_tokens_file: str = Field(
        "", description="File with one bearer token per line (a mounted Kubernetes Secret)."
    )
    tls_cert_file: str = Field(
        "", description="PEM certificate chain of the gRPC port; with tls_key_file turns TLS on."
    )
    tls_key_file: str = Field("", description="PEM private key of that certificate.")
    tls_client_ca_file: str = Field(
        "", description="PEM CA bundle; when set, clients must present a certificate it signed."
    )
    reconnect_max_backoff: Seconds = Field(5.0, description="Upper bound of the reconnect backoff.")
    pod_name: str = Field(
        default_factory=socket.gethostname, min_length=1, description="Name in logs."
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    faults: str = Field(
        "", description="Fault injection for detection tests only; never in production."
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: str) -> str:
        sentinel_addresses(value)  # raises on a malformed address
        return value

    @field_validator("web_allowed_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        allowed_origins(value)  # raises on a malformed origin
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        proxy_networks(value)  # raises on a malformed entry
        return value

    @field_validator("faults")
    @classmethod
    def _known_faults(cls, value: str) -> str:
        names = {name.strip() for name in value.split(",") if name.strip()}
        unknown = names - KNOWN_FAULTS
        if unknown:
            raise ValueError(f"unknown fault {sorted(unknown)[0]!r}; known: {sorted(KNOWN_FAULTS)}")
        return ",".join(sorted(names))

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _redis_topology(self) -> Settings:
        sentinel = self.redis_mode == "sentinel"
        if sentinel and not (self.redis_sentinels and self.redis_sentinel_master):
            raise ValueError("redis_mode=sentinel needs redis_sentinels and redis_sentinel_master")
        if not sentinel and (self.redis_sentinels or self.redis_sentinel_master):
            raise ValueError("redis_sentinels and redis_sentinel_master need redis_mode=sentinel")
        if self.redis_mode == "cluster":
            if self.redis_url.startswith("unix://"):
                raise ValueError("redis_mode=cluster needs a redis:// or rediss:// seed node URL")
            cluster_seed_nodes(self.redis_url)  # raises on a malformed seed
        elif "," in self.redis_url:
            raise ValueError("several nodes in redis_url need redis_mode=cluster")
        if sentinel and self.redis_url.startswith("unix://"):
            raise ValueError(
                "redis_mode=sentinel needs a redis:// or rediss:// URL (its credentials, TLS "
                "and database apply to the master the sentinels name)"
            )
        return self

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def has_fault(self, name: str) -> bool:
        return name in self.faults.split(",")


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` (IPv6 hosts in brackets) as pairs; ValueError names a bad one."""
    pairs: list[tuple[str, int]] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not _is_port(port):
            raise ValueError(f"{item!r} is not host:port")
        pairs.append((host, int(port)))
    return pairs


_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.\-]+(?::[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?"
)


def allowed_origins(value: str) -> frozenset[str]:
    """The origins of ``web_allowed_origins`` (lower-case), ``*`` alone meaning any; ValueError
    names a malformed one."""
    origins = {item.strip().lower().rstrip("/") for item in value.split(",") if item.strip()}
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ValueError(f"{origin!r} is not an origin like https://example.com[:port] or *")
    return frozenset(origins)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_networks(value: str) -> tuple[IPNetwork, ...]:
    """The networks of ``trusted_proxies`` (an address alone is a /32 or /128); ValueError
    names a malformed entry."""
    networks: list[IPNetwork] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if "%" in item:  # forwarded addresses never carry a zone, so it could never match
            raise ValueError(f"{item!r} has an IPv6 zone (%...); list it without one")
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError:
            try:
                meant = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or a CIDR network like 10.0.0.0/8 or fd00::/8"
                ) from None
            raise ValueError(f"{item!r} has host bits set; did you mean {meant}?") from None
    return tuple(networks)


def cluster_seed_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes of a cluster-mode URL, ``redis://[user:pass@]host:port,host:port/0``
    (later nodes may repeat the scheme); ValueError names a bad one. Credentials and TLS come
    from the first node and apply to every node; a cluster has database 0 only."""
    scheme, _, rest = url.partition("://")
    first, *others = rest.split(",")
    first_node = first.rpartition("@")[2]
    nodes: list[tuple[str, int]] = []
    for index, item in enumerate([first_node, *others]):
        node = item.strip()
        if index:
            node = node.removeprefix(f"{scheme}://")
        node, _, db = node.partition("/")
        if db not in ("", "0"):
            raise ValueError(f"cluster node {item!r}: a cluster has database 0 only")
        host, sep, port = node.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not _is_port(port):
            raise ValueError(f"cluster node {item!r} is not host:port")
        nodes.append((host, int(port)))
    return nodes


class SettingsError(ValueError):
    """A setting is invalid; the message is one line meant for the operator."""


def load_settings(**overrides: object) -> Settings:
    """Build settings from env vars plus explicit overrides (flags), or raise one clear line."""
    cleaned = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**cleaned)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a rule across settings
            raise SettingsError(f"invalid settings: {message}") from None
        name = str(first["loc"][0])
        raise SettingsError(
            f"invalid setting {name} (env PRICESTREAM_{name.upper()}): {message}"
        ) from None


# Kubernetes service links: for a Service "pricestream" (or "pricestream-redis", ...) in the
# namespace, every pod gets these variables (name: service name upper-cased, "-" as "_").
# A name counts as a link only if its value has the shape Kubernetes gives it too.
_SERVICE = r"PRICESTREAM(?:_[A-Z0-9_]+)?"
_PORT_LINK = rf"{_SERVICE}_PORT_(?P<port>[0-9]{{1,5}})_(?P<proto>TCP|UDP|SCTP)"
_LINK_URL = re.compile(r"(?P<proto>tcp|udp|sctp)://(?P<host>[0-9.]+|\[[0-9a-fA-F:.]+\]):[0-9]{1,5}")
_LINK_NAMES = {
    "host": re.compile(rf"{_SERVICE}_SERVICE_HOST"),  # 10.96.0.12
    "port": re.compile(rf"{_SERVICE}_SERVICE_PORT(?:_[A-Z0-9_]+)?"),  # 50051
    "url": re.compile(rf"{_SERVICE}_PORT|{_PORT_LINK}"),  # tcp://10.96.0.12:50051
    "proto": re.compile(rf"{_PORT_LINK}_PROTO"),  # tcp
    "port_of": re.compile(rf"{_PORT_LINK}_PORT"),  # 50051
    "addr": re.compile(rf"{_PORT_LINK}_ADDR"),  # 10.96.0.12
}
# Words an operator may reach for that our settings name differently.
_SYNONYMS = {"METRICS": "HTTP", "HEALTH": "HTTP"}


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _is_port(value: str) -> bool:
    return value.isdigit() and 0 < int(value) <= 65535


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is a variable Kubernetes injects for a Service (service links)."""
    for shape, pattern in _LINK_NAMES.items():
        match = pattern.fullmatch(name)
        if match is None:
            continue
        if shape in ("host", "addr") and _is_ip(value):
            return True
        if shape == "port" and _is_port(value):
            return True
        if shape == "port_of" and value == match["port"]:
            return True
        if shape == "proto" and value == match["proto"].lower():
            return True
        if shape == "url":
            url = _LINK_URL.fullmatch(value)
            if url is not None and _is_ip(url["host"]):
                return True
    return False


def setting_names() -> list[str]:
    """The environment variable of every setting."""
    return [ENV_PREFIX + name.upper() for name in Settings.model_fields]


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """``PRICESTREAM_*`` variables that name no setting and are no Kubernetes service link."""
    known = set(setting_names())
    return sorted(
        name
        for name, value in environ.items()
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in known
        and not is_service_link(name, value)
    )


def closest_setting(name: str) -> str | None:
    """The setting an unknown variable most likely meant, if one is close."""
    words = name.upper().removeprefix(ENV_PREFIX).split("_")
    wanted = "_".join(_SYNONYMS.get(word, word) for word in words)
    known = {n.removeprefix(ENV_PREFIX): n for n in setting_names()}
    match = difflib.get_close_matches(wanted, known, n=1, cutoff=0.6)
    return known[match[0]] if match else None


def check_environment(environ: Mapping[str, str]) -> None:
    """Raise SettingsError (one line) if a ``PRICESTREAM_*`` variable names no setting."""
    unknown = unknown_settings(environ)
    if not unknown:
        return
    first = unknown[0]
    closest = closest_setting(first)
    message = f"unknown setting {first}"
    message += f"; did you mean {closest}?" if closest else "; see `pricestream serve --help`"
    if len(unknown) > 1:
        message += f" (and {len(unknown) - 1} more unknown: {', '.join(unknown[1:])})"
    raise SettingsError(message)
