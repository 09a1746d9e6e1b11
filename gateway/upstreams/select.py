"""Which deployment of a model takes the next request, and which ones are tried after it fails.

The serving deployments (the usable ones of the lowest priority) share requests in turn; after them come the
model's standby deployments by priority. A deployment that fails ``failures_before_cooldown`` times in a row is
passed over for ``cooldown_seconds`` (tried last, not never: when all are cooling down, one still gets the call).
"""

from __future__ import annotations

import logging
import time

from gateway.config.types import Deployment, FallbackPolicy, Model
from gateway.observability import metrics

log = logging.getLogger("gateway.upstreams")


class DeploymentSelector:
    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self._failures: dict[tuple[str, str], int] = {}  # (model, deployment) -> failures in a row
        self._cooling_until: dict[tuple[str, str], float] = {}

    def candidates(self, model: Model) -> list[Deployment]:
        """The deployments to try for one request, in order."""
        serving = model.serving
        if len(serving) > 1:
            turn = self._next.get(model.name, 0)
            self._next[model.name] = turn + 1
            start = turn % len(serving)
            serving = serving[start:] + serving[:start]
        order = [*serving, *model.standby]
        if not self._cooling_until:
            return order
        now = time.monotonic()
        cooling = [d for d in order if self._cooling_until.get((model.name, d.name), 0.0) > now]
        return [d for d in order if d not in cooling] + cooling

    def failed(self, model: Model, deployment: Deployment, policy: FallbackPolicy) -> None:
        key = (model.name, deployment.name)
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        if failures >= policy.failures_before_cooldown and policy.cooldown_seconds > 0:
            if key not in self._cooling_until:
                log.warning("deployment %s of model %s failed %d times in a row; passed over for %gs",
                            deployment.name, model.name, failures, policy.cooldown_seconds)
            self._cooling_until[key] = time.monotonic() + policy.cooldown_seconds
            metrics.DEPLOYMENT_COOLDOWNS.labels(deployment.name).inc()

    def status(self) -> dict[tuple[str, str], dict]:
        """(model, deployment) -> failures in a row and seconds of cooldown left, for those that failed lately."""
        now = time.monotonic()
        return {key: {"failures_in_a_row": failures,
                      "cooldown_seconds_left": round(max(0.0, self._cooling_until.get(key, now) - now), 1)}
                for key, failures in self._failures.items()}

    def succeeded(self, model: Model, deployment: Deployment) -> None:
        key = (model.name, deployment.name)
        if key in self._failures:
            del self._failures[key]
            self._cooling_until.pop(key, None)
