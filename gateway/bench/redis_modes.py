"""``gateway bench redis``: the request path on one Redis server against the same on a Redis Cluster.

One simulator, one PostgreSQL, a single Valkey and a Valkey cluster of three masters (no replicas: the figure is
the client's cost, not replication's). Two gateways, one on each, the same config and tenant; wrk loads each in
turn, rounds interleaved; medians reported with the gateway's CPU per request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

from gateway.bench.run import (WRK_SCRIPT, _measure, _median, start_gateway, start_simulator, stop_processes,
                               write_report)
from gateway.bench.tenants import CHAT, _config
from gateway.bench.topologies import Cluster
from gateway.config.keys import generate_key
from gateway.stores.embedded import EmbeddedServers, free_port


def run_redis_benchmark(duration: float = 5.0, rounds: int = 3, connections: int = 32,
                        output: Path | None = None) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("gateway bench redis needs wrk (Debian: apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-redis-"))
    stores = EmbeddedServers(workdir / "stores")
    processes: list[subprocess.Popen] = []
    cluster = None
    try:
        sim_port = free_port()
        processes.append(start_simulator(sim_port, "--ttft-ms", "5", "--max-num-seqs", "4096"))
        cluster = Cluster(workdir / "cluster", replicas=False)
        key = generate_key()
        config = _config(workdir / "config", sim_port, 0, key)
        base = {**os.environ, "GATEWAY_BUILTIN_SIMULATOR": "0", "DATABASE_URL": stores.start_postgres()}
        targets = {}
        for name, url in (("one Redis", stores.start_redis()), ("Redis Cluster (3 masters)", cluster.url)):
            port = free_port()
            env = {**base, "REDIS_URL": url, "GATEWAY_DATA_DIR": str(workdir / f"data-{port}")}
            gateway = start_gateway(config, port, env, workdir / f"{port}.log")
            processes.append(gateway)
            targets[name] = (port, gateway.pid)
        script = workdir / "chat.lua"
        script.write_text(WRK_SCRIPT % {"body": json.dumps(CHAT), "key": key})
        runs: dict[str, list] = {name: [] for name in targets}
        for name, (port, pid) in targets.items():  # warm up
            _measure(name, f"http://127.0.0.1:{port}/v1/chat/completions", pid, script, connections, 2)
        for _ in range(rounds):
            for name, (port, pid) in targets.items():
                runs[name].append(_measure(name, f"http://127.0.0.1:{port}/v1/chat/completions", pid, script,
                                           connections, duration))
        medians = {name: asdict(_median(found)) for name, found in runs.items()}
        single, clustered = medians["one Redis"], medians["Redis Cluster (3 masters)"]
        report = {"connections": connections, "duration_seconds": duration, "rounds": rounds, "targets": medians,
                  "cluster_cpu_ratio": round(clustered["cpu_ms_per_request"] / single["cpu_ms_per_request"], 3)}
    finally:
        stop_processes(processes, timeout=30)
        if cluster is not None:
            cluster.stop()
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report(report, output)
