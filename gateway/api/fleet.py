"""The fleet in the admin API: its nodes, their state, load and adapters; an admin's hands on them."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from pydantic import Field

from gateway.api.shared import admin_route, caller, record_action
from gateway.config.schema import TENANT_ID_PATTERN, Strict
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.api.services import GatewayServices


class PinIn(Strict):
    tenant: str = Field(pattern=TENANT_ID_PATTERN, description="the tenant whose adapter is pinned")
    adapter: str = Field(min_length=1, max_length=64, description="the adapter's name")


def build_fleet_router(gateway: "GatewayServices") -> APIRouter:
    router = APIRouter()
    admin = admin_route(gateway)

    def fleet():
        if gateway.fleet is None:
            raise GatewayError(404, "This gateway has no fleet (models.yaml declares no `fleet:` pools).",
                               type="not_found_error", code="fleet_not_configured")
        return gateway.fleet

    def node_view(node, name: str) -> dict:
        if node is None:
            raise GatewayError(404, f"No fleet node '{name}'.", type="not_found_error", code="node_not_found")
        return {"object": "fleet.node", **node.view()}

    @router.get("/api/v1/fleet", **admin)
    async def fleet_view() -> dict:
        """Every pool's nodes: state, load, adapters registered and running, slots, pins."""
        return fleet().view()

    async def audited(request: Request, action: str, name: str, tenant: str | None, change) -> dict:
        node = fleet().find(name)
        before = node_view(node, name)
        changed = change()
        after = node_view(await changed if inspect.isawaitable(changed) else changed, name)
        keep = ("state", "drained_by_admin", "pinned", "adapters")
        await record_action(gateway, caller(request), action, tenant, name, {k: before[k] for k in keep},
                            {k: after[k] for k in keep})
        return after

    @router.post("/api/v1/fleet/nodes/{name}/drain", **admin)
    async def drain(request: Request, name: str) -> dict:
        """Send no new request to the node (those under way finish); until undrained."""
        return await audited(request, "fleet.drain", name, None, lambda: fleet().drain(name, True))

    @router.post("/api/v1/fleet/nodes/{name}/undrain", **admin)
    async def undrain(request: Request, name: str) -> dict:
        return await audited(request, "fleet.undrain", name, None, lambda: fleet().drain(name, False))

    @router.post("/api/v1/fleet/nodes/{name}/pins", **admin)
    async def pin(request: Request, name: str, body: PinIn) -> dict:
        """Load a tenant's adapter on the node now and never evict it there."""
        fleet()
        adapter = _adapter(gateway, body.tenant, body.adapter)
        return await audited(request, "fleet.pin", name, body.tenant, lambda: fleet().pin(name, adapter, True))

    @router.delete("/api/v1/fleet/nodes/{name}/pins/{tenant}/{adapter}", **admin)
    async def unpin(request: Request, name: str, tenant: str, adapter: str) -> dict:
        fleet()
        found = _adapter(gateway, tenant, adapter)
        return await audited(request, "fleet.unpin", name, tenant, lambda: fleet().pin(name, found, False))

    return router


def _adapter(gateway: "GatewayServices", tenant_id: str, name: str):
    tenant = gateway.config.current.tenants.get(tenant_id)
    adapter = tenant.adapters.get(name) if tenant is not None else None
    if adapter is None:
        raise GatewayError(404, f"Tenant '{tenant_id}' has no adapter '{name}'.", type="not_found_error",
                           code="adapter_not_found")
    return adapter
