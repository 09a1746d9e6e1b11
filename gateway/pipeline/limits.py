"""Stage: the tenant's limits and budget. Reserves before the upstream call, settles to real usage after.

A request of a tenant far from its limits is admitted from the worker's lease on them (``Limiter.admit_leased``),
without Redis; the others by Redis, one by one.

Refusals are OpenAI's 429s with Retry-After; every answer that was counted carries OpenAI's
x-ratelimit-{limit,remaining,reset}-{requests,tokens} headers (per-minute windows).

On a quiet worker (fewer than QUIET_BELOW requests in flight), a tenant that was under half of every limit a moment
ago (``Limiter.clear_of_limits``) does not wait for Redis: its request goes upstream while its admission is on the
way, and the answer waits for the admission before its first byte (``AdmissionUnderWay``). The count is as exact as
ever (the same script admits every request); what changes is that a refusal nobody expected (other replicas used
the other half of a limit within that moment) stops an upstream call already started instead of preventing it.
"""

from __future__ import annotations

import asyncio
import time

from gateway.errors import GatewayError
from gateway.observability import metrics
from gateway.pipeline.tokens import reserved_prompt_tokens
from gateway.tokens import completion_reservation
from gateway.pipeline.context import RequestContext
from gateway.pipeline.runner import Load
from gateway.pipeline.users import end_user
from gateway.stores.limits import NANO, Admission, Limiter


QUIET_BELOW = 4  # requests in flight in the worker under which a request need not wait for its admission


class EnforceLimits:
    def __init__(self, limiter: Limiter, refuse_when_unavailable: bool, load: Load | None = None) -> None:
        self.limiter = limiter
        self.refuse_when_unavailable = refuse_when_unavailable
        self.load = load or Load()

    async def __call__(self, ctx: RequestContext) -> None:
        body = ctx.body
        prompt = reserved_prompt_tokens(ctx)
        completion = 0 if ctx.endpoint.model_type != "chat" else completion_reservation(
            body, ctx.tenant.limits.completion_reservation)
        cost_nano = int(ctx.model.pricing.cost(prompt, completion) * NANO)
        if ctx.tenant.provider_keys and _paid_by_tenant(ctx):
            cost_nano = 0  # the provider bills the tenant: nothing to reserve from its budget (settled to the truth)
        if ctx.cache_entry is not None:  # a cached answer counts as a request, and costs no tokens and no budget
            prompt = completion = cost_nano = 0
        elif ctx.cascade_to is not None:  # the worst case pays for both answers
            cost_nano += int(ctx.cascade_to.pricing.cost(prompt, completion) * NANO)
            prompt, completion = prompt * 2, completion * 2
        now = time.time()
        user = end_user(ctx) if ctx.tenant.end_users is not None else None
        if user is None and ctx.tenant.end_users is not None and ctx.tenant.end_users.required:
            raise GatewayError(400, "This tenant's requests must name their end user: the body's 'user' (or "
                                    "X-OpenWebUI-User-Id).", param="user", code="end_user_required")
        plan = self.limiter.plan(ctx.tenant, ctx.api_key, now, ctx.config.request_timeout, user)
        tokens = prompt + completion
        ctx.reserved_tokens = tokens
        ctx.reserved_cost_nano = cost_nano
        admission = self.limiter.admit_leased(plan, tokens, cost_nano, now)
        if admission is None:
            # Under load, the admission's round trip is shared with other requests' (one write, one read) and
            # hidden by their queueing, and not waiting for it would cost CPU; on a quiet worker it is the request's
            # own latency.
            if (self.load.in_flight < QUIET_BELOW and ctx.cache_entry is None
                    and self.limiter.clear_of_limits(plan, tokens, cost_nano, now)):
                AdmissionUnderWay(self, ctx, plan, tokens, cost_nano, now)
                return
            admission = await self.limiter.admit(plan, ctx.request_id, tokens, cost_nano, now)
        refusal = self.outcome(ctx, admission, now)
        if refusal is not None:
            raise refusal

        def settle(ctx: RequestContext) -> None:
            self.limiter.settle(admission, ctx.request_id, _actual(ctx))

        ctx.on_finish(settle)

    def outcome(self, ctx: RequestContext, admission: Admission, now: float) -> GatewayError | None:
        """What an admission means for its request: the refusal to answer with, or None (the rate headers added to
        the answer's, or the request marked as not counted while Redis is away)."""
        if admission.degraded:
            if self.refuse_when_unavailable:
                return GatewayError(503, "The gateway cannot check this tenant's limits right now; try again shortly.",
                                    type="server_error", code="limits_unavailable", headers={"retry-after": "1"})
            ctx.limits_degraded = True
            return None
        ctx.response_headers += _rate_headers(admission)
        if not admission.admitted:
            metrics.LIMIT_REFUSALS.labels(ctx.tenant.id, admission.refused.name).inc()
            return _refusal(admission, now, ctx)
        return None


