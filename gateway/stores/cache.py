"""The response cache in Redis: whole answers kept under a hash of everything in the request that shapes them.

An entry is one string: a JSON line of what the answer was (model, deployment, content type, tokens) and then
the answer's bytes: the JSON body of a plain answer, or the SSE events of a streamed one (usage event included).
Keys are ``gw:{tenant}:cache:<sha256>``: the tenant is part of every key, so one tenant can never read
another's entries, and all of a tenant's entries share one cluster slot (one SCAN purges them).

Redis trouble is never the client's: a lookup that fails is a miss, a write that fails is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import orjson

from gateway.observability import metrics
from gateway.stores.resp import Redis, ReplyError

log = logging.getLogger("gateway.cache")

_FAILURES = (OSError, ReplyError, asyncio.TimeoutError, ConnectionError)
# What does not change the answer: how it is delivered, and who the client says the end user is.
_NOT_IN_KEY = frozenset(("stream_options", "user"))


def cache_key(tenant_id: str, route: str, body: dict, encode=orjson.dumps) -> str:
    """The key of a request's answer: the tenant, the operation and every field of the body that shapes it."""
    shaping = {k: v for k, v in body.items() if k not in _NOT_IN_KEY}
    digest = hashlib.sha256(route.encode() + b"\n" + encode(shaping, option=orjson.OPT_SORT_KEYS))
    return f"gw:{{{tenant_id}}}:cache:{digest.hexdigest()}"


class ResponseCache:
    def __init__(self, client: Redis) -> None:
        self.client = client
        self._down_until = 0.0

    async def get(self, key: str) -> tuple[dict, bytes] | None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            return None
        try:
            value = await self.client.execute("GET", key)
        except _FAILURES as exc:
            self._failed(exc)
            return None
        if value is None:
            return None
        head, _, body = value.partition(b"\n")
        try:
            return orjson.loads(head), body
        except orjson.JSONDecodeError:
            return None

    def put(self, key: str, meta: dict, body: bytes, ttl_seconds: int) -> None:
        """Store an answer; nothing waits for Redis to confirm."""
        if asyncio.get_running_loop().time() < self._down_until:
            return
        value = orjson.dumps(meta) + b"\n" + body
        task = asyncio.ensure_future(self.client.execute("SET", key, value, "EX", ttl_seconds))
        task.add_done_callback(self._written)
        metrics.cache_bytes_by("stored").inc(len(value))

    def _written(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failed(task.exception())

    async def purge(self, tenant_id: str) -> int:
        """Delete every entry of one tenant; the number deleted."""
        return await self.client.unlink_matching(f"gw:{{{tenant_id}}}:cache:*")

    def _failed(self, exc: BaseException) -> None:
        # Skip the cache for a second rather than make every request wait on a dead connection.
        self._down_until = asyncio.get_running_loop().time() + 1.0
        metrics.cache_lookups_by("error").inc()
        log.warning("response cache unavailable, serving uncached: %s", exc)
