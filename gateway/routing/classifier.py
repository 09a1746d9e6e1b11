"""Request complexity: SIMPLE, MODERATE, COMPLEX or CRITICAL, with the signals that decided it.

The score is a weighted sum of the request's signals (see signals.py) plus, when a learned scorer is loaded,
its estimate of what the large model would do better, with the weights chosen for that scorer out of domain
(fit.py). Thresholds on the score give the class. Every decision can say which signals moved it most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from gateway.routing.scorer import BUCKETS, MAX_TOKENS, LearnedScorer, hashed_features
from gateway.routing.signals import (DEFAULT_VOCABULARY, Vocabulary, question_of, request_text, signals,
                                     words_of)


class Complexity(str, Enum):
    SIMPLE = "simple"
    MODERATE = "moderate"
    COMPLEX = "complex"
    CRITICAL = "critical"


# Without a learned scorer: the marker words of seed 001's routing examples as rules, with its thresholds, and the
# weights of the other signals chosen by `gateway router train` leave-group-out on the MMLU routing data (see
# routing/fit.py). The signals of shape (instruction, sentences) are left out here: they add to nearly every
# request, so they need the thresholds a trained scorer brings with it (the shipped scorer's blend has them).
DEFAULT_WEIGHTS: dict[str, float] = {
    "length": 0.005,
    "simple_words": -0.3,
    "complex_words": 0.15,
    "critical_words": 0.5,
    "technical_terms": 0.0,
    "code": 0.07,
    "reasoning": 0.025,
    "quantitative": 0.125,
    "multi_step": 0.05,
    "negation": 0.0,
    "constraints": 0.0,
    "sentences": 0.0,
    "instruction": 0.0,
    "depth": 0.03,
    "tools": 0.05,
}
LEARNED_WEIGHT = 1.0  # for a scorer file without a blend of its own


@dataclass(frozen=True)
class Thresholds:
    """The lowest score of each class above SIMPLE."""

    moderate: float = 0.1
    complex: float = 0.15
    critical: float = 0.5

    def complexity_of(self, score: float) -> "Complexity":
        if score >= self.critical:
            return Complexity.CRITICAL
        if score >= self.complex:
            return Complexity.COMPLEX
        if score >= self.moderate:
            return Complexity.MODERATE
        return Complexity.SIMPLE


@dataclass(frozen=True)
class Decision:
    complexity: Complexity
    score: float
    signals: dict[str, float]
    words: list[str] = field(default_factory=list, repr=False)  # what the scorer read, to learn from later
    hashed: set[int] | None = field(default=None, repr=False)  # the scorer's features of them, if kept alike

    def features(self) -> set[int]:
        """The request's words hashed as the ledger keeps them to learn from (``scorer.features_of``)."""
        return self.hashed if self.hashed is not None else hashed_features(self.words, BUCKETS, MAX_TOKENS)

    def explain(self, weights: dict[str, float], top: int = 3, neutral: dict[str, float] | None = None) -> str:
        """The signals that moved the score most, as 'name=value' in falling order of weight times how far the
        value is from its ``neutral`` one (0 unless given: the learned scorer's is what it says of a request it
        knows nothing about)."""
        neutral = neutral or {}
        moved = sorted(((abs(weights.get(k, 0.0) * (v - neutral.get(k, 0.0))), k, v)
                        for k, v in self.signals.items() if v), reverse=True)
        return ",".join(f"{name}={value:.2f}" for moved_by, name, value in moved[:top] if moved_by)


@dataclass
class Classifier:
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    thresholds: Thresholds = Thresholds()
    vocabulary: Vocabulary = DEFAULT_VOCABULARY
    scorer: LearnedScorer | None = None

    def score_text(self, text: str, turns: int = 1, wants_tools: bool = False) -> tuple[float, dict[str, float]]:
        score, found, _, _ = self._score(text, turns, wants_tools)
        return score, found

    def classify(self, body: dict) -> Decision:
        text, turns = request_text(body)
        score, found, words, hashed = self._score(text, turns, bool(body.get("tools")))
        return Decision(self.complexity_of(score), score, found, words, hashed)

    def _score(self, text: str, turns: int,
               wants_tools: bool) -> tuple[float, dict[str, float], list[str], set[int] | None]:
        """The score, the signals, the words read, and the scorer's features of them when the ledger's are alike."""
        words = words_of(text)
        question = question_of(text)
        found = signals(question, words if question is text else words_of(question), turns, wants_tools,
                        self.vocabulary)
        hashed = None
        scorer = self.scorer
        if scorer is not None and self.weights.get("learned"):
            hashed = hashed_features(words, scorer.buckets, scorer.max_tokens)
            found["learned"] = scorer.score_features(hashed)
            if scorer.buckets != BUCKETS or (scorer.max_tokens != MAX_TOKENS and len(words) > MAX_TOKENS):
                hashed = None  # the ledger keeps the first MAX_TOKENS words' features: hashed again for it
        weights = self.weights
        return sum(weights.get(name, 0.0) * value for name, value in found.items()), found, words, hashed

    @property
    def neutral(self) -> dict[str, float]:
        """Each signal's value that says nothing about a request (see Decision.explain)."""
        return {"learned": self.scorer.prior} if self.scorer is not None else {}

    def complexity_of(self, score: float) -> Complexity:
        return self.thresholds.complexity_of(score)
