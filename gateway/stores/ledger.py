"""The usage ledger: one row per request in PostgreSQL, written off the request path, never lost.

Requests put their row on a queue and move on. A writer task inserts the queue in batches. When PostgreSQL
cannot take a batch, the batch goes to a spool file on local disk (fsynced) and a replay task writes the spool
once PostgreSQL is back. On shutdown the queue is drained into PostgreSQL, or into the spool if it is down, and
the next start replays it. Rows are keyed by request id, so a batch written twice is stored once.

One bad row never blocks the others. Text is made storable before it is sent (PostgreSQL's text has no NUL
character, and a client's model name can be anything); a batch PostgreSQL refuses for its data, not for its
connection, is split until every good row has landed, and a row refused alone is set aside in
``spool/dead-letter.jsonl`` with a log line and ``gateway_ledger_dead_letter_rows``, where an admin can read it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Sequence

import asyncpg
import orjson

from gateway.observability import metrics
from gateway.stores.embedded import process_alive
from gateway.stores.migrations import migrate

log = logging.getLogger("gateway.ledger")

COLUMNS = (
    "request_id", "created_at", "tenant_id", "key_name", "route", "model_requested", "model", "deployment",
    "upstream_model", "routing_rule", "complexity", "prompt_tokens", "completion_tokens", "cost_usd",
    "latency_ms", "upstream_ms", "overhead_ms", "cache_hit", "cascaded", "confidence", "fallbacks", "stream",
    "status", "error_type", "route_score", "attempts", "node", "adapter", "paid_by", "route_example", "retrieval",
    "refusal_reason", "guardrails", "end_user",
)
_TYPES = (
    "text", "timestamptz", "text", "text", "text", "text", "text", "text",
    "text", "text", "text", "integer", "integer", "numeric",
    "real", "real", "real", "boolean", "boolean", "real", "text", "boolean",
    "integer", "text", "real", "jsonb", "text", "text", "text", "jsonb", "jsonb",
    "text", "jsonb", "text",
)
# A batch is copied (binary COPY: half the client's CPU of an INSERT of arrays) straight into the ledger: two round
# trips, in a transaction of its own. A batch that may hold rows already written (a spool replayed after a batch that
# did land), or that the ledger refused, is copied into a temporary table of the connection's, emptied at commit,
# and moved from there, so that a row written twice is still written once.
_STAGE = (f"CREATE TEMP TABLE IF NOT EXISTS ledger_stage ON COMMIT DELETE ROWS AS SELECT {', '.join(COLUMNS)} "
          "FROM usage_ledger WITH NO DATA")
_MOVE = (f"INSERT INTO usage_ledger ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM ledger_stage "
         "ON CONFLICT (request_id, created_at) DO NOTHING")
_CREATED_AT = COLUMNS.index("created_at")
_COST = COLUMNS.index("cost_usd")
_NANO_DOLLAR = Decimal("1e-9")  # cost_usd is numeric(18, 9)
_TEXT_COLUMNS = tuple(i for i, kind in enumerate(_TYPES) if kind == "text")
_JSON_COLUMNS = tuple(i for i, kind in enumerate(_TYPES) if kind == "jsonb")
_STOP: tuple = ()
WRITE_TIMEOUT = 10.0  # seconds a batch may take before it is spooled instead
TEXT_LIMIT = 1000  # characters kept of a text column (a client may send a megabyte as a model name)
DEAD_LETTER_FILE = "dead-letter.jsonl"


class Ledger:
    def __init__(self, dsn: str, spool_dir: Path, batch_size: int = 500, flush_seconds: float = 0.2) -> None:
        self.dsn = dsn
        self.spool_dir = spool_dir
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.pool: asyncpg.Pool | None = None
        self._queue: asyncio.Queue[tuple] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._spool_file = spool_dir / f"ledger-{os.getpid()}.jsonl"
        self._retry_at = 0.0
        self.reachable = False

    async def start(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        await self._connect()
        self._tasks = [asyncio.create_task(self._write_forever()), asyncio.create_task(self._replay_forever())]

    async def _connect(self) -> bool:
        if self.pool is not None:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4, timeout=5,
                                                      command_timeout=WRITE_TIMEOUT, init=_init_connection,
                                                      reset=_keep_session)
                async with self.pool.acquire() as connection:
                    await migrate(connection)
        except Exception as exc:  # whatever PostgreSQL or the driver says, the answer is: try again later
            self._fail(exc)
            return False
        self._set_reachable(True)
        return True

    def _fail(self, exc: BaseException) -> None:
        """Drop the pool (a fresh one is made on the next try, at most once a second)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None
        self._retry_at = time.monotonic() + 1.0
        self._set_reachable(False, exc)

    def record(self, row: Sequence) -> None:
        """Queue one row (in COLUMNS order); never waits."""
        self._queue.put_nowait(tuple(row))

    async def close(self) -> None:
        """Write everything still queued (to PostgreSQL, or to the spool), then stop."""
        writer, replayer = self._tasks or (None, None)
        if replayer is not None:
            replayer.cancel()  # a replay cut short leaves its claimed file to be replayed again: rows are idempotent
            await asyncio.gather(replayer, return_exceptions=True)
        if writer is not None:
            self._queue.put_nowait(_STOP)
            await writer
        while not self._queue.empty():
            await self._flush([row for row in self._take(self.batch_size) if row is not _STOP])
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # -- writing -----------------------------------------------------------------------------------------------

    def _take(self, limit: int) -> list[tuple]:
        batch = []
        while len(batch) < limit and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _write_forever(self) -> None:
        """Insert the queue in batches until the stop marker arrives; never cancelled in the middle of a batch."""
        while True:
            first = await self._queue.get()
            if first is not _STOP and self._queue.qsize() < self.batch_size - 1:
                await asyncio.sleep(self.flush_seconds)  # let a batch gather
            batch = [first, *self._take(self.batch_size - 1)]
            rows = [row for row in batch if row is not _STOP]
            await self._flush(rows)
            if len(rows) != len(batch):
                return

    async def _flush(self, batch: list[tuple]) -> None:
        if not batch:
            return
        set_aside = await self._insert(batch, fresh=True)
        if set_aside is None:
            self._spool(batch)
        else:
            metrics.LEDGER_ROWS.labels("written").inc(len(batch) - set_aside)

    async def _insert(self, rows: list[tuple], storable: bool = False, fresh: bool = False) -> int | None:
        """Write ``rows``; the number set aside as dead letters, or None if PostgreSQL could not be reached.

        ``fresh`` rows (new from the queue, none written before) go straight into the ledger; others, and fresh ones
        refused, through the stage (see _STAGE). Rows are sent as they are first (the request path keeps client text
        storable already); a batch refused for its data is made storable column by column and tried again, then
        split."""
        if not await self._connect():
            return None
        try:
            records = _records(rows, storable)
            async with asyncio.timeout(WRITE_TIMEOUT):
                async with self.pool.acquire() as connection:
                    if fresh:
                        await connection.copy_records_to_table("usage_ledger", records=records, columns=COLUMNS)
                    else:
                        async with connection.transaction():
                            await connection.execute(_STAGE)
                            await connection.copy_records_to_table("ledger_stage", records=records,
                                                                   columns=COLUMNS)
                            await connection.execute(_MOVE)
        except Exception as exc:  # refused for its data: split; otherwise spooled (a landed batch is not stored twice)
            if not _data_fault(exc):
                self._fail(exc)
                return None
            if fresh:
                return await self._insert(rows)
            if not storable:
                return await self._insert(rows, storable=True)
            if len(rows) == 1:
                self._dead_letter(rows[0], exc)
                return 1
            middle = len(rows) // 2
            first = await self._insert(rows[:middle], storable=True)
            second = await self._insert(rows[middle:], storable=True) if first is not None else None
            return None if second is None else first + second
        self._set_reachable(True)
        return 0

    def _dead_letter(self, row: tuple, exc: BaseException) -> None:
        path = self.spool_dir / DEAD_LETTER_FILE
        entry = {"row": dict(zip(COLUMNS, row)), "error": f"{type(exc).__name__}: {exc}", "at": time.time()}
        with open(path, "ab") as handle:
            handle.write(orjson.dumps(entry, default=str, option=orjson.OPT_APPEND_NEWLINE))
            handle.flush()
            os.fsync(handle.fileno())
        metrics.LEDGER_DEAD_LETTERS.inc()
        log.error("usage row of request %s refused by PostgreSQL (%s); set aside in %s", row[0] if row else "?",
                  exc, path)

    def _spool(self, batch: list[tuple]) -> None:
        with open(self._spool_file, "ab") as handle:
            for row in batch:
                handle.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
            handle.flush()
            os.fsync(handle.fileno())
        metrics.LEDGER_ROWS.labels("spooled").inc(len(batch))
        metrics.LEDGER_SPOOLED.inc(len(batch))

    # -- replaying the spool -------------------------------------------------------------------------------------

    async def _replay_forever(self) -> None:
        while True:
            try:
                await self.replay_spool()
            except Exception:  # keep replaying later; a dead replay task would strand the spool
                log.exception("replaying the ledger spool failed")
            await asyncio.sleep(1.0)

    async def replay_spool(self) -> int:
        """Write spooled rows to PostgreSQL; return how many were replayed."""
        replayed = 0
        for path in sorted(self.spool_dir.glob("ledger-*.jsonl")) + sorted(self.spool_dir.glob("*.claimed")):
            claimed = self._claim(path)
            if claimed is None:
                continue
            rows = [tuple(orjson.loads(line)) for line in claimed.read_bytes().splitlines() if line.strip()]
            for start in range(0, len(rows), self.batch_size):
                if await self._insert(rows[start:start + self.batch_size]) is None:
                    return replayed  # still down: the claimed file stays and is tried again
            claimed.unlink()
            replayed += len(rows)
            metrics.LEDGER_ROWS.labels("replayed").inc(len(rows))
            metrics.LEDGER_SPOOLED.dec(len(rows))
            log.info("replayed %d usage rows from %s", len(rows), path.name)
        return replayed

    def _claim(self, path: Path) -> Path | None:
        """Take a spool file for this process: one of its own, an unclaimed one, or one whose claimer died.

        A claimed file is named ``<spool file>.<unique>.<claimer pid>.claimed``: the writer starts a new spool file
        under the old name, so every claim needs a name of its own.
        """
        if path.suffix == ".claimed":
            stem, owner, _ = path.name.rsplit(".", 2)
            if int(owner) == os.getpid():
                return path
            if process_alive(int(owner)):
                return None
            target = path.with_name(f"{stem}.{os.getpid()}.claimed")
        else:
            target = path.with_name(f"{path.name}.{time.time_ns()}.{os.getpid()}.claimed")
        try:
            path.rename(target)
        except FileNotFoundError:
            return None  # another worker took it first
        return target

    def _set_reachable(self, reachable: bool, exc: BaseException | None = None) -> None:
        if reachable != self.reachable:
            if reachable:
                log.info("PostgreSQL reachable: usage rows go to the ledger")
            else:
                log.error("PostgreSQL unreachable, usage rows are spooled to %s: %s", self.spool_dir, exc)
            self.reachable = reachable
        metrics.POSTGRES_UP.set(1 if reachable else 0)


