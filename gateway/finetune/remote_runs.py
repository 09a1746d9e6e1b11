"""Runs on trainers off the gateways: started and watched by the gateway that claimed the job, reported to any
gateway (through the load balancer in front of them) with the run's token.

The protocol, under ``/v1/fine_tuning/trainer/jobs/<job id>`` with ``Authorization: Bearer <the run's token>``:

- ``GET``: what to train: the base model's weights as the trainer's node finds them, the hyperparameters, the seed,
  whether there is a validation file, the checkpoint to resume from and how often to report;
- ``GET data/<train.jsonl | validation.jsonl>``, ``GET resume/<file>``: the job's files, as stored;
- ``PUT checkpoints/<step>/<file>``, ``PUT adapter/<file>``: what the run makes, written to storage;
- ``POST events``: ``{"event": "beat" | "step" | "checkpoint" | "done" | "failed", ...}``, as the local trainer's
  lines (``gateway.finetune.train``). Each report is the run's heartbeat; an answer of 409 tells the run to stop
  (its job was cancelled, deleted, failed, or taken over by a newer run).

A run's token is made when its job is claimed; only its SHA-256 is kept, and a run that lost its job (queued again
after it stopped reporting) cannot report into the next one. A run whose gateway stops goes on: its reports reach
the other gateways, and whichever takes its last report finishes the job.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from gateway.config.trainers import Trainer
from gateway.config.types import GatewayConfig
from gateway.errors import GatewayError
from gateway.finetune.budget import SpendReader, budget_exhausted
from gateway.finetune.jobs import Jobs, fine_tuned_name
from gateway.finetune.launch import Launch, LaunchFailed, launch_for
from gateway.finetune.storage import Storage

log = logging.getLogger("gateway.finetune")

TRAINER_PREFIX = "trainer:"  # a job's runner, when a trainer off the gateways runs it
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DATA_FILES = ("train.jsonl", "validation.jsonl")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what vLLM loads
MAX_FILE_BYTES = 8 * 1024**3  # one file a run writes: far above a LoRA adapter of a 70B model


def new_token() -> tuple[str, str]:
    """A run's report token, and the SHA-256 that is kept of it."""
    token = "ftrun-" + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def report_url(base: str, job_id: str) -> str:
    return f"{base.rstrip('/')}/v1/fine_tuning/trainer/jobs/{job_id}"


