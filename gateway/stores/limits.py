"""Limits kept in Redis: checked and counted in one atomic script, exact across workers and replicas.

Each request is admitted by one script call (one round trip) that checks every limit that applies to it and,
only if all pass, counts it in all of them: requests per minute and per day, tokens per minute and per hour,
concurrent requests, and the month's spend. Tokens and spend are reserved at their worst case (prompt plus the
most completion tokens the request may produce) and corrected by a second script when the request ends.

Windows are fixed and aligned to UTC (minute, hour, day, calendar month); concurrency is a sorted set of the
requests in flight, each with an expiry, so a worker that dies cannot leak slots for long.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from dataclasses import dataclass

from gateway.config.types import ApiKey, Tenant
from gateway.observability import metrics
from gateway.stores.resp import Redis, ReplyError, Script, bulk

log = logging.getLogger("gateway.limits")

NANO = 1_000_000_000  # spend is counted in billionths of a dollar, as integers
_FAILURES = (OSError, ReplyError, asyncio.TimeoutError)

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
  if limit >= 0 and amount > 0 and current + amount > limit then
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
    ttl_ms: int
    reset_at: float  # unix time the window ends
    kind: str  # "requests", "tokens", "concurrency", "budget": also what one request counts in it


@dataclass(slots=True)
class Admission:
    admitted: bool
    checks: tuple[Check, ...]
    amounts: tuple[int, ...] = ()  # per check, what this request reserved
    used: tuple[int, ...] = ()  # per check, the count after this request (admitted) or before it (refused)
    refused: Check | None = None
    refused_amount: int = 0
    degraded: bool = False  # Redis was not reachable; nothing was counted


_SETTLED_KINDS = ("tokens", "budget")  # reserved at the worst case, corrected to the real amount at the end


class Limiter:
    def __init__(self, url: str, concurrency_ttl_seconds: float = 900.0) -> None:
        self.client = Redis(url, connect_timeout=0.5, timeout=1.0)
        self._admit = Script(_ADMIT)
        self._settle = Script(_SETTLE)
        self.concurrency_ttl_ms = int(concurrency_ttl_seconds * 1000)
        self._down_until = 0.0
        self.available = True
        self._plans: dict[tuple[str, str], _Plan] = {}
        self._budget_share: dict[str, float] = {}  # tenant -> share of its monthly budget spent, as last seen

    async def close(self) -> None:
        await self.client.close()

    def plan(self, tenant: Tenant, key: ApiKey, now: float) -> "_Plan":
        """Every limit a request of this tenant and key counts against, the concurrency sets first.

        The keys change once a minute at most, so the plan is kept for the minute (and for this config: a reload
        makes new tenant objects, and with them a new plan).
        """
        minute = int(now // 60)
        cached = self._plans.get((tenant.id, key.name))
        if cached is not None and cached.tenant is tenant and cached.key is key and cached.minute == minute:
            return cached
        plan = self._plans[(tenant.id, key.name)] = _Plan(tenant, key, minute, self._make_plan(tenant, key, now),
                                                          self._admit)
        return plan

    def _make_plan(self, tenant: Tenant, key: ApiKey, now: float) -> tuple[Check, ...]:
        limits = tenant.limits
        minute, hour, day = int(now // 60), int(now // 3600), int(now // 86400)
        month = time.strftime("%Y%m", time.gmtime(now))
        prefix = f"gw:{{{tenant.id}}}"  # hash tag: all of a tenant's keys on one cluster slot
        key_prefix = f"{prefix}:key:{key.name}"
        key_limits = key.limits
        minute_end, hour_end, day_end = (minute + 1) * 60, (hour + 1) * 3600, (day + 1) * 86400
        inflight = self.concurrency_ttl_ms
        checks = [Check("concurrent requests", f"{prefix}:inflight", limits.concurrent_requests, inflight, now,
                        "concurrency")]
        if key_limits and key_limits.concurrent_requests is not None:
            checks.append(Check("concurrent requests of this key", f"{key_prefix}:inflight",
                                key_limits.concurrent_requests, inflight, now, "concurrency"))
        checks += [
            Check("requests per minute", f"{prefix}:req:m:{minute}", limits.requests_per_minute, 120_000,
                  minute_end, "requests"),
            Check("tokens per minute", f"{prefix}:tok:m:{minute}", limits.tokens_per_minute, 120_000,
                  minute_end, "tokens"),
            Check("tokens per hour", f"{prefix}:tok:h:{hour}", limits.tokens_per_hour, 7_200_000, hour_end,
                  "tokens"),
            Check("calls per day", f"{prefix}:req:d:{day}", limits.calls_per_day, 172_800_000, day_end,
                  "requests"),
            Check("monthly budget", f"{prefix}:spend:{month}",
                  None if limits.monthly_budget_usd is None else int(limits.monthly_budget_usd * NANO),
                  40 * 86_400_000, _month_end(now), "budget"),
        ]
        if key_limits and key_limits.requests_per_minute is not None:
            checks.append(Check("requests per minute of this key", f"{key_prefix}:req:m:{minute}",
                                key_limits.requests_per_minute, 120_000, minute_end, "requests"))
        if key_limits and key_limits.tokens_per_minute is not None:
            checks.append(Check("tokens per minute of this key", f"{key_prefix}:tok:m:{minute}",
                                key_limits.tokens_per_minute, 120_000, minute_end, "tokens"))
        return tuple(checks)

    async def admit(self, plan: "_Plan", request_id: str, tokens: int, cost_nano: int, now: float) -> Admission:
        checks = plan.checks
        amounts = tuple(tokens if c.kind == "tokens" else cost_nano if c.kind == "budget" else 1 for c in checks)
        if now < self._down_until:
            return Admission(admitted=True, checks=checks, amounts=amounts, degraded=True)
        parts = [plan.head, bulk(int(now * 1000)), bulk(request_id), plan.sets]
        for (limit, ttl), amount in zip(plan.bounds, amounts):
            parts += (limit, bulk(amount), ttl)
        try:
            result = await self.client.run_packed_script(self._admit, b"".join(parts))
        except _FAILURES as exc:
            self._mark_down(exc)
            return Admission(admitted=True, checks=checks, amounts=amounts, degraded=True)
        self._mark_up()
        budget = plan.budget_index
        if result[0] == 0:
            if budget is not None:
                self._budget_share[plan.tenant.id] = result[1 + budget] / checks[budget].limit
            return Admission(admitted=True, checks=checks, amounts=amounts, used=tuple(result[1:]))
        index = int(result[0]) - 1
        if index == budget:
            self._budget_share[plan.tenant.id] = (int(result[1]) + amounts[index]) / checks[index].limit
        return Admission(admitted=False, checks=checks, amounts=amounts, refused=checks[index],
                         refused_amount=amounts[index], used=(int(result[1]),))

    def settle(self, admission: Admission, request_id: str, actual: dict[str, int]) -> None:
        """Free the concurrency slots and correct tokens and spend to ``actual`` ("tokens", "budget")."""
        if admission.degraded or not admission.admitted:
            return
        sets = [c for c in admission.checks if c.kind == "concurrency"]
        corrections = [(c, amount) for c, amount in zip(admission.checks, admission.amounts)
                       if c.kind in _SETTLED_KINDS]
        deltas = [actual[c.kind] - amount for c, amount in corrections]
        # Nothing waits for the answer; a failure marks Redis down like any other.
        self.client.run_script_nowait(self._settle, [c.key for c in sets] + [c.key for c, _ in corrections],
                                      [request_id, len(sets), *deltas], self._mark_down)

    def budget_share(self, tenant_id: str) -> float | None:
        """The share of the tenant's monthly budget spent or reserved, as of its last request in this worker."""
        return self._budget_share.get(tenant_id)

    async def spend_nano(self, tenant_id: str, now: float) -> int:
        """The tenant's spend this month as Redis counts it (reservations in flight included)."""
        month = time.strftime("%Y%m", time.gmtime(now))
        value = await self.client.execute("GET", f"gw:{{{tenant_id}}}:spend:{month}")
        return int(value or 0)

    async def ping(self) -> bool:
        try:
            await self.client.execute("PING")
        except _FAILURES as exc:
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


class _Plan:
    """A tenant and key's checks for one minute, with the parts of the admit command that do not change."""

    __slots__ = ("tenant", "key", "minute", "checks", "head", "sets", "bounds", "budget_index")

    def __init__(self, tenant: Tenant, key: ApiKey, minute: int, checks: tuple[Check, ...], script: Script) -> None:
        self.tenant, self.key, self.minute, self.checks = tenant, key, minute, checks
        argument_count = 3 + 3 * len(checks)
        self.head = (b"*%d\r\n" % (3 + len(checks) + argument_count) + bulk("EVALSHA") + bulk(script.sha)
                     + bulk(len(checks)) + b"".join(bulk(c.key) for c in checks))
        self.sets = bulk(sum(1 for c in checks if c.kind == "concurrency"))
        self.bounds = tuple((bulk(-1 if c.limit is None else c.limit), bulk(c.ttl_ms)) for c in checks)
        self.budget_index = next((i for i, c in enumerate(checks) if c.kind == "budget" and c.limit), None)


def _month_end(now: float) -> float:
    year, month = time.gmtime(now)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))
