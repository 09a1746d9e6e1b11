"""A small learned scorer: how much sending a request to the large model is worth.

A ridge regression over the TF-IDF vector of hashed words and word pairs of the request's text (each feature
present or not, weighted by its inverse document frequency, the vector scaled to unit length over the features
training saw), trained offline on labelled requests (``gateway router train``) and kept as a JSON file of the
non-zero weights (already multiplied by their IDF) and the IDF of every feature seen, with the blend of signals
chosen for it out of domain. The score is ``bias + sum(weights) / sqrt(sum(idf^2))`` over the request's
features: one pass of crc32 and two array lookups per feature over at most ``max_tokens`` words, tens of
microseconds, no model server, no numpy. Files of the earlier logistic scorer (``kind`` absent) still load.
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
BUCKETS, MAX_TOKENS = 1 << 18, 64  # MAX_TOKENS: the words the ledger keeps of a request to learn from
READ_TOKENS = 256  # the words a ridge scorer reads (the first 64 alone lose 0.01 of held-out APGR)
SAVED_PRECISION = 3  # decimals kept in the file
SAVED_MINIMUM = 0.001  # smaller weights are left out of the file (they change held-out APGR by < 0.001)
# A ridge weight is divided by the request vector's length (about 50 for a question), so one below this moves a
# score by less than 0.0002: left out.
RIDGE_SAVED_MINIMUM = 0.01


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
                 meta: dict | None = None, df: dict[int, int] | None = None, documents: int = 0) -> None:
        self.weights = weights
        self.bias = bias
        self.buckets = buckets
        self.max_tokens = max_tokens
        self.meta = meta or {}
        self.df = df  # the ridge scorer's document frequency of each feature training saw; None: logistic
        self.documents = documents  # the examples it was trained on
        self._table = array("f", bytes(4 * buckets))  # a flat table is several times faster than a dict here
        for bucket, weight in weights.items():
            self._table[bucket] = weight
        self._squares = None
        if df is not None:
            self._squares = array("f", bytes(4 * buckets))
            for bucket, count in df.items():
                self._squares[bucket] = idf_of(count, documents) ** 2

    @property
    def kind(self) -> str:
        return "logistic" if self.df is None else "ridge"

    def score(self, text: str) -> float:
        """From 0 to 1: how much the large model is expected to do better than the small one on ``text`` (above
        0.5: better; the scale is the training's target)."""
        return self.score_words(words_of(text))

    def score_words(self, words: list[str]) -> float:
        """``score`` for a text already split by ``signals.words_of``."""
        return self.score_features(hashed_features(words, self.buckets, self.max_tokens))

    def score_features(self, features: Iterable[int]) -> float:
        table, squares = self._table, self._squares
        if squares is None:
            return _sigmoid(self.bias + sum([table[f] for f in features]))
        features = features if isinstance(features, (set, frozenset, list, tuple)) else list(features)
        length = sum([squares[f] for f in features])
        return self.bias + sum([table[f] for f in features]) / math.sqrt(length) if length else self.bias

    @classmethod
    def load(cls, path: Path = DEFAULT_PATH) -> "LearnedScorer":
        """The scorer in ``path``: an OSError if it cannot be read, NotAScorer if it is not a scorer's file."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
            buckets, max_tokens, bias = data["buckets"], data["max_tokens"], float(data["bias"])
            weights = {int(k): float(v) for k, v in data["weights"].items()}
            meta = data.get("meta")
            kind = data.get("kind", "logistic")
            df, documents = None, 0
            if kind == "ridge":
                documents = int(data["documents"])
                df = {int(bucket): int(count) for count, buckets_of in data["df"].items() for bucket in buckets_of}
            if not (isinstance(buckets, int) and 1 <= buckets <= 1 << 24 and isinstance(max_tokens, int)
                    and max_tokens >= 1 and all(0 <= bucket < buckets for bucket in weights)
                    and all(0 <= bucket < buckets and 1 <= count <= documents for bucket, count in (df or {}).items())
                    and kind in ("logistic", "ridge") and isinstance(meta, (dict, type(None)))):
                raise ValueError("kind, buckets, max_tokens, weights, df or meta out of shape")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NotAScorer(f"{path} is not a scorer written by `gateway router train` ({exc})") from None
        return cls(weights, bias, buckets, max_tokens, meta, df, documents)

    def save(self, path: Path) -> None:
        smallest = SAVED_MINIMUM if self.df is None else RIDGE_SAVED_MINIMUM
        weights = {str(k): round(v, SAVED_PRECISION) for k, v in sorted(self.weights.items()) if abs(v) >= smallest}
        data = {"kind": self.kind, "buckets": self.buckets, "max_tokens": self.max_tokens,
                "bias": round(self.bias, 5), "meta": self.meta, "weights": weights}
        if self.df is not None:
            by_count: dict[int, list[int]] = {}
            for bucket, count in sorted(self.df.items()):
                by_count.setdefault(count, []).append(bucket)
            data["documents"] = self.documents
            data["df"] = {str(count): found for count, found in sorted(by_count.items())}
        Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n")

    @property
    def prior(self) -> float:
        """The score of a request without a known word: the share of the training's gain it starts from."""
        return self.bias if self.df is not None else _sigmoid(self.bias)

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


    @classmethod
    def train_ridge(cls, rows: Iterable[tuple[Iterable[int], float]], alpha: float, *, buckets: int = BUCKETS,
                    max_tokens: int = READ_TOKENS) -> "LearnedScorer":
        """Fit a ridge regression of the targets (0 to 1) on the TF-IDF vectors of (hashed features, target)
        pairs, by conjugate gradients on its normal equations; the IDF is the smoothed one of the rows given."""
        import numpy as np

        rows = [(sorted(set(features)), float(target)) for features, target in rows]
        if not rows:
            raise ValueError("no examples to train on")
        lengths = np.array([len(f) for f, _ in rows])
        columns = np.fromiter((f for features, _ in rows for f in features), dtype=np.int64, count=int(lengths.sum()))
        targets = np.array([y for _, y in rows])
        seen = np.bincount(columns, minlength=buckets)
        idf = np.log((1 + len(rows)) / (1 + seen)) + 1  # idf_of, for every bucket at once
        idf[seen == 0] = 0.0  # a feature training never saw weighs nothing and does not lengthen the vector
        values = idf[columns]
        norms = np.sqrt(np.maximum(np.add.reduceat(values * values, np.r_[0, np.cumsum(lengths)[:-1]]), 1e-12))
        values = values / np.repeat(norms, lengths)
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        empty = lengths == 0

        def times(w):  # X w
            out = np.add.reduceat(values * w[columns], starts) if len(columns) else np.zeros(len(rows))
            out[empty] = 0.0
            return out

        def transposed_times(r):  # X^T r
            return np.bincount(columns, weights=values * np.repeat(r, lengths), minlength=buckets)

        bias = float(targets.mean())
        right = transposed_times(targets - bias)
        w = np.zeros(buckets)
        residual, direction = right.copy(), right.copy()
        size = residual @ residual
        for _ in range(500):
            if size <= 1e-12 * (right @ right):
                break
            moved = transposed_times(times(direction)) + alpha * direction
            step = size / (direction @ moved)
            w += step * direction
            residual -= step * moved
            new_size = residual @ residual
            direction = residual + new_size / size * direction
            size = new_size
        scaled = w * idf  # what each present feature adds before the vector's length divides the sum
        weights = {int(b): float(scaled[b]) for b in np.nonzero(np.abs(scaled) >= RIDGE_SAVED_MINIMUM)[0]}
        return cls(weights, bias, buckets, max_tokens, df={int(b): int(seen[b]) for b in np.nonzero(seen)[0]},
                   documents=len(rows))


def idf_of(count: int, documents: int) -> float:
    """A feature's smoothed inverse document frequency: seen in ``count`` of ``documents`` examples."""
    return math.log((1 + documents) / (1 + count)) + 1


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))
