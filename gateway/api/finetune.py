"""OpenAI's fine-tuning API, for a tenant's own LoRA adapters: ``POST /v1/fine_tuning/jobs`` (its training and
validation files checked line by line and copied to storage before the job is queued), list, retrieve, ``cancel``,
``events`` and ``checkpoints``. Another tenant's job is a 404; a file of another tenant too, and one of another
purpose a 400. The job trains on the gateways' own workers (``gateway.finetune.runner``) or on a trainer off them,
whose run reports to the trainer routes below (``gateway.finetune.remote_runs``); its model is the tenant's, listed
in its ``/v1/models`` and served by the fleet as soon as the job succeeds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, StringConstraints

from gateway.api.guard import stateless_gateway
from gateway.api.ops import error_responses
from gateway.api.shared import USAGE_ERRORS, list_page
from gateway.config.schema import TEXT_PATTERN, FineTuningHyperparameters, Strict, whole
from gateway.errors import GatewayError
from gateway.finetune.jobs import FINISHED, job_view
from gateway.finetune.submit import JobRequest, submit
from gateway.pipeline.auth import identify

if TYPE_CHECKING:
    from gateway.api.services import GatewayServices

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MetadataValue = Annotated[str, StringConstraints(max_length=512, pattern=TEXT_PATTERN)]


class Supervised(Strict):
    hyperparameters: FineTuningHyperparameters = FineTuningHyperparameters()


class Method(Strict):
    type: Literal["supervised"] = Field(description="supervised only: DPO and reinforcement are not trained here")
    supervised: Supervised = Supervised()


class JobIn(Strict):
    model: str = Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)
    training_file: str = Field(pattern=ID_PATTERN)
    validation_file: str | None = Field(None, pattern=ID_PATTERN)
    hyperparameters: FineTuningHyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    seed: whole(0, 2**31 - 1) | None = None
    metadata: dict[Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=TEXT_PATTERN)],
                   MetadataValue] | None = Field(None, max_length=16)
    integrations: list[dict] | None = Field(None, max_length=0, description="none are run here")


def build_fine_tuning_router(gateway: "GatewayServices") -> APIRouter:
    router = APIRouter(tags=["fine-tuning"], responses={**USAGE_ERRORS, **error_responses(404, 429)})

    def caller(request: Request):
        tenant, key = identify(request.scope, gateway.config.current, "fine_tuning")
        if gateway.fine_tuning is None:
            raise stateless_gateway() if gateway.directory is None else GatewayError(
                503, "Fine-tuning is off on this gateway.", type="server_error", code="fine_tuning_unavailable")
        return tenant, key

    async def own_job(tenant_id: str, job_id: str) -> dict:
        job = await gateway.fine_tuning.jobs.get(tenant_id, job_id)
        if job is None:
            raise GatewayError(404, f"No such fine-tuning job: {job_id}", type="not_found_error",
                               param="fine_tuning_job_id", code="fine_tuning_job_not_found")
        return job

    @router.post("/v1/fine_tuning/jobs")
    async def create(request: Request, body: JobIn) -> dict:
        """Check the files, copy them to storage and queue the job."""
        tenant, _ = caller(request)
        # OpenAI's newer form (method) wins over the older top-level hyperparameters when a request has both
        hyper = ((body.method.supervised.hyperparameters if body.method else body.hyperparameters)
                 or FineTuningHyperparameters())
        asked = JobRequest(body.model, body.training_file, body.validation_file, hyper.n_epochs, hyper.batch_size,
                           hyper.learning_rate_multiplier, body.suffix, body.seed, body.metadata)
        service = gateway.fine_tuning
        return job_view(await submit(service.jobs, service.storage, service.read_file, gateway.config.current, tenant,
                                     asked, gateway.spent_usd))

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100),
                        after: str | None = Query(None, pattern=ID_PATTERN)) -> dict:
        """The tenant's jobs, newest first."""
        tenant, _ = caller(request)
        metadata = {key[9:-1]: value for key, value in request.query_params.items()
                    if key.startswith("metadata[") and key.endswith("]")}
        rows, more = await gateway.fine_tuning.jobs.page(tenant.id, limit, after, metadata or None)
        return {"object": "list", "data": [job_view(row) for row in rows], "has_more": more}

    @router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}")
    async def get_job(request: Request, fine_tuning_job_id: str) -> dict:
        tenant, _ = caller(request)
        return job_view(await own_job(tenant.id, fine_tuning_job_id))

    @router.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel")
    async def cancel(request: Request, fine_tuning_job_id: str) -> dict:
        """Cancel a job: at once if it has not started, within seconds if it trains."""
        tenant, _ = caller(request)
        job = await gateway.fine_tuning.jobs.request_cancel(tenant.id, fine_tuning_job_id)
        if job is None:
            job = await own_job(tenant.id, fine_tuning_job_id)
            if job["status"] in FINISHED:
                raise GatewayError(400, f"Job {fine_tuning_job_id} has already {job['status']}: it cannot be "
                                        "cancelled.", param="fine_tuning_job_id", code="job_already_finished")
        return job_view(job)

    @router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events")
    async def events(request: Request, fine_tuning_job_id: str, limit: int = Query(20, ge=1, le=1000),
                     after: str | None = Query(None, pattern=ID_PATTERN)) -> dict:
        """The job's events, newest first: its states, and each step's training loss (``type: metrics``)."""
        tenant, _ = caller(request)
        await own_job(tenant.id, fine_tuning_job_id)
        rows, more = await gateway.fine_tuning.jobs.events(tenant.id, fine_tuning_job_id, limit, after)
        return {"object": "list", "data": rows, "has_more": more}

    @router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints")
    async def checkpoints(request: Request, fine_tuning_job_id: str, limit: int = Query(10, ge=1, le=100),
                          after: str | None = Query(None, pattern=ID_PATTERN)) -> dict:
        tenant, _ = caller(request)
        await own_job(tenant.id, fine_tuning_job_id)
        return list_page(*await gateway.fine_tuning.jobs.checkpoints(tenant.id, fine_tuning_job_id, limit, after))

    return router


