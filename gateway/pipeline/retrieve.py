"""Stage: a chat completion that names vector stores gets their nearest chunks as context, and its answer their
citations.

The request says ``"retrieval": {"vector_store_ids": ["vs_..."], "max_results": 5}`` (a field of this gateway; it
is removed before the request goes upstream). The last user message is the query; the chunks found are given to
the model in a system message just before that message, numbered, with their file names; the answer carries
``citations`` (file, chunk, score, store) in its body (when not streamed) and in ``x-gateway-citations``, and the
ledger row keeps the stores searched and the chunks used. The search's embedding is billed to the tenant like any
embedding request.
"""

from __future__ import annotations

from typing import Callable

import orjson

from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.routing.signals import request_text

FIELD = "retrieval"
MOST_STORES = 10
MOST_RESULTS = 20
HEADER_CITATIONS = 10  # citations named in the header (the body has them all)


class Retrieve:
    def __init__(self, retrieval: Callable[[], object]) -> None:
        self.retrieval = retrieval

    async def __call__(self, ctx: RequestContext) -> None:
        asked = ctx.body.get(FIELD)
        if asked is None or not ctx.endpoint.is_chat:
            return
        store_ids, limit = _read(asked)
        retrieval = self.retrieval()
        if retrieval is None:
            raise GatewayError(503, "Retrieval is off on this gateway.", type="server_error",
                               code="retrieval_unavailable")
        del ctx.body[FIELD]
        query, _ = request_text(ctx.body)
        if not query.strip():
            raise GatewayError(400, "A chat with retrieval needs a user message to search with.", param="messages")
        for store_id in store_ids:
            await retrieval.searchable_store(ctx.tenant.id, store_id, param=f"{FIELD}.vector_store_ids")
        hits = await retrieval.search(ctx.tenant, ctx.api_key, store_ids, query, limit)
        ctx.citations = [{"index": n, "file_id": h.file_id, "filename": h.filename, "chunk": h.chunk,
                          "score": round(h.score, 4), "vector_store_id": h.store_id}
                         for n, h in enumerate(hits, start=1)]
        ctx.retrieval = orjson.dumps({"vector_store_ids": store_ids, "chunks": [
            {k: c[k] for k in ("file_id", "chunk", "score", "vector_store_id")} for c in ctx.citations]}).decode()
        ctx.response_headers.append((b"x-gateway-citations", ",".join(
            f"{c['file_id']}#{c['chunk']}:{c['score']}" for c in ctx.citations[:HEADER_CITATIONS]).encode()))
        if hits:
            _give_context(ctx.body, hits)


def _read(asked: object) -> tuple[list[str], int]:
    if not isinstance(asked, dict):
        raise GatewayError(400, "'retrieval' must be an object: {\"vector_store_ids\": [...], \"max_results\": 5}.",
                           param=FIELD)
    unknown = set(asked) - {"vector_store_ids", "max_results"}
    if unknown:
        name = f"{FIELD}.{sorted(unknown)[0]}"
        raise GatewayError(400, f"Unknown field '{name}'.", param=name)
    store_ids = asked.get("vector_store_ids")
    if (not isinstance(store_ids, list) or not 1 <= len(store_ids) <= MOST_STORES
            or not all(isinstance(s, str) and 0 < len(s) <= 64 and "\x00" not in s for s in store_ids)):
        raise GatewayError(400, f"'retrieval.vector_store_ids' must list 1 to {MOST_STORES} vector store ids.",
                           param=f"{FIELD}.vector_store_ids")
    limit = asked.get("max_results", 5)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MOST_RESULTS:
        raise GatewayError(400, f"'retrieval.max_results' must be a whole number from 1 to {MOST_RESULTS}.",
                           param=f"{FIELD}.max_results")
    return list(dict.fromkeys(store_ids)), limit


def _give_context(body: dict, hits: list) -> None:
    sources = "\n\n".join(f"[{n}] {h.filename} (chunk {h.chunk})\n{h.text}" for n, h in enumerate(hits, start=1))
    context = {"role": "system", "content": "Use these sources to answer when they are relevant, and cite them by "
                                            f"their numbers, like [1].\n\n{sources}"}
    messages = body["messages"]
    last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                    default=len(messages))
    body["messages"] = [*messages[:last_user], context, *messages[last_user:]]


def with_citations(body: bytes, citations: list[dict]) -> bytes:
    """A chat completion's JSON with its ``citations`` added (left as it is if it is not a JSON object)."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(answer, dict):
        return body
    answer["citations"] = citations
    return orjson.dumps(answer)
