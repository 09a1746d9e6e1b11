"""The last stage: get an answer from an upstream and relay it to the client.

Attempts: the model's deployments in turn (see upstreams/select.py), then its configured fallback models, at
most ``max_attempts`` calls in all. A connection failure, a timeout, a 429 or a 5xx (or an upstream refusing
the gateway's credentials, or not knowing the model) moves on to the next attempt; an upstream's 400, 413 or
422 is about the request itself and goes back to the client at once. The client gets the first good answer or
the last error; every attempt is recorded.

Relaying: non-streamed answers are passed on byte for byte; streams event by event as they arrive, the usage
event read on the way past. Once the first byte has gone to the client there is no other attempt.

Cascade (a small model chosen by the router): the small model's whole answer is fetched first, with logprobs,
and its confidence measured. Sure enough: it is sent (its logprobs removed unless the client asked for them;
as an SSE stream if the client asked for one). Unsure: the next model up answers, streamed straight through.
Both calls are billed. If the larger model fails, the small model's answer is sent after all.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp
import orjson

from gateway.asgi import DeadlinePassed, DisconnectGuard, end_stream, send_chunk, send_response, start_stream
from gateway.config.types import Adapter, Deployment, Model
from gateway.errors import GatewayError, error_body
from gateway.observability.metrics import CASCADES, FALLBACKS, UPSTREAM_ERRORS
from gateway.pipeline.context import RequestContext
from gateway.pipeline.parse import encode
from gateway.pipeline.retrieve import with_citations
from gateway.pipeline.tokens import counted_prompt_tokens
from gateway.tokens import prompt_tokens
from gateway.routing.confidence import measure, strip_logprobs
from gateway.upstreams.client import UpstreamClient
from gateway.upstreams.fleet import AdapterLoadFailed, Fleet
from gateway.upstreams.errors import UPSTREAM_FAILURES, Unreachable, from_exception, from_upstream_response
from gateway.upstreams.replay import as_stream
from gateway.upstreams.select import DeploymentSelector
from gateway.upstreams import translated
from gateway.upstreams.sse import SSERelay
from gateway.upstreams.usage import token_counts, usage_of

# Statuses that say the request itself is wrong: another deployment would answer the same.
_FINAL_STATUSES = frozenset((400, 413, 422))


@dataclass(slots=True)
class Answer:
    """A good upstream answer: a stream still to be read, or a whole body already read."""

    model: Model
    deployment: Deployment
    status: int
    response: aiohttp.ClientResponse | None  # an open stream
    body: bytes | None
    content_type: bytes
    attempt: dict  # this call's entry in ctx.attempts
    native: bool = False  # in the client's own API (its request sent as it came), not chat completions'


class Forward:
    def __init__(self, client: UpstreamClient, selector: DeploymentSelector,
                 fleet: Callable[[], Fleet | None] = lambda: None, providers: Callable[[], object] = lambda: None
                 ) -> None:
        self.client = client
        self.selector = selector
        self.fleet = fleet  # the inference fleet, for models served by pools of vLLM nodes
        self.providers = providers  # LiteLLM's path, loaded when the config has a provider that needs it

    async def __call__(self, ctx: RequestContext) -> None:
        limit = ctx.config.request_timeout
        deadline = asyncio.get_running_loop().time() + limit - ctx.elapsed()
        try:
            async with DisconnectGuard(ctx.receive, deadline=deadline):
                if ctx.cascade_to is not None:
                    await self._cascade(ctx)
                    return
                answer = await self._first_good(ctx, ctx.model, ctx.body, stream=ctx.stream)
                await self._relay(ctx, answer)
        except DeadlinePassed:
            error = GatewayError(504, f"The request took longer than the gateway allows ({limit:g} s, "
                                      f"defaults.request_timeout).", type="timeout_error", code="request_timeout")
            if not ctx.responded:
                raise error from None
            ctx.status, ctx.error_type = 504, error.code  # a stream under way: it ends with an error event
            await send_chunk(ctx.send, b"data: " + error.body() + b"\n\n")
            await end_stream(ctx.send)
        finally:
            if ctx.leases:  # node calls a disconnect or the deadline cut short
                release_leases(ctx, self.fleet())

    # Attempts

    async def _first_good(self, ctx: RequestContext, model: Model, body: dict, stream: bool) -> Answer:
        config = ctx.config
        policy = config.fallback_policy
        last_error: GatewayError | None = None
        models = [model, *(config.models[name] for name in model.fallbacks
                           if name in ctx.tenant.allowed_models and config.models[name].serving)]
        for candidate in models:
            for deployment in self._deployments(ctx, candidate):
                if _calls(ctx) >= policy.max_attempts:
                    break
                if ctx.attempts:
                    FALLBACKS.labels(model.name).inc()
                try:
                    try:
                        return await self._attempt(ctx, candidate, deployment, body, stream)
                    except _Failed as failure:
                        if not failure.again:
                            raise
                        return await self._attempt(ctx, candidate, deployment, body, stream)
                except _Failed as failure:
                    ctx.model, ctx.deployment = candidate, deployment  # the log names the last one tried
                    if failure.final:  # the request's own fault, not the deployment's
                        raise failure.error from None
                    if deployment.node is None:  # a node's failures are the fleet's to weigh
                        self.selector.failed(candidate, deployment, policy)
                    last_error = failure.error
            if (last_error is not None and last_error.code == "adapter_unavailable" and ctx.adapter is not None
                    and ctx.adapter.on_failure == "base" and not ctx.adapter_bypassed):
                ctx.adapter_bypassed = True  # the tenant's choice: its base model without the adapter
                return await self._first_good(ctx, model, body, stream)
        if last_error is None:
            last_error = GatewayError(503, f"No deployment of model `{model.name}` is available right now.",
                                      type="upstream_error", code="model_unavailable")
        raise last_error

    def _deployments(self, ctx: RequestContext, model: Model) -> list[Deployment]:
        """The model's deployments in the order to try; a fleet pool's stand for its nodes, best first."""
        deployments = self.selector.candidates(model)
        if not any(d.pool for d in deployments):
            return deployments
        fleet = self.fleet()
        adapter = self._adapter_for(ctx, model)
        expanded = []
        for deployment in deployments:
            if deployment.pool is None:
                expanded.append(deployment)
            elif fleet is not None:
                expanded += fleet.candidates(deployment, adapter)
        return expanded

    @staticmethod
    def _adapter_for(ctx: RequestContext, model: Model) -> Adapter | None:
        adapter = ctx.adapter
        return adapter if adapter is not None and adapter.base == model.name and not ctx.adapter_bypassed else None

    async def _on_node(self, ctx: RequestContext, model: Model, deployment: Deployment, attempt: dict) -> str:
        """Before a call to a fleet node: its adapter registered there, its load counted; the model name to send."""
        fleet = self.fleet()
        adapter = self._adapter_for(ctx, model)
        attempt["node"] = deployment.node
        if adapter is not None:
            attempt["adapter"] = adapter.name
        try:
            upstream = await fleet.prepare(deployment, adapter)
        except AdapterLoadFailed as exc:
            error = GatewayError(503, f"No node could load the adapter `{adapter.name}` right now ({exc.public}).",
                                 type="upstream_error", code="adapter_unavailable")
            attempt.update(status=503, error=error.code)
            UPSTREAM_ERRORS.labels(deployment.name, error.code).inc()
            raise _Failed(error, final=False) from None
        lora = adapter.lora_name if adapter is not None else None
        fleet.started(deployment, lora)
        ctx.leases.append((attempt, deployment, lora))
        return upstream

    async def _attempt(self, ctx: RequestContext, model: Model, deployment: Deployment, body: dict,
                       stream: bool) -> Answer:
        attempt = {"model": model.name, "deployment": deployment.name, "status": 0}
        ctx.attempts.append(attempt)
        upstream_model = await self._on_node(ctx, model, deployment, attempt) if deployment.node else None
        own_key = self._tenant_key(ctx, deployment, attempt) if ctx.tenant.provider_keys else None
        dialect = ctx.endpoint.dialect
        native = (dialect is not None and body is ctx.body and ctx.endpoint.route in deployment.apis
                  and (ctx.guard is None or not ctx.guard.translate))
        ctx.upstream_started = started = time.perf_counter()
        try:
            if native:  # the upstream speaks the client's API: the request goes as it came
                path, payload, headers = dialect.native_request(ctx, deployment, upstream_model, own_key)
                response = await self.client.post(deployment, path, payload, headers)
            elif deployment.wire is not None:
                response = await self._translated(ctx, deployment, body, stream, own_key)
            elif deployment.litellm is not None:
                response = await self._through_litellm(ctx, deployment, body, stream, own_key)
            else:
                payload = self._payload(ctx, body, deployment, stream, upstream_model)
                headers = None if own_key is None else {**deployment.headers, "Authorization": f"Bearer {own_key}"}
                response = await self.client.post(deployment, ctx.endpoint.upstream_path, payload, headers)
            if response.status >= 400 or not (stream and response.content_type == "text/event-stream"):
                try:
                    content = await response.read()
                finally:
                    response.release()
                response_for_stream = None
            else:
                content, response_for_stream = None, response
        except UPSTREAM_FAILURES as exc:
            error = from_exception(deployment, exc)
            self._close_attempt(ctx, attempt, started, error.status, error.code)
            raise _Failed(error, final=False) from None
        except GatewayError as error:  # a request this provider's API cannot carry; another deployment may
            self._close_attempt(ctx, attempt, started, error.status, error.code)
            raise _Failed(error, final=False) from None
        if response.status >= 400:
            error = from_upstream_response(deployment, response.status, content)
            lora = next((lora for leased, _, lora in ctx.leases if leased is attempt), None)
            if response.status == 404 and lora is not None and lora.encode() in content:
                # The node no longer has the adapter the gateway thought it had (restarted, or unloaded by another
                # hand): not the client's fault; loaded again and asked again.
                self.fleet().lost(deployment, lora)
                self._close_attempt(ctx, attempt, started, response.status, "adapter_lost")
                raise _Failed(GatewayError(503, f"The node lost the adapter `{attempt['adapter']}`.",
                                           type="upstream_error", code="adapter_unavailable"), final=False, again=True)
            self._close_attempt(ctx, attempt, started, response.status, error.code or error.type)
            raise _Failed(error, final=response.status in _FINAL_STATUSES)
        if content is not None:
            self._close_attempt(ctx, attempt, started, response.status, None)
        else:
            attempt["status"] = response.status
        self.selector.succeeded(model, deployment)
        ctx.model, ctx.deployment = model, deployment
        if native:
            attempt["api"] = ctx.endpoint.route
        return Answer(model, deployment, response.status, response_for_stream, content,
                      response.headers.get("Content-Type", "application/json").encode(), attempt, native)

    @staticmethod
    def _tenant_key(ctx: RequestContext, deployment: Deployment, attempt: dict) -> str | None:
        """The tenant's own key for the deployment's provider (bring your own key), if it has one."""
        reference = ctx.tenant.provider_keys.get(deployment.provider) if deployment.provider else None
        if reference is None:
            return None
        key = ctx.config.secrets.get(reference)
        if key is None:
            error = GatewayError(503, f"Your own key for {deployment.provider} cannot be read right now.",
                                 type="upstream_error", code="provider_key_unavailable")
            attempt.update(status=503, error=error.code)
            raise _Failed(error, final=False)
        attempt["paid_by"] = "tenant"
        return key

    async def _translated(self, ctx: RequestContext, deployment: Deployment, body: dict, stream: bool,
                          own_key: str | None) -> translated.TranslatedResponse:
        if not ctx.endpoint.is_chat:
            raise GatewayError(400, f"The model `{ctx.model.name}` is served by {deployment.wire}, which answers "
                                    "chat completions only: send it to /v1/chat/completions.",
                               param="model", code="unsupported_by_provider")
        prepared = self._prepare(ctx, body, deployment, stream, None)
        return await translated.post(self.client, deployment, prepared, stream, own_key)

    async def _through_litellm(self, ctx: RequestContext, deployment: Deployment, body: dict, stream: bool,
                               own_key: str | None):
        providers = self.providers()
        if providers is None:  # a config with a new provider, whose path is still being loaded
            raise Unreachable("the path to this provider is still being loaded")
        prepared = self._prepare(ctx, body, deployment, stream, None)
        route = "chat.completions" if ctx.endpoint.is_chat else ctx.endpoint.route
        return await providers.post(deployment, route, prepared, stream, own_key)

    def _close_attempt(self, ctx: RequestContext, attempt: dict, started: float, status: int,
                       error: str | None) -> None:
        seconds = time.perf_counter() - started
        ctx.upstream_seconds += seconds
        attempt["status"] = status
        attempt["ms"] = round(seconds * 1000, 2)
        if error is not None:
            attempt["error"] = error
            UPSTREAM_ERRORS.labels(attempt["deployment"], error).inc()
        if ctx.leases:
            release_leases(ctx, self.fleet(), attempt)

    def _payload(self, ctx: RequestContext, body: dict, deployment: Deployment, stream: bool,
                 upstream_model: str | None = None) -> bytes:
        return encode(self._prepare(ctx, body, deployment, stream, upstream_model))

    @staticmethod
    def _prepare(ctx: RequestContext, body: dict, deployment: Deployment, stream: bool,
                 upstream_model: str | None) -> dict:
        body["model"] = ctx.upstream_model = upstream_model or deployment.upstream_model
        if stream:
            options = body.get("stream_options") or {}
            if not options.get("include_usage"):
                # Ask for usage so the stream can be accounted; the relay drops it again for this client.
                body["stream_options"] = {**options, "include_usage": True}
                ctx.usage_injected = True
        return body

    @staticmethod
    def _bill(ctx: RequestContext, answer: Answer, usage: dict | None) -> None:
        prompt, completion = token_counts(usage)
        cost = answer.model.pricing.cost(prompt, completion)
        ctx.prompt_tokens += prompt
        ctx.completion_tokens += completion
        ctx.cost_usd += cost
        if answer.attempt.get("paid_by") == "tenant":  # the tenant's own key: the provider bills it, not the budget
            ctx.tenant_paid_usd += cost
        answer.attempt.update(prompt_tokens=prompt, completion_tokens=completion, cost_usd=round(cost, 9))

    # Relaying

    async def _relay(self, ctx: RequestContext, answer: Answer) -> None:
        ctx.native_answer = answer.native
        if answer.response is not None:
            try:
                await self._relay_stream(ctx, answer)
            finally:
                answer.response.release()
            return
        usage = usage_of(answer.body)
        if usage is None and ctx.endpoint.model_type == "moderation":  # moderation answers say no usage
            usage = {"prompt_tokens": counted_prompt_tokens(ctx), "completion_tokens": 0}
        self._bill(ctx, answer, usage)
        await self._send_body(ctx, answer.status, answer.body, answer.content_type)

    async def _send_body(self, ctx: RequestContext, status: int, body: bytes, content_type: bytes) -> None:
        if ctx.citations is not None and status == 200:
            body = with_citations(body, ctx.citations)
        await send_response(ctx.send, status, body, _whole_answer_headers(ctx), content_type)
        ctx.status = status
        ctx.responded = True
        if ctx.cache_capture:
            ctx.answer_bytes, ctx.answer_content_type = body, content_type

    async def _relay_stream(self, ctx: RequestContext, answer: Answer) -> None:
        first_byte_wait = time.perf_counter() - ctx.upstream_started
        overhead_ms = (ctx.elapsed() - ctx.upstream_seconds - first_byte_wait) * 1000
        await start_stream(ctx.send, answer.status, ctx.response_headers + _answer_headers(ctx)
                           + [(b"x-gateway-overhead-ms", b"%.2f" % overhead_ms)])
        ctx.status = answer.status
        ctx.responded = True
        relay = SSERelay(drop_usage_event=ctx.usage_injected and not answer.native)
        send = ctx.send
        started = ctx.upstream_started
        kept: list[bytes] | None = [] if ctx.cache_capture else None  # the upstream's events, usage included
        kept_size = 0
        try:
            async for chunk in answer.response.content.iter_any():
                if kept is not None:
                    kept_size += len(chunk)
                    if kept_size > ctx.cache_capture:
                        kept = None  # too large to keep
                    else:
                        kept.append(chunk)
                out = relay.feed(chunk)
                if out:
                    await send_chunk(send, out)
                    if ctx.answer_cut:  # a guardrail ended the answer: the rest of it is not wanted
                        break
            rest = relay.finish()
            if rest:
                await send_chunk(send, rest)
        except UPSTREAM_FAILURES as exc:
            # The status line is gone already: end the stream with an error event the SDKs raise as an APIError.
            error = from_exception(answer.deployment, exc)
            self._close_attempt(ctx, answer.attempt, started, error.status, error.code)
            ctx.status, ctx.error_type = error.status, error.code
            event = error_body(f"{error.message} The stream is incomplete.", error.type, None, error.code)
            await send_chunk(send, b"data: " + event + b"\n\n")
        else:
            self._close_attempt(ctx, answer.attempt, started, answer.status, None)
            if kept:
                whole = b"".join(kept)
                if b"[DONE]" in whole[-64:]:  # a stream that ended as it should
                    ctx.answer_bytes, ctx.answer_content_type = whole, b"text/event-stream"
        usage = relay.usage
        if usage is None and ctx.answer_cut:  # ended by a guardrail before the upstream said its usage
            usage = {"prompt_tokens": counted_prompt_tokens(ctx),
                     "completion_tokens": prompt_tokens({"prompt": "".join(ctx.guard.streamed)})}
        self._bill(ctx, answer, usage)
        await end_stream(send)
        ctx.overhead_seconds = max(0.0, ctx.elapsed() - ctx.upstream_seconds)

    # Cascade

    async def _cascade(self, ctx: RequestContext) -> None:
        larger = ctx.cascade_to
        body, asked_logprobs = _judged_body(ctx)
        try:
            small = await self._first_good(ctx, ctx.model, body, stream=False)
        except GatewayError as error:
            if error.status in _FINAL_STATUSES:
                raise
            await self._escalate(ctx, larger, None)  # the small model failed: the larger one answers
            return
        self._bill(ctx, small, usage_of(small.body))
        try:
            parsed = orjson.loads(small.body)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            await self._send_small(ctx, small, None, asked_logprobs)
            return
        confidence = measure(parsed, ctx.config.router.uncertainty_phrases)
        ctx.confidence = confidence.value
        small.attempt["confidence"] = confidence.value
        if confidence.value >= ctx.profile.cascade_threshold:
            await self._send_small(ctx, small, parsed, asked_logprobs)
            return
        CASCADES.labels(small.model.name, larger.name).inc()
        await self._escalate(ctx, larger, (small, parsed, asked_logprobs))

    async def _escalate(self, ctx: RequestContext, larger: Model, small: tuple | None) -> None:
        ctx.cascaded = True
        ctx.routing_rule = f"{ctx.routing_rule}=>{larger.name}"
        try:
            answer = await self._first_good(ctx, larger, ctx.body, stream=ctx.stream)
        except GatewayError:
            if small is None:
                raise
            ctx.cascaded = False  # the larger model failed: the small model's answer is the best there is
            ctx.routing_rule += "(failed)"
            ctx.cache_capture = 0  # a rejected answer may be served, but is never kept
            answer, parsed, asked_logprobs = small
            ctx.model, ctx.deployment = answer.model, answer.deployment
            await self._send_small(ctx, answer, parsed, asked_logprobs)
            return
        await self._relay(ctx, answer)

    async def _send_small(self, ctx: RequestContext, answer: Answer, parsed: dict | None,
                          asked_logprobs: bool) -> None:
        if parsed is None:
            await self._send_body(ctx, answer.status, answer.body, answer.content_type)
            return
        if not asked_logprobs:
            strip_logprobs(parsed)
        if not ctx.stream:
            await self._send_body(ctx, answer.status, orjson.dumps(parsed), b"application/json")
            return
        include_usage = bool((ctx.body.get("stream_options") or {}).get("include_usage"))
        await start_stream(ctx.send, answer.status, _whole_answer_headers(ctx))
        ctx.status = answer.status
        ctx.responded = True
        events = as_stream(parsed, include_usage)
        await send_chunk(ctx.send, events)
        await end_stream(ctx.send)
        if ctx.cache_capture:  # kept with its usage event, for the requests that will ask for it
            ctx.answer_bytes = events if include_usage else as_stream(parsed, True)
            ctx.answer_content_type = b"text/event-stream"


def _calls(ctx: RequestContext) -> int:
    """Upstream calls made so far; an adapter a node could not load is not one (the next node may)."""
    return sum(1 for attempt in ctx.attempts if attempt.get("error") != "adapter_unavailable")


def release_leases(ctx: RequestContext, fleet: Fleet | None, attempt: dict | None = None) -> None:
    """Account the node calls of ``attempt`` (all of them, when None: the request is over) to the fleet."""
    kept = []
    for lease in ctx.leases:
        leased_attempt, deployment, lora = lease
        if attempt is not None and leased_attempt is not attempt:
            kept.append(lease)
            continue
        if fleet is not None:
            error = leased_attempt.get("error")
            failed = error is not None and error not in ("client_disconnected",) and (
                leased_attempt.get("status", 0) >= 500 or error in ("upstream_unreachable", "upstream_timeout"))
            fleet.finished(deployment, lora, failed, unreachable=error == "upstream_unreachable")
    ctx.leases = kept


class _Failed(Exception):
    def __init__(self, error: GatewayError, final: bool, again: bool = False) -> None:
        self.error = error
        self.final = final
        self.again = again  # worth one more try on the same deployment


def _judged_body(ctx: RequestContext) -> tuple[dict, bool]:
    """The small model's request of a cascade: whole (not streamed), with the logprobs the judgement needs."""
    body = dict(ctx.body)
    body.pop("stream", None)
    body.pop("stream_options", None)
    if ctx.endpoint.is_chat:
        asked = bool(body.get("logprobs"))
        body["logprobs"] = True
    else:
        asked = body.get("logprobs") is not None
        if not asked:
            body["logprobs"] = 1
    return body, asked


