"""Sessions in Redis: a hash with a TTL, a lease key, a tombstone; each transition one Lua call."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from pricestream.codec import SESSION_CLOSED_CHANNEL
from pricestream.engine.sessions import (
    LeaseLoss,
    SessionBusy,
    SessionInfo,
    SessionNotFound,
    new_session_id,
)
from pricestream.redis.batch import CommandBatcher

log = logging.getLogger("pricestream.sessions")

_CREATE = """
redis.call('HSET', KEYS[1], 'tickers', ARGV[1], 'created', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# A lease's value is its owner, "{pod_name}:{instance}/{stream}". A lease held by another
# stream is busy while that stream's pod instance is alive (its liveness key exists); once the
# key is gone (the pod crashed, or has not refreshed it for POD_ALIVE_TTL) the lease is taken
# over at once instead of after the rest of its TTL. A holder without an instance (written by
# an older version) is never taken early. The script touches only its declared keys (the
# session's three, one slot in cluster mode): it answers {-1, holder} when the lease is held;
# the store then checks the holder's pod key on its own (another slot) and, if it has
# expired, calls again with ARGV[4] = that holder, which takes the lease over only if it is
# still held by that same holder.
_CLAIM = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {0} end
local tickers = redis.call('HGET', KEYS[1], 'tickers')
if not tickers then return {0} end
local holder = redis.call('GET', KEYS[2])
local taken_over = 0
if holder and holder ~= ARGV[1] then
  if holder ~= ARGV[4] then return {-1, holder} end
  taken_over = 1
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, tickers, taken_over}
"""

# A session as it is: {0} when gone (closed, expired), else {1, tickers, ms left, leased}.
_GET = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {0} end
local tickers = redis.call('HGET', KEYS[1], 'tickers')
if not tickers then return {0} end
return {1, tickers, redis.call('PTTL', KEYS[1]), redis.call('EXISTS', KEYS[2])}
"""

POD_KEY_PREFIX = "pricestream:pod:"
# A pod instance refreshes its liveness key every POD_ALIVE_INTERVAL; it lives POD_ALIVE_TTL.
# After a crash, other pods take its leases once the key has expired: at most POD_ALIVE_TTL
# (2.5 s) after the kill, plus the client's retry interval, within the 3 s target. A live pod
# keeps its leases through four missed refreshes (2 s of a stalled loop or failing Redis
# writes); past that, another pod's claim may take a lease, and the old stream ends with
# session_lost (NOT_FOUND) at its next lease refresh, so two streams of one session overlap
# for at most lease_ttl / 3.
POD_ALIVE_INTERVAL = 0.5
POD_ALIVE_TTL = 2.5

# Extends every lease we hold. A session Redis lost (restart without persistence) is written
# again from what the stream knows; a closed (tombstoned) one is reported as i, a taken one as -i.
_REFRESH = """
local lost = {}
for i = 1, #KEYS / 3 do
  local session, lease, tombstone = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local owner, tickers = ARGV[2*i+1], ARGV[2*i+2]
  local holder = redis.call('GET', lease)
  if redis.call('EXISTS', tombstone) == 1 then
    table.insert(lost, i)
  elseif holder and holder ~= owner then
    table.insert(lost, -i)
  else
    redis.call('SET', lease, owner, 'PX', ARGV[1])
    if redis.call('EXISTS', session) == 0 then redis.call('HSET', session, 'tickers', tickers) end
    redis.call('PEXPIRE', session, ARGV[2])
  end
end
return lost
"""

_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# ARGV[3] = "": no PUBLISH here (cluster mode: the store SPUBLISHes the notice itself, as a
# script may only publish on a shard channel of its own slot).
_CLOSE = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
if existed == 1 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
  if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[2]) end
