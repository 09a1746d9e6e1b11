"""The other providers' protocols the simulator speaks, so that the gateway's paths to them are tested against
real HTTP servers: Anthropic's Messages API and Google's Gemini ``generateContent``.

A request is translated into OpenAI's terms (messages, tools, tool choice, response format) and answered by the
same generator as the OpenAI routes; a writer then tells the answer in the provider's own format, whole or as its
event stream. Errors keep each provider's shape. The wire formats follow the providers' API references:

- Anthropic: ``POST /v1/messages`` with ``x-api-key`` and ``anthropic-version`` (and ``output_format`` for
  structured outputs); an answer is a ``message`` with
  ``text`` and ``tool_use`` content blocks, ``stop_reason`` and ``usage`` (input and output tokens); a stream is
  ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta`` or
  ``input_json_delta``), ``content_block_stop``, ``message_delta`` (stop reason, output tokens), ``message_stop``;
  an error is ``{"type": "error", "error": {"type", "message"}}``.
- Gemini: ``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent?alt=sse`` with
  ``x-goog-api-key`` (or ``?key=``); an answer has ``candidates`` (``content.parts``: ``text`` or
  ``functionCall``, ``finishReason``) and ``usageMetadata``; a stream is one such answer a ``data:`` event; an error
  is ``{"error": {"code", "message", "status"}}``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import orjson

from gateway.sim import generate
from gateway.sim.tools import forced_tool

_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                     503: "overloaded_error", 529: "overloaded_error"}
_GEMINI_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


class ProtocolError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def anthropic_error(status: int, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": _ANTHROPIC_ERRORS.get(status, "api_error"),
                                                    "message": message}})


def gemini_error(status: int, message: str) -> bytes:
    return orjson.dumps({"error": {"code": status, "message": message,
                                   "status": _GEMINI_STATUSES.get(status, "INTERNAL")}})


# -- Anthropic -------------------------------------------------------------------------------------------------------

def from_anthropic(body: dict) -> dict:
    """An Anthropic Messages request in OpenAI's terms."""
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        raise ProtocolError(400, "max_tokens: Field required")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise ProtocolError(400, "messages: Field required")
    messages = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _blocks_text(system)})
    for message in body["messages"]:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
            raise ProtocolError(400, "messages: each message needs a role of user, assistant or system")
        content = message.get("content")
        blocks = content if isinstance(content, list) else []
        results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
        calls = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
        # An agent's loop: tool results answer the tool calls before them (a model then answers in words)
        messages += [{"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": _blocks_text(b.get("content"))}
                     for b in results]
        rest = [b for b in blocks if b not in results and b not in calls] if blocks else content
        if calls:
            messages.append({"role": "assistant", "content": _blocks_text(rest), "tool_calls": [
                {"id": b.get("id"), "type": "function",
                 "function": {"name": b.get("name"), "arguments": orjson.dumps(b.get("input")).decode()}}
                for b in calls]})
        elif rest or not results:
            messages.append({"role": message["role"], "content": _blocks_text(rest)})
    converted: dict[str, Any] = {"model": body.get("model"), "messages": messages, "max_tokens": body["max_tokens"],
                                 "stream": bool(body.get("stream"))}
    output = body.get("output_format")  # structured outputs: the text is JSON valid against the schema
    if isinstance(body.get("output_config"), dict) and body["output_config"].get("format") is not None:
        output = body["output_config"]["format"]
    if isinstance(output, dict) and output.get("type") == "json_schema":
        converted["response_format"] = {"type": "json_schema", "json_schema": {"schema": output.get("schema")}}
    tools = body.get("tools") or []
    if tools:
        converted["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description", ""), "parameters": t.get("input_schema")}}
            for t in tools if isinstance(t, dict)]
        choice = body.get("tool_choice") or {"type": "auto"}
        kind = choice.get("type") if isinstance(choice, dict) else "auto"
        converted["tool_choice"] = ({"type": "function", "function": {"name": choice.get("name")}} if kind == "tool"
                                    else "required" if kind == "any" else "none" if kind == "none" else "auto")
    return converted


def _blocks_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            parts.append(_blocks_text(block.get("content")))
        elif block.get("type") == "tool_use":
            parts.append(orjson.dumps(block.get("input")).decode())
    return " ".join(parts)


