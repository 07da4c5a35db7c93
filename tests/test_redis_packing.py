"""hiredis packs every command into the bytes redis-py's own asyncio packer would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pricestream.redis.client import make_pool
from pricestream.redis.packing import HiredisPacking, with_hiredis_packing
from pricestream.settings import Settings
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

pytestmark = pytest.mark.unit

PYTHON = Connection()
FAST = with_hiredis_packing(Connection)()

argument = st.one_of(
    st.text(max_size=30),
    st.binary(max_size=30),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


@given(st.sampled_from(["EVALSHA", "SET", "SCRIPT LOAD", b"CLIENT SETNAME", b"GET"]),
       st.lists(argument, max_size=40))  # fmt: skip
def test_same_bytes_as_redis_py(command: str | bytes, args: list[object]) -> None:
    assert b"".join(FAST.pack_command(command, *args)) == b"".join(
        PYTHON.pack_command(command, *args)
    )


def test_large_command_same_bytes() -> None:
    args = [f"pricestream:lease:{i:032x}" for i in range(600)] + ["é" * 5000, b"\x00" * 70_000]
    assert b"".join(FAST.pack_command("EVALSHA", "a" * 40, 600, *args)) == b"".join(
        PYTHON.pack_command("EVALSHA", "a" * 40, 600, *args)
    )


def test_what_redis_py_refuses_is_refused_the_same_way() -> None:
    with pytest.raises(DataError):
        FAST.pack_command("SET", "key", None)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://127.0.0.1:6390/0", Connection),
        ("rediss://127.0.0.1:6390/0", SSLConnection),
        ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
    ],
)
def test_every_pool_packs_with_hiredis(url: str, base: type) -> None:
    pool = make_pool(Settings(redis_url=url))
    assert issubclass(pool.connection_class, HiredisPacking)
    assert issubclass(pool.connection_class, base)
    assert with_hiredis_packing(pool.connection_class) is pool.connection_class


def test_sentinel_pool_packs_with_hiredis() -> None:
    settings = Settings(
        redis_mode="sentinel", redis_sentinels="127.0.0.1:26390", redis_sentinel_master="prices"
    )
    pool = make_pool(settings)
    assert issubclass(pool.connection_class, HiredisPacking)
    assert pool.connection_class.__name__ == "HiredisSentinelManagedConnection"