class RemoteRuns:
    def __init__(self, jobs: Jobs, storage: Storage, config: Callable[[], GatewayConfig], workdir: Path,
                 file_exists: Callable, bill: Callable[[dict, float, int], None], succeeded: Callable,
                 weights: Callable[[GatewayConfig, str], str | None], beat_seconds: float,
                 spent: SpendReader | None = None) -> None:
        self.jobs = jobs
        self.storage = storage
        self.config = config
        self.workdir = workdir
        self.file_exists = file_exists  # async (tenant, file id) -> bool
        self.bill = bill  # (job, seconds, status)
        self.succeeded = succeeded  # async (): the adapters in force are read again
        self.weights = weights  # the base model's weights as the gateways' config says them
        self.beat_seconds = beat_seconds
        self.spent = spent

    # --- the gateway that claimed the job: start the run, watch it, stop it ---

    async def follow(self, job: dict, trainer: Trainer, token: str) -> None:
        """Start the job's run on ``trainer`` and watch it until the job is no longer this run's. A run that
        cannot start, or whose trainer ended without reporting its end (a command killed or exiting with an error,
        a Kubernetes Job failed), is lost: the job is queued again to resume from its last checkpoint, and fails
        with the reason after the restarts a job is given. One whose job was cancelled or taken over is stopped.
        When this gateway stops, the run goes on."""
        job_id, run = job["id"], token_hash(token)
        if self._base(job) is None:
            why = (f"the base model '{job['model']}' has no weights to train from (its fleet pool's `weights`, or "
                   f"the trainer's)")
            await self._finish(job, run, "failed", f"The job failed: {why}", "base_model_unavailable", why)
            return
        base = self.config().fine_tuning.report_url
        launch = launch_for(trainer, job, report_url(base, job_id), token, self.workdir / "runs")
        try:
            await launch.start()
        except LaunchFailed as exc:  # tried again after a while, longer each time: an API server may be back by then
            retry = self.config().fine_tuning.retry_seconds * 2 ** job["restarts"]
            await self.jobs.requeue(job_id, f"Trainer '{trainer.name}' could not start the job: {exc}", run, retry)
            return
        last = await self.jobs.last_checkpoint(job_id) if job["restarts"] else None
        await self.jobs.event(job_id, f"Started on trainer '{trainer.name}'" + (
            f"; resuming from the checkpoint of step {last['step']}" if last else ""))
        while True:
            await asyncio.sleep(self.beat_seconds)
            state = await self.jobs.run_of(job_id)
            if state is None or state["report_token"] != run or state["status"] != "running":
                if state is None or state["status"] != "succeeded":
                    await _quietly(launch)
                return
            if state["cancel_requested"]:
                await _quietly(launch)
                await self._finish(job, run, "cancelled", "Fine-tuning job cancelled")
                return
            why = await launch.failure()
            if why is not None:
                if await self.jobs.requeue(job_id, f"The run on trainer '{trainer.name}' ended without reporting "
                                                   f"its end ({why})", run):
                    self.bill(job, _seconds_since(job["started_at"]), 503)
                return

    async def stop_lost(self, job: dict) -> None:
        """A run taken for lost, stopped where any gateway can stop it: a Kubernetes trainer's Job is deleted (a
        pod that never started would hold its GPU). A command's process is its starting gateway's to end; its
        token no longer answers, so it stops at its next report."""
        trainer = self.config().trainers.get((job["runner"] or "").removeprefix(TRAINER_PREFIX))
        if (job["runner"] or "").startswith(TRAINER_PREFIX) and trainer is not None and trainer.kind == "kubernetes":
            await _quietly(launch_for(trainer, job, "", "", self.workdir / "runs"))

    # --- any gateway: the run's reports ---

    async def authorize(self, job_id: str, authorization: str | None) -> dict:
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token.startswith("ftrun-"):
            raise GatewayError(401, "A trainer reports with its run's token: Authorization: Bearer ftrun-...",
                               type="authentication_error", code="invalid_trainer_token")
        job = await self.jobs.reporting(job_id, token_hash(token))
        if job is None:
            raise GatewayError(409, f"Fine-tuning job {job_id} has no running run with this token: it was "
                                    "cancelled, has finished, or a newer run took it over. Stop.",
                               type="invalid_request_error", code="run_not_current")
        return job

    def _base(self, job: dict) -> str | None:
        """The base model's weights as the run's node finds them: its trainer's, else its fleet pool's."""
        config = self.config()
        trainer = config.trainers.get((job["runner"] or "").removeprefix(TRAINER_PREFIX))
        return (trainer.weights.get(job["model"]) if trainer else None) or self.weights(config, job["model"])

    async def spec(self, job: dict) -> dict:
        """What the run trains, and the checkpoint it resumes from (a job queued again after a lost run)."""
        resume = None
        last = await self.jobs.last_checkpoint(job["id"]) if job["restarts"] else None
        if last is not None:
            folder = (job["tenant_id"], "jobs", job["id"], "checkpoints", f"step-{last['step']}")
            resume = {"step": last["step"], "files": await self.storage.names(*folder)}
        return {"job_id": job["id"], "model": job["model"], "base": self._base(job), "seed": job["seed"],
                "hyperparameters": _json(job["hyperparameters"]), "validation": job["validation_file"] is not None,
                "resume": resume, "beat_seconds": self.beat_seconds}

    async def read(self, job: dict, kind: str, name: str) -> AsyncIterator[bytes]:
        """A file the run asks for (``data``: the job's datasets; ``resume``: its last checkpoint's), as kept."""
        parts = None
        if kind == "data" and name in DATA_FILES and (name == "train.jsonl" or job["validation_file"]):
            parts = (job["tenant_id"], "datasets", job["id"], name)
        elif kind == "resume" and FILE_NAME.match(name) and job["restarts"]:
            last = await self.jobs.last_checkpoint(job["id"])
            if last is not None:
                parts = (job["tenant_id"], "jobs", job["id"], "checkpoints", f"step-{last['step']}", name)
        if parts is None or not await self.storage.exists(*parts):
            raise GatewayError(404, f"Job {job['id']} has no {kind} file '{name}'.", type="not_found_error",
                               code="file_not_found")
        return self.storage.chunks(*parts)

    async def write(self, job: dict, kind: str, step: int | None, name: str, body: AsyncIterator[bytes]) -> int:
        if not FILE_NAME.match(name):
            raise GatewayError(400, "A file's name is letters, digits, '.', '_' and '-' (128 at most).",
                               param="name", code="invalid_file_name")
        if kind == "adapter":
            parts = (job["tenant_id"], "adapters", job["id"], name)
        else:
            parts = (job["tenant_id"], "jobs", job["id"], "checkpoints", f"step-{step}", name)
        return await self.storage.write_chunks(_bounded(body, MAX_FILE_BYTES), *parts)

    async def report(self, job: dict, event: dict) -> dict:
        """One report of the run (checked already by the route's ``TrainerEvent``: its kind, each field's type and
        range): its heartbeat, and what it says. A 409 for a run that must stop."""
        run = job["report_token"]
        kind = event.get("event")
        seconds = _seconds_since(job["started_at"])
        if await self.jobs.beat(job["id"], seconds):
            await self._finish(job, run, "cancelled", "Fine-tuning job cancelled")
            raise _stop(job["id"], "was cancelled", "job_cancelled")
        if not await self.file_exists(job["tenant_id"], job["training_file"]):
            why = f"the training file {job['training_file']} was deleted while the job ran"
            await self._finish(job, run, "failed", f"The job failed: {why}", "training_file_deleted", why)
            raise _stop(job["id"], "failed: " + why, "training_file_deleted")
        why = await budget_exhausted(self.config(), job, self.spent, seconds)
        if why is not None:
            await self._finish(job, run, "failed", f"The job failed: {why}", "budget_exhausted", why)
            raise _stop(job["id"], "failed: " + why, "budget_exhausted")
        if kind == "step":
            step, total, loss = (_required(event, name) for name in ("step", "total_steps", "loss"))
            await self.jobs.event(job["id"], f"Step {step}/{total}: training loss={loss}", kind="metrics",
                                  data={"step": step, "total_steps": total, "train_loss": loss,
                                        "epoch": event.get("epoch")})
        elif kind == "checkpoint":
            step = _required(event, "step")
            folder = (job["tenant_id"], "jobs", job["id"], "checkpoints", f"step-{step}")
            missing = [n for n in ADAPTER_FILES if n not in await self.storage.names(*folder)]
            if missing:
                raise GatewayError(400, f"The checkpoint of step {step} lacks {', '.join(missing)}: PUT its files "
                                        "first.", param="step", code="checkpoint_incomplete")
            await self.jobs.checkpoint(job["id"], step, {"step": step, "train_loss": event.get("loss"),
                                                         "valid_loss": event.get("valid_loss")},
                                       self.storage.location(*folder))
        elif kind == "done":
            folder = (job["tenant_id"], "adapters", job["id"])
            missing = [n for n in ADAPTER_FILES if n not in await self.storage.names(*folder)]
            if missing:
                raise GatewayError(400, f"The adapter lacks {', '.join(missing)}: PUT its files first.",
                                   param="event", code="adapter_incomplete")
            name = fine_tuned_name(job["model"], job["tenant_id"], job["suffix"], job["id"])
            await self._finish(job, run, "succeeded", f"The job has successfully completed: {name}",
                               fine_tuned_model=name, adapter_location=self.storage.location(*folder),
                               trained_tokens=event.get("trained_tokens"))
            await self.succeeded()
        elif kind == "failed":
            why = (event.get("message") or "the trainer failed")[:1000]
            await self._finish(job, run, "failed", f"The job failed: {why}", "training_failed", why)
        return {"object": "fine_tuning.trainer.ack", "continue": kind not in ("done", "failed")}

    async def _finish(self, job: dict, run: str, status: str, message: str, code: str | None = None,
                      why: str | None = None, **fields) -> None:
        """End the job as this run's, once: only the report or the watcher that moves it bills its time."""
        seconds = _seconds_since(job["started_at"])
        error = {"code": code, "message": why, "param": None} if code else None
        level = "error" if status == "failed" else "info"
        if await self.jobs.set_status(job["id"], status, message, level, error, run=run, gpu_seconds=seconds,
                                      **fields):
            self.bill(job, seconds, {"succeeded": 200, "cancelled": 499}.get(status, 500))


def _stop(job_id: str, what: str, code: str) -> GatewayError:
    return GatewayError(409, f"Fine-tuning job {job_id} {what}. Stop.", type="invalid_request_error", code=code)


def _seconds_since(started: dt.datetime | None) -> float:
    return max(0.0, time.time() - started.timestamp()) if started is not None else 0.0


def _required(event: dict, name: str):
    """A field this kind of report needs (the route's model checks its type and range, not whether it is there)."""
    value = event.get(name)
    if value is None:
        raise GatewayError(400, f"A `{event['event']}` report needs `{name}`.", param=name, code="invalid_event")
    return value


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


async def _bounded(body: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"A file a run writes is {limit} bytes at most.", code="request_too_large")
        yield chunk


async def _quietly(launch: Launch) -> None:
    try:
        await launch.stop()
    except LaunchFailed as exc:
        log.warning("a trainer's run cannot be stopped: %s", exc)
