"""The ledger's daily partitions: made ahead, and dropped past the retention.

Each day's rows go to a partition of their own (``usage_ledger_YYYYMMDD``), made before the day starts, so an
insert never waits for one; a row no partition takes (a clock days ahead, a spool replayed after its day was
dropped) lands in the default partition, and is moved into its day's partition when that is made. Dropping a
day is dropping a table: no vacuum, no long delete. The daily rollups are kept: reports still cover the days
whose rows are gone. Several gateways may run this at once: an advisory lock lets one do it at a time.
"""

from __future__ import annotations

import datetime as dt
import logging
import re

import asyncpg

from gateway.stores.usage import midnight

log = logging.getLogger("gateway.ledger")

_LOCK = 7_301_244_772  # advisory lock id of partition maintenance
_BOUNDS = """
SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage_ledger'::regclass
"""
_RANGE = re.compile(r"FROM \((?:'(?P<lower>[^']+)'|MINVALUE)\) TO \((?:'(?P<upper>[^']+)'|MAXVALUE)\)")


def partition_name(day: dt.date) -> str:
    return f"usage_ledger_{day:%Y%m%d}"


async def maintain(pool: asyncpg.Pool, ahead_days: int, retention_days: int,
                   today: dt.date | None = None) -> dict[str, list[str]]:
    """Make the partitions of today and the next ``ahead_days`` days that are missing; drop the partitions whose
    every row is older than ``retention_days`` days (0: keep everything). What was made and dropped."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    made, dropped = [], []
    async with pool.acquire() as connection:
        if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
            return {"made": made, "dropped": dropped}  # another gateway is at it
        try:
            ranges = await _ranges(connection)
            for offset in range(ahead_days + 1):
                day = today + dt.timedelta(days=offset)
                start, end = midnight(day), midnight(day + dt.timedelta(days=1))
                if not any(_covers(lower, upper, start, end) for lower, upper in ranges.values()):
                    await _make(connection, day, start, end)
                    made.append(partition_name(day))
            if retention_days > 0:
                oldest_kept = midnight(today - dt.timedelta(days=retention_days))
                for name, (_, upper) in ranges.items():
                    if upper is not None and upper <= oldest_kept:
                        await connection.execute(f'DROP TABLE "{name}"')
                        dropped.append(name)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK)
    if made or dropped:
        log.info("ledger partitions made: %s; dropped: %s", made or "none", dropped or "none")
    return {"made": made, "dropped": dropped}


async def _ranges(connection: asyncpg.Connection) -> dict[str, tuple[dt.datetime | None, dt.datetime | None]]:
    """Each range partition's [lower, upper) (None: unbounded); the default partition is left out."""
    ranges = {}
    for row in await connection.fetch(_BOUNDS):
        found = _RANGE.search(row["bound"])
        if found is not None:
            ranges[row["name"]] = (_time(found["lower"]), _time(found["upper"]))
    return ranges


def _time(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)


def _covers(lower, upper, start: dt.datetime, end: dt.datetime) -> bool:
    """Does [lower, upper) overlap [start, end)? (A day half covered cannot get a partition of its own.)"""
    return (lower is None or lower < end) and (upper is None or upper > start)


async def _make(connection: asyncpg.Connection, day: dt.date, start: dt.datetime, end: dt.datetime) -> None:
    """The day's partition, with the rows of that day the default partition holds moved into it (attaching a
    range the default partition has rows of would fail). Moving rows between partitions leaves the rollups as
    they are: they already count those rows."""
    name = partition_name(day)
    async with connection.transaction():
        await connection.execute(f'CREATE TABLE "{name}" (LIKE usage_ledger INCLUDING DEFAULTS)')
        await connection.execute(
            f'WITH moved AS (DELETE FROM usage_ledger_default WHERE created_at >= $1 AND created_at < $2 '
            f'RETURNING *) INSERT INTO "{name}" SELECT * FROM moved', start, end)
        await connection.execute(f"ALTER TABLE usage_ledger ATTACH PARTITION \"{name}\" "
                                 f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')")


__all__ = ["maintain", "partition_name"]
