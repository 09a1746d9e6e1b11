"""Anthropic's Messages API in chat completions' terms, and chat completions' answers told back as Anthropic's.

Kept: system prompts (string or text blocks, and system messages mid-conversation), text and image blocks, tools and
``tool_choice`` (auto, any, tool, none, ``disable_parallel_tool_use``), ``tool_use`` and ``tool_result`` blocks (as
assistant tool calls and tool messages), PDF and text documents (as file and text parts), ``max_tokens``,
``stop_sequences``, ``temperature``, ``top_p``, ``top_k`` (vLLM honours it), ``metadata.user_id`` (as ``user``) and
structured output (``output_config.format`` or ``output_format``, as a JSON-schema response format). Dropped:
``cache_control`` marks, ``thinking`` settings and thinking blocks (they carry a signature only Anthropic can
check), ``output_config.effort``, ``context_management``, ``service_tier``, ``container``. Server tools (web search,
code execution, computer use...) are refused: only an Anthropic upstream runs them, and a request sent on to one as
it came (a deployment whose ``apis`` include ``messages``) keeps all of them.

Answers: the text and tool calls as ``text`` and ``tool_use`` blocks; ``finish_reason`` as ``stop_reason`` (stop:
``end_turn``, or ``stop_sequence`` when the upstream names the sequence it stopped at; length: ``max_tokens``;
tool_calls: ``tool_use``; content_filter: ``refusal``); usage as input and output tokens. Streams are translated
event by event as they arrive.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from gateway.asgi import header
from gateway.config.types import Deployment
from gateway.errors import bad_request
from gateway.pipeline.context import RequestContext
from gateway.pipeline.parse import absent_or_invalid, encode, invalid_type, missing
from gateway.protocols.edge import first_choice

DEFAULT_VERSION = b"2023-06-01"
_ROLES = ("user", "assistant", "system")  # "system": instructions given mid-conversation
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                 "content_filter": "refusal"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                408: "timeout_error", 413: "request_too_large", 422: "invalid_request_error",
                429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
                504: "timeout_error", 529: "overloaded_error"}
# Fields of a request kept as chat completions name them
_SAMPLING = ("temperature", "top_p", "top_k")


# -- The request -----------------------------------------------------------------------------------------------------

def to_chat(body: dict) -> dict:
    """An Anthropic Messages request as a chat completions request; a 400 naming the field that is wrong."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise missing("max_tokens")
    if type(max_tokens) is not int:
        raise invalid_type("max_tokens", "an integer", max_tokens)
    if max_tokens < 1:
        raise bad_request(f"max_tokens: must be at least 1, got {max_tokens}.", param="max_tokens")
    chat: dict[str, Any] = {"model": body["model"], "messages": _system(body.get("system")) + _messages(body),
                            "max_tokens": max_tokens}
    for name in _SAMPLING:
        value = body.get(name)
        if value is not None:
            if type(value) not in (int, float) or (name == "top_k" and type(value) is not int):
                raise invalid_type(name, "an integer" if name == "top_k" else "a number", value)
            chat[name] = value
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid_type("stop_sequences", "an array of strings", stops)
        if stops:
            chat["stop"] = stops
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise invalid_type("stream", "a boolean", stream)
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # the closing message_delta carries the usage
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise invalid_type("metadata", "an object", metadata)
        user = metadata.get("user_id")
        if user is not None and not isinstance(user, str):
            raise invalid_type("metadata.user_id", "a string", user)
        if user:
            chat["user"] = user
    _tools(body, chat)
    output, where = body.get("output_format"), "output_format"
    config = body.get("output_config")
    if isinstance(config, dict) and config.get("format") is not None:
        output, where = config["format"], "output_config.format"
    if output is not None:
        if not isinstance(output, dict) or output.get("type") != "json_schema" or not isinstance(
                output.get("schema"), dict):
            raise bad_request(f"{where}: expected {{\"type\": \"json_schema\", \"schema\": {{...}}}}.",
                              param=where)
        chat["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": output["schema"], "strict": True}}
    return chat


def _system(system: Any, where: str = "system") -> list[dict]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if not isinstance(system, list):
        raise invalid_type(where, "a string or an array of text blocks", system)
    texts = []
    for index, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"{where}.{index}: expected a text block ({{\"type\": \"text\", \"text\": ...}}).",
                              param=f"{where}.{index}")
        texts.append(block["text"])
    return [{"role": "system", "content": "\n\n".join(texts)}] if texts else []


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list):
        raise invalid_type("messages", "an array", messages)
    if not messages:
        raise bad_request("messages: at least one message is required.", param="messages")
    chat: list[dict] = []
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise invalid_type(where, "an object", message)
        role = message.get("role")
        if role not in _ROLES:
            raise bad_request(f"{where}.role: expected 'user', 'assistant' or 'system', got {_show(role)}.",
                              param=f"{where}.role")
        content = message.get("content")
        if content is None:
            raise missing(f"{where}.content")
        if role == "system":
            chat += _system(content, f"{where}.content")
        elif isinstance(content, str):
            chat.append({"role": role, "content": content})
        elif isinstance(content, list):
            chat += _assistant_turn(content, where) if role == "assistant" else _user_turn(content, where)
        else:
            raise invalid_type(f"{where}.content", "a string or an array of content blocks", content)
    return chat