class AdmissionUnderWay:
    """A request sent upstream while its admission is on its way to Redis.

    The answer's first message waits for the admission (and gets its rate headers); a refusal heard while the
    upstream is still being asked cancels the request's task, which the pipeline answers with the refusal
    (``ctx.abort_with``); the settle at the end waits for the admission too. Nothing awaits Redis meanwhile: the
    admission's reply calls ``_answered``.
    """

    __slots__ = ("stage", "ctx", "now", "task", "send_on", "admission", "refusal", "rate_headers", "known",
                 "answering")

    def __init__(self, stage: EnforceLimits, ctx: RequestContext, plan, tokens: int, cost_nano: int,
                 now: float) -> None:
        self.stage, self.ctx, self.now = stage, ctx, now
        self.task = asyncio.current_task()
        self.send_on = ctx.send
        self.admission: Admission | None = None
        self.refusal: GatewayError | None = None
        self.rate_headers: list = []
        self.known: asyncio.Future | None = None  # made only when someone must wait for the admission
        self.answering = False  # the answer's first message is being sent: too late to cancel
        stage.limiter.admit_started(plan, ctx.request_id, tokens, cost_nano, now, self._answered)
        ctx.send = self.send  # only once the admission is on its way: nothing may wait for one never sent
        ctx.on_finish(self.settle)

    def _answered(self, admission: Admission) -> None:
        ctx = self.ctx
        self.admission = admission
        before = len(ctx.response_headers)
        self.refusal = self.stage.outcome(ctx, admission, self.now)
        self.rate_headers = ctx.response_headers[before:]
        if self.known is not None and not self.known.done():
            self.known.set_result(None)
        if self.refusal is not None and not self.answering and ctx.walking and not ctx.responded:
            ctx.send = self.send_on
            ctx.abort_with = self.refusal
            self.task.cancel()

    async def _admitted(self) -> Admission:
        if self.admission is None:
            if self.known is None:
                self.known = asyncio.get_running_loop().create_future()
            await self.known
        return self.admission

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start" and not self.answering:
            self.answering = True
            await self._admitted()
            self.ctx.send = self.send_on
            if self.refusal is not None and message["status"] < 400:
                raise self.refusal  # the pipeline answers with it
            rate_headers = self.rate_headers
            headers = message.get("headers") or []
            if rate_headers and rate_headers[0] not in headers:  # sent before Redis answered
                message = {**message, "headers": [*headers, *rate_headers]}
        await self.send_on(message)

    async def settle(self, ctx: RequestContext) -> None:
        self.stage.limiter.settle(await self._admitted(), ctx.request_id, _actual(ctx))


def _paid_by_tenant(ctx: RequestContext) -> bool:
    """Whether every deployment that may answer is reached with one of the tenant's own provider keys."""
    serving = ctx.model.serving
    return bool(serving) and all(d.provider in ctx.tenant.provider_keys for d in serving)


