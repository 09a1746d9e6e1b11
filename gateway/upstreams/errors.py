"""Upstream failures as OpenAI-shaped errors for the client."""

from __future__ import annotations

import asyncio

import orjson

from gateway.config.types import Deployment
from gateway.errors import GatewayError
from gateway.upstreams.http1 import Unreachable

__all__ = ["UPSTREAM_FAILURES", "Unreachable", "from_exception", "from_upstream_response"]

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def from_upstream_response(deployment: Deployment, status: int, body: bytes) -> GatewayError:
    """An upstream's error answer, keeping its status and message, in OpenAI's shape whatever shape it came in."""
    message, type_, param, code = _parse(body)
    if status in (401, 403):
        # The client's key was fine; the gateway's credentials for this deployment were not.
        return GatewayError(
            502, f"The upstream of deployment '{deployment.name}' refused the gateway's credentials ({status}).",
            type="upstream_error", code="upstream_auth_failed",
        )
    if not message:
        message = f"The upstream of deployment '{deployment.name}' answered with status {status}."
    default_type = _TYPE_BY_STATUS.get(status, "upstream_error" if status >= 500 else "invalid_request_error")
    if not isinstance(type_, str) or not type_ or type_[0].isupper():
        type_ = default_type  # vLLM names types after Python classes ("BadRequestError"); clients expect OpenAI's
    return GatewayError(status, message, type=type_, param=param, code=code if isinstance(code, str) else None)


def _parse(body: bytes) -> tuple[str | None, str | None, str | None, object]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or None), None, None, None
    if isinstance(data, dict):
        error = data.get("error") if isinstance(data.get("error"), dict) else data
        message = error.get("message") or error.get("detail")
        if isinstance(message, (list, dict)):
            message = orjson.dumps(message).decode()
        if isinstance(data.get("error"), str):
            message = data["error"]
        return message, error.get("type"), error.get("param"), error.get("code")
    return None, None, None, None


def from_exception(deployment: Deployment, exc: BaseException) -> GatewayError:
    """A failure to get an answer at all: timeouts, refused connections, broken responses (from the gateway's own
    client, gateway.upstreams.http1, or LiteLLM's path, which raises the same kinds)."""
    if isinstance(exc, asyncio.TimeoutError):
        return GatewayError(
            504,
            f"The upstream of deployment '{deployment.name}' did not answer in time "
            f"(connect timeout {deployment.connect_timeout:g} s, read timeout {deployment.read_timeout:g} s).",
            type="timeout_error", code="upstream_timeout",
        )
    if isinstance(exc, Unreachable):
        return GatewayError(
            502, f"The upstream of deployment '{deployment.name}' could not be reached.",
            type="upstream_error", code="upstream_unreachable",
        )
    return GatewayError(
        502, f"The upstream of deployment '{deployment.name}' broke off its answer.",
        type="upstream_error", code="upstream_broken",
    )


UPSTREAM_FAILURES = (asyncio.TimeoutError, ConnectionError)
