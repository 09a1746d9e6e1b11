"""``gateway bench providers``: what the paths to other providers cost against the direct path (Anthropic and Gemini
translated on the gateway's own client, Azure through LiteLLM), and that the direct path does not pay for LiteLLM.

One simulator speaks every protocol (OpenAI's, Anthropic's Messages API, Gemini's generateContent, Azure OpenAI's
deployment URLs). A gateway with deployments on all of them and a gateway with only the OpenAI-compatible one are
started (start-up time, memory); then, for each protocol, the same load goes straight to the simulator in that
protocol and through the gateway (latency added, the gateway's CPU per request); and the direct path is measured on
both gateways.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from gateway.bench.run import (UNBOUND_LIMITS, _cpu_seconds, _rss_mb, _wait, _wrk, start_simulator, stop_processes,
                               write_report)
from gateway.config.keys import generate_key, hash_key
from gateway.stores.embedded import EmbeddedServers, free_port

PROVIDER_KEY = "sk-bench-provider"
SCRIPT = """
wrk.method = "POST"
wrk.path = [[%(path)s]]
wrk.body = [[%(body)s]]
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"errors":%%d,"non2xx":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d,"mean_us":%%.1f}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""
MESSAGES = [{"role": "user", "content": "Say something short about gateways."}]


def _script(folder: Path, name: str, path: str, body: dict, headers: dict[str, str]) -> Path:
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in {"Content-Type": "application/json",
                                                                 **headers}.items())
    script = folder / f"{name}.lua"
    script.write_text(SCRIPT % {"path": path, "body": json.dumps(body), "headers": lines})
    return script


