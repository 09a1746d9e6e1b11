"""The last stage: send the request to a deployment and relay its answer to the client as it comes.

Non-streamed answers are passed on byte for byte. Streams are passed on event by event as they arrive; the usage
event is read on the way past. If the client goes away, the upstream call is cancelled at once.
"""

from __future__ import annotations

import time

import aiohttp
import orjson

from gateway.asgi import DisconnectGuard, end_stream, send_chunk, send_response, start_stream
from gateway.config.types import Deployment
from gateway.errors import GatewayError, error_body
from gateway.observability.metrics import UPSTREAM_ERRORS
from gateway.pipeline.context import RequestContext
from gateway.upstreams.client import UpstreamClient
from gateway.upstreams.errors import UPSTREAM_FAILURES, from_exception, from_upstream_response
from gateway.upstreams.select import DeploymentSelector
from gateway.upstreams.sse import SSERelay
from gateway.upstreams.usage import token_counts, usage_of


class Forward:
    def __init__(self, client: UpstreamClient, selector: DeploymentSelector) -> None:
        self.client = client
        self.selector = selector

    async def __call__(self, ctx: RequestContext) -> None:
        deployment = self.selector.pick(ctx.model)
        ctx.deployment = deployment
        payload = self._payload(ctx, deployment)
        ctx.response_headers += [
            (b"x-gateway-model", ctx.model.name.encode()),
            (b"x-gateway-deployment", deployment.name.encode()),
            (b"x-gateway-upstream-model", deployment.upstream_model.encode()),
        ]
        async with DisconnectGuard(ctx.receive):
            ctx.upstream_started = time.perf_counter()
            try:
                response = await self.client.post(deployment, ctx.endpoint.upstream_path, payload)
            except UPSTREAM_FAILURES as exc:
                raise self._failure(ctx, deployment, exc) from None
            try:
                if response.status >= 400:
                    body = await self._read(ctx, deployment, response)
                    UPSTREAM_ERRORS.labels(deployment.name, str(response.status)).inc()
                    raise from_upstream_response(deployment, response.status, body)
                if ctx.stream and response.content_type == "text/event-stream":
                    await self._relay_stream(ctx, deployment, response)
                else:
                    await self._relay_body(ctx, deployment, response)
            finally:
                response.release()

    def _payload(self, ctx: RequestContext, deployment: Deployment) -> bytes:
        body = ctx.body
        body["model"] = deployment.upstream_model
        if ctx.stream:
            options = body.get("stream_options") or {}
            if not options.get("include_usage"):
                # Ask for usage so the stream can be accounted; the relay drops it again for this client.
                body["stream_options"] = {**options, "include_usage": True}
                ctx.usage_injected = True
        return orjson.dumps(body)

    def _failure(self, ctx: RequestContext, deployment: Deployment, exc: BaseException) -> GatewayError:
        ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
        error = from_exception(deployment, exc)
        UPSTREAM_ERRORS.labels(deployment.name, error.code or "error").inc()
        return error

    async def _read(self, ctx: RequestContext, deployment: Deployment, response: aiohttp.ClientResponse) -> bytes:
        try:
            body = await response.read()
        except UPSTREAM_FAILURES as exc:
            raise self._failure(ctx, deployment, exc) from None
        ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
        return body

    async def _relay_body(self, ctx: RequestContext, deployment: Deployment, response: aiohttp.ClientResponse) -> None:
        body = await self._read(ctx, deployment, response)
        ctx.prompt_tokens, ctx.completion_tokens = token_counts(usage_of(body))
        ctx.overhead_seconds = ctx.elapsed() - ctx.upstream_seconds
        headers = ctx.response_headers + [(b"x-gateway-overhead-ms", b"%.2f" % (ctx.overhead_seconds * 1000))]
        content_type = response.headers.get("Content-Type", "application/json").encode()
        await send_response(ctx.send, response.status, body, headers, content_type)
        ctx.status = response.status
        ctx.responded = True

    async def _relay_stream(self, ctx: RequestContext, deployment: Deployment, response: aiohttp.ClientResponse) -> None:
        first_byte_wait = time.perf_counter() - ctx.upstream_started
        overhead_ms = (ctx.elapsed() - first_byte_wait) * 1000
        await start_stream(ctx.send, response.status,
                           ctx.response_headers + [(b"x-gateway-overhead-ms", b"%.2f" % overhead_ms)])
        ctx.status = response.status
        ctx.responded = True
        relay = SSERelay(drop_usage_event=ctx.usage_injected)
        send = ctx.send
        try:
            async for chunk in response.content.iter_any():
                out = relay.feed(chunk)
                if out:
                    await send_chunk(send, out)
            rest = relay.finish()
            if rest:
                await send_chunk(send, rest)
        except UPSTREAM_FAILURES as exc:
            # The status line is gone already: end the stream with an error event the SDKs raise as an APIError.
            error = self._failure(ctx, deployment, exc)
            ctx.status, ctx.error_type = error.status, error.code
            event = error_body(f"{error.message} The stream is incomplete.", error.type, None, error.code)
            await send_chunk(send, b"data: " + event + b"\n\n")
        else:
            ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
        ctx.prompt_tokens, ctx.completion_tokens = token_counts(relay.usage)
        await end_stream(send)
        ctx.overhead_seconds = max(0.0, ctx.elapsed() - ctx.upstream_seconds)
