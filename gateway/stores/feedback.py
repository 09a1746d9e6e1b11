"""Tenants' ratings of answers, by request id: each tenant rates only its own requests, and a rating joins the
labels the router learns from (``gateway router train --from-ledger``)."""

from __future__ import annotations

import datetime as dt

import asyncpg

_OWN_REQUEST = ("SELECT route_example IS NOT NULL FROM usage_ledger "
                "WHERE request_id = $1 AND tenant_id = $2 AND created_at >= $3")
_RATE = """
INSERT INTO feedback (tenant_id, request_id, rating, comment, created_at, updated_at)
VALUES ($1, $2, $3, $4, now(), now())
ON CONFLICT (tenant_id, request_id) DO UPDATE SET rating = $3, comment = $4, updated_at = now()
RETURNING created_at, updated_at
"""


async def rate(pool: asyncpg.Pool, tenant_id: str, request_id: str, rating: int, comment: str | None,
               since: dt.datetime) -> dict | None:
    """Keep the tenant's rating of one of its requests (made since ``since``); None when it has no such request.
    A second rating of the same request replaces the first."""
    async with pool.acquire() as connection:
        learnable = await connection.fetchval(_OWN_REQUEST, request_id, tenant_id, since)
        if learnable is None:
            return None
        row = await connection.fetchrow(_RATE, tenant_id, request_id, rating, comment)
    return {"created_at": row["created_at"], "updated_at": row["updated_at"], "used_by_router": bool(learnable)}
