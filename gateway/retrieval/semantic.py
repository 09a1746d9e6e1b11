"""The semantic cache's index: the questions of answered chats as vectors in Qdrant, each pointing at its answer in
the exact cache (Redis).

Closeness of vectors alone cannot tell "Celsius to Fahrenheit" from "Fahrenheit to Celsius", or "open on Monday"
from "open on Tuesday" (0.995 and 0.956 with this model). So a hit also needs ``same_ask``: the two questions may
differ in how they are put (words added or left out) but not by one word standing in for another, by another
number, or by the same words in another order. Measured on the pairs of ``gateway bench semantic`` (README).

A chat's question is its last user message; everything else about the request (the model asked for, the other
messages, the sampling parameters, stream or not) must be identical, so it is hashed into a ``context`` that a
hit must share, with the tenant. The vectors come from the embedded model, in the gateway (nothing billed, about
6 ms a question); an answer's entry lives as long as its exact-cache entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING

from gateway.retrieval.vectors import equal

if TYPE_CHECKING:
    import numpy as np

    from gateway.retrieval.vectors import Vectors

log = logging.getLogger("gateway.cache")

COLLECTION = "gateway_semantic_cache"
_WORD = re.compile(r"[a-z0-9%]+")
_DIRECTION = re.compile(r"\b(to|from|into|than|versus|vs)\b")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_FUNCTION_WORDS = frozenset(
    "a an the of to in on at for from by with and or is are was were be been do does did how what which who whom "
    "when where why can could would should will i my me you your we our it its this that these those there their "
    "them am has have had any some into as about please tell give explain s".split())
_NAMESPACE = uuid.UUID("1f0e9f4c-23c5-4a5e-8e0f-1b6f2a8c9d01")


def content_words(text: str) -> list[str]:
    """The words that carry a question's meaning, in order, lower case, a plural's s dropped."""
    words = []
    for word in _WORD.findall(text.lower()):
        if word in _FUNCTION_WORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        words.append(word)
    return words


def same_ask(first: str, second: str) -> bool:
    """Whether two questions close in meaning may share an answer: no other number, no word standing in for
    another (each has a meaningful word the other lacks), not the same words in another order around "to", "from",
    "than"... ("Celsius to Fahrenheit")."""
    if sorted(_NUMBER.findall(first)) != sorted(_NUMBER.findall(second)):
        return False
    a, b = content_words(first), content_words(second)
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if only_a and only_b:
        return False
    if not only_a and not only_b and a != b:  # the same words in another order: fine, unless they say a direction
        return not (_DIRECTION.search(first.lower()) or _DIRECTION.search(second.lower()))
    return True


def question_and_context(body: dict, encode) -> tuple[str, str] | None:
    """The last user message's text, and a hash of everything else in the request; None if it has none."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if not isinstance(content, str) or not content.strip():
                return None
            rest = {**body, "messages": [*messages[:index], {**message, "content": None}, *messages[index + 1:]]}
            rest.pop("user", None)
            rest.pop("stream_options", None)
            return content, hashlib.sha256(encode(rest)).hexdigest()
    return None


class SemanticIndex:
    def __init__(self, vectors: Vectors) -> None:
        self.vectors = vectors
        self._ready = False
        self._unavailable = False

    async def embed(self, question: str) -> np.ndarray | None:
        """The question's vector; None when the embedded model is not installed (the cache is then exact only)."""
        from gateway.retrieval.minilm import ModelMissing, model  # numpy, loaded when the cache first needs it

        if self._unavailable:
            return None
        try:
            vectors, _ = await asyncio.to_thread(lambda: model().embed([question]))
        except ModelMissing as exc:
            self._unavailable = True
            log.warning("the semantic cache is off: %s", exc)
            return None
        return vectors[0]

    async def _ensure(self) -> None:
        if not self._ready:
            from qdrant_client import models

            if not await self.vectors.client.collection_exists(COLLECTION):
                await self.vectors.client.create_collection(COLLECTION, vectors_config=models.VectorParams(
                    size=384, distance=models.Distance.COSINE))
            self._ready = True

    async def nearest(self, tenant_id: str, context: str, question: str, vector: np.ndarray,
                      threshold: float) -> tuple[str, float] | None:
        """The cache key of the closest answered question of this tenant and context at ``threshold`` or above
        that asks the same (``same_ask``), and its similarity."""
        from qdrant_client import models

        await self._ensure()
        found = await self.vectors.client.query_points(
            COLLECTION, query=vector.tolist(), limit=3, with_payload=True, score_threshold=threshold,
            query_filter=models.Filter(must=[
                *equal(tenant_id=tenant_id, context=context),
                models.FieldCondition(key="expires_at", range=models.Range(gt=time.time()))]))
        for point in found.points:
            if same_ask(question, point.payload["question"]):
                return point.payload["cache_key"], float(point.score)
        return None

    async def remember(self, tenant_id: str, context: str, question: str, vector: np.ndarray, cache_key: str,
                       ttl: int) -> None:
        from qdrant_client import models

        await self._ensure()
        await self.vectors.client.upsert(COLLECTION, points=[models.PointStruct(
            id=str(uuid.uuid5(_NAMESPACE, cache_key)), vector=vector.tolist(),
            payload={"tenant_id": tenant_id, "context": context, "question": question, "cache_key": cache_key,
                     "expires_at": time.time() + ttl})])

    async def forget_tenant(self, tenant_id: str) -> None:
        from qdrant_client import models

        await self._ensure()
        await self.vectors.client.delete(COLLECTION, points_selector=models.FilterSelector(filter=models.Filter(
            must=equal(tenant_id=tenant_id))))
