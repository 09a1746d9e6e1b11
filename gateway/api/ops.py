"""Routes for operators: liveness, readiness and Prometheus metrics. Everything off the hot path is FastAPI.

The OpenAPI document says what the routes really do: every error answer they can give (in OpenAI's shape, never
FastAPI's 422), /metrics as Prometheus text, and the values that depend on the config (tiers, routing profiles,
chat models) as the enumerations the running gateway accepts.
"""

from __future__ import annotations

from typing import Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from gateway import __version__
from gateway.console import Console
from gateway.errors import GatewayError, error_body


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error the gateway answers, as OpenAI writes them."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these statuses, each an OpenAI-shaped error."""
    return {status: {"model": ErrorBody, "description": _REASONS.get(status, "error")} for status in statuses}


_UNPARSED_BODY = "There was an error parsing the body"  # FastAPI's detail when the JSON decoder gives up
_REASONS = {400: "bad input (the field is named in `param`)", 401: "missing, malformed, wrong or expired key",
            403: "a key that may not do this", 404: "no such tenant, key or route", 409: "already exists, or "
            "declared in tenants.yaml", 413: "body too large", 503: "the stores cannot be reached"}


def build_ops_app(readiness: Callable[[], dict[str, bool]], stores: Callable[[], dict[str, bool]],
                  routers: Sequence[APIRouter] = (), choices: Callable[[], dict[str, list[str]]] | None = None
                  ) -> FastAPI:
    app = FastAPI(title="LLM gateway", version=__version__, docs_url="/docs", redoc_url=None)
    for router in routers:
        app.include_router(router)
    app.mount("/console", Console(), name="console")

    def openapi() -> dict:
        """Made anew on each call: the enumerations follow the config."""
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _without_422(document)
        if choices is not None:
            _with_choices(document, choices())
        return document

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> Response:
        """FastAPI's 422 for a bad body becomes OpenAI's 400 naming the field."""
        problems = exc.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        location = [str(part) for part in first.get("loc", ())]
        if location and location[0] in ("body", "query", "path", "header"):  # where it was, not which field
            location = location[1:]
        location = [part for part in location if not _union_member(part)]
        param = ".".join(location) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        code = "invalid_request"
        if first.get("type") == "json_invalid":
            message, param, code = "The request body is not valid JSON.", None, "invalid_json"
        elif first.get("type") == "extra_forbidden":
            message = f"Unknown field '{param}'."
        elif param:
            message = f"Invalid '{param}': {message}."
        body = error_body(message, "invalid_request_error", param, code)
        return Response(body, status_code=400, media_type="application/json")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        """A failure inside a route: OpenAI's shape, not Starlette's plain text (the exception is logged)."""
        body = error_body("The gateway failed to process this request.", "server_error", None, "internal_error")
        return Response(body, status_code=500, media_type="application/json")

    @app.exception_handler(HTTPException)
    async def openai_shaped(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path} is not a route of this gateway." if exc.status_code == 404 \
            else f"{request.method} is not allowed on {request.url.path}." if exc.status_code == 405 \
            else str(exc.detail)
        code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code)
        if exc.status_code == 400 and exc.detail == _UNPARSED_BODY:  # FastAPI's words for JSON nested too deeply
            message, code = "The request body is not valid JSON, or is nested too deeply.", "invalid_json"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_methods_of(app, request.scope))
        return Response(error_body(message, kind, None, code), status_code=exc.status_code,
                        media_type="application/json", headers=headers)

    @app.get("/health", tags=["health"])
    @app.get("/health/live", tags=["health"])
    async def live() -> dict:
        """The process is up and serving HTTP."""
        return {"status": "ok"}

    @app.get("/health/ready", tags=["health"], responses={503: {"description": "a dependency is missing"}})
    async def ready() -> Response:
        """Every dependency the request path needs is in place."""
        checks = readiness()
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks, "stores": stores()},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["observability"], response_class=Response, responses={200: {
        "description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


_TYPE_TAGS = frozenset(("str", "int", "float", "bool", "list", "dict", "none"))


def _union_member(part: str) -> bool:
    """Whether a part of an error's location names a union's member ("literal['a']", "constrained-str", "int",
    "CompoundFilter") rather than a field."""
    return ("[" in part or "-" in part or part in _TYPE_TAGS
            or (part.isidentifier() and part[0].isupper() and any(c.isupper() for c in part[1:])))


def _methods_of(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in app.routes:
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and route_methods and regex.match(scope["path"]):
            methods |= route_methods
    return sorted(methods)


def _without_422(document: dict) -> None:
    """FastAPI documents a 422 for every route with parameters; the gateway answers a 400 instead."""
    for path in document.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


def _with_choices(document: dict, choices: dict[str, list[str]]) -> None:
    """Name the values the running config accepts: tiers, routing profiles, chat models."""
    schemas = document.get("components", {}).get("schemas", {})
    for name, schema in schemas.items():
        properties = schema.get("properties", {})
        if name.startswith("Tenant") and "tier" in properties and choices.get("tier"):
            _enum(properties["tier"], choices["tier"])
        if name == "AdapterSpec":
            _enum(properties.get("base", {}), choices.get("fleet_model") or ["(no fleet model)"])
        if name == "ModelRule":  # a guard model: a moderation or chat model of this config
            _enum(properties.get("model", {}), choices.get("guard_model") or ["(no guard model)"])
        if name.startswith("Tenant") and "adapters" in properties and not choices.get("fleet_model"):
            _limit(properties["adapters"], 0)  # no model runs on a fleet: no adapter can be given
        if name == "TenantRoutingSpec":
            if choices.get("profile"):
                _enum(properties.get("profile", {}), choices["profile"])
            for complexity in ("simple", "moderate", "complex", "critical"):
                if choices.get("chat_model") and complexity in properties:
                    _enum(properties[complexity], choices["chat_model"])


def _limit(schema: dict, most: int) -> None:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "object":
            option["maxProperties"] = most


def _enum(schema: dict, values: list[str]) -> None:
    """Restrict a string (or string-or-null) property to ``values``."""
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            if option.get("type") == "string":
                option["enum"] = values
    elif schema.get("type") == "string":
        schema["enum"] = values
