"""Relaying a good answer to the client: a whole answer passed on byte for byte, a stream event by event as it
arrives (the usage event read on the way past); billed from the upstream's usage. Once the first byte has gone to
the client there is no other attempt: a stream that breaks off ends with an error event. The headers say what
answered, what it cost and the gateway's own time.
"""

from __future__ import annotations

import time

from gateway.asgi import end_stream, send_chunk, send_response, start_stream
from gateway.errors import error_body
from gateway.pipeline.context import RequestContext
from gateway.pipeline.forward.attempt import Answer, Attempts, adapter_for
from gateway.pipeline.retrieve import with_citations
from gateway.pipeline.tokens import counted_prompt_tokens
from gateway.tokens import prompt_tokens
from gateway.upstreams.errors import UPSTREAM_FAILURES, from_exception
from gateway.upstreams.sse import SSERelay
from gateway.upstreams.usage import token_counts, usage_of


class Relay:
    def __init__(self, attempts: Attempts) -> None:
        self.attempts = attempts

    async def __call__(self, ctx: RequestContext, answer: Answer) -> None:
        ctx.native_answer = answer.native
        if answer.response is not None:
            try:
                await self._stream(ctx, answer)
            finally:
                answer.response.release()
            return
        usage = usage_of(answer.body)
        if usage is None and ctx.endpoint.model_type == "moderation":  # moderation answers say no usage
            usage = {"prompt_tokens": counted_prompt_tokens(ctx), "completion_tokens": 0}
        self.bill(ctx, answer, usage)
        await self.send_body(ctx, answer.status, answer.body, answer.content_type)

    async def send_body(self, ctx: RequestContext, status: int, body: bytes, content_type: bytes) -> None:
        if ctx.citations is not None and status == 200:
            body = with_citations(body, ctx.citations)
        await send_response(ctx.send, status, body, whole_answer_headers(ctx), content_type)
        ctx.status = status
        ctx.responded = True
        if ctx.cache_capture:
            ctx.answer_bytes, ctx.answer_content_type = body, content_type

    async def _stream(self, ctx: RequestContext, answer: Answer) -> None:
        first_byte_wait = time.perf_counter() - ctx.upstream_started
        overhead_ms = (ctx.elapsed() - ctx.upstream_seconds - first_byte_wait) * 1000
        await start_stream(ctx.send, answer.status, ctx.response_headers + answer_headers(ctx)
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
            self.attempts.close(ctx, answer.attempt, started, error.status, error.code)
            ctx.status, ctx.error_type = error.status, error.code
            event = error_body(f"{error.message} The stream is incomplete.", error.type, None, error.code)
            await send_chunk(send, b"data: " + event + b"\n\n")
        else:
            self.attempts.close(ctx, answer.attempt, started, answer.status, None)
            if kept:
                whole = b"".join(kept)
                if b"[DONE]" in whole[-64:]:  # a stream that ended as it should
                    ctx.answer_bytes, ctx.answer_content_type = whole, b"text/event-stream"
        usage = relay.usage
        if usage is None and ctx.answer_cut:  # ended by a guardrail before the upstream said its usage
            usage = {"prompt_tokens": counted_prompt_tokens(ctx),
                     "completion_tokens": prompt_tokens({"prompt": "".join(ctx.guard.streamed)})}
        self.bill(ctx, answer, usage)
        await end_stream(send)
        ctx.overhead_seconds = max(0.0, ctx.elapsed() - ctx.upstream_seconds)

    @staticmethod
    def bill(ctx: RequestContext, answer: Answer, usage: dict | None) -> None:
        prompt, completion = token_counts(usage)
        cost = answer.model.pricing.cost(prompt, completion)
        ctx.prompt_tokens += prompt
        ctx.completion_tokens += completion
        ctx.cost_usd += cost
        if answer.attempt.get("paid_by") == "tenant":  # the tenant's own key: the provider bills it, not the budget
            ctx.tenant_paid_usd += cost
        answer.attempt.update(prompt_tokens=prompt, completion_tokens=completion, cost_usd=round(cost, 9))


def whole_answer_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """The headers of an answer sent in one go: what answered, what it cost, the gateway's own time."""
    ctx.overhead_seconds = ctx.elapsed() - ctx.upstream_seconds
    return ctx.response_headers + answer_headers(ctx) + [
        (b"x-gateway-cost-usd", b"%.9f" % ctx.cost_usd),
        (b"x-gateway-overhead-ms", b"%.2f" % (ctx.overhead_seconds * 1000))]


def answer_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    deployment = ctx.deployment
    headers = [
        (b"x-gateway-model", ctx.model.name.encode()),
        (b"x-gateway-deployment", deployment.name.encode()),
        (b"x-gateway-upstream-model", (ctx.upstream_model or deployment.upstream_model).encode()),
    ]
    if deployment.node is not None:
        headers.append((b"x-gateway-node", deployment.node.encode()))
        adapter = adapter_for(ctx, ctx.model)
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
