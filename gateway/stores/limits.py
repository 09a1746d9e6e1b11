"""Limits kept in Redis: checked and counted in one atomic script, exact across workers and replicas.

Each request is admitted by one script call (one round trip) that checks every limit that applies to it and,
only if all pass, counts it in all of them: requests per minute and per day, tokens per minute and per hour,
concurrent requests, and the month's spend. Tokens and spend are reserved at their worst case (prompt plus the
most completion tokens the request may produce) and corrected by a second script when the request ends.

Windows are fixed and aligned to UTC (minute, hour, day, calendar month); concurrency is a sorted set of the
requests in flight, each with an expiry, so a worker that dies cannot leak slots for long.
"""

from __future__ import annotations

import calendar
import logging
import time
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.config.types import ApiKey, Tenant
from gateway.observability import metrics

log = logging.getLogger("gateway.limits")

NANO = 1_000_000_000  # spend is counted in billionths of a dollar, as integers

# KEYS: the concurrency sets first (ARGV[3] says how many), then counters.
# ARGV: now_ms, request id, number of sets, then per key: limit (-1: none), amount, ttl_ms.
_ADMIT = """
local now = tonumber(ARGV[1])
local sets = tonumber(ARGV[3])
local used = {}
for i = 1, #KEYS do
  local base = 3 + (i - 1) * 3
  local limit = tonumber(ARGV[base + 1])
  local amount = tonumber(ARGV[base + 2])
  local current
  if i <= sets then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    current = redis.call('ZCARD', KEYS[i])
  else
    current = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  if limit >= 0 and current + amount > limit then
    return {i, current}
  end
  used[i] = current + amount
end
for i = 1, #KEYS do
  local base = 3 + (i - 1) * 3
  local amount = tonumber(ARGV[base + 2])
  local ttl = tonumber(ARGV[base + 3])
  if i <= sets then
    redis.call('ZADD', KEYS[i], now + ttl, ARGV[2])
    redis.call('PEXPIRE', KEYS[i], ttl)
  elseif amount ~= 0 then
    if redis.call('INCRBY', KEYS[i], amount) == amount then
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
  end
end
table.insert(used, 1, 0)
return used
"""

