"""Sessions in Redis: a hash with a TTL, a lease key, a tombstone; each transition one Lua call."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from redis.asyncio import Redis

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
# an older version) is never taken early. The pod key is computed here, not passed in KEYS:
# fine on a standalone or Sentinel Redis, not on a cluster.
_CLAIM = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {0} end
local tickers = redis.call('HGET', KEYS[1], 'tickers')
if not tickers then return {0} end
local holder = redis.call('GET', KEYS[2])
local taken_over = 0
if holder and holder ~= ARGV[1] then
  local pod = string.match(holder, '^([^/]+:[^/]+)/[^/]*$')
  if not pod or redis.call('EXISTS', ARGV[4] .. pod) == 1 then return {-1} end
  taken_over = 1
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, tickers, taken_over}
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

_CLOSE = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
if existed == 1 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
  redis.call('PUBLISH', ARGV[3], ARGV[2])
end
return existed
"""

REFRESH_CHUNK = 200  # sessions per refresh script: ~2 ms of Redis time (1,000 took ~10 ms)


def _keys(session_id: str) -> list[str]:
    return [
        f"pricestream:session:{session_id}",
        f"pricestream:lease:{session_id}",
        f"pricestream:closed:{session_id}",
    ]


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisSessionStore:
    def __init__(
        self,
        client: Redis,
        batcher: CommandBatcher,
        session_ttl: float,
        lease_ttl: float,
        resume_grace: float,
        pod_instance: str,
    ) -> None:
        self._client = client
        self._pod_key = POD_KEY_PREFIX + pod_instance
        self._session_ttl = session_ttl
        self._lease_ms = _ms(lease_ttl)
        self._leased_session_ms = _ms(lease_ttl + resume_grace)
        self._grace_ms = _ms(resume_grace)
        self._batcher = batcher
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self._close = client.register_script(_CLOSE)

    async def create(self, tickers: Sequence[str]) -> SessionInfo:
        session_id = new_session_id()
        await self._batcher.script(
            self._create,
            _keys(session_id)[:1],
            [",".join(tickers), str(time.time()), _ms(self._session_ttl)],
        )
        return SessionInfo(session_id, tuple(tickers), time.time() + self._session_ttl)

    async def claim(self, session_id: str, owner: str) -> tuple[str, ...]:
        reply = await self._batcher.script(
            self._claim,
            _keys(session_id),
            [owner, self._lease_ms, self._leased_session_ms, POD_KEY_PREFIX],
        )
        if reply[0] == 0:
            raise SessionNotFound(session_id)
        if reply[0] == -1:
            raise SessionBusy(session_id)
        if reply[2] == 1:
            log.info(
                "took over session %s from a pod that is no longer alive",
                session_id,
                extra={"event": "lease_taken_over", "session_id": session_id},
            )
        return tuple(reply[1].decode().split(","))

    async def keep_alive(self) -> None:
        await self._client.set(self._pod_key, b"1", px=_ms(POD_ALIVE_TTL))

    async def forget_pod(self) -> None:
        await self._client.delete(self._pod_key)

    async def refresh(
        self, claims: Mapping[str, tuple[str, tuple[str, ...]]]
    ) -> dict[str, LeaseLoss]:
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

    async def release(self, session_id: str, owner: str) -> None:
        await self._batcher.script(self._release, _keys(session_id)[:2], [owner, self._grace_ms])

    async def close(self, session_id: str) -> bool:
        existed = await self._batcher.script(
            self._close, _keys(session_id), [self._grace_ms, session_id, SESSION_CLOSED_CHANNEL]
        )
        return bool(existed)
