"""The semantic cache's index: the questions of answered chats as vectors in Qdrant, each pointing at its answer in
the exact cache (Redis).

Closeness of vectors alone cannot tell "Celsius to Fahrenheit" from "Fahrenheit to Celsius", or "open on Monday"
from "open on Tuesday" (0.995 and 0.956 with this model). So a hit also needs ``same_ask``: the two questions may
differ in how they are put (words added or left out) but not by one word standing in for another, by another
number, or by the same words in another order. Measured on the pairs of ``gateway bench semantic`` (docs/retrieval.md).

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
_NAMESPACE = uuid.UUID("1f0e9f4c-23c5-4a5e-8e0f-1b6f2a8c9d01")
_WORD = re.compile(r"[a-z0-9%]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_FUNCTION_WORDS = frozenset(
    "a an the of to in on at for from by with and or is are was were be been being do does did how what which who "
    "whom whose when where why can could would should will shall may might must i my me you your we our it its this "
    "that these those there their them they am has have had into as about please tell give explain s show".split())
# Words whose difference alone changes what is asked; each set must be the same on both sides.
_NEGATIONS = frozenset("not no never without none nobody nothing neither nor cannot n't".split())
_QUANTIFIERS = frozenset("all every each some any none no most few many several both either neither only".split())
_PARTICLES = frozenset("out off up down".split())  # zoom in / out, turn on / off, scale up / down
_WH = {"what": "what", "which": "what", "who": "who", "whom": "who", "whose": "who", "how": "how", "why": "why",
       "when": "when", "where": "where"}
_TENSE = {"did": "past", "was": "past", "were": "past", "had": "past", "is": "present", "are": "present",
          "am": "present", "does": "present", "do": "present", "has": "present", "will": "future",
          "shall": "future"}
_MODAL = {"can": "may", "could": "may", "may": "may", "might": "maybe", "must": "must", "should": "must",
          "need": "must", "ought": "must", "did": "past", "was": "past", "were": "past", "do": "fact", "does": "fact",
          "is": "fact", "are": "fact", "am": "fact", "has": "fact", "have": "fact", "will": "future",
          "would": "may", "shall": "future"}
_REQUEST = re.compile(r"^(?:please\s+)?(?:can|could|would|will)\s+you\s+(?:please\s+)?(?:tell|explain|show|give)\s+"
                      r"(?:me\s+)?")
# Words a rewording adds without asking something else ("Which city is the capital of ...")
_FILLER = frozenset("city way steps step exactly actually really simply simple term terms briefly quickly know "
                    "want like meaning mean kind sort type thing one somebody someone person people setting "
                    "settings".split())
# Words that ask the same in a question of this kind, each group under its first word
_SYNONYMS = {word: group.split()[0] for group in (
    "make create", "change update modify edit", "enable activate", "disable deactivate", "delete remove erase",
    "restore recover", "book reserve", "start begin", "buy purchase", "get obtain", "show display", "find locate",
    "fix repair", "big large", "photo picture image", "email e-mail", "package parcel", "calculate compute",
    "cancel terminate", "contact reach", "shipping delivery", "author writer") for word in group.split()}
_WHEN = re.compile(r"\b(?:in |at |on )?(?:what|which) (?:year|time|date|day|month)\b")
_POSSESSIVE = re.compile(r"\b([a-z0-9]+)'s ([a-z0-9]+)\b")  # "Germany's GDP" asks what "the GDP of Germany" asks
_COMMAND = re.compile(r"^(?:please )?(?:give|tell|show|explain|describe|list)\b")


def _words(text: str) -> list[str]:
    words = []
    for word in _WORD.findall(text.lower()):
        if word.endswith("n't"):
            words += [word[:-3] or "not", "n't"]
        elif "'" in word:
            words.append(word.split("'")[0])
        else:
            words.append(word)
    return words


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _normal(text: str) -> str:
    """The question in one form: lower case, a polite request's frame dropped ("Can you tell me ..."), "what year"
    as "when", "X's Y" as "Y of X"."""
    text = _REQUEST.sub("", text.strip().lower().replace("\u2019", "'"))
    text = _WHEN.sub("when", text)
    return _POSSESSIVE.sub(lambda m: m[1] + "'s " + m[2] if m[1] in ("it", "what", "that", "there", "who",
                                                                      "let", "here") else f"{m[2]} of {m[1]}", text)


def content_words(text: str) -> list[str]:
    """The words that carry a question's meaning, in order, lower case, a plural's s dropped, synonyms as one."""
    words = []
    for word in _words(_normal(text)):
        if word in _FUNCTION_WORDS or word in _NEGATIONS or word in _QUANTIFIERS or word in _PARTICLES:
            continue
        word = _stem(word)
        words.append(_SYNONYMS.get(word, word))
    return words


def _frame(text: str) -> tuple:
    """What a question asks besides its subject: its negations, quantifiers and particles, its question word, the
    tenses of its auxiliaries, and for a yes/no question the force of its first word (can, must, did, will)."""
    text = _normal(text)
    words = _words(text)
    wh = next((_WH[w] for w in words if w in _WH), "what" if _COMMAND.match(text) else None)
    yes_no = _MODAL.get(words[0]) if words else None
    return (sorted(w for w in words if w in _NEGATIONS), frozenset(w for w in words if w in _QUANTIFIERS),
            sorted(w for w in words if w in _PARTICLES), wh, frozenset(_TENSE[w] for w in words if w in _TENSE),
            yes_no)


def same_ask(first: str, second: str) -> bool:
    """Whether two questions close in meaning may share an answer. A wrong answer from the cache is worse than a
    model call, so anything that can change the ask is a miss: another number; a negation, quantifier, particle
    ("in" / "out") or question word on one side only; auxiliaries of different tenses, or yes/no questions of
    different force ("Can I ...?" / "Should I ...?"); a meaningful word standing in for another; a meaningful word
    added, unless it is a rewording's filler ("Which city is ..."); the same words in another order ("Did
    Microsoft buy GitHub?" / "Did GitHub buy Microsoft?")."""
    if sorted(_NUMBER.findall(first)) != sorted(_NUMBER.findall(second)):
        return False
    (neg_a, quant_a, part_a, wh_a, tense_a, force_a) = _frame(first)
    (neg_b, quant_b, part_b, wh_b, tense_b, force_b) = _frame(second)
    if neg_a != neg_b or quant_a != quant_b or part_a != part_b or wh_a != wh_b:
        return False
    if tense_a and tense_b and tense_a != tense_b:
        return False
    if (force_a or force_b) and wh_a is None and force_a != force_b:
        return False
    a, b = content_words(first), content_words(second)
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if only_a - _FILLER or only_b - _FILLER:
        return False
    shared = set(a) & set(b)  # in the same order, as often: "when the buyer cancels" is not "the seller"
    return [w for w in a if w in shared] == [w for w in b if w in shared]


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
