"""Fitting the router so that it holds up on requests unlike the ones it was fitted to.

A random split of one data set rewards a scorer that learns the data set's topics. Here every choice is judged
leave-group-out instead: the examples are split by group (MMLU's families of subjects, or the tenants of the
gateway's own traffic), the scorer is trained on all groups but one and judged on the one left out, once per
group. The weights of the signals and of the learned scorer are the ones with the best mean over those folds;
the random split is reported beside them, never used to choose.

Signals that say what a request is rather than how hard it is (the marker words of simple, complex and critical
requests, code, tools, conversation depth) keep their weights: they are rules an admin sets, not guesses to fit.
The others may only raise the score, so that a quirk of one data set cannot turn a signal upside down.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Sequence

from gateway.routing.classifier import Classifier
from gateway.routing.evaluate import Example, apgr_of, groups_of, subject_means
from gateway.routing.scorer import BUCKETS, MAX_TOKENS, LearnedScorer, features_of
from gateway.routing.signals import DEFAULT_VOCABULARY, question_of, signals, words_of

RULES = {"simple_words": -0.3, "complex_words": 0.15, "critical_words": 0.5, "code": 0.07, "depth": 0.03,
         "tools": 0.05}  # kept as they are
TUNED = ("length", "technical_terms", "reasoning", "quantitative", "multi_step", "negation", "constraints",
         "sentences", "instruction")
SMOOTHING = 0.2  # an example's target: this much its own gain, the rest its subject's mean gain
STEPS = (0.1, 0.05, 0.025, 0.0125, 0.005)


@dataclass
class Fold:
    group: str
    examples: list[Example]
    signals: list[dict[str, float]]
    learned: list[float]  # from a scorer that never saw this group


def signals_of(example: Example) -> dict[str, float]:
    """The classifier's signals for an example (kept with the example when it came from the gateway's traffic)."""
    if example.signals is not None:
        return example.signals
    question = question_of(example.prompt or "")
    return signals(question, words_of(question), 1, False, DEFAULT_VOCABULARY)


def features(example: Example) -> tuple[int, ...]:
    return example.features if example.features is not None else features_of(example.prompt or "")


def targets(examples: Sequence[Example]) -> list[float]:
    """What the scorer learns for each example: its gain, drawn towards its subject's mean gain when subjects are
    known (one answer is a noisy label; a subject's mean is what a scorer can learn from its words)."""
    means = subject_means(examples)
    return [SMOOTHING * e.gain + (1 - SMOOTHING) * means[e.subject] if e.subject else e.gain for e in examples]


def train_scorer(examples: Sequence[Example], **options) -> LearnedScorer:
    return LearnedScorer.train(zip((features(e) for e in examples), targets(examples)), buckets=BUCKETS,
                               max_tokens=MAX_TOKENS, **options)


def folds(examples: Sequence[Example]) -> list[Fold]:
    """One fold per group: the group's examples, their signals, and scores from a scorer trained without it."""
    result = []
    for group in groups_of(examples):
        held_out = [e for e in examples if e.group == group]
        scorer = train_scorer([e for e in examples if e.group != group])
        result.append(Fold(group, held_out, [signals_of(e) for e in held_out],
                           [scorer.score_features(features(e)) for e in held_out]))
    return result


def fold_scores(fold: Fold, weights: dict[str, float]) -> list[float]:
    learned = weights.get("learned", 0.0)
    named = [(name, weight) for name, weight in weights.items() if weight and name != "learned"]
    return [learned * p + sum(weight * found.get(name, 0.0) for name, weight in named)
            for found, p in zip(fold.signals, fold.learned)]


def mean_apgr(fold_list: Sequence[Fold], weights: dict[str, float]) -> tuple[float, dict[str, float]]:
    each = {fold.group: apgr_of(fold_scores(fold, weights), fold.examples) for fold in fold_list}
    return sum(each.values()) / len(each), each


def choose_weights(fold_list: Sequence[Fold], start: dict[str, float], with_learned: bool) -> dict[str, float]:
    """Coordinate ascent on the mean leave-group-out APGR, from ``start``, within each signal's allowed sign."""
    weights = {**start, **RULES}
    names = (("learned",) if with_learned else ()) + TUNED
    best, _ = mean_apgr(fold_list, weights)
    for step in STEPS:
        improved = True
        while improved:
            improved = False
            for name in names:
                for move in (step * 4 if name == "learned" else step, -(step * 4 if name == "learned" else step)):
                    trial = dict(weights)
                    trial[name] = round(weights.get(name, 0.0) + move, 4)
                    if trial[name] < 0:
                        continue
                    value, _ = mean_apgr(fold_list, trial)
                    if value > best + 1e-4:
                        best, weights, improved = value, trial, True
    return {name: value for name, value in weights.items() if value}


def decision_microseconds(classifier: Classifier, prompts: Sequence[str]) -> float:
    """What one decision costs: the classifier on each prompt as a chat request."""
    bodies = [{"messages": [{"role": "user", "content": p}]} for p in prompts]
    started = time.perf_counter()
    for body in bodies:
        classifier.classify(body)
    return (time.perf_counter() - started) / max(1, len(bodies)) * 1e6


LEARNING_SIZES = (0, 250, 500, 1000)
LEARNING_TEST_MINIMUM = 200  # a group is judged on at least this many of its examples never trained on


def learning_curve(examples: Sequence[Example], weights: dict[str, float],
                   sizes: Sequence[int] = LEARNING_SIZES) -> dict[str, dict[int, dict[str, float]]]:
    """How fast the router learns a kind of traffic it was not fitted to, as it would from the gateway's ledger:
    for each group, a scorer trained on the other groups plus the first ``size`` labelled examples of this one
    (in a fixed order by hash), judged on the group's examples past the largest size. APGR per group, by size,
    for the classifier with ``weights`` and for the learned scorer alone."""
    result: dict[str, dict[int, dict[str, float]]] = {"blend": {size: {} for size in sizes},
                                                      "learned": {size: {} for size in sizes}}
    for group in groups_of(examples):
        own = sorted((e for e in examples if e.group == group), key=_draw_order)
        if len(own) - max(sizes) < LEARNING_TEST_MINIMUM:
            continue
        others = [e for e in examples if e.group != group]
        judged = own[max(sizes):]
        judged_signals = [signals_of(e) for e in judged]
        for size in sizes:
            scorer = train_scorer(others + own[:size])
            fold = Fold(group, judged, judged_signals, [scorer.score_features(features(e)) for e in judged])
            result["blend"][size][group] = apgr_of(fold_scores(fold, weights), judged)
            result["learned"][size][group] = apgr_of(fold.learned, judged)
    return result


def _draw_order(example: Example) -> int:
    return zlib.crc32((example.prompt or str(example.features)).encode())
