"""Thresholds that follow the traffic: keeping a set share of routed requests on large models.

An admin sets ``target_large_share`` on a profile or a tenant. The scores the router gave that scope's answered
requests are kept in a window (in Redis, shared by the replicas, newest first); every few seconds, and as soon as
``UPDATE_EVERY`` new scores have come, the threshold of the first class that goes to a large model is set to the
score above which that share of the window falls, each score weighted by its recency (halved every
``HALF_LIFE`` requests): a change in the traffic is followed within a few hundred requests, not the window's
length, while steady traffic, read over an effective few hundred scores, keeps its threshold within sampling
noise (there is no feedback loop to oscillate). The classes around it move with it (a lower one never above it, a
higher one never below it). Until the window holds ``MINIMUM_SCORES`` scores, the configured thresholds stay.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import replace

from gateway.routing.classifier import Complexity, Thresholds

MINIMUM_SCORES = 100  # fewer recent scores than this: the configured thresholds stay
WINDOW = 2000  # scores kept per scope
HALF_LIFE = 100  # requests: a score this many requests old weighs half as much as the newest
READ = 1000  # the newest scores read to set a threshold (older ones weigh less than 0.1% each)
UPDATE_EVERY = 50  # new scores of a scope that make the thresholds be set again before the interval is over
RECENT = 200  # the decisions this process keeps per scope, to say how far the share is from its target
_LOWER = {"moderate": (), "complex": ("moderate",), "critical": ("moderate", "complex")}
_HIGHER = {"moderate": ("complex", "critical"), "complex": ("critical",), "critical": ()}


def score_at_share(scores: list[float], share: float) -> float:
    """The score at or above which ``share`` of ``scores`` fall."""
    ordered = sorted(scores, reverse=True)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def recent_score_at_share(newest_first: list[float], share: float, half_life: float = HALF_LIFE) -> float:
    """The score at or above which ``share`` of the weight of ``newest_first`` falls, a score's weight halving
    every ``half_life`` positions back."""
    decay = 0.5 ** (1 / half_life)
    weighted = sorted(((score, decay ** age) for age, score in enumerate(newest_first)), reverse=True)
    total = sum(weight for _, weight in weighted)
    reached = 0.0
    for score, weight in weighted:
        reached += weight
        if reached >= share * total:
            return score
    return weighted[-1][0]


def thresholds_for_share(base: Thresholds, large_from: str, scores: list[float], share: float) -> Thresholds:
    """``base`` with the threshold of ``large_from`` (the first class sent to a large model) moved so that
    ``share`` of ``scores`` (newest first) reach it, the recent ones weighing most."""
    if large_from == "simple" or len(scores) < MINIMUM_SCORES:
        return base
    at = recent_score_at_share(scores[:READ], share)
    changed = {large_from: at}
    for name in _LOWER[large_from]:
        changed[name] = min(getattr(base, name), at)
    for name in _HIGHER[large_from]:
        changed[name] = max(getattr(base, name), at)
    return replace(base, **changed)


class ShareKeeper:
    """The thresholds in force for each scope with a target share, the scores seen since the last round, and a
    window of this process's own (used while no shared window can be read)."""

    def __init__(self) -> None:
        self.thresholds: dict[str, Thresholds] = {}
        self.targets: dict[str, tuple[float, str]] = {}  # scope -> (target share, first class on a large model)
        self.window_sizes: dict[str, int] = {}
        self.pending: dict[str, list[float]] = {}
        self.local: dict[str, deque[float]] = {}  # newest first
        self.recent: dict[str, deque[bool]] = {}  # whether each of the scope's last decisions went large
        self.due = asyncio.Event()  # enough new scores to set the thresholds again now

    def observe(self, scope: str, score: float, share: float, large_from: str, went_large: bool) -> None:
        """An answered request's score (a refused one is not routed traffic: it moves no threshold)."""
        pending = self.pending.get(scope)
        if pending is None:
            self.pending[scope] = pending = [score]
            self.targets[scope] = (share, large_from)
        elif len(pending) < WINDOW:
            pending.append(score)
        if len(pending) >= UPDATE_EVERY:
            self.due.set()
        recent = self.recent.get(scope)
        if recent is None:
            recent = self.recent[scope] = deque(maxlen=RECENT)
        recent.append(went_large)

    def take_pending(self) -> dict[str, list[float]]:
        """The scores seen since the last call (also added to the local windows)."""
        pending, self.pending = self.pending, {}
        self.due.clear()
        for scope, scores in pending.items():
            self.local.setdefault(scope, deque(maxlen=WINDOW)).extendleft(scores)
        return pending

    def complexity(self, scope: str, score: float) -> Complexity | None:
        """The class of ``score`` under the scope's thresholds; None while they are the configured ones."""
        thresholds = self.thresholds.get(scope)
        return thresholds.complexity_of(score) if thresholds is not None else None

    def update(self, scope: str, base: Thresholds, window: list[float]) -> None:
        """Set the scope's thresholds from its recent scores (``base``: the configured ones)."""
        share, large_from = self.targets[scope]
        self.window_sizes[scope] = len(window)
        if len(window) < MINIMUM_SCORES:
            self.thresholds.pop(scope, None)
            return
        self.thresholds[scope] = thresholds_for_share(base, large_from, window, share)

    def status(self, scope: str) -> dict:
        """What the routing report shows of a scope: its target, the thresholds in force, the window's size, and
        the share of this replica's last decisions that went large (how far from the target it is)."""
        share, large_from = self.targets.get(scope, (None, None))
        thresholds = self.thresholds.get(scope)
        recent = self.recent.get(scope) or ()
        recent_share = sum(recent) / len(recent) if recent else None
        return {"scope": scope, "target_large_share": share, "first_large_class": large_from,
                "recent_scores": self.window_sizes.get(scope, 0),
                "recent_decisions": {"requests": len(recent),
                                     "large_share": None if recent_share is None else round(recent_share, 4),
                                     "off_target": None if recent_share is None or share is None
                                     else round(recent_share - share, 4)},
                "thresholds_in_force": None if thresholds is None else {
                    "moderate": round(thresholds.moderate, 4), "complex": round(thresholds.complex, 4),
                    "critical": round(thresholds.critical, 4)}}
