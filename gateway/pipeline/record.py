"""After every request: one structured log line and the metrics. Never a key; prompts only when configured."""

from __future__ import annotations

from gateway.observability import metrics
from gateway.observability.logs import log_request
from gateway.pipeline.context import RequestContext


def record(ctx: RequestContext, log_prompts: bool) -> None:
    elapsed = ctx.elapsed()
    if not ctx.overhead_seconds:
        ctx.overhead_seconds = max(0.0, elapsed - ctx.upstream_seconds)
    tenant = ctx.tenant.id if ctx.tenant else None
    route = ctx.endpoint.route
    line = {
        "request_id": ctx.request_id,
        "tenant": tenant,
        "key": ctx.api_key.name if ctx.api_key else None,
        "route": route,
        "model_requested": ctx.model_requested,
        "model": ctx.model.name if ctx.model else None,
        "deployment": ctx.deployment.name if ctx.deployment else None,
        "upstream_model": ctx.deployment.upstream_model if ctx.deployment else None,
        "stream": ctx.stream,
        "status": ctx.status,
        "error_type": ctx.error_type,
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": ctx.completion_tokens,
        "latency_ms": round(elapsed * 1000, 2),
        "upstream_ms": round(ctx.upstream_seconds * 1000, 2),
        "overhead_ms": round(ctx.overhead_seconds * 1000, 3),
    }
    if ctx.client_disconnected:
        line["client_disconnected"] = True
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
