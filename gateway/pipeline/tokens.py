"""A request's prompt tokens, counted once: exactly for an ordinary body, estimated for the reservation of a large one
(counted in a worker thread where the exact figure decides something)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.tokens import prompt_tokens

if TYPE_CHECKING:
    from gateway.pipeline.context import RequestContext

# A body larger than this is not counted for its reservation: its tokens are estimated from its size (counting
# 100,000 words takes about 110 ms of a core, which other tenants' requests would wait for on a machine with few).
# Where the exact count matters (a prompt that may not fit its model's context window), it is made in a worker
# thread (tiktoken lets go of the GIL while it encodes). The reservation is settled to the upstream's own usage when
# the request ends, so an estimate costs a tenant nothing.
OFF_THE_LOOP_BYTES = 256 * 1024
BYTES_PER_TOKEN = 4  # English prose runs about 4.2 characters a token in cl100k, code about 3


async def count_large_prompt(ctx: "RequestContext") -> None:
    """Count a large body's prompt tokens in a worker thread, once, before a stage needs the exact count."""
    if ctx.prompt_estimate is None and ctx.body_size > OFF_THE_LOOP_BYTES:
        ctx.prompt_estimate = await asyncio.to_thread(prompt_tokens, ctx.body)


def counted_prompt_tokens(ctx: "RequestContext") -> int:
    """``prompt_tokens`` of the request's body, counted once per request."""
    if ctx.prompt_estimate is None:
        ctx.prompt_estimate = prompt_tokens(ctx.body)
    return ctx.prompt_estimate


def reserved_prompt_tokens(ctx: "RequestContext") -> int:
    """The prompt tokens to reserve against limits: counted for an ordinary body, estimated from its size for a
    large one (unless it has been counted already)."""
    if ctx.prompt_estimate is None and ctx.body_size > OFF_THE_LOOP_BYTES:
        return ctx.body_size // BYTES_PER_TOKEN
    return counted_prompt_tokens(ctx)
