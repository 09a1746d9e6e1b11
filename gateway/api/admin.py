"""The admin API (behind an admin key) and the tenants' own usage route.

Tenants made here are kept in PostgreSQL and merged with tenants.yaml; the file stays the source of truth for the
tenants it declares, which the API shows but does not change. Keys can be made here for any tenant; only keys
made here can be revoked here (the file's keys are removed by editing the file).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import secrets
import unicodedata
from typing import TYPE_CHECKING, Literal

import asyncpg
from fastapi import APIRouter, Request
from pydantic import AliasChoices, Field, ValidationError, field_validator

from gateway.api.guard import stateless_gateway
from gateway.api.ops import error_responses
from gateway.api.guard import Principal
from gateway.api.shared import (END, START, USAGE_ERRORS, admin_route, caller, read_ledger, record_action,
                                report_period)
from gateway.config.keys import generate_key, hash_key
from gateway.config.loader import key_access
from gateway.config.routing import unknown_chat_models
from gateway.config.schema import (FEATURES, KEY_NAME_PATTERN, NAMED_PATTERN, PROVIDERS, KeyAccessFields,
                                   TENANT_ID_PATTERN, TEXT_PATTERN, CalendarDate, Strict, TenantFields,
                                   TenantRoutingSpec, TenantSpec, partial)
from gateway.config.types import MEMBER, GatewayConfig, Tenant
from gateway.errors import GatewayError
from gateway.pipeline.auth import identify
from gateway.stores.directory import Conflict
from gateway.stores.feedback import rate
from gateway.stores.usage import midnight, routing_report, usage_report

if TYPE_CHECKING:
    from gateway.api.services import GatewayServices


class TenantIn(TenantFields):
    """A new tenant. seed 001's field names (organization_name, subscription_tier) are accepted too."""

    id: str | None = Field(None, pattern=TENANT_ID_PATTERN, description="made up from the name when left out")
    name: str = Field(min_length=1, max_length=200, pattern=NAMED_PATTERN,
                      validation_alias=AliasChoices("name", "organization_name"))
    tier: str = Field("basic", max_length=64, pattern=TEXT_PATTERN,
                      validation_alias=AliasChoices("tier", "subscription_tier"))


TenantPatch = partial(TenantFields, "TenantPatch")


class ProviderKeyIn(Strict):
    key: str = Field(min_length=1, max_length=4096, pattern=TEXT_PATTERN,
                     description="the tenant's own key: written to Vault, never shown again")


