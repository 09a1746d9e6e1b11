"""Tenants and keys made through the admin API, kept in PostgreSQL and merged with tenants.yaml.

Every change takes the next number of one counter (``api_changes.version``), under the row lock of that counter,
so numbers are given in commit order, and stamps the rows it touched with it. A gateway remembers the number it
has seen and asks only for rows stamped later: a change costs each replica the rows it touched, not the whole
directory. A deleted tenant leaves a row in ``api_tenant_history`` (stamped too), which is how the others learn
of it and how its past stays readable once its id is used again.

Rows are handed over as they are stored (the spec as JSON text): the config store validates and compiles each one
by itself, so a row it cannot read is skipped alone.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import asyncpg
import orjson

from gateway.config.schema import TenantSpec
from gateway.stores.migrations import migrate

T = TypeVar("T")


class Conflict(Exception):
    pass


@dataclass(frozen=True)
class TenantRow:
    tenant_id: str
    spec_json: str
    created_at: float


@dataclass(frozen=True)
class KeyRow:
    tenant_id: str
    name: str
    sha256: str
    expires_at: float | None
    revoked: bool = False
    access: dict | None = None  # role, routes, models, tools (KeyAccessFields), if the key was limited


@dataclass
class DirectoryChanges:
    """What changed after some version (everything, for a full load)."""

    version: int
    full: bool
    tenants: dict[str, TenantRow] = field(default_factory=dict)  # made or changed
    deleted: set[str] = field(default_factory=set)  # gone (and not made again since)
    keys: list[KeyRow] = field(default_factory=list)  # made, or revoked


_TENANTS = "SELECT id, spec::text AS spec, extract(epoch FROM created_at)::float8 AS created_at FROM api_tenants"
_KEYS = ("SELECT tenant_id, name, sha256, extract(epoch FROM expires_at)::float8 AS expires_at, "
         "revoked_at IS NOT NULL AS revoked, access::text AS access FROM api_keys")


class TenantDirectory:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: asyncpg.Pool | None = None

    async def _pool(self) -> asyncpg.Pool:
        if self.pool is None:
            pool = await asyncpg.create_pool(self.dsn, min_size=0, max_size=4, timeout=5, command_timeout=10)
            async with pool.acquire() as connection:
                await migrate(connection)
            self.pool = pool
        return self.pool

    async def pool_for_reports(self) -> asyncpg.Pool:
        return await self._pool()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def version(self) -> int:
        return await (await self._pool()).fetchval("SELECT version FROM api_changes")

    async def changes(self, since: int | None) -> DirectoryChanges:
        """Everything (``since`` None), or what changed after version ``since``."""
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read"):
            version = await connection.fetchval("SELECT version FROM api_changes")
            if since is None:
                tenants = await connection.fetch(_TENANTS)
                keys = await connection.fetch(_KEYS + " WHERE revoked_at IS NULL")
                deleted = []
            else:
                if version == since:
                    return DirectoryChanges(version, full=False)
                tenants = await connection.fetch(_TENANTS + " WHERE version > $1", since)
                keys = await connection.fetch(_KEYS + " WHERE version > $1 ORDER BY version", since)
                deleted = await connection.fetch(
                    "SELECT DISTINCT tenant_id FROM api_tenant_history WHERE version > $1", since)
        changes = DirectoryChanges(version, full=since is None)
        for row in tenants:
            changes.tenants[row["id"]] = TenantRow(row["id"], row["spec"], row["created_at"])
        changes.deleted = {row["tenant_id"] for row in deleted} - set(changes.tenants)
        changes.keys = [KeyRow(r["tenant_id"], r["name"], r["sha256"], r["expires_at"], r["revoked"],
                               orjson.loads(r["access"]) if r["access"] else None) for r in keys]
        return changes

    async def _write(self, change: Callable[[asyncpg.Connection, int], Awaitable[T]]) -> T:
        """Run ``change`` in a transaction that holds the next version number."""
        async with (await self._pool()).acquire() as connection, connection.transaction():
            version = await connection.fetchval("UPDATE api_changes SET version = version + 1 RETURNING version")
            return await change(connection, version)

    async def create_tenant(self, tenant_id: str, spec: TenantSpec) -> None:
        async def change(connection: asyncpg.Connection, version: int) -> None:
            try:
                await connection.execute("INSERT INTO api_tenants (id, spec, version) VALUES ($1, $2, $3)",
                                         tenant_id, _spec_json(spec), version)
            except asyncpg.UniqueViolationError:
                raise Conflict(f"a tenant '{tenant_id}' already exists") from None

        await self._write(change)

    async def update_tenant(self, tenant_id: str, spec: TenantSpec) -> bool:
        async def change(connection: asyncpg.Connection, version: int) -> bool:
            result = await connection.execute(
                "UPDATE api_tenants SET spec = $2, updated_at = now(), version = $3 WHERE id = $1",
                tenant_id, _spec_json(spec), version)
            return result.endswith(" 1")

        return await self._write(change)

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete the tenant and revoke its keys; its record moves to the history, with its lifetime."""
        async def change(connection: asyncpg.Connection, version: int) -> bool:
            moved = await connection.execute(
                "WITH gone AS (DELETE FROM api_tenants WHERE id = $1 RETURNING id, spec, created_at) "
                "INSERT INTO api_tenant_history (tenant_id, spec, created_at, version) "
                "SELECT id, spec, created_at, $2 FROM gone", tenant_id, version)
            await connection.execute("UPDATE api_keys SET revoked_at = now(), version = $2 WHERE tenant_id = $1 "
                                     "AND revoked_at IS NULL", tenant_id, version)
            return moved.endswith(" 1")

        return await self._write(change)

    async def add_key(self, tenant_id: str, name: str, sha256: str, expires: dt.datetime | None,
                      access: dict | None = None) -> None:
        async def change(connection: asyncpg.Connection, version: int) -> None:
            try:
                await connection.execute(
                    "INSERT INTO api_keys (sha256, tenant_id, name, expires_at, version, access) "
                    "VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
                    sha256, tenant_id, name, expires, version, orjson.dumps(access).decode() if access else None)
            except asyncpg.UniqueViolationError:
                raise Conflict(f"tenant '{tenant_id}' already has a key named '{name}'") from None

        await self._write(change)

    async def revoke_key(self, tenant_id: str, name: str) -> bool:
        async def change(connection: asyncpg.Connection, version: int) -> bool:
            result = await connection.execute(
                "UPDATE api_keys SET revoked_at = now(), version = $3 WHERE tenant_id = $1 AND name = $2 "
                "AND revoked_at IS NULL", tenant_id, name, version)
            return result.endswith(" 1")

        return await self._write(change)

    async def keys(self, tenant_id: str) -> list[dict]:
        rows = await (await self._pool()).fetch(
            "SELECT name, created_at, expires_at, access::text AS access FROM api_keys WHERE tenant_id = $1 "
            "AND revoked_at IS NULL ORDER BY created_at", tenant_id)
        return [{"name": r["name"], "created_at": r["created_at"].isoformat(), "source": "api",
                 "expires_at": r["expires_at"].date().isoformat() if r["expires_at"] else None,
                 "access": orjson.loads(r["access"]) if r["access"] else None} for r in rows]

    async def history(self, tenant_id: str) -> list[dict]:
        """Earlier tenants that had this id: when each was made and deleted."""
        rows = await (await self._pool()).fetch(
            "SELECT created_at, deleted_at, spec->>'name' AS name FROM api_tenant_history WHERE tenant_id = $1 "
            "ORDER BY deleted_at", tenant_id)
        return [{"name": r["name"], "created_at": r["created_at"].isoformat(),
                 "deleted_at": r["deleted_at"].isoformat()} for r in rows]


def _spec_json(spec: TenantSpec) -> str:
    return spec.model_dump_json(exclude_none=True)
