"""Tenants and keys made through the admin API, kept in PostgreSQL and merged with tenants.yaml.

Every change bumps one version number in the same transaction; gateways poll that number and reload when it
moves, so a tenant or key made through one replica is in force on all of them within seconds.
"""

from __future__ import annotations

import datetime as dt

import asyncpg
import orjson

from gateway.config.loader import ApiKeyRecord, ApiState
from gateway.config.schema import TenantSpec
from gateway.stores.migrations import migrate


class Conflict(Exception):
    pass


class TenantDirectory:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: asyncpg.Pool | None = None

    async def _pool(self) -> asyncpg.Pool:
        if self.pool is None:
            pool = await asyncpg.create_pool(self.dsn, min_size=0, max_size=2, timeout=5, command_timeout=10)
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

    async def load(self) -> tuple[int, ApiState]:
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read"):
            version = await connection.fetchval("SELECT version FROM api_changes")
            tenants = await connection.fetch("SELECT id, spec FROM api_tenants")
            keys = await connection.fetch(
                "SELECT tenant_id, name, sha256, expires_at FROM api_keys WHERE revoked_at IS NULL")
        state = ApiState(
            tenants={row["id"]: TenantSpec.model_validate(orjson.loads(row["spec"])) for row in tenants},
            keys=tuple(ApiKeyRecord(row["tenant_id"], row["name"], row["sha256"],
                                    row["expires_at"].timestamp() if row["expires_at"] else None) for row in keys),
        )
        return version, state

    async def _change(self, connection: asyncpg.Connection) -> None:
        await connection.execute("UPDATE api_changes SET version = version + 1")

    async def create_tenant(self, tenant_id: str, spec: TenantSpec) -> None:
        async with (await self._pool()).acquire() as connection, connection.transaction():
            try:
                await connection.execute("INSERT INTO api_tenants (id, spec) VALUES ($1, $2)", tenant_id,
                                         spec.model_dump_json(exclude_none=True))
            except asyncpg.UniqueViolationError:
                raise Conflict(f"a tenant '{tenant_id}' already exists") from None
            await self._change(connection)

    async def update_tenant(self, tenant_id: str, spec: TenantSpec) -> bool:
        async with (await self._pool()).acquire() as connection, connection.transaction():
            result = await connection.execute("UPDATE api_tenants SET spec = $2, updated_at = now() WHERE id = $1",
                                              tenant_id, spec.model_dump_json(exclude_none=True))
            await self._change(connection)
            return result.endswith(" 1")

    async def delete_tenant(self, tenant_id: str) -> bool:
        async with (await self._pool()).acquire() as connection, connection.transaction():
            result = await connection.execute("DELETE FROM api_tenants WHERE id = $1", tenant_id)
            await connection.execute("UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND "
                                     "revoked_at IS NULL", tenant_id)
            await self._change(connection)
            return result.endswith(" 1")

    async def add_key(self, tenant_id: str, name: str, sha256: str, expires: dt.datetime | None) -> None:
        async with (await self._pool()).acquire() as connection, connection.transaction():
            try:
                await connection.execute(
                    "INSERT INTO api_keys (sha256, tenant_id, name, expires_at) VALUES ($1, $2, $3, $4)",
                    sha256, tenant_id, name, expires)
            except asyncpg.UniqueViolationError:
                raise Conflict(f"tenant '{tenant_id}' already has a key named '{name}'") from None
            await self._change(connection)

    async def revoke_key(self, tenant_id: str, name: str) -> bool:
        async with (await self._pool()).acquire() as connection, connection.transaction():
            result = await connection.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND name = $2 AND revoked_at IS NULL",
                tenant_id, name)
            await self._change(connection)
            return result.endswith(" 1")

    async def keys(self, tenant_id: str) -> list[dict]:
        rows = await (await self._pool()).fetch(
            "SELECT name, created_at, expires_at FROM api_keys WHERE tenant_id = $1 AND revoked_at IS NULL "
            "ORDER BY created_at", tenant_id)
        return [{"name": r["name"], "created_at": r["created_at"].isoformat(), "source": "api",
                 "expires_at": r["expires_at"].isoformat() if r["expires_at"] else None} for r in rows]
