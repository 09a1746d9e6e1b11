"""The tenant's end user a request is made for: the one its signed token names (it cannot be forged), else the
body's ``user`` (Anthropic's ``metadata.user_id`` and the Responses API's ``safety_identifier`` arrive as it), else
Open WebUI's forwarded user header (ENABLE_FORWARD_USER_INFO_HEADERS); at most 256 characters, no NUL."""

from __future__ import annotations

from gateway.asgi import header
from gateway.pipeline.context import UNREAD_USER, RequestContext
from gateway.pipeline.jwt_auth import JWT_USER

USER_HEADERS = (b"x-openwebui-user-id", b"x-openwebui-user-email")


def end_user(ctx: RequestContext) -> str | None:
    """Read once per request (the limits and the ledger both ask)."""
    user = ctx.end_user
    if user is not UNREAD_USER:
        return user
    user = ctx.scope.get(JWT_USER)
    if user is None and ctx.body:
        user = ctx.body.get("user")
    if not isinstance(user, str) or not user:
        user = None
        for name in USER_HEADERS:
            value = header(ctx.scope, name)
            if value:
                user = value.decode("utf-8", "replace")
                break
    if user is not None:
        user = user[:256].replace("\x00", "\ufffd")
    ctx.end_user = user
    return user
