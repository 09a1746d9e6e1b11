"""A job made: its model and hyperparameters checked, its files read (the tenant's own, of purpose fine-tune) and
checked against the base model, copied to storage, and the job queued. The API's ``POST /v1/fine_tuning/jobs`` and
a tenant's schedule make jobs the same way; every refusal is an OpenAI-shaped error naming its field."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from gateway.config.types import GatewayConfig, Tenant
from gateway.errors import GatewayError
from gateway.finetune import datasets
from gateway.finetune.budget import SpendReader
from gateway.finetune.jobs import Jobs
from gateway.finetune.runner import base_weights
from gateway.finetune.storage import Storage

AUTO = "auto"


@dataclass(frozen=True)
class JobRequest:
    model: str
    training_file: str
    validation_file: str | None = None
    n_epochs: int | str = AUTO
    batch_size: int | str = AUTO
    learning_rate_multiplier: float | str = AUTO
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = field(default=None)
    job_id: str | None = None  # a schedule's: one a period
    schedule: str | None = None  # the tenant's schedule that made it


FileReader = Callable[[str, str], Awaitable[dict | None]]  # (tenant id, file id) -> the file with its content


async def submit(jobs: Jobs, storage: Storage, read_file: FileReader, config: GatewayConfig, tenant: Tenant,
                 asked: JobRequest, spent: SpendReader | None = None) -> dict:
    """The job, queued; or a 400 (404 for a file not the tenant's, 429 for too many jobs under way or a monthly
    budget spent: training is paid from the same budget as requests)."""
    settings = config.fine_tuning
    model = config.models.get(asked.model)
    if model is None or asked.model not in tenant.allowed_models or base_weights(config, asked.model) is None:
        raise GatewayError(400, f"model: '{asked.model}' cannot be fine-tuned here: a base model served by a fleet "
                                "pool that has `weights` is needed.", param="model", code="model_not_available")
    if asked.n_epochs != AUTO and asked.n_epochs > settings.max_epochs:
        raise GatewayError(400, f"hyperparameters.n_epochs: at most {settings.max_epochs}.",
                           param="hyperparameters.n_epochs", code="invalid_hyperparameter")
    budget = tenant.limits.monthly_budget_usd
    if budget is not None and settings.gpu_second_usd > 0 and spent is not None:
        used = await spent(tenant.id)
        if used is not None and used >= budget:
            raise GatewayError(429, f"This tenant's monthly budget (${budget:g}) is spent: training is paid from it "
                                    "too.", type="insufficient_quota", code="insufficient_quota")
    if await jobs.active(tenant.id) >= settings.jobs_per_tenant:
        raise GatewayError(429, f"This tenant has {settings.jobs_per_tenant} fine-tuning job(s) under way already; "
                                "wait for one to finish or cancel one.", type="rate_limit_error", code="too_many_jobs")
    train = await _training_data(read_file, tenant.id, asked.training_file, "training_file")
    valid = (await _training_data(read_file, tenant.id, asked.validation_file, "validation_file")
             if asked.validation_file else None)
    stats = await asyncio.to_thread(datasets.check, train, "training_file", model.context_window,
                                    settings.max_dataset_tokens, datasets.MIN_TRAINING_EXAMPLES)
    if valid is not None:
        await asyncio.to_thread(datasets.check, valid, "validation_file", model.context_window)
    chosen = {"n_epochs": 3 if asked.n_epochs == AUTO else asked.n_epochs,
              "batch_size": max(1, min(8, stats.examples // 10)) if asked.batch_size == AUTO else asked.batch_size,
              "learning_rate_multiplier": 1.0 if asked.learning_rate_multiplier == AUTO else
              float(asked.learning_rate_multiplier)}
    seed = asked.seed if asked.seed is not None else secrets.randbelow(2**31)
    job = await jobs.create(tenant.id, asked.model, asked.training_file, asked.validation_file, chosen, asked.suffix,
                            seed, asked.metadata, asked.job_id, storage.url, asked.schedule,
                            config.fine_tuning.gpu_second_usd)
    await storage.write(train, tenant.id, "datasets", job["id"], "train.jsonl")
    if valid is not None:
        await storage.write(valid, tenant.id, "datasets", job["id"], "validation.jsonl")
    await jobs.set_status(job["id"], "queued", f"Files validated ({stats.examples} examples, {stats.tokens} tokens), "
                                               "moving job to queued state", training_examples=stats.examples)
    return await jobs.get(tenant.id, job["id"])


async def _training_data(read_file: FileReader, tenant_id: str, file_id: str, param: str) -> bytes:
    found = await read_file(tenant_id, file_id)
    if found is None:
        raise GatewayError(404, f"No such File object: {file_id}", type="not_found_error", param=param,
                           code="file_not_found")
    if found["purpose"] != "fine-tune":
        raise GatewayError(400, f"{param}: file {file_id} has purpose '{found['purpose']}'; upload it with purpose "
                                "'fine-tune'.", param=param, code="invalid_file_purpose")
    return found["content"]
