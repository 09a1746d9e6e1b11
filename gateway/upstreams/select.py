"""Which deployment of a model takes the next request: round robin over the ones serving."""

from __future__ import annotations

from gateway.config.types import Deployment, Model


class DeploymentSelector:
    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(self, model: Model) -> Deployment:
        serving = model.serving
        if len(serving) == 1:
            return serving[0]
        turn = self._next.get(model.name, 0)
        self._next[model.name] = turn + 1
        return serving[turn % len(serving)]
