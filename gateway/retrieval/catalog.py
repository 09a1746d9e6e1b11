"""Tenants' files and vector stores in PostgreSQL. Every query names the tenant: an id of another tenant is simply
not found."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from dataclasses import dataclass



def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def _seconds(value: dt.datetime) -> int:
    return int(value.timestamp())


@dataclass(frozen=True)
class Page:
    """One page of a list as OpenAI's list routes take it: ``limit`` objects in ``order`` of creation ("desc":
    newest first), those after the object ``after`` or, with ``before``, the ones just before that object."""

    limit: int
    order: str = "desc"
    after: str | None = None
    before: str | None = None

    @property
    def cursor(self) -> str | None:
        return self.before if self.before is not None else self.after

    @property
    def _reading_back(self) -> bool:  # "before" reads from the cursor backwards, then turns the page round
        return self.before is not None

    @property
    def beyond(self) -> str:
        """How a row's (created_at, id) compares with the cursor's to be on this page."""
        return ">" if (self.order == "asc") != self._reading_back else "<"

    @property
    def direction(self) -> str:
        return "ASC" if (self.order == "asc") != self._reading_back else "DESC"

    def cut(self, rows: list[dict]) -> tuple[list[dict], bool]:
        """The page's rows in its order, from ``limit`` + 1 read, and whether there are more."""
        more = len(rows) > self.limit
        rows = rows[:self.limit]
        return (rows[::-1] if self._reading_back else rows), more


