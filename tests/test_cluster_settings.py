"""Cluster-mode settings: seed nodes in PRICESTREAM_REDIS_URL, each mistake one clear line."""

from __future__ import annotations

import pytest
from pricestream.redis.cluster_client import NodeOptions
from pricestream.settings import SettingsError, cluster_seed_nodes, load_settings

pytestmark = pytest.mark.unit


def test_seed_nodes_from_one_url() -> None:
    assert cluster_seed_nodes("redis://10.0.0.1:7000") == [("10.0.0.1", 7000)]
    assert cluster_seed_nodes("redis://a:7000,b:7001,redis://c:7002/0") == [
        ("a", 7000),
        ("b", 7001),
        ("c", 7002),
    ]
    assert cluster_seed_nodes("rediss://user:pw@[fd00::1]:7000,[fd00::2]:7001") == [
        ("fd00::1", 7000),
        ("fd00::2", 7001),
    ]


def test_credentials_and_tls_of_the_first_node_apply_to_all() -> None:
    settings = load_settings(redis_url="rediss://app:s3cret@a:7000,b:7001", redis_mode="cluster")
    options = NodeOptions.from_settings(settings)
    assert options.seeds == (("a", 7000), ("b", 7001))
    assert (options.username, options.password, options.tls) == ("app", "s3cret", True)


@pytest.mark.parametrize(
    ("url", "mode", "message"),
    [
        ("redis://a:7000,b", "cluster", "cluster node 'b' is not host:port"),
        ("redis://a:7000/2", "cluster", "a cluster has database 0 only"),
        ("unix:///run/redis.sock", "cluster", "needs a redis:// or rediss:// seed node URL"),
        ("redis://a:7000,b:7001", "standalone", "several nodes in redis_url need redis_mode"),
    ],
)
def test_bad_cluster_settings_are_one_line(url: str, mode: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(redis_url=url, redis_mode=mode)
    text = str(raised.value)
    assert message in text
    assert "\n" not in text


def test_cluster_mode_is_accepted() -> None:
    assert load_settings(redis_url="redis://a:7000", redis_mode="cluster").redis_mode == "cluster"
