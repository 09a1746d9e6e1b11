"""Stage: the tenant's and the key's guardrails (gateway.guardrails). The request's text is checked and masked
before anything else reads it (the cache, the router, the upstream); an answer is checked on its way back by the
send this stage puts in front of the client when a rule reads answers. A refused request is a 400
``content_policy_violation`` that names the rule, never the text it found."""

from __future__ import annotations

import asyncio
from typing import Callable

from gateway.errors import GatewayError
from gateway.guardrails.answer import OutputGuard
from gateway.guardrails.models import GuardUnavailable, decide, flagged_categories, request_text
from gateway.guardrails.policy import Guardrail, Verdict, inspect_request, output_rules
from gateway.pipeline.internal import GUARD_CALL, InternalCalls
from gateway.pipeline.context import RequestContext
from gateway.pipeline.tokens import prompt_tokens


OFF_THE_LOOP_BYTES = 256 * 1024


class CheckGuardrails:
    """Stage: the request's rules in order, the guard models' after the others (400 / 503)."""

    def __init__(self, calls: Callable[[], InternalCalls | None] = lambda: None) -> None:
        self.calls = calls  # the gateway's requests to itself, for guard models

    async def __call__(self, ctx: RequestContext) -> None:
        rules = ctx.tenant.guardrails + ctx.api_key.guardrails if ctx.api_key.guardrails else ctx.tenant.guardrails
        if ctx.profile is not None and ctx.profile.guardrails:  # a router alias's request: its profile's and its own
            rules += ctx.profile.guardrails
        if not rules or ctx.scope.get(GUARD_CALL):
            return
        verdict = ctx.guard = Verdict()
        if ctx.body_size > OFF_THE_LOOP_BYTES:  # a long prompt's scan (120 ms at 100,000 words) lets others on
            await asyncio.to_thread(inspect_request, rules, ctx.body, verdict, lambda: prompt_tokens(ctx.body))
        else:
            inspect_request(rules, ctx.body, verdict, lambda: prompt_tokens(ctx.body))
        if verdict.refused is None:
            for rule in rules:
                if rule.guard_model is not None and rule.reads_input and verdict.refused is None:
                    await self._ask_guard(ctx, rule, verdict)
        if verdict.refused is not None:
            raise GatewayError(400, verdict.reason, code="content_policy_violation")
        _watch_answers(ctx, rules, verdict)

    async def _ask_guard(self, ctx: RequestContext, rule: Guardrail, verdict: Verdict) -> None:
        calls = self.calls()
        text = request_text(ctx.body)
        try:
            if calls is None:
                raise GuardUnavailable("this gateway cannot call its own models")
            status, answer = await asyncio.wait_for(
                calls.guard(ctx.tenant, ctx.api_key, rule.guard_model, rule.guard_kind, text), rule.timeout)
            if status != 200:
                raise GuardUnavailable(f"it answered {status}")
            categories = flagged_categories(rule.guard_kind, answer)
        except (GuardUnavailable, asyncio.TimeoutError, GatewayError, ValueError):
            verdict.add(rule, "input", "unavailable")  # open: let through, and recorded as such
            if rule.fail_closed:
                verdict.reason = f"The guard model of the guardrail '{rule.name}' cannot judge this request now."
                raise GatewayError(503, verdict.reason, type="server_error", code="guard_unavailable") from None
            return
        action = decide(rule, categories)
        if action is None:
            return
        verdict.add(rule, "input", action)
        if action == "block":
            verdict.refused = rule
            verdict.reason = rule.refusal(f"the guard model found {', '.join(sorted(categories))[:200]}")


def _watch_answers(ctx: RequestContext, rules: tuple, verdict: Verdict) -> None:
    watching = output_rules(rules)
    if watching:
        ctx.send = OutputGuard(ctx, ctx.send, watching, verdict)
    # An upstream given another API's request as it came would see what was masked, and answer in a form these
    # rules do not read: such a request is translated instead.
    verdict.translate = bool(watching) or any(fired["action"] == "redact" for fired in verdict.fired)
