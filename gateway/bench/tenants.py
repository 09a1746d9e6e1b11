"""``gateway bench tenants``: the gateway with many tenants, half from tenants.yaml and half made through the API.

Measures what an admin and the request path feel as the directory grows: the latency and the gateway's own CPU of
an admin write (a tenant made, a key made, a tenant changed), the time and CPU of a reload of tenants.yaml, the
CPU an idle gateway burns, its memory, and the request path: CPU per request and latency with that many tenants
against a gateway with one tenant, in the same run, and chat latency while admin writes run beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from gateway.bench.run import (UNBOUND_LIMITS, WRK_SCRIPT, _cpu_seconds, _rss_mb, _wrk, start_gateway,
                               start_simulator, stop_processes, write_report)
from gateway.config.keys import generate_key, hash_key
from gateway.stores.embedded import EmbeddedServers, free_port

ADMIN_KEY = "sk-gw-admin-bench-" + "x" * 24
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}], "max_tokens": 8}


def run_tenant_benchmark(tenants: int = 10_000, duration: float = 5.0, output: Path | None = None) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("gateway bench tenants needs wrk (Debian: apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-tenants-"))
    processes: list[subprocess.Popen] = []
    stores = EmbeddedServers(workdir / "stores")
    try:
        sim_port = free_port()
        processes.append(start_simulator(sim_port, "--ttft-ms", "5", "--max-num-seqs", "4096"))
        env = {**os.environ, "GATEWAY_BUILTIN_SIMULATOR": "0", "GATEWAY_ADMIN_KEY": ADMIN_KEY,
               "REDIS_URL": stores.start_redis(), "DATABASE_URL": stores.start_postgres()}
        bench_key = generate_key()
        many = _config(workdir / "many", sim_port, tenants // 2, bench_key)
        one = _config(workdir / "one", sim_port, 0, bench_key)

        many_port, one_port = free_port(), free_port()
        started = time.perf_counter()
        gateway = start_gateway(many, many_port, {**env, "GATEWAY_DATA_DIR": str(workdir / "data-many")},
                                workdir / "g.log")
        processes.append(gateway)
        start_seconds = time.perf_counter() - started
        single = start_gateway(one, one_port, {**env, "GATEWAY_DATA_DIR": str(workdir / "data-one")}, workdir / "o.log")
        processes.append(single)

        print(f"  making {tenants - tenants // 2} tenants through the admin API...", file=sys.stderr, flush=True)
        made = asyncio.run(_make_tenants(many_port, tenants - tenants // 2))
        writes = asyncio.run(_measure_writes(many_port, gateway.pid))
        idle = _idle_cpu(gateway.pid, 10.0)
        reload = _measure_reload(many, many_port, gateway.pid)
        # Restarted: the start-up of a gateway that has to read every tenant of both sources.
        gateway.terminate()
        gateway.wait(timeout=60)
        processes.remove(gateway)
        started = time.perf_counter()
        gateway = start_gateway(many, many_port, {**env, "GATEWAY_DATA_DIR": str(workdir / "data-many")},
                                workdir / "g.log")
        processes.append(gateway)
        restart_seconds = time.perf_counter() - started

        script = workdir / "chat.lua"
        script.write_text(WRK_SCRIPT % {"body": json.dumps(CHAT), "key": bench_key})
        url = "/v1/chat/completions"
        request_path = {}
        for name, port, pid in (("one_tenant", one_port, single.pid), ("many_tenants", many_port, gateway.pid)):
            _wrk(f"http://127.0.0.1:{port}{url}", script, 16, 2)  # warm up
            before = _cpu_seconds(pid)
            stats = _wrk(f"http://127.0.0.1:{port}{url}", script, 16, duration)
            request_path[name] = {"rps": round(stats["requests"] / (stats["duration_us"] / 1e6)),
                                  "p50_ms": stats["p50_us"] / 1000, "p99_ms": stats["p99_us"] / 1000,
                                  "cpu_ms_per_request": round((_cpu_seconds(pid) - before) * 1000 / stats["requests"],
                                                              4)}
        during = _chat_while_patching(many_port, script, duration)
        report = {
            "tenants": {"yaml": tenants // 2, "api": made, "total": tenants // 2 + made},
            "first_start_seconds_with_yaml_tenants": round(start_seconds, 2),
            "restart_seconds_with_every_tenant": round(restart_seconds, 2),
            "admin_writes": writes,
            "reload_of_tenants_yaml": reload,
            "idle_cpu_percent": idle,
            "rss_mb": round(_rss_mb(gateway.pid), 1),
            "rss_mb_one_tenant": round(_rss_mb(single.pid), 1),
            "request_path": request_path,
            "request_path_cpu_ratio": round(request_path["many_tenants"]["cpu_ms_per_request"]
                                            / request_path["one_tenant"]["cpu_ms_per_request"], 3),
            "chat_while_30_patches": during,
        }
    finally:
        stop_processes(processes, timeout=30)
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report(report, output)


def _config(folder: Path, sim_port: int, yaml_tenants: int, bench_key: str) -> Path:
    folder.mkdir(parents=True)
    models = {"models": {"bench": {"deployments": [{"name": "sim", "api_base": f"http://127.0.0.1:{sim_port}/v1",
                                                    "model": "sim"}]}}}
    tiers = ("basic", "professional", "enterprise")
    tenants = {f"yaml-{i:05d}": {"name": f"YAML tenant {i}", "tier": tiers[i % 3],
                                 "keys": [{"name": "main", "sha256": hash_key(generate_key())}]}
               for i in range(yaml_tenants)}
    tenants["bench"] = {"name": "Benchmark", "tier": "enterprise", "limits": UNBOUND_LIMITS,
                        "keys": [{"name": "bench", "sha256": hash_key(bench_key)}]}
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    return folder


def _headers() -> dict:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


async def _make_tenants(port: int, count: int, parallel: int = 8) -> int:
    base = f"http://127.0.0.1:{port}/api/v1/organizations"
    made = 0
    async with aiohttp.ClientSession(headers=_headers()) as session:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(count):
            queue.put_nowait(index)

        async def worker() -> None:
            nonlocal made
            while not queue.empty():
                index = queue.get_nowait()
                tenant = f"api-{index:05d}"
                async with session.post(base, json={"id": tenant, "name": f"API tenant {index}"}) as response:
                    if response.status != 201:
                        raise RuntimeError(f"making {tenant}: {response.status} {await response.text()}")
                async with session.post(f"{base}/{tenant}/keys", json={"name": "main"}) as response:
                    if response.status != 201:
                        raise RuntimeError(f"key of {tenant}: {response.status} {await response.text()}")
                made += 1

        await asyncio.gather(*(worker() for _ in range(parallel)))
    return made


async def _measure_writes(port: int, pid: int, count: int = 100) -> dict:
    """One at a time, so that each latency is the write's own: make a tenant, make its key, change it."""
    base = f"http://127.0.0.1:{port}/api/v1/organizations"
    timings: dict[str, list[float]] = {"create_tenant": [], "create_key": [], "patch_tenant": []}
    before = _cpu_seconds(pid)
    async with aiohttp.ClientSession(headers=_headers()) as session:
        for index in range(count):
            tenant = f"timed-{index:04d}"
            for kind, method, url, body in (
                    ("create_tenant", "POST", base, {"id": tenant, "name": f"Timed {index}"}),
                    ("create_key", "POST", f"{base}/{tenant}/keys", {"name": "k"}),
                    ("patch_tenant", "PATCH", f"{base}/{tenant}", {"limits": {"requests_per_minute": 100 + index}})):
                started = time.perf_counter()
                async with session.request(method, url, json=body) as response:
                    await response.read()
                    if response.status >= 300:
                        raise RuntimeError(f"{kind}: {response.status}")
                timings[kind].append((time.perf_counter() - started) * 1000)
    cpu = _cpu_seconds(pid) - before
    result = {kind: {"p50_ms": round(statistics.median(values), 2),
                     "p99_ms": round(sorted(values)[int(len(values) * 0.99) - 1], 2)}
              for kind, values in timings.items()}
    result["gateway_cpu_ms_per_write"] = round(cpu * 1000 / (3 * count), 2)
    return result


