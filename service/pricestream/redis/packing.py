"""Commands packed into RESP by hiredis (C) instead of redis-py's asyncio packer (Python).

redis-py packs with hiredis only on its synchronous connections; the asyncio ones build each
command in Python, growing one bytes object argument by argument. A lease refresh of 200
sessions (1,000 arguments) took 1.5 ms of the event loop that way and 0.1 ms through
``hiredis.pack_command``, which produces the same bytes (tests/test_redis_packing.py).
"""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar

import hiredis
from redis.asyncio.connection import AbstractConnection

C = TypeVar("C", bound=type[AbstractConnection])


class HiredisPacking(AbstractConnection):
    """A connection mix-in; ``with_hiredis_packing`` puts it in front of a connection class."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py: a first argument with spaces ("SCRIPT LOAD") is several words.
        head = args[0]
        if isinstance(head, str):
            args = (*head.encode().split(), *args[1:])
        elif isinstance(head, bytes) and b" " in head:
            args = (*head.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)  # redis-py's own error for what it cannot encode


@cache
def with_hiredis_packing(connection_class: C) -> C:
    """``connection_class`` with hiredis packing, one subclass per class."""
    if issubclass(connection_class, HiredisPacking):
        return connection_class
    name = f"Hiredis{connection_class.__name__}"
    return type(name, (HiredisPacking, connection_class), {})  # type: ignore[return-value]
