"""This gateway's share of the fine-tuning queue: it claims queued jobs (``fine_tuning.concurrency`` at a time),
trains each in a process of its own (``gateway.finetune.train``), and follows it: its steps and losses as the
job's events, its checkpoints copied to storage, a heartbeat in PostgreSQL, a cancel or a deleted training file
as a stop. A job that succeeds has its adapter copied to storage and becomes the tenant's fine-tuned model at once;
its GPU-seconds are priced into the tenant's ledger and budget. A job whose runner stopped beating (a gateway that
crashed or was killed) is queued again by whichever gateway sees it first, and resumed from its last checkpoint
(three times at most, then failed with the reason), so none stays ``running``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from gateway.config.types import Adapter, GatewayConfig
from gateway.finetune.budget import SpendReader, budget_exhausted, gpu_second_price
from gateway.finetune.jobs import STALE_SECONDS, Jobs, fine_tuned_name
from gateway.finetune.remote_runs import TRAINER_PREFIX, RemoteRuns, new_token
from gateway.finetune.storage import Storage

log = logging.getLogger("gateway.finetune")

POLL_SECONDS = 1.0  # how often the queue is looked at
BEAT_SECONDS = 5.0  # how often a running job's heartbeat is written (and a cancel looked for), by default


def base_weights(config: GatewayConfig, model: str) -> str | None:
    """The weights the trainer starts from: those of the fleet pool that serves ``model``."""
    found = config.models.get(model)
    if found is None or config.fleet is None:
        return None
    for deployment in found.deployments:
        pool = config.fleet.pools.get(deployment.pool) if deployment.pool else None
        if pool is not None and pool.weights:
            return pool.weights
    return None


class Runner:
    def __init__(self, jobs: Jobs, storage: Storage, config: Callable[[], GatewayConfig], workdir: Path,
                 file_exists: Callable, on_adapters: Callable[[dict], None], bill: Callable[[dict, float, float, int], None],
                 train: bool = True, stale_seconds: float = STALE_SECONDS, beat_seconds: float = BEAT_SECONDS,
                 spent: SpendReader | None = None) -> None:
        self.jobs = jobs
        self.storage = storage
        self.config = config
        self.workdir = workdir
        self.file_exists = file_exists  # async (tenant, file id) -> bool: is the training file still there
        self.on_adapters = on_adapters  # the tenants' fine-tuned adapters, whenever they change
        self.bill = bill  # (job, cost in dollars, seconds, status): the training's row in the tenant's ledger
        self.train = train  # whether this gateway trains (every gateway keeps the adapters in force)
        self.stale_seconds = stale_seconds
        self.beat_seconds = beat_seconds
        self.spent = spent  # a tenant's spend this month, which a running job's is checked against
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._running: dict[str, asyncio.Task] = {}
        self._loop: asyncio.Task | None = None
        self._known: dict | None = None
        self.remote = RemoteRuns(jobs, storage, config, workdir, file_exists, self._bill, self.refresh_adapters,
                                 base_weights, beat_seconds, spent)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop().create_task(self._forever())

    async def stop(self) -> None:
        """Stop claiming; the jobs under way here are stopped and queued again (the next gateway resumes them);
        runs on trainers off the gateways go on, reporting to the others."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _forever(self) -> None:
        while True:
            try:
                await self.refresh_adapters()
                for job in await self.jobs.orphans(self.stale_seconds):
                    who = "trainer" if (job["runner"] or "").startswith(TRAINER_PREFIX) else "gateway"
                    if await self.jobs.requeue(job["id"], f"The {who} that ran this job stopped (no heartbeat "
                                                          f"for {self.stale_seconds:g} s)"):
                        self._bill(job, job["gpu_seconds"], 503)  # its time up to its last heartbeat
                        await self.remote.stop_lost(job)
                if self.train:
                    await self._claim()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL away for a moment: the queue waits
                log.warning("the fine-tuning queue cannot be read now: %s", exc)
            await asyncio.sleep(POLL_SECONDS)

    async def _claim(self) -> None:
        """Queued jobs for this gateway's own workers, and for the trainers off the gateways that have room."""
        config = self.config()
        limit = config.fine_tuning.concurrency
        local = sum(not task.get_name().startswith(TRAINER_PREFIX) for task in self._running.values())
        while config.fine_tuning.gateway_workers and local < limit:
            job = await self.jobs.claim(self.name, limit, self.storage.url)
            if job is None:
                break
            local += 1
            self._running[job["id"]] = asyncio.get_running_loop().create_task(self._run(job), name=job["id"])
        for trainer in config.trainers.values():
            while True:
                token, run = new_token()
                job = await self.jobs.claim(TRAINER_PREFIX + trainer.name, trainer.concurrency, self.storage.url,
                                            trainer.models, run, trainer.start_seconds)
                if job is None:
                    break
                self._running[job["id"]] = asyncio.get_running_loop().create_task(
                    self._watch_run(job, trainer, token), name=TRAINER_PREFIX + job["id"])

    async def _watch_run(self, job: dict, trainer, token: str) -> None:
        try:
            await self.remote.follow(job, trainer, token)
        except Exception:
            log.exception("fine-tuning job %s: its run on trainer '%s' cannot be watched", job["id"], trainer.name)
        finally:
            self._running.pop(job["id"], None)

    async def refresh_adapters(self) -> None:
        rows = await self.jobs.succeeded_adapters()
        adapters: dict[str, dict[str, Adapter]] = {}
        for row in rows:
            name = row["fine_tuned_model"]
            adapters.setdefault(row["tenant_id"], {})[name] = Adapter(
                name, row["model"], row["adapter_location"], f"{row['tenant_id']}/{name}", False, "error", True,
                row["schedule"])
        if adapters != self._known:
            self._known = adapters
            self.on_adapters(adapters)

    async def _run(self, job: dict) -> None:
        job_id, tenant = job["id"], job["tenant_id"]
        folder = self.workdir / job_id
        started = time.monotonic()
        process: asyncio.subprocess.Process | None = None
        try:
            weights = base_weights(self.config(), job["model"])
            if weights is None:
                raise _Stop("failed", f"the base model '{job['model']}' has no weights to train from (its fleet "
                                      "pool's `weights`)", "base_model_unavailable")
            await self.storage.download(folder / "data", tenant, "datasets", job_id)
            hyper = json.loads(job["hyperparameters"])
            resume = await self._resume_point(job, folder)
            spec = {"base": weights, "train": str(folder / "data" / "train.jsonl"), "resume": resume,
                    "validation": str(folder / "data" / "validation.jsonl") if job["validation_file"] else None,
                    "output": str(folder / "adapter"), "checkpoints": str(folder / "checkpoints"),
                    "hyperparameters": hyper, "seed": job["seed"]}
            (folder / "spec.json").write_text(json.dumps(spec))
            with open(folder / "stderr.log", "wb") as errors:  # a file: a pipe nobody reads could fill and block
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway.finetune.train", str(folder / "spec.json"),
                    stdout=asyncio.subprocess.PIPE, stderr=errors, start_new_session=True)
            done = await self._follow(job, process, started)
            await process.wait()
            if process.returncode != 0:
                reason = (folder / "stderr.log").read_text(errors="replace").strip().splitlines()
                raise _Stop("failed", reason[-1] if reason else f"the trainer exited with {process.returncode}",
                            "training_failed")
            name = fine_tuned_name(job["model"], tenant, job["suffix"], job_id)
            await self._still_wanted(job, started)
            await self.storage.upload(folder / "adapter", tenant, "adapters", job_id)
            seconds = time.monotonic() - started
            await self.jobs.set_status(job_id, "succeeded", f"The job has successfully completed: {name}",
                                       fine_tuned_model=name, trained_tokens=done.get("trained_tokens"),
                                       adapter_location=self.storage.location(tenant, "adapters", job_id),
                                       gpu_seconds=seconds)
            self._bill(job, seconds, 200)
            await self.refresh_adapters()
        except _Stop as stop:
            if process is not None and process.returncode is None:
                _terminate(process)
                await process.wait()
            seconds = time.monotonic() - started
            error = None if stop.status == "cancelled" else {"code": stop.code, "message": stop.why, "param": None}
            await self.jobs.set_status(job_id, stop.status, "Fine-tuning job cancelled" if stop.status ==
                                       "cancelled" else f"The job failed: {stop.why}",
                                       "info" if stop.status == "cancelled" else "error", error, gpu_seconds=seconds)
            self._bill(job, seconds, 499 if stop.status == "cancelled" else 500)
        except asyncio.CancelledError:  # the gateway stops: the next gateway takes the job up again
            if process is not None and process.returncode is None:
                _terminate(process)
            self._bill(job, time.monotonic() - started, 503)  # the training done so far is paid for
            await asyncio.shield(self.jobs.requeue(job_id, "The gateway that ran this job stopped"))
            raise
        except Exception as exc:
            log.exception("fine-tuning job %s failed", job_id)
            await self.jobs.set_status(job_id, "failed", f"The job failed: {exc}", "error",
                                       {"code": "internal_error", "message": str(exc)[:500], "param": None})
        finally:
            self._running.pop(job_id, None)
            shutil.rmtree(folder, ignore_errors=True)

    async def _resume_point(self, job: dict, folder: Path) -> dict | None:
        """The last checkpoint of a job that ran before (its gateway stopped), copied here to start from."""
        if not job.get("restarts"):
            return None
        last = await self.jobs.last_checkpoint(job["id"])
        if last is None:
            return None
        local = folder / "resume"
        await self.storage.download(local, job["tenant_id"], "jobs", job["id"], "checkpoints", f"step-{last['step']}")
        await self.jobs.event(job["id"], f"Resuming from the checkpoint of step {last['step']}")
        return {"path": str(local), "step": last["step"]}

    async def _follow(self, job: dict, process, started: float) -> dict:
        """Read the trainer's progress until it ends; a cancel or a deleted training file stops it."""
        job_id, tenant = job["id"], job["tenant_id"]
        last_beat = 0.0
        done: dict = {}
        while True:
            try:
                line = await asyncio.wait_for(process.stdout.readline(), self.beat_seconds)
            except asyncio.TimeoutError:
                line = None
            if time.monotonic() - last_beat >= self.beat_seconds or line is None:
                last_beat = time.monotonic()
                await self._still_wanted(job, started)
            if line is None:
                continue
            if not line:
                return done
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "step":
                await self.jobs.event(job_id, f"Step {event['step']}/{event['total_steps']}: training loss="
                                      f"{event['loss']}", kind="metrics",
                                      data={"step": event["step"], "total_steps": event["total_steps"],
                                            "train_loss": event["loss"], "epoch": event.get("epoch")})
            elif kind == "checkpoint":
                step = int(event["step"])
                await self._still_wanted(job, started)  # nothing is written for a job cancelled or deleted
                await self.storage.upload(Path(event["path"]), tenant, "jobs", job_id, "checkpoints", f"step-{step}")
                await self.jobs.checkpoint(job_id, step, {"step": step, "train_loss": event.get("loss"),
                                                          "valid_loss": event.get("valid_loss")},
                                           self.storage.location(tenant, "jobs", job_id, "checkpoints",
                                                                 f"step-{step}"))
            elif kind == "done":
                done = event

    async def _still_wanted(self, job: dict, started: float) -> None:
        """The heartbeat: a job cancelled, deleted with its tenant, or whose training file is gone stops here."""
        if await self.jobs.beat(job["id"], time.monotonic() - started):
            raise _Stop("cancelled", "cancelled", "cancelled")
        if not await self.file_exists(job["tenant_id"], job["training_file"]):
            raise _Stop("failed", f"the training file {job['training_file']} was deleted while the job ran",
                        "training_file_deleted")
        why = await budget_exhausted(self.config(), job, self.spent, time.monotonic() - started)
        if why is not None:
            raise _Stop("failed", why, "budget_exhausted")

    def _bill(self, job: dict, seconds: float, status: int) -> None:
        self.bill(job, seconds * gpu_second_price(self.config(), job), seconds, status)


class _Stop(Exception):
    def __init__(self, status: str, why: str, code: str) -> None:
        super().__init__(why)
        self.status, self.why, self.code = status, why, code


def _terminate(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