def build_trainer_router(gateway: "GatewayServices") -> APIRouter:
    """What a trainer off the gateways asks and reports (``gateway.finetune.remote_runs``), with its run's token."""
    router = APIRouter(responses=error_responses(400, 401, 404, 409, 413, 503))
    prefix = "/v1/fine_tuning/trainer/jobs/{fine_tuning_job_id}"
    tags = ["fine-tuning trainers"]

    async def run_of(request: Request, job_id: str) -> tuple:
        if gateway.fine_tuning is None:
            raise GatewayError(503, "Fine-tuning is off on this gateway.", type="server_error",
                               code="fine_tuning_unavailable")
        runs = gateway.fine_tuning.runner.remote
        return runs, await runs.authorize(job_id, request.headers.get("authorization"))

    @router.get(prefix, tags=tags)
    async def trainer_spec(request: Request, fine_tuning_job_id: str) -> dict:
        """What the run trains: the base weights, hyperparameters, seed, and the checkpoint it resumes from."""
        runs, job = await run_of(request, fine_tuning_job_id)
        return await runs.spec(job)

    @router.get(prefix + "/data/{name}", tags=tags)
    async def trainer_data(request: Request, fine_tuning_job_id: str, name: str) -> StreamingResponse:
        """One of the job's datasets: ``train.jsonl``, ``validation.jsonl``."""
        runs, job = await run_of(request, fine_tuning_job_id)
        return StreamingResponse(await runs.read(job, "data", name), media_type="application/octet-stream")

    @router.get(prefix + "/resume/{name}", tags=tags)
    async def trainer_resume(request: Request, fine_tuning_job_id: str, name: str) -> StreamingResponse:
        """A file of the checkpoint the run resumes from (named in the spec's ``resume.files``)."""
        runs, job = await run_of(request, fine_tuning_job_id)
        return StreamingResponse(await runs.read(job, "resume", name), media_type="application/octet-stream")

    @router.put(prefix + "/checkpoints/{step}/{name}", tags=tags)
    async def trainer_checkpoint_file(request: Request, fine_tuning_job_id: str,
                                      step: Annotated[int, Path(ge=0, le=10**9)], name: str) -> dict:
        """A file of a checkpoint (the body: its bytes), before the checkpoint is reported."""
        runs, job = await run_of(request, fine_tuning_job_id)
        size = await runs.write(job, "checkpoint", step, name, request.stream())
        return {"object": "fine_tuning.trainer.file", "name": name, "bytes": size}

    @router.put(prefix + "/adapter/{name}", tags=tags)
    async def trainer_adapter_file(request: Request, fine_tuning_job_id: str, name: str) -> dict:
        """A file of the finished adapter (the body: its bytes), before ``done`` is reported."""
        runs, job = await run_of(request, fine_tuning_job_id)
        size = await runs.write(job, "adapter", None, name, request.stream())
        return {"object": "fine_tuning.trainer.file", "name": name, "bytes": size}

    @router.post(prefix + "/events", tags=tags)
    async def trainer_event(request: Request, fine_tuning_job_id: str, body: TrainerEvent) -> dict:
        """A report: the run's heartbeat, and its step, checkpoint, end or failure. A 409 says: stop."""
        runs, job = await run_of(request, fine_tuning_job_id)
        return await runs.report(job, body.model_dump(exclude_none=True))

    return router


class TrainerEvent(Strict):
    event: Literal["beat", "step", "checkpoint", "done", "failed"]
    step: whole(0, 10**9) | None = None
    total_steps: whole(0, 10**9) | None = None
    loss: float | None = Field(None, ge=-1e12, le=1e12)
    valid_loss: float | None = Field(None, ge=-1e12, le=1e12)
    epoch: float | None = Field(None, ge=0, le=1e6)
    trained_tokens: whole(0, 10**15) | None = None
    steps: whole(0, 10**9) | None = None
    message: str | None = Field(None, max_length=2000)
    path: str | None = Field(None, max_length=4000, description="the trainer's own folder, not read here")


__all__ = ["build_fine_tuning_router", "build_trainer_router"]
