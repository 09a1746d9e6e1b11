"""The fleet in the admin API: its nodes, their state, load and adapters; an admin's hands on them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from pydantic import Field

from gateway.api.shared import admin_route
from gateway.config.schema import TENANT_ID_PATTERN, Strict
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.app import Gateway


class PinIn(Strict):
    tenant: str = Field(pattern=TENANT_ID_PATTERN, description="the tenant whose adapter is pinned")
    adapter: str = Field(min_length=1, max_length=64, description="the adapter's name")


def build_fleet_router(gateway: "Gateway") -> APIRouter:
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

    @router.post("/api/v1/fleet/nodes/{name}/drain", **admin)
    async def drain(name: str) -> dict:
        """Send no new request to the node (those under way finish); until undrained."""
        return node_view(fleet().drain(name, True), name)

    @router.post("/api/v1/fleet/nodes/{name}/undrain", **admin)
    async def undrain(name: str) -> dict:
        return node_view(fleet().drain(name, False), name)

    @router.post("/api/v1/fleet/nodes/{name}/pins", **admin)
    async def pin(name: str, body: PinIn) -> dict:
        """Load a tenant's adapter on the node now and never evict it there."""
        return node_view(await fleet().pin(name, _adapter(gateway, body), True), name)

    @router.delete("/api/v1/fleet/nodes/{name}/pins/{tenant}/{adapter}", **admin)
    async def unpin(name: str, tenant: str, adapter: str) -> dict:
        return node_view(await fleet().pin(name, _adapter(gateway, PinIn(tenant=tenant, adapter=adapter)), False),
                         name)

    return router


def _adapter(gateway: "Gateway", pin: PinIn):
    tenant = gateway.config.current.tenants.get(pin.tenant)
    adapter = tenant.adapters.get(pin.adapter) if tenant is not None else None
    if adapter is None:
        raise GatewayError(404, f"Tenant '{pin.tenant}' has no adapter '{pin.adapter}'.", type="not_found_error",
                           code="adapter_not_found")
    return adapter
