"""``gateway bench ledger``: the ledger's write throughput, and the usage and routing reports at 1 and 10 million
rows.

A gateway on embedded stores with 100 tenants. First the batch writer (the gateway's own ``Ledger``, batches of
500, in this process) writes rows as fast as PostgreSQL takes them, with the daily rollups kept by their trigger
and, for comparison, with the trigger off. Then generated rows fill the ledger over the current month, and each
report is timed over HTTP at each size, as a client asks for it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from pathlib import Path

import asyncpg

from gateway.bench.console import ADMIN_KEY, fill, reporting_gateway, time_pages
from gateway.bench.run import write_report
from gateway.stores.ledger import COLUMNS, Ledger


def run_ledger_benchmark(sizes: tuple[int, ...] = (1_000_000, 10_000_000), writes: int = 100_000, rounds: int = 10,
                         output: Path | None = None) -> dict:
    with reporting_gateway("gateway-bench-ledger-") as bench:
        database_url, workdir, tenant_key = bench.database_url, bench.workdir, bench.tenant_key
        throughput = {
            "with_rollups": asyncio.run(_write_rate(database_url, workdir, writes, "with")),
            "without_rollups": asyncio.run(_write_rate(database_url, workdir, writes, "without")),
        }
        throughput["rollups_cost"] = round(1 - throughput["with_rollups"] / throughput["without_rollups"], 3)
        reports, written = {}, 0
        for size in sizes:
            print(f"  filling the ledger to {size:,} generated rows...", file=sys.stderr, flush=True)
            asyncio.run(fill(database_url, written, size - written))
            written = size
            reports[f"{size:,} rows"] = asyncio.run(time_pages(bench.port, _reports(tenant_key), rounds))
        report = {"rows_per_second_written": throughput, "reports_ms": reports,
                  "slowest_report_p95_ms": {size: max(r["p95"] for r in pages.values())
                                            for size, pages in reports.items()}}
    return write_report(report, output)


def _reports(tenant_key: str) -> dict[str, tuple[str, list[str]]]:
    return {
        "a tenant's usage (GET /v1/usage)": (tenant_key, ["/v1/usage"]),
        "a tenant's routing stats (GET /v1/routing/stats)": (tenant_key, ["/v1/routing/stats"]),
        "a tenant's usage, admin API": (ADMIN_KEY, ["/api/v1/organizations/tenant-007/usage"]),
        "usage over every tenant": (ADMIN_KEY, ["/api/v1/usage"]),
        "routing over every tenant": (ADMIN_KEY, ["/api/v1/routing"]),
        "the console's overview (usage and routing, every tenant)": (
            ADMIN_KEY, ["/api/v1/organizations", "/api/v1/usage", "/api/v1/routing"]),
    }


async def _write_rate(database_url: str, workdir: Path, count: int, rollups: str) -> int:
    """Rows a second the gateway's batch writer puts into PostgreSQL, with the rollups' trigger on or off."""
    connection = await asyncpg.connect(database_url)
    await connection.execute(f"ALTER TABLE usage_ledger {'ENABLE' if rollups == 'with' else 'DISABLE'} TRIGGER "
                             f"usage_ledger_rollup")
    ledger = Ledger(database_url, workdir / f"spool-{rollups}", batch_size=500, flush_seconds=0.05)
    await ledger.start()
    now = dt.datetime.now(dt.timezone.utc)
    template = dict.fromkeys(COLUMNS)
    template.update(route="chat.completions", model_requested="auto", model="gpt-4o-mini", deployment="dep",
                    upstream_model="gpt-4o-mini", routing_rule="default:simple->gpt-4o-mini", complexity="simple",
                    prompt_tokens=120, completion_tokens=40, cost_usd=0.0001, latency_ms=120.0, upstream_ms=118.0,
                    overhead_ms=0.4, cache_hit=False, cascaded=False, confidence=0.9, stream=False, status=200)
    started = time.perf_counter()
    for i in range(count):
        template.update(request_id=f"write-{rollups}-{i}", created_at=now.isoformat(),
                        tenant_id=f"tenant-{i % 100:03d}", key_name="main")
        ledger.record(tuple(template[c] for c in COLUMNS))
    await ledger.close()  # every row written
    elapsed = time.perf_counter() - started
    written = await connection.fetchval("SELECT count(*) FROM usage_ledger WHERE request_id LIKE $1",
                                        f"write-{rollups}-%")
    await connection.execute("ALTER TABLE usage_ledger ENABLE TRIGGER usage_ledger_rollup")
    await connection.close()
    if written != count:
        raise SystemExit(f"{count - written} rows were not written")
    return round(count / elapsed)
