"""``gateway bench console``: how long the console's pages take with a large ledger behind them.

A gateway on embedded stores, with 100 tenants and ``rows`` generated ledger rows spread over the current month
(the period every page shows by default). Each page is timed as the browser loads it: its API calls made together,
the page ready when the last answers. Reported per page: median and 95th percentile over the rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import aiohttp
import asyncpg
import yaml

from gateway.bench.run import start_gateway, stop_processes, write_report
from gateway.bench.tenants import ADMIN_KEY
from gateway.config.keys import generate_key, hash_key
from gateway.stores.embedded import EmbeddedServers, free_port

TENANTS = 100
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4-turbo", "llama-3.1-8b", "claude-sonnet")
_FILL = """
INSERT INTO usage_ledger (request_id, created_at, tenant_id, key_name, route, model_requested, model, deployment,
                          prompt_tokens, completion_tokens, cost_usd, latency_ms, overhead_ms, cache_hit, cascaded,
                          complexity, routing_rule, confidence, stream, status, error_type)
SELECT 'bench-' || i,
       date_trunc('month', now()) + (random() * (now() - date_trunc('month', now()))),
       'tenant-' || lpad((i % $2)::text, 3, '0'), 'main', 'chat.completions',
       CASE WHEN i % 3 = 0 THEN 'auto' ELSE ($3::text[])[1 + i % 5] END,
       ($3::text[])[1 + i % 5], 'dep-' || (i % 5), 200 + i % 700, 50 + i % 300, (i % 1000) / 1e5, 80 + i % 400,
       1.5, i % 11 = 0, i % 7 = 0,
       CASE WHEN i % 3 = 0 THEN (ARRAY['simple','moderate','complex','critical'])[1 + i % 4] END,
       CASE WHEN i % 3 = 0 THEN 'default:simple->' || ($3::text[])[1 + i % 5] END,
       CASE WHEN i % 3 = 0 THEN 0.5 + (i % 50) / 100.0 END, i % 2 = 0,
       CASE WHEN i % 97 = 0 THEN 429 WHEN i % 89 = 0 THEN 502 ELSE 200 END,
       CASE WHEN i % 97 = 0 THEN 'rate_limit_exceeded' END
FROM generate_series($1::bigint, $1::bigint + $4 - 1) AS i
"""


def run_console_benchmark(rows: int = 100_000, rounds: int = 20, output: Path | None = None) -> dict:
    with reporting_gateway("gateway-bench-console-") as bench:
        print(f"  writing {rows:,} ledger rows...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        asyncio.run(fill(bench.database_url, 0, rows))
        fill_seconds = time.perf_counter() - started
        pages = asyncio.run(time_pages(bench.port, _pages(bench.tenant_key), rounds))
        report = {"ledger_rows": rows, "tenants": TENANTS, "rounds": rounds,
                  "rows_written_seconds": round(fill_seconds, 1), "pages_ms": pages,
                  "slowest_page_p95_ms": max(page["p95"] for page in pages.values())}
    return write_report(report, output)


@dataclass
class ReportingGateway:
    port: int
    tenant_key: str  # tenant-000's
    database_url: str
    workdir: Path


@contextlib.contextmanager
def reporting_gateway(prefix: str) -> Iterator[ReportingGateway]:
    """A gateway on embedded stores with the tenants of ``make_config`` (it has made the ledger's tables);
    stopped, with its stores and folder, when the block ends."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    stores = EmbeddedServers(workdir / "stores")
    gateway = None
    try:
        database_url = stores.start_postgres()
        env = {**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY, "REDIS_URL": stores.start_redis(),
               "DATABASE_URL": database_url, "GATEWAY_DATA_DIR": str(workdir / "data")}
        tenant_key = generate_key()
        port = free_port()
        gateway = start_gateway(make_config(workdir / "config", tenant_key), port, env, workdir / "gateway.log")
        yield ReportingGateway(port, tenant_key, database_url, workdir)
    finally:
        if gateway is not None:
            stop_processes([gateway], timeout=30)
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def make_config(folder: Path, tenant_key: str) -> Path:
    """100 tenants (tenant-000 has ``tenant_key``) and five models on the built-in simulator."""
    folder.mkdir(parents=True)
    models = {"defaults": {"reference_model": "gpt-4o"},
              "models": {name: {"size": "small" if "mini" in name or "8b" in name else "large",
                                "pricing": {"input_per_million": 1.0, "output_per_million": 2.0},
                                "deployments": [{"name": f"{name}-sim", "api_base": "builtin:simulator",
                                                 "model": name}]}
                         for name in MODELS}}
    tenants = {f"tenant-{i:03d}": {"name": f"Tenant {i}", "tier": "enterprise",
                                   "keys": [{"name": "main", "sha256": hash_key(tenant_key if i == 0 else
                                                                                generate_key())}]}
               for i in range(TENANTS)}
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    return folder


async def fill(database_url: str, first: int, rows: int, batch: int = 100_000) -> None:
    """Generated ledger rows ``first`` to ``first + rows`` (request ids bench-N), over this month so far."""
    connection = await asyncpg.connect(database_url)
    try:
        for start in range(first, first + rows, batch):
            await connection.execute(_FILL, start, TENANTS, list(MODELS), min(batch, first + rows - start))
        await connection.execute("ANALYZE usage_ledger")
    finally:
        await connection.close()


def _pages(tenant_key: str) -> dict[str, tuple[str, list[str]]]:
    """Each page: the key it is seen with and the API calls it makes when it opens."""
    return {
        "admin overview (every tenant)": (ADMIN_KEY, ["/api/v1/organizations", "/api/v1/usage", "/api/v1/routing"]),
        "admin overview (one tenant)": (ADMIN_KEY, ["/api/v1/organizations", "/api/v1/organizations/tenant-007/usage",
                                                    "/api/v1/organizations/tenant-007/routing"]),
        "tenants": (ADMIN_KEY, ["/api/v1/organizations"]),
        "tenant detail": (ADMIN_KEY, ["/api/v1/organizations/tenant-007", "/api/v1/organizations/tenant-007/keys"]),
        "recent requests": (ADMIN_KEY, ["/api/v1/requests?limit=100"]),
        "recent requests (tenant and status)": (ADMIN_KEY, ["/api/v1/requests?limit=100&tenant=tenant-007&status=429"]),
        "health": (ADMIN_KEY, ["/api/v1/status"]),
        "tenant account": (tenant_key, ["/v1/account"]),
        "tenant usage": (tenant_key, ["/v1/usage", "/v1/routing/stats"]),
        "console files": (ADMIN_KEY, ["/console/", "/console/console.js", "/console/charts.js",
                                      "/console/console.css"]),
    }


async def time_pages(port: int, pages: dict[str, tuple[str, list[str]]], rounds: int) -> dict[str, dict]:
    """Median and 95th percentile milliseconds of each page: its calls made at once, done when the last answers."""
    base = f"http://127.0.0.1:{port}"
    results: dict[str, dict] = {}
    async with aiohttp.ClientSession() as session:
        async def get(path: str, key: str) -> None:
            async with session.get(base + path, headers={"Authorization": f"Bearer {key}"}) as answer:
                await answer.read()
                if answer.status != 200:
                    raise SystemExit(f"{path}: {answer.status}")

        for name, (key, paths) in pages.items():
            await asyncio.gather(*(get(path, key) for path in paths))  # warm: connections, plans
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                await asyncio.gather(*(get(path, key) for path in paths))
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            results[name] = {"median": round(statistics.median(times), 1),
                             "p95": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1)}
    return results