class AnthropicWriter:
    """Answers as Anthropic's Messages API writes them."""

    def __init__(self, body: dict, kind: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.model, self.prompt_tokens, self.completion_tokens = model, prompt_tokens, completion_tokens
        self.id = f"msg_{random.getrandbits(80):020x}"
        self.tool = forced_tool(body)[0]

    def _block(self, completion: generate.Completion) -> dict:
        if self.tool:
            return {"type": "tool_use", "id": f"toolu_{random.getrandbits(64):016x}", "name": self.tool,
                    "input": orjson.loads(completion.text)}
        return {"type": "text", "text": completion.text}

    def _stop(self, completion: generate.Completion) -> str:
        return "tool_use" if self.tool else "max_tokens" if completion.finish_reason == "length" else "end_turn"

    def full_body(self, completions: list[generate.Completion]) -> bytes:
        completion = completions[0]
        return orjson.dumps({"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                             "content": [self._block(completion)], "stop_reason": self._stop(completion),
                             "stop_sequence": None,
                             "usage": {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens}})

    def opening(self, completions: list[generate.Completion]) -> bytes:
        start = {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 1}}}
        block = ({"type": "tool_use", "id": f"toolu_{random.getrandbits(64):016x}", "name": self.tool, "input": {}}
                 if self.tool else {"type": "text", "text": ""})
        return (_event("message_start", start)
                + _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
                + _event("ping", {"type": "ping"}))

    def token_chunk(self, index: int, completion: generate.Completion, position: int) -> bytes:
        if index:
            return b""
        token = completion.tokens[position]
        delta = ({"type": "input_json_delta", "partial_json": token} if self.tool
                 else {"type": "text_delta", "text": token})
        return _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    def closing(self, completions: list[generate.Completion]) -> bytes:
        completion = completions[0]
        return (_event("content_block_stop", {"type": "content_block_stop", "index": 0})
                + _event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": self._stop(completion), "stop_sequence": None},
                                           "usage": {"output_tokens": self.completion_tokens}})
                + _event("message_stop", {"type": "message_stop"}))


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


# -- Gemini ----------------------------------------------------------------------------------------------------------

