"""How sure a model sounds: the confidence a cascade compares with its threshold.

From the tokens' log probabilities, the geometric mean probability of the answer's tokens (exp of the mean
logprob); halved when the text says it is unsure or refuses ("I'm not sure", "I don't know", "I can't help with
that"). An answer without logprobs counts as fully sure unless such a phrase appears. With several choices the
least sure one counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

UNCERTAINTY_PHRASES = (
    "i'm not sure", "i am not sure", "not entirely sure", "i don't know", "i do not know", "i'm not certain",
    "i am not certain", "i'm unsure", "hard to say", "difficult to say", "i cannot answer", "i can't answer",
    "i can't help with", "i cannot help with", "i'm unable to", "i am unable to", "i cannot assist",
    "i can't assist", "i don't have enough information", "i do not have enough information",
)
PHRASE_PENALTY = 0.5


@dataclass(frozen=True, slots=True)
class Confidence:
    value: float  # 0 to 1
    token_probability: float | None  # geometric mean probability of the tokens, when logprobs came back
    phrase: str | None  # the uncertainty phrase found, if any

    def explain(self) -> str:
        parts = [f"{self.value:.3f}"]
        if self.token_probability is not None:
            parts.append(f"tokens={self.token_probability:.3f}")
        if self.phrase:
            parts.append(f'phrase="{self.phrase}"')
        return " ".join(parts)


def measure(response: dict, phrases: tuple[str, ...] = UNCERTAINTY_PHRASES) -> Confidence:
    """The confidence of a chat or text completion response (the least sure of its choices)."""
    least: Confidence | None = None
    for choice in response.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        text, logprobs = _text_and_logprobs(choice)
        probability = math.exp(sum(logprobs) / len(logprobs)) if logprobs else None
        lowered = text.lower()
        phrase = next((p for p in phrases if p in lowered), None) if text else None
        value = 1.0 if probability is None else probability
        if phrase is not None:
            value *= PHRASE_PENALTY
        found = Confidence(round(value, 4), probability, phrase)
        if least is None or found.value < least.value:
            least = found
    return least or Confidence(1.0, None, None)


def _text_and_logprobs(choice: dict) -> tuple[str, list[float]]:
    message = choice.get("message")
    logprobs = choice.get("logprobs") or {}
    if isinstance(message, dict):  # chat: logprobs.content[].logprob
        text = message.get("content") if isinstance(message.get("content"), str) else ""
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        values = [e["logprob"] for e in entries or () if isinstance(e, dict)
                  and isinstance(e.get("logprob"), (int, float))]
        return text, values
    text = choice.get("text") if isinstance(choice.get("text"), str) else ""  # completions: token_logprobs[]
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    return text, [v for v in values or () if isinstance(v, (int, float))]


def strip_logprobs(response: dict) -> None:
    """Remove the logprobs the gateway asked for and the client did not."""
    for choice in response.get("choices") or ():
        if isinstance(choice, dict) and "logprobs" in choice:
            choice["logprobs"] = None
