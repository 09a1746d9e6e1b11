"""Routes for operators: liveness, readiness and Prometheus metrics. Everything off the hot path is FastAPI."""

from __future__ import annotations

from typing import Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from gateway import __version__
from gateway.errors import GatewayError, error_body


def build_ops_app(readiness: Callable[[], dict[str, bool]], stores: Callable[[], dict[str, bool]],
                  routers: Sequence[APIRouter] = ()) -> FastAPI:
    app = FastAPI(title="LLM gateway", version=__version__, docs_url="/docs", redoc_url=None)
    for router in routers:
        app.include_router(router)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> Response:
        """FastAPI's 422 for a bad body becomes OpenAI's 400 naming the field."""
        problems = exc.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(location) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        elif first.get("type") == "extra_forbidden":
            message = f"Unknown field '{param}'."
        elif param:
            message = f"Invalid '{param}': {message}."
        body = error_body(message, "invalid_request_error", param, "invalid_request")
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
            else str(exc.detail)
        return Response(error_body(message, kind), status_code=exc.status_code, media_type="application/json")

    @app.get("/health", tags=["health"])
    @app.get("/health/live", tags=["health"])
    async def live() -> dict:
        """The process is up and serving HTTP."""
        return {"status": "ok"}

    @app.get("/health/ready", tags=["health"])
    async def ready() -> Response:
        """Every dependency the request path needs is in place."""
        checks = readiness()
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks, "stores": stores()},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["observability"])
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
