"""Stored responses of OpenAI's Responses API, a tenant's own, in PostgreSQL.

A row keeps what the client got (the response object) and the input items of its request, as JSON bytes (``bytea``:
a prompt may hold characters jsonb refuses, NUL among them). ``previous_response_id`` is followed back through the
rows of the same tenant; another tenant's id is not found, as an unknown one is. Rows live ``retention_days`` (30 by
default, as OpenAI keeps them) and are swept hourly; a deleted response is gone at once, and a conversation that
passes through it ends there.
"""

from __future__ import annotations

import datetime as dt
from typing import Awaitable, Callable

import asyncpg
import orjson

MOST_TURNS = 1000  # a chain of previous responses longer than this is cut at its oldest turns

_CHAIN = """
WITH RECURSIVE chain AS (
    SELECT id, previous_id, input_items, response, 0 AS depth FROM stored_responses
     WHERE tenant_id = $1 AND id = $2 AND expires_at > now()
    UNION ALL
    SELECT r.id, r.previous_id, r.input_items, r.response, c.depth + 1 FROM stored_responses r
      JOIN chain c ON r.tenant_id = $1 AND r.id = c.previous_id AND r.expires_at > now()
     WHERE c.depth < $3
)
SELECT input_items, response FROM chain ORDER BY depth DESC
"""


class ResponseStore:
    def __init__(self, pool: Callable[[], Awaitable[asyncpg.Pool]], retention_days: int = 30) -> None:
        self._pool = pool
        self.retention_days = retention_days

    async def save(self, tenant_id: str, response: dict, input_items: list[dict]) -> None:
        pool = await self._pool()
        created = dt.datetime.fromtimestamp(response["created_at"], dt.timezone.utc)
        await pool.execute(
            "INSERT INTO stored_responses (tenant_id, id, previous_id, created_at, expires_at, input_items, response)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            tenant_id, response["id"], response.get("previous_response_id"), created,
            created + dt.timedelta(days=self.retention_days), orjson.dumps(input_items), orjson.dumps(response))

    async def get(self, tenant_id: str, response_id: str) -> bytes | None:
        pool = await self._pool()
        return await pool.fetchval("SELECT response FROM stored_responses WHERE tenant_id = $1 AND id = $2 AND "
                                   "expires_at > now()", tenant_id, response_id)

    async def conversation(self, tenant_id: str, response_id: str) -> list[dict] | None:
        """The items of a conversation up to and including ``response_id``'s output, oldest first; None if the
        tenant has no such response."""
        pool = await self._pool()
        rows = await pool.fetch(_CHAIN, tenant_id, response_id, MOST_TURNS)
        if not rows:
            return None
        items: list[dict] = []
        for row in rows:
            items += orjson.loads(row["input_items"])
            items += orjson.loads(row["response"]).get("output") or []
        return items

    async def input_items(self, tenant_id: str, response_id: str) -> list[dict] | None:
        pool = await self._pool()
        found = await pool.fetchval("SELECT input_items FROM stored_responses WHERE tenant_id = $1 AND id = $2 AND "
                                    "expires_at > now()", tenant_id, response_id)
        return None if found is None else orjson.loads(found)

    async def delete(self, tenant_id: str, response_id: str) -> bool:
        pool = await self._pool()
        deleted = await pool.fetchval("DELETE FROM stored_responses WHERE tenant_id = $1 AND id = $2 AND "
                                      "expires_at > now() RETURNING id", tenant_id, response_id)
        return deleted is not None

    async def forget_tenant(self, tenant_id: str) -> int:
        pool = await self._pool()
        status = await pool.execute("DELETE FROM stored_responses WHERE tenant_id = $1", tenant_id)
        return int(status.split()[-1])

    async def sweep(self) -> int:
        """Remove the responses past their retention."""
        pool = await self._pool()
        status = await pool.execute("DELETE FROM stored_responses WHERE expires_at <= now()")
        return int(status.split()[-1])
