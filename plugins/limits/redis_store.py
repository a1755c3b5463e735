"""Rate-limit state in Redis, shared by every gateway replica (``[limits] storage = "redis://…"``).

The same steps as ``MemoryStore`` (``plugins.limits.store``), each admission and each release one
Lua script: Redis runs a script atomically, so two replicas admitting at the same instant cannot
both read "59 of 60" and both take the 60th (no read-modify-write race). Time is Redis's own
(``TIME``), one clock for every replica. Keys per scope, below ``taxiway:limits:<scope>:``:
``r`` (sorted set of admission times, ms), ``t`` (hash: bucket level, its time), ``p`` (requests
in flight), ``b:<day>`` (tokens used that UTC day); each expires when idle.
"""

from __future__ import annotations

import time
from typing import Any

from plugins.limits.store import Decision, Scope

_LIMITS = ("requests", "tokens", "parallel", "budget")

# KEYS: 4 per scope (r, t, p, b); ARGV: tokens, member, then 4 limits per scope (-1: none)
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tokens = tonumber(ARGV[1])
local member = ARGV[2]
local n = #KEYS / 4
local levels = {}
for i = 0, n - 1 do
  local a = 3 + i * 4
  local rpm, tpm, par, budget = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local kr, kt, kp, kb = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  if rpm >= 0 then
    redis.call('ZREMRANGEBYSCORE', kr, '-inf', now - 60000)
    if redis.call('ZCARD', kr) >= rpm then
      local oldest = redis.call('ZRANGE', kr, 0, 0, 'WITHSCORES')
      local wait = 60000
      if oldest[2] then wait = tonumber(oldest[2]) + 60000 - now end
      return {0, i, 1, wait}
    end
  end
  if tpm >= 0 then
    local state = redis.call('HMGET', kt, 'level', 'at')
    local level = tonumber(state[1]) or tpm
    local at = tonumber(state[2]) or now
    level = math.min(tpm, level + (now - at) * tpm / 60000)
    if tokens > level then
      if tokens > tpm then return {0, i, 2, -1} end
      return {0, i, 2, math.ceil((tokens - level) * 60000 / tpm)}
    end
    levels[i] = level
  end
  if par >= 0 and tonumber(redis.call('GET', kp) or '0') >= par then
    return {0, i, 3, 1000}
  end
  if budget >= 0 and tonumber(redis.call('GET', kb) or '0') >= budget then
    return {0, i, 4, 86400000 - now % 86400000}
  end
end
local out = {1, -1, 0, 0, 0, 0, 0, 0}
for i = 0, n - 1 do
  local a = 3 + i * 4
  local rpm, tpm, par = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local kr, kt, kp = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3]
  if rpm >= 0 then
    redis.call('ZADD', kr, now, member)
    redis.call('PEXPIRE', kr, 61000)
    if i == 0 then
      out[5] = rpm - redis.call('ZCARD', kr)
      local oldest = redis.call('ZRANGE', kr, 0, 0, 'WITHSCORES')
      out[6] = tonumber(oldest[2]) + 60000 - now
    end
  end
  if tpm >= 0 then
    local level = levels[i] - tokens
    redis.call('HSET', kt, 'level', tostring(level), 'at', tostring(now))
    redis.call('PEXPIRE', kt, 120000)
    if i == 0 then
      out[7] = math.floor(level)
      out[8] = math.ceil((tpm - level) * 60000 / tpm)
    end
  end
  if par >= 0 then
    redis.call('INCR', kp)
    redis.call('EXPIRE', kp, 600)
  end
end
return out
"""

# KEYS: 4 per scope; ARGV: reserved, used, then 3 limits per scope (tpm, par, budget; -1: none)
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local back = tonumber(ARGV[1]) - tonumber(ARGV[2])
local used = tonumber(ARGV[2])
for i = 0, #KEYS / 4 - 1 do
  local a = 3 + i * 3
  local tpm, par, budget = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local kt, kp, kb = KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  if tpm >= 0 then
    local state = redis.call('HMGET', kt, 'level', 'at')
    local level = tonumber(state[1]) or tpm
    local at = tonumber(state[2]) or now
    level = math.min(tpm, level + (now - at) * tpm / 60000 + back)
    redis.call('HSET', kt, 'level', tostring(level), 'at', tostring(now))
    redis.call('PEXPIRE', kt, 120000)
  end
  if par >= 0 and redis.call('DECR', kp) < 0 then
    redis.call('SET', kp, 0)
  end
  if budget >= 0 and used > 0 then
    redis.call('INCRBY', kb, used)
    redis.call('EXPIRE', kb, 172800)
  end
end
return 1
"""


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisStore:
    """``MemoryStore``'s interface over one Redis (``url``); raises ``redis.RedisError`` when it is
    unreachable (the caller fails open or closed)."""

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        import redis.asyncio

        self._client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._release = self._client.register_script(_RELEASE)
        self._keys: dict[str, list[str]] = {}

    def _scope_keys(self, scopes: tuple[Scope, ...], day: int) -> list[str]:
        keys: list[str] = []
        for scope in scopes:
            base = f"taxiway:limits:{scope.name}:"
            keys += (base + "r", base + "t", base + "p", f"{base}b:{day}")
        return keys

    async def acquire(self, scopes: tuple[Scope, ...], tokens: int, member: str) -> Decision:
        args: list[Any] = [tokens, member]
        for scope in scopes:
            args += (_limit(scope.rpm), _limit(scope.tpm), _limit(scope.max_parallel), _limit(scope.budget_tokens_per_day))
        reply = await self._acquire(keys=self._scope_keys(scopes, int(time.time() // 86400)), args=args)
        if not int(reply[0]):
            wait = int(reply[3])
            return Decision(
                admitted=False, scope=int(reply[1]), limit=_LIMITS[int(reply[2]) - 1],
                retry_after_s=None if wait < 0 else wait / 1000.0,
            )  # fmt: skip
        return Decision(
            admitted=True, remaining_requests=int(reply[4]), reset_requests_s=int(reply[5]) / 1000.0,
            remaining_tokens=int(reply[6]), reset_tokens_s=int(reply[7]) / 1000.0,
        )  # fmt: skip

    async def release(self, scopes: tuple[Scope, ...], reserved: int, used: int) -> None:
        args: list[Any] = [reserved, used]
        for scope in scopes:
            args += (_limit(scope.tpm), _limit(scope.max_parallel), _limit(scope.budget_tokens_per_day))
        await self._release(keys=self._scope_keys(scopes, int(time.time() // 86400)), args=args)

    async def close(self) -> None:
        await self._client.aclose()
