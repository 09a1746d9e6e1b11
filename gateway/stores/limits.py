"""Limits kept in Redis: checked and counted in one atomic script, never exceeded across workers and replicas.

Each request is admitted by one script call (one round trip) that checks every limit that applies to it and,
only if all pass, counts it in all of them: requests per minute and per day, tokens per minute and per hour,
concurrent requests, and the month's spend. Tokens and spend are reserved at their worst case (prompt plus the
most completion tokens the request may produce) and corrected when the request ends: by the next admission of the
same tenant and key if one comes within RIDE_SECONDS (its script settles first: one call for both), by a script of
its own otherwise.

**Sliding windows.** A window (a minute, an hour, a day) is a hash of buckets, each a thirtieth of the window,
with its total and its oldest and newest counted buckets in fields -1, -2 and -3 (so that a request reads three
fields, and the buckets only when one has left the window).
A request is admitted if what the buckets overlapping the last window's length hold, plus the request, stays
within the limit. The oldest of those buckets reaches a little further back than the window, so the count is
never less than what the last window really admitted: no span of the window's length ever admits more than the
limit (a fixed window let a tenant send its limit just before a minute boundary and again just after). The price
is that usage leaves the count up to a bucket's length late (2 s for a minute); ``Retry-After`` and
``x-ratelimit-reset-*`` say exactly when it does.

**Concurrency** is a sorted set of the requests in flight, each with an expiry of the request timeout (plus a
margin): a worker that dies, or a settle that never reaches Redis, cannot hold a slot for longer than a request
may last. The budget is a counter for the calendar month.

**Headroom.** Each admission's answer says how far the tenant is from every limit; a worker keeps the last one per
plan, with what it has sent since and not yet heard back about. A request of a tenant that was under half of every
limit a moment ago (``clear_of_limits``) need not wait for its admission before its upstream call starts
(``gateway.pipeline.limits``): the count stays exact, as every request is still admitted by the script.

**Leases.** A tenant far from its limits is admitted from a lease (``admit_leased``): the worker asks, with the same
script and without waiting, for a share of every limit of a tenant and key (requests, tokens, spend and concurrency
slots, at most a LEASE_SHARE-th of each and a LEASE_BUDGET_SHARE-th of a budget (gateway.stores.leases), granted
only if the tenant stays within half of every limit with it), counted at once and in full, in the windows' bucket of
the moment the lease ends (so no request it admits leaves a window earlier than it would have by itself). For
``lease_seconds`` the worker admits from it and settles into it with no command to Redis; when it ends, what it did
not use is given back (its free slots leave the sets, the first carrying the room left), and its requests still
running settle as any other. Every request admitted anywhere is in Redis, by itself or in a lease: a limit is never
exceeded; a refusal can come while leases elsewhere hold room (at most half of a limit, for at most
``lease_seconds``).

**Settles are never lost to a short Redis outage.** A settle that could not be sent is kept and sent again until
Redis takes it. It is idempotent: it corrects tokens and spend only if it also removed the request from the
in-flight set, so a settle sent twice (its first reply lost) counts once.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from gateway.config.types import ApiKey, Tenant
from gateway.observability import metrics
from gateway.stores.cluster import ClusterRedis
from gateway.stores.leases import LEASE_FIRST_REQUESTS, LEASE_FIRST_SLOTS, Lease, learn_from, lease_amounts
from gateway.stores.limit_scripts import ADMIT, COUNTER, SET, SETTLE, WINDOW
from gateway.stores.redis_client import redis_client
from gateway.stores.resp import ReplyError, Script, bulk, pack

log = logging.getLogger("gateway.limits")

NANO = 1_000_000_000  # spend is counted in billionths of a dollar, as integers
BUCKETS_PER_WINDOW = 30
SLOT_MARGIN_SECONDS = 30.0  # a concurrency slot outlives the request timeout by this much
USER_PLANS = 20_000  # end users' plans kept in a worker (each is a few hundred bytes)
TENANT_BUDGET = "monthly budget"
UNSETTLED_MAX = 200_000  # settles kept for a retry while Redis is away; past this the oldest are dropped
_FAILURES = (OSError, ReplyError, asyncio.TimeoutError)
RECOVERY_SECONDS = 3.0  # no Redis failure for this long before it is said to be reachable again
RIDE_SECONDS = 0.002  # the longest a settle waits for an admission of its tenant and key to ride on

@dataclass(frozen=True, slots=True)
class Check:
    """One limit a request counts against."""

    name: str  # what the refusal names: "requests per minute", ...
    key: str
    limit: int | None
    kind: str  # "requests", "tokens", "concurrency", "budget": also what one request counts in it
    store: int  # SET, WINDOW or COUNTER
    a: int  # set: slot lifetime (ms); window: bucket length (ms); counter: ttl (ms)
    b: int = 0  # window: buckets in the window


@dataclass(slots=True)
class Admission:
    admitted: bool
    plan: "_Plan"
    amounts: tuple[int, ...] = ()  # per check, what this request reserved
    result: list | None = None  # the admit script's answer: refused, used per check, reset (ms) per check
    degraded: bool = False  # Redis was not reachable; nothing was counted
    now_ms: int = 0  # when the windows counted it (its lease's end, for a request admitted from a lease)
    lease: "Lease | None" = None  # admitted from this worker's lease, in the slot named ``member``
    member: str = ""

    @property
    def checks(self) -> tuple[Check, ...]:
        return self.plan.checks

    @property
    def refused(self) -> Check | None:
        return self.checks[self.result[0] - 1] if self.result and self.result[0] else None

    @property
    def refused_amount(self) -> int:
        return self.amounts[self.result[0] - 1] if self.result and self.result[0] else 0

    def used(self, index: int) -> int:
        """The count of check ``index`` after this request (admitted) or before it (refused)."""
        return self.result[1 + index]

    def reset_at(self, index: int, now: float) -> float | None:
        """When check ``index`` resets: for a window, when it is empty (admitted) or has room for this request
        (refused); the month's end for the budget; None if never."""
        if self.checks[index].store == COUNTER:
            return _month_end(now)
        milliseconds = self.reset_ms(index)
        return None if milliseconds < 0 else now + milliseconds / 1000

    def reset_ms(self, index: int) -> int:
        """For a window, milliseconds until ``reset_at``; -1 if never, and for the other checks."""
        return self.result[1 + len(self.checks) + index]


