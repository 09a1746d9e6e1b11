"""The ledger partitioned by day, its partitions made ahead and dropped past the retention, and the daily rollups
the reports read: exact through duplicates and replays, equal to the rows they sum, kept when rows are dropped."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from types import SimpleNamespace

import asyncpg
import pytest

from gateway.stores import partitions
from gateway.stores.ledger import COLUMNS, Ledger
from gateway.stores.migrations import MIGRATIONS, migrate
from gateway.stores.usage import midnight, routing_report, usage_report

UTC = dt.timezone.utc
TODAY = dt.datetime.now(UTC).date()
CONFIG = SimpleNamespace(models={}, reference_model=None)  # what the reports read of the config
INSERT = ("INSERT INTO usage_ledger (request_id, created_at, tenant_id, route, model, status, prompt_tokens, "
          "completion_tokens, cost_usd, complexity, routing_rule, cascaded, confidence, cache_hit) "
          "SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::int[], "
          "$7::int[], $8::int[], $9::numeric[], $10::text[], $11::text[], $12::bool[], $13::real[], $14::bool[]) "
          "ON CONFLICT (request_id, created_at) DO NOTHING")


@pytest.fixture
def database(stores):
    """A database of its own, empty."""
    name = f"ledger_{uuid.uuid4().hex[:10]}"
    stores.query(f"CREATE DATABASE {name}")
    yield stores.postgres.get_uri(database=name)
    stores.query(f"DROP DATABASE {name} WITH (FORCE)")


def run(coroutine):
    return asyncio.run(coroutine)


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url)


def _rows(count: int, start: dt.datetime, spread: dt.timedelta, tenants=("a", "b")) -> list[tuple]:
    """Ledger rows: answered, refused (429), failed, routed and cascaded, cached, over the given span."""
    rows = []
    for i in range(count):
        routed = i % 3 == 0
        rows.append((f"r-{start.timestamp()}-{i}", start + spread * (i / max(1, count)), tenants[i % len(tenants)],
                     "chat.completions", ("small", "large", None)[i % 3], (200, 429, 502, 200)[i % 4], 10 + i % 7,
                     5 + i % 5, (i % 9) / 1000, "simple" if routed else None,
                     f"default:simple->{('small', 'large')[i % 2]}" if routed else None,
                     routed and i % 2 == 0, 0.5 + (i % 5) / 10 if routed else None, i % 11 == 0))
    return rows


async def _insert(connection: asyncpg.Connection, rows: list[tuple]) -> None:
    await connection.execute(INSERT, *[list(column) for column in zip(*rows)])


RAW_TOTALS = """
SELECT coalesce(tenant_id, '') AS tenant_id, (created_at AT TIME ZONE 'UTC')::date AS day, coalesce(model, '') AS model,
       count(*) AS requests, count(*) FILTER (WHERE status < 400) AS answered,
       count(*) FILTER (WHERE status = 429) AS limit_refusals, sum(prompt_tokens) AS prompt_tokens,
       sum(cost_usd) AS cost_usd, count(*) FILTER (WHERE cascaded) AS cascaded,
       count(*) FILTER (WHERE cache_hit) AS cache_hits
FROM usage_ledger GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
ROLLUP_TOTALS = """
SELECT tenant_id, day, model, requests, answered, limit_refusals, prompt_tokens, cost_usd, cascaded, cache_hits
FROM usage_daily ORDER BY 1, 2, 3
"""


async def _same_as_rows(connection: asyncpg.Connection) -> None:
    raw = [tuple(r) for r in await connection.fetch(RAW_TOTALS)]
    rolled = [tuple(r) for r in await connection.fetch(ROLLUP_TOTALS)]
    assert raw == rolled and raw


