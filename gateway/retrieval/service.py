"""Tenant-scoped retrieval: files chunked and embedded off the request path into a tenant's vector stores, and
searched by meaning.

A file attached to a store is ``in_progress`` until a background job has read it, cut it into chunks, embedded
them with the retrieval embedding model (billed to the tenant, through the gateway's own pipeline) and written
them to Qdrant; then ``completed``, or ``failed`` with the reason (its partial vectors removed).

Indexing is a fair job. At most ``concurrency`` files are indexed at once per gateway, claimed in PostgreSQL each
tenant's oldest waiting file first; a job's progress is written after every batch (the file shows it, and a job
taken up again after a stop resumes there). The tenant's limits pace it: a 429 is waited out and the batch sent
again, an embedding 5xx or timeout is retried with backoff, and only a file that can never be indexed (no text,
a chunk larger than the tenant's tokens per minute) fails.

Deletion is final. A delete removes the file's link first, then stops its job in this gateway, then its vectors
(and once more a little later, for a write that was already on its way to Qdrant). A job checks before every
embedding and before and after every write that its file is still waiting in its store; a job that finds it gone
(a delete served by another replica) removes what it wrote and stops. Search answers only with chunks of files
the catalog lists as indexed in the store, and a start removes the vectors of files no store holds any more (a
crash between a delete and its vectors' removal). Jobs a stopped gateway left are claimed again by the next start
(with Qdrant's local mode there is only one), or by any gateway once their claim is ten minutes old.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Callable, Protocol

from gateway.errors import GatewayError
from gateway.retrieval import documents
from gateway.retrieval.catalog import Catalog
from gateway.retrieval.vectors import Hit, Vectors

if TYPE_CHECKING:
    import numpy as np

    from gateway.config.types import ApiKey, Tenant

log = logging.getLogger("gateway.retrieval")

EMBED_BATCH = 8  # chunks per embedding request: about a second of the model, so that a search waits little behind one
STALE_CLAIM_SECONDS = 600  # a job claimed longer ago than this by a gateway that stopped is taken up again
RETRIES = 6  # an embedding 5xx or timeout is sent again this many times, with backoff, before the file fails
MAX_WAIT_SECONDS = 300.0  # the longest a job waits for the tenant's limits at once
SWEEP_AFTER_SECONDS = 10.0  # a deleted file's vectors are removed again this long after the delete
SEARCH_SPARE = 8  # hits read beyond the limit, for those of files deleted a moment ago
EXPIRY_CHECK_SECONDS = 60.0  # how often stores past their expires_after are looked for


class _Gone(Exception):
    """The file left its store (deleted, taken out, or its store deleted) while it was being indexed."""


class _TooLarge(Exception):
    """The batch needs more tokens than the tenant's limit allows at all."""


Key = tuple[str, str, str]  # (tenant, store, file): one indexing job


class EmbeddingCalls(Protocol):
    """The gateway's own embeddings requests for a tenant (``gateway.pipeline.internal.InternalCalls``)."""

    async def embed(self, tenant: "Tenant", api_key: "ApiKey", model: str, texts: list[str]) -> "np.ndarray": ...