end
return existed
"""

REFRESH_CHUNK = 200  # sessions per refresh script: ~2 ms of Redis time (1,000 took ~10 ms)


def _keys(session_id: str, cluster: bool = False) -> list[str]:
    """The session's hash, lease and tombstone; in cluster mode the id is their hash tag, so
    the three share one slot (a script may only touch keys of one slot there)."""
    tag = "{" + session_id + "}" if cluster else session_id
    return [
        f"pricestream:session:{tag}",
        f"pricestream:lease:{tag}",
        f"pricestream:closed:{tag}",
    ]


_HOLDER_POD = re.compile(r"([^/]+:[^/]+)/[^/]*")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisSessionStore:
    def __init__(
        self,
        client: Redis | RedisCluster,
        batcher: CommandBatcher,
        session_ttl: float,
        lease_ttl: float,
        resume_grace: float,
        pod_instance: str,
        *,
        cluster: bool = False,
    ) -> None:
        """``cluster``: keys hash-tagged by session id, scripts one slot each, the
        session-closed notice sent by SPUBLISH."""
        self._client = client
        self._cluster = cluster
        self._pod_key = POD_KEY_PREFIX + pod_instance
        self._session_ttl = session_ttl
        self._lease_ms = _ms(lease_ttl)
        self._leased_session_ms = _ms(lease_ttl + resume_grace)
        self._grace_ms = _ms(resume_grace)
        self._batcher = batcher
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._get = client.register_script(_GET)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self._close = client.register_script(_CLOSE)

    async def create(self, tickers: Sequence[str]) -> SessionInfo:
        session_id = new_session_id()
        await self._batcher.script(
            self._create,
            _keys(session_id, self._cluster)[:1],
            [",".join(tickers), str(time.time()), _ms(self._session_ttl)],
        )
        return SessionInfo(session_id, tuple(tickers), time.time() + self._session_ttl)

    async def get(self, session_id: str) -> SessionInfo | None:
        reply = await self._batcher.script(self._get, _keys(session_id, self._cluster), [])
        if reply[0] == 0:
            return None
        tickers = tuple(reply[1].decode().split(","))
        expires_at = time.time() + max(int(reply[2]), 0) / 1000
        return SessionInfo(session_id, tickers, expires_at, streaming=bool(reply[3]))

    async def claim(self, session_id: str, owner: str) -> tuple[str, ...]:
        reply = await self._claim_script(session_id, owner, "")
        if reply[0] == -1:
            holder = reply[1].decode()
            if not await self._holder_gone(holder):
                raise SessionBusy(session_id)
            reply = await self._claim_script(session_id, owner, holder)
        if reply[0] == 0:
            raise SessionNotFound(session_id)
        if reply[0] == -1:  # taken by yet another stream meanwhile
            raise SessionBusy(session_id)
        if reply[2] == 1:
            log.info(
                "took over session %s from a pod that is no longer alive",
                session_id,
                extra={"event": "lease_taken_over", "session_id": session_id},
            )
        return tuple(reply[1].decode().split(","))

    def _claim_script(self, session_id: str, owner: str, take_from: str) -> Awaitable[Any]:
        return self._batcher.script(
            self._claim,
            _keys(session_id, self._cluster),
            [owner, self._lease_ms, self._leased_session_ms, take_from],
        )

    async def _holder_gone(self, holder: str) -> bool:
        """Whether the pod instance named in a lease holder has stopped saying it is alive."""
        match = _HOLDER_POD.fullmatch(holder)
        if match is None:
            return False  # no instance in it: never taken early
        return not await self._client.exists(POD_KEY_PREFIX + match[1])

    async def keep_alive(self) -> None:
        await self._client.set(self._pod_key, b"1", px=_ms(POD_ALIVE_TTL))

    async def forget_pod(self) -> None:
        await self._client.delete(self._pod_key)

    async def refresh(
        self, claims: Mapping[str, tuple[str, tuple[str, ...]]]
    ) -> dict[str, LeaseLoss]:
        if self._cluster:
            return await self._refresh_each(claims)
        items = list(claims.items())
        lost: dict[str, LeaseLoss] = {}
        for start in range(0, len(items), REFRESH_CHUNK):
            chunk = items[start : start + REFRESH_CHUNK]
            keys: list[str] = []
            args: list[str | int] = [self._lease_ms, self._leased_session_ms]
            for session_id, (owner, tickers) in chunk:
                keys.extend(_keys(session_id))
                args.extend([owner, ",".join(tickers)])
            indexes = await self._refresh(keys=keys, args=args)
            for index in map(int, indexes):
                lost[chunk[abs(index) - 1][0]] = "closed" if index > 0 else "taken"
        return lost

    async def _refresh_each(
        self, claims: Mapping[str, tuple[str, tuple[str, ...]]]
    ) -> dict[str, LeaseLoss]:
        """Cluster mode: each session's keys have a slot of their own, so one script call per
        session, all in the batcher's pipeline (redis-py sends it per node). Raises the first
        error after every call has ended."""
        ids = list(claims)
        calls = [
            self._batcher.script(
                self._refresh,
                _keys(session_id, cluster=True),
                [self._lease_ms, self._leased_session_ms, owner, ",".join(tickers)],
            )
            for session_id, (owner, tickers) in claims.items()
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        lost: dict[str, LeaseLoss] = {}
        for session_id, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            if result:
                lost[session_id] = "closed" if int(result[0]) > 0 else "taken"
        return lost

    async def release(self, session_id: str, owner: str) -> None:
        await self._batcher.script(
            self._release, _keys(session_id, self._cluster)[:2], [owner, self._grace_ms]
        )

    async def close(self, session_id: str) -> bool:
        channel = "" if self._cluster else SESSION_CLOSED_CHANNEL
        existed = await self._batcher.script(
            self._close, _keys(session_id, self._cluster), [self._grace_ms, session_id, channel]
        )
        if existed and self._cluster:
            # The session is closed already (tombstone); a lost notice is caught by the
            # holder's next lease refresh, which reports it closed.
            try:
                await self._client.spublish(SESSION_CLOSED_CHANNEL, session_id)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("session %s closed; its notice was not sent: %s", session_id, exc)
        return bool(existed)
