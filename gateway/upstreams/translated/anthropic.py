"""Chat completions to Anthropic's Messages API, on the gateway's own HTTP client, and its answers back.

The request: system and developer messages become ``system``; user parts become text, image (base64 or URL) and
document blocks (a PDF as ``file_data``); an assistant's tool calls become ``tool_use`` blocks and tool messages
``tool_result`` blocks in the user turn that follows (consecutive turns of one role are merged, as the API wants
them to alternate); ``max_tokens`` (required there: 4,096 when the client sets none), ``stop``, ``temperature``,
``top_p``, ``top_k``, ``user`` (as ``metadata.user_id``), tools and ``tool_choice`` (``parallel_tool_calls: false``
as ``disable_parallel_tool_use``). A JSON-schema response format becomes ``output_config.format`` (with the schema
keywords Anthropic's constrained decoding cannot enforce left out, as its own SDK does); a plain JSON-object format
becomes one forced tool whose input is the answer. Not sent (Anthropic has none): logprobs (a cascade judges the
answer by its words), penalties, ``seed``, ``logit_bias``. Refused with a 400: ``n`` above 1, audio input.

The answer: text and ``tool_use`` blocks as content and tool calls (thinking blocks are not shown), ``stop_reason``
as ``finish_reason``, usage with cache reads counted in the prompt as OpenAI counts them. Streams are translated
event by event as they arrive.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.upstreams.translated.common import (DONE, BrokenAnswer, ChunkWriter, Part, Turns, UnsupportedRequest,
                                                 arguments, completion, completion_id, max_tokens, stops, text_of,
                                                 usage, user_parts)

PROVIDER = "anthropic"
VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
JSON_TOOL = "json_answer"  # the forced tool a JSON-object response format is asked through
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter", "pause_turn": "stop", "model_context_window_exceeded": "length"}
# JSON Schema keywords Anthropic's structured outputs refuse (its SDK leaves them out the same way)
_UNENFORCEABLE = frozenset(("minItems", "maxItems", "uniqueItems", "contains", "minContains", "maxContains",
                            "prefixItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                            "minLength", "maxLength", "minProperties", "maxProperties", "patternProperties",
                            "propertyNames", "dependentRequired", "dependentSchemas", "unevaluatedProperties",
                            "if", "then", "else", "not"))


def request(body: dict, stream: bool) -> tuple[str, dict, bool]:
    """The path and body of the Messages request for a chat completions request, and whether the answer is asked
    through the JSON tool."""
    if type(body.get("n")) is int and body["n"] > 1:
        raise UnsupportedRequest(PROVIDER, "n", "this provider gives one choice per request")
    system, turns = _conversation(body.get("messages") or [])
    asked: dict[str, Any] = {"model": body["model"], "messages": turns,
                             "max_tokens": max_tokens(body) or DEFAULT_MAX_TOKENS}
    if system:
        asked["system"] = system
    for name in ("temperature", "top_p", "top_k"):
        if isinstance(body.get(name), (int, float)) and not isinstance(body.get(name), bool):
            asked[name] = body[name]
    sequences = stops(body)
    if sequences:
        asked["stop_sequences"] = sequences
    if isinstance(body.get("user"), str) and body["user"]:
        asked["metadata"] = {"user_id": body["user"]}
    if stream:
        asked["stream"] = True
    _tools(body, asked)
    json_tool = _response_format(body.get("response_format"), asked)
    return "/v1/messages", asked, json_tool


def _conversation(messages: list) -> tuple[str, list[dict]]:
    system: list[str] = []
    turns = Turns("content")
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            text = text_of(content)
            if text:
                system.append(text)
        elif role == "user":
            turns.add("user", [_block(part) for part in user_parts(content, f"messages.{index}", PROVIDER)])
        elif role == "assistant":
            blocks = [{"type": "text", "text": text_of(content)}] if text_of(content) else []
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id") or completion_id(),
                               "name": function.get("name", ""), "input": arguments(function.get("arguments"))})
            turns.add("assistant", blocks)
        elif role in ("tool", "function"):
            turns.add("user", [{"type": "tool_result",
                                "tool_use_id": message.get("tool_call_id") or message.get("name", ""),
                                "content": text_of(content)}])
    return "\n\n".join(system), turns.turns


def _block(part: Part) -> dict:
    if part.kind == "text":
        return {"type": "text", "text": part.data}
    if part.kind == "url":
        return {"type": "image", "source": {"type": "url", "url": part.data}}
    if part.kind == "inline":
        kind = "image" if part.media_type.startswith("image/") else "document"
        return {"type": kind, "source": {"type": "base64", "media_type": part.media_type, "data": part.data}}
    raise UnsupportedRequest(PROVIDER, f"{part.at}.type", f"{part.kind} input cannot be sent to this provider")


def _tools(body: dict, asked: dict) -> None:
    tools = [t.get("function") for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    if tools:
        asked["tools"] = [{"name": f.get("name", ""), "description": f.get("description") or "",
                           "input_schema": f.get("parameters") or {"type": "object", "properties": {}}}
                          for f in tools if isinstance(f, dict)]
    choice = body.get("tool_choice")
    chosen: dict | None = None
    if choice == "auto":
        chosen = {"type": "auto"}
    elif choice == "none":
        chosen = {"type": "none"}
    elif choice == "required":
        chosen = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        chosen = {"type": "tool", "name": choice["function"].get("name", "")}
    if body.get("parallel_tool_calls") is False and tools:
        chosen = {**(chosen or {"type": "auto"}), "disable_parallel_tool_use": True}
    if chosen is not None and (tools or chosen["type"] == "none"):
        asked["tool_choice"] = chosen


def _response_format(response_format: Any, asked: dict) -> bool:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            asked["output_config"] = {"format": {"type": "json_schema", "schema": _enforceable(schema)}}
        return False
    if kind == "json_object":
        asked.setdefault("tools", []).append({"name": JSON_TOOL, "description": "Give the answer as a JSON object.",
                                              "input_schema": {"type": "object"}})
        asked["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
        return True
    return False


def _enforceable(schema: Any) -> Any:
    if isinstance(schema, dict):
        kept = {k: _enforceable(v) for k, v in schema.items() if k not in _UNENFORCEABLE}
        if "oneOf" in kept:
            kept["anyOf"] = kept.pop("oneOf")
        return kept
    if isinstance(schema, list):
        return [_enforceable(item) for item in schema]
    return schema


# -- The answer ------------------------------------------------------------------------------------------------------

def _usage(counted: Any) -> dict:
    counted = counted if isinstance(counted, dict) else {}
    fresh, output = counted.get("input_tokens") or 0, counted.get("output_tokens") or 0
    read, written = counted.get("cache_read_input_tokens") or 0, counted.get("cache_creation_input_tokens") or 0
    return usage(fresh + read + written, output, read)


def answer(raw: bytes, model: str, json_tool: bool) -> bytes:
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BrokenAnswer("the provider's answer is not JSON") from None
    if not isinstance(message, dict):
        raise BrokenAnswer("the provider's answer is not an object")
    texts: list[str] = []
    calls: list[dict] = []
    for block in message.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use" and json_tool and block.get("name") == JSON_TOOL:
            texts.append(orjson.dumps(block.get("input") or {}).decode())
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name", ""),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        reply["tool_calls"] = calls
    finish = _FINISH.get(message.get("stop_reason"), "stop")
    if finish == "tool_calls" and not calls:
        finish = "stop"  # the JSON tool's answer is the content
    choice = {"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}
    answer_id = "chatcmpl-" + str(message.get("id") or completion_id()).removeprefix("msg_")
    return orjson.dumps(completion(answer_id, message.get("model") or model, [choice], _usage(message.get("usage"))))


class Stream:
    """Anthropic's stream events in, chat completion chunks out, as they arrive."""

    def __init__(self, model: str, json_tool: bool) -> None:
        self.writer = ChunkWriter(completion_id(), model)
        self.json_tool = json_tool
        self.counted: dict = {}
        self.blocks: dict[int, int | None] = {}  # a content block's index -> its tool call's index (None: text)
        self.calls = 0
        self.finish: str | None = None
        self.stopped = False

    def event(self, data: bytes) -> bytes:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BrokenAnswer("an event of the provider's stream is not JSON") from None
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            position = self.blocks.get(event.get("index"))
            if delta.get("type") == "text_delta" and position is None:
                return self.writer.delta(0, {"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta":
                piece = delta.get("partial_json", "")
                if position is None:  # the JSON tool's input is the answer's content
                    return self.writer.delta(0, {"content": piece}) if piece else b""
                return self.writer.delta(0, {"tool_calls": [{"index": position, "function": {"arguments": piece}}]})
            return b""  # thinking and its signature are not shown
        if kind == "message_start":
            message = event.get("message") or {}
            if message.get("id"):
                self.writer.id = "chatcmpl-" + str(message["id"]).removeprefix("msg_")
            self.writer.model = message.get("model") or self.writer.model
            self.counted.update(message.get("usage") or {})
            return self.writer.delta(0, {"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use" and not (self.json_tool and block.get("name") == JSON_TOOL):
                self.blocks[event.get("index")] = position = self.calls
                self.calls += 1
                return self.writer.delta(0, {"tool_calls": [{
                    "index": position, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name", ""), "arguments": ""}}]})
            return b""
        if kind == "message_delta":
            self.counted.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason is not None:
                self.finish = _FINISH.get(reason, "stop")
                if self.finish == "tool_calls" and not self.calls:
                    self.finish = "stop"
                return self.writer.delta(0, {}, self.finish)
            return b""
        if kind == "error":
            error = event.get("error") or {}
            raise BrokenAnswer(f"the provider's stream ended in an error: {error.get('message', '')[:200]}")
        if kind == "message_stop":
            self.stopped = True
        return b""  # ping, content_block_stop

    def end(self) -> bytes:
        if not self.stopped:
            raise BrokenAnswer("the provider's stream ended before message_stop")
        closing = b"" if self.finish is not None else self.writer.delta(0, {}, "stop")
        return closing + self.writer.usage(_usage(self.counted)) + DONE


def headers(base: dict[str, str], api_key: str | None) -> dict[str, str]:
    kept = {k: v for k, v in base.items() if k.lower() != "authorization"}
    if api_key:
        kept["x-api-key"] = api_key
    kept.setdefault("anthropic-version", VERSION)
    return kept
