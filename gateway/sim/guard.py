"""The simulator as a guard model: OpenAI's moderation answers, and Llama Guard's verdicts in a chat.

A text is flagged in a category when it names it as ``sim:flag[category]`` or carries one of the category's
words below (a test's way of asking for a verdict). Llama Guard answers ``safe``, or ``unsafe`` and the codes of
its hazard categories (S1 violent crimes ... S14 code interpreter abuse) on the next line.
"""

from __future__ import annotations

import re

CATEGORIES = {
    "violence": ("kill", "murder", "attack"),
    "harassment": ("idiot", "loser"),
    "self-harm": ("hurt myself",),
    "hate": ("subhuman",),
    "sexual": ("explicit",),
    "illicit": ("make a bomb", "launder money"),
}
LLAMA_GUARD_CODES = {"violence": "S1", "illicit": "S2", "sexual": "S12", "hate": "S10", "self-harm": "S11",
                     "harassment": "S10"}
_FLAG = re.compile(r"sim:flag\[([a-z/-]+)\]")


def flagged(text: str) -> list[str]:
    lowered = text.lower()
    found = [category for category, words in CATEGORIES.items() if any(word in lowered for word in words)]
    found += [category for category in _FLAG.findall(text) if category not in found]
    return found


def moderation(text: str) -> dict:
    found = flagged(text)
    categories = {category: category in found for category in CATEGORIES}
    for category in found:
        categories[category] = True
    return {"flagged": bool(found), "categories": categories,
            "category_scores": {category: 0.97 if hit else 0.01 for category, hit in categories.items()}}


def llama_guard_verdict(text: str) -> str:
    found = flagged(text)
    if not found:
        return "safe"
    return "unsafe\n" + ",".join(sorted({LLAMA_GUARD_CODES.get(category, "S14") for category in found}))
