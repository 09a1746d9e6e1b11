"""Reading ``usage`` out of an upstream's answer without parsing the whole of it.

An embeddings answer can be megabytes of numbers; its usage is a small object near the end. Parse that object
alone, and fall back to the whole body only if the shortcut does not find a well-formed one.
"""

from __future__ import annotations

import orjson


def usage_of(body: bytes) -> dict | None:
    start = body.rfind(b'"usage"')
    if start >= 0:
        opening = body.find(b"{", start)
        if opening >= 0 and body[start + 7:opening].strip(b" \t\r\n:") == b"":
            depth = 0
            for position in range(opening, min(len(body), opening + 4096)):
                byte = body[position]
                if byte == 0x7B:  # {
                    depth += 1
                elif byte == 0x7D:  # }
                    depth -= 1
                    if depth == 0:
                        try:
                            usage = orjson.loads(body[opening:position + 1])
                        except orjson.JSONDecodeError:
                            break
                        return usage if isinstance(usage, dict) else None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    return usage if isinstance(usage, dict) else None


def token_counts(usage: dict | None) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of a usage object: chat completions' (prompt and completion tokens),
    or the Responses API's and Anthropic's (input and output tokens; Anthropic's input excludes the tokens read
    from or written to its prompt cache, counted here); zeros where it says nothing."""
    if not usage:
        return 0, 0
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    else:
        prompt = sum(value for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
                     if type(value := usage.get(name)) is int)
        completion = usage.get("output_tokens") or 0
    return (prompt if type(prompt) is int else 0), (completion if type(completion) is int else 0)
