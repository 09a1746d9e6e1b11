"""``gateway bench protocols``: what serving Anthropic's Messages API and OpenAI's Responses API costs against chat
completions, through the same whole gateway (limits, ledger) to the same simulator, plain and streamed.

Each API asks the same question; the Messages and Responses requests are translated to chat completions and their
answers back. The Responses API's requests are measured twice: kept (``store``, its default: a row in PostgreSQL
each) and not (``store: false``). Figures are ratios within one run: CPU per request of the gateway process, and
latency added over chat completions.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from gateway.bench.run import (WRK_SCRIPT, Measurement, _measure, _median, _wrk, one_model_config, start_gateway,
                               start_simulator, stop_processes, write_report)
from gateway.stores.embedded import EmbeddedServers, free_port

QUESTION = "Say something short about gateways."
MESSAGES_SCRIPT = WRK_SCRIPT.replace('wrk.headers["Authorization"] = "Bearer %(key)s"',
                                     'wrk.headers["x-api-key"] = "%(key)s"\n'
                                     'wrk.headers["anthropic-version"] = "2023-06-01"')


def _bodies() -> dict[str, tuple[str, dict, str]]:
    """name -> (path, body, script template), for each API, plain and streamed."""
    chat = {"model": "bench", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16}
    messages = {"model": "bench", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16}
    responses = {"model": "bench", "input": QUESTION, "max_output_tokens": 16}
    targets = {}
    for suffix, extra in (("", {}), ("-stream", {"stream": True})):
        targets["chat" + suffix] = ("/v1/chat/completions", {**chat, **extra}, WRK_SCRIPT)
        targets["messages" + suffix] = ("/v1/messages", {**messages, **extra}, MESSAGES_SCRIPT)
        targets["responses" + suffix] = ("/v1/responses", {**responses, **extra}, WRK_SCRIPT)
        targets["responses-unstored" + suffix] = ("/v1/responses", {**responses, "store": False, **extra},
                                                  WRK_SCRIPT)
    return targets


def run_protocol_benchmark(duration: float = 5.0, rounds: int = 3, latency_ms: float = 5.0,
                           output: Path | None = None) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("gateway bench needs wrk (Debian: apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-protocols-"))
    processes = []
    stores = EmbeddedServers(workdir / "stores")
    try:
        sim_port, gw_port = free_port(), free_port()
        processes.append(start_simulator(sim_port, "--ttft-ms", str(latency_ms), "--max-num-seqs", "4096"))
        config = workdir / "config"
        key = one_model_config(config, sim_port)
        env = {**os.environ, "GATEWAY_BUILTIN_SIMULATOR": "0", "GATEWAY_DATA_DIR": str(workdir / "data"),
               "REDIS_URL": stores.start_redis(), "DATABASE_URL": stores.start_postgres()}
        gateway = start_gateway(config, gw_port, env, workdir / "gateway.log")
        processes.append(gateway)
        targets = []
        for name, (path, body, template) in _bodies().items():
            script = workdir / f"{name}.lua"
            script.write_text(template % {"body": json.dumps(body), "key": key})
            targets.append((name, f"http://127.0.0.1:{gw_port}{path}", script))
        measurements: list[Measurement] = []
        for connections in (1, 64):
            for _, url, script in targets:
                _wrk(url, script, connections, 2)  # warm up
            runs: dict[str, list[Measurement]] = {name: [] for name, *_ in targets}
            for _ in range(rounds):  # interleaved, so that a noisy moment hits every API alike
                for name, url, script in targets:
                    runs[name].append(_measure(name, url, gateway.pid, script, connections, duration))
            for name, measured in runs.items():
                measurement = _median(measured)
                measurements.append(measurement)
                print(f"  {name:<26} c={connections:<3} {measurement.rps:8.0f} req/s  p50 {measurement.p50_ms:7.2f} ms"
                      f"  cpu {measurement.cpu_ms_per_request or 0:.3f} ms/req  errors {measurement.errors}",
                      file=sys.stderr, flush=True)
        failed = [m for m in measurements if m.errors]
        if failed:  # a refused request costs less than an answered one: the ratios would flatter
            raise SystemExit(f"requests failed during the benchmark: {[(m.target, m.errors) for m in failed]}")
        report = _report(measurements, duration, rounds, latency_ms)
    finally:
        stop_processes(processes)
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report(report, output)


def _report(measurements: list[Measurement], duration: float, rounds: int, latency_ms: float) -> dict:
    by = {(m.target, m.concurrency): m for m in measurements}
    summary = {}
    for connections in (1, 64):
        row = {}
        for suffix in ("", "-stream"):
            chat = by[("chat" + suffix, connections)]
            for api in ("messages", "responses", "responses-unstored"):
                other = by[(api + suffix, connections)]
                label = (api + suffix).replace("-", "_")
                row[f"{label}_cpu_ratio_to_chat"] = round(other.cpu_ms_per_request / chat.cpu_ms_per_request, 3)
                row[f"{label}_added_p50_ms"] = round(other.p50_ms - chat.p50_ms, 3)
            row[f"chat{suffix.replace('-', '_')}_cpu_ms_per_request"] = round(chat.cpu_ms_per_request, 4)
        summary[f"c{connections}"] = row
    return {"setup": {"simulator_latency_ms": latency_ms, "seconds_per_run": duration, "rounds": rounds,
                      "cpus": os.cpu_count(), "load_generator": "wrk -t1"},
            "summary": summary, "runs": [asdict(m) for m in measurements]}
