"""The stored responses of OpenAI's Responses API, for a tenant's own key: retrieve, delete, list input items.

``POST /v1/responses`` itself is on the request path (``gateway.api.openai``). Another tenant's response is a 404,
as an unknown one is.
"""

from __future__ import annotations

from typing import Awaitable, Callable, TypeVar

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gateway.api.ops import error_responses
from gateway.api.shared import USAGE_ERRORS
from gateway.api.guard import stateless_gateway
from gateway.config.types import GatewayConfig
from gateway.errors import GatewayError
from gateway.pipeline.auth import identify
from gateway.stores.responses import UNREACHABLE, ResponseStore, unavailable

ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
T = TypeVar("T")


def _not_found(response_id: str) -> GatewayError:
    return GatewayError(404, f"Response with id '{response_id[:128]}' not found.", param="response_id",
                        code="response_not_found")


async def _read(reading: Awaitable[T]) -> T:
    """A store call's result; a 503 while PostgreSQL cannot be reached."""
    try:
        return await reading
    except UNREACHABLE:
        raise unavailable() from None


def build_responses_router(config: Callable[[], GatewayConfig],
                           store: Callable[[], ResponseStore | None]) -> APIRouter:
    router = APIRouter(tags=["responses"], responses={**USAGE_ERRORS, **error_responses(404, 503)})

    def caller(request: Request) -> tuple[str, ResponseStore]:
        tenant, _ = identify(request.scope, config(), "chat")
        found = store()
        if found is None:
            raise stateless_gateway()
        return tenant.id, found

    @router.get("/v1/responses/{response_id}", response_class=Response)
    async def get_response(request: Request, response_id: str) -> Response:
        """A stored response, as it was answered."""
        tenant_id, responses = caller(request)
        found = await _read(responses.get(tenant_id, response_id))
        if found is None:
            raise _not_found(response_id)
        return Response(found, media_type="application/json")

    @router.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str) -> dict:
        """Delete a stored response: it can no longer be retrieved or continued."""
        tenant_id, responses = caller(request)
        if not await _read(responses.delete(tenant_id, response_id)):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @router.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(request: Request, response_id: str, limit: int = Query(20, ge=1, le=100),
                               order: str = Query("desc", pattern="^(asc|desc)$"),
                               after: str | None = Query(None, pattern=ID_PATTERN),
                               before: str | None = Query(None, pattern=ID_PATTERN)) -> Response:
        """The input items of a stored response's own request, newest first unless ``order`` is ``asc``."""
        tenant_id, responses = caller(request)
        items = await _read(responses.input_items(tenant_id, response_id))
        if items is None:
            raise _not_found(response_id)
        if order == "desc":
            items.reverse()
        ids = [item.get("id") for item in items]
        if after is not None:
            items = items[ids.index(after) + 1:] if after in ids else []
        if before is not None:
            kept_ids = [item.get("id") for item in items]
            items = items[:kept_ids.index(before)] if before in kept_ids else items
        page = items[:limit]
        body = {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
        return Response(orjson.dumps(body), media_type="application/json")

    return router
