"""Reports the console draws (and curl reads): usage and routing over every tenant, the newest requests, the
health of the stores and deployments, for the admin; a tenant's own account (limits, budget left, key names) for
its keys. The console has no back end of its own: it calls these routes and the admin API with the key it was
given, and gets the same checks as any client.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import TYPE_CHECKING

import asyncpg
from fastapi import APIRouter, Query, Request

from gateway.api.guard import Principal
from gateway.api.shared import END, START, USAGE_ERRORS, admin_route, caller, read_ledger, report_period
from gateway.api.guard import stateless_gateway
from gateway.config.schema import TEXT_PATTERN, TENANT_ID_PATTERN
from gateway.errors import GatewayError
from gateway.pipeline.auth import identify
from gateway.stores import audit as audit_log
from gateway.stores.limits import NANO
from gateway.stores.resp import ReplyError
from gateway.stores.usage import recent_requests, routing_report, usage_report

if TYPE_CHECKING:
    from gateway.api.services import GatewayServices

MOST_REQUESTS = 500  # rows per page of recent requests
TIME_PATTERN = r"^(19[7-9]\d|[2-9]\d{3})-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?$"


def build_reports_router(gateway: "GatewayServices") -> APIRouter:
    router = APIRouter()
    admin = admin_route(gateway)

    @router.get("/api/v1/usage", **admin)
    async def all_usage(start: str | None = START, end: str | None = END) -> dict:
        """Usage over every tenant: totals, by day, by model, and the 100 tenants that spent most."""
        return await read_ledger(gateway, usage_report, gateway.config.current, None, *report_period(start, end))

    @router.get("/api/v1/routing", **admin)
    async def all_routing(start: str | None = START, end: str | None = END) -> dict:
        """What the router did over every tenant: requests by complexity and model, cascades, savings."""
        return await read_ledger(gateway, routing_report, gateway.config.current, None, *report_period(start, end))

    @router.get("/api/v1/requests", **admin)
    async def requests(request: Request, tenant: str | None = Query(None, pattern=TENANT_ID_PATTERN),
                       model: str | None = Query(None, max_length=200, pattern=TEXT_PATTERN),
                       status: int | None = Query(None, ge=100, le=599),
                       before: str | None = Query(None, max_length=40, pattern=TIME_PATTERN,
                                                  json_schema_extra={"format": "date-time"},
                                                  description="ISO time: rows older than this (the next page)"),
                       limit: int = Query(100, ge=1, le=MOST_REQUESTS)) -> dict:
        """The newest ledger rows, newest first, filtered by tenant, model and status: who, what, how long, what
        it cost. The ledger keeps no prompt or answer text. A tenant's key (tenant_admin, viewer): its own rows."""
        tenant = _own_tenant(caller(request), tenant)
        older_than = _time(before, "before")
        rows = await read_ledger(gateway, recent_requests, tenant, model, status, older_than, limit + 1)
        return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}

    @router.get("/api/v1/audit", **admin)
    async def audit(request: Request, tenant: str | None = Query(None, pattern=TENANT_ID_PATTERN),
                    since: str | None = Query(None, max_length=40, pattern=TIME_PATTERN,
                                              json_schema_extra={"format": "date-time"},
                                              description="ISO time: entries from then on"),
                    before_id: int | None = Query(None, ge=1, le=2**63 - 1,
                                                  description="entries older than this one (the next page)"),
                    limit: int = Query(100, ge=1, le=MOST_REQUESTS)) -> dict:
        """The admin API's changes, newest first: who (the key and its role), what, when, the state before and
        after. A tenant_admin key reads its own tenant's entries."""
        tenant = _own_tenant(caller(request), tenant)
        rows = await read_ledger(gateway, audit_log.read, tenant, _time(since, "since"), before_id, limit + 1)
        return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}

    @router.get("/api/v1/status", **admin)
    async def status() -> dict:
        """The gateway's health as an operator reads it: readiness, the stores, the deployments that failed
        lately (and their cooldowns), the fleet's nodes."""
        config = gateway.config.current
        failing = gateway.selector.status()
        deployments = [
            {"model": model.name, "deployment": d.name, "provider": d.provider or "openai-compatible",
             "standby": d in model.standby, **failing.get((model.name, d.name), {"failures_in_a_row": 0,
                                                                              "cooldown_seconds_left": 0.0})}
            for model in config.models.values() for d in model.deployments if not d.pool]
        nodes = [node for pool in gateway.fleet.nodes.values() for node in pool.values()] if gateway.fleet else None
        return {"object": "gateway.status", "ready": gateway.readiness(), "stores": gateway.store_status(),
                "config": {"models": len(config.models), "tenants": len(config.tenants)},
                "deployments": deployments,
                "fleet": None if nodes is None else {"nodes": len(nodes),
                                                     "up": sum(1 for node in nodes if node.state == "up")}}

    @router.get("/v1/account", tags=["usage"], responses=USAGE_ERRORS)
    async def account(request: Request) -> dict:
        """The calling tenant's own account: tier, limits, this month's budget and what is left of it, its key
        names. Nothing of any other tenant."""
        tenant, key = identify(request.scope, gateway.config.current, "usage")
        if gateway.directory is None:
            raise stateless_gateway()
        limits = tenant.limits
        spent = await _spent_this_month(gateway, tenant.id)
        budget = limits.monthly_budget_usd
        try:
            api_keys = await gateway.directory.keys(tenant.id)
        except (OSError, ConnectionError, asyncpg.PostgresError):
            api_keys = []
        names = [{"name": name, "source": "yaml"}
                 for name in sorted(gateway.config.current.yaml_key_names.get(tenant.id, ()))]
        names += [{"name": k["name"], "source": "api", "expires_at": k["expires_at"]} for k in api_keys]
        return {
            "object": "account", "id": tenant.id, "name": tenant.name, "tier": tenant.tier,
            "features": sorted(tenant.features), "models": sorted(tenant.allowed_models),
            "limits": {"requests_per_minute": limits.requests_per_minute,
                       "tokens_per_minute": limits.tokens_per_minute, "tokens_per_hour": limits.tokens_per_hour,
                       "concurrent_requests": limits.concurrent_requests, "calls_per_day": limits.calls_per_day},
            "budget": {"month": time.strftime("%Y-%m", time.gmtime()), "monthly_budget_usd": budget,
                       "spent_usd": spent,
                       "left_usd": None if budget is None or spent is None else round(max(0.0, budget - spent), 6)},
            "keys": names,
            "key": {"name": key.name, **key.access.view()},
        }

    return router


