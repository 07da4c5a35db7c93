"""Debian's nginx in front of a pricestream web port, configured the way ingress-nginx
configures a location for an Ingress (issue 26, line 11): the WebSocket Upgrade passed on with
the `$connection_upgrade` map, Host and X-Forwarded-* set from the client's request, upstream
keep-alive, and the chart's Ingress annotations (read from values.yaml) turned into the
`proxy_read_timeout` / `proxy_send_timeout` / `proxy_buffering` lines ingress-nginx renders
from them. Everything nginx writes (pid, logs, temp directories) stays in the test's folder."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "deploy/helm/pricestream/values.yaml"

# ingress-nginx annotation -> the nginx directive it renders in the location block.
ANNOTATION_DIRECTIVES = {
    "nginx.ingress.kubernetes.io/proxy-read-timeout": ("proxy_read_timeout", "{}s"),
    "nginx.ingress.kubernetes.io/proxy-send-timeout": ("proxy_send_timeout", "{}s"),
    "nginx.ingress.kubernetes.io/proxy-buffering": ("proxy_buffering", "{}"),
}
# ingress-nginx's defaults where no annotation says otherwise (its ConfigMap defaults).
DEFAULT_DIRECTIVES = {
    "proxy_read_timeout": "60s",
    "proxy_send_timeout": "60s",
    "proxy_buffering": "off",
}
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def chart_annotations() -> dict[str, str]:
    """The chart's default Ingress annotations (values.yaml `ingress.annotations`)."""
    values = yaml.safe_load(VALUES.read_text())
    return {k: str(v) for k, v in (values["ingress"]["annotations"] or {}).items()}


def location_directives(annotations: dict[str, str]) -> dict[str, str]:
    """The timeout and buffering directives ingress-nginx renders for these annotations."""
    directives = dict(DEFAULT_DIRECTIVES)
    for key, value in annotations.items():
        if key in ANNOTATION_DIRECTIVES:
            name, form = ANNOTATION_DIRECTIVES[key]
            directives[name] = form.format(value)
    return directives


def nginx_config(
    folder: Path,
    listen_port: int,
    upstream_port: int,
    *,
    keepalive: int,
    ignore_headers: tuple[str, ...] = (),
) -> str:
    """nginx.conf: one server, one location `/` to the upstream, as ingress-nginx renders it.
    ``keepalive`` is ingress-nginx's `upstream-keepalive-connections` (default 320; 0 turns
    upstream keep-alive off, and then the map sends `Connection: close` on plain requests).
    No `user` line: run as root, the worker runs as nobody, which is enough, since nothing here
    reaches a temp file (request bodies fit in memory, response buffering is off).
    ``ignore_headers``: upstream response headers nginx is told to disregard
    (`proxy_ignore_headers`), e.g. X-Accel-Buffering, to show what the annotations do alone."""
    directives = location_directives(chart_annotations())
    if ignore_headers:
        directives["proxy_ignore_headers"] = " ".join(ignore_headers)
    location = "\n".join(f"            {name} {value};" for name, value in directives.items())
    temp = "\n".join(f"    {name}_temp_path {folder / name};" for name in TEMP_DIRS)
    plain_connection = "''" if keepalive else "close"
    upstream_keepalive = (
        f"        keepalive {keepalive};\n"
        "        keepalive_timeout 60s;\n"
        "        keepalive_requests 10000;\n"
        if keepalive
        else ""
    )
    return f"""\
worker_processes 1;
worker_shutdown_timeout 10s;
error_log {folder / "error.log"} info;

events {{
    worker_connections 1024;
}}

http {{
    default_type text/html;
    tcp_nopush on;
    tcp_nodelay on;
    reset_timedout_connection on;
    keepalive_timeout 75s;
    server_tokens off;
{temp}

    log_format upstreaminfo '$remote_addr "$request" $status $body_bytes_sent '
                            '$request_time [$upstream_addr] $upstream_status $req_id';
    access_log {folder / "access.log"} upstreaminfo;

    # ingress-nginx: https://www.nginx.com/blog/websocket-nginx
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      {plain_connection};
    }}
    map $http_host $best_http_host {{
        default $http_host;
        ''      $host;
    }}
    map $http_x_request_id $req_id {{
        default $http_x_request_id;
        ''      $request_id;
    }}

    upstream pricestream {{
        server 127.0.0.1:{upstream_port};
{upstream_keepalive}    }}

    server {{
        listen 127.0.0.1:{listen_port};
        server_name _;

        location / {{
            client_max_body_size 1m;

            proxy_set_header Host $best_http_host;
            # Allow websocket connections
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;

            proxy_set_header X-Request-ID $req_id;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Host $best_http_host;
            proxy_set_header X-Forwarded-Port $server_port;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Scheme $scheme;
            proxy_set_header X-Original-Forwarded-For $http_x_forwarded_for;
            proxy_set_header Proxy "";

            proxy_connect_timeout 5s;
{location}
            proxy_buffer_size 4k;
            proxy_buffers 4 4k;
            proxy_request_buffering on;
            proxy_http_version 1.1;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 3;

            proxy_pass http://pricestream;
            proxy_redirect off;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx: its port, its folder, and what it logged."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]
    config: str

    @property
    def access_log(self) -> str:
        path = self.folder / "access.log"
        return path.read_text() if path.exists() else ""

    @property
    def error_log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text() if path.exists() else ""


def _command(binary: str, folder: Path, conf: Path) -> list[str]:
    return [
        binary,
        "-p", f"{folder}/",
        "-c", str(conf),
        "-e", str(folder / "error.log"),  # not the packaged /var/log/nginx/error.log
        "-g", f"daemon off; pid {folder / 'nginx.pid'};",
    ]  # fmt: skip


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGQUIT (nginx's graceful shutdown) to the master, by its PID; SIGKILL to its own
    process group (the master and its worker, started in a session of their own) after
    ``timeout``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGQUIT)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


@contextlib.contextmanager
def running_nginx(
    binary: str,
    folder: Path,
    listen_port: int,
    upstream_port: int,
    *,
    keepalive: int = 320,
    ignore_headers: tuple[str, ...] = (),
) -> Iterator[Nginx]:
    """nginx in front of ``upstream_port``: checked with `nginx -t`, started in the
    foreground, ready once its port accepts; stopped on the way out."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TEMP_DIRS:
        (folder / name).mkdir(exist_ok=True)
    config = nginx_config(
        folder, listen_port, upstream_port, keepalive=keepalive, ignore_headers=ignore_headers
    )
    conf = folder / "nginx.conf"
    conf.write_text(config)
    command = _command(binary, folder, conf)
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise AssertionError(f"nginx -t refused the config:\n{check.stderr}\n{config}")
    output = (folder / "nginx.out").open("wb")
    process = subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while not _accepts(listen_port):
            if process.poll() is not None:
                raise AssertionError(
                    f"nginx exited with {process.returncode}:\n"
                    f"{(folder / 'nginx.out').read_text()}\n{(folder / 'error.log').read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx did not accept on {listen_port} within 10 s")
            time.sleep(0.02)
        yield Nginx(listen_port, folder, process, config)
    finally:
        stop(process)
        output.close()
