"""The door of the routes off the hot path (admin API, usage, health, metrics, docs).

- The admin API's key, and a tenant's key on the tenant routes that take a body (files, vector stores, feedback),
  are checked before anything of the body is read: an unauthenticated client cannot make the gateway buffer and
  parse a large body, nor hold a connection open with one.
- ``/metrics`` names every tenant with its requests and spend: with ``GATEWAY_METRICS_KEY`` set it answers only
  that key (as a bearer token, what Prometheus sends with ``authorization.credentials_file``) or an admin key.
- Every body is bounded; past the limit the answer is a 413 and the rest is never read.
- A path with a NUL character in it is a 400: no name or id of the gateway's has one.
- A body is read as JSON whatever content type the client declared, as the OpenAI routes do (``curl -d`` sends
  ``application/x-www-form-urlencoded``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Callable

from gateway.asgi import BodyTooLarge, ClientDisconnected, Receive, Scope, Send, header, read_body, send_response
from gateway.config.keys import hash_key
from gateway.config.types import GatewayConfig
from gateway.errors import GatewayError, invalid_api_key
from gateway.pipeline.auth import identify, presented_key

ADMIN = "gateway.admin"  # scope key: the Principal whose key was checked
ADMIN_PREFIX = "/api/"
_WITH_BODY = frozenset(("POST", "PUT", "PATCH", "DELETE"))
OPERATOR, TENANT_ADMIN, VIEWER = "operator", "tenant_admin", "viewer"


@dataclass(frozen=True)
class Principal:
    """Who calls the admin API: an operator (an admin key: every tenant), or a tenant's key with the role
    tenant_admin or viewer (its own tenant only)."""

    name: str
    role: str
    tenant: str | None = None

    @property
    def operator(self) -> bool:
        return self.role == OPERATOR

    def label(self) -> str:
        return self.name if self.operator else f"{self.tenant}/{self.name}"


# What a tenant's roles may call of the admin API, as (method, path below /api/v1/organizations/{its id}); and the
# routes of every tenant that answer a tenant's key with its own rows only.
_OWN_TENANT = re.compile(r"^/api/v1/organizations/(?P<tenant>[^/]+)(?P<rest>/.*)?$")
_TENANT_ROUTES = {
    TENANT_ADMIN: {("GET", ""), ("PATCH", ""), ("GET", "/keys"), ("POST", "/keys"), ("DELETE", "/keys/*"),
                   ("GET", "/provider-keys"), ("PUT", "/provider-keys/*"), ("DELETE", "/provider-keys/*"),
                   ("GET", "/usage"), ("GET", "/routing"), ("DELETE", "/cache")},
    VIEWER: {("GET", "/usage"), ("GET", "/routing")},
}
_SHARED_ROUTES = {TENANT_ADMIN: {("GET", "/api/v1/organizations"), ("GET", "/api/v1/requests"),
                                 ("GET", "/api/v1/audit")},
                  VIEWER: {("GET", "/api/v1/requests")}}


def _tenant_may(principal: Principal, method: str, path: str) -> None:
    """A 404 for another tenant's id, a 403 for a route the role does not reach."""
    method = "GET" if method == "HEAD" else method
    if (method, path.rstrip("/")) in _SHARED_ROUTES[principal.role]:
        return
    own = _OWN_TENANT.match(path)
    if own is not None:
        if own["tenant"] != principal.tenant:  # the path as the routes read it (already percent-decoded)
            raise GatewayError(404, f"No tenant '{own['tenant'][:100]}'.", type="not_found_error",
                               code="tenant_not_found")
        rest = (own["rest"] or "").rstrip("/")
        first = "/" + rest.split("/")[1] if rest else ""
        if (method, rest) in _TENANT_ROUTES[principal.role] or (
                rest != first and (method, first + "/*") in _TENANT_ROUTES[principal.role]):
            return
    raise GatewayError(403, f"The key '{principal.name}' ({principal.role} of tenant '{principal.tenant}') may not "
                            f"call {method} {path}.", type="permission_error", code="permission_denied")