def _records(rows: list[tuple], storable: bool) -> list[tuple]:
    """The rows as COPY takes them (``storable``: every text made storable)."""
    width = len(COLUMNS)  # rows spooled by an older version have fewer columns: the new ones stay null
    records = []
    for row in rows:
        if len(row) != width:
            row = (*row, *(None,) * (width - len(row)))
        row = list(row)
        row[_CREATED_AT] = _timestamp(row[_CREATED_AT])
        cost = row[_COST]
        if isinstance(cost, float) and -1e9 < cost < 1e9:  # the driver's own conversion costs twice as much
            row[_COST] = Decimal(cost).quantize(_NANO_DOLLAR)  # as the column rounds (a float is never a tie)
        if storable:
            for index in _TEXT_COLUMNS:
                row[index] = _storable(row[index])
            for index in _JSON_COLUMNS:
                if isinstance(row[index], str):
                    row[index] = row[index].replace("\\u0000", "\\ufffd")
        records.append(row)
    return records


def _storable(value: object) -> object:
    """Text PostgreSQL can store: no NUL, valid UTF-8, at most TEXT_LIMIT characters."""
    if not isinstance(value, str):
        return value
    if len(value) > TEXT_LIMIT:
        value = value[:TEXT_LIMIT]
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _data_fault(exc: BaseException) -> bool:
    """Whether PostgreSQL (or the driver) refused the rows for what they hold rather than for the connection."""
    if isinstance(exc, (ValueError, TypeError, OverflowError)):  # asyncpg's client-side DataError is a ValueError
        return True
    return (getattr(exc, "sqlstate", None) or "")[:2] in ("22", "23")  # data exception, integrity violation


async def _init_connection(connection: asyncpg.Connection) -> None:
    await connection.execute("SET application_name = 'llm-gateway'")


async def _keep_session(connection: asyncpg.Connection) -> None:
    """A ledger connection is given back as it is: it holds nothing but its stage (asyncpg's default reset would
    cost a round trip a batch)."""


def _timestamp(value: float | str | dt.datetime) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    return dt.datetime.fromtimestamp(value, dt.timezone.utc)
