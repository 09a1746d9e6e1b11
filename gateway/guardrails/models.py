"""A guard model's verdict read: the categories a moderation model flags, or Llama Guard's hazard codes, and what a
rule does with them."""

from __future__ import annotations

import re
from typing import Any

from gateway.guardrails.policy import Guardrail, request_texts

_CODES = re.compile(r"\bS\d{1,2}\b")


class GuardUnavailable(Exception):
    pass


def request_text(body: dict) -> str:
    """What the guard model reads: the request's messages (every role), a prompt or an input, as one text."""
    return "\n".join(container[key] for container, key in request_texts(body))


def flagged_categories(kind: str, answer: Any) -> set[str]:
    """The categories a guard model's answer flags; ValueError for an answer it could not have meant."""
    if kind == "moderation":
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or not results:
            raise ValueError("a moderation answer without results")
        flagged: set[str] = set()
        for result in results:
            categories = result.get("categories") if isinstance(result, dict) else None
            if isinstance(categories, dict):
                flagged |= {name for name, hit in categories.items() if hit is True}
            if isinstance(result, dict) and result.get("flagged") is True and not flagged:
                flagged.add("flagged")
        return flagged
    choices = answer.get("choices") if isinstance(answer, dict) else None
    text = ((choices or [{}])[0].get("message") or {}).get("content") if choices else None
    if not isinstance(text, str):
        raise ValueError("a guard model's chat answer without text")
    verdict = text.strip().lower()
    if verdict.startswith("safe"):
        return set()
    if not verdict.startswith("unsafe"):
        raise ValueError("a Llama Guard answer is 'safe' or 'unsafe'")
    return set(_CODES.findall(text.upper())) or {"unsafe"}


def decide(rule: Guardrail, categories: set[str]) -> str | None:
    """The strongest action the rule's mapping gives the flagged categories (its own action by default; "*" maps
    the categories it does not name); None when nothing applies."""
    if not categories:
        return None
    mapping = dict(rule.categories)
    actions = {mapping.get(category, mapping.get("*", rule.action)) for category in categories}
    for action in ("block", "flag"):
        if action in actions:
            return action
    return None
