"""Sessions in Redis: a hash with a TTL, a lease key, a tombstone; each transition one Lua call."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from redis.asyncio import Redis

from pricestream.codec import SESSION_CLOSED_CHANNEL
from pricestream.sessions import SessionBusy, SessionInfo, SessionNotFound, new_session_id

_CLAIM = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {0} end
local tickers = redis.call('HGET', KEYS[1], 'tickers')
if not tickers then return {0} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {-1} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, tickers}
"""

# Extends every lease we hold. A session Redis lost (restart without persistence) is written
# again from what the stream knows; a closed (tombstoned) or taken one is reported lost.
_REFRESH = """
local lost = {}
for i = 1, #KEYS / 3 do
  local session, lease, tombstone = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local owner, tickers = ARGV[2*i+1], ARGV[2*i+2]
  local holder = redis.call('GET', lease)
  if redis.call('EXISTS', tombstone) == 1 or (holder and holder ~= owner) then
    table.insert(lost, i)
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

REFRESH_CHUNK = 1000


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
        self, client: Redis, session_ttl: float, lease_ttl: float, resume_grace: float
    ) -> None:
        self._client = client
        self._session_ttl = session_ttl
        self._lease_ms = _ms(lease_ttl)
        self._leased_session_ms = _ms(lease_ttl + resume_grace)
        self._grace_ms = _ms(resume_grace)
        self._claim = client.register_script(_CLAIM)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self._close = client.register_script(_CLOSE)

    async def create(self, tickers: Sequence[str]) -> SessionInfo:
        session_id = new_session_id()
        key = _keys(session_id)[0]
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"tickers": ",".join(tickers), "created": time.time()})
            pipe.pexpire(key, _ms(self._session_ttl))
            await pipe.execute()
        return SessionInfo(session_id, tuple(tickers), time.time() + self._session_ttl)

    async def claim(self, session_id: str, owner: str) -> tuple[str, ...]:
        reply = await self._claim(
            keys=_keys(session_id), args=[owner, self._lease_ms, self._leased_session_ms]
        )
        if reply[0] == 0:
            raise SessionNotFound(session_id)
        if reply[0] == -1:
            raise SessionBusy(session_id)
        return tuple(reply[1].decode().split(","))

    async def refresh(self, claims: Mapping[str, tuple[str, tuple[str, ...]]]) -> list[str]:
        items = list(claims.items())
        lost: list[str] = []
        for start in range(0, len(items), REFRESH_CHUNK):
            chunk = items[start : start + REFRESH_CHUNK]
            keys: list[str] = []
            args: list[str | int] = [self._lease_ms, self._leased_session_ms]
            for session_id, (owner, tickers) in chunk:
                keys.extend(_keys(session_id))
                args.extend([owner, ",".join(tickers)])
            indexes = await self._refresh(keys=keys, args=args)
            lost.extend(chunk[int(i) - 1][0] for i in indexes)
        return lost

    async def release(self, session_id: str, owner: str) -> None:
        await self._release(keys=_keys(session_id)[:2], args=[owner, self._grace_ms])

    async def close(self, session_id: str) -> bool:
        existed = await self._close(
            keys=_keys(session_id), args=[self._grace_ms, session_id, SESSION_CLOSED_CHANNEL]
        )
        return bool(existed)
