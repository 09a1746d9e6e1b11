"""After every request: one ledger row, one structured log line and the metrics.

Never a key; prompt text only when configured.
"""

from __future__ import annotations

import orjson

from gateway.asgi import LOGGED
from gateway.observability import metrics
from gateway.observability.logs import log_request
from gateway.pipeline.context import RequestContext
from gateway.pipeline.users import end_user as read_end_user
from gateway.stores.ledger import Ledger


def record(ctx: RequestContext, log_prompts: bool, ledger: Ledger | None) -> None:
    ctx.scope[LOGGED] = True
    elapsed = ctx.elapsed()
    if not ctx.overhead_seconds:
        ctx.overhead_seconds = max(0.0, elapsed - ctx.upstream_seconds)
    tenant = ctx.tenant.id if ctx.tenant else None
    deployment = ctx.deployment
    failed = ctx.failed_attempts()
    upstream_model = (ctx.upstream_model or deployment.upstream_model) if deployment else None
    node = deployment.node if deployment else None
    adapter = ctx.adapter.name if ctx.adapter is not None and node is not None and not ctx.adapter_bypassed else None
    # The answer came with the tenant's own provider key: the provider bills the tenant.
    paid_by = "tenant" if any(a.get("paid_by") and not a.get("error") for a in ctx.attempts) else None
    requested = ctx.model_requested
    if requested is not None and (len(requested) > 256 or "\x00" in requested):  # a client may send anything
        requested = requested[:256].replace("\x00", "\ufffd") + ("..." if len(requested) > 256 else "")
    end_user = read_end_user(ctx)
    guard = ctx.guard
    refusal = guard.reason if guard is not None else None
    fired = orjson.dumps(guard.fired).decode() if guard is not None and guard.fired else None
    if ledger is not None:
        ledger.record((
            ctx.request_id, ctx.started_at, tenant, ctx.api_key.name if ctx.api_key else None, ctx.endpoint.route,
            requested, ctx.model.name if ctx.model else None, deployment.name if deployment else None,
            upstream_model, ctx.routing_rule, ctx.complexity, ctx.prompt_tokens,
            ctx.completion_tokens, ctx.cost_usd, elapsed * 1000, ctx.upstream_seconds * 1000,
            ctx.overhead_seconds * 1000, ctx.cache_hit, ctx.cascaded if ctx.profile is not None else None,
            ctx.confidence, failed, ctx.stream, ctx.status, ctx.error_type, ctx.route_score,
            orjson.dumps(ctx.attempts).decode() if len(ctx.attempts) > 1 else None,
            node, adapter, paid_by, ctx.route_example, ctx.retrieval, refusal, fired, end_user,
        ))
    route = ctx.endpoint.route
    line = {
        "request_id": ctx.request_id,
        "tenant": tenant,
        "key": ctx.api_key.name if ctx.api_key else None,
        "route": route,
        "model_requested": requested,
        "model": ctx.model.name if ctx.model else None,
        "deployment": deployment.name if deployment else None,
        "upstream_model": upstream_model,
        "stream": ctx.stream,
        "status": ctx.status,
        "error_type": ctx.error_type,
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": ctx.completion_tokens,
        "cost_usd": round(ctx.cost_usd, 9),
        "latency_ms": round(elapsed * 1000, 2),
        "upstream_ms": round(ctx.upstream_seconds * 1000, 2),
        "overhead_ms": round(ctx.overhead_seconds * 1000, 3),
    }
    if ctx.routing_rule is not None:
        line.update(complexity=ctx.complexity, route_score=ctx.route_score, routing_rule=ctx.routing_rule,
                    route_signals=ctx.route_signals, cascaded=ctx.cascaded, confidence=ctx.confidence)
        metrics.ROUTED.labels(ctx.complexity, ctx.model.name).inc()
    if end_user is not None:
        line["end_user"] = end_user
    if node is not None:
        line["node"] = node
        line["adapter"] = adapter
    if len(ctx.attempts) > 1:
        line["attempts"] = ctx.attempts
    if ctx.cache_hit:
        line["cache_hit"] = True
    if paid_by:
        line["paid_by"] = paid_by
    if ctx.client_disconnected:
        line["client_disconnected"] = True
    if ctx.limits_degraded:
        line["limits_degraded"] = True
    if fired is not None:
        line["guardrails"] = guard.fired
        if refusal is not None:
            line["refusal_reason"] = refusal
        for rule in guard.fired:
            metrics.GUARDRAIL_ACTIONS.labels(tenant, rule["rule"], rule["action"]).inc()
    if log_prompts and ctx.body:
        line["prompt"] = ctx.body.get("messages") or ctx.body.get("prompt") or ctx.body.get("input")
    log_request(line)

    model_label = ctx.model.name if ctx.model else "-"
    tenant_label = tenant or "-"
    metrics.requests_by(tenant_label, model_label, route, str(ctx.status)).inc()
    metrics.latency_by(route).observe(elapsed)
    metrics.OVERHEAD.observe(ctx.overhead_seconds)
    if ctx.prompt_tokens:
        metrics.tokens_by(tenant_label, model_label, "prompt").inc(ctx.prompt_tokens)
    if ctx.completion_tokens:
        metrics.tokens_by(tenant_label, model_label, "completion").inc(ctx.completion_tokens)
    if ctx.cost_usd:
        metrics.cost_by(tenant_label, model_label).inc(ctx.cost_usd)
