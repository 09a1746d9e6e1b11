"""Chunks' vectors in Qdrant, through qdrant-client: its embedded local mode in the data folder, or a Qdrant server
(``QDRANT_URL``, ``QDRANT_API_KEY``) through exactly the same calls.

One collection per embedding model (``gateway_chunks_<model>``, cosine distance). Every point carries its tenant,
store, file and chunk number, and every search, count and delete is filtered by the tenant first: a tenant's ids
never reach another's points, whatever it sends. Point ids are derived from (tenant, store, file, chunk), so
indexing a file again replaces its points rather than adding to them. The local mode is one process's: with
several workers or replicas, use a Qdrant server.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

_NAMESPACE = uuid.UUID("8a5f3c0e-4d8b-4f7e-9a53-6f1f0c2d7b11")


@dataclass
class Hit:
    file_id: str
    filename: str
    chunk: int
    text: str
    score: float
    store_id: str
    attributes: dict = field(default_factory=dict)  # the file's in its store (from the catalog)


def equal(**fields: str | None) -> list:
    """Qdrant conditions that each named payload field equals its value (fields given as None are left out)."""
    from qdrant_client import models

    return [models.FieldCondition(key=key, match=models.MatchValue(value=value))
            for key, value in fields.items() if value is not None]


class Vectors:
    def __init__(self, path: Path | None = None, url: str | None = None, api_key: str | None = None) -> None:
        self.path, self.url, self.api_key = path, url, api_key
        self.where = url or f"local:{path}"
        self._client = None
        self._ready: set[str] = set()

    @property
    def client(self):
        """qdrant-client, imported and opened on first use: a gateway that never retrieves never loads it."""
        if self._client is None:
            from qdrant_client import AsyncQdrantClient

            if self.url:
                self._client = AsyncQdrantClient(url=self.url, api_key=self.api_key, timeout=10)
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                self._client = AsyncQdrantClient(path=str(self.path))
        return self._client

    @staticmethod
    def collection(model: str) -> str:
        return "gateway_chunks_" + re.sub(r"[^a-z0-9_]+", "_", model.lower())

    async def _ensure(self, model: str, size: int) -> str:
        from qdrant_client import models

        name = self.collection(model)
        if name not in self._ready:
            if not await self.client.collection_exists(name):
                await self.client.create_collection(name, vectors_config=models.VectorParams(
                    size=size, distance=models.Distance.COSINE))
                if not self.where.startswith("local:"):  # the local mode has no payload indexes
                    for field in ("tenant_id", "store_id", "file_id"):
                        await self.client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD)
            self._ready.add(name)
        return name

    async def put(self, model: str, tenant_id: str, store_id: str, file_id: str, filename: str, texts: list[str],
                  vectors: np.ndarray, first: int = 0) -> None:
        from qdrant_client import models

        name = await self._ensure(model, vectors.shape[1])
        points = [models.PointStruct(id=str(uuid.uuid5(_NAMESPACE, f"{tenant_id}/{store_id}/{file_id}/{first + i}")),
                                     vector=vector.tolist(),
                                     payload={"tenant_id": tenant_id, "store_id": store_id, "file_id": file_id,
                                              "filename": filename, "chunk": first + i, "text": text})
                  for i, (text, vector) in enumerate(zip(texts, vectors))]
        await self.client.upsert(name, points=points, wait=True)

    async def search(self, model: str, tenant_id: str, store_ids: list[str], vector: np.ndarray,
                     limit: int, file_ids: list[str] | None = None, score_threshold: float | None = None) -> list[Hit]:
        """The nearest chunks of the tenant's stores (of these files only, when given), best first."""
        from qdrant_client import models

        name = self.collection(model)
        if not await self.client.collection_exists(name):
            return []
        must = [*equal(tenant_id=tenant_id), models.FieldCondition(key="store_id",
                                                                   match=models.MatchAny(any=store_ids))]
        if file_ids is not None:
            must.append(models.FieldCondition(key="file_id", match=models.MatchAny(any=file_ids)))
        found = await self.client.query_points(
            name, query=vector.tolist(), limit=limit, with_payload=True, score_threshold=score_threshold,
            query_filter=models.Filter(must=must))
        return [Hit(p.payload["file_id"], p.payload["filename"], p.payload["chunk"], p.payload["text"],
                    float(p.score), p.payload["store_id"]) for p in found.points]

    async def delete(self, model: str, tenant_id: str, store_id: str | None = None, file_id: str | None = None) -> None:
        """Every point of the tenant's store, or file (in one store, or in all), or both."""
        from qdrant_client import models

        name = self.collection(model)
        if not await self.client.collection_exists(name):
            return
        must = equal(tenant_id=tenant_id, store_id=store_id, file_id=file_id)
        await self.client.delete(name, points_selector=models.FilterSelector(filter=models.Filter(must=must)),
                                 wait=True)

    async def owners(self, model: str) -> set[tuple[str, str, str]]:
        """(tenant, store, file) of every point in the model's collection, read page by page without vectors."""
        name = self.collection(model)
        if not await self.client.collection_exists(name):
            return set()
        found: set[tuple[str, str, str]] = set()
        offset = None
        while True:
            points, offset = await self.client.scroll(name, limit=1024, offset=offset, with_vectors=False,
                                                      with_payload=["tenant_id", "store_id", "file_id"])
            found.update((p.payload["tenant_id"], p.payload["store_id"], p.payload["file_id"]) for p in points)
            if offset is None:
                return found

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
