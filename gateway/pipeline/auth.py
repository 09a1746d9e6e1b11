"""Stage: who is calling. Finds the tenant's key in the request headers and the tenant it belongs to."""

from __future__ import annotations

import hashlib
import time

from gateway.asgi import Scope, header
from gateway.config.origins import origin_allowed
from gateway.config.types import ApiKey, GatewayConfig, Tenant
from gateway.errors import (GatewayError, bearer_without_key, invalid_api_key, malformed_authorization,
                            missing_api_key)
from gateway.pipeline.context import RequestContext
from gateway.pipeline.jwt_auth import JWT_USER, SigningKeyUnknown, TokenCheck, looks_like_jwt

_KEY_HEADERS = (b"authorization", b"api-key", b"x-api-key")


def presented_key(scope: Scope) -> str:
    """The key from ``Authorization: Bearer``, ``api-key`` (Azure-style clients) or ``x-api-key``; a 401 that says
    what is wrong when there is none."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _KEY_HEADERS:
            found.setdefault(name, value)
    authorization = found.get(b"authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip().decode("latin-1")
        if scheme.lower() == b"bearer" and not any(found.get(name, b"").strip() for name in (b"api-key", b"x-api-key")):
            raise bearer_without_key()
    for name in (b"api-key", b"x-api-key"):
        value = found.get(name)
        if value and value.strip():
            return value.strip().decode("latin-1")
    if authorization is not None and authorization.strip():
        raise malformed_authorization()
    raise missing_api_key()


TOKENS = TokenCheck()  # signed tokens checked in this process, remembered until they expire

# Scope key of a request the gateway makes itself on a tenant's behalf (embeddings for retrieval): the tenant and
# key it was made for. Only code in this process can set it; no HTTP request carries it.
INTERNAL_CALLER = "gateway.internal_caller"


GROUP_OF_MODEL_TYPE = {"chat": "chat", "embedding": "embeddings", "moderation": "moderations"}


def identify(scope: Scope, config: GatewayConfig, group: str | None) -> tuple[Tenant, ApiKey]:
    """The tenant and key of the request; a 401 or 403 that says why not. ``group`` is the route group the request
    calls (config.schema.ROUTE_GROUPS, or "models"); a key limited to other groups is refused it (None: not checked
    here, the route checks it)."""
    key = presented_key(scope)
    record = config.keys.get(hashlib.sha256(key.encode("latin-1")).hexdigest())
    if record is None:
        if not config.jwt_issuers or not looks_like_jwt(key):
            raise invalid_api_key()
        tenant_id, record, user = TOKENS.check(key, config)
        if tenant_id not in config.tenants:
            raise GatewayError(401, "The token names a tenant this gateway does not have.", code="unknown_tenant")
        if user is not None:
            scope[JWT_USER] = user
    if record.expires_at is not None and record.expires_at <= time.time():
        raise GatewayError(401, f"The API key '{record.name}' has expired.", code="expired_api_key")
    tenant = config.tenants.get(record.tenant_id)
    if tenant is None:
        raise invalid_api_key()
    if not tenant.enabled:
        raise GatewayError(403, "This tenant is disabled.", type="permission_error", code="tenant_disabled")
    if config.tenant_origins:  # some tenant allows browsers on its own origins: keep each to its own
        origin = header(scope, b"origin")
        if origin is not None and not origin_allowed(origin, header(scope, b"host"), config.cors_origins,
                                                     tenant.cors_origins):
            raise GatewayError(403, "This key may not be used from this browser origin.", type="permission_error",
                               code="origin_not_allowed")
    if group is not None and not record.access.permits(group):
        role = "" if record.access.role == "member" else f" ({record.access.role})"
        raise GatewayError(403, f"The API key '{record.name}'{role} may not call the {group} routes.",
                           type="permission_error", code="route_not_allowed")
    return tenant, record


async def identify_again(scope: Scope, store, refused: GatewayError,
                         group: str | None) -> tuple[Tenant, ApiKey, GatewayConfig]:
    """After ``identify`` refused a key: if the key was unknown, have ``store`` (a ConfigStore) look for new keys (at
    most once a second) and try once more, so that a key made a moment ago works at once; if a token named a
    signing key not read yet, read its issuer's keys again (a rotation) and try once more; else ``refused``."""
    if isinstance(refused, SigningKeyUnknown):
        if not await refused.key_set.refresh_for_unknown_key():
            raise refused
    elif refused.code != "invalid_api_key" or store is None or not await store.recheck_for_key():
        raise refused
    config = store.current
    tenant, key = identify(scope, config, group)
    return tenant, key, config


class Authenticate:
    """Stage: who is calling (401 / 403)."""

    def __init__(self, store) -> None:
        self.store = store

    async def __call__(self, ctx: RequestContext) -> None:
        internal = ctx.scope.get(INTERNAL_CALLER)
        if internal is not None:  # a call the gateway makes itself, for a tenant it already knows
            ctx.tenant, ctx.api_key = internal
            return
        group = GROUP_OF_MODEL_TYPE[ctx.endpoint.model_type]
        try:
            ctx.tenant, ctx.api_key = identify(ctx.scope, ctx.config, group)
        except GatewayError as error:
            ctx.tenant, ctx.api_key, ctx.config = await identify_again(ctx.scope, self.store, error, group)
