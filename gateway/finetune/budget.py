"""A running job's check against its tenant's monthly budget: training is paid from the same budget as requests,
and a job that would spend past it is stopped, not only refused at its start."""

from __future__ import annotations

from typing import Awaitable, Callable

from gateway.config.types import GatewayConfig

SpendReader = Callable[[str], Awaitable[float | None]]  # tenant id -> dollars spent this month (None: unknown)


def gpu_second_price(config: GatewayConfig, job: dict) -> float:
    """What a second of the job's training costs: the price in force when it was made (the config's for a job made
    before jobs kept theirs)."""
    price = job.get("gpu_second_usd")
    return config.fine_tuning.gpu_second_usd if price is None else price


async def budget_exhausted(config: GatewayConfig, job: dict, spent: SpendReader | None,
                           seconds: float) -> str | None:
    """Why the job must stop after ``seconds`` of training (its spend so far is not counted in Redis until it
    ends), or None while the budget holds (or cannot be read: the job goes on rather than fail on a blip)."""
    tenant = config.tenants.get(job["tenant_id"])
    budget = tenant.limits.monthly_budget_usd if tenant is not None else None
    price = gpu_second_price(config, job)
    if budget is None or price <= 0 or spent is None:
        return None
    used = await spent(job["tenant_id"])
    if used is None or used + seconds * price <= budget:
        return None
    return (f"the tenant's monthly budget (${budget:g}) ran out while the job trained: ${used:.4f} was spent "
            f"before, ${seconds * price:.4f} by this job")
