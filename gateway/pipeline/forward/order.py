"""The order of attempts: the model's deployments in turn (see upstreams/select.py; a fleet pool's stand for its
nodes, best first), then its configured fallback models, at most ``max_attempts`` calls in all. A connection
failure, a timeout, a 429 or a 5xx (or an upstream refusing the gateway's credentials, or not knowing the model)
moves on to the next attempt; an upstream's 400, 413 or 422 is about the request itself and goes back to the client
at once. The first good answer is the one; otherwise the last error. Every attempt is recorded in ``ctx.attempts``.
"""

from __future__ import annotations

from typing import Callable

from gateway.config.types import Deployment, Model
from gateway.errors import GatewayError
from gateway.observability.metrics import FALLBACKS
from gateway.pipeline.context import RequestContext
from gateway.pipeline.forward.attempt import Answer, Attempts, Failed, adapter_for
from gateway.upstreams.fleet import Fleet
from gateway.upstreams.select import DeploymentSelector


class AttemptOrder:
    def __init__(self, attempts: Attempts, selector: DeploymentSelector, fleet: Callable[[], Fleet | None]) -> None:
        self.attempts = attempts
        self.selector = selector
        self.fleet = fleet

    async def first_good(self, ctx: RequestContext, model: Model, body: dict, stream: bool) -> Answer:
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
                        answer = await self.attempts.call(ctx, candidate, deployment, body, stream)
                    except Failed as failure:
                        if not failure.again:
                            raise
                        answer = await self.attempts.call(ctx, candidate, deployment, body, stream)
                    self.selector.succeeded(candidate, deployment)
                    return answer
                except Failed as failure:
                    ctx.model, ctx.deployment = candidate, deployment  # the log names the last one tried
                    if failure.final:  # the request's own fault, not the deployment's
                        raise failure.error from None
                    if deployment.node is None:  # a node's failures are the fleet's to weigh
                        self.selector.failed(candidate, deployment, policy)
                    last_error = failure.error
            if (last_error is not None and last_error.code == "adapter_unavailable" and ctx.adapter is not None
                    and ctx.adapter.on_failure == "base" and not ctx.adapter_bypassed):
                ctx.adapter_bypassed = True  # the tenant's choice: its base model without the adapter
                return await self.first_good(ctx, model, body, stream)
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
        adapter = adapter_for(ctx, model)
        expanded = []
        for deployment in deployments:
            if deployment.pool is None:
                expanded.append(deployment)
            elif fleet is not None:
                expanded += fleet.candidates(deployment, adapter)
        return expanded


def _calls(ctx: RequestContext) -> int:
    """Upstream calls made so far; an adapter a node could not load is not one (the next node may)."""
    return sum(1 for attempt in ctx.attempts if attempt.get("error") != "adapter_unavailable")
