"""OpenAI's Responses API in chat completions' terms, and chat completions' answers told back as responses.

Kept: ``input`` as a string or items (messages with text, image and file parts; ``function_call`` and
``function_call_output`` as assistant tool calls and tool messages), ``instructions`` (a system message first, not
carried over to the next turn, as OpenAI does), function ``tools`` and ``namespace`` tools (their functions offered
by name, their calls told with their namespace), ``tool_choice``, ``parallel_tool_calls``,
``text.format`` (json_schema and json_object, as a response format), ``max_output_tokens``, ``temperature``,
``top_p``, ``user`` / ``safety_identifier``, ``metadata`` (kept with the stored response), ``store`` and
``previous_response_id`` (the gateway keeps the conversation: see ``gateway.stores.responses``). Dropped:
``reasoning`` settings and reasoning items (a chat completions upstream has no place for them), ``include``,
``truncation``, ``service_tier``, ``prompt_cache_key``. Refused with a 400 naming them: built-in tools (web search,
file search, code interpreter, computer use, image generation, MCP, shell), ``background``, ``conversation``,
``prompt`` templates and item references.

Answers: the text as a ``message`` output item with ``output_text`` content, tool calls as ``function_call`` items;
``finish_reason`` length (or content_filter) makes the response ``incomplete`` with its reason; usage as input and
output tokens. Streams are translated event by event into the semantic events, each with its ``sequence_number``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from gateway.config.types import Deployment
from gateway.errors import GatewayError, bad_request
from gateway.pipeline.context import RequestContext
from gateway.pipeline.parse import absent_or_invalid, encode, invalid_type, missing
from gateway.protocols.edge import first_choice
from gateway.stores.responses import UNREACHABLE, ResponseStore, unavailable

log = logging.getLogger("gateway.responses")

_BUILT_IN_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
                   "computer_use", "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom")
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_REFUSED_FIELDS = {"background": "background responses", "conversation": "conversations",
                   "prompt": "prompt templates"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


@dataclass(slots=True)
class Turn:
    """One request of the Responses API while it runs: its id, its input items (and the conversation before them),
    and the response once made."""

    id: str
    created_at: int
    store: bool
    input_items: list[dict]
    history: list[dict] = field(default_factory=list)
    namespaces: dict[str, str] = field(default_factory=dict)  # a function's namespace, for its calls
    response: dict | None = None
    output: list[dict] = field(default_factory=list)


# -- The request -----------------------------------------------------------------------------------------------------

def check(body: dict) -> None:
    """The fields of a Responses request that need no stored conversation; a 400 naming the first wrong one."""
    for name, what in _REFUSED_FIELDS.items():
        if body.get(name) not in (None, False):
            raise bad_request(f"'{name}': {what} are not served by this gateway.", param=name,
                              code="unsupported_parameter")
    value = body.get("input")
    if value is None:
        raise missing("input")
    if not isinstance(value, (str, list)):
        raise invalid_type("input", "a string or an array of input items", value)
    for name in ("instructions", "previous_response_id", "user", "safety_identifier"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise invalid_type(name, "a string", value)
    for name in ("stream", "store", "parallel_tool_calls"):
        value = body.get(name)
        if value is not None and type(value) is not bool:
            raise invalid_type(name, "a boolean", value)
    limit = body.get("max_output_tokens")
    if limit is not None:
        if type(limit) is not int:
            raise invalid_type("max_output_tokens", "an integer", limit)
        if limit < 1:
            raise bad_request(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 1, "
                              f"but got {limit} instead.", param="max_output_tokens", code="integer_below_min_value")
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (type(value) not in (int, float) or value < 0):
            raise invalid_type(name, "a number of at least 0", value)
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16 or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()):
            raise bad_request("Invalid 'metadata': at most 16 pairs of strings, keys up to 64 characters and values "
                              "up to 512.", param="metadata", code="invalid_value")


def to_chat(body: dict, history: list[dict], items: list[dict]) -> tuple[dict, dict[str, str]]:
    """A Responses request (its earlier conversation in ``history``, its own input as ``items``) as a chat
    completions request, and the namespace of each function offered in one."""
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    _append_items(messages, history, "previous_response_id")
    _append_items(messages, items, "input")
    if not messages or all(m["role"] == "system" for m in messages):
        raise bad_request("Invalid 'input': give at least one message or item to answer.", param="input",
                          code="empty_array")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if body.get(name) is not None:
            chat[name] = body[name]
    user = body.get("safety_identifier") or body.get("user")
    if user:
        chat["user"] = user
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    namespaces = _tools(body, chat)
    _text_format(body, chat)
    return chat, namespaces


def input_items(body: dict) -> list[dict]:
    """The request's input as items with ids, as they are stored and listed."""
    value = body["input"]
    if isinstance(value, str):
        return [{"type": "message", "id": new_id("msg"), "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]
    items = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise invalid_type(f"input[{index}]", "an object", item)
        kind = item.get("type", "message")
        if kind == "message" and isinstance(item.get("content"), str):
            item = {**item, "content": [{"type": "output_text" if item.get("role") == "assistant" else "input_text",
                                          "text": item["content"]}]}
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(kind, "item")
        items.append({"type": kind, "id": item.get("id") or new_id(prefix),
                      **{k: v for k, v in item.items() if k not in ("type", "id")}})
    return items


def _append_items(messages: list[dict], items: list[dict], param: str) -> None:
    for index, item in enumerate(items):
        at = f"{param}[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            _append_message(messages, item, at)
        elif kind == "function_call":
            call, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "")
            for key, value in (("call_id", call), ("name", name), ("arguments", arguments)):
                if not isinstance(value, str) or (key != "arguments" and not value):
                    raise absent_or_invalid(f"{at}.{key}", "a string", value)
            tool_call = {"id": call, "type": "function", "function": {"name": name, "arguments": arguments or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(tool_call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [tool_call]})
        elif kind == "function_call_output":
            call, output = item.get("call_id"), item.get("output")
            if not isinstance(call, str) or not call:
                raise absent_or_invalid(f"{at}.call_id", "a string", call)
            if isinstance(output, list):
                output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
            if not isinstance(output, str):
                raise absent_or_invalid(f"{at}.output", "a string", output)
            messages.append({"role": "tool", "tool_call_id": call, "content": output})
        elif kind == "reasoning":
            continue
        else:
            raise bad_request(f"Invalid '{at}.type': '{str(kind)[:64]}' items are not served by this gateway; use "
                              "messages, function_call and function_call_output items.", param=f"{at}.type",
                              code="invalid_value")


def _append_message(messages: list[dict], item: dict, at: str) -> None:
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise bad_request(f"Invalid value for '{at}.role': {str(role)[:64]!r}. Supported values are: 'user', "
                          "'assistant', 'system' and 'developer'.", param=f"{at}.role", code="invalid_value")
    content = item.get("content")
    if content is None:
        raise missing(f"{at}.content")
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = [_part(part, f"{at}.content[{n}]") for n, part in enumerate(content)]
    else:
        raise invalid_type(f"{at}.content", "a string or an array of content parts", content)
    if role == "developer":
        role = "system"  # what every chat upstream reads
    if role != "user" or all(p["type"] == "text" for p in parts):
        text = "".join(p.get("text", "") for p in parts)
        if role == "assistant" and messages and messages[-1]["role"] == "assistant" and not messages[-1].get(
                "tool_calls"):
            messages[-1]["content"] = (messages[-1]["content"] or "") + text
            return
        messages.append({"role": role, "content": text})
    else:
        messages.append({"role": role, "content": parts})


def _part(part: Any, at: str) -> dict:
    if not isinstance(part, dict):
        raise invalid_type(at, "an object", part)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        if not isinstance(part.get("text"), str):
            raise invalid_type(f"{at}.text", "a string", part.get("text"))
        return {"type": "text", "text": part["text"]}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal") if isinstance(part.get("refusal"), str) else ""}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise bad_request(f"Invalid '{at}': give the image as 'image_url' (a URL or a data URL); file ids are "
                              "not served here.", param=f"{at}.image_url")
        image = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        data = part.get("file_data")
        if not isinstance(data, str) or not data:
            raise bad_request(f"Invalid '{at}': give the file as 'file_data' (a data URL); file ids and URLs are "
                              "not served here.", param=f"{at}.file_data")
        return {"type": "file", "file": {"file_data": data, "filename": part.get("filename") or "file"}}
    raise bad_request(f"Invalid '{at}.type': {str(kind)[:64]!r}. Supported values are: 'input_text', "
                      "'input_image', 'input_file' and 'output_text'.", param=f"{at}.type", code="invalid_value")


def _functions(tools: list, where: str, namespace: str | None, namespaces: dict[str, str]) -> list[dict]:
    """Function tools as chat completions' tools; those of a namespace are offered by their own names, and the
    namespace is told again on their calls."""
    functions = []
    for index, tool in enumerate(tools):
        at = f"{where}[{index}]"
        if not isinstance(tool, dict):
            raise invalid_type(at, "an object", tool)
        kind = tool.get("type")
        if kind == "namespace" and namespace is None:
            name, inner = tool.get("name"), tool.get("tools")
            if not isinstance(name, str) or not name:
                raise absent_or_invalid(f"{at}.name", "a string", name)
            if not isinstance(inner, list):
                raise absent_or_invalid(f"{at}.tools", "an array", inner)
            functions += _functions(inner, f"{at}.tools", name, namespaces)
            continue
        if kind != "function":
            named = str(kind)[:64]
            raise bad_request(f"Invalid '{at}.type': the built-in tool '{named}' is not served by this model's "
                              "upstream; offer it as a function tool." if kind in _BUILT_IN_TOOLS or (
                                  isinstance(kind, str) and kind.startswith(("web_search", "computer")))
                              else f"Invalid '{at}.type': {named!r}. Supported values are: 'function' and "
                                   "'namespace'.", param=f"{at}.type", code="unsupported_tool")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise absent_or_invalid(f"{at}.name", "a string", name)
        function: dict[str, Any] = {"name": name}
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise invalid_type(f"{at}.parameters", "an object", parameters)
            function["parameters"] = parameters
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        functions.append({"type": "function", "function": function})
        if namespace is not None:
            namespaces[name] = namespace
    return functions


def _tools(body: dict, chat: dict) -> dict[str, str]:
    tools = body.get("tools")
    namespaces: dict[str, str] = {}
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid_type("tools", "an array", tools)
        functions = _functions(tools, "tools", None, namespaces)
        names = [f["function"]["name"] for f in functions]
        if len(set(names)) != len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise bad_request(f"Invalid 'tools': the function name {twice[:64]!r} is offered twice.",
                              param="tools", code="invalid_value")
        if functions:
            chat["tools"] = functions
    choice = body.get("tool_choice")
    if choice is None:
        return namespaces
    if choice in ("auto", "none", "required"):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        if not any(t["function"]["name"] == choice["name"] for t in chat.get("tools", ())):
            raise bad_request(f"Invalid 'tool_choice.name': {choice['name'][:64]!r} is not one of the tools offered.",
                              param="tool_choice.name", code="invalid_value")
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise bad_request("Invalid 'tool_choice': expected 'auto', 'none', 'required' or {\"type\": \"function\", "
                          "\"name\": ...}.", param="tool_choice", code="invalid_value")
    if chat["tool_choice"] != "none" and chat["tool_choice"] != "auto" and "tools" not in chat:
        raise bad_request("Invalid 'tool_choice': no tools are offered.", param="tool_choice")
    return namespaces


def _text_format(body: dict, chat: dict) -> None:
    text = body.get("text")
    if text is None:
        return
    if not isinstance(text, dict):
        raise invalid_type("text", "an object", text)
    format_ = text.get("format")
    if format_ is None:
        return
    kind = format_.get("type") if isinstance(format_, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":
        schema, name = format_.get("schema"), format_.get("name")
        if not isinstance(schema, dict):
            raise absent_or_invalid("text.format.schema", "an object", schema)
        if not isinstance(name, str) or not name:
            raise absent_or_invalid("text.format.name", "a string", name)
        json_schema: dict[str, Any] = {"name": name, "schema": schema}
        if isinstance(format_.get("strict"), bool):
            json_schema["strict"] = format_["strict"]
        chat["response_format"] = {"type": "json_schema", "json_schema": json_schema}
    else:
        raise bad_request("Invalid 'text.format.type': expected 'text', 'json_object' or 'json_schema'.",
                          param="text.format.type", code="invalid_value")


# -- The answer ------------------------------------------------------------------------------------------------------

def _usage(usage: Any) -> dict:
    usage = usage if isinstance(usage, dict) else {}
    prompt = usage.get("prompt_tokens") if type(usage.get("prompt_tokens")) is int else 0
    completion = usage.get("completion_tokens") if type(usage.get("completion_tokens")) is int else 0
    prompt_details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": prompt_details.get("cached_tokens") or 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning if type(reasoning) is int else 0},
            "total_tokens": prompt + completion}


def response_object(turn: Turn, native: dict, model: str, status: str, output: list[dict], usage: dict | None,
                    finish: str | None = None, error: dict | None = None) -> dict:
    incomplete = _INCOMPLETE.get(finish or "")
    if status == "completed" and incomplete is not None:
        status = "incomplete"
    return {
        "id": turn.id, "object": "response", "created_at": turn.created_at, "status": status, "background": False,
        "error": error, "incomplete_details": {"reason": incomplete} if status == "incomplete" else None,
        "instructions": native.get("instructions"), "max_output_tokens": native.get("max_output_tokens"),
        "max_tool_calls": None, "model": model, "output": output,
        "parallel_tool_calls": native.get("parallel_tool_calls", True),
        "previous_response_id": native.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
        "service_tier": "default", "store": turn.store, "temperature": native.get("temperature", 1.0),
        "text": native.get("text") or {"format": {"type": "text"}}, "tool_choice": native.get("tool_choice", "auto"),
        "tools": native.get("tools") or [], "top_p": native.get("top_p", 1.0), "truncation": "disabled",
        "usage": usage, "user": native.get("user"), "metadata": native.get("metadata") or {},
    }


def _message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call: dict, namespaces: dict[str, str], status: str = "completed") -> dict:
    function = call.get("function") or {}
    name = function.get("name", "")
    item = {"type": "function_call", "id": new_id("fc"), "call_id": call.get("id") or new_id("call"),
            "name": name, "arguments": function.get("arguments") or "", "status": status}
    if name in namespaces:
        item["namespace"] = namespaces[name]
    return item


