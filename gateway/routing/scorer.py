"""A small learned scorer: how much sending a request to the large model is worth.

Logistic regression over hashed words and word pairs of the request's text, trained offline on labelled
requests (``gateway router train``) and kept as a JSON file of the non-zero weights, with the blend of signals
chosen for it out of domain. Scoring is one pass of crc32 and array lookups over at most ``max_tokens`` words:
tens of microseconds, no model server, no numpy.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from array import array
from pathlib import Path
from typing import Iterable

from gateway.routing.signals import words_of

DEFAULT_PATH = Path(__file__).with_name("scorer.json")
BUCKETS, MAX_TOKENS = 1 << 18, 64
SAVED_PRECISION = 3  # decimals kept in the file
SAVED_MINIMUM = 0.001  # smaller weights are left out of the file (they change held-out APGR by < 0.001)


def hashed_features(words: list[str], buckets: int, max_tokens: int) -> set[int]:
    """Bucket numbers of the first ``max_tokens`` words and of each pair of neighbouring words ("a b")."""
    crc = zlib.crc32
    features: set[int] = set()
    add = features.add
    after_previous = None  # crc32 of the previous word and a space, continued by the next word for the pair
    for word in words[:max_tokens]:
        encoded = word.encode()
        alone = crc(encoded)
        add(alone % buckets)
        if after_previous is not None:
            add(crc(encoded, after_previous) % buckets)
        after_previous = crc(b" ", alone)
    return features


def features_of(text: str, buckets: int = BUCKETS, max_tokens: int = MAX_TOKENS) -> tuple[int, ...]:
    """The sorted hashed features of ``text``, as training and the gateway's traffic keep them."""
    return tuple(sorted(hashed_features(words_of(text), buckets, max_tokens)))


class NotAScorer(ValueError):
    """A file that is not a scorer's."""


class LearnedScorer:
    def __init__(self, weights: dict[int, float], bias: float, buckets: int = BUCKETS, max_tokens: int = MAX_TOKENS,
                 meta: dict | None = None) -> None:
        self.weights = weights
        self.bias = bias
        self.buckets = buckets
        self.max_tokens = max_tokens
        self.meta = meta or {}
        self._table = array("f", bytes(4 * buckets))  # a flat table is several times faster than a dict here
        for bucket, weight in weights.items():
            self._table[bucket] = weight

    def score(self, text: str) -> float:
        """From 0 to 1: how much the large model is expected to do better than the small one on ``text`` (above
        0.5: better; the scale is the training's target)."""
        return self.score_words(words_of(text))

    def score_words(self, words: list[str]) -> float:
        """``score`` for a text already split by ``signals.words_of``."""
        return self.score_features(hashed_features(words, self.buckets, self.max_tokens))

    def score_features(self, features: Iterable[int]) -> float:
        table = self._table
        return _sigmoid(self.bias + sum([table[f] for f in features]))

    @classmethod
    def load(cls, path: Path = DEFAULT_PATH) -> "LearnedScorer":
        """The scorer in ``path``: an OSError if it cannot be read, NotAScorer if it is not a scorer's file."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
            buckets, max_tokens, bias = data["buckets"], data["max_tokens"], float(data["bias"])
            weights = {int(k): float(v) for k, v in data["weights"].items()}
            meta = data.get("meta")
            if not (isinstance(buckets, int) and 1 <= buckets <= 1 << 24 and isinstance(max_tokens, int)
                    and max_tokens >= 1 and all(0 <= bucket < buckets for bucket in weights)
                    and isinstance(meta, (dict, type(None)))):
                raise ValueError("buckets, max_tokens, weights or meta out of shape")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NotAScorer(f"{path} is not a scorer written by `gateway router train` ({exc})") from None
        return cls(weights, bias, buckets, max_tokens, meta)

    def save(self, path: Path) -> None:
        weights = {str(k): round(v, SAVED_PRECISION) for k, v in sorted(self.weights.items())
                   if abs(v) >= SAVED_MINIMUM}
        data = {"buckets": self.buckets, "max_tokens": self.max_tokens, "bias": round(self.bias, 5),
                "meta": self.meta, "weights": weights}
        Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n")

    @property
    def prior(self) -> float:
        """The score of a request without a known word: the share of the training's gain it starts from."""
        return _sigmoid(self.bias)

    @property
    def blend(self) -> dict[str, float] | None:
        """The signal weights chosen with this scorer (by its leave-group-out evaluation), if it was trained so."""
        blend = self.meta.get("blend")
        return dict(blend) if isinstance(blend, dict) else None

    @property
    def thresholds(self) -> dict[str, float] | None:
        """The thresholds chosen with this scorer (for the share of large-model calls it was trained for), if any."""
        found = self.meta.get("thresholds")
        return dict(found) if isinstance(found, dict) else None

    @classmethod
    def train(cls, rows: Iterable[tuple[Iterable[int], float]], *, buckets: int = BUCKETS,
              max_tokens: int = MAX_TOKENS, epochs: int = 6, rate: float = 0.1, l2: float = 1e-6,
              seed: int = 0) -> "LearnedScorer":
        """Fit on (hashed features, target from 0 to 1) pairs with AdaGrad-scaled stochastic gradient descent; the
        features come from ``features_of`` with the same ``buckets`` and ``max_tokens``."""
        rows = [(sorted(features), float(target)) for features, target in rows]
        if not rows:
            raise ValueError("no examples to train on")
        prior = min(0.99, max(0.01, sum(y for _, y in rows) / len(rows)))
        bias = math.log(prior / (1 - prior))
        weights: dict[int, float] = {}
        squares: dict[int, float] = {}
        bias_square = 1.0
        shuffle = random.Random(seed).shuffle
        for _ in range(epochs):
            shuffle(rows)
            for features, label in rows:
                error = _sigmoid(bias + sum(weights.get(f, 0.0) for f in features)) - label
                bias_square += error * error
                bias -= rate * error / math.sqrt(bias_square)
                for f in features:
                    w = weights.get(f, 0.0)
                    gradient = error + l2 * w
                    squares[f] = squares.get(f, 1.0) + gradient * gradient
                    weights[f] = w - rate * gradient / math.sqrt(squares[f])
        return cls(weights, bias, buckets, max_tokens)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))
