"""Usage reports: totals, by day and by model, with seed 001's dashboard figures; for one tenant, or (``tenant_id``
None) for all of them, then also by tenant; read from the daily rollups (see ``rollups``), so that they cost the
same at ten million ledger rows as at a thousand. And the recent requests themselves, from the ledger."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import asyncpg

from gateway.config.schema import COMPLEXITIES
from gateway.config.types import GatewayConfig
from gateway.stores.rollups import ROUTING_MEASURES, USAGE_MEASURES, USER_MEASURES, routing_rows, usage_rows, user_rows

# Whole days come from the rollups; the edges of a period that are not whole days (a tenant made at 14:05) from
# the ledger's rows. $1 the tenant, $2 and $3 the whole days [first, end), $4-$7 the two raw ranges.
_RAW = "tenant_id = $1 AND ((created_at >= $4 AND created_at < $5) OR (created_at >= $6 AND created_at < $7))"
_USAGE = f"""
WITH daily AS (
    SELECT tenant_id, day, model, {", ".join(USAGE_MEASURES)} FROM usage_daily
    WHERE tenant_id = $1 AND day >= $2 AND day < $3
    UNION ALL {usage_rows("usage_ledger", _RAW)}
)"""
_ROUTING = f"""
WITH daily AS (
    SELECT tenant_id, day, complexity, model, decided, {", ".join(ROUTING_MEASURES)} FROM routing_daily
    WHERE tenant_id = $1 AND day >= $2 AND day < $3
    UNION ALL {routing_rows("usage_ledger", _RAW)}
)"""
_TOTALS = _USAGE + """
SELECT coalesce(sum(requests), 0)::bigint AS requests, coalesce(sum(answered), 0)::bigint AS answered,
       coalesce(sum(refused_or_failed), 0)::bigint AS refused_or_failed,
       coalesce(sum(limit_refusals), 0)::bigint AS limit_refusals,
       coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
       coalesce(sum(cost_usd), 0) AS cost_usd, coalesce(sum(cache_hits), 0)::bigint AS cache_hits,
       coalesce(sum(cascaded), 0)::bigint AS cascaded,
       coalesce(sum(answered) FILTER (WHERE model = ANY($8::text[])), 0)::bigint AS small_model_answers
FROM daily
"""
_BY_DAY = _USAGE + """
SELECT day, sum(requests)::bigint AS requests, sum(prompt_tokens + completion_tokens)::bigint AS tokens,
       sum(cost_usd) AS cost_usd
FROM daily GROUP BY 1 ORDER BY 1
"""
_BY_MODEL = _USAGE + """
SELECT model, sum(requests)::bigint AS requests, sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens, sum(cost_usd) AS cost_usd
FROM daily WHERE model <> '' GROUP BY 1 ORDER BY 2 DESC
"""
_BY_TENANT = _USAGE + """
SELECT tenant_id, sum(requests)::bigint AS requests, sum(prompt_tokens + completion_tokens)::bigint AS tokens,
       sum(cost_usd) AS cost_usd, sum(limit_refusals)::bigint AS limit_refusals
FROM daily GROUP BY 1 ORDER BY 4 DESC, 2 DESC LIMIT 100
"""
_BY_USER = f"""
WITH daily AS (
    SELECT tenant_id, day, end_user, {", ".join(USER_MEASURES)} FROM user_daily
    WHERE tenant_id = $1 AND day >= $2 AND day < $3
    UNION ALL {user_rows("usage_ledger", _RAW)}
)
SELECT end_user, sum(requests)::bigint AS requests, sum(answered)::bigint AS answered,
       sum(limit_refusals)::bigint AS limit_refusals, sum(prompt_tokens + completion_tokens)::bigint AS tokens,
       sum(cost_usd) AS cost_usd, count(*) OVER () AS users
FROM daily GROUP BY 1 ORDER BY 6 DESC, 2 DESC, 1 LIMIT 100
"""
_RECENT = """
SELECT request_id, created_at, tenant_id, key_name, route, model_requested, model, deployment, status, error_type,
       prompt_tokens, completion_tokens, cost_usd, latency_ms, overhead_ms, stream, cache_hit, complexity,
       routing_rule, cascaded, fallbacks, node, adapter, paid_by, retrieval, refusal_reason, guardrails, end_user
FROM usage_ledger
WHERE tenant_id = $1 AND ($2::text IS NULL OR model = $2) AND ($3::int IS NULL OR status = $3)
  AND ($4::timestamptz IS NULL OR created_at < $4)
ORDER BY created_at DESC LIMIT $5
"""

_ROUTED = _ROUTING + """
SELECT complexity, model, sum(requests)::bigint AS requests, sum(answered)::bigint AS answered,
       sum(cascaded)::bigint AS cascaded, sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens, sum(cost_usd) AS cost_usd,
       sum(confidence_sum) / nullif(sum(confidence_count), 0) AS confidence