def test_an_existing_ledger_becomes_partitioned_with_every_row(database):
    async def scenario():
        connection = await _connect(database)
        try:  # a database at the schema before partitioning, with rows of past days, today and ten days ahead
            await connection.execute("CREATE TABLE gateway_schema (version integer NOT NULL, applied_at "
                                     "timestamptz NOT NULL DEFAULT now())")
            for version, statement in enumerate(MIGRATIONS[:8], start=1):
                await connection.execute(statement)
                await connection.execute("INSERT INTO gateway_schema (version) VALUES ($1)", version)
            await connection.execute(INSERT.replace(" ON CONFLICT (request_id, created_at)", " ON CONFLICT"),
                                     *[list(c) for c in zip(*_rows(300, midnight(TODAY - dt.timedelta(days=5)),
                                                                    dt.timedelta(days=6)))])
            ahead = _rows(4, midnight(TODAY + dt.timedelta(days=10)) + dt.timedelta(hours=3), dt.timedelta(hours=1))
            await connection.execute(INSERT.replace(" ON CONFLICT (request_id, created_at)", " ON CONFLICT"),
                                     *[list(c) for c in zip(*ahead)])
            assert await migrate(connection) == len(MIGRATIONS)
            assert await connection.fetchval("SELECT count(*) FROM usage_ledger") == 304
            where = dict(await connection.fetch(
                "SELECT tableoid::regclass::text, count(*) FROM usage_ledger GROUP BY 1"))
            assert where == {"usage_ledger_unpartitioned": 300, "usage_ledger_default": 4}
            await _same_as_rows(connection)

            pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
            made = await partitions.maintain(pool, ahead_days=12, retention_days=0)
            assert made["made"][0] == partitions.partition_name(TODAY + dt.timedelta(days=1))
            assert len(made["made"]) == 12  # today is the migrated rows' partition
            where = dict(await connection.fetch(
                "SELECT tableoid::regclass::text, count(*) FROM usage_ledger GROUP BY 1"))
            assert where[partitions.partition_name(TODAY + dt.timedelta(days=10))] == 4  # moved out of the default
            assert "usage_ledger_default" not in where
            await _same_as_rows(connection)  # moving rows between partitions counts nothing twice
            assert (await partitions.maintain(pool, ahead_days=12, retention_days=0))["made"] == []
            await _insert(connection, _rows(50, midnight(TODAY + dt.timedelta(days=2)), dt.timedelta(hours=5)))
            assert await connection.fetchval(
                f"SELECT count(*) FROM {partitions.partition_name(TODAY + dt.timedelta(days=2))}") == 50
            await _same_as_rows(connection)
            await pool.close()
        finally:
            await connection.close()

    run(scenario())


def test_rollups_are_exact_through_duplicates_and_concurrent_writers(database):
    async def scenario():
        connection = await _connect(database)
        await migrate(connection)
        rows = _rows(2000, midnight(TODAY) + dt.timedelta(minutes=1), dt.timedelta(hours=20))
        await _insert(connection, rows)
        await _insert(connection, rows[:700])  # a spool replayed: the ledger skips them, the rollups too
        pool = await asyncpg.create_pool(database, min_size=4, max_size=4)
        batches = [_rows(300, midnight(TODAY) + dt.timedelta(minutes=w), dt.timedelta(hours=3), tenants=("a", "b"))
                   for w in range(2, 10)]

        async def write(batch):
            async with pool.acquire() as writer:
                await _insert(writer, batch)

        await asyncio.gather(*(write(batch) for batch in batches))  # replicas' batches at once: no deadlock
        assert await connection.fetchval("SELECT count(*) FROM usage_ledger") == 2000 + 8 * 300
        await _same_as_rows(connection)
        await pool.close()
        await connection.close()

    run(scenario())


def test_reports_from_rollups_equal_the_rows_and_outlive_them(database):
    async def scenario():
        connection = await _connect(database)
        await migrate(connection)
        pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
        first = TODAY + dt.timedelta(days=1)
        await partitions.maintain(pool, ahead_days=8, retention_days=0)
        await _insert(connection, _rows(900, midnight(first) + dt.timedelta(hours=1), dt.timedelta(days=6)))
        start = midnight(first) + dt.timedelta(hours=13, minutes=5)  # a tenant made at 13:05
        end = midnight(first + dt.timedelta(days=6))
        report = await usage_report(pool, CONFIG, "a", start, end)
        raw = await connection.fetchrow(
            "SELECT count(*) AS requests, count(*) FILTER (WHERE status < 400) AS answered, "
            "count(*) FILTER (WHERE status = 429) AS refusals, sum(cost_usd) AS cost FROM usage_ledger "
            "WHERE tenant_id = 'a' AND created_at >= $1 AND created_at < $2", start, end)
        assert (report["requests"], report["answered"], report["limit_refusals"]) == (
            raw["requests"], raw["answered"], raw["refusals"])
        assert report["cost_usd"] == pytest.approx(float(raw["cost"]))
        assert sum(day["requests"] for day in report["by_day"]) == raw["requests"]
        overall = await usage_report(pool, CONFIG, None, midnight(first), end)
        assert overall["requests"] == await connection.fetchval(
            "SELECT count(*) FROM usage_ledger WHERE created_at >= $1 AND created_at < $2", midnight(first), end)
        routing = await routing_report(pool, CONFIG, "a", start, end)
        routed = await connection.fetchrow(
            "SELECT count(*) FILTER (WHERE status < 400) AS answered, count(*) AS scored FROM usage_ledger "
            "WHERE tenant_id = 'a' AND complexity IS NOT NULL AND created_at >= $1 AND created_at < $2", start, end)
        assert routing["routed_requests"] == routed["answered"] > 0  # answered routed requests only
        assert routing["not_answered"] == routed["scored"] - routed["answered"] > 0

        # forty days later, with 30 days kept: the days' partitions are dropped, their reports stay
        later = first + dt.timedelta(days=40)
        dropped = (await partitions.maintain(pool, ahead_days=0, retention_days=30, today=later))["dropped"]
        assert partitions.partition_name(first) in dropped and "usage_ledger_unpartitioned" in dropped
        assert await connection.fetchval("SELECT count(*) FROM usage_ledger WHERE created_at < $1",
                                         midnight(later - dt.timedelta(days=30))) == 0
        whole_days = await usage_report(pool, CONFIG, "a", midnight(first + dt.timedelta(days=1)), end)
        assert whole_days["requests"] > 0 and whole_days["requests"] == sum(d["requests"] for d in whole_days["by_day"])
        await pool.close()
        await connection.close()

    run(scenario())


