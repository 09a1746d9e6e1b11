"""Training files in OpenAI's chat format, checked line by line: one JSON object a line, each with ``messages``
(system, user, assistant and tool turns; an assistant turn says something or calls a tool), and optionally
``tools``. A bad line is a 400 that names the file's parameter, the line and the field; the counts (examples and
tokens, as cl100k counts them) come back for the job's checks and its billing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.tokens import prompt_tokens

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_FIELDS = frozenset(("role", "content", "name", "weight", "tool_calls", "tool_call_id"))
MIN_TRAINING_EXAMPLES = 10  # OpenAI's own floor: fewer teach a model nothing it keeps


@dataclass(frozen=True, slots=True)
class DatasetStats:
    examples: int
    tokens: int  # every example's, summed
    longest: int  # the longest example's tokens
    longest_line: int


def check(content: bytes, param: str, context_window: int | None = None, max_tokens: int | None = None,
          min_examples: int = 1) -> DatasetStats:
    """The file's counts, or a 400 naming ``param``, the line and the field of the first problem."""
    if b"\x00" in content:
        raise _bad(param, 1 + content[:content.index(b"\x00")].count(b"\n"), "contains a NUL byte")
    examples = tokens = longest = longest_line = 0
    for number, line in enumerate(content.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            example = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise _bad(param, number, "is not a JSON object (the file must be JSONL: one example a line)") from None
        counted = _example(example, param, number)
        if context_window is not None and counted > context_window:
            raise _bad(param, number, f"has {counted} tokens, more than the base model's context window "
                                      f"({context_window})", code="example_too_long")
        examples += 1
        tokens += counted
        if counted > longest:
            longest, longest_line = counted, number
    if examples < min_examples:
        raise GatewayError(400, f"{param}: {examples} example(s); at least {min_examples} are needed.", param=param,
                           code="too_few_examples")
    if max_tokens is not None and tokens > max_tokens:
        raise GatewayError(400, f"{param}: {tokens} tokens in all, more than the {max_tokens} a job may train on.",
                           param=param, code="dataset_too_large")
    return DatasetStats(examples, tokens, longest, longest_line)


def _example(example: Any, param: str, number: int) -> int:
    if not isinstance(example, dict):
        raise _bad(param, number, "is not a JSON object")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad(param, number, "needs 'messages', a non-empty list")
    answered = False
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise _bad(param, number, f"{where} is not an object")
        unknown = set(message) - MESSAGE_FIELDS
        if unknown:
            raise _bad(param, number, f"{where} has an unknown field '{sorted(unknown)[0][:40]}'")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(param, number, f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}")
        content = message.get("content")
        text = _text(content, param, number, where)
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls is not None and (not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)):
                raise _bad(param, number, f"{where}.tool_calls must be a list of function calls")
            if not text.strip() and not calls:
                raise _bad(param, number, f"{where} is an empty assistant turn: it must say something or call a "
                                          "tool", code="empty_assistant_turn")
            weight = message.get("weight", 1)
            if weight not in (0, 1):
                raise _bad(param, number, f"{where}.weight must be 0 or 1")
            answered = answered or weight == 1
        elif role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise _bad(param, number, f"{where}.tool_call_id is required for a tool turn")
        elif not text.strip() and role != "tool":
            raise _bad(param, number, f"{where}.content is empty")
    if not answered:
        raise _bad(param, number, "has no assistant turn to learn from", code="no_assistant_turn")
    tools = example.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad(param, number, "tools must be a list")
    return prompt_tokens({"messages": messages, "tools": tools})


def _text(content: Any, param: str, number: int, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(param, number, f"{where}.content must be a string or a list of text parts")


def _bad(param: str, number: int, problem: str, code: str = "invalid_training_file") -> GatewayError:
    return GatewayError(400, f"{param}: line {number} {problem}.", param=param, code=code)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def texts(content: bytes) -> list[list[dict]]:
    """The examples' conversations (checked already), for the trainer."""
    return [orjson.loads(line)["messages"] for line in content.split(b"\n") if line.strip()]
