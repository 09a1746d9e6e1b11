"""The last stage: get an answer from an upstream and relay it to the client, within the request's deadline.

In order: the cascade when the router chose a small model with a larger one behind it (cascade.py); otherwise the
first good answer of the attempts in their order (order.py: deployments, fleet nodes, fallback models; each call
in attempt.py), relayed to the client (relay.py).
"""

from __future__ import annotations

import asyncio
from typing import Callable

from gateway.asgi import DeadlinePassed, DisconnectGuard, end_stream, send_chunk
from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.pipeline.forward.attempt import Attempts, release_leases
from gateway.pipeline.forward.cascade import Cascade
from gateway.pipeline.forward.order import AttemptOrder
from gateway.pipeline.forward.relay import Relay
from gateway.upstreams.client import UpstreamClient
from gateway.upstreams.fleet import Fleet
from gateway.upstreams.select import DeploymentSelector


class Forward:
    def __init__(self, client: UpstreamClient, selector: DeploymentSelector,
                 fleet: Callable[[], Fleet | None] = lambda: None, providers: Callable[[], object] = lambda: None
                 ) -> None:
        self.fleet = fleet
        attempts = Attempts(client, fleet, providers)
        self.order = AttemptOrder(attempts, selector, fleet)
        self.relay = Relay(attempts)
        self.cascade = Cascade(self.order, self.relay)

    async def __call__(self, ctx: RequestContext) -> None:
        limit = ctx.config.request_timeout
        deadline = asyncio.get_running_loop().time() + limit - ctx.elapsed()
        try:
            async with DisconnectGuard(ctx.receive, deadline=deadline):
                if ctx.cascade_to is not None:
                    await self.cascade(ctx)
                    return
                answer = await self.order.first_good(ctx, ctx.model, ctx.body, stream=ctx.stream)
                await self.relay(ctx, answer)
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
