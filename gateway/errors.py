"""OpenAI-shaped errors.

Every error a client sees has the body ``{"error": {"message", "type", "param", "code"}}`` and a status code the
OpenAI SDKs map to the right exception class (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
413/422 as bad requests, 429 RateLimitError, 5xx InternalServerError).
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """An error that ends a request with an OpenAI-shaped response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def missing_api_key() -> GatewayError:
    return GatewayError(
        401,
        "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' (or in an 'api-key' header).",
        code="missing_api_key",
    )


def malformed_authorization() -> GatewayError:
    return GatewayError(
        401,
        "The Authorization header is not in the form 'Bearer YOUR_KEY': send 'Authorization: Bearer ' followed by "
        "the key (or the key alone in an 'api-key' header).",
        code="invalid_authorization_header",
    )


def bearer_without_key() -> GatewayError:
    return GatewayError(
        401,
        "The Authorization header says 'Bearer' but no key follows it (is the variable that should hold the key "
        "empty?).",
        code="missing_api_key",
    )


def invalid_api_key() -> GatewayError:
    # Never echo the key, not even a prefix: the message is the same for every wrong key.
    return GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")


def model_not_found(model: str) -> GatewayError:
    if len(model) > 256:  # never echo a megabyte back
        model = model[:256] + "..."
    return GatewayError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )
