"""One vLLM node of a fleet pool: what the gateway knows of it, refreshed off the request path.

From the node: health (``/health``), the models it serves and the adapters registered on it (``/v1/models``: an
adapter is a card with a ``parent``), and its load from ``/metrics`` (``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, and ``vllm:lora_requests_info``, whose labels name
the running and waiting adapters and ``max_lora``; of several samples, the newest wins). Between two looks, the
gateway's own count of requests in flight keeps the load current.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from gateway.config.types import Deployment

UP, PROBING, DRAINED, DOWN = "up", "probing", "drained", "down"


@dataclass
class Node:
    pool: str
    name: str
    url: str  # up to /v1
    api_key: str | None = field(repr=False)
    weight: float
    source: str  # "config" or "tailscale"
    slots_default: int
    deployment: Deployment = field(repr=False, default=None)  # how the request path calls it
    state: str = PROBING  # up, probing (not checked yet), drained (failing: probed until healthy), down
    drained_by_admin: bool = False
    gone: bool = False  # no longer in the config or on the mesh: finishes what it has, takes nothing new
    failures: int = 0  # failed requests in a row
    served: frozenset[str] = frozenset()  # base models
    adapters: set[str] = field(default_factory=set)  # registered (the gateway's view: its loads and the node's)
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_lora: int | None = None  # from the node's metrics
    num_running: float = 0.0
    num_waiting: float = 0.0
    kv_usage: float = 0.0
    inflight: int = 0  # the gateway's requests on the node now
    inflight_by_adapter: Counter = field(default_factory=Counter)
    awaiting: Counter = field(default_factory=Counter)  # adapter -> requests waiting for its load to finish
    last_used: dict[str, float] = field(default_factory=dict)  # adapter -> monotonic time of its last request
    loading: dict[str, asyncio.Future] = field(default_factory=dict)  # adapter -> its load under way
    evicting: set[str] = field(default_factory=set)  # adapters being unloaded
    reserved: set[str] = field(default_factory=set)  # adapters whose load holds a slot and is under way
    changes: int = 0  # bumped by every load and unload: a read of the node that saw another count is stale
    slot_freed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # an adapter's last request ended
    pinned: set[str] = field(default_factory=set)  # adapters an admin keeps here
    checked_at: float = 0.0
    error: str | None = None  # why the last check failed

    @property
    def slots(self) -> int:
        return self.max_lora or self.slots_default

    @property
    def usable(self) -> bool:
        return self.state == UP and not self.drained_by_admin and not self.gone

    def occupied(self) -> int:
        """Slots the node's adapters take, as far as the node may know: registered, being unloaded, being loaded."""
        return len(self.adapters | self.evicting | self.reserved)

    def resident(self, adapter: str) -> bool:
        return adapter in self.adapters and adapter not in self.loading

    def queue(self) -> float:
        """Requests ahead of a new one: the node's waiting queue, or the gateway's own count if that is higher."""
        return max(self.num_waiting + self.num_running, float(self.inflight)) / self.weight

    def view(self) -> dict:
        return {"name": self.name, "pool": self.pool, "url": self.url, "source": self.source, "state": self.state,
                "drained_by_admin": self.drained_by_admin, "weight": self.weight, "served": sorted(self.served),
                "adapters": sorted(self.adapters), "running_adapters": sorted(self.running_adapters),
                "waiting_adapters": sorted(self.waiting_adapters), "slots": self.slots, "pinned": sorted(self.pinned),
                "inflight": self.inflight, "num_running": self.num_running, "num_waiting": self.num_waiting,
                "kv_cache_usage": self.kv_usage, "failures": self.failures, "error": self.error,
                "checked_seconds_ago": round(time.monotonic() - self.checked_at, 1) if self.checked_at else None}


def read_models(body: dict) -> tuple[frozenset[str], set[str]]:
    """Base models and registered adapters from a /v1/models answer."""
    bases, adapters = set(), set()
    for card in body.get("data") or ():
        if isinstance(card, dict) and isinstance(card.get("id"), str):
            (adapters if card.get("parent") else bases).add(card["id"])
    return frozenset(bases), adapters


@dataclass
class Load:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_lora: int | None = None


def read_metrics(text: str) -> Load:
    """The load figures of a vLLM /metrics page (summed over the engines it reports)."""
    load = Load()
    newest = -1.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name == "vllm:num_requests_running":
                load.running += sample.value
            elif name == "vllm:num_requests_waiting":
                load.waiting += sample.value
            elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
                load.kv_usage = max(load.kv_usage, sample.value)
            elif name == "vllm:lora_requests_info" and sample.value >= newest:
                newest = sample.value
                labels = sample.labels
                load.running_adapters = _names(labels.get("running_lora_adapters", ""))
                load.waiting_adapters = _names(labels.get("waiting_lora_adapters", ""))
                try:
                    load.max_lora = int(float(labels.get("max_lora", "")))
                except ValueError:
                    load.max_lora = None
    return load


def _names(text: str) -> frozenset[str]:
    return frozenset(part.strip() for part in text.split(",") if part.strip())
