"""Stage: which model answers. A router alias ("auto") is classified and routed by the tenant's profile; a named
model is kept, and both are checked against the model's context window.

For an alias the order of decisions is: the request's complexity (classifier), the profile's model for it (the
economy or over-budget column once the tenant's spend has passed the soft limit or the budget), a model whose
context window fits the request, and a model that is serving. A small model chosen this way may be cascaded:
if its answer is unsure, the next model up the profile's ladder answers instead.
"""

from __future__ import annotations

import orjson

from gateway.config.types import GatewayConfig, Model, Profile, Tenant
from gateway.errors import GatewayError, bad_request
from gateway.pipeline.tokens import count_large_prompt, counted_prompt_tokens
from gateway.pipeline.context import RequestContext
from gateway.routing.classifier import Decision
from gateway.routing.share import ShareKeeper
from gateway.stores.limits import Limiter


class RouteRequest:
    def __init__(self, limiter: Limiter | None, shares: ShareKeeper | None = None) -> None:
        self.limiter = limiter
        self.shares = shares

    async def __call__(self, ctx: RequestContext) -> None:
        if ctx.cache_entry is not None:
            return  # answered from the cache: no model is asked
        profile = ctx.profile
        if profile is None:
            if ctx.model.context_window is not None and _may_exceed(ctx, ctx.model.context_window):
                await count_large_prompt(ctx)
                _check_fits(ctx, ctx.model)
            return
        config = ctx.config
        classifier = config.router.classifier
        decision = classifier.classify(ctx.body)
        complexity = decision.complexity.value
        if profile.target_large_share is not None and self.shares is not None:  # thresholds that follow traffic
            kept = self.shares.complexity(profile.share_scope, decision.score)
            complexity = kept.value if kept is not None else complexity
        ctx.complexity, ctx.route_score = complexity, round(decision.score, 4)
        ctx.route_signals = decision.explain(classifier.weights, neutral=classifier.neutral)

        table, column = profile.models, ""
        spent = self.limiter.budget_share(ctx.tenant) if self.limiter is not None else None
        if spent is not None and spent >= 1.0 and profile.over_budget:
            table, column = profile.over_budget, "over_budget:"
        elif spent is not None and spent >= config.router.soft_budget_limit and profile.economy:
            table, column = profile.economy, "economy:"
        name = table[complexity]
        rule = f"{profile.name}:{column}{complexity}"

        model = config.models[name]
        if _may_exceed(ctx, model.context_window):
            await count_large_prompt(ctx)
            fitting = _fitting_model(ctx, config, ctx.tenant, profile, model)
            if fitting is not model:
                model, rule = fitting, f"{rule}:long_context"
        if not model.serving:
            model = _serving_neighbour(config, profile, model)
            rule += ":unavailable"
        ctx.model = model
        if profile.target_large_share is not None and self.shares is not None:
            ctx.on_finish(_observer(self.shares, profile, decision.score, model.size != "small"))
        ctx.adapter = ctx.tenant.default_adapters.get(model.name) if ctx.tenant.default_adapters else None
        ctx.routing_rule = f"{rule}->{model.name}"
        if profile.cascade and model.size == "small" and (ctx.endpoint.is_chat or ctx.endpoint.route == "completions"):
            ctx.cascade_to = _next_up(config, profile, model)
        if model.size == "small" and config.router.keep_examples:
            ctx.route_example = _example(decision)


def _observer(shares: ShareKeeper, profile: Profile, score: float, went_large: bool):
    """At the request's end: its score joins the scope's window if it was answered (a request refused by limits,
    budget or the upstream is not routed traffic, and would skew the share)."""

    async def observe(ctx: RequestContext) -> None:
        if 0 < ctx.status < 400:
            shares.observe(profile.share_scope, score, profile.target_large_share, profile.large_from, went_large)

    return observe


def _example(decision: Decision) -> str:
    """What the ledger keeps of a request a small model answers, to learn from: its words hashed as the learned
    scorer reads them (not its text), and its signals."""
    return orjson.dumps({
        "words": sorted(decision.features()),
        "signals": {name: round(value, 3) for name, value in decision.signals.items() if value and name != "learned"},
    }).decode()


def _may_exceed(ctx: RequestContext, window: int | None) -> bool:
    """Whether the request could be longer than ``window`` tokens; cheap, so most requests skip counting."""
    if window is None:
        return False
    return ctx.body_size + _completion_limit(ctx.body) > window  # a token is at least one byte of the body


def _needed_tokens(ctx: RequestContext) -> int:
    return counted_prompt_tokens(ctx) + _completion_limit(ctx.body)


def _completion_limit(body: dict) -> int:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return limit if isinstance(limit, int) and limit > 0 else 0


def _check_fits(ctx: RequestContext, model: Model) -> None:
    needed = _needed_tokens(ctx)
    if needed > model.context_window:
        raise _too_long(model.name, model.context_window, needed, ctx)


def _too_long(name: str, window: int, needed: int, ctx: RequestContext) -> GatewayError:
    asked = _completion_limit(ctx.body)
    detail = (f"{needed - asked} in the messages, {asked} in the completion" if asked
              else f"{needed} in the messages")
    return bad_request(
        f"This model's maximum context length is {window} tokens. However, you requested {needed} tokens "
        f"({detail}). Please reduce the length of the messages or completion.",
        param="messages", code="context_length_exceeded")


def _fitting_model(ctx: RequestContext, config: GatewayConfig, tenant: Tenant, profile: Profile,
                   chosen: Model) -> Model:
    """The chosen model if the request fits it; else the profile's long-context model, a larger model of the
    ladder, or the cheapest allowed chat model whose window fits; else a 400."""
    needed = _needed_tokens(ctx)
    if chosen.context_window is None or needed <= chosen.context_window:
        return chosen
    candidates = [profile.long_context] if profile.long_context else []
    candidates += profile.ladder[profile.ladder.index(chosen.name) + 1:] if chosen.name in profile.ladder else []
    candidates += sorted((n for n in tenant.allowed_models if n in config.models
                          and config.models[n].type == "chat" and config.models[n].context_window),
                         key=lambda n: config.models[n].pricing.input_per_million)
    for name in candidates:
        model = config.models[name]
        if model.serving and (model.context_window is None or needed <= model.context_window):
            return model
    largest = max((config.models[n].context_window or 0 for n in candidates), default=chosen.context_window)
    raise _too_long(f"{ctx.model_requested}", max(largest, chosen.context_window), needed, ctx)


def _serving_neighbour(config: GatewayConfig, profile: Profile, model: Model) -> Model:
    ladder = list(profile.ladder)
    index = ladder.index(model.name) if model.name in ladder else 0
    for name in [*ladder[index + 1:], *reversed(ladder[:index])]:
        if config.models[name].serving:
            return config.models[name]
    raise GatewayError(503, f"No model of the routing profile `{profile.name}` is available right now.",
                       type="upstream_error", code="model_unavailable")


def _next_up(config: GatewayConfig, profile: Profile, model: Model) -> Model | None:
    ladder = profile.ladder
    if model.name not in ladder:
        return None
    for name in ladder[ladder.index(model.name) + 1:]:
        candidate = config.models[name]
        if candidate.serving and (candidate.size or "large") != "small":
            return candidate
    return None
