"""Process settings from the environment (``GATEWAY_*``); the CLI sets them from its flags before starting.

Everything an admin tunes per model or tenant lives in the YAML files; these are the knobs of the process itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _failure_mode(value: str) -> str:
    value = value.strip().lower()
    if value not in ("open", "closed"):
        raise ValueError(value)
    return value


POSITIVE = (lambda value: value > 0, "more than 0")
NOT_NEGATIVE = (lambda value: value >= 0, "0 or more")
PORT_RANGE = (lambda value: 1 <= value <= 65535, "a port from 1 to 65535")


@dataclass(frozen=True)
class Settings:
    config_dir: Path = Path("config")
    host: str = "127.0.0.1"
    port: int = 4000
    workers: int = 1
    max_body_bytes: int = 16 * 1024 * 1024
    max_admin_body_bytes: int = 1024 * 1024  # bodies of the admin API and every route off the hot path
    max_header_bytes: int = 64 * 1024  # the request line and headers
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive
    body_timeout: float = 30.0  # longest wait for the next piece of a request body
    body_total_timeout: float = 300.0  # longest a whole request body may take to arrive
    keep_alive_timeout: float = 15.0  # an idle kept-alive connection is closed after this long
    reload_interval: float = 2.0  # seconds between checks of the config files
    share_interval: float = 5.0  # seconds between recalibrations of thresholds kept at a target share
    log_level: str = "info"
    log_prompts: bool = False  # write prompt text into the request log lines
    builtin_simulator: bool = True  # serve deployments with api_base: builtin:simulator
    simulator_ttft_ms: float = 20.0
    simulator_itl_ms: float = 5.0
    graceful_shutdown_seconds: float = 30.0
    # Stores. With no URL, `gateway serve` starts embedded servers in data_dir and sets the URL itself.
    redis_url: str | None = None
    database_url: str | None = None
    data_dir: Path = Path("data")
    valkey_port: int | None = None  # the embedded Valkey's port on loopback; a free one when unset
    # What requests get while Redis cannot be reached: "open" serves them without limits, "closed" refuses (503).
    redis_failure_mode: str = "open"
    ledger_batch_size: int = 500
    ledger_flush_seconds: float = 0.2
    # A tenant under half of every limit as last seen this long ago goes upstream while its admission is on the way
    # (gateway.pipeline.limits); 0: every request waits for its admission.
    limits_headroom_seconds: float = 1.0
    # A worker admits a tenant's requests from a lease on its limits (at most a sixteenth of each and a 256th of the
    # budget, while it stays under half of every one) for this long; 0: Redis admits every request
    # (gateway.stores.limits).
    limits_lease_seconds: float = 1.0
    qdrant_url: str | None = None  # a Qdrant server; unset: qdrant-client's local mode in data_dir/qdrant
    qdrant_api_key: str | None = None
    retrieval_model: str = "all-minilm-l6-v2"  # the embedding model of vector stores and chats with retrieval
    indexing_concurrency: int = 2  # files indexed at once by one gateway process
    finetune_storage: str | None = None  # where datasets and adapters are kept; unset: data_dir/finetune
    finetune_trainer: bool = True  # this gateway trains queued fine-tuning jobs on its own worker processes
    finetune_schedule_seconds: float = 30.0  # how often tenants' fine-tuning schedules are looked at
    finetune_stale_seconds: float = 60.0  # a training job without a heartbeat this long lost its gateway
    finetune_beat_seconds: float = 5.0  # how often a training job's heartbeat is written (and a cancel looked for)
    ledger_retention_days: int = 0  # days of ledger rows kept (whole daily partitions dropped after); 0 keeps all
    responses_retention_days: int = 30  # days a stored response of the Responses API is kept (OpenAI's 30)
    ledger_partitions_ahead: int = 7  # days of partitions made ahead
    # A pass-through gateway: keys, model access, logs and metrics, but no limits, ledger or admin API,
    # and no Redis or PostgreSQL.
    stateless: bool = False
    admin_key: str | None = None  # GATEWAY_ADMIN_KEY: an admin key from the environment, besides tenants.yaml's
    metrics_key: str | None = None  # GATEWAY_METRICS_KEY: /metrics answers only it (or an admin key) when set

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        default = cls()

        def get(name: str, convert, fallback, rule: tuple | None = None):
            raw = env.get(f"GATEWAY_{name}")
            if raw is None or raw == "":
                return fallback
            try:
                value = convert(raw)
            except ValueError:
                raise SystemExit(f"GATEWAY_{name}={raw!r} is not a valid {convert.__name__}") from None
            if rule is not None and not (math.isfinite(value) and rule[0](value)):
                raise SystemExit(f"GATEWAY_{name}={raw!r} must be {rule[1]}")
            return value

        return cls(
            config_dir=get("CONFIG_DIR", Path, default.config_dir),
            host=get("HOST", str, default.host),
            port=get("PORT", int, default.port, PORT_RANGE),
            workers=get("WORKERS", int, default.workers, POSITIVE),
            max_body_bytes=get("MAX_BODY_BYTES", int, default.max_body_bytes, POSITIVE),
            max_admin_body_bytes=get("MAX_ADMIN_BODY_BYTES", int, default.max_admin_body_bytes, POSITIVE),
            max_header_bytes=get("MAX_HEADER_BYTES", int, default.max_header_bytes, POSITIVE),
            header_timeout=get("HEADER_TIMEOUT", float, default.header_timeout, POSITIVE),
            body_timeout=get("BODY_TIMEOUT", float, default.body_timeout, POSITIVE),
            body_total_timeout=get("BODY_TOTAL_TIMEOUT", float, default.body_total_timeout, POSITIVE),
            keep_alive_timeout=get("KEEP_ALIVE_TIMEOUT", float, default.keep_alive_timeout, POSITIVE),
            reload_interval=get("RELOAD_INTERVAL", float, default.reload_interval, POSITIVE),
            share_interval=get("SHARE_INTERVAL", float, default.share_interval, POSITIVE),
            log_level=get("LOG_LEVEL", str, default.log_level),
            log_prompts=get("LOG_PROMPTS", _flag, default.log_prompts),
            builtin_simulator=get("BUILTIN_SIMULATOR", _flag, default.builtin_simulator),
            simulator_ttft_ms=get("SIMULATOR_TTFT_MS", float, default.simulator_ttft_ms, NOT_NEGATIVE),
            simulator_itl_ms=get("SIMULATOR_ITL_MS", float, default.simulator_itl_ms, NOT_NEGATIVE),
            graceful_shutdown_seconds=get("GRACEFUL_SHUTDOWN_SECONDS", float, default.graceful_shutdown_seconds,
                                          NOT_NEGATIVE),
            redis_url=env.get("REDIS_URL") or None,
            database_url=env.get("DATABASE_URL") or None,
            data_dir=get("DATA_DIR", Path, default.data_dir),
            valkey_port=get("VALKEY_PORT", int, default.valkey_port, PORT_RANGE),
            redis_failure_mode=get("REDIS_FAILURE_MODE", _failure_mode, default.redis_failure_mode),
            ledger_batch_size=get("LEDGER_BATCH_SIZE", int, default.ledger_batch_size, POSITIVE),
            ledger_flush_seconds=get("LEDGER_FLUSH_SECONDS", float, default.ledger_flush_seconds, POSITIVE),
            limits_headroom_seconds=get("LIMITS_HEADROOM_SECONDS", float, default.limits_headroom_seconds,
                                        (lambda value: 0 <= value <= 60, "from 0 to 60")),
            limits_lease_seconds=get("LIMITS_LEASE_SECONDS", float, default.limits_lease_seconds,
                                     (lambda value: 0 <= value <= 10, "from 0 to 10")),
            ledger_retention_days=get("LEDGER_RETENTION_DAYS", int, default.ledger_retention_days, NOT_NEGATIVE),
            responses_retention_days=get("RESPONSES_RETENTION_DAYS", int, default.responses_retention_days,
                                         (lambda value: 1 <= value <= 3650, "from 1 to 3650")),
            qdrant_url=env.get("QDRANT_URL") or None,
            qdrant_api_key=env.get("QDRANT_API_KEY") or None,
            retrieval_model=get("RETRIEVAL_MODEL", str, default.retrieval_model),
            indexing_concurrency=get("INDEXING_CONCURRENCY", int, default.indexing_concurrency, POSITIVE),
            finetune_storage=env.get("GATEWAY_FINETUNE_STORAGE") or None,
            finetune_trainer=get("FINETUNE_TRAINER", _flag, default.finetune_trainer),
            finetune_schedule_seconds=get("FINETUNE_SCHEDULE_SECONDS", float, default.finetune_schedule_seconds,
                                          POSITIVE),
            finetune_stale_seconds=get("FINETUNE_STALE_SECONDS", float, default.finetune_stale_seconds, POSITIVE),
            finetune_beat_seconds=get("FINETUNE_BEAT_SECONDS", float, default.finetune_beat_seconds, POSITIVE),
            ledger_partitions_ahead=get("LEDGER_PARTITIONS_AHEAD", int, default.ledger_partitions_ahead, POSITIVE),
            admin_key=env.get("GATEWAY_ADMIN_KEY") or None,
            metrics_key=env.get("GATEWAY_METRICS_KEY") or None,
            stateless=get("STATELESS", _flag, default.stateless),
        )
