"""Tenant-scoped retrieval: files chunked and embedded off the request path into a tenant's vector stores, and
searched by meaning.

A file attached to a store is ``in_progress`` until a background job has read it, cut it into chunks, embedded
them with the retrieval embedding model (billed to the tenant, through the gateway's own pipeline) and written
them to Qdrant; then ``completed``, or ``failed`` with the reason (its partial vectors removed). Jobs are claimed
in PostgreSQL: a job a stopped gateway left is taken up again when that gateway starts again (with Qdrant's local
mode there is only one), or by any gateway once its claim is ten minutes old (with a Qdrant server).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from gateway.errors import GatewayError
from gateway.retrieval import documents
from gateway.retrieval.catalog import Catalog
from gateway.retrieval.vectors import Hit, Vectors

if TYPE_CHECKING:
    import numpy as np

    from gateway.config.types import ApiKey, Tenant
    from gateway.retrieval.calls import InternalCalls

log = logging.getLogger("gateway.retrieval")

EMBED_BATCH = 32  # chunks per embedding request
STALE_CLAIM_SECONDS = 600  # a job claimed longer ago than this by a gateway that stopped is taken up again


class Retrieval:
    def __init__(self, catalog: Catalog, vectors: Vectors, calls: "InternalCalls", model: str,
                 config) -> None:
        self.catalog = catalog
        self.vectors = vectors
        self.calls = calls
        self.model = model  # the embedding model of every store
        self._config = config  # the current GatewayConfig, for the tenant and key of a job
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._jobs: set[asyncio.Task] = set()

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        await self.vectors.close()

    # -- indexing ----------------------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def _work(self) -> None:
        # With the local mode this process is the only indexer: every job still in progress at its start is its own.
        stale_after = 0.0 if self.vectors.url is None else STALE_CLAIM_SECONDS
        while True:
            try:
                for job in await self.catalog.claim(stale_after):
                    task = asyncio.create_task(self._index(job["tenant_id"], job["store_id"], job["file_id"]))
                    self._jobs.add(task)
                    task.add_done_callback(self._jobs.discard)
            except Exception as exc:  # PostgreSQL away: try again soon
                log.warning("retrieval jobs cannot be read now: %s", exc)
            stale_after = STALE_CLAIM_SECONDS
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _index(self, tenant_id: str, store_id: str, file_id: str) -> None:
        started = time.perf_counter()
        tenant = self._config().tenants.get(tenant_id)
        try:
            if tenant is None:
                raise documents.Unreadable("the tenant no longer exists")
            found = await self.catalog.file(tenant_id, file_id, with_content=True)
            if found is None:
                return  # deleted meanwhile: its link went with it
            kind = documents.kind_of(found["filename"]) or "text"
            text = await asyncio.to_thread(documents.text_of, found["content"], kind)
            chunks = documents.chunks_of(text)
            key = _job_key(tenant)
            for start in range(0, len(chunks), EMBED_BATCH):
                batch = chunks[start:start + EMBED_BATCH]
                vectors = await self.calls.embed(tenant, key, self.model, batch)
                await self.vectors.put(self.model, tenant_id, store_id, file_id, found["filename"], batch, vectors,
                                       first=start)
        except asyncio.CancelledError:
            raise  # the gateway is stopping: the job is claimed again by the next one
        except (documents.Unreadable, GatewayError) as exc:
            await self._failed(tenant_id, store_id, file_id, str(exc) if isinstance(exc, documents.Unreadable)
                               else f"embedding failed: {exc.message}")
            return
        except Exception as exc:
            log.exception("indexing file %s of tenant %s failed", file_id, tenant_id)
            await self._failed(tenant_id, store_id, file_id, f"indexing failed: {type(exc).__name__}")
            return
        await self.catalog.finish(tenant_id, store_id, file_id, "completed", len(chunks), None)
        log.info("file %s of tenant %s indexed into %s: %d chunks in %.1fs", file_id, tenant_id, store_id,
                 len(chunks), time.perf_counter() - started)

    async def _failed(self, tenant_id: str, store_id: str, file_id: str, reason: str) -> None:
        await self.vectors.delete(self.model, tenant_id, store_id=store_id, file_id=file_id)  # nothing half-indexed
        await self.catalog.finish(tenant_id, store_id, file_id, "failed", 0, reason[:1000])

    # -- what the API does ---------------------------------------------------------------------------------------

    async def attach(self, tenant_id: str, store_id: str, file_id: str) -> dict:
        link = await self.catalog.attach(tenant_id, store_id, file_id)
        self.wake()
        return link

    async def detach(self, tenant_id: str, store_id: str, file_id: str) -> bool:
        if not await self.catalog.detach(tenant_id, store_id, file_id):
            return False
        await self.vectors.delete(self.model, tenant_id, store_id=store_id, file_id=file_id)
        return True

    async def delete_file(self, tenant_id: str, file_id: str) -> bool:
        stores = await self.catalog.delete_file(tenant_id, file_id)
        if stores is None:
            return False
        await self.vectors.delete(self.model, tenant_id, file_id=file_id)
        return True

    async def delete_store(self, tenant_id: str, store_id: str) -> bool:
        if not await self.catalog.delete_store(tenant_id, store_id):
            return False
        await self.vectors.delete(self.model, tenant_id, store_id=store_id)
        return True

    async def forget_tenant(self, tenant_id: str) -> None:
        """Every file, store and vector of the tenant: its id is about to start a new tenant."""
        await self.catalog.forget_tenant(tenant_id)
        await self.vectors.delete(self.model, tenant_id)

    async def owned_store(self, tenant_id: str, store_id: str, param: str | None = None) -> dict:
        """The tenant's store of that id; a 404 if it has none (another tenant's is none of its)."""
        store = await self.catalog.store(tenant_id, store_id)
        if store is None:
            raise GatewayError(404, f"No vector store found with id '{store_id}'.", type="not_found_error",
                               param=param, code="vector_store_not_found")
        return store

    async def searchable_store(self, tenant_id: str, store_id: str, param: str | None = None) -> dict:
        """``owned_store``, and a 409 while files are still being indexed into it: its answers would change under
        the caller."""
        store = await self.owned_store(tenant_id, store_id, param)
        waiting = store["file_counts"]["in_progress"]
        if waiting:
            raise GatewayError(409, f"Vector store '{store_id}' is still indexing {waiting} file(s); search it when "
                                    f"its status is 'completed'.", code="vector_store_indexing")
        return store

    async def search(self, tenant: "Tenant", key: "ApiKey", store_ids: list[str], query: str,
                     limit: int) -> list[Hit]:
        """The ``limit`` chunks nearest to ``query`` in the tenant's stores (checked by ``searchable_store``)."""
        vector: np.ndarray = (await self.calls.embed(tenant, key, self.model, [query]))[0]
        return await self.vectors.search(self.model, tenant.id, store_ids, vector, limit)


def _job_key(tenant: "Tenant") -> "ApiKey":
    """The key a job's embeddings are made under: the tenant's limits and budget apply, and its ledger rows say
    ``key_name: retrieval``."""
    from gateway.config.types import ApiKey

    return ApiKey(tenant_id=tenant.id, name="retrieval", expires_at=None)
