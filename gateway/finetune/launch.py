"""Starting a job's run on a trainer off the gateways, following it and stopping it.

A command trainer is a program the gateway runs without a shell (``ssh gpu-1 ...``, ``srun ...``, a script), in a
session of its own and with its output in a log file, so that it outlives the gateway that started it: its run
reports to the gateways, not to its parent. A Kubernetes trainer is a Job made from the trainer's template through
the API server (``POST /apis/batch/v1/namespaces/<ns>/jobs``); the run's token goes in a Secret owned by the Job (so
it goes when the Job goes) that every container reads as ``GATEWAY_TRAINER_TOKEN``.

Either way the run is given ``GATEWAY_TRAINER_URL`` (its job's report URL) and ``GATEWAY_TRAINER_TOKEN``, and runs
``python -m gateway.finetune.remote``, which does the rest over HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import ssl
from pathlib import Path

import aiohttp

from gateway.config.trainers import Trainer


class LaunchFailed(Exception):
    """The trainer could not be started (its command not found, the API server refused or cannot be reached)."""


class Launch:
    """One run of one job on one trainer."""

    async def start(self) -> None:
        raise NotImplementedError

    async def failure(self) -> str | None:
        """Why the run has ended without its reports saying so; None while it runs (or once it ended well)."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


def launch_for(trainer: Trainer, job: dict, report_url: str, token: str, workdir: Path) -> Launch:
    if trainer.kind == "kubernetes":
        return KubernetesLaunch(trainer, job, report_url, token)
    return CommandLaunch(trainer, job, report_url, token, workdir)


def _fill(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


class CommandLaunch(Launch):
    def __init__(self, trainer: Trainer, job: dict, report_url: str, token: str, workdir: Path) -> None:
        self.values = {"job_id": job["id"], "report_url": report_url, "token": token}
        self.argv = [_fill(part, self.values) for part in trainer.command]
        self.log = workdir / f"{job['id']}-{job['restarts']}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GATEWAY_TRAINER_URL": self.values["report_url"],
               "GATEWAY_TRAINER_TOKEN": self.values["token"]}
        try:
            with open(self.log, "wb") as output:
                self.process = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output, env=env,
                    start_new_session=True)
        except OSError as exc:
            raise LaunchFailed(f"{self.argv[0]}: {exc.strerror or exc}") from None

    async def failure(self) -> str | None:
        code = None if self.process is None else self.process.returncode
        if code is None or code == 0:
            return None
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return f"{lines[-1][:1000]}; {how}" if lines else f"the trainer's command ended: {how}"

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except asyncio.TimeoutError:
                os.killpg(self.process.pid, signal.SIGKILL)


class KubernetesLaunch(Launch):
    def __init__(self, trainer: Trainer, job: dict, report_url: str, token: str) -> None:
        self.trainer = trainer
        self.token = token
        self.report_url = report_url
        self.job = job
        self.name = f"ft-{job['id'].removeprefix('ftjob-').lower()[:40]}-{job['restarts']}"
        base = f"{trainer.api_server}/apis/batch/v1/namespaces/{trainer.namespace}/jobs"
        self.jobs_url, self.job_url = base, f"{base}/{self.name}"
        self.secrets_url = f"{trainer.api_server}/api/v1/namespaces/{trainer.namespace}/secrets"

    def _session(self) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {self.trainer.token}"} if self.trainer.token else {}
        context = ssl.create_default_context(cafile=self.trainer.ca_file) if self.trainer.ca_file else None
        return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30),
                                     connector=aiohttp.TCPConnector(ssl=context) if context else None)

    def manifest(self) -> dict:
        manifest = copy.deepcopy(self.trainer.job_template)
        manifest = _fill_all(manifest, {"job_id": self.job["id"], "report_url": self.report_url})
        metadata = manifest.setdefault("metadata", {})
        metadata.update(name=self.name, namespace=self.trainer.namespace)
        metadata.pop("generateName", None)
        labels = metadata.setdefault("labels", {})
        labels.update({"app.kubernetes.io/managed-by": "gateway", "gateway/fine-tuning-job": self.job["id"]})
        for container in manifest["spec"]["template"]["spec"]["containers"]:
            env = [e for e in container.get("env") or [] if e.get("name") not in ("GATEWAY_TRAINER_URL",
                                                                                   "GATEWAY_TRAINER_TOKEN")]
            container["env"] = env + [
                {"name": "GATEWAY_TRAINER_URL", "value": self.report_url},
                {"name": "GATEWAY_TRAINER_TOKEN", "valueFrom": {"secretKeyRef": {"name": self.name, "key": "token"}}}]
        return manifest

    async def start(self) -> None:
        try:
            async with self._session() as session:
                async with session.post(self.jobs_url, json=self.manifest()) as answer:
                    made = await _answer(answer, "the Job")
                secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "stringData": {"token": self.token},
                          "metadata": {"name": self.name, "namespace": self.trainer.namespace, "ownerReferences": [
                              {"apiVersion": "batch/v1", "kind": "Job", "name": self.name,
                               "uid": made["metadata"]["uid"]}]}}
                async with session.post(self.secrets_url, json=secret) as answer:
                    await _answer(answer, "the Job's Secret")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise LaunchFailed(f"the Kubernetes API server at {self.trainer.api_server} cannot be reached: "
                               f"{exc or type(exc).__name__}") from None

    async def failure(self) -> str | None:
        try:
            async with self._session() as session, session.get(self.job_url) as answer:
                if answer.status == 404:
                    return f"the Kubernetes Job {self.name} was deleted"
                if answer.status != 200:
                    return None  # the API server cannot say now: the reports (or their absence) decide
                job = await answer.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return None
        for condition in (job.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "Failed" and condition.get("status") == "True":
                return (f"the Kubernetes Job {self.name} failed: {condition.get('reason', '')} "
                        f"{condition.get('message', '')}").strip()
        return None

    async def stop(self) -> None:
        try:
            async with self._session() as session, session.delete(
                    self.job_url, json={"kind": "DeleteOptions", "apiVersion": "v1",
                                        "propagationPolicy": "Background"}) as answer:
                if answer.status not in (200, 202, 404):
                    raise LaunchFailed(f"the Job {self.name} cannot be deleted: {answer.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise LaunchFailed(f"the Kubernetes API server cannot be reached: {exc or type(exc).__name__}") from None


async def _answer(answer: aiohttp.ClientResponse, what: str) -> dict:
    if answer.status not in (200, 201, 202):
        try:
            message = (await answer.json()).get("message", "")
        except (aiohttp.ContentTypeError, ValueError):
            message = (await answer.text())[:300]
        raise LaunchFailed(f"the Kubernetes API server refused {what}: {answer.status} {message}".strip())
    return await answer.json()


def _fill_all(value, values: dict[str, str]):
    if isinstance(value, str):
        return _fill(value, values)
    if isinstance(value, list):
        return [_fill_all(item, values) for item in value]
    if isinstance(value, dict):
        return {key: _fill_all(item, values) for key, item in value.items()}
    return value
