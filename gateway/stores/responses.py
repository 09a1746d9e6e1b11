"""Stored responses of OpenAI's Responses API, a tenant's own, in PostgreSQL.

A row keeps what the client got (the response object) and the input items of its request, as JSON bytes (``bytea``:
a prompt may hold characters jsonb refuses, NUL among them). A response is stored before its client has the end of
it (so that the next turn finds it, on any replica); the saves of concurrent requests go in one statement, the next
batch gathering while one is written, on a connection of the store's own with its statements prepared (a save costs
this process about a third of what a pooled insert does). ``previous_response_id`` is followed back through the rows
of the same tenant; another tenant's id is not found, as an unknown one is. Rows live ``retention_days`` (30 by
default, as OpenAI keeps them) and are swept hourly; a deleted response is gone at once, and a conversation that
passes through it ends there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Awaitable, Callable

import asyncpg
import orjson

from gateway.errors import GatewayError

MOST_TURNS = 1000  # a chain of previous responses longer than this is cut at its oldest turns
MOST_ROWS_A_STATEMENT = 256
RETRY_SECONDS = 5.0  # after a failed write, saves fail at once for this long (none waits on a database that is away)
UNREACHABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class StoreUnavailable(Exception):
    pass


def unavailable() -> GatewayError:
    return GatewayError(503, "Stored responses cannot be read right now (PostgreSQL cannot be reached); try again.",
                        type="server_error", code="store_unavailable")

_COLUMNS = "stored_responses (tenant_id, id, previous_id, created_at, expires_at, input_items, response)"
_INSERT_ONE = f"INSERT INTO {_COLUMNS} VALUES ($1, $2, $3, $4, $5, $6, $7)"
_INSERT_MANY = f"""
INSERT INTO {_COLUMNS}
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::bytea[],
                     $7::bytea[])
"""

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
    def __init__(self, pool: Callable[[], Awaitable[asyncpg.Pool]], dsn: str, retention_days: int = 30) -> None:
        self._pool = pool  # for reads (and the migrations, run when it is first made)
        self.dsn = dsn
        self.retention_days = retention_days
        self._waiting: list[tuple[tuple, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None
        self._connection: asyncpg.Connection | None = None  # the writer's own
        self._statements: tuple | None = None
        self._down_until = 0.0

    async def save(self, tenant_id: str, response: dict, input_items: list[dict]) -> None:
        """Store a response; returns once it is committed (raises if it could not be)."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            raise StoreUnavailable("PostgreSQL could not be written a moment ago")
        created = dt.datetime.fromtimestamp(response["created_at"], dt.timezone.utc)
        row = (tenant_id, response["id"], response.get("previous_response_id"), created,
               created + dt.timedelta(days=self.retention_days), orjson.dumps(input_items), orjson.dumps(response))
        saved = loop.create_future()
        self._waiting.append((row, saved))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        await saved

    async def _write(self) -> None:
        """Write what is waiting, a statement a batch, until nothing is."""
        try:
            while self._waiting:
                batch = self._waiting[:MOST_ROWS_A_STATEMENT]
                del self._waiting[:MOST_ROWS_A_STATEMENT]
                try:
                    one, many = await self._prepared()
                    if len(batch) == 1:
                        await one.fetch(*batch[0][0])
                    else:
                        await many.fetch(*(list(column) for column in zip(*(row for row, _ in batch))))
                except Exception as exc:  # every save of the batch says why; the next batch connects anew
                    self._down_until = asyncio.get_running_loop().time() + RETRY_SECONDS
                    await self._disconnect()
                    for _, saved in batch:
                        if not saved.done():
                            saved.set_exception(exc)
                else:
                    for _, saved in batch:
                        if not saved.done():
                            saved.set_result(None)
        finally:
            self._writer = None

    async def _prepared(self) -> tuple:
        if self._connection is None or self._connection.is_closed():
            await self._pool()  # the table exists
            self._connection = await asyncpg.connect(self.dsn, timeout=5, command_timeout=10)
            self._statements = (await self._connection.prepare(_INSERT_ONE),
                                await self._connection.prepare(_INSERT_MANY))
        return self._statements

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close(timeout=2)
            except Exception:
                connection.terminate()

    async def close(self) -> None:
        await self._disconnect()

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