def _ledger_row(index: int, at: float) -> tuple:
    values = {"request_id": f"req-{index}", "created_at": at, "tenant_id": ("a", "b")[index % 2],
              "route": "chat.completions", "model": "small", "status": (200, 429)[index % 5 == 0],
              "prompt_tokens": 10 + index % 7, "completion_tokens": 5, "cost_usd": (index % 9) / 1000,
              "latency_ms": 12.5, "cache_hit": index % 11 == 0, "stream": False}
    return tuple(values.get(column) for column in COLUMNS)


def test_the_ledgers_batches_land_once_and_are_rolled_up(database, tmp_path):
    """New rows are copied straight into the ledger; rows already there, sent again as new ones, are stored once
    (the batch goes through the stage), and the rollups count every row once either way."""
    async def scenario():
        now = time.time()
        first = Ledger(database, tmp_path / "spool", batch_size=100, flush_seconds=0.01)
        await first.start()
        for index in range(250):
            first.record(_ledger_row(index, now))
        await first.close()
        again = Ledger(database, tmp_path / "spool", batch_size=100, flush_seconds=0.01)
        await again.start()
        for index in range(240, 260):  # ten written already, ten new
            again.record(_ledger_row(index, now))
        await again.close()
        connection = await _connect(database)
        assert await connection.fetchval("SELECT count(*) FROM usage_ledger") == 260
        assert await connection.fetchval("SELECT count(DISTINCT request_id) FROM usage_ledger") == 260
        await _same_as_rows(connection)
        await connection.close()

    run(scenario())


def test_a_cost_is_stored_as_the_driver_would_store_it_and_one_the_column_cannot_hold_is_set_aside(database, tmp_path):
    """The ledger converts a request's cost for the numeric(18, 9) column itself (the driver's conversion of a float
    is the dearest part of a row); what lands is what the driver's own would have stored, to the nano-dollar, and a
    cost the column cannot hold is still set aside as a dead letter while the rest of its batch lands."""
    costs = [1.5e-9, 2.5e-9, -2.5e-9, 5e-10, 0.1 + 0.2, 3e-5, 123.456789012345, 999999.1234567895, 999999999.5,
             1e-320, 0.0, -0.0, *(index / 7e6 for index in range(1, 200))]
    unstorable = [1e12, float("inf")]

    async def scenario():
        now = time.time()
        ledger = Ledger(database, tmp_path / "spool", batch_size=500, flush_seconds=0.01)
        await ledger.start()
        for index, cost in enumerate(costs + unstorable):
            row = dict(zip(COLUMNS, _ledger_row(index, now)), cost_usd=cost)
            ledger.record(tuple(row[column] for column in COLUMNS))
        await ledger.close()
        connection = await _connect(database)
        stored = {row["request_id"]: row["cost_usd"] for row in
                  await connection.fetch("SELECT request_id, cost_usd FROM usage_ledger")}
        await connection.execute("CREATE TEMP TABLE driver (request_id text, cost_usd numeric(18, 9))")
        await connection.copy_records_to_table(
            "driver", records=[(f"req-{index}", cost) for index, cost in enumerate(costs)])
        expected = {row["request_id"]: row["cost_usd"] for row in
                    await connection.fetch("SELECT request_id, cost_usd FROM driver")}
        await connection.close()
        assert stored == expected
        dead = [line for line in (tmp_path / "spool" / "dead-letter.jsonl").read_text().splitlines()]
        assert len(dead) == len(unstorable)

    run(scenario())
