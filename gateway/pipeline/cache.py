"""Stages: answer a repeated request from the response cache, and keep new answers for the next time.

``LookupCache`` runs before routing and limits: on a hit the routing is skipped, the limits count the request
(requests per minute and per day, concurrency) but no tokens and no budget, and ``ServeCached`` answers it. On a
miss the answer the client gets is kept once the request is over, if it was complete and successful.

Policy (models.yaml `defaults.cache`, a model's `cache:`, a tenant's `cache:`; the later wins field by field):
on or off, TTL, largest entry, and whether requests that are not deterministic (temperature above 0, or unset,
without a seed) are cached. Per request: ``Cache-Control: no-cache`` skips the lookup but stores the answer,
``no-store`` does neither, and ``x-gateway-cache-ttl: SECONDS`` stores with another TTL.

With the policy's ``semantic``, an exact miss is looked up again by meaning (``gateway.retrieval.semantic``): the
closest answered question of the same tenant and otherwise identical request, if close enough and asking the
same, gives its answer; a new answer is kept for such lookups too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from gateway.asgi import end_stream, header, send_chunk, send_response, start_stream
from gateway.config.types import CachePolicy
from gateway.errors import bad_request
from gateway.observability import metrics
from gateway.pipeline.context import RequestContext
from gateway.pipeline.parse import encode
from gateway.retrieval.semantic import question_and_context
from gateway.stores.cache import ResponseCache, cache_key
from gateway.upstreams.sse import SSERelay

CACHED_ROUTES = frozenset(("chat.completions", "completions"))
_BYPASS_OFF = (b"x-gateway-cache", b"bypass; off")
_BYPASS_NO_STORE = (b"x-gateway-cache", b"bypass; no-store")
_BYPASS_NONDETERMINISTIC = (b"x-gateway-cache", b"bypass; nondeterministic")
log = logging.getLogger("gateway.cache")


class LookupCache:
    def __init__(self, cache: ResponseCache, semantic: Callable[[], object] = lambda: None) -> None:
        self.cache = cache
        self.semantic = semantic  # the semantic cache's index (gateway.retrieval.semantic), when retrieval is on

    async def __call__(self, ctx: RequestContext) -> None:
        if ctx.endpoint.route not in CACHED_ROUTES and not ctx.endpoint.is_chat:
            return
        policy = _policy(ctx)
        control = (header(ctx.scope, b"cache-control") or b"").lower()
        bypass = None
        if not policy.enabled:
            bypass = _BYPASS_OFF
        elif b"no-store" in control:
            bypass = _BYPASS_NO_STORE
        elif not policy.nondeterministic and not _deterministic(ctx.body):
            bypass = _BYPASS_NONDETERMINISTIC
        if bypass is not None:
            ctx.response_headers.append(bypass)
            metrics.cache_lookups_by("bypass").inc()
            return
        ttl = _ttl_override(ctx) or policy.ttl_seconds
        key = cache_key(ctx.tenant.id, ctx.endpoint.route, _keyed_body(ctx), encode)
        if b"no-cache" not in control:
            entry = await self.cache.get(key)
            model = ctx.config.models.get(entry[0].get("model", "")) if entry is not None else None
            if model is not None:
                ctx.cache_entry, ctx.model = entry, model
                metrics.cache_lookups_by("hit").inc()
                return
        semantic = await self._semantic(ctx, policy, control) if policy.semantic else None
        if ctx.cache_entry is not None:
            return
        metrics.cache_lookups_by("miss").inc()
        ctx.response_headers.append((b"x-gateway-cache", b"miss"))
        ctx.cache_capture = policy.max_entry_bytes

        async def store(ctx: RequestContext) -> None:
            body = ctx.answer_bytes
            if (body is None or not 200 <= ctx.status < 300 or ctx.error_type or ctx.client_disconnected
                    or len(body) > policy.max_entry_bytes):
                return
            meta = {"model": ctx.model.name, "deployment": ctx.deployment.name if ctx.deployment else None,
                    "upstream_model": ctx.deployment.upstream_model if ctx.deployment else None,
                    "stream": ctx.stream, "content_type": ctx.answer_content_type.decode(),
                    "prompt_tokens": ctx.prompt_tokens, "completion_tokens": ctx.completion_tokens,
                    "stored_at": round(time.time(), 3), "request_id": ctx.request_id}
            if ctx.native_answer:  # in the client's own API (not chat completions'), as its upstream gave it
                meta["native"] = True
            self.cache.put(key, meta, body, ttl)
            if semantic is not None:
                index, context, question, vector = semantic
                try:
                    await index.remember(ctx.tenant.id, context, question, vector, key, ttl)
                except Exception as exc:  # the exact cache has the answer; only the semantic lookup misses it
                    log.warning("the semantic cache cannot keep an answer now: %s", exc)

        ctx.on_finish(store)

    async def _semantic(self, ctx: RequestContext, policy: CachePolicy, control: bytes):
        """After an exact miss: an answer to a question close enough in meaning (``ctx.cache_entry`` set), or what
        keeping this answer for such lookups needs (the index, the context, the question's vector)."""
        index = self.semantic()
        if index is None or (ctx.body.get("tools") and not policy.semantic_with_tools):
            return None
        found = question_and_context(ctx.body, encode)
        if found is None:
            return None
        question, context = found
        try:
            vector = await index.embed(question)
            if vector is None:
                return None
            nearest = (await index.nearest(ctx.tenant.id, context, question, vector, policy.semantic_threshold)
                       if b"no-cache" not in control else None)
        except Exception as exc:
            log.warning("the semantic cache cannot be read now: %s", exc)
            return None
        if nearest is not None:
            entry = await self.cache.get(nearest[0])
            model = ctx.config.models.get(entry[0].get("model", "")) if entry is not None else None
            if model is not None:
                ctx.cache_entry, ctx.model = entry, model
                ctx.semantic_similarity = nearest[1]
                metrics.cache_lookups_by("semantic_hit").inc()
                return None
        return index, context, question, vector


async def serve_cached(ctx: RequestContext) -> None:
    """The cached answer, as a stream if the request asked for one (its usage event only if asked for)."""
    if ctx.cache_entry is None:
        return
    meta, body = ctx.cache_entry
    ctx.cache_hit = True
    ctx.native_answer = meta.get("native", False)
    age = max(0, int(time.time() - meta.get("stored_at", time.time())))
    kind = b"hit" if ctx.semantic_similarity is None else b"semantic-hit; similarity=%.4f" % ctx.semantic_similarity
    headers = ctx.response_headers + [
        (b"x-gateway-cache", kind), (b"age", str(age).encode()),
        (b"x-gateway-model", ctx.model.name.encode()),
        (b"x-gateway-cached-request-id", str(meta.get("request_id", "")).encode()),
        (b"x-gateway-cost-usd", b"0.000000000"),
    ]
    content_type = meta.get("content_type", "application/json")
    ctx.overhead_seconds = ctx.elapsed()
    headers.append((b"x-gateway-overhead-ms", b"%.2f" % (ctx.overhead_seconds * 1000)))
    if content_type.startswith("text/event-stream"):
        options = ctx.body.get("stream_options") or {}
        relay = SSERelay(drop_usage_event=not options.get("include_usage"))
        await start_stream(ctx.send, 200, headers)
        await send_chunk(ctx.send, relay.feed(body) + relay.finish())
        await end_stream(ctx.send)
    else:  # a plain answer (or an upstream that answered a stream request whole: kept and served whole)
        await send_response(ctx.send, 200, body, headers, content_type.encode())
    metrics.cache_bytes_by("served").inc(len(body))
    ctx.status = 200
    ctx.responded = True


# Fields of another API's request that say how it is delivered or kept, not what is answered
_DELIVERY = frozenset(("stream", "metadata", "store", "previous_response_id", "user", "safety_identifier",
                       "prompt_cache_key", "client_metadata", "service_tier"))


def _keyed_body(ctx: RequestContext) -> dict:
    """What the key is made of: the request in chat completions' terms (with the tenant's prompt and retrieval's
    context), and for another API's request also every field of it as it came, which an upstream speaking that API
    is given (the translation drops some: Anthropic's ``thinking``, say) and its ``anthropic-beta`` header."""
    if ctx.native_body is None:
        return ctx.body
    native = {k: v for k, v in ctx.native_body.items() if k not in _DELIVERY}
    beta = header(ctx.scope, b"anthropic-beta")
    if beta:
        native["anthropic-beta"] = beta.decode("latin-1")
    return {**ctx.body, "native request": native}


def _policy(ctx: RequestContext) -> CachePolicy:
    policy = ctx.model.cache if ctx.model is not None else ctx.config.cache_policy  # an alias: not routed yet
    return replace(policy, **ctx.tenant.cache) if ctx.tenant.cache else policy


def _deterministic(body: dict) -> bool:
    temperature = body.get("temperature")
    return body.get("seed") is not None or (isinstance(temperature, (int, float)) and temperature == 0)


def _ttl_override(ctx: RequestContext) -> int | None:
    value = header(ctx.scope, b"x-gateway-cache-ttl")
    if value is None:
        return None
    try:
        ttl = int(value)
    except ValueError:
        ttl = 0
    if not 1 <= ttl <= 30 * 86400:
        raise bad_request("x-gateway-cache-ttl must be a whole number of seconds from 1 to 2592000.",
                          param="x-gateway-cache-ttl", code="invalid_cache_ttl")
    return ttl