def to_response(turn: Turn, native: dict, answer: dict) -> dict:
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    output = []
    text = message.get("content")
    if isinstance(text, str) and text:
        output.append(_message_item(text))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        output.append({"type": "message", "id": new_id("msg"), "status": "completed", "role": "assistant",
                       "content": [{"type": "refusal", "refusal": refusal}]})
    output += [_call_item(call, turn.namespaces) for call in message.get("tool_calls") or () if isinstance(call, dict)]
    return response_object(turn, native, answer.get("model") or native.get("model"), "completed", output,
                           _usage(answer.get("usage")), choice.get("finish_reason"))


def _without_id(item: dict) -> dict:
    """An item of the conversation as input to an upstream that did not store it (an id would name a stored item);
    reasoning items keep theirs, which their encrypted content goes with."""
    if item.get("type") == "reasoning" or "id" not in item:
        return item
    return {k: v for k, v in item.items() if k != "id"}


def _event(data: dict) -> bytes:
    return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class ResponseStream:
    """Chat completion chunks in, the Responses API's semantic events out."""

    def __init__(self, ctx: RequestContext) -> None:
        self.turn: Turn = ctx.protocol_state
        self.native = ctx.native_body or {}
        self.model = self.native.get("model", "")
        self.sequence = 0
        self.started = False
        self.finished = False
        self.failed: dict | None = None
        self.open: dict | None = None  # the output item being written
        self.calls: dict[int, dict] = {}  # a tool call's index in the chunks -> its output item
        self.finish: str | None = None
        self.usage: dict | None = None
        self.parts: list[str] = []  # the open item's text or arguments, joined when it closes
        self.delta_head = b""  # the open item's delta event up to its sequence number (written per token)

    def _emit(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return _event(data)

    def _snapshot(self, status: str, usage: dict | None = None, error: dict | None = None) -> dict:
        return response_object(self.turn, self.native, self.model, status, list(self.turn.output), usage,
                                self.finish if status == "completed" else None, error)

    def _start(self, chunk: dict) -> bytes:
        self.started = True
        self.model = chunk.get("model") or self.model
        pending = self._snapshot("in_progress")
        return (self._emit("response.created", response=pending)
                + self._emit("response.in_progress", response=pending))

    def _delta(self, text: str) -> bytes:
        """A token's delta event, written from the open item's head (it runs once a token)."""
        self.parts.append(text)
        event = self.delta_head + b"%d" % self.sequence + b',"delta":' + orjson.dumps(text) + b"}\n\n"
        self.sequence += 1
        return event

    def _close_item(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        index = self.turn.output.index(item)
        item["status"] = "completed"
        written, self.parts = "".join(self.parts), []
        out = b""
        if item["type"] == "message":
            part = item["content"][0]
            part["text"] = written
            out += self._emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=part["text"], logprobs=[])
            out += self._emit("response.content_part.done", item_id=item["id"], output_index=index,
                              content_index=0, part=part)
        else:
            item["arguments"] = written
            out += self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                              name=item["name"], arguments=written)
        return out + self._emit("response.output_item.done", output_index=index, item=item)

    def _open_item(self, item: dict) -> bytes:
        out = self._close_item()
        self.open = item
        self.turn.output.append(item)
        index = len(self.turn.output) - 1
        announced = {**item, "content": []} if item["type"] == "message" else dict(item)
        out += self._emit("response.output_item.added", output_index=index, item=announced)
        kind = b"response.output_text.delta" if item["type"] == "message" else b"response.function_call_arguments.delta"
        self.delta_head = (b"event: " + kind + b'\ndata: {"type":"' + kind + b'","item_id":"' + item["id"].encode()
                           + b'","output_index":%d,' % index
                           + (b'"content_index":0,"logprobs":[],' if item["type"] == "message" else b"")
                           + b'"sequence_number":')
        if item["type"] == "message":
            out += self._emit("response.content_part.added", item_id=item["id"], output_index=index,
                              content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                     "logprobs": []})
        return out

    def chunk(self, chunk: dict) -> bytes:
        out = b"" if self.started else self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        first = first_choice(chunk)
        if first is None:
            return out
        choice, text, calls = first
        if text:
            if self.open is None or self.open["type"] != "message":
                out += self._open_item(_message_item("", "in_progress"))
            out += self._delta(text)
        for call in calls:
            position = call.get("index", 0)
            function = call.get("function") or {}
            if position not in self.calls:
                item = _call_item({"id": call.get("id"), "function": {"name": function.get("name", "")}},
                                  self.turn.namespaces, "in_progress")
                self.calls[position] = item
                out += self._open_item(item)
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments and self.calls[position] is self.open:
                out += self._delta(arguments)
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
        return out

    def done(self) -> bytes:
        self.finished = True
        out = (b"" if self.started else self._start({})) + self._close_item()
        self.turn.response = self._snapshot("completed", _usage(self.usage))
        return out

    def error(self, status: int, openai_error: dict) -> bytes:
        self.finished = True
        out = b"" if self.started else self._start({})
        error = {"code": openai_error.get("code") or openai_error.get("type") or "server_error",
                 "message": openai_error.get("message") or "The response failed."}
        self.failed = error
        out += self._emit("error", code=error["code"], message=error["message"], param=openai_error.get("param"))
        return out

    def closing(self) -> bytes:
        """The last event, sent once the response is stored (so that a next turn can name it at once)."""
        if self.failed is not None:
            return self._emit("response.failed", response=self._snapshot("failed", _usage(self.usage), self.failed))
        response = self.turn.response
        kind = "response.completed" if response["status"] == "completed" else f"response.{response['status']}"
        return self._emit(kind, response=response)


