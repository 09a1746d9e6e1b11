"""The trainers off the gateways (models.yaml's ``fine_tuning.trainers``), compiled: their secret read, a
Kubernetes trainer's Job template read from its file and checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gateway.config.secrets import Secrets


@dataclass(frozen=True)
class Trainer:
    name: str
    kind: str  # "command" or "kubernetes"
    concurrency: int
    models: tuple[str, ...]  # the base models it trains; empty: every one
    weights: dict[str, str]  # a base model's weights as its node finds them
    start_seconds: float
    command: tuple[str, ...] = ()
    api_server: str | None = None
    namespace: str = "default"
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    job_template: dict | None = None  # a batch/v1 Job manifest

    def trains(self, model: str) -> bool:
        return not self.models or model in self.models


def compile_trainers(spec, config_dir: Path, secrets: Secrets, problems: list[str]) -> dict[str, Trainer]:
    """``spec``: the FineTuningSpec. A template that cannot be read or is not a Job is a problem of the config."""
    trainers = {}
    for name, trainer in spec.trainers.items():
        where = f"models.yaml: fine_tuning.trainers.{name}"
        token = secrets.get(trainer.token) if trainer.token else None
        if trainer.token and token is None:
            problems.append(f"{where}.token: {secrets.why_missing(trainer.token)}")
        template = None
        if trainer.job_template is not None:
            template = _job_template(config_dir / trainer.job_template, f"{where}.job_template", problems)
        ca_file = str(config_dir / trainer.ca_file) if trainer.ca_file else None
        trainers[name] = Trainer(name, trainer.kind, trainer.concurrency, tuple(trainer.models),
                                 dict(trainer.weights), trainer.start_seconds, tuple(trainer.command),
                                 (trainer.api_server or "").rstrip("/") or None, trainer.namespace, token, ca_file,
                                 template)
    return trainers


def _job_template(path: Path, where: str, problems: list[str]) -> dict | None:
    try:
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problems.append(f"{where}: {path} cannot be read: {exc}")
        return None
    containers = (((manifest or {}).get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") \
        if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("kind") != "Job" or \
            manifest.get("apiVersion") != "batch/v1" or not isinstance(containers, list) or not containers or \
            not all(isinstance(c, dict) for c in containers):
        problems.append(f"{where}: {path} is not a batch/v1 Job manifest with containers in spec.template.spec")
        return None
    return manifest