def from_gemini(body: dict, model: str, stream: bool) -> dict:
    """A Gemini generateContent request in OpenAI's terms (LiteLLM writes its fields in snake_case, Google's
    reference in camelCase: both are read)."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise ProtocolError(400, "* GenerateContentRequest.contents: contents is not specified")
    messages = []
    system = _get(body, "systemInstruction", "system_instruction")
    if isinstance(system, dict):
        messages.append({"role": "system", "content": _parts_text(system.get("parts"))})
    for content in contents:
        if not isinstance(content, dict):
            continue
        role = "assistant" if content.get("role") == "model" else "user"
        messages.append({"role": role, "content": _parts_text(content.get("parts"))})
    config = _get(body, "generationConfig", "generation_config") or {}
    converted: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    limit = _get(config, "maxOutputTokens", "max_output_tokens")
    if isinstance(limit, int) and limit > 0:
        converted["max_tokens"] = limit
    schema = _get(config, "responseSchema", "response_schema") or _get(config, "responseJsonSchema",
                                                                       "response_json_schema")
    if isinstance(schema, dict):
        converted["response_format"] = {"type": "json_schema", "json_schema": {"schema": _lower_types(schema)}}
    elif _get(config, "responseMimeType", "response_mime_type") == "application/json":
        converted["response_format"] = {"type": "json_object"}
    declarations = [d for tool in body.get("tools") or () if isinstance(tool, dict)
                    for d in _get(tool, "functionDeclarations", "function_declarations") or ()]
    if declarations:
        converted["tools"] = [{"type": "function", "function": {
            "name": d.get("name"), "parameters": _lower_types(_get(d, "parametersJsonSchema", "parameters_json_schema",
                                                                   "parameters") or {"type": "object"})}}
            for d in declarations if isinstance(d, dict)]
        calling = _get(_get(body, "toolConfig", "tool_config") or {}, "functionCallingConfig",
                       "function_calling_config") or {}
        mode = str(calling.get("mode", "AUTO")).upper()
        allowed = _get(calling, "allowedFunctionNames", "allowed_function_names") or []
        if mode == "ANY":
            converted["tool_choice"] = ({"type": "function", "function": {"name": allowed[0]}} if len(allowed) == 1
                                        else "required")
        else:
            converted["tool_choice"] = "none" if mode == "NONE" else "auto"
    return converted


def _get(mapping: dict, *names: str) -> Any:
    for name in names:
        if name in mapping:
            return mapping[name]
    return None


def _parts_text(parts: Any) -> str:
    texts = []
    for part in parts or ():
        if isinstance(part, dict):
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif "functionResponse" in part or "function_response" in part:
                texts.append(orjson.dumps(_get(part, "functionResponse", "function_response")).decode())
    return " ".join(texts)


def _lower_types(schema: Any) -> Any:
    """Gemini's schemas write types in capitals (OBJECT, STRING); JSON Schema in lower case."""
    if isinstance(schema, dict):
        return {k: (v.lower() if k == "type" and isinstance(v, str) else _lower_types(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_lower_types(item) for item in schema]
    return schema


class GeminiWriter:
    """Answers as Gemini's generateContent writes them."""

    def __init__(self, body: dict, kind: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.model, self.prompt_tokens, self.completion_tokens = model, prompt_tokens, completion_tokens
        self.tool = forced_tool(body)[0]
        self.response_id = f"{random.getrandbits(64):016x}"

    def _usage(self, completion_tokens: int | None = None) -> dict:
        done = self.completion_tokens if completion_tokens is None else completion_tokens
        return {"promptTokenCount": self.prompt_tokens, "candidatesTokenCount": done,
                "totalTokenCount": self.prompt_tokens + done}

    def _answer(self, parts: list[dict], finish: str | None, usage: dict) -> dict:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
        if finish is not None:
            candidate["finishReason"] = finish
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": self.model,
                "responseId": self.response_id, "createTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def _parts(self, completion: generate.Completion) -> list[dict]:
        if self.tool:
            # Gemini's thinking models sign a call; the signature must come back with the call in the next turn
            return [{"functionCall": {"name": self.tool, "args": orjson.loads(completion.text)},
                     "thoughtSignature": "c2ltLXNpZ25hdHVyZQ=="}]
        return [{"text": completion.text}]

    @staticmethod
    def _finish(completion: generate.Completion) -> str:
        return "MAX_TOKENS" if completion.finish_reason == "length" else "STOP"

    def full_body(self, completions: list[generate.Completion]) -> bytes:
        completion = completions[0]
        return orjson.dumps(self._answer(self._parts(completion), self._finish(completion), self._usage()))

    def opening(self, completions: list[generate.Completion]) -> bytes:
        return b""

    def token_chunk(self, index: int, completion: generate.Completion, position: int) -> bytes:
        if index or self.tool:  # a function call arrives whole, in the last event
            return b""
        answer = self._answer([{"text": completion.tokens[position]}], None, self._usage(position + 1))
        return b"data: " + orjson.dumps(answer) + b"\r\n\r\n"

    def closing(self, completions: list[generate.Completion]) -> bytes:
        completion = completions[0]
        parts = self._parts(completion) if self.tool else [{"text": ""}]
        return b"data: " + orjson.dumps(self._answer(parts, self._finish(completion), self._usage())) + b"\r\n\r\n"


# -- OpenAI's Responses API (vLLM serves it too) ---------------------------------------------------------------------

def from_responses(body: dict) -> dict:
    """A Responses request in chat completions' terms. Like vLLM, the simulator keeps no conversations: a request
    naming a previous response is refused."""
    if body.get("previous_response_id"):
        raise ProtocolError(400, "previous_response_id is not supported: this server stores no responses")
    value = body.get("input")
    if not isinstance(value, (str, list)) or not value:
        raise ProtocolError(400, "input: Field required")
    messages: list[dict] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    for item in [{"role": "user", "content": value}] if isinstance(value, str) else value:
        if not isinstance(item, dict):
            raise ProtocolError(400, "input: each item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _response_text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": str(item.get("output"))})
    converted: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": bool(body.get("stream"))}
    if isinstance(body.get("max_output_tokens"), int):
        converted["max_tokens"] = body["max_output_tokens"]
    tools = [t for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    if tools:
        converted["tools"] = [{"type": "function", "function": {"name": t.get("name"),
                                                                "parameters": t.get("parameters")}} for t in tools]
        choice = body.get("tool_choice", "auto")
        converted["tool_choice"] = ({"type": "function", "function": {"name": choice.get("name")}}
                                    if isinstance(choice, dict) else choice)
    format_ = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(format_, dict) and format_.get("type") == "json_schema":
        converted["response_format"] = {"type": "json_schema", "json_schema": {"schema": format_.get("schema")}}
    return converted


def _response_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content or () if isinstance(p, dict) and isinstance(p.get("text"), str))


class ResponsesWriter:
    """Answers as OpenAI's Responses API writes them (the events of a stream numbered in order)."""

    def __init__(self, body: dict, kind: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.body, self.model = body, model
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.id = f"resp_{random.getrandbits(96):024x}"
        self.item_id = f"{'fc' if forced_tool(body)[0] else 'msg'}_{random.getrandbits(96):024x}"
        self.call_id = f"call_{random.getrandbits(64):016x}"
        self.tool = forced_tool(body)[0]
        self.sequence = 0
        self.created = int(time.time())

    def _item(self, text: str, status: str = "completed") -> dict:
        if self.tool:
            return {"type": "function_call", "id": self.item_id, "call_id": self.call_id, "name": self.tool,
                    "arguments": text, "status": status}
        return {"type": "message", "id": self.item_id, "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    def _response(self, status: str, output: list[dict], completion: generate.Completion | None = None) -> dict:
        incomplete = completion is not None and completion.finish_reason == "length" and not self.tool
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": "incomplete" if incomplete else status, "model": self.model, "output": output,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "error": None,
                "store": self.body.get("store", True), "previous_response_id": None,
                "instructions": self.body.get("instructions"), "tools": self.body.get("tools") or [],
                "usage": {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens,
                          "total_tokens": self.prompt_tokens + self.completion_tokens,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}} if completion is not None else None}

    def _emit(self, data: dict) -> bytes:
        data = {**data, "sequence_number": self.sequence}
        self.sequence += 1
        return _event(data["type"], data)

    def full_body(self, completions: list[generate.Completion]) -> bytes:
        completion = completions[0]
        return orjson.dumps(self._response("completed", [self._item(completion.text)], completion))

    def opening(self, completions: list[generate.Completion]) -> bytes:
        pending = self._response("in_progress", [])
        out = (self._emit({"type": "response.created", "response": pending})
               + self._emit({"type": "response.in_progress", "response": pending})
               + self._emit({"type": "response.output_item.added", "output_index": 0,
                             "item": {**self._item("", "in_progress"), **({} if self.tool else {"content": []})}}))
        if not self.tool:
            out += self._emit({"type": "response.content_part.added", "item_id": self.item_id, "output_index": 0,
                               "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})
        return out

    def token_chunk(self, index: int, completion: generate.Completion, position: int) -> bytes:
        if index:
            return b""
        token = completion.tokens[position]
        if self.tool:
            return self._emit({"type": "response.function_call_arguments.delta", "item_id": self.item_id,
                               "output_index": 0, "delta": token})
        return self._emit({"type": "response.output_text.delta", "item_id": self.item_id, "output_index": 0,
                           "content_index": 0, "delta": token, "logprobs": []})

    def closing(self, completions: list[generate.Completion]) -> bytes:
        completion = completions[0]
        item = self._item(completion.text)
        if self.tool:
            out = self._emit({"type": "response.function_call_arguments.done", "item_id": self.item_id,
                              "output_index": 0, "arguments": completion.text})
        else:
            out = (self._emit({"type": "response.output_text.done", "item_id": self.item_id, "output_index": 0,
                               "content_index": 0, "text": completion.text, "logprobs": []})
                   + self._emit({"type": "response.content_part.done", "item_id": self.item_id, "output_index": 0,
                                 "content_index": 0, "part": item["content"][0]}))
        out += self._emit({"type": "response.output_item.done", "output_index": 0, "item": item})
        final = self._response("completed", [item], completion)
        return out + self._emit({"type": f"response.{final['status']}", "response": final})
