"""``gateway bench fleet``: adapter placement on a simulated fleet, against round-robin and least-loaded placement.

Three simulated vLLM nodes with 4 adapter slots each and 200 ms to bring an adapter in; 40 tenants, each with its own
adapter; tenant popularity Zipf-like (s = 1.1); requests arrive at a fixed rate (an open loop: a slow answer does not
slow the arrivals). For each strategy, on fresh nodes: adapter loads per 1,000 requests, latency p50 and p99, and
requests that waited for a load. Then the gateway's own CPU per request for a model on a fleet pool against the same
request to a single deployment.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import yaml

from gateway.bench.run import (UNBOUND_LIMITS, WRK_SCRIPT, _cpu_seconds, _wait, _wrk, start_gateway,
                               start_simulator, write_report)
from gateway.config.keys import generate_key, hash_key
from gateway.stores.embedded import EmbeddedServers, free_port

STRATEGIES = ("adapter_aware", "round_robin", "least_loaded")


def zipf_weights(count: int, s: float) -> list[float]:
    weights = [1 / (rank ** s) for rank in range(1, count + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def run_fleet_benchmark(requests: int = 2000, rate: float = 40.0, tenants: int = 40, zipf_s: float = 1.1,
                        swap_ms: float = 200.0, output: Path | None = None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-fleet-"))
    stores = EmbeddedServers(workdir / "stores")
    try:
        env = {**os.environ, "GATEWAY_BUILTIN_SIMULATOR": "0", "REDIS_URL": stores.start_redis(),
               "DATABASE_URL": stores.start_postgres()}
        rng = random.Random(1)
        order = rng.choices(range(tenants), weights=zipf_weights(tenants, zipf_s), k=requests)
        gaps = [rng.expovariate(rate) for _ in range(requests)]
        results = {}
        for strategy in STRATEGIES:
            print(f"  {strategy}: {requests} requests at {rate:g}/s...", file=sys.stderr, flush=True)
            results[strategy] = _placement_run(workdir / strategy, env, strategy, tenants, order, gaps, swap_ms)
        aware, blind = results["adapter_aware"], results["round_robin"]
        report = {
            "setup": {"nodes": 3, "slots_per_node": 4, "swap_ms": swap_ms, "tenants": tenants, "zipf_s": zipf_s,
                      "requests": requests, "offered_rate_per_second": rate},
            "placement": results,
            "p99_ratio_to_round_robin": round(aware["p99_ms"] / blind["p99_ms"], 3),
            "loads_ratio_to_round_robin": round(aware["adapter_loads_per_1000"] / blind["adapter_loads_per_1000"], 3),
            "fewest_loads_possible_per_1000": _fewest_loads(order, 12),
            "cpu": _cpu_with_and_without_fleet(workdir / "cpu", env),
        }
    finally:
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report(report, output)


def _placement_run(folder: Path, env: dict, strategy: str, tenants: int, order: list[int], gaps: list[float],
                   swap_ms: float) -> dict:
    folder.mkdir(parents=True)
    sim_port = free_port()
    while any(_busy(sim_port + i) for i in range(1, 3)):
        sim_port = free_port()
    sims = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--nodes", "3", "--port", str(sim_port),
                             "--model", "base", "--max-loras", "4", "--lora-swap-ms", str(swap_ms), "--ttft-ms", "40",
                             "--itl-ms", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    keys = [generate_key() for _ in range(tenants)]
    models = {"fleet": {"refresh_seconds": 1, "placement": {"strategy": strategy},
                        "pools": {"gpus": {"model": "base", "max_loras": 4, "nodes": [
                            {"url": f"http://127.0.0.1:{sim_port + i}/v1", "name": f"node{i}"} for i in range(3)]}}},
              "models": {"llama": {"deployments": [{"name": "gpus", "api_base": "fleet:gpus"}]}}}
    tenant_specs = {f"t{i:02d}": {"name": f"Tenant {i}", "tier": "enterprise", "limits": UNBOUND_LIMITS,
                                  "adapters": {f"tuned{i:02d}": {"base": "llama", "path": f"/adapters/t{i:02d}",
                                                                 "default": True}},
                                  "keys": [{"name": "k", "sha256": hash_key(keys[i])}]} for i in range(tenants)}
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenant_specs}))
    port = free_port()
    gateway = None
    try:
        for i in range(3):
            _wait(sims, url=f"http://127.0.0.1:{sim_port + i}/health")
        gateway = start_gateway(folder, port, {**env, "GATEWAY_DATA_DIR": str(folder / "data")},
                                folder / "gateway.log", timeout=60)
        time.sleep(1.5)  # the fleet's first look at the nodes
        latencies, errors = asyncio.run(_open_loop(port, keys, order, gaps))
        stats = [json.loads(urllib.request.urlopen(f"http://127.0.0.1:{sim_port + i}/sim/stats").read())
                 for i in range(3)]
        waited = _metric(port, 'gateway_fleet_adapter_requests_total{result="loaded"}')
    finally:
        for process in (gateway, sims):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    loads = sum(s["lora_loads"] for s in stats)
    ordered = sorted(latencies)
    return {"adapter_loads": loads, "adapter_loads_per_1000": round(loads * 1000 / len(order), 1),
            "node_swaps_per_1000": round(sum(s["lora_swaps"] for s in stats) * 1000 / len(order), 1),
            "requests_that_waited_for_a_load": int(waited), "errors": errors,
            "p50_ms": round(statistics.median(ordered), 1), "p99_ms": round(ordered[int(len(ordered) * 0.99)], 1),
            "mean_ms": round(statistics.fmean(ordered), 1)}


async def _open_loop(port: int, keys: list[str], order: list[int], gaps: list[float]) -> tuple[list[float], int]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    latencies: list[float] = []
    errors = 0

    async def one(session: aiohttp.ClientSession, tenant: int, index: int) -> None:
        nonlocal errors
        body = {"model": "llama", "messages": [{"role": "user", "content": f"question {index}"}], "max_tokens": 8}
        started = time.perf_counter()
        async with session.post(url, json=body, headers={"Authorization": f"Bearer {keys[tenant]}"}) as response:
            await response.read()
            if response.status != 200:
                errors += 1
                return
        latencies.append((time.perf_counter() - started) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        pending = []
        for index, (tenant, gap) in enumerate(zip(order, gaps)):
            await asyncio.sleep(gap)
            pending.append(asyncio.create_task(one(session, tenant, index)))
        await asyncio.gather(*pending)
    return latencies, errors


def _fewest_loads(order: list[int], slots: int) -> float:
    """Loads per 1,000 requests of a clairvoyant placement (Belady: evict what is needed furthest ahead) with all
    of the fleet's slots: a floor no placement can go under on this sequence."""
    upcoming: dict[int, list[int]] = {}
    for position, adapter in enumerate(order):
        upcoming.setdefault(adapter, []).append(position)
    cursor = {adapter: 0 for adapter in upcoming}
    resident: set[int] = set()
    loads = 0
    for adapter in order:
        cursor[adapter] += 1
        if adapter in resident:
            continue
        loads += 1
        if len(resident) >= slots:
            def next_use(a: int) -> int:
                positions = upcoming[a]
                return positions[cursor[a]] if cursor[a] < len(positions) else 1 << 62
            resident.remove(max(resident, key=next_use))
        resident.add(adapter)
    return round(loads * 1000 / len(order), 1)


