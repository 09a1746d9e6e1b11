"""Stage: the tenant's and the key's guardrails (gateway.guardrails). The request's text is checked and masked
before anything else reads it (the cache, the router, the upstream); an answer is checked on its way back by the
send this stage puts in front of the client when a rule reads answers. A refused request is a 400
``content_policy_violation`` that names the rule, never the text it found."""

from __future__ import annotations

import asyncio

from gateway.errors import GatewayError
from gateway.guardrails.answer import OutputGuard
from gateway.guardrails.policy import Verdict, inspect_request, output_rules
from gateway.pipeline.context import RequestContext
from gateway.pipeline.tokens import prompt_tokens


OFF_THE_LOOP_BYTES = 256 * 1024


async def check_guardrails(ctx: RequestContext) -> None:
    rules = ctx.tenant.guardrails + ctx.api_key.guardrails if ctx.api_key.guardrails else ctx.tenant.guardrails
    if not rules:
        return
    verdict = ctx.guard = Verdict()
    if ctx.body_size > OFF_THE_LOOP_BYTES:  # a long prompt's scan (120 ms at 100,000 words) lets other requests on
        await asyncio.to_thread(inspect_request, rules, ctx.body, verdict, lambda: prompt_tokens(ctx.body))
    else:
        inspect_request(rules, ctx.body, verdict, lambda: prompt_tokens(ctx.body))
    if verdict.refused is not None:
        raise GatewayError(400, verdict.reason, code="content_policy_violation")
    watching = output_rules(rules)
    if watching:
        ctx.send = OutputGuard(ctx, ctx.send, watching, verdict)
    # An upstream given another API's request as it came would see what was masked, and answer in a form these
    # rules do not read: such a request is translated instead.
    verdict.translate = bool(watching) or any(fired["action"] == "redact" for fired in verdict.fired)
