"""Unknown `PRICESTREAM_*` variables stop the start; Kubernetes service links do not."""

from __future__ import annotations

import ipaddress

import pytest
from pricestream.settings import (
    SettingsError,
    check_environment,
    load_settings,
    proxy_networks,
    sentinel_addresses,
    unknown_settings,
)

pytestmark = pytest.mark.unit


def service_links(service: str, ip: str, ports: dict[str, int]) -> dict[str, str]:
    """The variables the kubelet injects for a Service (pkg/kubelet/envvars), TCP ports."""
    prefix = service.upper().replace("-", "_")
    host = f"[{ip}]" if ":" in ip else ip
    (first_port, *_) = ports.values()
    env = {
        f"{prefix}_SERVICE_HOST": ip,
        f"{prefix}_SERVICE_PORT": str(first_port),
        f"{prefix}_PORT": f"tcp://{host}:{first_port}",
    }
    for name, port in ports.items():
        env[f"{prefix}_SERVICE_PORT_{name.upper().replace('-', '_')}"] = str(port)
        link = f"{prefix}_PORT_{port}_TCP"
        env[link] = f"tcp://{host}:{port}"
        env[f"{link}_PROTO"] = "tcp"
        env[f"{link}_PORT"] = str(port)
        env[f"{link}_ADDR"] = ip
    return env


CHART_SERVICES = {
    **service_links("pricestream", "10.96.14.2", {"grpc": 50051, "metrics": 9464}),
    **service_links("pricestream-redis", "10.96.200.17", {"redis": 6379}),
    **service_links("pricestream-canary", "fd00:10:96::a", {"grpc-web": 8080}),
}


def refusal(environ: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as raised:
        check_environment(environ)
    return str(raised.value)


def test_unknown_variable_names_the_closest_setting() -> None:
    environ = {"PRICESTREAM_METRICS_PORT": "9000", "PRICESTREAM_REDIS_URL": "redis://r:6379/0"}
    assert refusal(environ) == (
        "unknown setting PRICESTREAM_METRICS_PORT; did you mean PRICESTREAM_HTTP_PORT?"
    )
    assert refusal({"PRICESTREAM_FLUSH_INTERVALL": "0.5"}).endswith(
        "did you mean PRICESTREAM_FLUSH_INTERVAL?"
    )


def test_unknown_variable_without_a_close_setting_points_to_the_list() -> None:
    assert refusal({"PRICESTREAM_BANANA": "1"}) == (
        "unknown setting PRICESTREAM_BANANA; see `pricestream serve --help`"
    )


def test_several_unknown_variables_make_one_line() -> None:
    message = refusal({"PRICESTREAM_ZZZ": "1", "PRICESTREAM_MAXSESSIONS": "5"})
    assert "\n" not in message
    assert message == (
        "unknown setting PRICESTREAM_MAXSESSIONS; did you mean PRICESTREAM_MAX_SESSIONS? "
        "(and 1 more unknown: PRICESTREAM_ZZZ)"
    )


def test_settings_other_variables_and_service_links_pass() -> None:
    environ = {
        **CHART_SERVICES,
        "PRICESTREAM_HTTP_PORT": "9464",
        "PRICESTREAM_POD_NAME": "pricestream-7d9f-abc",
        "PATH": "/usr/bin",
        "REDIS_PORT": "garbage",
    }
    assert unknown_settings(environ) == []
    check_environment(environ)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PRICESTREAM_REDIS_PORT", "6379"),  # a link carries a URL; a bare port is a typo
        ("PRICESTREAM_SERVICE_HOST", "pricestream.prod.svc"),  # links carry the cluster IP
        ("PRICESTREAM_SERVICE_PORT_GRPC", "grpc"),
        ("PRICESTREAM_PORT_50051_TCP_PORT", "9464"),  # not the port its name says
        ("PRICESTREAM_PORT_50051_TCP_PROTO", "udp"),
        ("PRICESTREAM_PORT", "http://10.96.14.2:50051"),
        ("PRICESTREAM_PORT_50051_TCP", "tcp://example.com:50051"),
        ("PRICESTREAM_PORT_50051_TCP_ADDR", "10.96.14"),
        ("PRICESTREAM_METRICS_SERVICE_HOSTNAME", "10.96.14.2"),
    ],
)
def test_link_names_with_other_values_are_unknown(name: str, value: str) -> None:
    assert unknown_settings({name: value}) == [name]


def test_link_value_under_a_setting_name_is_left_to_validation() -> None:
    """A Service named pricestream-grpc would inject PRICESTREAM_GRPC_PORT=tcp://…: that is a
    real setting, so its value fails validation (the chart turns service links off)."""
    assert unknown_settings({"PRICESTREAM_GRPC_PORT": "tcp://10.96.0.9:50051"}) == []


SENTINEL = {
    "redis_mode": "sentinel",
    "redis_sentinels": "10.0.0.1:26379,[fd00::2]:26379",
    "redis_sentinel_master": "prices",
}


def test_sentinel_mode_is_accepted_with_its_settings() -> None:
    settings = load_settings(**SENTINEL, redis_url="rediss://:pw@ignored:6379/3")
    assert settings.redis_mode == "sentinel"
    assert sentinel_addresses(settings.redis_sentinels) == [
        ("10.0.0.1", 26379),
        ("fd00::2", 26379),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"redis_mode": "sentinel"}, "redis_mode=sentinel needs redis_sentinels and"),
        ({**SENTINEL, "redis_sentinels": "10.0.0.1"}, "'10.0.0.1' is not host:port"),
        ({**SENTINEL, "redis_url": "unix:///run/redis.sock"}, "needs a redis:// or rediss://"),
        ({"redis_sentinel_master": "prices"}, "need redis_mode=sentinel"),
    ],
)
def test_bad_topology_is_one_clear_line(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(**overrides)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_trusted_proxies_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    value = " 10.244.0.0/16, fd00:10:244::/56,192.0.2.7 ,"
    environ = {"PRICESTREAM_TRUSTED_PROXIES": value}
    check_environment(environ)  # a known setting
    monkeypatch.setenv("PRICESTREAM_TRUSTED_PROXIES", value)
    settings = load_settings()
    assert proxy_networks(settings.trusted_proxies) == (
        ipaddress.ip_network("10.244.0.0/16"),
        ipaddress.ip_network("fd00:10:244::/56"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert proxy_networks(load_settings(trusted_proxies="").trusted_proxies) == ()
    monkeypatch.delenv("PRICESTREAM_TRUSTED_PROXIES")
    assert load_settings().trusted_proxies == ""  # the default: trust no proxy


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.0/8,nginx", "'nginx' is not an IP address or a CIDR network"),
        ("10.0.0.300", "'10.0.0.300' is not an IP address or a CIDR network"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP address or a CIDR network"),
        ("127.0.0.1:80", "'127.0.0.1:80' is not an IP address or a CIDR network"),
        ("10.244.1.0/16", "'10.244.1.0/16' has host bits set; did you mean 10.244.0.0/16?"),
        ("fe80::1%eth0", "'fe80::1%eth0' has an IPv6 zone"),
    ],
)
def test_a_malformed_trusted_proxy_is_one_line_naming_it(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(trusted_proxies=value)
    text = str(raised.value)
    named = "invalid setting trusted_proxies (env PRICESTREAM_TRUSTED_PROXIES): "
    assert text.startswith(named) and message in text and "\n" not in text, text
