"""The recent route scores of each scope with a target share, in Redis lists that every replica adds to and reads:
the thresholds that keep the share are then the same on all of them."""

from __future__ import annotations

from typing import Iterable

from gateway.stores.resp import Redis

WINDOW_TTL_SECONDS = 7 * 24 * 3600  # a scope no request has used for a week is forgotten


def _key(scope: str) -> str:
    if scope.startswith("tenant:"):  # among the tenant's own keys: forgotten with them when its id is used again
        return f"gw:{{{scope[len('tenant:'):]}}}:route_scores"
    return f"gw:route_scores:{scope}"


async def exchange(redis: Redis, pending: dict[str, list[float]], scopes: Iterable[str],
                   size: int, read: int | None = None) -> dict[str, list[float]]:
    """Add this replica's new scores to the shared windows (each trimmed to ``size``), then read the newest
    ``read`` of ``scopes``' (newest first)."""
    for scope, scores in pending.items():
        key = _key(scope)
        await redis.execute("LPUSH", key, *(f"{score:.6g}" for score in scores))
        await redis.execute("LTRIM", key, 0, size - 1)
        await redis.execute("EXPIRE", key, WINDOW_TTL_SECONDS)
    windows = {}
    for scope in scopes:
        values = await redis.execute("LRANGE", _key(scope), 0, (read or size) - 1)
        windows[scope] = [float(v) for v in values or ()]
    return windows
