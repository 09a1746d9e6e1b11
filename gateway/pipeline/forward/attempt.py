"""One attempt: a call to one deployment (a node of the fleet, a provider's API, an OpenAI-compatible upstream),
and what it says: a good answer (a stream still to be read, or a whole body), or a failure that tells the order of
attempts whether another deployment may do better (``final``: the request's own fault) or this one is worth asking
once more (``again``: a node lost its adapter, which is loaded again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from gateway.config.types import Adapter, Deployment, Model
from gateway.errors import GatewayError
from gateway.observability.metrics import UPSTREAM_ERRORS
from gateway.pipeline.context import RequestContext
from gateway.pipeline.parse import encode
from gateway.upstreams import translated
from gateway.upstreams.client import UpstreamClient
from gateway.upstreams.errors import UPSTREAM_FAILURES, Unreachable, from_exception, from_upstream_response
from gateway.upstreams.fleet import AdapterLoadFailed, Fleet
from gateway.upstreams.http1 import Response

# Statuses that say the request itself is wrong: another deployment would answer the same.
FINAL_STATUSES = frozenset((400, 413, 422))


@dataclass(slots=True)
class Answer:
    """A good upstream answer: a stream still to be read, or a whole body already read."""

    model: Model
    deployment: Deployment
    status: int
    response: Response | None  # an open stream
    body: bytes | None
    content_type: bytes
    attempt: dict  # this call's entry in ctx.attempts
    native: bool = False  # in the client's own API (its request sent as it came), not chat completions'


class Failed(Exception):
    def __init__(self, error: GatewayError, final: bool, again: bool = False) -> None:
        self.error = error
        self.final = final
        self.again = again  # worth one more try on the same deployment


class Attempts:
    def __init__(self, client: UpstreamClient, fleet: Callable[[], Fleet | None],
                 providers: Callable[[], object]) -> None:
        self.client = client
        self.fleet = fleet  # the inference fleet, for models served by pools of vLLM nodes
        self.providers = providers  # LiteLLM's path, loaded when the config has a provider that needs it

    async def call(self, ctx: RequestContext, model: Model, deployment: Deployment, body: dict,
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
            self.close(ctx, attempt, started, error.status, error.code)
            raise Failed(error, final=False) from None
        except GatewayError as error:  # a request this provider's API cannot carry; another deployment may
            self.close(ctx, attempt, started, error.status, error.code)
            raise Failed(error, final=False) from None
        if response.status >= 400:
            error = from_upstream_response(deployment, response.status, content)
            lora = next((lora for leased, _, lora in ctx.leases if leased is attempt), None)
            if response.status == 404 and lora is not None and lora.encode() in content:
                # The node no longer has the adapter the gateway thought it had (restarted, or unloaded by another
                # hand): not the client's fault; loaded again and asked again.
                self.fleet().lost(deployment, lora)
                self.close(ctx, attempt, started, response.status, "adapter_lost")
                raise Failed(GatewayError(503, f"The node lost the adapter `{attempt['adapter']}`.",
                                           type="upstream_error", code="adapter_unavailable"), final=False, again=True)
            self.close(ctx, attempt, started, response.status, error.code or error.type)
            raise Failed(error, final=response.status in FINAL_STATUSES)
        if content is not None:
            self.close(ctx, attempt, started, response.status, None)
        else:
            attempt["status"] = response.status
        ctx.model, ctx.deployment = model, deployment
        if native:
            attempt["api"] = ctx.endpoint.route
        return Answer(model, deployment, response.status, response_for_stream, content,
                      response.headers.get("Content-Type", "application/json").encode(), attempt, native)

    async def _on_node(self, ctx: RequestContext, model: Model, deployment: Deployment, attempt: dict) -> str:
        """Before a call to a fleet node: its adapter registered there, its load counted; the model name to send."""
        fleet = self.fleet()
        adapter = adapter_for(ctx, model)
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
            raise Failed(error, final=False) from None
        lora = adapter.lora_name if adapter is not None else None
        fleet.started(deployment, lora)
        ctx.leases.append((attempt, deployment, lora))
        return upstream

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
            raise Failed(error, final=False)
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

    def close(self, ctx: RequestContext, attempt: dict, started: float, status: int, error: str | None) -> None:
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


def adapter_for(ctx: RequestContext, model: Model) -> Adapter | None:
    """The tenant's adapter for ``model``, unless the request goes without it (the tenant's choice on failure)."""
    adapter = ctx.adapter
    return adapter if adapter is not None and adapter.base == model.name and not ctx.adapter_bypassed else None


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