def _block_type(block: Any, where: str) -> str:
    if not isinstance(block, dict):
        raise invalid_type(where, "a content block (an object)", block)
    kind = block.get("type")
    if not isinstance(kind, str):
        raise absent_or_invalid(f"{where}.type", "a string", kind)
    return kind


def _user_turn(blocks: list, where: str) -> list[dict]:
    """A user turn's blocks: its tool results as tool messages first (they answer the turn before), then the rest."""
    results: list[dict] = []
    parts: list[dict] = []
    for index, block in enumerate(blocks):
        at = f"{where}.content.{index}"
        kind = _block_type(block, at)
        if kind == "tool_result":
            call = block.get("tool_use_id")
            if not isinstance(call, str) or not call:
                raise absent_or_invalid(f"{at}.tool_use_id", "a string", call)
            content = block.get("content", "")
            if isinstance(content, list):
                content = [_part(item, f"{at}.content.{n}") for n, item in enumerate(content)]
                if all(p["type"] == "text" for p in content):
                    content = "\n".join(p["text"] for p in content)
            elif not isinstance(content, str):
                raise invalid_type(f"{at}.content", "a string or an array of content blocks", content)
            if block.get("is_error") is True and isinstance(content, str):
                content = f"Error: {content}"
            results.append({"role": "tool", "tool_call_id": call, "content": content})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            parts.append(_part(block, at))
    turn = list(results)
    if parts:
        single_text = len(parts) == 1 and parts[0]["type"] == "text"
        turn.append({"role": "user", "content": parts[0]["text"] if single_text else parts})
    return turn


def _part(block: Any, at: str) -> dict:
    """A user content block as a chat content part."""
    kind = _block_type(block, at)
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise invalid_type(f"{at}.text", "a string", block.get("text"))
        return {"type": "text", "text": block["text"]}
    if kind in ("image", "document"):
        source = block.get("source")
        if not isinstance(source, dict):
            raise absent_or_invalid(f"{at}.source", "an object", source)
        kind_of_source = source.get("type")
        if kind_of_source == "base64" and isinstance(source.get("data"), str) and isinstance(
                source.get("media_type"), str):
            url = f"data:{source['media_type']};base64,{source['data']}"
            if kind == "image":
                return {"type": "image_url", "image_url": {"url": url}}
            return {"type": "file", "file": {"file_data": url, "filename": block.get("title") or "document.pdf"}}
        if kind_of_source == "url" and isinstance(source.get("url"), str):
            if kind == "image":
                return {"type": "image_url", "image_url": {"url": source["url"]}}
        if kind == "document" and kind_of_source == "text" and isinstance(source.get("data"), str):
            return {"type": "text", "text": source["data"]}
        raise bad_request(f"{at}.source: a {kind} source must be base64 (with media_type and data)"
                          + (" or a url" if kind == "image" else " or text") + ".", param=f"{at}.source")
    if kind == "tool_use":
        raise bad_request(f"{at}: tool_use blocks belong in assistant turns.", param=at)
    raise bad_request(f"{at}.type: '{kind[:64]}' blocks are not supported here; use text, image, document or "
                      "tool_result.", param=f"{at}.type")


