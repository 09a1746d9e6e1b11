"""A complete chat or text completion, told again as the SSE stream an upstream would have sent.

Used where the gateway holds a whole answer and the client asked for a stream: a small model's answer judged
sure enough by the cascade. The events follow OpenAI's: a
role chunk, the content (with its logprobs, when kept), tool calls, a chunk with the finish reason, the usage
chunk when the client asked for it (``stream_options.include_usage``), then ``[DONE]``.
"""

from __future__ import annotations

import orjson


def as_stream(response: dict, include_usage: bool) -> bytes:
    chat = any(isinstance(c, dict) and "message" in c for c in response.get("choices") or ())
    head = {"id": response.get("id", ""), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": response.get("created", 0), "model": response.get("model", "")}
    if response.get("system_fingerprint") is not None:
        head["system_fingerprint"] = response["system_fingerprint"]
    events: list[bytes] = []

    def emit(choices: list[dict], **extra) -> None:
        chunk = {**head, "choices": choices, **extra}
        if include_usage and "usage" not in chunk:
            chunk["usage"] = None
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")

    for choice in response.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message") or {}
            emit([{"index": index, "delta": {"role": message.get("role", "assistant"), "content": ""},
                   "logprobs": None, "finish_reason": None}])
            if message.get("content"):
                emit([{"index": index, "delta": {"content": message["content"]},
                       "logprobs": choice.get("logprobs"), "finish_reason": None}])
            if message.get("refusal"):
                emit([{"index": index, "delta": {"refusal": message["refusal"]}, "logprobs": None,
                       "finish_reason": None}])
            for position, call in enumerate(message.get("tool_calls") or ()):
                emit([{"index": index, "delta": {"tool_calls": [{"index": position, **call}]}, "logprobs": None,
                       "finish_reason": None}])
            emit([{"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}])
        else:
            emit([{"index": index, "text": choice.get("text", ""), "logprobs": choice.get("logprobs"),
                   "finish_reason": None}])
            emit([{"index": index, "text": "", "logprobs": None, "finish_reason": choice.get("finish_reason")}])
    if include_usage:
        emit([], usage=response.get("usage"))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)