class AdminAuth:
    """Who calls the admin API: one of tenants.yaml's ``admin_keys`` or ``GATEWAY_ADMIN_KEY`` (an operator), or a
    tenant's key whose role is tenant_admin or viewer (its own tenant, within its role)."""

    def __init__(self, config: Callable[[], GatewayConfig], bootstrap_key: str | None, stateless: bool) -> None:
        self._config = config
        self._bootstrap = hash_key(bootstrap_key) if bootstrap_key else None
        self._stateless = stateless

    def check(self, scope: Scope) -> Principal:
        """Who calls, if they may call this route; a GatewayError (401, 403, 404, 503) otherwise."""
        if self._stateless:
            raise stateless_gateway()
        key = presented_key(scope)
        digest = hashlib.sha256(key.encode("latin-1")).hexdigest()
        config = self._config()
        admin_key = config.admin_keys.get(digest)
        if admin_key is not None:
            if admin_key.expires_at is not None and admin_key.expires_at <= time.time():
                raise GatewayError(401, f"The admin key '{admin_key.name}' has expired.", code="expired_api_key")
            return Principal(admin_key.name, OPERATOR)
        if self._bootstrap and hmac.compare_digest(digest, self._bootstrap):
            return Principal("GATEWAY_ADMIN_KEY", OPERATOR)
        tenant_key = config.keys.get(digest)
        if tenant_key is None:
            raise invalid_api_key()
        if tenant_key.access.role not in _TENANT_ROUTES:
            raise GatewayError(403, "This is a tenant key; the admin API needs an admin key, or a tenant key with "
                                    "the role tenant_admin or viewer.", type="permission_error",
                               code="admin_key_required")
        identify(scope, config, None)  # expired, disabled tenant, browser origin: as on every route of the tenant
        principal = Principal(tenant_key.name, tenant_key.access.role, tenant_key.tenant_id)
        _tenant_may(principal, scope["method"], scope["path"])
        return principal


METRICS_PATH = "/metrics"


class MetricsAuth:
    """Who may read ``/metrics``: anyone when no metrics key is set; else the metrics key or an admin key."""

    def __init__(self, admin: AdminAuth, metrics_key: str | None) -> None:
        self._admin = admin
        self._digest = hash_key(metrics_key) if metrics_key else None

    def check(self, scope: Scope) -> None:
        if self._digest is None:
            return
        if hmac.compare_digest(hash_key(presented_key(scope)), self._digest):
            return
        try:
            self._admin.check(scope)
        except GatewayError as error:
            if error.status == 503:  # a stateless gateway has no admin keys: this key is simply wrong
                raise invalid_api_key() from None
            if error.status != 403:
                raise
            raise GatewayError(403, "/metrics needs the metrics key (GATEWAY_METRICS_KEY) or an admin key.",
                               type="permission_error", code="metrics_key_required") from None


def stateless_gateway() -> GatewayError:
    return GatewayError(503, "This gateway runs stateless (GATEWAY_STATELESS): it keeps no tenants, keys or usage of "
                             "its own.", type="server_error", code="stateless_gateway")


UPLOADS = frozenset(("/v1/files", "/files"))  # multipart bodies, as large as the request path allows
STREAMED = "/v1/fine_tuning/trainer/"  # a trainer's files: streamed to storage by their route, which bounds them
TENANT_ROUTES = ("/v1/files", "/files", "/v1/vector_stores", "/vector_stores", "/v1/feedback", "/feedback",
                 "/v1/responses/", "/responses/")


class BodyGuard:
    def __init__(self, app, admin: AdminAuth, limit: int, upload_limit: int | None = None,
                 metrics: MetricsAuth | None = None, tenant_key=None) -> None:
        self.app = app
        self.admin = admin
        self.metrics = metrics
        self.tenant_key = tenant_key  # async (scope) -> None: a GatewayError for a key no tenant has
        self.limit = limit
        self.upload_limit = upload_limit or limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if scope["path"].startswith(ADMIN_PREFIX):
                scope[ADMIN] = self.admin.check(scope)
            elif scope["path"] == METRICS_PATH and self.metrics is not None:
                self.metrics.check(scope)
            if "\x00" in scope["path"]:  # no id has one, and PostgreSQL cannot even compare with one
                raise GatewayError(400, "The path must not contain a NUL character (%00).", code="invalid_path")
            if scope["method"] in _WITH_BODY and not (scope["method"] == "PUT" and scope["path"].startswith(STREAMED)):
                if self.tenant_key is not None and scope["path"].startswith(TENANT_ROUTES) and self._served(scope):
                    await self.tenant_key(scope)
                receive = await self._buffered(scope, receive)
        except GatewayError as error:
            headers = [(k.encode(), v.encode()) for k, v in error.headers.items()]
            await send_response(send, error.status, error.body(), headers)
            return
        except ClientDisconnected:
            return
        await self.app(scope, receive, send)

    def _served(self, scope: Scope) -> bool:
        """Whether a route takes this method at this path (else the app's own 405 or 404 answers, key or not)."""
        from starlette.routing import Match

        return any(route.matches(scope)[0] == Match.FULL for route in getattr(self.app, "routes", ()))

    async def _buffered(self, scope: Scope, receive: Receive) -> Receive:
        upload = scope["path"] in UPLOADS
        limit = self.upload_limit if upload else self.limit
        try:
            body = await read_body(receive, limit, header(scope, b"content-length"))
        except BodyTooLarge:
            raise GatewayError(413, f"The request body is larger than this route's limit of {limit} bytes.",
                               code="request_too_large") from None
        if body and not upload:  # an upload keeps its multipart content type
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")]
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