class Catalog:
    def __init__(self, pool, indexer: str | None = None) -> None:
        self._pool = pool  # an async callable giving the asyncpg pool
        # Where this gateway's vectors live (a Qdrant server's URL, or a local folder): a file put in a store here is
        # indexed only by gateways that write to the same place, so that its vectors land where its searches look.
        self.indexer = indexer

    # files

    async def add_file(self, tenant_id: str, filename: str, purpose: str, content: bytes) -> dict:
        file_id = new_id("file-")
        pool = await self._pool()
        row = await pool.fetchrow(
            "INSERT INTO retrieval_files (tenant_id, id, filename, purpose, bytes, content) VALUES ($1, $2, $3, $4, "
            "$5, $6) RETURNING id, filename, purpose, bytes, created_at", tenant_id, file_id, filename, purpose,
            len(content), content)
        return file_view(row)

    async def files(self, tenant_id: str, page: "Page", purpose: str | None = None) -> tuple[list[dict], bool]:
        pool = await self._pool()
        rows = await pool.fetch(
            "SELECT id, filename, purpose, bytes, created_at FROM retrieval_files WHERE tenant_id = $1 AND ($4::text "
            "IS NULL OR purpose = $4) AND ($2::text IS NULL OR (created_at, id) "
            f"{page.beyond} (SELECT created_at, id FROM retrieval_files WHERE tenant_id = $1 AND id = $2)) "
            f"ORDER BY created_at {page.direction}, id {page.direction} LIMIT $3",
            tenant_id, page.cursor, page.limit + 1, purpose)
        return page.cut([file_view(row) for row in rows])

    async def file(self, tenant_id: str, file_id: str, with_content: bool = False) -> dict | None:
        pool = await self._pool()
        row = await pool.fetchrow(
            "SELECT id, filename, purpose, bytes, created_at" + (", content" if with_content else "") +
            " FROM retrieval_files WHERE tenant_id = $1 AND id = $2", tenant_id, file_id)
        if row is None:
            return None
        view = file_view(row)
        if with_content:
            view["content"] = bytes(row["content"])
        return view

    async def delete_file(self, tenant_id: str, file_id: str) -> list[str] | None:
        """The stores the file was in (its links go with it); None if there is no such file."""
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction():
            stores = await connection.fetch("SELECT store_id FROM vector_store_files WHERE tenant_id = $1 AND "
                                            "file_id = $2", tenant_id, file_id)
            deleted = await connection.fetchval("DELETE FROM retrieval_files WHERE tenant_id = $1 AND id = $2 "
                                                "RETURNING id", tenant_id, file_id)
        return None if deleted is None else [row["store_id"] for row in stores]

    async def forget_tenant(self, tenant_id: str) -> None:
        """Every file and store of the tenant (the files in stores go with them)."""
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute("DELETE FROM vector_stores WHERE tenant_id = $1", tenant_id)
            await connection.execute("DELETE FROM retrieval_files WHERE tenant_id = $1", tenant_id)

    # stores

    async def add_store(self, tenant_id: str, name: str | None, metadata: dict | None,
                        expires_after_days: int | None = None) -> str:
        store_id = new_id("vs_")
        pool = await self._pool()
        await pool.execute("INSERT INTO vector_stores (tenant_id, id, name, metadata, expires_after_days) VALUES ($1, "
                           "$2, $3, $4, $5)", tenant_id, store_id, name,
                           None if metadata is None else json.dumps(metadata), expires_after_days)
        return store_id

    async def touch(self, tenant_id: str, store_ids: list[str]) -> None:
        """The stores were used (searched): an expiry anchored at their last activity starts again."""
        pool = await self._pool()
        await pool.execute("UPDATE vector_stores SET last_active_at = now() WHERE tenant_id = $1 AND id = "
                           "ANY($2::text[]) AND expires_after_days IS NOT NULL", tenant_id, store_ids)

    async def expired(self) -> list[tuple[str, str]]:
        """(tenant, store) of the stores whose time has run out."""
        pool = await self._pool()
        rows = await pool.fetch("SELECT tenant_id, id FROM vector_stores WHERE expires_after_days IS NOT NULL AND "
                                "last_active_at + make_interval(days => expires_after_days) < now()")
        return [(row["tenant_id"], row["id"]) for row in rows]

    async def store(self, tenant_id: str, store_id: str) -> dict | None:
        pool = await self._pool()
        row = await pool.fetchrow(_STORE + " WHERE s.tenant_id = $1 AND s.id = $2 GROUP BY s.tenant_id, s.id",
                                  tenant_id, store_id)
        return None if row is None else store_view(row)

    async def stores(self, tenant_id: str, page: "Page") -> tuple[list[dict], bool]:
        pool = await self._pool()
        rows = await pool.fetch(
            _STORE + f" WHERE s.tenant_id = $1 AND ($2::text IS NULL OR (s.created_at, s.id) {page.beyond} (SELECT "
            "created_at, id FROM vector_stores WHERE tenant_id = $1 AND id = $2)) GROUP BY s.tenant_id, s.id "
            f"ORDER BY s.created_at {page.direction}, s.id {page.direction} LIMIT $3",
            tenant_id, page.cursor, page.limit + 1)
        return page.cut([store_view(row) for row in rows])

    async def update_store(self, tenant_id: str, store_id: str, changes: dict) -> None:
        """Set the store's ``name``, ``metadata`` and/or ``expires_after_days`` (each only if in ``changes``; None
        clears it)."""
        pool = await self._pool()
        metadata = changes.get("metadata")
        await pool.execute(
            "UPDATE vector_stores SET name = CASE WHEN $3 THEN $4 ELSE name END, "
            "metadata = CASE WHEN $5 THEN $6::jsonb ELSE metadata END, "
            "expires_after_days = CASE WHEN $7 THEN $8 ELSE expires_after_days END, "
            "last_active_at = CASE WHEN $7 THEN now() ELSE last_active_at END WHERE tenant_id = $1 AND id = $2",
            tenant_id, store_id, "name" in changes, changes.get("name"), "metadata" in changes,
            None if metadata is None else json.dumps(metadata), "expires_after_days" in changes,
            changes.get("expires_after_days"))

    async def delete_store(self, tenant_id: str, store_id: str) -> bool:
        pool = await self._pool()
        return await pool.fetchval("DELETE FROM vector_stores WHERE tenant_id = $1 AND id = $2 RETURNING id",
                                   tenant_id, store_id) is not None

    # files in stores

    async def attach(self, tenant_id: str, store_id: str, file_id: str, attributes: dict | None = None,
                     batch_id: str | None = None) -> dict:
        pool = await self._pool()
        row = await pool.fetchrow(
            "INSERT INTO vector_store_files (tenant_id, store_id, file_id, status, indexer, attributes, batch_id) "
            "VALUES ($1, $2, $3, 'in_progress', $4, $5, $6) ON CONFLICT (tenant_id, store_id, file_id) DO UPDATE SET "
            "status = 'in_progress', last_error = NULL, claimed_at = NULL, chunks_done = 0, chunks_total = NULL, "
            "indexer = $4, attributes = $5, batch_id = $6, updated_at = now() RETURNING *", tenant_id, store_id,
            file_id, self.indexer, None if attributes is None else json.dumps(attributes), batch_id)
        return dict(row)

    async def set_attributes(self, tenant_id: str, store_id: str, file_id: str, attributes: dict | None) -> bool:
        pool = await self._pool()
        return await pool.fetchval(
            "UPDATE vector_store_files SET attributes = $4, updated_at = now() WHERE tenant_id = $1 AND store_id = $2 "
            "AND file_id = $3 RETURNING true", tenant_id, store_id, file_id,
            None if attributes is None else json.dumps(attributes)) is not None

    # file batches

    async def add_batch(self, tenant_id: str, store_id: str) -> str:
        batch_id = new_id("vsfb_")
        pool = await self._pool()
        await pool.execute("INSERT INTO vector_store_file_batches (tenant_id, store_id, id) VALUES ($1, $2, $3)",
                           tenant_id, store_id, batch_id)
        return batch_id

    async def batch(self, tenant_id: str, store_id: str, batch_id: str) -> dict | None:
        pool = await self._pool()
        row = await pool.fetchrow(
            "SELECT b.id, b.store_id, b.cancelled, b.created_at, count(l.file_id) AS total, "
            "count(l.file_id) FILTER (WHERE l.status = 'in_progress') AS in_progress, "
            "count(l.file_id) FILTER (WHERE l.status = 'completed') AS completed, "
            "count(l.file_id) FILTER (WHERE l.status = 'failed') AS failed, "
            "count(l.file_id) FILTER (WHERE l.status = 'cancelled') AS cancelled_files "
            "FROM vector_store_file_batches b LEFT JOIN vector_store_files l ON l.tenant_id = b.tenant_id AND "
            "l.store_id = b.store_id AND l.batch_id = b.id WHERE b.tenant_id = $1 AND b.store_id = $2 AND b.id = $3 "
            "GROUP BY b.tenant_id, b.id", tenant_id, store_id, batch_id)
        return None if row is None else batch_view(row)

    async def cancel_batch(self, tenant_id: str, store_id: str, batch_id: str) -> list[str]:
        """Mark the batch cancelled and its files still waiting ``cancelled``; the ids of those files."""
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute("UPDATE vector_store_file_batches SET cancelled = true WHERE tenant_id = $1 AND "
                                     "store_id = $2 AND id = $3", tenant_id, store_id, batch_id)
            rows = await connection.fetch(
                "UPDATE vector_store_files SET status = 'cancelled', updated_at = now() WHERE tenant_id = $1 AND "
                "store_id = $2 AND batch_id = $3 AND status = 'in_progress' RETURNING file_id",
                tenant_id, store_id, batch_id)
        return [row["file_id"] for row in rows]

    async def searchable_files(self, tenant_id: str, store_ids: list[str]) -> dict[tuple[str, str], dict]:
        """(store, file) -> attributes of every file indexed in these stores of the tenant."""
        pool = await self._pool()
        rows = await pool.fetch("SELECT store_id, file_id, attributes FROM vector_store_files WHERE tenant_id = $1 "
                                "AND store_id = ANY($2::text[]) AND status = 'completed'", tenant_id, store_ids)
        return {(row["store_id"], row["file_id"]): json.loads(row["attributes"]) if row["attributes"] else {}
                for row in rows}

    async def link(self, tenant_id: str, store_id: str, file_id: str) -> dict | None:
        pool = await self._pool()
        row = await pool.fetchrow(_LINK + " WHERE l.tenant_id = $1 AND l.store_id = $2 AND l.file_id = $3",
                                  tenant_id, store_id, file_id)
        return None if row is None else dict(row)

    async def links(self, tenant_id: str, store_id: str, status: str | None,
                    page: "Page", batch_id: str | None = None) -> tuple[list[dict], bool]:
        pool = await self._pool()
        rows = await pool.fetch(
            _LINK + " WHERE l.tenant_id = $1 AND l.store_id = $2 AND ($3::text IS NULL OR l.status = $3) AND ($4::text "
            f"IS NULL OR (l.created_at, l.file_id) {page.beyond} (SELECT created_at, file_id FROM vector_store_files "
            "WHERE tenant_id = $1 AND store_id = $2 AND file_id = $4)) AND ($6::text IS NULL OR l.batch_id = $6) "
            f"ORDER BY l.created_at {page.direction}, l.file_id {page.direction} LIMIT $5",
            tenant_id, store_id, status, page.cursor, page.limit + 1, batch_id)
        return page.cut([dict(row) for row in rows])

    async def detach(self, tenant_id: str, store_id: str, file_id: str) -> bool:
        pool = await self._pool()
        return await pool.fetchval("DELETE FROM vector_store_files WHERE tenant_id = $1 AND store_id = $2 AND "
                                   "file_id = $3 RETURNING file_id", tenant_id, store_id, file_id) is not None

    async def claim(self, older_than_seconds: float, most: int) -> list[dict]:
        """Up to ``most`` files waiting to be indexed that nobody works on (new, or claimed by a gateway that
        stopped), taken fairly: each tenant's oldest waiting file before any tenant's second."""
        pool = await self._pool()
        rows = await pool.fetch(
            "WITH waiting AS (SELECT tenant_id, store_id, file_id, row_number() OVER (PARTITION BY tenant_id "
            "ORDER BY created_at, file_id) AS turn, created_at FROM vector_store_files WHERE status = 'in_progress' "
            "AND (claimed_at IS NULL OR claimed_at < now() - make_interval(secs => $1)) AND (indexer IS NULL OR "
            "indexer = $3)), "
            "chosen AS (SELECT tenant_id, store_id, file_id FROM waiting ORDER BY turn, created_at LIMIT $2) "
            "UPDATE vector_store_files l SET claimed_at = now() FROM chosen c WHERE l.tenant_id = c.tenant_id AND "
            "l.store_id = c.store_id AND l.file_id = c.file_id AND l.status = 'in_progress' AND (l.claimed_at IS "
            "NULL OR l.claimed_at < now() - make_interval(secs => $1)) "
            "RETURNING l.tenant_id, l.store_id, l.file_id, l.chunks_done", older_than_seconds, most, self.indexer)
        return [dict(row) for row in rows]

    async def release(self, jobs: list[tuple[str, str, str]] | None) -> None:
        """Let these jobs (every job, when None) be claimed again at once: their gateway stopped them."""
        pool = await self._pool()
        if jobs is None:
            await pool.execute("UPDATE vector_store_files SET claimed_at = NULL WHERE status = 'in_progress' AND "
                               "indexer IS NOT DISTINCT FROM $1", self.indexer)
            return
        await pool.executemany("UPDATE vector_store_files SET claimed_at = NULL WHERE tenant_id = $1 AND store_id = $2 "
                               "AND file_id = $3 AND status = 'in_progress'", jobs)

    async def progress(self, tenant_id: str, store_id: str, file_id: str, done: int, total: int) -> bool:
        """Record how far a job is (and renew its claim); False once the file is no longer waiting in that store:
        deleted, taken out, or its store deleted. Every write of a job is checked against this."""
        pool = await self._pool()
        return await pool.fetchval(
            "UPDATE vector_store_files SET chunks_done = $4, chunks_total = $5, claimed_at = now(), updated_at = "
            "now() WHERE tenant_id = $1 AND store_id = $2 AND file_id = $3 AND status = 'in_progress' RETURNING "
            "true", tenant_id, store_id, file_id, done, total) is not None

    async def all_links(self) -> set[tuple[str, str, str]]:
        """(tenant, store, file) of every file in every store, for reconciling Qdrant with the catalog."""
        pool = await self._pool()
        rows = await pool.fetch("SELECT tenant_id, store_id, file_id FROM vector_store_files")
        return {(row["tenant_id"], row["store_id"], row["file_id"]) for row in rows}

    async def finish(self, tenant_id: str, store_id: str, file_id: str, status: str, chunks: int,
                     error: str | None) -> bool:
        """Mark a job done; False if the file was no longer waiting in that store (deleted meanwhile)."""
        pool = await self._pool()
        return await pool.fetchval(
            "UPDATE vector_store_files SET status = $4, chunks = $5, last_error = $6, updated_at = now() WHERE "
            "tenant_id = $1 AND store_id = $2 AND file_id = $3 AND status = 'in_progress' RETURNING true",
            tenant_id, store_id, file_id, status, chunks, error) is not None