class FeedbackIn(Strict):
    request_id: str = Field(min_length=1, max_length=200, pattern=TEXT_PATTERN,
                            description="the x-request-id header of the answer rated")
    rating: Literal["good", "bad", 1, -1] = Field(description="good (1) or bad (-1)")
    comment: str | None = Field(None, max_length=2000, pattern=TEXT_PATTERN)

    @field_validator("rating", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("rating is good, bad, 1 or -1")
        return value


class KeyIn(KeyAccessFields):
    name: str | None = Field(None, pattern=KEY_NAME_PATTERN, description="letters, digits, . _ @ - (up to 64)")
    expires: CalendarDate | None = Field(None, description="the key stops working at the start of this day (UTC)")


def build_admin_router(gateway: "GatewayServices") -> APIRouter:
    router = APIRouter()

    def config() -> GatewayConfig:
        return gateway.config.current

    def require_stores() -> None:
        if gateway.directory is None:
            raise stateless_gateway()

    def tenant_or_404(tenant_id: str) -> Tenant:
        tenant = config().tenants.get(tenant_id)
        if tenant is None:
            unreadable = gateway.config.rejected(tenant_id)
            if unreadable is not None:  # its row is there, but cannot be loaded: say so, and how to repair it
                raise GatewayError(409, f"Tenant '{tenant_id}' is stored but cannot be loaded ({unreadable[:300]}); "
                                        "DELETE it, then create it again.", code="tenant_unreadable")
            raise GatewayError(404, f"No tenant '{tenant_id}'.", type="not_found_error", code="tenant_not_found")
        return tenant

    def tenant_spec(tenant_id: str, fields: dict) -> TenantSpec:
        """The tenant as tenants.yaml would declare it; a 400 naming the field if it is not valid."""
        try:
            spec = TenantSpec(**fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            param = ".".join(str(part) for part in error["loc"])
            if param.startswith("features"):
                message = f"Unknown feature; features are: {', '.join(FEATURES)}."
                param = "features"
            else:
                message = f"Invalid '{param}': {error['msg']}."
            raise GatewayError(400, message, param=param) from None
        tiers = gateway.known_tiers()
        if spec.tier not in tiers:
            raise GatewayError(400, f"Unknown tier '{spec.tier}'; tiers are: {', '.join(sorted(tiers))}.",
                               param="tier", code="unknown_tier")
        if spec.routing is not None:
            _check_routing(spec.routing, config())
        problem = gateway.config.problem_with(tenant_id, spec)
        if problem is not None:
            raise GatewayError(400, f"This tenant cannot be served: {problem}", code="invalid_tenant")
        return spec

    async def apply() -> None:
        await gateway.config.refresh_directory()

    async def audit(request: Request, action: str, tenant_id: str | None, target: str | None, before: object,
                    after: object) -> None:
        await record_action(gateway, caller(request), action, tenant_id, target, before, after)

    admin = admin_route(gateway)

    @router.post("/api/v1/organizations", status_code=201, **admin)
    async def create_tenant(request: Request, body: TenantIn) -> dict:
        """Create a tenant. It is kept in PostgreSQL and in force on every gateway within seconds."""
        tenant_id = body.id or _id_from(body.name)
        if tenant_id in config().tenants:
            raise GatewayError(409, f"A tenant '{tenant_id}' already exists.", param="id", code="tenant_exists")
        if gateway.config.rejected(tenant_id) is not None:
            raise GatewayError(409, f"A tenant '{tenant_id}' is stored but cannot be loaded; DELETE it first.",
                               param="id", code="tenant_unreadable")
        spec = tenant_spec(tenant_id, body.model_dump(exclude={"id"}))
        if await gateway.directory.history(tenant_id):  # a used id starts clean, or not at all
            left = await gateway.forget_tenant_state(tenant_id)
            if left:
                raise GatewayError(503, f"The id '{tenant_id}' belonged to a deleted tenant whose "
                                        f"{' and '.join(left)} cannot be cleared right now; try again later.",
                                   type="server_error", param="id", code="store_unavailable")
        try:
            await gateway.directory.create_tenant(tenant_id, spec)
        except Conflict as exc:
            raise GatewayError(409, f"{exc}.", param="id", code="tenant_exists") from None
        await gateway.forget_tenant_state(tenant_id)  # a used id starts clean: no counters, no cached answers
        await apply()
        made = _view(tenant_or_404(tenant_id), config())
        await audit(request, "tenant.create", tenant_id, None, None, made)
        return made

    @router.get("/api/v1/organizations", **admin)
    async def list_tenants(request: Request) -> dict:
        """Every tenant (a tenant_admin key: its own)."""
        current, principal = config(), caller(request)
        return {"object": "list", "data": [_view(t, current) for _, t in sorted(current.tenants.items())
                                           if principal.operator or t.id == principal.tenant]}

    @router.get("/api/v1/organizations/{tenant_id}", **admin)
    async def get_tenant(tenant_id: str) -> dict:
        return _view(tenant_or_404(tenant_id), config())

    @router.patch("/api/v1/organizations/{tenant_id}", **admin)
    async def update_tenant(request: Request, tenant_id: str, body: TenantPatch) -> dict:
        """Change a tenant made here. A tenant_admin key changes its own tenant's settings, within its tier."""
        tenant = _made_here(tenant_or_404(tenant_id))
        changes = body.model_dump(exclude_unset=True)
        principal = caller(request)
        if not principal.operator:
            _within_tenant_admin_reach(principal, tenant, changes, gateway.config.base.tiers[tenant.tier][0])
        before = _view(tenant, config())
        current = gateway.config.api_spec(tenant.id).model_dump()
        for field, value in changes.items():
            if value is None:
                current.pop(field, None)  # null: back to the default (the tier's, for limits)
            elif field == "limits":  # merged limit by limit, as a JSON merge patch: a limit sent as null goes back
                merged = {**(current.get("limits") or {}), **value}
                current["limits"] = {name: v for name, v in merged.items() if v is not None}
            else:
                current[field] = value
        spec = tenant_spec(tenant_id, current)
        await gateway.directory.update_tenant(tenant_id, spec)
        await apply()
        after = _view(tenant_or_404(tenant_id), config())
        await audit(request, "tenant.update", tenant_id, None, before, after)
        return after

    @router.delete("/api/v1/organizations/{tenant_id}", **admin)
    async def delete_tenant(request: Request, tenant_id: str) -> dict:
        """Delete a tenant made here and revoke its keys (one stored but unreadable too). Its usage rows stay in
        the ledger."""
        before = None
        if gateway.config.rejected(tenant_id) is None:
            before = _view(_made_here(tenant_or_404(tenant_id)), config())
        await gateway.directory.delete_tenant(tenant_id)
        await apply()
        await gateway.forget_tenant_state(tenant_id)
        await audit(request, "tenant.delete", tenant_id, None, before, None)
        return {"id": tenant_id, "object": "organization", "deleted": True}

    @router.get("/api/v1/organizations/{tenant_id}/history", **admin)
    async def tenant_history(tenant_id: str) -> dict:
        """Earlier tenants that had this id (deleted through the API): when each was made and deleted, and its
        usage over its lifetime. The ledger keeps their rows; reports of the current tenant start at its making."""
        require_stores()
        past = await gateway.directory.history(tenant_id)
        for entry in past:
            begin = dt.datetime.fromisoformat(entry["created_at"])
            end = dt.datetime.fromisoformat(entry["deleted_at"])
            entry["usage"] = await _report_between(gateway, tenant_id, begin, end)
        return {"object": "list", "id": tenant_id, "data": past}

    @router.post("/api/v1/organizations/{tenant_id}/keys", status_code=201, **admin)
    async def create_key(request: Request, tenant_id: str, body: KeyIn | None = None) -> dict:
        """Make a key, with a role (member, viewer, tenant_admin) and limited to routes, models and tools if
        asked. The key is in this answer only; the gateway keeps its SHA-256."""
        tenant_or_404(tenant_id)
        body = body or KeyIn()
        name = body.name or f"key-{secrets.token_hex(4)}"
        require_stores()
        if name in _yaml_key_names(config(), tenant_id):
            raise GatewayError(409, f"Tenant '{tenant_id}' already has a key named '{name}'.", param="name",
                               code="key_exists")
        expires = midnight(body.expires) if body.expires else None
        if expires is not None and expires <= dt.datetime.now(dt.timezone.utc):
            raise GatewayError(400, f"'expires' ({body.expires}) is in the past: the key would never work (it stops "
                                    "working at the start of that day, UTC).", param="expires", code="invalid_value")
        key = generate_key()
        access = key_access(body)
        try:
            await gateway.directory.add_key(tenant_id, name, hash_key(key), expires,
                                            None if access is MEMBER else access.view())
        except Conflict as exc:
            raise GatewayError(409, f"{exc}.", param="name", code="key_exists") from None
        await apply()
        made = {"object": "api_key", "tenant": tenant_id, "name": name,
                "expires": body.expires.isoformat() if body.expires else None, **access.view()}
        await audit(request, "key.create", tenant_id, name, None, made)
        return {**made, "key": key}

    @router.get("/api/v1/organizations/{tenant_id}/keys", **admin)
    async def list_keys(tenant_id: str) -> dict:
        tenant_or_404(tenant_id)
        current = config()
        roles = {key.name: key.access for key in current.keys.values() if key.tenant_id == tenant_id}
        from_file = [{"name": name, "source": "yaml", **roles.get(name, MEMBER).view()}
                     for name in sorted(_yaml_key_names(current, tenant_id))]
        made_here = [{**{k: v for k, v in row.items() if k != "access"}, **key_access(row["access"]).view()}
                     for row in await gateway.directory.keys(tenant_id)]
        return {"object": "list", "data": from_file + made_here}

    @router.delete("/api/v1/organizations/{tenant_id}/keys/{name:path}", **admin)
    async def revoke_key(request: Request, tenant_id: str, name: str) -> dict:
        tenant_or_404(tenant_id)
        if name in _yaml_key_names(config(), tenant_id):
            raise GatewayError(409, f"Key '{name}' is declared in tenants.yaml; remove it there.",
                               code="declared_in_file")
        if not await gateway.directory.revoke_key(tenant_id, name):
            raise GatewayError(404, f"Tenant '{tenant_id}' has no key named '{name}'.", type="not_found_error",
                               code="key_not_found")
        await apply()
        await audit(request, "key.revoke", tenant_id, name, {"name": name}, None)
        return {"object": "api_key", "tenant": tenant_id, "name": name, "revoked": True}

    @router.get("/api/v1/organizations/{tenant_id}/provider-keys", **admin)
    async def list_provider_keys(tenant_id: str) -> dict:
        """The providers for which the tenant brings its own key, and where each key is kept (never the key)."""
        tenant = tenant_or_404(tenant_id)
        return {"object": "list", "data": [{"object": "provider_key", "provider": provider, "reference": reference}
                                           for provider, reference in sorted(tenant.provider_keys.items())]}

    @router.put("/api/v1/organizations/{tenant_id}/provider-keys/{provider}", **admin)
    async def put_provider_key(request: Request, tenant_id: str, provider: Literal[PROVIDERS],
                               body: ProviderKeyIn) -> dict:
        """Keep the tenant's own key for a provider in Vault; its requests to that provider use it from now on,
        and their usage is marked as paid by the tenant."""
        tenant = _made_here(tenant_or_404(tenant_id))
        if gateway.secrets.vault is None:
            raise GatewayError(409, "This gateway keeps no secrets of its own: tenants' keys are kept in Vault, and "
                                    "VAULT_ADDR is not set. Reference a key instead (PATCH provider_keys).",
                               code="vault_not_configured")
        try:
            reference = await asyncio.to_thread(gateway.secrets.write_tenant_key, tenant.id, provider, body.key)
        except Exception as exc:  # Vault not configured, unreachable, or refusing: never the key in the message
            raise GatewayError(503, f"The key cannot be kept in Vault right now ({type(exc).__name__}).",
                               type="server_error", code="vault_unavailable") from None
        before = tenant.provider_keys.get(provider)
        await _set_provider_key(tenant.id, provider, reference)
        await audit(request, "provider_key.put", tenant.id, provider, {"reference": before} if before else None,
                    {"reference": reference})
        return {"object": "provider_key", "tenant": tenant.id, "provider": provider, "reference": reference}

    @router.delete("/api/v1/organizations/{tenant_id}/provider-keys/{provider}", **admin)
    async def delete_provider_key(request: Request, tenant_id: str, provider: Literal[PROVIDERS]) -> dict:
        tenant = _made_here(tenant_or_404(tenant_id))
        reference = tenant.provider_keys.get(provider)
        if reference is None:
            raise GatewayError(404, f"Tenant '{tenant.id}' has no key of its own for {provider}.",
                               type="not_found_error", code="provider_key_not_found")
        await _set_provider_key(tenant.id, provider, None)
        if reference.startswith("vault:"):
            try:
                await asyncio.to_thread(gateway.secrets.delete_tenant_key, reference)
            except Exception:  # the tenant no longer uses it; a copy left in Vault is the operator's to remove
                pass
        await audit(request, "provider_key.delete", tenant.id, provider, {"reference": reference}, None)
        return {"object": "provider_key", "tenant": tenant.id, "provider": provider, "deleted": True}

    async def _set_provider_key(tenant_id: str, provider: str, reference: str | None) -> None:
        current = gateway.config.api_spec(tenant_id).model_dump()
        keys = dict(current.get("provider_keys") or {})
        if reference is None:
            keys.pop(provider, None)
        else:
            keys[provider] = reference
        current["provider_keys"] = keys
        await gateway.directory.update_tenant(tenant_id, tenant_spec(tenant_id, current))
        await apply()

    @router.get("/api/v1/organizations/{tenant_id}/usage", **admin)
    async def tenant_usage(tenant_id: str, start: str | None = START, end: str | None = END):
        return await _report(gateway, tenant_or_404(tenant_id), start, end)

    @router.delete("/api/v1/organizations/{tenant_id}/cache", **admin)
    async def purge_cache(request: Request, tenant_id: str) -> dict:
        """Delete every response cache entry of this tenant."""
        tenant_or_404(tenant_id)
        if gateway.cache is None:
            require_stores()
        try:
            deleted = await gateway.cache.purge(tenant_id)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            raise GatewayError(503, f"The cache cannot be reached right now: {exc}", type="server_error",
                               code="cache_unavailable") from None
        await audit(request, "cache.purge", tenant_id, None, None, {"deleted": deleted})
        return {"object": "cache_purge", "tenant": tenant_id, "deleted": deleted}

    @router.get("/api/v1/organizations/{tenant_id}/routing", **admin)
    async def tenant_routing(tenant_id: str, start: str | None = START, end: str | None = END):
        """What the router did for this tenant: by complexity and model, cascade rate, the share sent to large
        models against its target, savings."""
        tenant = tenant_or_404(tenant_id)
        return _with_targets(await _report(gateway, tenant, start, end, routing_report), tenant)

    @router.get("/v1/routing/stats", tags=["usage"], responses=USAGE_ERRORS)
    @router.get("/routing/stats", include_in_schema=False)
    async def own_routing(request: Request, start: str | None = START, end: str | None = END):
        """The calling tenant's routing statistics."""
        tenant, _ = identify(request.scope, config(), "usage")
        require_stores()
        return _with_targets(await _report(gateway, tenant, start, end, routing_report), tenant)

    def _with_targets(report: dict, tenant: Tenant) -> dict:
        """The target share of large-model calls of each of the tenant's router aliases that has one, and the
        thresholds kept for it now."""
        report["large_share"]["targets"] = {
            alias: gateway.shares.status(profile.share_scope) | {"target_large_share": profile.target_large_share}
            for alias, profile in sorted(tenant.routes.items()) if profile.target_large_share is not None}
        return report

    @router.post("/v1/feedback", tags=["usage"], responses=error_responses(400, 401, 403, 404, 413, 503))
    async def feedback(request: Request, body: FeedbackIn) -> dict:
        """Rate an answer by its request id (the x-request-id header): good or bad. Only the calling tenant's own
        requests can be rated; a bad rating of a small model's routed answer teaches the router that the large
        model was needed."""
        tenant, _ = identify(request.scope, config(), "chat")
        require_stores()
        rating = 1 if body.rating in ("good", 1) else -1
        since = (dt.datetime.fromtimestamp(tenant.created_at, dt.timezone.utc) if tenant.created_at is not None
                 else dt.datetime.min.replace(tzinfo=dt.timezone.utc))
        try:
            pool = await gateway.directory.pool_for_reports()
            kept = await rate(pool, tenant.id, body.request_id, rating, body.comment, since)
            if kept is None and gateway.ledger is not None:  # the answer's row may still be on its way
                await asyncio.sleep(gateway.ledger.flush_seconds * 2 + 0.1)
                kept = await rate(pool, tenant.id, body.request_id, rating, body.comment, since)
        except (OSError, ConnectionError, asyncpg.PostgresError) as exc:
            raise GatewayError(503, f"Feedback cannot be kept right now: {exc}", type="server_error",
                               code="ledger_unavailable") from None
        if kept is None:
            raise GatewayError(404, f"No request '{body.request_id}' of yours to rate.", type="not_found_error",
                               param="request_id", code="request_not_found")
        return {"object": "feedback", "request_id": body.request_id, "rating": "good" if rating > 0 else "bad",
                "comment": body.comment, "created_at": kept["created_at"].isoformat(),
                "updated_at": kept["updated_at"].isoformat(), "used_by_router": kept["used_by_router"]}

    @router.get("/v1/usage", tags=["usage"], responses=USAGE_ERRORS)
    @router.get("/usage", include_in_schema=False)
    async def own_usage(request: Request, start: str | None = START, end: str | None = END):
        """The calling tenant's own usage: totals, by day, by model (its key decides which tenant)."""
        tenant, _ = identify(request.scope, config(), "usage")
        require_stores()
        return await _report(gateway, tenant, start, end)

    return router


async def _report(gateway: "GatewayServices", tenant: Tenant, start: str | None, end: str | None,
                  report=usage_report) -> dict:
    begin, finish = report_period(start, end)
    if tenant.created_at is not None:  # an id used again: the earlier tenant's rows are not this one's
        begin = max(begin, dt.datetime.fromtimestamp(tenant.created_at, dt.timezone.utc))
    return await _report_between(gateway, tenant.id, begin, max(begin, finish), report)


async def _report_between(gateway: "GatewayServices", tenant_id: str, begin: dt.datetime, finish: dt.datetime,
                          report=usage_report) -> dict:
    return await read_ledger(gateway, report, gateway.config.current, tenant_id, begin, finish)


# What a tenant_admin key may change of its own tenant: its settings, within its tier. Its tier, whether it is
# enabled, its models and features are the operator's; its provider keys go through their own route (a reference
# could name another tenant's secret); its adapters' files are placed on the nodes by the operator.
TENANT_ADMIN_FIELDS = frozenset(("name", "industry", "system_prompt", "limits", "guardrails", "routing", "cache",
                                 "cors_origins", "adapters", "end_users", "fine_tuned_defaults",
                                 "fine_tuning_schedules"))


def _within_tenant_admin_reach(principal: Principal, tenant: Tenant, changes: dict, tier_limits) -> None:
    for field in changes:
        if field not in TENANT_ADMIN_FIELDS:
            raise GatewayError(403, f"'{field}' is set by the gateway's operator, not by a tenant_admin key.",
                               type="permission_error", param=field, code="permission_denied")
    for name, value in (changes.get("limits") or {}).items():
        ceiling = getattr(tier_limits, name, None)
        if value is not None and ceiling is not None and name != "completion_reservation" and value > ceiling:
            raise GatewayError(403, f"'limits.{name}' may be at most {ceiling:g}, the {tenant.tier} tier's.",
                               type="permission_error", param=f"limits.{name}", code="limit_above_tier")
    for name, adapter in (changes.get("adapters") or {}).items():
        known = {(a.base, a.path) for a in tenant.adapters.values()}
        if (adapter.get("base"), adapter.get("path")) not in known:
            raise GatewayError(403, f"Adapter '{name}': a tenant_admin key may change which of its adapters is the "
                                    "default and what a failure does; an adapter's files are the operator's.",
                               type="permission_error", param=f"adapters.{name}", code="permission_denied")


def _made_here(tenant: Tenant) -> Tenant:
    if tenant.source != "api":
        raise GatewayError(409, f"Tenant '{tenant.id}' is declared in tenants.yaml; change it there.",
                           code="declared_in_file")
    return tenant


def _yaml_key_names(config: GatewayConfig, tenant_id: str) -> set[str]:
    return set(config.yaml_key_names.get(tenant_id, ()))


def _id_from(name: str) -> str:
    """An id in TENANT_ID_PATTERN from a name in any script: accents dropped, other characters as single dashes."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name).strip("-")[:40].rstrip("-") or "tenant"
    return f"{slug}-{secrets.token_hex(3)}"


def _view(tenant: Tenant, config: GatewayConfig) -> dict:
    limits = tenant.limits
    return {
        "object": "organization",
        "id": tenant.id,
        "name": tenant.name,
        "tier": tenant.tier,
        "industry": tenant.industry,
        "enabled": tenant.enabled,
        "models": list(tenant.model_patterns),
        "allowed_models": sorted(tenant.allowed_models),
        "warnings": [f"'{pattern}' admits no model of this gateway: the tenant cannot use it"
                     for pattern in tenant.unmatched_patterns],
        "system_prompt": tenant.system_prompt,
        "limits": {
            "requests_per_minute": limits.requests_per_minute,
            "tokens_per_minute": limits.tokens_per_minute,
            "tokens_per_hour": limits.tokens_per_hour,
            "concurrent_requests": limits.concurrent_requests,
            "calls_per_day": limits.calls_per_day,
            "monthly_budget_usd": limits.monthly_budget_usd,
            "completion_reservation": limits.completion_reservation,
        },
        "features": sorted(tenant.features),
        "routing": {alias: {"profile": p.name, "models": p.models, "economy": p.economy or None,
                            "over_budget": p.over_budget or None, "long_context": p.long_context,
                            "cascade": p.cascade, "cascade_threshold": p.cascade_threshold}
                    for alias, p in tenant.routes.items()},
        "cache": tenant.cache,  # the tenant's own changes to the models' cache policy
        "cors_origins": sorted(tenant.cors_origins),
        "provider_keys": dict(sorted(tenant.provider_keys.items())),  # references, never keys
        "adapters": {name: {"base": a.base, "path": a.path, "default": a.default, "on_failure": a.on_failure,
                            "node_name": a.lora_name} for name, a in sorted(tenant.adapters.items())
                     if not a.fine_tuned},
        "fine_tuned_models": sorted(name for name, a in tenant.adapters.items() if a.fine_tuned),
        "fine_tuned_defaults": dict(sorted(tenant.fine_tuned_defaults.items())),
        "fine_tuning_schedules": [s.model_dump() for s in tenant.fine_tuning_schedules],
        "guardrails": [rule.spec for rule in tenant.guardrails],
        "end_users": None if tenant.end_users is None else {
            "limits": _end_user_limits(tenant.end_users.limits), "required": tenant.end_users.required,
            "users": {user: _end_user_limits(limits) for user, limits in sorted(tenant.end_users.users.items())}},
        "source": tenant.source,
    }


def _end_user_limits(limits) -> dict:
    return {"requests_per_minute": limits.requests_per_minute, "tokens_per_day": limits.tokens_per_day,
            "monthly_budget_usd": limits.monthly_budget_usd}


def _check_routing(routing: TenantRoutingSpec, config: GatewayConfig) -> None:
    """The same checks the config load makes, as a 400 now rather than a tenant that never appears."""
    profiles = config.router.profiles if config.router is not None else frozenset()
    if routing.profile is not None and routing.profile not in profiles:
        raise GatewayError(400, f"Unknown routing profile '{routing.profile}'; profiles are: "
                                f"{', '.join(sorted(profiles))}.", param="routing.profile", code="unknown_profile")
    unknown = unknown_chat_models(routing, config.models)
    if unknown:
        complexity, name = unknown[0]
        raise GatewayError(400, f"'{name}' is not a chat model of this gateway.", param=f"routing.{complexity}",
                           code="model_not_found")