def _cpu_with_and_without_fleet(folder: Path, env: dict, duration: float = 5.0, rounds: int = 3) -> dict:
    """CPU per request of the same request to a model on a fleet pool of one node and to a plain deployment."""
    folder.mkdir(parents=True)
    sim_port, port = free_port(), free_port()
    sim = start_simulator(sim_port, "--model", "base", "--ttft-ms", "5", "--max-num-seqs", "4096")
    key = generate_key()
    models = {"fleet": {"pools": {"one": {"model": "base", "nodes": [{"url": f"http://127.0.0.1:{sim_port}/v1"}]}}},
              "models": {"on-fleet": {"deployments": [{"name": "one", "api_base": "fleet:one"}]},
                         "direct": {"deployments": [{"name": "sim", "api_base": f"http://127.0.0.1:{sim_port}/v1",
                                                     "model": "base"}]}}}
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {"bench": {
        "name": "B", "tier": "enterprise", "limits": UNBOUND_LIMITS,
        "keys": [{"name": "k", "sha256": hash_key(key)}]}}}))
    gateway = None
    try:
        gateway = start_gateway(folder, port, {**env, "GATEWAY_DATA_DIR": str(folder / "data")},
                                folder / "gateway.log", timeout=60)
        time.sleep(1)
        scripts = {}
        for model in ("on-fleet", "direct"):
            body = {"model": model, "messages": [{"role": "user", "content": "Say something short."}],
                    "max_tokens": 16}
            scripts[model] = folder / f"{model}.lua"
            scripts[model].write_text(WRK_SCRIPT % {"body": json.dumps(body), "key": key})
            _wrk(f"http://127.0.0.1:{port}/v1/chat/completions", scripts[model], 32, 2)
        per_request: dict[str, list[float]] = {"on-fleet": [], "direct": []}
        for _ in range(rounds):
            for model, script in scripts.items():
                before = _cpu_seconds(gateway.pid)
                stats = _wrk(f"http://127.0.0.1:{port}/v1/chat/completions", script, 32, duration)
                per_request[model].append((_cpu_seconds(gateway.pid) - before) * 1000 / stats["requests"])
    finally:
        for process in (gateway, sim):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    fleet, direct = statistics.median(per_request["on-fleet"]), statistics.median(per_request["direct"])
    return {"fleet_cpu_ms_per_request": round(fleet, 4), "direct_cpu_ms_per_request": round(direct, 4),
            "ratio": round(fleet / direct, 3)}


def _metric(port: int, line_start: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _busy(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