_STORE = """
SELECT s.id, s.name, s.metadata, s.created_at, s.expires_after_days, s.last_active_at,
       count(l.file_id) AS total,
       count(l.file_id) FILTER (WHERE l.status = 'cancelled') AS cancelled,
       count(l.file_id) FILTER (WHERE l.status = 'in_progress') AS in_progress,
       count(l.file_id) FILTER (WHERE l.status = 'completed') AS completed,
       count(l.file_id) FILTER (WHERE l.status = 'failed') AS failed,
       coalesce(sum(f.bytes) FILTER (WHERE l.status = 'completed'), 0) AS usage_bytes,
       coalesce(sum(l.chunks_done) FILTER (WHERE l.status = 'in_progress'), 0) AS chunks_done,
       coalesce(sum(l.chunks_total) FILTER (WHERE l.status = 'in_progress'), 0) AS chunks_total
FROM vector_stores s
LEFT JOIN vector_store_files l ON l.tenant_id = s.tenant_id AND l.store_id = s.id
LEFT JOIN retrieval_files f ON f.tenant_id = l.tenant_id AND f.id = l.file_id
"""
_LINK = """
SELECT l.store_id, l.file_id, l.status, l.last_error, l.chunks, l.chunks_done, l.chunks_total, l.created_at, f.bytes,
       f.filename, l.attributes
FROM vector_store_files l JOIN retrieval_files f ON f.tenant_id = l.tenant_id AND f.id = l.file_id
"""