def _amounts(plan: "_Plan", tokens: int, cost_nano: int) -> tuple[int, ...]:
    """What a request counts against each of the plan's checks."""
    amounts = plan.unit_amounts.copy()
    for index in plan.token_checks:
        amounts[index] = tokens
    for index in plan.budget_checks:
        amounts[index] = cost_nano
    return tuple(amounts)


def _admit_command(plan: "_Plan", request_id: str, amounts: tuple[int, ...], now_ms: int,
                   riding: list[tuple[str, tuple]], count_ms: int | None = None, bounds: tuple = ()) -> bytes:
    """The admission's EVALSHA, with the settles of the same plan that ride on it (``riding``); a lease's is counted
    at ``count_ms`` against ``bounds`` (half of every limit)."""
    count_at = bulk(now_ms if count_ms is None else count_ms)
    if riding:
        corrected = len(plan.corrected)
        count = plan.argument_count + 2 + corrected + len(riding) * (1 + 2 * corrected)
        parts = [b"*%d\r\n" % count, plan.head_body, bulk(now_ms), bulk(request_id), count_at]
    else:
        parts = [plan.head, bulk(now_ms), bulk(request_id), count_at]
    for (kind, limit, a, b), amount in zip(bounds or plan.bounds, amounts):
        parts += (kind, limit, bulk(amount), a, b)
    if riding:
        parts += (bulk(len(riding)), plan.corrected_checks)
        for request, corrections in riding:
            parts.append(bulk(request))
            parts += [bulk(value) for value in corrections]
    return b"".join(parts)


def _corrections(fields: list, deltas: list[int]) -> tuple:
    """A settle's corrections as the scripts take them: per corrected check, its field and delta."""
    return tuple(value for pair in zip(fields, deltas) for value in pair)


def _count_outstanding(plan: "_Plan", amounts: tuple[int, ...], sign: int) -> None:
    """What this worker has sent against the plan's checks and not yet heard back about (see clear_of_limits)."""
    outstanding = plan.outstanding
    for i, amount in enumerate(amounts):
        outstanding[i] += sign * amount


def _window(name: str, key: str, limit: int | None, kind: str, seconds: int) -> Check:
    bucket_ms = seconds * 1000 // BUCKETS_PER_WINDOW
    return Check(name, key, limit, kind, WINDOW, bucket_ms, BUCKETS_PER_WINDOW)


