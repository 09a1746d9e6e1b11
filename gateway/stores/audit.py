"""The audit log of the admin API: every change made through it (who, what, when, the state before and after),
kept in PostgreSQL beside the directory it changes. Secrets never enter it: a key made is recorded by its name and
role, a provider key by its reference."""

from __future__ import annotations

import datetime as dt
import json

import asyncpg

_WRITE = """
INSERT INTO audit_log (actor, actor_role, actor_tenant, action, tenant_id, target, status, before, after)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb)
RETURNING id, created_at
"""
_READ = """
SELECT id, created_at, actor, actor_role, actor_tenant, action, tenant_id, target, status,
       before::text AS before, after::text AS after
FROM audit_log
WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::timestamptz IS NULL OR created_at >= $2)
  AND ($3::bigint IS NULL OR id < $3)
ORDER BY id DESC
LIMIT $4
"""


async def write(pool: asyncpg.Pool, actor: str, actor_role: str, actor_tenant: str | None, action: str,
                tenant_id: str | None, target: str | None, status: int, before: object, after: object) -> int:
    """Record one admin action; its id."""
    row = await pool.fetchrow(_WRITE, actor, actor_role, actor_tenant, action, tenant_id, target, status,
                              _text(before), _text(after))
    return row["id"]


async def read(pool: asyncpg.Pool, tenant_id: str | None, since: dt.datetime | None, before_id: int | None,
               limit: int) -> list[dict]:
    """The newest entries first: of one tenant, or of all (``tenant_id`` None)."""
    rows = await pool.fetch(_READ, tenant_id, since, before_id, limit)
    return [{"object": "audit_entry", "id": row["id"], "created_at": row["created_at"].isoformat(),
             "actor": {"name": row["actor"], "role": row["actor_role"], "tenant": row["actor_tenant"]},
             "action": row["action"], "tenant": row["tenant_id"], "target": row["target"], "status": row["status"],
             "before": json.loads(row["before"]) if row["before"] else None,
             "after": json.loads(row["after"]) if row["after"] else None} for row in rows]


def _text(value: object) -> str | None:
    return None if value is None else json.dumps(value, default=str)
