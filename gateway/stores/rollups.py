"""Daily rollups of the ledger, which the usage and routing reports read instead of the ledger's rows.

Three tables: ``usage_daily`` (per tenant, UTC day and model), ``routing_daily`` (per tenant, day, complexity,
model and the model the router decided on) and ``user_daily`` (per tenant, day and end user, for the rows that
name one). A statement trigger on the ledger adds each insert's rows to them in the same transaction, so they
are exact and current: a row is in the rollups as soon as it is in the ledger, and
a row the ledger skips as a duplicate (a spool replayed twice) is not counted twice. The aggregates are written
once here and used three ways: by the trigger (over the inserted rows), by the migration that fills the rollups
from the rows already there, and by the reports for the part of a period that is not whole days (over raw rows).
"""

from __future__ import annotations

USAGE_MEASURES = ("requests", "answered", "refused_or_failed", "limit_refusals", "prompt_tokens",
                  "completion_tokens", "cost_usd", "cache_hits", "cascaded")
ROUTING_MEASURES = ("requests", "answered", "cascaded", "prompt_tokens", "completion_tokens", "cost_usd",
                    "confidence_sum", "confidence_count")
_DAY = "(created_at AT TIME ZONE 'UTC')::date"


def usage_rows(source: str, where: str = "TRUE") -> str:
    """Rows of ``source`` (the ledger, or a trigger's new rows) summed per tenant, day and model."""
    return f"""
SELECT coalesce(tenant_id, '') AS tenant_id, {_DAY} AS day, coalesce(model, '') AS model,
       count(*) AS requests,
       count(*) FILTER (WHERE status < 400) AS answered,
       count(*) FILTER (WHERE status >= 400) AS refused_or_failed,
       count(*) FILTER (WHERE status = 429) AS limit_refusals,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       coalesce(sum(cost_usd), 0) AS cost_usd,
       count(*) FILTER (WHERE cache_hit) AS cache_hits,
       count(*) FILTER (WHERE cascaded) AS cascaded
FROM {source} WHERE {where}
GROUP BY 1, 2, 3"""


def routing_rows(source: str, where: str = "TRUE") -> str:
    """Routed rows of ``source`` summed per tenant, day, complexity, model and decided model."""
    return f"""
SELECT coalesce(tenant_id, '') AS tenant_id, {_DAY} AS day, complexity, coalesce(model, '') AS model,
       coalesce(split_part(routing_rule, '->', 2), '') AS decided,
       count(*) AS requests,
       count(*) FILTER (WHERE status < 400) AS answered,
       count(*) FILTER (WHERE cascaded) AS cascaded,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       coalesce(sum(cost_usd), 0) AS cost_usd,
       coalesce(sum(confidence), 0) AS confidence_sum,
       count(confidence) AS confidence_count
FROM {source} WHERE complexity IS NOT NULL AND ({where})
GROUP BY 1, 2, 3, 4, 5"""


USER_MEASURES = ("requests", "answered", "limit_refusals", "prompt_tokens", "completion_tokens", "cost_usd")


def user_rows(source: str, where: str = "TRUE") -> str:
    """Rows of ``source`` that name an end user, summed per tenant, day and end user."""
    return f"""
SELECT coalesce(tenant_id, '') AS tenant_id, {_DAY} AS day, end_user,
       count(*) AS requests,
       count(*) FILTER (WHERE status < 400) AS answered,
       count(*) FILTER (WHERE status = 429) AS limit_refusals,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       coalesce(sum(cost_usd), 0) AS cost_usd
FROM {source} WHERE end_user IS NOT NULL AND ({where})
GROUP BY 1, 2, 3"""


def _add(table: str, keys: tuple[str, ...], measures: tuple[str, ...], rows: str) -> str:
    """Upsert ``rows`` into ``table``, adding to what is there. In key order, so that concurrent writers take the
    rows' locks in the same order (no deadlock between two gateways' batches)."""
    sums = ", ".join(f"{m} = {table}.{m} + excluded.{m}" for m in measures)
    return (f"INSERT INTO {table} ({', '.join(keys + measures)}) SELECT * FROM ({rows}) AS added "
            f"ORDER BY {', '.join(keys)} ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sums}")


def add_usage(source: str) -> str:
    return _add("usage_daily", ("tenant_id", "day", "model"), USAGE_MEASURES, usage_rows(source))


def add_users(source: str) -> str:
    return _add("user_daily", ("tenant_id", "day", "end_user"), USER_MEASURES, user_rows(source))


def add_routing(source: str) -> str:
    return _add("routing_daily", ("tenant_id", "day", "complexity", "model", "decided"), ROUTING_MEASURES,
                routing_rows(source))


TABLES = """
CREATE TABLE usage_daily (
    tenant_id text NOT NULL, day date NOT NULL, model text NOT NULL,
    requests bigint NOT NULL, answered bigint NOT NULL, refused_or_failed bigint NOT NULL,
    limit_refusals bigint NOT NULL, prompt_tokens bigint NOT NULL, completion_tokens bigint NOT NULL,
    cost_usd numeric(24, 9) NOT NULL, cache_hits bigint NOT NULL, cascaded bigint NOT NULL,
    PRIMARY KEY (tenant_id, day, model)
);
CREATE INDEX usage_daily_day ON usage_daily (day);
CREATE TABLE routing_daily (
    tenant_id text NOT NULL, day date NOT NULL, complexity text NOT NULL, model text NOT NULL, decided text NOT NULL,
    requests bigint NOT NULL, answered bigint NOT NULL, cascaded bigint NOT NULL, prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL, cost_usd numeric(24, 9) NOT NULL, confidence_sum double precision NOT NULL,
    confidence_count bigint NOT NULL,
    PRIMARY KEY (tenant_id, day, complexity, model, decided)
);
CREATE INDEX routing_daily_day ON routing_daily (day);
"""


def trigger() -> str:
    return f"""
CREATE FUNCTION usage_ledger_rollup() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    {add_usage("new_rows")};
    {add_routing("new_rows")};
    RETURN NULL;
END
$body$;
CREATE TRIGGER usage_ledger_rollup AFTER INSERT ON usage_ledger REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_ledger_rollup();
"""


USER_TABLE = """
CREATE TABLE user_daily (
    tenant_id text NOT NULL, day date NOT NULL, end_user text NOT NULL,
    requests bigint NOT NULL, answered bigint NOT NULL, limit_refusals bigint NOT NULL, prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL, cost_usd numeric(24, 9) NOT NULL,
    PRIMARY KEY (tenant_id, day, end_user)
);
CREATE INDEX user_daily_day ON user_daily (day);
"""


def with_users() -> str:
    """The end users' rollup: made, filled from the rows already there, and kept by the trigger from now on."""
    return f"""{USER_TABLE}
{add_users('usage_ledger')};
CREATE OR REPLACE FUNCTION usage_ledger_rollup() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    {add_usage("new_rows")};
    {add_routing("new_rows")};
    {add_users("new_rows")};
    RETURN NULL;
END
$body$;
"""


def backfill() -> str:
    return f"{add_usage('usage_ledger')};\n{add_routing('usage_ledger')};"


__all__ = ["TABLES", "USAGE_MEASURES", "ROUTING_MEASURES", "USER_MEASURES", "add_routing", "add_usage", "add_users",
           "backfill", "routing_rows", "trigger", "usage_rows", "user_rows", "with_users"]
