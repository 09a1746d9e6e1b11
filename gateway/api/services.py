"""What the routers off the hot path (admin, fleet, reports, retrieval, router, fine-tuning) use of the running gateway: its
stores and services, and four questions about its state. ``gateway.app.Gateway`` provides them; the routers name
this interface, not the app that builds them, so that dependencies point one way (app -> api)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.api.guard import AdminAuth
    from gateway.config.secrets import Secrets
    from gateway.config.store import ConfigStore
    from gateway.finetune.service import FineTuning
    from gateway.retrieval.service import Retrieval
    from gateway.routing.share import ShareKeeper
    from gateway.settings import Settings
    from gateway.stores.cache import ResponseCache
    from gateway.stores.directory import TenantDirectory
    from gateway.stores.ledger import Ledger
    from gateway.stores.limits import Limiter
    from gateway.upstreams.fleet import Fleet
    from gateway.upstreams.select import DeploymentSelector


class GatewayServices(Protocol):
    settings: "Settings"
    config: "ConfigStore | None"
    directory: "TenantDirectory | None"  # tenants and keys made through the admin API (needs PostgreSQL)
    limiter: "Limiter | None"
    ledger: "Ledger | None"
    cache: "ResponseCache | None"
    fleet: "Fleet | None"
    secrets: "Secrets"
    shares: "ShareKeeper"
    selector: "DeploymentSelector"
    retrieval: "Retrieval | None"
    fine_tuning: "FineTuning | None"
    admin_auth: "AdminAuth"

    def readiness(self) -> dict[str, bool]: ...

    def store_status(self) -> dict[str, bool]: ...

    def known_tiers(self) -> frozenset[str]: ...

    async def spent_usd(self, tenant_id: str) -> float | None:
        """The tenant's spend this month, requests and training, as the limits count it."""
        ...

    async def forget_tenant_state(self, tenant_id: str) -> list[str]:
        """Drop what the stores keep of a tenant whose id is about to start a new one; what could not be."""
        ...
