"""Thresholds that follow the traffic: keeping a set share of routed requests on large models.

An admin sets ``target_large_share`` on a profile or a tenant. The scores the router gave recently to that scope's
requests are kept in a window (in Redis, shared by the replicas); every few seconds the threshold of the first
class that goes to a large model is set to the score above which that share of the window falls. The classes
around it move with it (a lower one never above it, a higher one never below it). Until the window holds
``MINIMUM_SCORES`` scores, the configured thresholds stay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from gateway.routing.classifier import Complexity, Thresholds

MINIMUM_SCORES = 100  # fewer recent scores than this: the configured thresholds stay
WINDOW = 2000  # scores kept per scope
_LOWER = {"moderate": (), "complex": ("moderate",), "critical": ("moderate", "complex")}
_HIGHER = {"moderate": ("complex", "critical"), "complex": ("critical",), "critical": ()}


def score_at_share(scores: list[float], share: float) -> float:
    """The score at or above which ``share`` of ``scores`` fall."""
    ordered = sorted(scores, reverse=True)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def thresholds_for_share(base: Thresholds, large_from: str, scores: list[float], share: float) -> Thresholds:
    """``base`` with the threshold of ``large_from`` (the first class sent to a large model) moved so that
    ``share`` of ``scores`` reach it."""
    if large_from == "simple" or len(scores) < MINIMUM_SCORES:
        return base
    at = score_at_share(scores, share)
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
        self.local: dict[str, deque[float]] = {}

    def observe(self, scope: str, score: float, share: float, large_from: str) -> None:
        pending = self.pending.get(scope)
        if pending is None:
            self.pending[scope] = [score]
            self.targets[scope] = (share, large_from)
        elif len(pending) < WINDOW:
            pending.append(score)

    def take_pending(self) -> dict[str, list[float]]:
        """The scores seen since the last call (also added to the local windows)."""
        pending, self.pending = self.pending, {}
        for scope, scores in pending.items():
            self.local.setdefault(scope, deque(maxlen=WINDOW)).extend(scores)
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
        """What the routing report shows of a scope: its target, the thresholds in force, the window's size."""
        share, large_from = self.targets.get(scope, (None, None))
        thresholds = self.thresholds.get(scope)
        return {"scope": scope, "target_large_share": share, "first_large_class": large_from,
                "recent_scores": self.window_sizes.get(scope, 0),
                "thresholds_in_force": None if thresholds is None else {
                    "moderate": round(thresholds.moderate, 4), "complex": round(thresholds.complex, 4),
                    "critical": round(thresholds.critical, 4)}}
