"""Fine-tuning as the gateway holds it: the jobs, where their data is kept, this gateway's runner and the
tenants' schedules."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.finetune.jobs import Jobs
from gateway.finetune.runner import Runner
from gateway.finetune.schedule import Scheduler
from gateway.finetune.submit import FileReader
from gateway.finetune.storage import Storage
from gateway.stores.ledger import COLUMNS


@dataclass
class FineTuning:
    jobs: Jobs
    storage: Storage
    runner: Runner
    scheduler: Scheduler
    read_file: FileReader  # a tenant's file with its content, for the jobs made by the API and by schedules


def training_row(job: dict, cost: float, seconds: float, status: int) -> tuple:
    """A job's training as a row of the usage ledger: the tenant's spend, beside its requests."""
    row = dict.fromkeys(COLUMNS)
    run = f"-{job['restarts']}" if job.get("restarts") else ""  # a job resumed after a restart: a row a run
    row.update(request_id=f"{job['id']}-training{run}", created_at=time.time(), tenant_id=job["tenant_id"],
               route="fine_tuning.jobs", model_requested=job["model"], model=job["model"], prompt_tokens=0,
               completion_tokens=0, cost_usd=cost, latency_ms=seconds * 1000, upstream_ms=seconds * 1000,
               overhead_ms=0.0, cache_hit=False, stream=False, status=status)
    return tuple(row[name] for name in COLUMNS)