def _assistant_turn(blocks: list, where: str) -> list[dict]:
    texts: list[str] = []
    calls: list[dict] = []
    for index, block in enumerate(blocks):
        at = f"{where}.content.{index}"
        kind = _block_type(block, at)
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise invalid_type(f"{at}.text", "a string", block.get("text"))
            texts.append(block["text"])
        elif kind == "tool_use":
            call, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call, str) or not call:
                raise absent_or_invalid(f"{at}.id", "a string", call)
            if not isinstance(name, str) or not name:
                raise absent_or_invalid(f"{at}.name", "a string", name)
            if not isinstance(arguments, dict):
                raise invalid_type(f"{at}.input", "an object", arguments)
            calls.append({"id": call, "type": "function",
                          "function": {"name": name, "arguments": orjson.dumps(arguments).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise bad_request(f"{at}.type: '{kind[:64]}' blocks are not supported in assistant turns; use text "
                              "or tool_use.", param=f"{at}.type")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return [message] if texts or calls else []


def _tools(body: dict, chat: dict) -> None:
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise invalid_type("tools", "an array", tools)
    functions = []
    for index, tool in enumerate(tools):
        at = f"tools.{index}"
        if not isinstance(tool, dict):
            raise invalid_type(at, "an object", tool)
        kind = tool.get("type", "custom")
        if kind not in ("custom", None):
            raise bad_request(f"{at}.type: the server tool '{str(kind)[:64]}' runs only on Anthropic's servers; "
                              "this model's upstream cannot run it. Offer it as a custom tool (name, description, "
                              "input_schema) instead.", param=f"{at}.type")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise absent_or_invalid(f"{at}.name", "a string", name)
        if not isinstance(schema, dict):
            raise absent_or_invalid(f"{at}.input_schema", "an object", schema)
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        functions.append({"type": "function", "function": function})
    choice = body.get("tool_choice")
    if functions:
        chat["tools"] = functions
    if choice is None:
        return
    if not isinstance(choice, dict):
        raise invalid_type("tool_choice", "an object", choice)
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not any(f["function"]["name"] == name for f in functions):
            raise bad_request(f"tool_choice.name: {_show(name)} is not one of the tools offered.",
                              param="tool_choice.name")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise bad_request(f"tool_choice.type: expected 'auto', 'any', 'tool' or 'none', got {_show(kind)}.",
                          param="tool_choice.type")
    if kind in ("any", "tool") and not functions:
        raise bad_request("tool_choice: no tools are offered.", param="tool_choice")
    if choice.get("disable_parallel_tool_use") is True and functions:
        chat["parallel_tool_calls"] = False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:64] + "..."


# -- The answer ------------------------------------------------------------------------------------------------------

def message_id(chat_id: Any) -> str:
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + chat_id.removeprefix("chatcmpl-")
    return "msg_" + os.urandom(12).hex()


def _stop_reason(choice: dict, stops: list | None) -> tuple[str, str | None]:
    finish = choice.get("finish_reason")
    matched = choice.get("stop_reason")  # vLLM names the stop string it stopped at
    if finish == "stop" and isinstance(matched, str) and stops and matched in stops:
        return "stop_sequence", matched
    return _STOP_REASONS.get(finish, "end_turn"), None


def _usage(usage: Any, estimate: int = 0) -> dict:
    usage = usage if isinstance(usage, dict) else {}
    prompt = usage.get("prompt_tokens") if type(usage.get("prompt_tokens")) is int else estimate
    completion = usage.get("completion_tokens") if type(usage.get("completion_tokens")) is int else 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    cached = cached if type(cached) is int and 0 < cached <= prompt else 0
    return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": completion}


def _arguments(text: Any) -> Any:
    try:
        value = orjson.loads(text) if isinstance(text, str) and text else {}
    except orjson.JSONDecodeError:
        return {"_raw": text}  # what the model wrote, kept, though not JSON
    return value if isinstance(value, dict) else {"value": value}


def to_message(answer: dict, native: dict) -> dict:
    """A chat completion as an Anthropic message (its first choice)."""
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or "toolu_" + os.urandom(12).hex(),
                        "name": function.get("name", ""), "input": _arguments(function.get("arguments"))})
    reason, sequence = _stop_reason(choice, native.get("stop_sequences"))
    return {"id": message_id(answer.get("id")), "type": "message", "role": "assistant",
            "model": answer.get("model") or native.get("model"), "content": content, "stop_reason": reason,
            "stop_sequence": sequence, "usage": _usage(answer.get("usage"))}


def event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def error_of(status: int, openai_error: dict) -> tuple[int, dict]:
    """An OpenAI-shaped error as Anthropic's, with the status its SDK maps (an overload is 529)."""
    message = openai_error.get("message") if isinstance(openai_error.get("message"), str) else "Request failed."
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if status == 503:
        status = 529
    return status, {"type": "error", "error": {"type": kind, "message": message}}


