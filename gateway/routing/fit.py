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
from gateway.routing.scorer import BUCKETS, READ_TOKENS, LearnedScorer, features_of
from gateway.routing.signals import DEFAULT_VOCABULARY, question_of, signals, words_of

RULES = {"simple_words": -0.3, "complex_words": 0.15, "critical_words": 0.5, "code": 0.07, "depth": 0.03,
         "tools": 0.05}  # never fitted: only scaled with the learned scorer's weight (_scaled)
TUNED = ("length", "technical_terms", "reasoning", "quantitative", "multi_step", "negation", "constraints",
         "sentences", "instruction")
# The ridge's regulariser and the target's smoothing (an example's target: this much its own gain, the rest its
# subject's mean gain) are chosen by cross-validation inside the examples trained on (choose_ridge); these are the
# values it chose on the training half of the packaged MMLU data, the defaults where there is nothing to choose on.
ALPHA, SMOOTHING = 8.0, 0.5
ALPHAS, SMOOTHINGS, CV_FOLDS = (1.0, 2.0, 4.0, 8.0), (0.2, 0.3, 0.5), 4
STEPS = (0.1, 0.05, 0.025, 0.0125, 0.005)
LEARNED_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
OWN_WEIGHTS = (1, 4, 8)  # how many times a new kind of traffic's own labelled example may count
ADAPT_FOLDS = 3
REFERENCE_LEARNED = 1.2  # the learned weight next to which RULES were set


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
    """The words a scorer reads of an example: its text's first READ_TOKENS, or what the ledger kept of it."""
    if example.features is not None:
        return example.features
    return features_of(example.prompt or "", max_tokens=READ_TOKENS)


def targets(examples: Sequence[Example], smoothing: float = SMOOTHING) -> list[float]:
    """What the scorer learns for each example: its gain, drawn towards its subject's mean gain (over ``examples``)
    when subjects are known (one answer is a noisy label; a subject's mean is what a scorer can learn from its
    words)."""
    means = subject_means(examples)
    return [smoothing * e.gain + (1 - smoothing) * means[e.subject] if e.subject else e.gain for e in examples]


@dataclass(frozen=True)
class Ridge:
    alpha: float = ALPHA
    smoothing: float = SMOOTHING
    cv_apgr: float | None = None  # the mean APGR of the cross-validation that chose them


def train_scorer(examples: Sequence[Example], ridge: Ridge = Ridge()) -> LearnedScorer:
    return LearnedScorer.train_ridge(zip((features(e) for e in examples), targets(examples, ridge.smoothing)),
                                     ridge.alpha, buckets=BUCKETS, max_tokens=READ_TOKENS)


def choose_ridge(examples: Sequence[Example]) -> Ridge:
    """The regulariser and the target's smoothing with the best mean APGR over CV_FOLDS folds drawn by hash inside
    ``examples`` (each fold's subject means from the other folds, so that no label leaks into its own target)."""
    drawn = [zlib.crc32((e.prompt or str(e.features)).encode()) % CV_FOLDS for e in examples]
    parts = [([e for e, d in zip(examples, drawn) if d != k], [e for e, d in zip(examples, drawn) if d == k])
             for k in range(CV_FOLDS)]
    parts = [(train, test) for train, test in parts if train and test and len({e.gain for e in test}) > 1]
    if not parts:
        return Ridge()
    smoothings = SMOOTHINGS if any(e.subject for e in examples) else (1.0,)
    best = Ridge(cv_apgr=-1.0)
    for smoothing in smoothings:
        for alpha in ALPHAS:
            each = []
            for train, test in parts:
                scorer = train_scorer(train, Ridge(alpha, smoothing))
                each.append(apgr_of([scorer.score_features(features(e)) for e in test], test))
            mean = sum(each) / len(each)
            if mean > best.cv_apgr + 1e-4:
                best = Ridge(alpha, smoothing, round(mean, 4))
    return best


def folds(examples: Sequence[Example], ridge: Ridge = Ridge()) -> list[Fold]:
    """One fold per group: the group's examples, their signals, and scores from a scorer trained without it."""
    result = []
    for group in groups_of(examples):
        held_out = [e for e in examples if e.group == group]
        scorer = train_scorer([e for e in examples if e.group != group], ridge)
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
    """Coordinate ascent on the mean APGR over ``fold_list`` (leave-group-out), within each signal's allowed sign:
    from ``start`` and, with the learned scorer, also from the learned scorer with the rules alone; the better of
    the two, so that a blend chosen when the words carried little does not hold back a scorer that has learned
    more since."""
    if not with_learned:
        return _ascend(fold_list, {**start, **RULES}, TUNED)
    starts = ({**start, **RULES}, {"learned": 1.0, **RULES})
    found = [_ascend(fold_list, _scaled(fold_list, weights), ("learned",) + TUNED) for weights in starts]
    return max(found, key=lambda weights: mean_apgr(fold_list, weights)[0])