def file_view(row) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": _seconds(row["created_at"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed"}


def store_view(row) -> dict:
    counts = {"in_progress": row["in_progress"], "completed": row["completed"], "failed": row["failed"],
              "cancelled": row["cancelled"], "total": row["total"]}
    days = row["expires_after_days"]
    expiry = {"expires_after": {"anchor": "last_active_at", "days": days},
              "expires_at": _seconds(row["last_active_at"] + dt.timedelta(days=days))} if days else {}
    return {"id": row["id"], "object": "vector_store", "created_at": _seconds(row["created_at"]),
            "last_active_at": _seconds(row["last_active_at"]), **expiry,
            "name": row["name"], "usage_bytes": int(row["usage_bytes"]), "file_counts": counts,
            "status": "in_progress" if row["in_progress"] else "completed",
            "progress": {"chunks_done": int(row["chunks_done"]), "chunks_total": int(row["chunks_total"])},
            "metadata": json.loads(row["metadata"]) if row["metadata"] else {}}


def link_view(row: dict) -> dict:
    error = {"code": "server_error" if row["last_error"] and row["last_error"].startswith("embedding") else
             "invalid_file", "message": row["last_error"]} if row["status"] == "failed" else None
    return {"id": row["file_id"], "object": "vector_store.file", "vector_store_id": row["store_id"],
            "status": row["status"], "created_at": _seconds(row["created_at"]), "usage_bytes": row["bytes"],
            "last_error": error, "chunks": row["chunks"],
            "attributes": json.loads(row["attributes"]) if row.get("attributes") else {},
            "progress": {"chunks_done": row["chunks_done"], "chunks_total": row["chunks_total"]}}


def batch_view(row) -> dict:
    counts = {"in_progress": row["in_progress"], "completed": row["completed"], "failed": row["failed"],
              "cancelled": row["cancelled_files"], "total": row["total"]}
    status = ("cancelled" if row["cancelled"] else "in_progress" if row["in_progress"] else
              "failed" if row["total"] and row["failed"] == row["total"] else "completed")
    return {"id": row["id"], "object": "vector_store.files_batch", "created_at": _seconds(row["created_at"]),
            "vector_store_id": row["store_id"], "status": status, "file_counts": counts}
