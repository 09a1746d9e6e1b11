"""Request complexity: SIMPLE, MODERATE, COMPLEX or CRITICAL, with the signals that decided it.

The score is a weighted sum of the request's signals (see signals.py) plus, when a learned scorer is loaded,
its estimate that the small model would get the request wrong. Thresholds on the score give the class. Every
decision can say which signals moved it most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from gateway.routing.scorer import LearnedScorer
from gateway.routing.signals import DEFAULT_VOCABULARY, Vocabulary, request_text, signals, words_of


class Complexity(str, Enum):
    SIMPLE = "simple"
    MODERATE = "moderate"
    COMPLEX = "complex"
    CRITICAL = "critical"


DEFAULT_WEIGHTS: dict[str, float] = {
    # The learned scorer's estimate carries most of the decision (it is what beats random on real data); the
    # rules move it where a request says plainly what it is: a greeting, a breach, code, a long analysis.
    "learned": 1.0,
    "length": 0.08,
    "simple_words": -0.3,
    "complex_words": 0.15,
    "critical_words": 0.5,
    "technical_terms": 0.05,
    "code": 0.07,
    "reasoning": 0.05,
    "depth": 0.03,
    "tools": 0.05,
}


@dataclass(frozen=True)
class Thresholds:
    """The lowest score of each class above SIMPLE."""

    moderate: float = 0.12
    complex: float = 0.2
    critical: float = 0.5


@dataclass(frozen=True)
class Decision:
    complexity: Complexity
    score: float
    signals: dict[str, float]

    def explain(self, weights: dict[str, float], top: int = 3) -> str:
        """The signals that moved the score most, as 'name=value' in falling order of weight times value."""
        moved = sorted(((abs(weights.get(k, 0.0) * v), k, v) for k, v in self.signals.items() if v), reverse=True)
        return ",".join(f"{name}={value:.2f}" for _, name, value in moved[:top])


@dataclass
class Classifier:
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    thresholds: Thresholds = Thresholds()
    vocabulary: Vocabulary = DEFAULT_VOCABULARY
    scorer: LearnedScorer | None = None

    def score_text(self, text: str, turns: int = 1, wants_tools: bool = False) -> tuple[float, dict[str, float]]:
        words = words_of(text)
        found = signals(text, words, turns, wants_tools, self.vocabulary)
        if self.scorer is not None and self.weights.get("learned"):
            found["learned"] = self.scorer.score_words(words)
        weights = self.weights
        return sum(weights.get(name, 0.0) * value for name, value in found.items()), found

    def classify(self, body: dict) -> Decision:
        text, turns = request_text(body)
        score, found = self.score_text(text, turns, bool(body.get("tools")))
        return Decision(self.complexity_of(score), score, found)

    def complexity_of(self, score: float) -> Complexity:
        t = self.thresholds
        if score >= t.critical:
            return Complexity.CRITICAL
        if score >= t.complex:
            return Complexity.COMPLEX
        if score >= t.moderate:
            return Complexity.MODERATE
        return Complexity.SIMPLE
