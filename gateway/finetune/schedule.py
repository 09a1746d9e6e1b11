"""Tenants' fine-tuning schedules (``fine_tuning_schedules`` in tenants.yaml or the admin API): each makes a job
from the files it names once every ``every_hours``. A period's job has an id made from the tenant, the schedule and
the period, so that however many replicas look, it is made once; a schedule whose job cannot be made (a file
deleted, too many jobs under way) says why in the log, once a period, and tries again at the next look."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Callable

import asyncpg

from gateway.config.types import GatewayConfig
from gateway.errors import GatewayError
from gateway.finetune.jobs import Jobs
from gateway.finetune.storage import Storage
from gateway.finetune.submit import FileReader, JobRequest, SpendReader, submit

log = logging.getLogger("gateway.finetune")

def period_job_id(tenant_id: str, name: str, every_hours: int, now: float) -> str:
    period = int(now // (every_hours * 3600))
    return "ftjob-" + hashlib.sha256(f"{tenant_id}/{name}/{period}".encode()).hexdigest()[:24]


class Scheduler:
    def __init__(self, jobs: Jobs, storage: Storage, read_file: FileReader,
                 config: Callable[[], GatewayConfig], every: float = 30.0, spent: SpendReader | None = None) -> None:
        self.jobs, self.storage, self.read_file, self.config = jobs, storage, read_file, config
        self.spent = spent
        self.every = every  # seconds between looks
        self._said: set[str] = set()  # the periods whose refusal was logged
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _forever(self) -> None:
        while True:
            try:
                await self.run_due(time.time())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL away: the schedules wait for the next look
                log.warning("fine-tuning schedules cannot be looked at now: %s", exc)
            await asyncio.sleep(self.every)

    async def run_due(self, now: float) -> list[str]:
        """Make this period's job of every schedule that has none yet; the ids made."""
        config = self.config()
        made = []
        for tenant in config.tenants.values():
            for schedule in tenant.fine_tuning_schedules:
                job_id = period_job_id(tenant.id, schedule.name, schedule.every_hours, now)
                if await self.jobs.exists(job_id):
                    continue
                hyper = schedule.hyperparameters
                asked = JobRequest(schedule.model, schedule.training_file, schedule.validation_file, hyper.n_epochs,
                                   hyper.batch_size, hyper.learning_rate_multiplier, schedule.suffix, None,
                                   {"schedule": schedule.name}, job_id, schedule.name)
                try:
                    await submit(self.jobs, self.storage, self.read_file, config, tenant, asked, self.spent)
                    made.append(job_id)
                    log.info("fine-tuning schedule %s of tenant %s made job %s", schedule.name, tenant.id, job_id)
                except asyncpg.UniqueViolationError:
                    pass  # another replica made it a moment ago
                except GatewayError as exc:
                    if job_id not in self._said:
                        self._said.add(job_id)
                        log.warning("fine-tuning schedule %s of tenant %s cannot make its job now: %s",
                                    schedule.name, tenant.id, exc.message)
        return made
