"""A worker's lease on a tenant and key's limits (see gateway.stores.limits): what it holds, and how much one
asks for."""

from __future__ import annotations

import asyncio
from operator import sub
from typing import TYPE_CHECKING

from gateway.stores.limit_scripts import SET

if TYPE_CHECKING:
    from gateway.stores.limits import _Plan

LEASE_SHARE = 16  # a lease takes at most a sixteenth of any limit
LEASE_BUDGET_SHARE = 256  # and of a budget (what a crashed worker's lease leaves counted until the month ends)
LEASE_MIN_REQUESTS = 4  # a lease smaller than this many requests (of the last request's size) is not asked for
LEASE_FIRST_REQUESTS = 16
LEASE_MAX_REQUESTS = 4096
LEASE_FIRST_SLOTS = 4
LEASE_MAX_SLOTS = 256


class Lease:
    """A share of a plan's limits counted in Redis for this worker, from which it admits requests by itself until
    ``expires``: ``room`` per window and counter, ``free`` slots of the concurrency sets."""

    __slots__ = ("plan", "granted", "room", "free", "slots", "used", "resets", "expires", "count_ms", "fields", "timer",
                 "ended", "leftover", "served", "peak", "reserved_tokens", "reserved_nano")

    def __init__(self, plan: "_Plan", lease_id: str, amounts: tuple[int, ...], reply: list, expires: float,
                 count_ms: int) -> None:
        checks = plan.checks
        self.plan = plan
        self.granted = amounts
        self.room = [0 if c.store == SET else amount for c, amount in zip(checks, amounts)]
        self.slots = amounts[0]
        self.free = [f"{lease_id}:{j}" for j in range(self.slots, 0, -1)]
        self.used = reply[1:1 + len(checks)]  # as counted with the whole lease
        self.resets = reply[1 + len(checks):]
        self.expires, self.count_ms = expires, count_ms
        self.fields = [count_ms // bucket_ms if bucket_ms else "" for _, _, bucket_ms in plan.corrected]
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False
        self.leftover: list[int] | None = None  # room to give back, when no free slot was left to carry it
        self.served = self.peak = self.reserved_tokens = self.reserved_nano = 0

    def answer(self) -> list:
        """An admission's answer for a request admitted from the lease: the counts as of the lease's, less the room
        it still has (what x-ratelimit-remaining-* report)."""
        return [0, *map(sub, self.used, self.room), *self.resets]


def learn_from(plan: "_Plan", lease: Lease, now: float, lease_seconds: float) -> None:
    """Size the plan's next lease by what this one served: twice its rate and its busiest moment's slots."""
    served = lease.served
    elapsed = max(now - (lease.expires - lease_seconds), 0.001)
    plan.lease_requests = min(max(int(2 * served * min(lease_seconds / elapsed, 64.0)), LEASE_MIN_REQUESTS),
                              LEASE_MAX_REQUESTS)
    plan.lease_slots = min(max(2 * lease.peak, LEASE_FIRST_SLOTS), LEASE_MAX_SLOTS)
    if served:
        plan.lease_tokens = -(-lease.reserved_tokens // served)
        plan.lease_nano = -(-lease.reserved_nano // served)


def lease_amounts(plan: "_Plan", tokens: int, cost_nano: int) -> tuple[int, ...] | None:
    """What a lease asks for, check by check, at most a LEASE_SHARE-th of each limit (a LEASE_BUDGET_SHARE-th of a
    budget); None when that leaves it too small to be worth asking for (fewer than LEASE_MIN_REQUESTS requests like
    this one, or no two slots)."""
    requests = plan.lease_requests
    per_tokens, per_nano = max(tokens, plan.lease_tokens), max(cost_nano, plan.lease_nano)
    slots = plan.lease_slots  # as many in every set: a request takes the same slot in each
    for check in plan.checks:
        if check.store == SET and check.limit is not None:
            slots = min(slots, check.limit // LEASE_SHARE)
    if slots < 2:
        return None
    amounts = []
    for check in plan.checks:
        kind = check.kind
        if kind == "concurrency":
            amounts.append(slots)
            continue
        if kind == "requests":
            wanted, least = requests, LEASE_MIN_REQUESTS
        elif kind == "tokens":
            wanted, least = requests * per_tokens, LEASE_MIN_REQUESTS * tokens
        else:
            wanted, least = requests * per_nano, LEASE_MIN_REQUESTS * cost_nano
        if check.limit is not None:
            cap = check.limit // (LEASE_BUDGET_SHARE if kind == "budget" else LEASE_SHARE)
            if cap < least:
                return None
            wanted = min(wanted, cap)
        amounts.append(wanted)
    return tuple(amounts)
