"""Stage: read the body once and check the fields the gateway acts on.

Only those fields are checked (by hand, not with pydantic: this runs on every request); everything else is left for
the upstream to judge and is forwarded untouched. Each problem is a 400 that names the field, as OpenAI's are.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.asgi import BodyTooLarge, read_body, header
from gateway.errors import GatewayError, bad_request
from gateway.pipeline.context import RequestContext

_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object", type(None): "null"}


def kind_of(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def invalid_type(param: str, expected: str, value: Any) -> GatewayError:
    return bad_request(f"Invalid type for '{param}': expected {expected}, but got {kind_of(value)} instead.",
                       param=param, code="invalid_type")


def empty_array(param: str) -> GatewayError:
    return bad_request(f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty "
                       "array instead.", param=param, code="empty_array")


def missing(param: str) -> GatewayError:
    return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def absent_or_invalid(param: str, expected: str, value: Any) -> GatewayError:
    """A required field's 400: missing when it is absent (or null), else of the wrong type."""
    return missing(param) if value is None else invalid_type(param, expected, value)


MAX_DEPTH = 254  # orjson reads deeper JSON than it writes; the gateway re-encodes what it forwards


def encode(body: dict, option: int = 0) -> bytes:
    """The body as JSON; a 400 naming the field that is nested too deeply to be sent on."""
    try:
        return orjson.dumps(body, option=option)
    except orjson.JSONEncodeError:
        path = _too_deep(body, 0)
        raise bad_request(f"'{path or 'body'}' is nested too deeply: at most {MAX_DEPTH} levels of arrays and "
                          "objects are accepted.", param=path, code="nesting_too_deep") from None


def _too_deep(value: Any, depth: int) -> str | None:
    """Where the first value nested deeper than MAX_DEPTH sits: its field and index (``messages[0]``)."""
    if depth >= MAX_DEPTH and isinstance(value, (dict, list)):
        return ""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _too_deep(item, depth + 1)
        if found is not None:
            if depth >= 2:
                return ""
            step = f"[{key}]" if isinstance(key, int) else (f".{key}" if depth else str(key))
            return step + found
    return None


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


async def read_json_body(ctx: RequestContext, limit: int) -> None:
    try:
        raw = await read_body(ctx.receive, limit, header(ctx.scope, b"content-length"))
    except BodyTooLarge:
        raise GatewayError(413, f"The request body is larger than the gateway's limit of {limit} bytes.",
                           code="request_too_large") from None
    if not raw:
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    ctx.body_size = len(raw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, not {kind_of(body)}.", code="invalid_json")
    model = body.get("model")
    if model is None:
        raise bad_request("You must provide a model parameter.", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    if not model:
        raise bad_request("'model' must not be empty.", param="model")
    ctx.endpoint.validate(body)
    if ctx.endpoint.dialect is not None:
        ctx.native_body = body
        body = await ctx.endpoint.dialect.inbound(ctx, body)
    ctx.body = body
    ctx.model_requested = model
    ctx.stream = body.get("stream") is True


def _check_common(body: dict) -> None:
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise invalid_type("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid_type("stream_options", "an object", options)
        if stream is not True:
            raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              param="stream_options")
        include = options.get("include_usage")
        if include is not None and type(include) is not bool:
            raise invalid_type("stream_options.include_usage", "a boolean", include)
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is not None:
            if not _is_int(value):
                raise invalid_type(name, "an integer", value)
            if value < 1:
                raise bad_request(f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
                                  f"but got {value} instead.", param=name, code="integer_below_min_value")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and not _is_number(value):
            raise invalid_type(name, "a number", value)
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and value < 0:
            raise bad_request(f"Invalid '{name}': must not be negative, got {value}.", param=name)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
        isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    ):
        raise invalid_type("stop", "a string or an array of strings", stop)


def check_chat(body: dict) -> None:
    messages = body.get("messages")
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list):
        raise invalid_type("messages", "an array", messages)
    if not messages:
        raise empty_array("messages")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid_type(param, "an object", message)
        role = message.get("role")
        if role is None:
            raise missing(f"{param}.role")
        if not isinstance(role, str):
            raise invalid_type(f"{param}.role", "a string", role)
        if role not in _ROLES:
            raise bad_request(f"Invalid value for '{param}.role': '{role}'. Supported values are: "
                              "'system', 'developer', 'user', 'assistant', 'tool' and 'function'.",
                              param=f"{param}.role", code="invalid_value")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise invalid_type(f"{param}.content", "a string or an array of content parts", content)
        if isinstance(content, list):
            _check_parts(content, f"{param}.content")
    for name in ("logprobs", "parallel_tool_calls"):
        value = body.get(name)
        if value is not None and type(value) is not bool:
            raise invalid_type(name, "a boolean", value)
    top = body.get("top_logprobs")
    if top is not None and not _is_int(top):
        raise invalid_type("top_logprobs", "an integer", top)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid_type("tools", "an array", tools)
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise invalid_type("response_format", "an object", response_format)
    _check_common(body)


