"""Stage: the tenant's own system prompt, put first in every chat request of that tenant.

It goes before whatever the client sent, its own system message included, which stays as it is: the tenant's
instructions come first and the client's follow.
"""

from __future__ import annotations

from gateway.pipeline.context import RequestContext


async def apply_system_prompt(ctx: RequestContext) -> None:
    prompt = ctx.tenant.system_prompt
    if prompt and ctx.endpoint.is_chat:
        ctx.body["messages"] = [{"role": "system", "content": prompt}, *ctx.body["messages"]]
