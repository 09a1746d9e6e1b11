"""Fine-tuning jobs, their events and checkpoints in PostgreSQL, as OpenAI's fine-tuning API shows them.

Every query names the tenant: another tenant's job is simply not found. A job's life: ``validating_files`` (its
files checked and copied to storage), ``queued``, ``running`` (claimed by one gateway, which beats a heartbeat while
its trainer runs), then ``succeeded``, ``failed`` (with why) or ``cancelled``. A job whose runner stopped beating
is not left ``running``: any gateway queues it again (to resume from its last checkpoint), or fails it with that
reason once it has been restarted ``MAX_RESTARTS`` times.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any

STALE_SECONDS = 60.0  # a running job whose runner has not beaten for this long has lost its runner
MAX_RESTARTS = 3  # a job whose gateway stopped is queued again (from its last checkpoint) this many times at most
ACTIVE = ("validating_files", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


def fine_tuned_name(base: str, tenant_id: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's form: ``ft:<base>:<organization>:<suffix>:<id>``."""
    return f"ft:{base}:{tenant_id}:{suffix or ''}:{job_id.removeprefix('ftjob-')[:8]}"


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def _seconds(value: dt.datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def job_view(row: Any) -> dict:
    """A job as OpenAI's API writes it."""
    return {
        "object": "fine_tuning.job", "id": row["id"], "model": row["model"], "created_at": _seconds(row["created_at"]),
        "finished_at": _seconds(row["finished_at"]), "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": row["tenant_id"], "result_files": [], "status": row["status"],
        "validation_file": row["validation_file"], "training_file": row["training_file"],
        "hyperparameters": json.loads(row["hyperparameters"]), "trained_tokens": row["trained_tokens"],
        "error": json.loads(row["error"]) if row["error"] else None, "seed": row["seed"],
        "suffix": row["suffix"], "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "estimated_finish": None, "integrations": [],
        "method": {"type": "supervised", "supervised": {"hyperparameters": json.loads(row["hyperparameters"])}},
        "usage_metrics": {"gpu_seconds": round(row["gpu_seconds"], 3)},
    }


_COLUMNS = ("id, tenant_id, created_at, model, training_file, validation_file, hyperparameters, suffix, seed, "
            "metadata, status, fine_tuned_model, adapter_location, error, trained_tokens, training_examples, "
            "started_at, finished_at, runner, heartbeat_at, gpu_seconds, cancel_requested, restarts, report_token, "
            "gpu_second_usd")


class Jobs:
    def __init__(self, pool) -> None:
        self._pool = pool  # an async callable giving the asyncpg pool

    async def create(self, tenant_id: str, model: str, training_file: str, validation_file: str | None,
                     hyperparameters: dict, suffix: str | None, seed: int, metadata: dict | None,
                     job_id: str | None = None, storage: str = "", schedule: str | None = None,
                     gpu_second_usd: float | None = None) -> dict:
        """A new job (``job_id``: the one a schedule's period names, so that replicas make it once), its data in
        ``storage``: only a gateway that keeps its data there trains it."""
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                f"INSERT INTO fine_tuning_jobs (id, tenant_id, model, training_file, validation_file, "
                f"hyperparameters, suffix, seed, metadata, status, storage, schedule, gpu_second_usd) VALUES ($1, $2, "
                f"$3, $4, $5, $6, $7, $8, $9, 'validating_files', $10, $11, $12) RETURNING {_COLUMNS}",
                job_id or new_id("ftjob-"), tenant_id, model, training_file, validation_file,
                json.dumps(hyperparameters), suffix, seed, json.dumps(metadata) if metadata is not None else None,
                storage, schedule, gpu_second_usd)
            await _event(connection, row["id"], "info", "message", "Validating training file: " + training_file)
        return dict(row)

    async def exists(self, job_id: str) -> bool:
        pool = await self._pool()
        return await pool.fetchval("SELECT true FROM fine_tuning_jobs WHERE id = $1", job_id) is not None

    async def get(self, tenant_id: str, job_id: str) -> dict | None:
        pool = await self._pool()
        row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM fine_tuning_jobs WHERE tenant_id = $1 AND id = $2",
                                  tenant_id, job_id)
        return dict(row) if row is not None else None

    async def page(self, tenant_id: str, limit: int, after: str | None,
                   metadata: dict[str, str] | None = None) -> tuple[list[dict], bool]:
        pool = await self._pool()
        rows = await pool.fetch(
            f"SELECT {_COLUMNS} FROM fine_tuning_jobs WHERE tenant_id = $1 AND ($2::text IS NULL OR (created_at, id) "
            "< (SELECT created_at, id FROM fine_tuning_jobs WHERE tenant_id = $1 AND id = $2)) AND ($4::jsonb IS "
            "NULL OR metadata @> $4::jsonb) ORDER BY created_at DESC, id DESC LIMIT $3", tenant_id, after, limit + 1,
            json.dumps(metadata) if metadata else None)
        return [dict(row) for row in rows[:limit]], len(rows) > limit

    async def active(self, tenant_id: str) -> int:
        pool = await self._pool()
        return await pool.fetchval("SELECT count(*) FROM fine_tuning_jobs WHERE tenant_id = $1 AND status = ANY($2)",
                                   tenant_id, list(ACTIVE))

    async def set_status(self, job_id: str, status: str, message: str, level: str = "info",
                         error: dict | None = None, run: str | None = None, **fields: Any) -> bool:
        """Move a job on (unless it has finished already; with ``run``, only while that run, by its report
        token's SHA-256, is the job's) and say so in its events. Whether it moved."""
        assignments = ["status = $2", "error = $3"]
        values: list[Any] = [job_id, status, json.dumps(error) if error else None]
        for name, value in fields.items():
            values.append(value)
            assignments.append(f"{name} = ${len(values)}")
        if status in FINISHED:
            assignments.append("finished_at = now()")
        values.append(list(FINISHED))
        condition = f"status <> ALL(${len(values)})"
        if run is not None:
            values.append(run)
            condition += f" AND report_token = ${len(values)}"
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction():
            changed = await connection.fetchval(
                f"UPDATE fine_tuning_jobs SET {', '.join(assignments)} WHERE id = $1 AND {condition} RETURNING id",
                *values)
            if changed:
                await _event(connection, job_id, level, "message", message)
        return changed is not None

    async def event(self, job_id: str, message: str, level: str = "info", kind: str = "message",
                    data: dict | None = None) -> None:
        pool = await self._pool()
        async with pool.acquire() as connection:
            await _event(connection, job_id, level, kind, message, data)

    async def events(self, tenant_id: str, job_id: str, limit: int, after: str | None) -> tuple[list[dict], bool]:
        pool = await self._pool()
        cursor = int(after.removeprefix("ftevent-")) if after and after.removeprefix("ftevent-").isdigit() else None
        rows = await pool.fetch(
            "SELECT e.id, e.created_at, e.level, e.type, e.message, e.data FROM fine_tuning_events e JOIN "
            "fine_tuning_jobs j ON j.id = e.job_id WHERE j.tenant_id = $1 AND e.job_id = $2 AND ($3::bigint IS NULL "
            "OR e.id < $3) ORDER BY e.id DESC LIMIT $4", tenant_id, job_id, cursor, limit + 1)
        return [{"object": "fine_tuning.job.event", "id": f"ftevent-{row['id']}",
                 "created_at": _seconds(row["created_at"]), "level": row["level"], "message": row["message"],
                 "type": row["type"], "data": json.loads(row["data"]) if row["data"] else {}}
                for row in rows[:limit]], len(rows) > limit

    async def checkpoint(self, job_id: str, step: int, metrics: dict, location: str) -> str:
        checkpoint_id = new_id("ftckpt-")
        pool = await self._pool()
        await pool.execute("INSERT INTO fine_tuning_checkpoints (id, job_id, step, metrics, location) VALUES "
                           "($1, $2, $3, $4, $5)", checkpoint_id, job_id, step, json.dumps(metrics), location)
        return checkpoint_id

    async def checkpoints(self, tenant_id: str, job_id: str, limit: int,
                          after: str | None) -> tuple[list[dict], bool]:
        pool = await self._pool()
        rows = await pool.fetch(
            "SELECT c.id, c.created_at, c.step, c.metrics, j.fine_tuned_model, j.model FROM fine_tuning_checkpoints c "
            "JOIN fine_tuning_jobs j ON j.id = c.job_id WHERE j.tenant_id = $1 AND c.job_id = $2 AND ($3::text IS "
            "NULL OR c.step < (SELECT step FROM fine_tuning_checkpoints WHERE id = $3)) ORDER BY c.step DESC "
            "LIMIT $4", tenant_id, job_id, after, limit + 1)
        return [{"object": "fine_tuning.job.checkpoint", "id": row["id"], "created_at": _seconds(row["created_at"]),
                 "fine_tuning_job_id": job_id, "step_number": row["step"], "metrics": json.loads(row["metrics"]),
                 "fine_tuned_model_checkpoint": f"{row['fine_tuned_model'] or row['model']}:ckpt-step-{row['step']}"}
                for row in rows[:limit]], len(rows) > limit

    async def claim(self, runner: str, limit: int, storage: str, models: tuple[str, ...] = (),
                    report_token: str | None = None, grace_seconds: float = 0.0) -> dict | None:
        """The oldest queued job whose data is in ``storage`` (and whose base model is one of ``models``, if any
        are named), now run by ``runner``, if fewer than ``limit`` run there: a gateway, or a trainer off the
        gateways whose jobs every gateway may start (so the count is taken under a lock of the runner's name).
        ``report_token``: the SHA-256 of the token the run reports with; ``grace_seconds``: how long it may take
        to beat for the first time."""
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext('fine-tuning runner ' || $1))", runner)
            running = await connection.fetchval("SELECT count(*) FROM fine_tuning_jobs WHERE status = 'running' AND "
                                                "runner = $1", runner)
            if running >= limit:
                return None
            # a heartbeat set ahead: a started trainer is not taken for lost before its grace has passed
            row = await connection.fetchrow(
                f"UPDATE fine_tuning_jobs SET status = 'running', runner = $1, started_at = now(), heartbeat_at = "
                f"now() + make_interval(secs => $5), report_token = $4 WHERE id = (SELECT id FROM fine_tuning_jobs "
                f"WHERE status = 'queued' AND NOT cancel_requested AND storage = $2 AND (not_before IS NULL OR "
                f"not_before <= now()) AND (cardinality($3::text[]) = 0 "
                f"OR model = ANY($3)) ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}",
                runner, storage, list(models), report_token, float(grace_seconds))
            if row is not None:
                await _event(connection, row["id"], "info", "message", "Fine-tuning job started")
        return dict(row) if row is not None else None

    async def reporting(self, job_id: str, report_token: str) -> dict | None:
        """The running job whose current run reports with this token (by its SHA-256); None for any other."""
        pool = await self._pool()
        row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM fine_tuning_jobs WHERE id = $1 AND status = 'running' AND "
                                  "report_token = $2", job_id, report_token)
        return dict(row) if row is not None else None

    async def run_of(self, job_id: str) -> dict | None:
        """What a started trainer's follower needs: whether the run it started is still the job's."""
        pool = await self._pool()
        row = await pool.fetchrow("SELECT status, report_token, cancel_requested FROM fine_tuning_jobs WHERE id = $1",
                                  job_id)
        return dict(row) if row is not None else None

    async def beat(self, job_id: str, gpu_seconds: float) -> bool:
        """The runner is alive; whether the job has been asked to stop (or is gone: its tenant was deleted)."""
        pool = await self._pool()
        cancel = await pool.fetchval("UPDATE fine_tuning_jobs SET heartbeat_at = now(), gpu_seconds = $2 WHERE id = "
                                     "$1 RETURNING cancel_requested", job_id, gpu_seconds)
        return cancel is None or bool(cancel)

    async def forget_tenant(self, tenant_id: str) -> int:
        """Every job of a tenant whose id is about to start a new tenant, with its events and checkpoints; a job
        training now stops at its next heartbeat (it finds its row gone)."""
        pool = await self._pool()
        deleted = await pool.fetch("DELETE FROM fine_tuning_jobs WHERE tenant_id = $1 RETURNING id", tenant_id)
        return len(deleted)

    async def request_cancel(self, tenant_id: str, job_id: str) -> dict | None:
        """Cancel a job: at once if it has not started, by its runner (within a heartbeat) if it runs."""
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                "UPDATE fine_tuning_jobs SET cancel_requested = true, status = CASE WHEN status = 'running' THEN "
                "status ELSE 'cancelled' END, finished_at = CASE WHEN status = 'running' THEN finished_at ELSE now() "
                f"END WHERE tenant_id = $1 AND id = $2 AND status = ANY($3) RETURNING {_COLUMNS}", tenant_id, job_id,
                list(ACTIVE))
            if row is not None and row["status"] == "cancelled":
                await _event(connection, job_id, "info", "message", "Fine-tuning job cancelled")
        return dict(row) if row is not None else None

    async def orphans(self, stale_seconds: float = STALE_SECONDS) -> list[dict]:
        """Running jobs whose runner stopped beating."""
        pool = await self._pool()
        rows = await pool.fetch(
            f"SELECT {_COLUMNS} FROM fine_tuning_jobs WHERE status = 'running' AND heartbeat_at < now() - "
            f"make_interval(secs => $1)", float(stale_seconds))
        return [dict(row) for row in rows]

    async def requeue(self, job_id: str, why: str, run: str | None = None, wait_seconds: float = 0.0) -> str | None:
        """A job whose runner stopped, queued again to resume from its last checkpoint (not claimed again for
        ``wait_seconds``); failed once it has been restarted MAX_RESTARTS times, and cancelled if a cancel was asked
        for meanwhile. Its new status (None: the job was not running, or, with ``run``, not that run's any more)."""
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                "UPDATE fine_tuning_jobs SET status = CASE WHEN cancel_requested THEN 'cancelled' WHEN restarts < $2 "
                "THEN 'queued' ELSE 'failed' END, restarts = restarts + 1, runner = NULL, report_token = NULL, "
                "not_before = now() + make_interval(secs => $5), "
                "error = CASE WHEN cancel_requested OR restarts < $2 THEN NULL ELSE $3::jsonb END, finished_at = CASE "
                "WHEN restarts < $2 AND NOT cancel_requested THEN NULL ELSE now() END WHERE id = $1 AND status = "
                "'running' AND ($4::text IS NULL OR report_token = $4) RETURNING status", job_id, MAX_RESTARTS,
                json.dumps({"code": "runner_lost", "message": f"{why}, {MAX_RESTARTS + 1} times", "param": None}),
                run, float(wait_seconds))
            if row is None:
                return None
            status = row["status"]
            if status == "queued":
                level, message = "warn", f"{why}; queued again to resume from its last checkpoint"
                if wait_seconds:
                    message += f", in {wait_seconds:g} s at the earliest"
            elif status == "cancelled":
                level, message = "info", f"{why}: Fine-tuning job cancelled"
            else:
                level, message = "error", f"{why}, {MAX_RESTARTS + 1} times: the job failed"
            await _event(connection, job_id, level, "message", message)
        return status

    async def last_checkpoint(self, job_id: str) -> dict | None:
        pool = await self._pool()
        row = await pool.fetchrow("SELECT step, location FROM fine_tuning_checkpoints WHERE job_id = $1 ORDER BY step "
                                  "DESC LIMIT 1", job_id)
        return dict(row) if row is not None else None

    async def succeeded_adapters(self) -> list[dict]:
        """Every tenant's fine-tuned models, for the requests that name them; the newest last."""
        pool = await self._pool()
        rows = await pool.fetch("SELECT tenant_id, id, model, fine_tuned_model, adapter_location, schedule FROM "
                                "fine_tuning_jobs WHERE status = 'succeeded' AND fine_tuned_model IS NOT NULL "
                                "ORDER BY finished_at, id")
        return [dict(row) for row in rows]


async def _event(connection, job_id: str, level: str, kind: str, message: str, data: dict | None = None) -> None:
    await connection.execute("INSERT INTO fine_tuning_events (job_id, level, type, message, data) VALUES ($1, $2, "
                             "$3, $4, $5)", job_id, level, kind, message, json.dumps(data) if data else None)
