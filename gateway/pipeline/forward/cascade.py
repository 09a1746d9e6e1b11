"""The cascade (a small model chosen by the router): the small model's whole answer is fetched first, with
logprobs, and its confidence measured. Sure enough: it is sent (its logprobs removed unless the client asked for
them; as an SSE stream if the client asked for one). Unsure: the next model up answers, streamed straight through.
Both calls are billed. If the larger model fails, the small model's answer is sent after all; if the small model
fails, the larger one answers.
"""

from __future__ import annotations

import orjson

from gateway.asgi import end_stream, send_chunk, start_stream
from gateway.config.types import Model
from gateway.errors import GatewayError
from gateway.observability.metrics import CASCADES
from gateway.pipeline.context import RequestContext
from gateway.pipeline.forward.attempt import FINAL_STATUSES, Answer
from gateway.pipeline.forward.order import AttemptOrder
from gateway.pipeline.forward.relay import Relay, whole_answer_headers
from gateway.routing.confidence import measure, strip_logprobs
from gateway.upstreams.replay import as_stream
from gateway.upstreams.usage import usage_of


class Cascade:
    def __init__(self, order: AttemptOrder, relay: Relay) -> None:
        self.order = order
        self.relay = relay

    async def __call__(self, ctx: RequestContext) -> None:
        larger = ctx.cascade_to
        body, asked_logprobs = _judged_body(ctx)
        try:
            small = await self.order.first_good(ctx, ctx.model, body, stream=False)
        except GatewayError as error:
            if error.status in FINAL_STATUSES:
                raise
            await self._escalate(ctx, larger, None)  # the small model failed: the larger one answers
            return
        self.relay.bill(ctx, small, usage_of(small.body))
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
            answer = await self.order.first_good(ctx, larger, ctx.body, stream=ctx.stream)
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
        await self.relay(ctx, answer)

    async def _send_small(self, ctx: RequestContext, answer: Answer, parsed: dict | None,
                          asked_logprobs: bool) -> None:
        if parsed is None:
            await self.relay.send_body(ctx, answer.status, answer.body, answer.content_type)
            return
        if not asked_logprobs:
            strip_logprobs(parsed)
        if not ctx.stream:
            await self.relay.send_body(ctx, answer.status, orjson.dumps(parsed), b"application/json")
            return
        include_usage = bool((ctx.body.get("stream_options") or {}).get("include_usage"))
        await start_stream(ctx.send, answer.status, whole_answer_headers(ctx))
        ctx.status = answer.status
        ctx.responded = True
        events = as_stream(parsed, include_usage)
        await send_chunk(ctx.send, events)
        await end_stream(ctx.send)
        if ctx.cache_capture:  # kept with its usage event, for the requests that will ask for it
            ctx.answer_bytes = events if include_usage else as_stream(parsed, True)
            ctx.answer_content_type = b"text/event-stream"


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
