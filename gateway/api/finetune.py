"""OpenAI's fine-tuning API, for a tenant's own LoRA adapters: ``POST /v1/fine_tuning/jobs`` (its training and
validation files checked line by line and copied to storage before the job is queued), list, retrieve, ``cancel``,
``events`` and ``checkpoints``. Another tenant's job is a 404; a file of another tenant too, and one of another
purpose a 400. The job trains on the gateway's own workers (``gateway.finetune.runner``); its model is the
tenant's, listed in its ``/v1/models`` and served by the fleet as soon as the job succeeds."""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import Field, StrictFloat, StrictInt, StringConstraints, model_validator

from gateway.api.guard import stateless_gateway
from gateway.api.ops import error_responses
from gateway.api.shared import USAGE_ERRORS
from gateway.config.schema import TEXT_PATTERN, Strict
from gateway.errors import GatewayError
from gateway.finetune import datasets
from gateway.finetune.jobs import FINISHED, job_view
from gateway.finetune.runner import base_weights
from gateway.pipeline.auth import identify

if TYPE_CHECKING:
    from gateway.api.services import GatewayServices

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Auto = Literal["auto"]
MetadataValue = Annotated[str, StringConstraints(max_length=512, pattern=TEXT_PATTERN)]


class Hyperparameters(Strict):
    n_epochs: Auto | Annotated[StrictInt, Field(ge=1, le=100)] = "auto"
    batch_size: Auto | Annotated[StrictInt, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[StrictFloat, Field(gt=0, le=10)] | Annotated[
        StrictInt, Field(gt=0, le=10)] = "auto"


class Supervised(Strict):
    hyperparameters: Hyperparameters = Hyperparameters()


class Method(Strict):
    type: Literal["supervised"] = Field(description="supervised only: DPO and reinforcement are not trained here")
    supervised: Supervised = Supervised()


class JobIn(Strict):
    model: str = Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)
    training_file: str = Field(pattern=ID_PATTERN)
    validation_file: str | None = Field(None, pattern=ID_PATTERN)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=TEXT_PATTERN)],
                   MetadataValue] | None = Field(None, max_length=16)
    integrations: list[dict] | None = Field(None, max_length=0, description="none are run here")

    @model_validator(mode="after")
    def _one_place(self) -> "JobIn":
        if self.hyperparameters is not None and self.method is not None:
            raise ValueError("give hyperparameters in method.supervised.hyperparameters or at the top, not both")
        return self


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

    async def training_data(tenant_id: str, file_id: str, param: str) -> bytes:
        found = await gateway.retrieval.catalog.file(tenant_id, file_id, with_content=True)
        if found is None:
            raise GatewayError(404, f"No such File object: {file_id}", type="not_found_error", param=param,
                               code="file_not_found")
        if found["purpose"] != "fine-tune":
            raise GatewayError(400, f"{param}: file {file_id} has purpose '{found['purpose']}'; upload it with "
                                    "purpose 'fine-tune'.", param=param, code="invalid_file_purpose")
        return found["content"]

    @router.post("/v1/fine_tuning/jobs")
    async def create(request: Request, body: JobIn) -> dict:
        """Check the files, copy them to storage and queue the job."""
        tenant, _ = caller(request)
        config = gateway.config.current
        settings = config.fine_tuning
        model = config.models.get(body.model)
        if model is None or body.model not in tenant.allowed_models or base_weights(config, body.model) is None:
            raise GatewayError(400, f"model: '{body.model}' cannot be fine-tuned here: a base model served by a "
                                    "fleet pool that has `weights` is needed.", param="model",
                               code="model_not_available")
        hyper = (body.method.supervised.hyperparameters if body.method else body.hyperparameters) or Hyperparameters()
        if hyper.n_epochs != "auto" and hyper.n_epochs > settings.max_epochs:
            raise GatewayError(400, f"hyperparameters.n_epochs: at most {settings.max_epochs}.",
                               param="hyperparameters.n_epochs", code="invalid_hyperparameter")
        if await gateway.fine_tuning.jobs.active(tenant.id) >= settings.jobs_per_tenant:
            raise GatewayError(429, f"This tenant has {settings.jobs_per_tenant} fine-tuning job(s) under way "
                                    "already; wait for one to finish or cancel one.", type="rate_limit_error",
                               code="too_many_jobs")
        train = await training_data(tenant.id, body.training_file, "training_file")
        valid = (await training_data(tenant.id, body.validation_file, "validation_file")
                 if body.validation_file else None)
        stats = await asyncio.to_thread(datasets.check, train, "training_file", model.context_window,
                                        settings.max_dataset_tokens, datasets.MIN_TRAINING_EXAMPLES)
        if valid is not None:
            await asyncio.to_thread(datasets.check, valid, "validation_file", model.context_window)
        chosen = {"n_epochs": 3 if hyper.n_epochs == "auto" else hyper.n_epochs,
                  "batch_size": max(1, min(8, stats.examples // 10)) if hyper.batch_size == "auto" else
                  hyper.batch_size,
                  "learning_rate_multiplier": 1.0 if hyper.learning_rate_multiplier == "auto" else
                  float(hyper.learning_rate_multiplier)}
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        jobs = gateway.fine_tuning.jobs
        job = await jobs.create(tenant.id, body.model, body.training_file, body.validation_file, chosen,
                                body.suffix, seed, body.metadata)
        storage = gateway.fine_tuning.storage
        await storage.write(train, tenant.id, "datasets", job["id"], "train.jsonl")
        if valid is not None:
            await storage.write(valid, tenant.id, "datasets", job["id"], "validation.jsonl")
        await jobs.set_status(job["id"], "queued", f"Files validated ({stats.examples} examples, {stats.tokens} "
                                                   "tokens), moving job to queued state",
                              training_examples=stats.examples)
        return job_view(await jobs.get(tenant.id, job["id"]))

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
        rows, more = await gateway.fine_tuning.jobs.checkpoints(tenant.id, fine_tuning_job_id, limit, after)
        return {"object": "list", "data": rows, "has_more": more,
                "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None}

    return router


__all__ = ["build_fine_tuning_router"]