class Retrieval:
    def __init__(self, catalog: Catalog, vectors: Vectors, calls: EmbeddingCalls, model: str,
                 config, concurrency: int = 2) -> None:
        self.catalog = catalog
        self.vectors = vectors
        self.calls = calls
        self.model = model  # the embedding model of every store
        self._config = config  # the current GatewayConfig, for the tenant and key of a job
        self.concurrency = concurrency
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._running: dict[Key, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()  # the start's reconciliation, sweeps after deletes

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work())
        self._in_background(self.reconcile())

    async def close(self) -> None:
        """Stop at once: jobs are cancelled where they are (their progress is kept) and released for the next
        start; nothing waits for an embedding under way."""
        if self._worker is not None:
            self._worker.cancel()
        jobs = dict(self._running)
        for task in [*jobs.values(), *self._background]:
            task.cancel()
        await asyncio.gather(*jobs.values(), *self._background, return_exceptions=True)
        if jobs:
            try:
                await asyncio.wait_for(self.catalog.release(list(jobs)), timeout=5)
            except Exception as exc:  # PostgreSQL away: the claims go stale and are taken up all the same
                log.warning("indexing jobs cannot be released now: %s", exc)
        await self.vectors.close()

    def _in_background(self, work) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- indexing ----------------------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def _work(self) -> None:
        if self.vectors.url is None:  # the local mode: this process is the only indexer, every claim is its own
            try:
                await self.catalog.release(None)
            except Exception as exc:
                log.warning("retrieval jobs cannot be read now: %s", exc)
        expiry_checked = 0.0
        while True:
            if time.monotonic() - expiry_checked > EXPIRY_CHECK_SECONDS:
                expiry_checked = time.monotonic()
                try:
                    await self.expire_stores()
                except Exception as exc:
                    log.warning("expired vector stores cannot be deleted now: %s", exc)
            free = self.concurrency - len(self._running)
            if free > 0:
                try:
                    for job in await self.catalog.claim(STALE_CLAIM_SECONDS, free):
                        self._launch(job)
                except Exception as exc:  # PostgreSQL away: try again soon
                    log.warning("retrieval jobs cannot be read now: %s", exc)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _launch(self, job: dict) -> None:
        key = (job["tenant_id"], job["store_id"], job["file_id"])
        task = asyncio.create_task(self._index(*key, job.get("chunks_done") or 0))
        self._running[key] = task

        def finished(_: asyncio.Task) -> None:
            if self._running.get(key) is task:
                del self._running[key]
            self.wake()  # a slot is free

        task.add_done_callback(finished)

    async def _index(self, tenant_id: str, store_id: str, file_id: str, resume_from: int = 0) -> None:
        started = time.perf_counter()
        tenant = self._config().tenants.get(tenant_id)
        try:
            if tenant is None:
                raise documents.Unreadable("the tenant no longer exists")
            found = await self.catalog.file(tenant_id, file_id, with_content=True)
            if found is None:
                return  # deleted meanwhile: its link went with it
            filename = found["filename"]
            text = await asyncio.to_thread(documents.text_of, found["content"], documents.kind_of(filename) or "text")
            chunks = await asyncio.to_thread(documents.chunks_of, text)
            del found, text
            total, done, size = len(chunks), min(resume_from, len(chunks)), EMBED_BATCH
            key = _job_key(tenant)
            await self._still_waiting(tenant_id, store_id, file_id, done, total)
            while done < total:
                batch = chunks[done:done + size]
                try:
                    vectors = await self._embed(tenant, key, batch, (tenant_id, store_id, file_id), done, total)
                except _TooLarge:
                    if size == 1:
                        raise documents.Unreadable("a chunk of it needs more tokens than the tenant's limits allow "
                                                   "in one request: it can never be indexed") from None
                    size = max(1, size // 2)
                    continue
                await self._still_waiting(tenant_id, store_id, file_id, done, total)  # before the write
                await self.vectors.put(self.model, tenant_id, store_id, file_id, filename, batch, vectors,
                                       first=done)
                done += len(batch)
                await self._still_waiting(tenant_id, store_id, file_id, done, total)  # a delete during the write
        except asyncio.CancelledError:
            raise  # the gateway is stopping, or a delete stopped it
        except _Gone:
            await self._remove_vectors(tenant_id, store_id, file_id)
            log.info("indexing of file %s of tenant %s into %s stopped: it left the store", file_id, tenant_id,
                     store_id)
            return
        except (documents.Unreadable, GatewayError) as exc:
            await self._failed(tenant_id, store_id, file_id, str(exc) if isinstance(exc, documents.Unreadable)
                               else f"embedding failed: {exc.message}")
            return
        except Exception as exc:
            log.exception("indexing file %s of tenant %s failed", file_id, tenant_id)
            await self._failed(tenant_id, store_id, file_id, f"indexing failed: {type(exc).__name__}")
            return
        if not await self.catalog.finish(tenant_id, store_id, file_id, "completed", total, None):
            await self._remove_vectors(tenant_id, store_id, file_id)  # deleted at the very end
            return
        log.info("file %s of tenant %s indexed into %s: %d chunks in %.1fs", file_id, tenant_id, store_id,
                 total, time.perf_counter() - started)

    async def _still_waiting(self, tenant_id: str, store_id: str, file_id: str, done: int, total: int) -> None:
        if not await self.catalog.progress(tenant_id, store_id, file_id, done, total):
            raise _Gone

    async def _embed(self, tenant: "Tenant", key: "ApiKey", batch: list[str], job: Key, done: int,
                     total: int) -> "np.ndarray":
        """The batch's vectors: the tenant's limits waited out, a failing embedding model retried with backoff."""
        failures = 0
        while True:
            await self._still_waiting(*job, done, total)  # nothing is embedded, nor billed, for a deleted file
            try:
                return await self.calls.embed(tenant, key, self.model, batch)
            except GatewayError as error:
                if error.status == 429 and error.code in ("rate_limit_exceeded", "concurrency_limit_exceeded"):
                    if "Request too large" in error.message:
                        raise _TooLarge from None
                    if "No request can pass" in error.message:
                        raise
                    wait = _seconds(error.headers.get("retry-after"), 5.0)
                    log.info("indexing file %s of tenant %s waits %.1fs for the tenant's limits", job[2], job[0],
                             wait)
                    await asyncio.sleep(wait)
                    continue
                if error.status < 500 and error.status != 408:
                    raise
                failures += 1
                if failures > RETRIES:
                    raise
                wait = min(60.0, 2.0 ** failures) * random.uniform(0.5, 1.0)
                log.warning("indexing file %s of tenant %s: embedding failed (%s), trying again in %.1fs", job[2],
                            job[0], error.message, wait)
                await asyncio.sleep(wait)

    async def _failed(self, tenant_id: str, store_id: str, file_id: str, reason: str) -> None:
        await self.vectors.delete(self.model, tenant_id, store_id=store_id, file_id=file_id)  # nothing half-indexed
        await self.catalog.finish(tenant_id, store_id, file_id, "failed", 0, reason[:1000])

    async def _stop_jobs(self, matches: Callable[[Key], bool]) -> None:
        """Cancel this gateway's jobs of what was just deleted, and wait for them to end."""
        stopping = [task for key, task in self._running.items() if matches(key)]
        for task in stopping:
            task.cancel()
        if stopping:
            await asyncio.wait(stopping, timeout=10)

    async def _remove_vectors(self, tenant_id: str, store_id: str | None = None, file_id: str | None = None) -> None:
        """Delete the vectors now, and once more after a while: a write already on its way to Qdrant when the delete
        came lands after it."""
        await self.vectors.delete(self.model, tenant_id, store_id=store_id, file_id=file_id)

        async def sweep() -> None:
            await asyncio.sleep(SWEEP_AFTER_SECONDS)
            try:
                await self.vectors.delete(self.model, tenant_id, store_id=store_id, file_id=file_id)
            except Exception as exc:  # the next start's reconciliation removes them
                log.warning("deleted vectors of tenant %s cannot be swept now: %s", tenant_id, exc)

        self._in_background(sweep())

    async def reconcile(self) -> None:
        """Remove the vectors of files no store holds any more (a crash between a delete and the removal of its
        vectors). Qdrant is read before the catalog: a file put in a store after the read has no vectors in it."""
        if self.vectors.url is None and not self.vectors.path.exists():
            return  # nothing was ever indexed here (and qdrant-client stays unloaded)
        try:
            owners = await self.vectors.owners(self.model)
            orphans = owners - await self.catalog.all_links()
            for tenant_id, store_id, file_id in orphans:
                await self.vectors.delete(self.model, tenant_id, store_id=store_id, file_id=file_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("vectors cannot be reconciled with the catalog now: %s", exc)
            return
        if orphans:
            log.info("removed the vectors of %d deleted files", len(orphans))

    # -- what the API does ---------------------------------------------------------------------------------------

    async def attach(self, tenant_id: str, store_id: str, file_id: str, attributes: dict | None = None,
                     batch_id: str | None = None) -> dict:
        link = await self.catalog.attach(tenant_id, store_id, file_id, attributes, batch_id)
        self.wake()
        return link

    async def detach(self, tenant_id: str, store_id: str, file_id: str) -> bool:
        if not await self.catalog.detach(tenant_id, store_id, file_id):
            return False
        await self._stop_jobs(lambda job: job == (tenant_id, store_id, file_id))
        await self._remove_vectors(tenant_id, store_id=store_id, file_id=file_id)
        return True

    async def delete_file(self, tenant_id: str, file_id: str) -> bool:
        stores = await self.catalog.delete_file(tenant_id, file_id)
        if stores is None:
            return False
        await self._stop_jobs(lambda job: job[0] == tenant_id and job[2] == file_id)
        await self._remove_vectors(tenant_id, file_id=file_id)
        return True

    async def delete_store(self, tenant_id: str, store_id: str) -> bool:
        if not await self.catalog.delete_store(tenant_id, store_id):
            return False
        await self._stop_jobs(lambda job: job[0] == tenant_id and job[1] == store_id)
        await self._remove_vectors(tenant_id, store_id=store_id)
        return True

    async def forget_tenant(self, tenant_id: str) -> None:
        """Every file, store and vector of the tenant: its id is about to start a new tenant."""
        await self.catalog.forget_tenant(tenant_id)
        await self._stop_jobs(lambda job: job[0] == tenant_id)
        await self._remove_vectors(tenant_id)

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

    async def search(self, tenant: "Tenant", key: "ApiKey", store_ids: list[str], query: str | list[str],
                     limit: int, filters: dict | None = None, score_threshold: float | None = None) -> list[Hit]:
        """The ``limit`` chunks nearest to ``query`` (to any of several queries) in the tenant's stores (checked by
        ``searchable_store``), of files whose attributes pass ``filters``, scoring ``score_threshold`` or more.

        Only files the catalog lists as indexed are searched: never a chunk of a file deleted a moment ago."""
        queries = [query] if isinstance(query, str) else query
        vectors: np.ndarray = await self.calls.embed(tenant, key, self.model, queries)
        indexed = await self.catalog.searchable_files(tenant.id, store_ids)
        allowed = {pair: attributes for pair, attributes in indexed.items()
                   if filters is None or matches(filters, attributes)}
        await self.catalog.touch(tenant.id, store_ids)
        if not allowed:
            return []
        files = sorted({file for _, file in allowed})
        best: dict[tuple[str, str, int], Hit] = {}
        for vector in vectors:
            for hit in await self.vectors.search(self.model, tenant.id, store_ids, vector, limit + SEARCH_SPARE,
                                                 files, score_threshold):
                attributes = allowed.get((hit.store_id, hit.file_id))
                if attributes is None:  # deleted a moment ago, or left out by the filters in another store
                    continue
                key_ = (hit.store_id, hit.file_id, hit.chunk)
                if key_ not in best or hit.score > best[key_].score:
                    hit.attributes = attributes
                    best[key_] = hit
        return sorted(best.values(), key=lambda hit: -hit.score)[:limit]

    async def cancel_batch(self, tenant_id: str, store_id: str, batch_id: str) -> None:
        """Stop the batch's files still waiting: marked ``cancelled``, their jobs stopped, their vectors removed."""
        for file_id in await self.catalog.cancel_batch(tenant_id, store_id, batch_id):
            await self._stop_jobs(lambda job, file_id=file_id: job == (tenant_id, store_id, file_id))
            await self._remove_vectors(tenant_id, store_id=store_id, file_id=file_id)

    async def expire_stores(self) -> None:
        """Delete the stores whose ``expires_after`` has run out, as a DELETE would."""
        for tenant_id, store_id in await self.catalog.expired():
            if await self.delete_store(tenant_id, store_id):
                log.info("vector store %s of tenant %s expired and was deleted", store_id, tenant_id)


def matches(condition: dict, attributes: dict) -> bool:
    """Whether a file's attributes pass an OpenAI search filter (a comparison, or an and/or of filters)."""
    kind = condition["type"]
    if kind in ("and", "or"):
        results = (matches(part, attributes) for part in condition["filters"])
        return all(results) if kind == "and" else any(results)
    value, wanted = attributes.get(condition["key"]), condition["value"]
    if kind in ("eq", "ne"):  # true is not 1, nor "1" 1
        equal_ = value == wanted and isinstance(value, bool) == isinstance(wanted, bool)
        return equal_ if kind == "eq" else not equal_
    if not (_number(value) and _number(wanted)):
        return False
    return {"gt": value > wanted, "gte": value >= wanted, "lt": value < wanted, "lte": value <= wanted}[kind]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds(value: str | None, default: float) -> float:
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        seconds = default
    return min(MAX_WAIT_SECONDS, max(0.5, seconds))


def _job_key(tenant: "Tenant") -> "ApiKey":
    """The key a job's embeddings are made under: the tenant's limits and budget apply, and its ledger rows say
    ``key_name: retrieval``."""
    from gateway.config.types import ApiKey

    return ApiKey(tenant_id=tenant.id, name="retrieval", expires_at=None)
