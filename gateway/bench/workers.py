"""``gateway bench workers``: what a second worker process adds, against what it adds to the bare pass-through.

The same load (wrk, 64 connections, a short chat request, the simulator answering in 5 ms) goes to the pass-through
with one process and with two, and to the whole gateway (limits in Redis, the ledger in PostgreSQL, one embedded
Valkey and PostgreSQL shared by its workers) with ``--workers 1`` and ``--workers 2``, in interleaved rounds. The
figure is the gateway's scaling (its throughput with two workers over one) against the pass-through's, which is
this machine's own ceiling for two processes with everything else (wrk, the simulator, the stores) on the same
cores. CPU per request counts every process of a server (a parent and its workers). Every request the gateway
answered must have its ledger row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway.bench.run import (BODY, CLOCK_TICKS, WRK_SCRIPT, Measurement, _ledger_rows, _median, _wait, _wrk,
                               one_model_config, start_simulator, stop_processes, write_report)
from gateway.stores.embedded import EmbeddedServers, free_port


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children (uvicorn's workers), as /proc has them now."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def _measure(name: str, url: str, pid: int, script: Path, connections: int, duration: float) -> Measurement:
    before = _tree_cpu_seconds(pid)
    stats = _wrk(url, script, connections, duration)
    cpu = _tree_cpu_seconds(pid) - before
    requests = stats["requests"]
    return Measurement(target=name, concurrency=connections, requests=requests,
                       errors=stats["errors"] + stats["non2xx"], rps=requests / (stats["duration_us"] / 1e6),
                       p50_ms=stats["p50_us"] / 1000, p99_ms=stats["p99_us"] / 1000,
                       cpu_ms_per_request=cpu * 1000 / requests if requests else None, rss_mb=0.0)


def run_workers_benchmark(duration: float = 5.0, rounds: int = 3, connections: int = 64,
                          output: Path | None = None) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("gateway bench needs wrk (Debian: apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-workers-"))
    processes: list[subprocess.Popen] = []
    stores = EmbeddedServers(workdir / "stores")
    try:
        sim_port = free_port()
        processes.append(start_simulator(sim_port, "--ttft-ms", "5", "--max-num-seqs", "4096"))
        config = workdir / "config"
        key = one_model_config(config, sim_port)
        env = {**os.environ, "GATEWAY_BUILTIN_SIMULATOR": "0", "GATEWAY_DATA_DIR": str(workdir / "data"),
               "REDIS_URL": stores.start_redis(), "DATABASE_URL": stores.start_postgres(),
               # Qdrant's local mode belongs to one process, so workers need a Qdrant server; no request of this
               # load touches retrieval, so an address where none listens serves (vectors are opened lazily)
               "QDRANT_URL": f"http://127.0.0.1:{free_port()}"}
        servers = {}
        for workers in (1, 2):
            port = free_port()
            process = subprocess.Popen([sys.executable, "-m", "gateway.bench.passthrough", str(port),
                                        f"http://127.0.0.1:{sim_port}/v1", str(workers)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            processes.append(process)
            _wait(process, port=port)
            servers[f"passthrough x{workers}"] = (port, process)
            port = free_port()
            with open(workdir / f"gateway-{workers}.log", "wb") as log:
                process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port),
                                            "--workers", str(workers), "--config-dir", str(config)], env=env,
                                           stdout=log, stderr=subprocess.STDOUT)
            processes.append(process)
            _wait(process, url=f"http://127.0.0.1:{port}/health/ready", timeout=120)
            servers[f"gateway x{workers}"] = (port, process)
        script = workdir / "load.lua"
        script.write_text(WRK_SCRIPT % {"body": json.dumps(BODY), "key": key})
        chat = "/v1/chat/completions"
        sent = 0
        for name, (port, _) in servers.items():  # warm up every worker's connections
            warmed = _wrk(f"http://127.0.0.1:{port}{chat}", script, connections, 2)["requests"]
            sent += warmed if name.startswith("gateway") else 0
        runs: dict[str, list[Measurement]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, (port, process) in servers.items():
                measured = _measure(name, f"http://127.0.0.1:{port}{chat}", process.pid, script, connections,
                                    duration)
                runs[name].append(measured)
                sent += measured.requests if name.startswith("gateway") else 0
                print(f"  {name:<16} {measured.rps:8.0f} req/s  p50 {measured.p50_ms:7.2f} ms  "
                      f"cpu {measured.cpu_ms_per_request or 0:.3f} ms/req", file=sys.stderr, flush=True)
        medians = {name: _median(each) for name, each in runs.items()}
        for name in ("gateway x1", "gateway x2"):  # graceful: each worker's ledger is flushed before it ends
            servers[name][1].terminate()
            servers[name][1].wait(timeout=60)
        rows = _ledger_rows(env["DATABASE_URL"])
        passthrough = medians["passthrough x2"].rps / medians["passthrough x1"].rps
        gateway = medians["gateway x2"].rps / medians["gateway x1"].rps
        report = {
            "setup": {"connections": connections, "seconds_per_run": duration, "rounds": rounds,
                      "simulator_latency_ms": 5, "cpus": os.cpu_count(), "load_generator": "wrk -t1"},
            "servers": {name: {"requests_per_second": round(m.rps), "p50_ms": round(m.p50_ms, 2),
                               "p99_ms": round(m.p99_ms, 2), "cpu_ms_per_request": round(m.cpu_ms_per_request, 4),
                               "errors": m.errors} for name, m in medians.items()},
            "passthrough_scaling": round(passthrough, 3),
            "gateway_scaling": round(gateway, 3),
            "gateway_scaling_against_the_passthroughs": round(gateway / passthrough, 3),
            "gateway_requests_completed": sent,
            "gateway_ledger_rows": rows,
        }
    finally:
        stop_processes(processes)
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report(report, output)
