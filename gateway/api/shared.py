"""What the routers off the hot path share: the admin routes' declaration (key, tag, error answers), the
period of a report, and reading the ledger with a 503 while it cannot be read. A module of its own, so that the
admin, reports, router and retrieval routers depend on it rather than on each other."""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING

import asyncpg
from fastapi import Depends, Query, Request

from gateway.api.guard import ADMIN, Principal, stateless_gateway
from gateway.api.ops import error_responses
from gateway.config.schema import DATE_PATTERN, calendar_date
from gateway.errors import GatewayError
from gateway.stores import audit as audit_log
from gateway.stores.usage import period

if TYPE_CHECKING:
    from gateway.api.services import GatewayServices


log = logging.getLogger("gateway.admin")

ADMIN_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 503)


def list_page(rows: list[dict], more: bool) -> dict:
    """One page of an OpenAI list: its objects, the first and last ids (the cursors), and whether more follow."""
    return {"object": "list", "data": rows, "first_id": rows[0]["id"] if rows else None,
            "last_id": rows[-1]["id"] if rows else None, "has_more": more}
USAGE_ERRORS = error_responses(400, 401, 403, 503)


def admin_route(gateway: "GatewayServices") -> dict:
    """What every admin route declares: the admin key required, its tag, its error answers."""

    def require_admin(request: Request) -> Principal:
        principal = request.scope.get(ADMIN)  # checked by the guard before the body was read
        if principal is None:
            principal = request.scope[ADMIN] = gateway.admin_auth.check(request.scope)
        return principal

    return dict(dependencies=[Depends(require_admin)], tags=["admin"], responses=ADMIN_ERRORS)


def caller(request: Request) -> Principal:
    """Who calls an admin route (its dependency has checked them)."""
    return request.scope[ADMIN]


START = Query(None, pattern=DATE_PATTERN, json_schema_extra={"format": "date"},
              description="first day of the report, YYYY-MM-DD (default: the month's first)")
END = Query(None, pattern=DATE_PATTERN, json_schema_extra={"format": "date"},
            description="last day of the report, YYYY-MM-DD (default: today)")


def _day(value: str | None, param: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return calendar_date(value)
    except ValueError as exc:
        raise GatewayError(400, f"Invalid '{param}': {exc}.", param=param, code="invalid_date") from None


def report_period(start: str | None, end: str | None) -> tuple[dt.datetime, dt.datetime]:
    """The period a report's ``start`` and ``end`` query name (whole UTC days); a 400 naming the bad one."""
    begin, finish = period(_day(start, "start"), _day(end, "end"))
    if finish <= begin:
        raise GatewayError(400, "'end' must not be before 'start'.", param="end")
    return begin, finish


async def read_ledger(gateway: "GatewayServices", report, *args):
    """``report(pool, *args)`` on the ledger's database; a 503 while it cannot be read."""
    if gateway.directory is None:
        raise stateless_gateway()
    try:
        return await report(await gateway.directory.pool_for_reports(), *args)
    except (OSError, ConnectionError, asyncpg.PostgresError) as exc:
        raise GatewayError(503, f"The ledger cannot be read right now: {exc}", type="server_error",
                           code="ledger_unavailable") from None


async def record_action(gateway: "GatewayServices", principal: Principal, action: str, tenant_id: str | None,
                        target: str | None, before: object, after: object) -> None:
    """Write an admin action to the audit log; a failure to write is logged, never undoes the action."""
    try:
        pool = await gateway.directory.pool_for_reports()
        await audit_log.write(pool, principal.name, principal.role, principal.tenant, action, tenant_id, target,
                              200, before, after)
    except (OSError, ConnectionError, asyncpg.PostgresError) as exc:
        log.error("audit log: %s by %s of tenant %s could not be recorded: %s", action, principal.label(),
                  tenant_id, exc)