def _whole_answer_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """The headers of an answer sent in one go: what answered, what it cost, the gateway's own time."""
    ctx.overhead_seconds = ctx.elapsed() - ctx.upstream_seconds
    return ctx.response_headers + _answer_headers(ctx) + [
        (b"x-gateway-cost-usd", b"%.9f" % ctx.cost_usd),
        (b"x-gateway-overhead-ms", b"%.2f" % (ctx.overhead_seconds * 1000))]


def _answer_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    deployment = ctx.deployment
    headers = [
        (b"x-gateway-model", ctx.model.name.encode()),
        (b"x-gateway-deployment", deployment.name.encode()),
        (b"x-gateway-upstream-model", (ctx.upstream_model or deployment.upstream_model).encode()),
    ]
    if deployment.node is not None:
        headers.append((b"x-gateway-node", deployment.node.encode()))
        adapter = Forward._adapter_for(ctx, ctx.model)
        headers.append((b"x-gateway-adapter", adapter.name.encode() if adapter else
                        (b"none; " + ctx.adapter.name.encode() + b" unavailable" if ctx.adapter_bypassed else b"none")))
    failed = ctx.failed_attempts()
    if failed:
        headers.append((b"x-gateway-fallbacks", failed.encode()))
    if ctx.routing_rule is not None:
        headers += [
            (b"x-gateway-complexity", ctx.complexity.encode()),
            (b"x-gateway-routing-rule", ctx.routing_rule.encode()),
            (b"x-gateway-route-signals", (ctx.route_signals or "").encode()),
            (b"x-gateway-cascaded", b"true" if ctx.cascaded else b"false"),
        ]
        if ctx.confidence is not None:
            headers.append((b"x-gateway-confidence", b"%.3f" % ctx.confidence))
    return headers