def run_provider_benchmark(duration: float = 5.0, rounds: int = 3, connections: int = 8,
                           output: Path | None = None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-providers-"))
    stores = EmbeddedServers(workdir / "stores")
    processes = []
    try:
        sim_port = free_port()
        processes.append(start_simulator(sim_port, "--ttft-ms", "5", "--max-num-seqs", "4096"))
        env = {**os.environ, "GATEWAY_BUILTIN_SIMULATOR": "0", "REDIS_URL": stores.start_redis(),
               "DATABASE_URL": stores.start_postgres(), "PROVIDER_KEY": PROVIDER_KEY}
        key = generate_key()
        sim_url = f"http://127.0.0.1:{sim_port}"
        direct = {"name": "sim", "api_base": f"{sim_url}/v1", "model": "gpt", "api_key": "env:PROVIDER_KEY"}
        every = {"direct": {"deployments": [direct]},
                 "claude": {"deployments": [{"name": "anthropic", "provider": "anthropic", "model": "claude-sonnet-4-5",
                                             "api_base": sim_url, "api_key": "env:PROVIDER_KEY"}]},
                 "gemini": {"deployments": [{"name": "gemini", "model": "gemini/gemini-2.5-flash",
                                             "api_base": f"{sim_url}/v1beta", "api_key": "env:PROVIDER_KEY"}]},
                 "azure": {"deployments": [{"name": "azure", "provider": "azure", "model": "my-gpt",
                                            "api_base": sim_url, "api_version": "2024-10-21",
                                            "api_key": "env:PROVIDER_KEY"}]}}
        tenants = {"tenants": {"bench": {"name": "B", "tier": "enterprise", "limits": UNBOUND_LIMITS,
                                         "keys": [{"name": "k", "sha256": hash_key(key)}]}}}
        gateways = {}
        for name, models in (("with_litellm", every), ("without_litellm", {"direct": every["direct"]})):
            folder = workdir / name
            folder.mkdir()
            (folder / "models.yaml").write_text(yaml.safe_dump({"models": models}))
            (folder / "tenants.yaml").write_text(yaml.safe_dump(tenants))
            port = free_port()
            started = time.perf_counter()
            with open(folder / "gateway.log", "wb") as log:
                process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port),
                                            "--config-dir", str(folder)],
                                           env={**env, "GATEWAY_DATA_DIR": str(folder / "data")}, stdout=log,
                                           stderr=subprocess.STDOUT)
            processes.append(process)
            _wait(process, url=f"http://127.0.0.1:{port}/health/ready", timeout=120)
            gateways[name] = {"port": port, "process": process,
                              "start_seconds": round(time.perf_counter() - started, 2),
                              "rss_mb_at_start": round(_rss_mb(process.pid), 1)}

        auth = {"Authorization": f"Bearer {key}"}
        chat = "/v1/chat/completions"
        targets = {  # name: (straight to the simulator, through the gateway)
            "openai": (("/v1/chat/completions", {"model": "gpt", "messages": MESSAGES, "max_tokens": 16},
                        {"Authorization": f"Bearer {PROVIDER_KEY}"}), "direct"),
            "anthropic": (("/v1/messages", {"model": "claude-sonnet-4-5", "messages": MESSAGES, "max_tokens": 16},
                           {"x-api-key": PROVIDER_KEY, "anthropic-version": "2023-06-01"}), "claude"),
            "gemini": (("/v1beta/models/gemini-2.5-flash:generateContent",
                        {"contents": [{"role": "user", "parts": [{"text": MESSAGES[0]["content"]}]}],
                         "generationConfig": {"maxOutputTokens": 16}}, {"x-goog-api-key": PROVIDER_KEY}), "gemini"),
            "azure": (("/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21",
                       {"messages": MESSAGES, "max_tokens": 16}, {"api-key": PROVIDER_KEY}), "azure"),
        }
        with_port, with_pid = gateways["with_litellm"]["port"], gateways["with_litellm"]["process"].pid
        plan = []
        for protocol, ((path, body, headers), model) in targets.items():
            plan.append((f"{protocol}:straight", f"http://127.0.0.1:{sim_port}{path}", None,
                         _script(workdir, f"{protocol}-straight", path, body, headers)))
            plan.append((f"{protocol}:gateway", f"http://127.0.0.1:{with_port}{chat}", with_pid,
                         _script(workdir, f"{protocol}-gateway", chat,
                                 {"model": model, "messages": MESSAGES, "max_tokens": 16}, auth)))
        without = gateways["without_litellm"]
        plan.append(("openai:gateway_without_litellm", f"http://127.0.0.1:{without['port']}{chat}",
                     without["process"].pid, _script(workdir, "without", chat,
                                                      {"model": "direct", "messages": MESSAGES, "max_tokens": 16},
                                                      auth)))
        for _, url, _, script in plan:
            _wrk(url, script, connections, 2)  # warm up
        runs: dict[str, list[dict]] = {name: [] for name, *_ in plan}
        for _ in range(rounds):
            for name, url, pid, script in plan:
                before = _cpu_seconds(pid) if pid else 0.0
                stats = _wrk(url, script, connections, duration)
                stats["cpu_ms"] = (_cpu_seconds(pid) - before) * 1000 / stats["requests"] if pid else None
                runs[name].append(stats)
        median = lambda values: statistics.median(values)  # noqa: E731
        measured = {name: {"p50_ms": median([r["p50_us"] for r in rs]) / 1000,
                           "p99_ms": median([r["p99_us"] for r in rs]) / 1000,
                           "errors": sum(r["errors"] + r["non2xx"] for r in rs),
                           "cpu_ms_per_request": median([r["cpu_ms"] for r in rs]) if rs[0]["cpu_ms"] else None}
                    for name, rs in runs.items()}
        direct_cpu = measured["openai:gateway"]["cpu_ms_per_request"]
        per_protocol = {}
        for protocol in targets:
            straight, through = measured[f"{protocol}:straight"], measured[f"{protocol}:gateway"]
            per_protocol[protocol] = {
                "path": {"openai": "direct", "azure": "litellm"}.get(protocol, "translated"),
                "added_p50_ms": round(through["p50_ms"] - straight["p50_ms"], 3),
                "added_p99_ms": round(through["p99_ms"] - straight["p99_ms"], 3),
                "cpu_ms_per_request": round(through["cpu_ms_per_request"], 4),
                "cpu_ratio_to_direct_path": round(through["cpu_ms_per_request"] / direct_cpu, 3),
                "errors": through["errors"] + straight["errors"]}
        without_cpu = measured["openai:gateway_without_litellm"]["cpu_ms_per_request"]
        report = {
            "setup": {"simulator_latency_ms": 5, "connections": connections, "seconds_per_run": duration,
                      "rounds": rounds},
            "protocols": per_protocol,
            "direct_path_cpu_ms_per_request": {"with_litellm_loaded": round(direct_cpu, 4),
                                               "without_litellm": round(without_cpu, 4),
                                               "ratio": round(direct_cpu / without_cpu, 3)},
            "start_seconds": {name: g["start_seconds"] for name, g in gateways.items()},
            "rss_mb_at_start": {name: g["rss_mb_at_start"] for name, g in gateways.items()},
            "rss_mb_after_load": {name: round(_rss_mb(g["process"].pid), 1) for name, g in gateways.items()},
        }
    finally:
        stop_processes(processes, timeout=30)
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report(report, output)
