"""Where a request runs: the order in which a pool's nodes are tried.

``adapter_aware`` (the default) scores each usable node and tries the best first:

    score = affinity(node, adapter) - queue_weight * requests ahead - kv_weight * KV-cache use

with the adapter's affinity by what it would cost to run there: running already (4.0), registered and idle (3.2),
being loaded (2.8: joining the load saves a second one), a free slot (1.2: one load), a slot to take from another
adapter (0.0 less four times that adapter's share of the pool's recent requests: the eviction that costs the least
traffic comes first). A node whose slots are all busy with running requests comes last: a request placed there
waits for a slot to free. An affinity difference
of 0.8 is worth about three queued requests: a node with the adapter is preferred until it is clearly busier, and
then a hot adapter spreads to a second node (its load is paid once, its queue shrinks). Requests without an
adapter go to the least loaded node.

Evictions take the adapter with the lowest recent request rate among those no request is running with (the least
recently used breaks ties): a frequency-aware choice keeps the hot adapters resident under Zipf-like traffic,
where plain LRU lets a burst of cold ones push them out.

``round_robin`` and ``least_loaded`` ignore adapters (as a blind balancer would) and exist for comparison; the
adapter is still loaded where the request lands, evicting the least recently used one.
"""

from __future__ import annotations

import itertools
import math
import time

from gateway.upstreams.fleet.node import Node

RUNNING, RESIDENT, LOADING, FREE_SLOT, EVICT = 4.0, 3.2, 2.8, 1.2, 0.0
POPULARITY_HALF_LIFE = 60.0  # seconds: how fast an adapter's request rate forgets


class Popularity:
    """Each adapter's recent request rate in a pool: an exponentially decayed count."""

    def __init__(self) -> None:
        self._count: dict[str, float] = {}
        self._at: dict[str, float] = {}

    def seen(self, adapter: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._count[adapter] = self.of(adapter, now) + 1.0
        self._at[adapter] = now

    def share(self, adapter: str) -> float:
        """The adapter's part of the pool's recent requests (0 to 1)."""
        now = time.monotonic()
        total = sum(self.of(a, now) for a in self._count)
        return self.of(adapter, now) / total if total else 0.0

    def of(self, adapter: str, now: float | None = None) -> float:
        count = self._count.get(adapter)
        if count is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return count * math.exp(-(now - self._at[adapter]) * math.log(2) / POPULARITY_HALF_LIFE)


def victim(node: Node, popularity: Popularity, by_frequency: bool) -> str | None:
    """The adapter to unload from ``node`` to make room: idle, not pinned; least popular (or least recent)."""
    idle = [a for a in node.adapters if a not in node.loading and not node.inflight_by_adapter.get(a)
            and not node.awaiting.get(a) and a not in node.running_adapters and a not in node.pinned]
    if not idle:
        return None
    if by_frequency:
        return min(idle, key=lambda a: (popularity.of(a), node.last_used.get(a, 0.0)))
    return min(idle, key=lambda a: node.last_used.get(a, 0.0))


class Placement:
    def __init__(self, strategy: str, queue_weight: float, kv_weight: float) -> None:
        self.strategy = strategy
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight
        self._turn = itertools.count()

    def order(self, nodes: list[Node], adapter: str | None, popularity: Popularity) -> list[Node]:
        usable = [n for n in nodes if n.usable]
        if not usable:
            return []
        if self.strategy == "round_robin":
            start = next(self._turn) % len(usable)
            return usable[start:] + usable[:start]
        if self.strategy == "least_loaded" or adapter is None:
            return sorted(usable, key=lambda n: (n.queue(), n.kv_usage))
        scored = [(self.score(n, adapter, popularity), n.queue(), n) for n in usable]
        scored.sort(key=lambda entry: (-entry[0], entry[1]))  # a node whose slots are all busy last: it must wait
        return [n for _, _, n in scored]

    def score(self, node: Node, adapter: str, popularity: Popularity) -> float:
        if adapter in node.running_adapters or node.inflight_by_adapter.get(adapter):
            affinity = RUNNING
        elif node.resident(adapter):
            affinity = RESIDENT
        elif adapter in node.loading:
            affinity = LOADING
        elif len(node.adapters) + sum(1 for a in node.loading if a not in node.adapters) < node.slots:
            affinity = FREE_SLOT
        else:
            evicted = victim(node, popularity, by_frequency=True)
            if evicted is None:
                return -math.inf  # every slot is busy: the node can take this adapter only once one is free
            affinity = EVICT - 4.0 * popularity.share(evicted)  # the eviction that costs the least traffic first
        return affinity - self.queue_weight * node.queue() - self.kv_weight * node.kv_usage