FROM daily GROUP BY 1, 2 ORDER BY 1, 3 DESC
"""
_DECIDED = _ROUTING + """
SELECT decided, sum(answered)::bigint AS answered FROM daily GROUP BY 1
"""


async def _fetch(pool: asyncpg.Pool, method: str, query: str, *args):
    async with pool.acquire() as connection:
        return await getattr(connection, method)(query, *args)


def _for(query: str, tenant_id: str | None) -> str:
    """``query`` for one tenant, or for every tenant when ``tenant_id`` is None (then $1 is NULL)."""
    return query if tenant_id is not None else query.replace("tenant_id = $1", "$1::text IS NULL")


def _between(start: dt.datetime, end: dt.datetime) -> tuple:
    """The query arguments $2-$7 of [start, end): the whole days in it, and the raw ranges before and after them."""
    first = start.date() if start.time() == dt.time.min else start.date() + dt.timedelta(days=1)
    last = end.date()  # the day ``end`` falls in: whole only if end is its midnight (then it is not in the period)
    if first >= last:  # less than a whole day: all raw
        return first, first, start, end, end, end
    return first, last, start, midnight(first), midnight(last), end


def midnight(day: dt.date) -> dt.datetime:
    """The start of ``day``, UTC."""
    return dt.datetime.combine(day, dt.time.min, dt.timezone.utc)


def period(start: dt.date | None, end: dt.date | None) -> tuple[dt.datetime, dt.datetime]:
    """[start, end] as whole UTC days; by default the current calendar month (with only ``end``, its month)."""
    today = dt.datetime.now(dt.timezone.utc).date()
    end = end or max(today, start or today)
    start = start or end.replace(day=1)
    finish = midnight(end) + dt.timedelta(days=1) if end < dt.date.max else dt.datetime.max.replace(
        tzinfo=dt.timezone.utc)
    return midnight(start), finish


def last_day(end: dt.datetime) -> str:
    """The last day of a period that ends (exclusively) at ``end``."""
    return (end - dt.timedelta(microseconds=1)).date().isoformat()


async def usage_report(pool: asyncpg.Pool, config: GatewayConfig, tenant_id: str | None, start: dt.datetime,
                       end: dt.datetime) -> dict:
    small = [m.name for m in config.models.values() if m.size == "small"]
    span = _between(start, end)
    queries = [_fetch(pool, "fetchrow", _for(_TOTALS, tenant_id), tenant_id, *span, small),
               _fetch(pool, "fetch", _for(_BY_DAY, tenant_id), tenant_id, *span),
               _fetch(pool, "fetch", _for(_BY_MODEL, tenant_id), tenant_id, *span)]
    if tenant_id is None:
        queries.append(_fetch(pool, "fetch", _for(_BY_TENANT, None), None, *span))
    else:
        queries.append(_fetch(pool, "fetch", _BY_USER, tenant_id, *span))
    totals, by_day, by_model, rest = await asyncio.gather(*queries)  # each on its own connection, at once
    by_tenant, by_user = (rest, None) if tenant_id is None else (None, rest)
    answered = totals["answered"]
    cost = float(totals["cost_usd"])
    report = {
        "object": "usage_report",
        "tenant": tenant_id,
        "start": start.date().isoformat(),
        "end": last_day(end),
        "requests": totals["requests"],
        "answered": answered,
        "refused_or_failed": totals["refused_or_failed"],
        "limit_refusals": totals["limit_refusals"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        "cost_usd": round(cost, 9),
        "small_model_share": round(totals["small_model_answers"] / answered, 4) if answered else None,
        "cascade_rate": round(totals["cascaded"] / answered, 4) if answered else None,
        "cache_hit_rate": round(totals["cache_hits"] / answered, 4) if answered else None,
        "savings": _savings(config, totals["prompt_tokens"], totals["completion_tokens"], cost),
        "by_day": [{"day": r["day"].isoformat(), "requests": r["requests"], "tokens": r["tokens"],
                    "cost_usd": round(float(r["cost_usd"]), 9)} for r in by_day],
        "by_model": [{"model": r["model"], "requests": r["requests"], "prompt_tokens": r["prompt_tokens"],
                      "completion_tokens": r["completion_tokens"], "cost_usd": round(float(r["cost_usd"]), 9)}
                     for r in by_model],
    }
    if by_user is not None:
        report["end_users"] = by_user[0]["users"] if by_user else 0
        report["by_user"] = [{"user": r["end_user"], "requests": r["requests"], "answered": r["answered"],
                              "limit_refusals": r["limit_refusals"], "tokens": r["tokens"],
                              "cost_usd": round(float(r["cost_usd"]), 9)} for r in by_user]
    if by_tenant is not None:
        report["by_tenant"] = [{"tenant": r["tenant_id"] or None, "requests": r["requests"], "tokens": r["tokens"],
                                "cost_usd": round(float(r["cost_usd"]), 9), "limit_refusals": r["limit_refusals"]}
                               for r in by_tenant]
    return report


async def recent_requests(pool: asyncpg.Pool, tenant_id: str | None, model: str | None, status: int | None,
                          before: dt.datetime | None, limit: int) -> list[dict]:
    """The newest ledger rows (never prompt text: the ledger has none), newest first."""
    async with pool.acquire() as connection:
        rows = await connection.fetch(_for(_RECENT, tenant_id), tenant_id, model, status, before, limit)
    return [{**dict(row), "created_at": row["created_at"].isoformat(),
             "cost_usd": None if row["cost_usd"] is None else round(float(row["cost_usd"]), 9),
             "retrieval": _json(row["retrieval"]), "guardrails": _json(row["guardrails"])} for row in rows]


def _json(value):
    """A jsonb column as asyncpg reads it (text) turned back into its value."""
    return json.loads(value) if isinstance(value, str) else value


def _savings(config: GatewayConfig, prompt_tokens: int, completion_tokens: int, cost: float) -> dict | None:
    """What the same tokens would have cost on the reference model, and what was saved against it."""
    reference = config.models.get(config.reference_model) if config.reference_model else None
    if reference is None:
        return None
    everything_on_reference = reference.pricing.cost(prompt_tokens, completion_tokens)
    return {
        "reference_model": reference.name,
        "reference_cost_usd": round(everything_on_reference, 9),
        "saved_usd": round(everything_on_reference - cost, 9),
        "saved_share": round(1 - cost / everything_on_reference, 4) if everything_on_reference else None,
    }


async def routing_report(pool: asyncpg.Pool, config: GatewayConfig, tenant_id: str | None, start: dt.datetime,
                         end: dt.datetime) -> dict:
    """What the router did for a tenant (or all): requests by complexity and by model, cascades, savings. Routed
    requests are the answered ones: a request refused after its score was taken (limits, budget, the upstream)
    keeps its score in the ledger for diagnosis, and is counted apart (``not_answered``)."""
    span = _between(start, end)
    rows, decided = await asyncio.gather(_fetch(pool, "fetch", _for(_ROUTED, tenant_id), tenant_id, *span),
                                         _fetch(pool, "fetch", _for(_DECIDED, tenant_id), tenant_id, *span))
    rows = [{**dict(row), "model": row["model"] or None} for row in rows]
    by_complexity = dict.fromkeys(COMPLEXITIES, 0)
    by_model: dict[str, int] = {}
    requests = answered = cascaded = prompt = completion = 0
    cost = 0.0
    for row in rows:
        by_complexity[row["complexity"]] = by_complexity.get(row["complexity"], 0) + row["answered"]
        if row["model"] is not None and row["answered"]:
            by_model[row["model"]] = by_model.get(row["model"], 0) + row["answered"]
        requests += row["requests"]
        answered += row["answered"]
        cascaded += row["cascaded"]
        prompt += row["prompt_tokens"]
        completion += row["completion_tokens"]
        cost += float(row["cost_usd"])
    return {
        "object": "routing_report",
        "tenant": tenant_id,
        "start": start.date().isoformat(),
        "end": last_day(end),
        "routed_requests": answered,
        "not_answered": requests - answered,
        "by_complexity": by_complexity,
        "by_model": dict(sorted(by_model.items(), key=lambda item: -item[1])),
        "by_complexity_and_model": [
            {"complexity": r["complexity"], "model": r["model"], "requests": r["answered"],
             "not_answered": r["requests"] - r["answered"], "cascaded": r["cascaded"],
             "cost_usd": round(float(r["cost_usd"]), 9),
             "average_confidence": None if r["confidence"] is None else round(float(r["confidence"]), 4)}
            for r in rows],
        "cascade_rate": round(cascaded / answered, 4) if answered else None,
        "large_share": {
            "routed_to_large": _large_share(config, [(r["decided"], r["answered"]) for r in decided]),
            "answered_by_large": _large_share(config, [(r["model"], r["answered"]) for r in rows]),
            "denominators": {
                "routed_to_large": "answered routed requests, by the model the router chose",
                "answered_by_large": "answered routed requests, by the model that answered (after cascades)"},
        },
        "cost_usd": round(cost, 9),
        "savings": _savings(config, prompt, completion, cost),
    }


def _large_share(config: GatewayConfig, counts: list[tuple[str | None, int]]) -> float | None:
    """The share of ``counts`` on models that are not small ones (the router's decision, or the final answer)."""
    total = sum(n for _, n in counts)
    if not total:
        return None
    small = sum(n for name, n in counts if name in config.models and config.models[name].size == "small")
    return round(1 - small / total, 4)