def _scaled(fold_list: Sequence[Fold], weights: dict[str, float]) -> dict[str, float]:
    """``weights`` with the learned scorer's weight of the best order, and the rules scaled with it.

    A scorer's spread is its own (a ridge's is narrow, so its weight is large): the marker words, the admin's rules,
    keep the strength they have next to it when its weight is REFERENCE_LEARNED, so that a request naming a breach
    still reaches the critical class whatever scorer is loaded."""
    learned = max(LEARNED_SCALES, key=lambda w: mean_apgr(fold_list, {**weights, "learned": w})[0])
    factor = max(1.0, learned / REFERENCE_LEARNED)
    return {**weights, **{name: round(value * factor, 4) for name, value in RULES.items()}, "learned": learned}


def _ascend(fold_list: Sequence[Fold], weights: dict[str, float], names: Sequence[str]) -> dict[str, float]:
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
                   sizes: Sequence[int] = LEARNING_SIZES,
                   ridge: Ridge = Ridge()) -> dict[str, dict[int, dict[str, float]]]:
    """How fast the router learns a kind of traffic it was not fitted to, as it would from the gateway's ledger:
    for each group, a scorer trained on the other groups plus the first ``size`` labelled examples of this one
    (in a fixed order by hash), judged on the group's examples past the largest size. APGR per group, by size,
    for the classifier with ``weights``, for it adapted to the labels (``adapt``: their weight and the blend chosen
    again on them), and for the learned scorer alone."""
    result: dict[str, dict[int, dict[str, float]]] = {"blend": {size: {} for size in sizes},
                                                      "rechosen": {size: {} for size in sizes},
                                                      "learned": {size: {} for size in sizes}}
    for group in groups_of(examples):
        own = sorted((e for e in examples if e.group == group), key=_draw_order)
        if len(own) - max(sizes) < LEARNING_TEST_MINIMUM:
            continue
        others = [e for e in examples if e.group != group]
        judged = own[max(sizes):]
        judged_signals = [signals_of(e) for e in judged]
        for size in sizes:
            scorer = train_scorer(others + own[:size], ridge)
            fold = Fold(group, judged, judged_signals, [scorer.score_features(features(e)) for e in judged])
            result["blend"][size][group] = apgr_of(fold_scores(fold, weights), judged)
            result["learned"][size][group] = apgr_of(fold.learned, judged)
            if size:
                weight, rechosen = adapt(others, own[:size], weights, ridge)
                if weight != 1:
                    scorer = train_scorer(others + own[:size] * weight, ridge)
                    fold = Fold(group, judged, judged_signals,
                                [scorer.score_features(features(e)) for e in judged])
            else:
                rechosen = weights
            result["rechosen"][size][group] = apgr_of(fold_scores(fold, rechosen), judged)
    return result


def adapt(others: Sequence[Example], labelled: Sequence[Example], weights: dict[str, float],
          ridge: Ridge = Ridge()) -> tuple[int, dict[str, float]]:
    """How a new kind of traffic's own ``labelled`` examples should count, once there are some: how many times
    each weighs against ``others`` in the scorer's training (OWN_WEIGHTS), and whether the blend in force or the
    learned scorer with the rules alone serves it better. Judged on the labelled examples themselves, each scored
    by a scorer trained without it (ADAPT_FOLDS folds), never on the traffic to come; a choice is made among few
    candidates, so that a few hundred labels cannot be fitted by chance. Below 100 labels nothing changes."""
    if len(labelled) < 100 or len({e.gain for e in labelled}) < 2:
        return 1, weights
    parts = [[e for i, e in enumerate(labelled) if i % ADAPT_FOLDS == k] for k in range(ADAPT_FOLDS)]
    best, own, scores = -1.0, 1, None
    for weight in OWN_WEIGHTS:
        found = {}
        for k, part in enumerate(parts):
            rest = [e for j, p in enumerate(parts) if j != k for e in p]
            scorer = train_scorer(list(others) + rest * weight, ridge)
            found.update({id(e): scorer.score_features(features(e)) for e in part})
        learned = [found[id(e)] for e in labelled]
        value = apgr_of(learned, labelled)
        if value > best + 1e-4:
            best, own, scores = value, weight, learned
    fold = Fold("labelled", list(labelled), [signals_of(e) for e in labelled], scores)
    words_and_rules = {name: value for name, value in weights.items() if name not in TUNED}
    return own, max((weights, words_and_rules), key=lambda w: apgr_of(fold_scores(fold, w), fold.examples))


def _draw_order(example: Example) -> int:
    return zlib.crc32((example.prompt or str(example.features)).encode())
