"""Stage: who is calling. Finds the tenant's key in the request headers and the tenant it belongs to."""

from __future__ import annotations

import hashlib
import time

from gateway.asgi import Scope
from gateway.config.types import ApiKey, GatewayConfig, Tenant
from gateway.errors import GatewayError, invalid_api_key, missing_api_key
from gateway.pipeline.context import RequestContext

_KEY_HEADERS = (b"authorization", b"api-key", b"x-api-key")


def presented_key(scope: Scope) -> str | None:
    """The key from ``Authorization: Bearer``, ``api-key`` (Azure-style clients) or ``x-api-key``."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _KEY_HEADERS:
            found.setdefault(name, value)
    authorization = found.get(b"authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip().decode("latin-1")
    for name in (b"api-key", b"x-api-key"):
        value = found.get(name)
        if value and value.strip():
            return value.strip().decode("latin-1")
    return None


def identify(scope: Scope, config: GatewayConfig) -> tuple[Tenant, ApiKey]:
    key = presented_key(scope)
    if key is None:
        raise missing_api_key()
    record = config.keys.get(hashlib.sha256(key.encode("latin-1")).hexdigest())
    if record is None:
        raise invalid_api_key()
    if record.expires_at is not None and record.expires_at <= time.time():
        raise GatewayError(401, f"The API key '{record.name}' has expired.", code="expired_api_key")
    tenant = config.tenants[record.tenant_id]
    if not tenant.enabled:
        raise GatewayError(403, "This tenant is disabled.", type="permission_error", code="tenant_disabled")
    return tenant, record


async def authenticate(ctx: RequestContext) -> None:
    ctx.tenant, ctx.api_key = identify(ctx.scope, ctx.config)