class MessageStream:
    """Chat completion chunks in, Anthropic's stream events out, one upstream event at a time."""

    def __init__(self, ctx: RequestContext) -> None:
        self.native = ctx.native_body or {}
        self.estimate = ctx.prompt_estimate or 0
        self.started = False
        self.finished = False
        self.block: int | None = None  # the index of the open content block
        self.block_kind: str | None = None
        self.blocks = 0
        self.tools: dict[int, int] = {}  # a tool call's index in the chunks -> its block's index
        self.stop: tuple[str, str | None] = ("end_turn", None)
        self.usage: dict | None = None
        self.delta_head = b""  # the open block's delta event up to its text (written per token)

    def _start(self, chunk: dict) -> bytes:
        self.started = True
        message = {"id": message_id(chunk.get("id")), "type": "message", "role": "assistant",
                   "model": chunk.get("model") or self.native.get("model"), "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": {**_usage(None, self.estimate), "output_tokens": 1}}
        return event("message_start", {"type": "message_start", "message": message}) + event("ping",
                                                                                             {"type": "ping"})

    def _close_block(self) -> bytes:
        if self.block is None:
            return b""
        index, self.block, self.block_kind = self.block, None, None
        return event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _open_block(self, kind: str, block: dict) -> bytes:
        out = self._close_block()
        self.block, self.block_kind = self.blocks, kind
        self.blocks += 1
        self.delta_head = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":'
                           % self.block + (b'{"type":"text_delta","text":' if kind == "text"
                                           else b'{"type":"input_json_delta","partial_json":'))
        return out + event("content_block_start", {"type": "content_block_start", "index": self.block,
                                                   "content_block": block})

    def chunk(self, chunk: dict) -> bytes:
        out = b"" if self.started else self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        first = first_choice(chunk)
        if first is None:
            return out
        choice, text, calls = first
        if text:
            if self.block_kind != "text":
                out += self._open_block("text", {"type": "text", "text": ""})
            out += self.delta_head + orjson.dumps(text) + b"}}\n\n"
        for call in calls:
            position = call.get("index", 0)
            function = call.get("function") or {}
            if position not in self.tools:
                out += self._open_block("tool", {"type": "tool_use",
                                                 "id": call.get("id") or "toolu_" + os.urandom(12).hex(),
                                                 "name": function.get("name", ""), "input": {}})
                self.tools[position] = self.block
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments and self.tools[position] == self.block:
                out += self.delta_head + orjson.dumps(arguments) + b"}}\n\n"
        if choice.get("finish_reason"):
            self.stop = _stop_reason(choice, self.native.get("stop_sequences"))
        return out

    def done(self) -> bytes:
        if self.finished:
            return b""
        self.finished = True
        out = (b"" if self.started else self._start({})) + self._close_block()
        reason, sequence = self.stop
        usage = _usage(self.usage, self.estimate)
        return out + event("message_delta", {"type": "message_delta",
                                             "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                             "usage": usage}) + event("message_stop", {"type": "message_stop"})

    def error(self, status: int, openai_error: dict) -> bytes:
        self.finished = True
        return event("error", error_of(status, openai_error)[1])

    def closing(self) -> bytes:
        return b""


def count_tokens_answer(count: int) -> bytes:
    return orjson.dumps({"input_tokens": count})


class Messages:
    """``POST /v1/messages`` for the edge (``gateway.protocols.edge``) and the body stage."""

    name = "anthropic"
    keeps_answers = False

    async def inbound(self, ctx: RequestContext, body: dict) -> dict:
        return to_chat(body)

    def native_request(self, ctx: RequestContext, deployment: Deployment, upstream_model: str | None,
                       own_key: str | None) -> tuple[str, bytes, dict[str, str]]:
        """The request as it came, for an upstream that speaks Anthropic's API: its model named as the upstream
        knows it, the tenant's system prompt first, the client's ``anthropic-version`` and ``anthropic-beta``."""
        body = dict(ctx.native_body)
        body["model"] = ctx.upstream_model = upstream_model or deployment.upstream_model
        prompt = ctx.tenant.system_prompt
        if prompt:
            system = body.get("system")
            body["system"] = (prompt if not system else f"{prompt}\n\n{system}" if isinstance(system, str)
                              else [{"type": "text", "text": prompt}, *system])
        headers = {name: value for name, value in deployment.headers.items() if name.lower() != "authorization"}
        key = own_key or deployment.api_key
        if key:
            headers["x-api-key"] = key
        headers["anthropic-version"] = (header(ctx.scope, b"anthropic-version") or DEFAULT_VERSION).decode("latin-1")
        beta = header(ctx.scope, b"anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta.decode("latin-1")
        return "/v1/messages", encode(body), headers

    def whole(self, ctx: RequestContext, answer: dict) -> bytes:
        return orjson.dumps(to_message(answer, ctx.native_body or {}))

    def stream(self, ctx: RequestContext) -> MessageStream:
        return MessageStream(ctx)

    def error(self, status: int, openai_error: dict) -> tuple[int, bytes]:
        status, body = error_of(status, openai_error)
        return status, orjson.dumps(body)

    async def settle(self, ctx: RequestContext) -> None:
        return None

    def native_error(self, status: int, openai_error: dict) -> bytes:
        return event("error", error_of(status, openai_error)[1])

    def closing(self, ctx: RequestContext) -> bytes:
        return b""


class CountTokens(Messages):
    """``POST /v1/messages/count_tokens``: a Messages request without ``max_tokens``."""

    async def inbound(self, ctx: RequestContext, body: dict) -> dict:
        return to_chat({**body, "max_tokens": 1})
