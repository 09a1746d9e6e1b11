"""Runs a request through its stages, answers errors in OpenAI's shape, and always settles and records.

A stage is ``async def stage(ctx)``: it reads and decides, raises GatewayError to refuse, may answer the request
itself (and set ``ctx.responded``, which ends the walk), and registers with ``ctx.on_finish`` whatever must happen
once the request is over (settling a reservation, say). The last stage forwards to an upstream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Sequence

from gateway.asgi import ClientDisconnected, send_response
from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.pipeline.record import record
from gateway.stores.ledger import Ledger

log = logging.getLogger("gateway.pipeline")

Stage = Callable[[RequestContext], Awaitable[None]]


class Load:
    """How many requests the pipeline is serving in this worker now (stages may act differently under load)."""

    __slots__ = ("in_flight",)

    def __init__(self) -> None:
        self.in_flight = 0


class Pipeline:
    def __init__(self, stages: Sequence[Stage], log_prompts: bool = False, ledger: Ledger | None = None,
                 load: Load | None = None) -> None:
        self.stages = tuple(stages)
        self.log_prompts = log_prompts
        self.ledger = ledger
        self.load = load or Load()

    async def run(self, ctx: RequestContext) -> None:
        ctx.walking = True
        self.load.in_flight += 1
        try:
            for stage in self.stages:
                await stage(ctx)
                if ctx.responded:
                    break
        except GatewayError as error:
            await self._refuse(ctx, error)
        except ClientDisconnected:
            ctx.client_disconnected = True
            ctx.status = 499  # the client closed the request before its answer was complete
            ctx.error_type = "client_disconnected"
        except asyncio.CancelledError:
            if ctx.abort_with is None:
                raise
            asyncio.current_task().uncancel()  # cancelled to stop the upstream call: answered with why
            await self._refuse(ctx, ctx.abort_with)
        except Exception:
            log.exception("request %s failed inside the gateway", ctx.request_id)
            await self._refuse(ctx, GatewayError(500, "The gateway failed to process this request.",
                                                 type="server_error", code="internal_error"))
        finally:
            ctx.walking = False
            self.load.in_flight -= 1
            for finisher in reversed(ctx.finishers):
                try:
                    pending = finisher(ctx)
                    if pending is not None:  # most finishers wait for nothing: no coroutine made for them
                        await pending
                except Exception:
                    log.exception("finishing request %s failed", ctx.request_id)
            record(ctx, self.log_prompts, self.ledger)

    @staticmethod
    async def _refuse(ctx: RequestContext, error: GatewayError) -> None:
        ctx.error_type = error.code or error.type
        if ctx.responded:
            return  # a stream already started; the stage that broke it ended it
        ctx.status = error.status
        headers = ctx.response_headers + [(k.encode(), v.encode()) for k, v in error.headers.items()]
        await send_response(ctx.send, error.status, error.body(), headers)
        ctx.responded = True