def _actual(ctx: RequestContext) -> dict[str, int]:
    """What the request really used; an answer that never came costs nothing, one of unknown size its reservation."""
    if ctx.prompt_tokens or ctx.completion_tokens:
        return {"tokens": ctx.prompt_tokens + ctx.completion_tokens,
                "budget": int((ctx.cost_usd - ctx.tenant_paid_usd) * NANO)}
    if ctx.status and ctx.status < 400:
        return {"tokens": ctx.reserved_tokens, "budget": ctx.reserved_cost_nano}
    return {"tokens": 0, "budget": 0}


def _refusal(admission: Admission, now: float, ctx: RequestContext) -> GatewayError:
    check, amount = admission.refused, admission.refused_amount
    index = admission.checks.index(check)
    used = admission.used(index)
    reset_at = admission.reset_at(index, now)
    wait = max(1, int(reset_at - now + 0.999)) if reset_at is not None else None
    headers = {"retry-after": str(wait)} if wait is not None else {}
    if check.kind == "budget":
        whose = " of this end user" if check.name.endswith("end user") else ""
        return GatewayError(
            429, f"You exceeded your current quota: this request could cost up to {usd(amount / NANO)} "
                 f"and {usd(used / NANO)} of the {usd(check.limit / NANO)} monthly budget{whose} is spent or "
                 f"reserved.", type="insufficient_quota", code="insufficient_quota", headers=headers)
    if check.limit == 0 and check.kind in ("requests", "concurrency"):  # an admin's way of holding a tenant back
        return GatewayError(429, f"No request can pass: the limit on {check.name} is 0.", type="requests",
                            code="rate_limit_exceeded")
    if check.kind == "concurrency":
        return GatewayError(
            429, f"Too many concurrent requests: the limit is {check.limit} at once. Retry when one finishes.",
            type="requests", code="concurrency_limit_exceeded", headers={"retry-after": "1"})
    if check.kind == "tokens" and amount > (check.limit or 0):
        return GatewayError(
            429, f"Request too large for {check.name}: it may use {amount} tokens and the limit is "
                 f"{check.limit}. Send a shorter prompt or a lower max_tokens.",
            type="tokens", code="rate_limit_exceeded", headers=headers)
    return GatewayError(
        429, f"Rate limit reached on {check.name}: limit {check.limit}, used {used}, requested {amount}."
             + (f" Please try again in {wait}s." if wait is not None else ""),
        type=check.kind, code="rate_limit_exceeded", headers=headers)


def usd(value: float) -> str:
    """Dollars with every digit that matters: $12.50, $0.000345, $0."""
    if value == 0:
        return "$0"
    if value >= 0.01:
        return f"${value:,.2f}"
    if value < 1e-9:  # a budget of 1e-320 is not "$0."
        return f"${value:.3g}"
    return "$" + f"{value:.9f}".rstrip("0")


def _rate_headers(admission: Admission) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit headers for the tenant's per-minute windows: limit, what is left, and when the window
    is empty again (refused: when there is room for this request)."""
    headers = []
    for index, limit_header, remaining, reset, limit in admission.plan.header_checks:
        headers += [limit_header, (remaining, b"%d" % max(0, limit - admission.used(index))),
                    (reset, _duration(admission.reset_ms(index)))]
    return headers


_WHOLE_SECONDS: dict[int, bytes] = {}  # a window's reset is at most a few minutes away: a few hundred texts


def _duration(milliseconds: int) -> bytes:
    """OpenAI's reset format: 20ms, 1s, 6m0s."""
    if milliseconds < 1000:
        return b"%dms" % max(0, milliseconds)
    whole = (milliseconds + 500) // 1000
    text = _WHOLE_SECONDS.get(whole)
    if text is None:
        minutes, rest = divmod(whole, 60)
        text = b"%dm%ds" % (minutes, rest) if minutes else b"%ds" % rest
        if len(_WHOLE_SECONDS) < 4096:
            _WHOLE_SECONDS[whole] = text
    return text
