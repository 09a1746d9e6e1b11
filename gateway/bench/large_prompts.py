"""``gateway bench large-prompts``: what 100,000-word prompts of one tenant do to the other tenants' latency.

One tenant sends small chat requests (wrk, 8 connections); another sends 100,000-word prompts (857 KB each,
``--rate`` a second, each on its own connection, to a model on a simulator of its own). The small tenant's p50 and
p99 are measured with and without the large prompts, rounds interleaved, through the whole gateway (limits,
ledger). The figure is the
ratio of the p99s. What the gateway does with such a prompt on its event loop: read and parse the body (orjson);
what it does off it: count its tokens (tiktoken, in a worker thread past 256 KiB).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from gateway.bench.run import (UNBOUND_LIMITS, WRK_SCRIPT, _measure, _median, start_gateway, start_simulator,
                               stop_processes, write_report)
from gateway.config.keys import generate_key, hash_key
from gateway.stores.embedded import EmbeddedServers, free_port

SMALL = {"model": "bench", "messages": [{"role": "user", "content": "Say something short about gateways."}],
         "max_tokens": 16}
WORDS = 100_000


def _large_body() -> bytes:
    text = " ".join(f"word{i % 5000}" for i in range(WORDS))
    return json.dumps({"model": "bench-large", "messages": [{"role": "user", "content": text}],
                       "max_tokens": 16}).encode()


class LargePrompts:
    """Sends a large prompt every 1 / ``rate`` seconds until stopped; counts what it sent and what failed."""

    def __init__(self, port: int, key: str, rate: float) -> None:
        self.port, self.key, self.rate = port, key, rate
        self.body = _large_body()
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "LargePrompts":
        self._threads = [threading.Thread(target=self._send_forever, daemon=True)]
        self._threads[0].start()
        return self

    def __exit__(self, *exc) -> None:
        """Stop sending, and wait for the prompts under way (a measurement after this one is made without them)."""
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=60)

    def _send_forever(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += 1 / self.rate
            sender = threading.Thread(target=self._send_one, daemon=True)
            self._threads.append(sender)
            sender.start()
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _send_one(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("POST", "/v1/chat/completions", self.body,
                               {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            self.sent += 1
            self.failed += response.status != 200
        except OSError:
            self.failed += 1
        finally:
            connection.close()


def run_large_prompt_benchmark(duration: float = 5.0, rounds: int = 3, rate: float = 2.0,
                               output: Path | None = None) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("gateway bench needs wrk (Debian: apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-large-"))
    processes = []
    stores = EmbeddedServers(workdir / "stores")
    try:
        sim_port, large_sim_port, gw_port = free_port(), free_port(), free_port()
        processes.append(start_simulator(sim_port, "--ttft-ms", "5", "--max-num-seqs", "4096"))
        # the large prompts go to a simulator of their own: what is measured is the gateway's sharing, not the
        # simulator's (which reads every word of a prompt on its own event loop)
        processes.append(start_simulator(large_sim_port, "--ttft-ms", "5", "--max-num-seqs", "4096"))
        keys = {"small": generate_key(), "large": generate_key()}
        config = workdir / "config"
        config.mkdir()
        (config / "models.yaml").write_text(yaml.safe_dump({"models": {
            "bench": {"deployments": [{"name": "sim", "api_base": f"http://127.0.0.1:{sim_port}/v1", "model": "sim"}]},
            "bench-large": {"deployments": [{"name": "large-sim", "api_base": f"http://127.0.0.1:{large_sim_port}/v1",
                                             "model": "sim"}]}}}))
        (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {name: {
            "name": name.title(), "tier": "enterprise", "limits": UNBOUND_LIMITS,
            "keys": [{"name": name, "sha256": hash_key(key)}]} for name, key in keys.items()}}))
        env = {**os.environ, "GATEWAY_BUILTIN_SIMULATOR": "0", "GATEWAY_DATA_DIR": str(workdir / "data"),
               "REDIS_URL": stores.start_redis(), "DATABASE_URL": stores.start_postgres()}
        gateway = start_gateway(config, gw_port, env, workdir / "gateway.log")
        processes.append(gateway)
        script = workdir / "small.lua"
        script.write_text(WRK_SCRIPT % {"body": json.dumps(SMALL), "key": keys["small"]})
        url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        _measure("warm-up", url, gateway.pid, script, 8, 2)
        with LargePrompts(gw_port, keys["large"], rate):  # and the large prompts' path warmed up too
            time.sleep(2)
        runs = {"alone": [], "with large prompts": []}
        large_sent = large_failed = 0
        for _ in range(rounds):
            runs["alone"].append(_measure("alone", url, gateway.pid, script, 8, duration))
            with LargePrompts(gw_port, keys["large"], rate) as large:
                runs["with large prompts"].append(_measure("with large prompts", url, gateway.pid, script, 8,
                                                           duration))
            large_sent, large_failed = large_sent + large.sent, large_failed + large.failed
        measured = {name: _median(each) for name, each in runs.items()}
        for name, m in measured.items():
            print(f"  {name:<20} {m.rps:8.0f} req/s  p50 {m.p50_ms:7.2f} ms  p99 {m.p99_ms:7.2f} ms  "
                  f"errors {m.errors}", file=sys.stderr, flush=True)
        alone, loaded = measured["alone"], measured["with large prompts"]
        report = {
            "setup": {"small_tenant": "wrk, 8 connections, a short chat request", "large_tenant":
                      f"{WORDS:,}-word prompts ({len(_large_body()) // 1024} KB), {rate:g} a second",
                      "seconds_per_run": duration, "rounds": rounds, "cpus": os.cpu_count()},
            "small_tenant": {name: {"p50_ms": round(m.p50_ms, 2), "p99_ms": round(m.p99_ms, 2),
                                    "requests_per_second": round(m.rps), "errors": m.errors}
                             for name, m in measured.items()},
            "p99_ratio": round(loaded.p99_ms / alone.p99_ms, 3),
            "p50_ratio": round(loaded.p50_ms / alone.p50_ms, 3),
            "large_prompts": {"answered": large_sent - large_failed, "failed": large_failed},
        }
    finally:
        stop_processes(processes)
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report(report, output)