# KEYS: the concurrency sets first (ARGV[2] says how many), then counters to correct.
# ARGV: request id, number of sets, then one delta per counter.
_SETTLE = """
local sets = tonumber(ARGV[2])
for i = 1, #KEYS do
  if i <= sets then
    redis.call('ZREM', KEYS[i], ARGV[1])
  else
    local delta = tonumber(ARGV[i - sets + 2])
    if delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('INCRBY', KEYS[i], delta)
    end
  end
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Check:
    """One limit a request counts against."""

    name: str  # what the refusal names: "requests per minute", ...
    key: str
    limit: int | None
    amount: int
    ttl_ms: int
    reset_at: float  # unix time the window ends
    kind: str  # "requests", "tokens", "concurrency", "budget"
    settles: bool = False  # corrected to the real amount at the end (tokens, spend)


@dataclass(slots=True)
class Admission:
    admitted: bool
    checks: tuple[Check, ...]
    used: tuple[int, ...] = ()  # per check, the count after this request (admitted) or before it (refused)
    refused: Check | None = None
    degraded: bool = False  # Redis was not reachable; nothing was counted


class Limiter:
    def __init__(self, url: str, concurrency_ttl_seconds: float = 900.0) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0,
                                           retry_on_timeout=False, health_check_interval=0)
        self._admit = self.client.register_script(_ADMIT)
        self._settle = self.client.register_script(_SETTLE)
        self.concurrency_ttl_ms = int(concurrency_ttl_seconds * 1000)
        self._down_until = 0.0
        self.available = True

    async def close(self) -> None:
        await self.client.aclose()

    def plan(self, tenant: Tenant, key: ApiKey, request_id: str, tokens: int, cost_nano: int,
             now: float) -> tuple[Check, ...]:
        """Every limit this request counts against, the concurrency sets first."""
        limits = tenant.limits
        minute, hour, day = int(now // 60), int(now // 3600), int(now // 86400)
        month = time.strftime("%Y%m", time.gmtime(now))
        prefix = f"gw:{{{tenant.id}}}"  # hash tag: all of a tenant's keys on one cluster slot
        key_prefix = f"{prefix}:key:{key.name}"
        key_limits = key.limits
        minute_end, hour_end, day_end = (minute + 1) * 60, (hour + 1) * 3600, (day + 1) * 86400
        checks = [
            Check("concurrent requests", f"{prefix}:inflight", limits.concurrent_requests, 1,
                  self.concurrency_ttl_ms, now, "concurrency"),
        ]
        if key_limits and key_limits.concurrent_requests is not None:
            checks.append(Check("concurrent requests of this key", f"{key_prefix}:inflight",
                                key_limits.concurrent_requests, 1, self.concurrency_ttl_ms, now, "concurrency"))
        checks += [
            Check("requests per minute", f"{prefix}:req:m:{minute}", limits.requests_per_minute, 1, 120_000,
                  minute_end, "requests"),
            Check("tokens per minute", f"{prefix}:tok:m:{minute}", limits.tokens_per_minute, tokens, 120_000,
                  minute_end, "tokens", settles=True),
            Check("tokens per hour", f"{prefix}:tok:h:{hour}", limits.tokens_per_hour, tokens, 7_200_000,
                  hour_end, "tokens", settles=True),
            Check("calls per day", f"{prefix}:req:d:{day}", limits.calls_per_day, 1, 172_800_000, day_end,
                  "requests"),
            Check("monthly budget", f"{prefix}:spend:{month}",
                  None if limits.monthly_budget_usd is None else int(limits.monthly_budget_usd * NANO),
                  cost_nano, 40 * 86_400_000, _month_end(now), "budget", settles=True),
        ]
        if key_limits:
            if key_limits.requests_per_minute is not None:
                checks.append(Check("requests per minute of this key", f"{key_prefix}:req:m:{minute}",
                                    key_limits.requests_per_minute, 1, 120_000, minute_end, "requests"))
            if key_limits.tokens_per_minute is not None:
                checks.append(Check("tokens per minute of this key", f"{key_prefix}:tok:m:{minute}",
                                    key_limits.tokens_per_minute, tokens, 120_000, minute_end, "tokens",
                                    settles=True))
        return tuple(checks)

    async def admit(self, checks: tuple[Check, ...], request_id: str, now: float) -> Admission:
        if now < self._down_until:
            return Admission(admitted=True, checks=checks, degraded=True)
        sets = sum(1 for c in checks if c.kind == "concurrency")
        args: list = [int(now * 1000), request_id, sets]
        for check in checks:
            args += [-1 if check.limit is None else check.limit, check.amount, check.ttl_ms]
        try:
            result = await self._admit(keys=[c.key for c in checks], args=args)
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            return Admission(admitted=True, checks=checks, degraded=True)
        self._mark_up()
        if result[0] == 0:
            return Admission(admitted=True, checks=checks, used=tuple(int(v) for v in result[1:]))
        refused = checks[int(result[0]) - 1]
        return Admission(admitted=False, checks=checks, refused=refused, used=(int(result[1]),))

    async def settle(self, admission: Admission, request_id: str, actual: dict[str, int]) -> None:
        """Free the concurrency slots and correct tokens and spend to ``actual`` ("tokens", "budget")."""
        if admission.degraded or not admission.admitted:
            return
        sets = [c for c in admission.checks if c.kind == "concurrency"]
        corrections = [c for c in admission.checks if c.settles]
        deltas = [actual[c.kind] - c.amount for c in corrections]
        try:
            await self._settle(keys=[c.key for c in sets] + [c.key for c in corrections],
                               args=[request_id, len(sets), *deltas])
        except (RedisError, OSError) as exc:
            self._mark_down(exc)

    async def spend_nano(self, tenant_id: str, now: float) -> int:
        """The tenant's spend this month as Redis counts it (reservations in flight included)."""
        month = time.strftime("%Y%m", time.gmtime(now))
        value = await self.client.get(f"gw:{{{tenant_id}}}:spend:{month}")
        return int(value or 0)

    async def ping(self) -> bool:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

    def _mark_down(self, exc: BaseException) -> None:
        # Skip Redis for a second instead of making every request wait on a dead connection.
        self._down_until = time.time() + 1.0
        if self.available:
            log.error("Redis unreachable, limits are not being counted: %s", exc)
            self.available = False
            metrics.REDIS_UP.set(0)
        metrics.REDIS_ERRORS.inc()

    def _mark_up(self) -> None:
        if not self.available:
            log.info("Redis reachable again, limits are counted again")
            self.available = True
            metrics.REDIS_UP.set(1)


def _month_end(now: float) -> float:
    year, month = time.gmtime(now)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))
