"""Which tool a request makes the simulated model call, and a message's text: shared by the OpenAI routes and the
other providers' protocols (protocols.py), which import it rather than the app."""

from __future__ import annotations

from typing import Any


def forced_tool(body: dict) -> tuple[str | None, dict | None]:
    """The tool a request makes the model call (tool_choice naming one, or "required"), and its parameters."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None, None
    choice = body.get("tool_choice", "auto")
    functions = [t.get("function") for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
    elif choice == "required":
        name = functions[0].get("name") if functions else None
    elif choice == "auto":
        name = chosen_tool(body.get("messages"), functions)
    else:
        return None, None
    if name is None:
        return None, None
    spec = next((f for f in functions if f.get("name") == name), {})
    return name, spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {"type": "object"}


def chosen_tool(messages: object, functions: list[dict]) -> str | None:
    """With tool_choice "auto": after a user's turn, the tool the user names, or the only one offered; after a
    tool's result, an answer in words (as a model would)."""
    turns = [m for m in messages if isinstance(m, dict) and m.get("role") not in ("system", "developer")] if (
        isinstance(messages, list)) else []  # instructions given after the user's turn do not end it
    if not turns or turns[-1].get("role") != "user":
        return None
    text = text_of(turns[-1].get("content")).lower()
    named = [f.get("name") for f in functions if isinstance(f.get("name"), str) and f["name"].lower() in text]
    if named:
        return named[0]
    return functions[0].get("name") if len(functions) == 1 else None


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