class Responses:
    """``POST /v1/responses`` for the body stage and the edge (``gateway.protocols.edge``)."""

    name = "responses"
    keeps_answers = True

    def __init__(self, store: Callable[[], ResponseStore | None]) -> None:
        self.store = store

    async def inbound(self, ctx: RequestContext, body: dict) -> dict:
        check(body)
        store = self.store()
        history: list[dict] = []
        previous = body.get("previous_response_id")
        if previous:
            if store is None:
                raise GatewayError(404, f"Previous response with id '{previous[:64]}' not found: this gateway "
                                        "keeps no responses (it runs without PostgreSQL).",
                                   param="previous_response_id", code="previous_response_not_found")
            try:
                found = await store.conversation(ctx.tenant.id, previous)
            except UNREACHABLE:
                raise unavailable() from None
            if found is None:
                raise GatewayError(404, f"Previous response with id '{previous[:64]}' not found.",
                                   param="previous_response_id", code="previous_response_not_found")
            history = found
        items = input_items(body)
        chat, namespaces = to_chat(body, history, items)
        ctx.protocol_state = Turn(new_id("resp"), int(time.time()), body.get("store", True) is not False
                                  and store is not None, items, history, namespaces)
        return chat

    def native_request(self, ctx: RequestContext, deployment: Deployment, upstream_model: str | None,
                       own_key: str | None) -> tuple[str, bytes, dict[str, str]]:
        """The request as it came, for an upstream that serves the Responses API, but with the whole conversation
        as its input and nothing stored there: the gateway keeps the conversation (so that a next turn may go to
        any deployment) and stores the response itself. The tenant's system prompt goes before the
        instructions."""
        turn: Turn = ctx.protocol_state
        body = dict(ctx.native_body)
        body["model"] = ctx.upstream_model = upstream_model or deployment.upstream_model
        body.pop("previous_response_id", None)
        body["store"] = False
        body["input"] = [_without_id(item) for item in turn.history + turn.input_items]
        prompt = ctx.tenant.system_prompt
        if prompt:
            body["instructions"] = f"{prompt}\n\n{body['instructions']}" if body.get("instructions") else prompt
        headers = deployment.headers if own_key is None else {**deployment.headers,
                                                              "Authorization": f"Bearer {own_key}"}
        return "/responses", encode(body), headers

    def native_final(self, ctx: RequestContext, response: dict) -> None:
        """An upstream's response, as the client and the store see it: under the gateway's id for it (the upstream
        kept nothing; a cached answer is told again under a new one), with what the client asked for."""
        turn: Turn = ctx.protocol_state
        native = ctx.native_body or {}
        response.update(id=turn.id, created_at=turn.created_at, store=turn.store,
                        previous_response_id=native.get("previous_response_id"),
                        instructions=native.get("instructions"), metadata=native.get("metadata") or {})
        turn.response = response

    def native_snapshot(self, ctx: RequestContext, event: dict) -> bytes:
        self.native_final(ctx, event["response"])
        ctx.protocol_state.response = None  # not the final one
        return _event(event)

    def final_event(self, ctx: RequestContext, kind: str, sequence: int) -> bytes:
        return _event({"type": kind, "sequence_number": sequence, "response": ctx.protocol_state.response})

    def whole(self, ctx: RequestContext, answer: dict) -> bytes:
        turn: Turn = ctx.protocol_state
        turn.response = to_response(turn, ctx.native_body or {}, answer)
        return b""  # written by ``closing``, once stored

    def stream(self, ctx: RequestContext) -> ResponseStream:
        return ResponseStream(ctx)

    async def settle(self, ctx: RequestContext) -> None:
        turn: Turn | None = ctx.protocol_state
        if turn is None or turn.response is None or not turn.store:
            return
        try:
            await self.store().save(ctx.tenant.id, turn.response, turn.input_items)
        except Exception as exc:  # the answer still goes out, said to be unstored
            log.warning("response %s cannot be stored now: %s", turn.id, exc)
            turn.response["store"] = False

    def closing(self, ctx: RequestContext) -> bytes:
        return orjson.dumps(ctx.protocol_state.response)

    def error(self, status: int, openai_error: dict) -> tuple[int, bytes]:
        return status, orjson.dumps({"error": openai_error})

    def native_error(self, status: int, openai_error: dict) -> bytes:
        return _event({"type": "error", "code": openai_error.get("code") or openai_error.get("type"),
                       "message": openai_error.get("message"), "param": openai_error.get("param")})