class Limiter:
    def __init__(self, url: str, headroom_seconds: float = 1.0, lease_seconds: float = 1.0) -> None:
        self.client = redis_client(url, connect_timeout=0.5, timeout=1.0)
        self.headroom_seconds = headroom_seconds  # how long an admission's view of the headroom is trusted
        self.lease_seconds = lease_seconds  # how long a lease admits requests (0: no leases)
        self._lease_prefix = f"lease:{os.urandom(6).hex()}:"  # names this worker's leases' slots
        self._lease_numbers = itertools.count(1)
        self._leases: set[Lease] = set()  # live ones
        self._admit = Script(ADMIT)
        self._settle = Script(SETTLE)
        self.client.preload(self._admit, self._settle)
        self._down_until = 0.0
        self._failed_at = 0.0  # when a Redis call last failed
        self._prober: asyncio.Task | None = None  # pings Redis while it is said unreachable
        self.available = True
        self._plans: dict[tuple[str, str], _Plan] = {}
        self._user_plans: dict[tuple[str, str, str], _Plan] = {}  # with an end user's checks, the newest kept
        # (tenant id, when it was made) -> share of its monthly budget spent, as last seen in this worker
        self._budget_share: dict[tuple[str, float | None], float] = {}
        self._unsettled: deque[bytes] = deque()
        self._retrying: asyncio.Task | None = None
        self._waiting_plans: dict[int, _Plan] = {}  # plans with settles waiting for a ride (see settle), by id
        self._send_settles_at: asyncio.TimerHandle | None = None

    async def close(self) -> None:
        for task in (self._retrying, self._prober):
            if task is not None:
                task.cancel()
        for lease in list(self._leases):
            self._end_lease(lease)
        self._send_waiting_settles()
        await self._flush_unsettled()
        await self.client.close()

    def plan(self, tenant: Tenant, key: ApiKey, now: float, slot_seconds: float,
             user: str | None = None) -> "_Plan":
        """Every limit a request of this tenant and key (and end user, if the tenant limits its end users) counts
        against, the concurrency sets first.

        The plan holds for this config (a reload makes new tenant objects, and with them a new plan) and this
        calendar month (the budget's key changes with it).
        """
        month = _month(now)
        if user is None or tenant.end_users is None:
            plans, index = self._plans, (tenant.id, key.name)
        else:
            plans, index = self._user_plans, (tenant.id, key.name, user)
        cached = plans.get(index)
        if cached is not None and cached.tenant is tenant and cached.key is key and cached.month == month:
            return cached
        slot_ms = int((slot_seconds + SLOT_MARGIN_SECONDS) * 1000)
        checks = self._make_plan(tenant, key, month, slot_ms)
        if len(index) == 3:
            checks += _user_checks(tenant, user, month)
            if len(plans) >= USER_PLANS:
                plans.pop(next(iter(plans)))  # the oldest made: plans are cheap to make again
        plan = plans[index] = _Plan(tenant, key, month, checks, self._admit, self._settle,
                                    leasable=self.lease_seconds > 0 and len(index) == 2)
        return plan

    @staticmethod
    def _make_plan(tenant: Tenant, key: ApiKey, month: str, slot_ms: int) -> tuple[Check, ...]:
        limits = tenant.limits
        prefix = f"gw:{{{tenant.id}}}"  # hash tag: all of a tenant's keys on one cluster slot
        key_prefix = f"{prefix}:key:{key.name}"
        key_limits = key.limits
        checks = [Check("concurrent requests", f"{prefix}:inflight", limits.concurrent_requests, "concurrency", SET,
                        slot_ms)]
        if key_limits and key_limits.concurrent_requests is not None:
            checks.append(Check("concurrent requests of this key", f"{key_prefix}:inflight",
                                key_limits.concurrent_requests, "concurrency", SET, slot_ms))
        checks += [
            _window("requests per minute", f"{prefix}:win:req:m", limits.requests_per_minute, "requests", 60),
            _window("tokens per minute", f"{prefix}:win:tok:m", limits.tokens_per_minute, "tokens", 60),
            _window("tokens per hour", f"{prefix}:win:tok:h", limits.tokens_per_hour, "tokens", 3600),
            _window("calls per day", f"{prefix}:win:req:d", limits.calls_per_day, "requests", 86400),
            Check(TENANT_BUDGET, f"{prefix}:spend:{month}",
                  None if limits.monthly_budget_usd is None else int(limits.monthly_budget_usd * NANO),
                  "budget", COUNTER, 40 * 86_400_000),
        ]
        if key_limits and key_limits.requests_per_minute is not None:
            checks.append(_window("requests per minute of this key", f"{key_prefix}:win:req:m",
                                  key_limits.requests_per_minute, "requests", 60))
        if key_limits and key_limits.tokens_per_minute is not None:
            checks.append(_window("tokens per minute of this key", f"{key_prefix}:win:tok:m",
                                  key_limits.tokens_per_minute, "tokens", 60))
        return tuple(checks)

    def clear_of_limits(self, plan: "_Plan", tokens: int, cost_nano: int, now: float) -> bool:
        """Whether, as the plan's last admission answer (at most ``headroom_seconds`` old) said, and counting what
        this worker sent since without an answer yet and this request, the tenant stays under half of every limit."""
        seen_at, left = plan.seen_at, plan.left
        if left is None or now - seen_at > self.headroom_seconds or now < self._down_until:
            return False
        for check, room, outstanding, amount in zip(plan.checks, left, plan.outstanding,
                                                    _amounts(plan, tokens, cost_nano)):
            if check.limit is not None and room - outstanding - amount < check.limit // 2:
                return False
        return True

    def admit_leased(self, plan: "_Plan", tokens: int, cost_nano: int, now: float) -> Admission | None:
        """Admit the request from this worker's lease on the plan's limits if it has room: no Redis. None: the
        request is for Redis to admit (and a lease is asked for, if the plan may have one and none is on its way).
        """
        lease = plan.lease
        if lease is not None:
            if now < lease.expires and lease.free:
                amounts = _amounts(plan, tokens, cost_nano)
                room = lease.room
                for index, _, _ in plan.corrected:
                    if amounts[index] > room[index]:
                        if amounts[index] > lease.granted[index]:
                            return None  # larger than the whole lease: Redis admits it, and the lease goes on
                        break
                else:
                    for index, _, _ in plan.corrected:
                        room[index] -= amounts[index]
                    member = lease.free.pop()
                    lease.served += 1
                    lease.reserved_tokens += tokens
                    lease.reserved_nano += cost_nano
                    held = lease.slots - len(lease.free)
                    if held > lease.peak:
                        lease.peak = held
                    return Admission(admitted=True, plan=plan, amounts=amounts, result=lease.answer(),
                                     now_ms=lease.count_ms, lease=lease, member=member)
            self._end_lease(lease)  # run out (of time, slots or room): the next one is sized by what this one served
        if plan.leasable and not plan.lease_asked and now >= plan.lease_after and now >= self._down_until:
            # after this request's own admission is written: its count (and its x-ratelimit headers) is then not
            # the new lease's too, and the settles waiting ride on it
            plan.lease_asked = True
            asyncio.get_running_loop().call_soon(self._ask_lease, plan, tokens, cost_nano, now)
        return None

    def _ask_lease(self, plan: "_Plan", tokens: int, cost_nano: int, now: float) -> None:
        """Ask Redis for a lease on the plan's limits, counted at once (at the lease's end, in the windows) and only
        while the tenant stays within half of every limit; nobody waits for the answer."""
        amounts = lease_amounts(plan, tokens, cost_nano)
        if amounts is None:
            plan.lease_asked = False
            plan.lease_after = now + self.lease_seconds
            return
        lease_id = f"{self._lease_prefix}{next(self._lease_numbers)}"
        now_ms = int(now * 1000)
        count_ms = now_ms + int(self.lease_seconds * 1000)
        riding = self._take_settles(plan)
        _count_outstanding(plan, amounts, 1)

        def answered(reply) -> None:
            plan.lease_asked = False
            _count_outstanding(plan, amounts, -1)
            if isinstance(reply, BaseException):
                metrics.LIMIT_LEASES.labels(plan.tenant.id, "failed").inc()
                self._settle_alone(plan, riding, reply)
                if isinstance(reply, _FAILURES):
                    self._mark_down(reply)
                else:
                    log.error("a lease's admission failed: %r", reply)
                plan.lease_after = time.time() + self.lease_seconds
                return
            if reply[0]:  # past half of a limit: requests are admitted one by one for a while
                metrics.LIMIT_LEASES.labels(plan.tenant.id, "refused").inc()
                plan.lease_after = time.time() + self.lease_seconds
                return
            metrics.LIMIT_LEASES.labels(plan.tenant.id, "granted").inc()
            self._answered(plan, amounts, now_ms, reply)
            lease = Lease(plan, lease_id, amounts, reply, now + self.lease_seconds, count_ms)
            lease.timer = asyncio.get_running_loop().call_later(max(0.0, lease.expires - time.time()),
                                                                self._end_lease, lease)
            self._leases.add(lease)
            if plan.lease is not None:
                self._end_lease(plan.lease)
            plan.lease = lease

        self.client.run_packed_soon(self._admit, _admit_command(plan, lease_id, amounts, now_ms, riding, count_ms,
                                                                plan.lease_bounds), answered)

    def _end_lease(self, lease: "Lease") -> None:
        """Stop admitting from a lease and give back what it did not use: its free slots leave the sets, and the
        first to leave carries the room left in the windows and the budget (with no free slot, the first of its
        requests to finish carries it)."""
        if lease.ended:
            return
        lease.ended = True
        if lease.timer is not None:
            lease.timer.cancel()
        self._leases.discard(lease)
        plan = lease.plan
        if plan.lease is lease:
            plan.lease = None
        learn_from(plan, lease, time.time(), self.lease_seconds)
        leftover = [-lease.room[index] for index, _, _ in plan.corrected]
        free, lease.free = lease.free, []
        if not free:
            lease.leftover = leftover
            return
        self._ride(plan, free[0], _corrections(lease.fields, leftover))
        nothing = _corrections(lease.fields, [0] * len(leftover))
        for member in free[1:]:
            self._ride(plan, member, nothing)

    async def admit(self, plan: "_Plan", request_id: str, tokens: int, cost_nano: int, now: float) -> Admission:
        amounts = _amounts(plan, tokens, cost_nano)
        if now < self._down_until:
            return Admission(admitted=True, plan=plan, amounts=amounts, degraded=True)
        now_ms = int(now * 1000)
        riding = self._take_settles(plan)
        _count_outstanding(plan, amounts, 1)
        try:
            result = await self.client.run_packed_script(
                self._admit, _admit_command(plan, request_id, amounts, now_ms, riding))
        except _FAILURES as exc:
            self._settle_alone(plan, riding, exc)
            return self._unanswered(plan, amounts, exc)
        except BaseException:  # cancelled, perhaps before it was sent (connecting): they go alone (each counts once)
            self._settle_alone(plan, riding)
            raise
        finally:
            _count_outstanding(plan, amounts, -1)
        return self._answered(plan, amounts, now_ms, result)

    def admit_started(self, plan: "_Plan", request_id: str, tokens: int, cost_nano: int, now: float,
                      on_answer: Callable[[Admission], None]) -> None:
        """Send the admission at once and call ``on_answer`` with it when Redis answers; nobody awaits it."""
        amounts = _amounts(plan, tokens, cost_nano)
        now_ms = int(now * 1000)
        riding = self._take_settles(plan)
        _count_outstanding(plan, amounts, 1)

        def answered(reply) -> None:
            _count_outstanding(plan, amounts, -1)
            if not isinstance(reply, BaseException):
                on_answer(self._answered(plan, amounts, now_ms, reply))
                return
            self._settle_alone(plan, riding, reply)
            if isinstance(reply, _FAILURES):
                on_answer(self._unanswered(plan, amounts, reply))
            else:  # not Redis's failure: not counted, and said
                log.error("an admission failed: %r", reply)
                on_answer(Admission(admitted=True, plan=plan, amounts=amounts, degraded=True))

        self.client.run_packed_soon(self._admit, _admit_command(plan, request_id, amounts, now_ms, riding), answered)

    def _unanswered(self, plan: "_Plan", amounts: tuple[int, ...], exc: BaseException) -> Admission:
        self._mark_down(exc)
        plan.left = None
        return Admission(admitted=True, plan=plan, amounts=amounts, degraded=True)

    def _answered(self, plan: "_Plan", amounts: tuple[int, ...], now_ms: int, result: list) -> Admission:
        checks = plan.checks
        refused = result[0]
        plan.seen_at = time.time()
        plan.left = None if refused else [
            (c.limit - result[1 + i]) if c.limit is not None else 0 for i, c in enumerate(checks)]
        if self._down_until or not self.available:
            self._mark_up()
        budget = plan.budget_index
        if budget is not None:
            spent = result[1 + budget] + (amounts[budget] if refused == budget + 1 else 0)
            self._budget_share[plan.budget_key] = spent / checks[budget].limit
        return Admission(admitted=not refused, plan=plan, amounts=amounts, result=result, now_ms=now_ms)

    def settle(self, admission: Admission, request_id: str, actual: dict[str, int]) -> None:
        """Free the concurrency slots and correct tokens and spend to ``actual`` ("tokens", "budget").

        Nothing waits for Redis. The settle rides on the next admission of the same tenant and key if one comes
        within RIDE_SECONDS (done by the admit script first: no command, reply or script call of its own); it goes
        alone otherwise, or when that admission fails. A settle Redis does not take is kept and sent again until it
        does.
        """
        if admission.degraded or not admission.admitted:
            return
        plan, now_ms, amounts, lease = admission.plan, admission.now_ms, admission.amounts, admission.lease
        if lease is not None and not lease.ended:  # back into the lease: nothing for Redis
            room = lease.room
            for index, kind, _ in plan.corrected:
                room[index] += amounts[index] - actual.get(kind, amounts[index])
            lease.free.append(admission.member)
            return
        corrections: list = []
        for index, kind, bucket_ms in plan.corrected:
            corrections += (now_ms // bucket_ms if bucket_ms else "", actual.get(kind, amounts[index]) - amounts[index])
        if lease is not None:
            request_id = admission.member
            if lease.leftover is not None:  # the ended lease's unused room, carried by the first of its slots to go
                corrections[1::2] = [a + b for a, b in zip(corrections[1::2], lease.leftover)]
                lease.leftover = None
        self._ride(plan, request_id, tuple(corrections))

    def _ride(self, plan: "_Plan", request_id: str, corrections: tuple) -> None:
        """Queue a settle for the next admission of its plan (sent alone after RIDE_SECONDS)."""
        if not plan.pending_settles:
            self._waiting_plans[id(plan)] = plan
        plan.pending_settles.append((request_id, corrections))
        if self._send_settles_at is None:
            self._send_settles_at = asyncio.get_running_loop().call_later(RIDE_SECONDS, self._send_waiting_settles)

    def _take_settles(self, plan: "_Plan") -> list[tuple[str, tuple]]:
        """The plan's settles waiting for a ride, now on the admission being sent."""
        riding = plan.pending_settles
        if riding:
            plan.pending_settles = []
            del self._waiting_plans[id(plan)]
            if not self._waiting_plans:  # a timer left to fire for nothing would wake a quiet worker
                self._send_settles_at.cancel()
                self._send_settles_at = None
        return riding

    def _send_waiting_settles(self) -> None:
        """Send the settles no admission took: a plan's one alone, several on an admission of nothing (one call)."""
        self._send_settles_at = None
        plans, self._waiting_plans = self._waiting_plans, {}
        for plan in plans.values():
            riding, plan.pending_settles = plan.pending_settles, []
            if len(riding) == 1:
                self._settle_alone(plan, riding)
                continue
            nothing = (0,) * len(plan.checks)
            self.client.run_packed_nowait(
                self._admit, _admit_command(plan, "", nothing, int(time.time() * 1000), riding),
                lambda exc, plan=plan, riding=riding: self._settle_alone(plan, riding, exc))

    def _settle_alone(self, plan: "_Plan", riding: list[tuple[str, tuple]],
                      failure: BaseException | None = None) -> None:
        """Send settles by themselves (``failure``: the admission they rode on failed: kept for a retry, as it may
        not have been done; a settle done twice counts once)."""
        for request_id, corrections in riding:
            command = pack((*plan.settle_head, request_id, plan.set_count, *corrections))
            if failure is not None:
                self._unsettled_later(command, failure)
            else:
                self.client.run_packed_nowait(self._settle, command,
                                              lambda exc, c=command: self._unsettled_later(c, exc))

    def _unsettled_later(self, command: bytes, exc: BaseException) -> None:
        self._mark_down(exc)
        if len(self._unsettled) >= UNSETTLED_MAX:
            self._unsettled.popleft()
            log.error("too many settles waiting for Redis; the oldest is dropped (its slot expires by itself)")
        self._unsettled.append(command)
        metrics.UNSETTLED.set(len(self._unsettled))
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.get_running_loop().create_task(self._retry_unsettled())

    async def _retry_unsettled(self) -> None:
        """Send the kept settles again, oldest first, until Redis has taken every one."""
        while self._unsettled:
            await asyncio.sleep(0.5)
            await self._flush_unsettled()

    async def _flush_unsettled(self) -> None:
        while self._unsettled:
            command = self._unsettled[0]
            try:
                await self.client.run_packed_script(self._settle, command)
            except _FAILURES as exc:
                self._mark_down(exc)
                return
            self._unsettled.popleft()
            metrics.UNSETTLED.set(len(self._unsettled))
        self._mark_up()

    def budget_share(self, tenant: Tenant) -> float | None:
        """The share of the tenant's monthly budget spent or reserved, as of its last request in this worker."""
        return self._budget_share.get((tenant.id, tenant.created_at))

    def budget_shares(self) -> dict[str, float]:
        """Every tenant's share of its monthly budget, as of its last request in this worker (for /metrics)."""
        return {tenant_id: share for (tenant_id, _), share in list(self._budget_share.items())}

    async def forget(self, tenant_id: str) -> int:
        """Delete every counter, slot and cached answer of a tenant (its id is about to be used again)."""
        for lease in [lease for lease in self._leases if lease.plan.tenant.id == tenant_id]:
            self._end_lease(lease)  # what it gives back finds its slots gone, and so corrects nothing
        self._plans = {k: p for k, p in self._plans.items() if k[0] != tenant_id}
        self._user_plans = {k: p for k, p in self._user_plans.items() if k[0] != tenant_id}
        return await self.client.unlink_matching(f"gw:{{{tenant_id}}}:*")

    async def spend_nano(self, tenant_id: str, now: float) -> int:
        """The tenant's spend this month as Redis counts it (reservations in flight included)."""
        month = time.strftime("%Y%m", time.gmtime(now))
        value = await self.client.execute("GET", f"gw:{{{tenant_id}}}:spend:{month}")
        return int(value or 0)

    async def add_spend(self, tenant_id: str, nano: int, now: float) -> None:
        """Spend that is not a request's (a fine-tuning job's training), counted against the month's budget."""
        if nano > 0:
            month = time.strftime("%Y%m", time.gmtime(now))
            await self.client.execute("INCRBY", f"gw:{{{tenant_id}}}:spend:{month}", str(nano))

    async def ping(self) -> bool:
        """Whether Redis counts: it answers, and a cluster says its state is ok (a cluster with slots nobody serves
        answers PING all the same)."""
        try:
            if isinstance(self.client, ClusterRedis):
                info = await self.client.execute("CLUSTER", "INFO")
                if b"cluster_state:ok" not in (info or b""):
                    raise ReplyError("CLUSTERDOWN the cluster's state is not ok")
            else:
                await self.client.execute("PING")
        except _FAILURES as exc:
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

    def _mark_down(self, exc: BaseException) -> None:
        # Skip Redis for a second instead of making every request wait on a dead connection.
        self._down_until = time.time() + 1.0
        self._failed_at = time.time()
        if self.available:
            log.error("Redis unreachable, limits are not being counted: %s", exc)
            self.available = False
            metrics.REDIS_UP.set(0)
        metrics.REDIS_ERRORS.inc()
        if self._prober is None or self._prober.done():
            try:
                self._prober = asyncio.get_running_loop().create_task(self._probe_until_up())
            except RuntimeError:  # no event loop (a call from a thread): the next request probes instead
                pass

    async def _probe_until_up(self) -> None:
        """Ask Redis twice a second until it is said reachable again, requests or not (readiness and
        gateway_redis_up follow Redis, not the traffic)."""
        while not self.available:
            await asyncio.sleep(0.5)
            await self.ping()

    def _mark_up(self) -> None:
        self._down_until = 0.0
        # Said reachable again only once nothing has failed for a while: a cluster with some slots down answers
        # half its calls, and the status (and gateway_redis_up) flapped with them.
        if not self.available and time.time() - self._failed_at >= RECOVERY_SECONDS:
            log.info("Redis reachable again, limits are counted again")
            self.available = True
            metrics.REDIS_UP.set(1)


class _Plan:
    """A tenant and key's checks for one month, with what every request's admit and settle commands share."""

    __slots__ = ("tenant", "key", "month", "checks", "head", "head_body", "argument_count", "bounds", "budget_index",
                 "budget_key", "unit_amounts", "token_checks", "budget_checks", "corrected", "corrected_checks",
                 "settle_head", "set_count", "header_checks", "seen_at", "left", "outstanding", "pending_settles",
                 "leasable", "lease_bounds", "lease", "lease_asked", "lease_after", "lease_requests", "lease_slots",
                 "lease_tokens", "lease_nano")

    def __init__(self, tenant: Tenant, key: ApiKey, month: str, checks: tuple[Check, ...], admit: Script,
                 settle: Script, leasable: bool = False) -> None:
        self.tenant, self.key, self.month, self.checks = tenant, key, month, checks
        self.argument_count = 3 + len(checks) + 3 + 5 * len(checks)  # of an admission without settles on it
        self.head_body = (bulk("EVALSHA") + bulk(admit.sha) + bulk(len(checks))
                          + b"".join(bulk(c.key) for c in checks))
        self.head = b"*%d\r\n" % self.argument_count + self.head_body
        self.bounds = tuple((bulk(c.store), bulk(-1 if c.limit is None else c.limit), bulk(c.a), bulk(c.b))
                            for c in checks)
        self.budget_index = next((i for i, c in enumerate(checks) if c.name == TENANT_BUDGET and c.limit), None)
        self.budget_key = (tenant.id, tenant.created_at)
        # What a request counts against each check (_amounts): one request or slot, or its tokens, or its cost.
        self.unit_amounts = [0 if c.kind in ("tokens", "budget") else 1 for c in checks]
        self.token_checks = tuple(i for i, c in enumerate(checks) if c.kind == "tokens")
        self.budget_checks = tuple(i for i, c in enumerate(checks) if c.kind == "budget")
        # Settle: the sets to leave, then per corrected check (every window and counter: a request corrects its
        # tokens and spend, a lease gives back the requests it did not admit too) its index, kind and bucket length
        # (0: a counter).
        sets = [c.key for c in checks if c.store == SET]
        self.corrected = tuple((i, c.kind, c.a if c.store == WINDOW else 0) for i, c in enumerate(checks)
                               if c.store != SET)
        self.settle_head = ("EVALSHA", settle.sha, len(sets) + len(self.corrected), *sets,
                            *(checks[i].key for i, _, _ in self.corrected))
        self.set_count = len(sets)
        # A settle riding on an admission: the checks it corrects, as the admit script numbers them.
        self.corrected_checks = bulk(len(self.corrected)) + b"".join(bulk(i + 1) for i, _, _ in self.corrected)
        self.pending_settles: list[tuple[str, tuple]] = []  # (request id, corrections) waiting for a ride
        # The per-minute windows OpenAI's x-ratelimit headers report: their index, the limit's header (the same for
        # every answer), the other two headers' names, and the limit.
        self.header_checks = tuple(
            (i, (b"x-ratelimit-limit-" + kind, b"%d" % c.limit), b"x-ratelimit-remaining-" + kind,
             b"x-ratelimit-reset-" + kind, c.limit)
            for i, c in enumerate(checks) if c.limit is not None and c.name in ("requests per minute",
                                                                               "tokens per minute")
            for kind in (b"requests" if c.kind == "requests" else b"tokens",))
        # Headroom (Limiter.clear_of_limits): per check, what was left of its limit when this worker last heard
        # (None after a refusal or a failure), and what it has sent since without an answer yet.
        self.seen_at = 0.0
        self.left: list[int] | None = None
        self.outstanding = [0] * len(checks)
        # Leases (Limiter.admit_leased): asked against half of every limit; sized by what the last one served.
        self.leasable = leasable
        self.lease_bounds = tuple((kind, bulk(-1 if c.limit is None else c.limit // 2), a, b)
                                  for (kind, _, a, b), c in zip(self.bounds, checks))
        self.lease: Lease | None = None
        self.lease_asked = False
        self.lease_after = 0.0  # no lease is asked for before this time (one was refused, or could not be sized)
        self.lease_requests = LEASE_FIRST_REQUESTS
        self.lease_slots = LEASE_FIRST_SLOTS
        self.lease_tokens = 0  # a request's reservation, as the last lease's averaged
        self.lease_nano = 0


def _user_checks(tenant: Tenant, user: str, month: str) -> tuple[Check, ...]:
    """An end user's limits: kept under a digest of the user's name, in the tenant's hash slot."""
    limits = tenant.end_users.of(user)
    prefix = f"gw:{{{tenant.id}}}:user:{hashlib.sha256(user.encode()).hexdigest()[:32]}"
    checks = []
    if limits.requests_per_minute is not None:
        checks.append(_window("requests per minute of this end user", f"{prefix}:win:req:m",
                              limits.requests_per_minute, "requests", 60))
    if limits.tokens_per_day is not None:
        checks.append(_window("tokens per day of this end user", f"{prefix}:win:tok:d", limits.tokens_per_day,
                              "tokens", 86400))
    if limits.monthly_budget_usd is not None:
        checks.append(Check("monthly budget of this end user", f"{prefix}:spend:{month}",
                            int(limits.monthly_budget_usd * NANO), "budget", COUNTER, 40 * 86_400_000))
    return tuple(checks)


_month_span = (0.0, 0.0, "")  # the calendar month (UTC) last asked for: its start, its end and its key


def _month(now: float) -> str:
    """The calendar month (UTC) of ``now`` as the budget's key names it: 202612."""
    global _month_span
    start, end, month = _month_span
    if not start <= now < end:
        utc = time.gmtime(now)
        month = time.strftime("%Y%m", utc)
        _month_span = (float(calendar.timegm((utc.tm_year, utc.tm_mon, 1, 0, 0, 0))), _month_end(now), month)
    return month


def _month_end(now: float) -> float:
    year, month = time.gmtime(now)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))
