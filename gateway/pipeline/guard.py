"""Stage: the tenant's and the key's guardrails (gateway.guardrails). The request's text is checked and masked
before anything else reads it (the cache, the router, the upstream); an answer is checked on its way back by the
send this stage puts in front of the client when a rule reads answers. A refused request is a 400
``content_policy_violation`` that names the rule, never the text it found."""

from __future__ import annotations

import asyncio
from typing import Callable

from gateway.errors import GatewayError
from gateway.pipeline.guard_answer import OutputGuard
from gateway.guardrails.models import GuardUnavailable, decide, flagged_categories, request_text
from gateway.guardrails.policy import Guardrail, Verdict, inspect_request, output_judges, output_rules
from gateway.pipeline.internal import GUARD_CALL, InternalCalls
from gateway.pipeline.context import RequestContext
from gateway.pipeline.tokens import OFF_THE_LOOP_BYTES
from gateway.tokens import prompt_tokens


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
                    if await self._judge(ctx, rule, verdict, None) == "unavailable" and rule.fail_closed:
                        verdict.reason = f"The guard model of the guardrail '{rule.name}' cannot judge this " \
                                         "request now."
                        raise GatewayError(503, verdict.reason, type="server_error", code="guard_unavailable")
        if verdict.refused is not None:
            raise GatewayError(400, verdict.reason, code="content_policy_violation")
        self._watch_answers(ctx, rules, verdict)

    async def _judge(self, ctx: RequestContext, rule: Guardrail, verdict: Verdict, answer: str | None) -> str | None:
        """The guard model's action on the request (``answer`` None) or on an answer to it: block, flag, None, or
        "unavailable" (it failed, or took longer than the rule allows); recorded in ``verdict``."""
        direction = "input" if answer is None else "output"
        calls = self.calls()
        try:
            if calls is None:
                raise GuardUnavailable("this gateway cannot call its own models")
            status, said = await asyncio.wait_for(calls.guard(
                ctx.tenant, ctx.api_key, rule.guard_model, rule.guard_kind, request_text(ctx.body), answer),
                rule.timeout)
            if status != 200:
                raise GuardUnavailable(f"it answered {status}")
            categories = flagged_categories(rule.guard_kind, said)
        except (GuardUnavailable, asyncio.TimeoutError, GatewayError, ValueError):
            verdict.add(rule, direction, "unavailable")  # open: let through, and recorded as such
            return "unavailable"
        action = decide(rule, categories)
        if action is None:
            return None
        verdict.add(rule, direction, action)
        if action == "block":
            if answer is None:
                verdict.refused = rule
            verdict.reason = rule.refusal(f"the guard model found {', '.join(sorted(categories))[:200]}"
                                          + ("" if answer is None else " in the answer"))
        return action

    def _watch_answers(self, ctx: RequestContext, rules: tuple, verdict: Verdict) -> None:
        watching, judges = output_rules(rules), output_judges(rules)
        if watching or judges:
            async def judge(answer: str) -> bool:
                """Whether the guard models that read answers block this one (a closed one that fails blocks)."""
                for rule in judges:
                    action = await self._judge(ctx, rule, verdict, answer)
                    if action == "block" or (action == "unavailable" and rule.fail_closed):
                        if action == "unavailable":
                            verdict.reason = f"The guard model of the guardrail '{rule.name}' could not judge the " \
                                             "answer."
                        return True
                return False

            ctx.send = OutputGuard(ctx, ctx.send, watching, verdict, judge if judges else None)
        # An upstream given another API's request as it came would see what was masked, and answer in a form these
        # rules do not read: such a request is translated instead.
        verdict.translate = bool(watching or judges) or any(fired["action"] == "redact" for fired in verdict.fired)