def _check_parts(parts: list, param: str) -> None:
    for index, part in enumerate(parts):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise invalid_type(where, "an object", part)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise absent_or_invalid(f"{where}.type", "a string", kind)
        if kind == "text" and not isinstance(part.get("text"), str):
            raise invalid_type(f"{where}.text", "a string", part.get("text"))


def check_completion(body: dict) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise missing("prompt")
    if isinstance(prompt, list):
        if not prompt:
            raise empty_array("prompt")
        for index, tokens in enumerate(prompt):
            if tokens == []:
                raise empty_array(f"prompt[{index}]")
    if not isinstance(prompt, str) and not (
        isinstance(prompt, list) and prompt and (
            all(isinstance(p, str) for p in prompt)
            or all(_is_int(p) for p in prompt)
            or all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)
        )
    ):
        raise invalid_type("prompt", "a string, an array of strings or an array of token ids", prompt)
    logprobs = body.get("logprobs")
    if logprobs is not None and not _is_int(logprobs):
        raise invalid_type("logprobs", "an integer", logprobs)
    _check_common(body)


def check_embedding(body: dict) -> None:
    value = body.get("input")
    if value is None:
        raise missing("input")
    if not isinstance(value, (str, list)):
        raise invalid_type("input", "a string or an array", value)
    if isinstance(value, list) and not value:
        raise empty_array("input")
    if value == "" or (isinstance(value, list) and any(item == "" or item == [] for item in value)):
        raise bad_request("'$.input' is invalid: an input must not be empty (a string or an array of tokens "
                          "with at least one element).", param="input", code="invalid_value")
    if isinstance(value, list) and not (all(isinstance(item, str) for item in value) or all(
            _is_int(item) for item in value) or all(isinstance(item, list) and all(_is_int(t) for t in item)
                                                    for item in value)):
        raise invalid_type("input", "a string, an array of strings or an array of token ids", value)
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise bad_request(f"Invalid value for 'encoding_format': {encoding!r}. Supported values are: "
                          "'float' and 'base64'.", param="encoding_format", code="invalid_value")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise bad_request("'dimensions' must be a positive integer.", param="dimensions")
    if body.get("stream") is not None:
        raise bad_request("Embeddings cannot be streamed.", param="stream")


def check_moderation(body: dict) -> None:
    value = body.get("input")
    if value is None:
        raise missing("input")
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise invalid_type("input", "a string or an array", value)
    if not value:
        raise empty_array("input")
    for index, item in enumerate(value):
        if isinstance(item, str):
            continue
        if not isinstance(item, dict) or item.get("type") not in ("text", "image_url"):
            raise bad_request(f"Invalid 'input[{index}]': expected a string or a text or image_url part.",
                              param=f"input[{index}]", code="invalid_value")
    if body.get("stream") is not None:
        raise bad_request("Moderations cannot be streamed.", param="stream")