def _idle_cpu(pid: int, seconds: float) -> float:
    before = _cpu_seconds(pid)
    time.sleep(seconds)
    return round((_cpu_seconds(pid) - before) / seconds * 100, 2)


def _reloads(port: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('gateway_config_reloads_total{result="applied"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _measure_reload(config: Path, port: int, pid: int) -> dict:
    seen = _reloads(port)
    before = _cpu_seconds(pid)
    started = time.perf_counter()
    with open(config / "tenants.yaml", "a") as handle:
        handle.write("# touched by the benchmark\n")
    while _reloads(port) <= seen:
        if time.perf_counter() - started > 120:
            raise RuntimeError("the edit was not reloaded")
        time.sleep(0.05)
    return {"seconds_until_in_force": round(time.perf_counter() - started, 2),
            "gateway_cpu_seconds": round(_cpu_seconds(pid) - before, 2)}


def _chat_while_patching(port: int, script: Path, duration: float) -> dict:
    """Chat p99 alone, then with 30 PATCH calls running beside it."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    alone = _wrk(url, script, 16, duration)

    async def patches() -> None:
        base = f"http://127.0.0.1:{port}/api/v1/organizations"
        async with aiohttp.ClientSession(headers=_headers()) as session:
            for index in range(30):
                async with session.patch(f"{base}/api-{index:05d}", json={"system_prompt": f"v{index}"}) as r:
                    await r.read()
                await asyncio.sleep(duration / 40)

    import threading

    thread = threading.Thread(target=lambda: asyncio.run(patches()))
    thread.start()
    together = _wrk(url, script, 16, duration)
    thread.join()
    return {"p50_ms_alone": alone["p50_us"] / 1000, "p99_ms_alone": alone["p99_us"] / 1000,
            "p50_ms_with_patches": together["p50_us"] / 1000, "p99_ms_with_patches": together["p99_us"] / 1000}
