"""The router in the admin API: train a scorer on the gateway's own traffic, with its out-of-domain report before
anyone switches it on.

Training takes seconds to minutes of CPU, so it runs in a child process (``gateway router train``, at a lower
priority), one at a time per gateway, never in the process that serves requests. The scorer is written to the
config folder's ``scorers/`` under a temporary name and renamed when complete; models.yaml switches it on.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool

from gateway.api.shared import admin_route, caller, read_ledger, record_action
from gateway.config.schema import TENANT_ID_PATTERN, Strict, whole
from gateway.errors import GatewayError
from gateway.routing import commands
from gateway.routing.scorer import LearnedScorer

if TYPE_CHECKING:
    from gateway.api.services import GatewayServices

SCORERS_FOLDER = "scorers"  # in the config folder, beside models.yaml, which names the one in use
SCORER_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_LABELLED = """
SELECT count(*) AS labelled,
       count(*) FILTER (WHERE coalesce(f.rating < 0, l.cascaded)) AS needed_large
FROM usage_ledger l LEFT JOIN feedback f ON f.tenant_id = l.tenant_id AND f.request_id = l.request_id
WHERE l.route_example IS NOT NULL AND l.created_at >= now() - make_interval(days => $1)
  AND (f.rating IS NOT NULL OR l.cascaded IS NOT NULL) AND ($2::text IS NULL OR l.tenant_id = $2)
"""


class TrainIn(Strict):
    name: str = Field(pattern=SCORER_NAME, description="the scorer's name: its file is scorers/<name>.json in the "
                                                       "config folder")
    days: whole(1, 3660) = Field(90, description="learn from the traffic of the last this many days")
    tenant: str | None = Field(None, pattern=TENANT_ID_PATTERN, description="only this tenant's traffic")
    with_mmlu: StrictBool = Field(False, description="also learn from the MMLU routing data shipped with the gateway")
    replace: StrictBool = Field(False, description="write over a scorer of the same name")


@dataclass
class Training:
    name: str
    started: float
    status: str = "training"  # training, ready, failed
    error: str | None = None


def build_router_admin(gateway: "GatewayServices") -> APIRouter:
    router = APIRouter()
    admin = admin_route(gateway)
    jobs: dict[str, Training] = {}

    def folder() -> Path:
        return gateway.settings.config_dir / SCORERS_FOLDER

    @router.post("/api/v1/router/scorers", status_code=202, **admin)
    async def train_scorer(request: Request, body: TrainIn) -> dict:
        """Start fitting a scorer on the gateway's own traffic (the cascade's judgements of small models' answers
        and the tenants' feedback), its blend chosen leave-one-tenant-out. Follow it with GET .../{name}; nothing
        changes until models.yaml names it (router.classifier.scorer)."""
        if gateway.directory is None:
            raise GatewayError(409, "This gateway keeps no ledger (GATEWAY_STATELESS=1): it has no traffic to learn "
                                    "from.", code="stateless_gateway")
        running = [job.name for job in jobs.values() if job.status == "training"]
        if running:
            raise GatewayError(409, f"The scorer '{running[0]}' is being trained; one at a time.",
                               code="training_under_way")
        output = folder() / f"{body.name}.json"
        if output.exists() and not body.replace:
            raise GatewayError(409, f"A scorer named '{body.name}' exists; send replace: true to write over it.",
                               param="name", code="scorer_exists")
        if not body.with_mmlu:
            await _check_labels(gateway, body)
        folder().mkdir(exist_ok=True)
        job = jobs[body.name] = Training(body.name, time.time())
        asyncio.get_running_loop().create_task(_run(gateway, body, output, job))
        await record_action(gateway, caller(request), "router.scorer.train", None, body.name, None,
                            body.model_dump())
        return {"object": "router.scorer", "name": body.name, "status": job.status,
                "path": f"{SCORERS_FOLDER}/{body.name}.json"}

    @router.get("/api/v1/router/scorers/{name}", **admin)
    async def scorer_view(name: str) -> dict:
        """A scorer's training (under way, failed) or, once written, its report: leave-group-out folds, the
        held-out half, its blend and thresholds, and the line for models.yaml."""
        job = jobs.get(name)
        if job is not None and job.status != "ready":
            return {"object": "router.scorer", "name": name, "status": job.status, "error": job.error,
                    "started_at": int(job.started)}
        path = folder() / f"{name}.json"
        if not _valid_name(name) or not path.is_file():
            raise GatewayError(404, f"No scorer named '{name}'.", type="not_found_error", code="scorer_not_found")
        try:
            meta = (await asyncio.to_thread(LearnedScorer.load, path)).meta
        except (OSError, ValueError, KeyError) as exc:
            raise GatewayError(409, f"The scorer file cannot be read: {exc}", code="scorer_unreadable") from None
        return {"object": "router.scorer", "name": name, "status": "ready", "path": f"{SCORERS_FOLDER}/{name}.json",
                "report": meta.get("report"),
                "models_yaml": f"router:\n  classifier:\n    scorer: {SCORERS_FOLDER}/{name}.json"}

    return router


def _valid_name(name: str) -> bool:
    return re.fullmatch(SCORER_NAME, name) is not None


async def _check_labels(gateway: "GatewayServices", body: TrainIn) -> None:
    """Refuse at once what the training would refuse: too few labelled requests, or labels all alike."""
    row = await read_ledger(gateway, lambda pool: pool.fetchrow(_LABELLED, body.days, body.tenant))
    labelled, needed = row["labelled"], row["needed_large"]
    if labelled < commands.MINIMUM_EXAMPLES:
        raise GatewayError(409, f"{labelled} labelled requests in the ledger; at least {commands.MINIMUM_EXAMPLES} "
                                f"are needed (routed requests a small model answered and the cascade judged, or "
                                f"that a tenant rated).", code="too_few_examples")
    if needed in (0, labelled):
        raise GatewayError(409, f"All {labelled} labelled requests say the same (the large model was "
                                f"{'always' if needed else 'never'} needed): there is nothing to learn.",
                           code="nothing_to_learn")


async def _run(gateway: "GatewayServices", body: TrainIn, output: Path, job: Training) -> None:
    partial = output.with_name(output.name + ".part")
    args = [sys.executable, "-m", "gateway", "router", "train", "--from-ledger", "--days", str(body.days),
            "--scorer", str(partial)]
    if body.tenant:
        args += ["--tenant", body.tenant]
    if body.with_mmlu:
        args += ["--data", str(commands.PACKAGED_DATA)]
    environment = {**os.environ, "DATABASE_URL": gateway.directory.dsn}
    process = None
    try:
        process = await asyncio.create_subprocess_exec(
            "nice", "-n", "10", *args, env=environment, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            _, errors = await process.communicate()
        except asyncio.CancelledError:  # the gateway is stopping: so does the training
            process.kill()
            partial.unlink(missing_ok=True)
            raise
        if process.returncode != 0:
            raise RuntimeError(errors.decode(errors="replace").strip().splitlines()[-1] if errors.strip()
                               else f"exit status {process.returncode}")
        await asyncio.to_thread(os.replace, partial, output)
        job.status = "ready"
    except Exception as exc:  # the job says why; the gateway serves on
        job.status, job.error = "failed", str(exc)[:1000]
        partial.unlink(missing_ok=True)