def _own_tenant(principal: Principal, asked: str | None) -> str | None:
    """The tenant a report is read for: any (or all) for an operator; a tenant's key's own, whatever it asked."""
    if principal.operator:
        return asked
    if asked is not None and asked != principal.tenant:
        raise GatewayError(404, f"No tenant '{asked}'.", type="not_found_error", param="tenant",
                           code="tenant_not_found")
    return principal.tenant


def _time(value: str | None, param: str) -> dt.datetime | None:
    """An ISO time of a query (UTC when it names no zone); a 400 naming ``param`` if PostgreSQL cannot hold it."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        return moment.astimezone(dt.timezone.utc)  # past year 9999 in UTC: not a time PostgreSQL has
    except (ValueError, OverflowError):
        raise GatewayError(400, f"'{param}' is not an ISO date and time from year 1 to 9999 (UTC).",
                           param=param) from None


async def _spent_this_month(gateway: "GatewayServices", tenant_id: str) -> float | None:
    """This month's spend as the limits count it (Redis, reservations in flight included); None while Redis is
    away."""
    if gateway.limiter is None:
        return None
    try:
        return round(await gateway.limiter.spend_nano(tenant_id, time.time()) / NANO, 6)
    except (OSError, ReplyError, asyncio.TimeoutError):
        return None


__all__ = ["build_reports_router"]
