"""``gateway bench``: the same load straight to the simulator, through a bare pass-through, through the gateway's
core path (stateless: auth, config, forwarding, logs, metrics) and through the whole gateway (limits in Redis and
the ledger in PostgreSQL on top), forwarded as named, routed by the classifier, and answered from the response cache.

Everything runs in one go on this machine, so the figures are ratios within one run, never absolutes compared
across machines. Load comes from wrk (a separate C process); CPU time and memory are read from /proc for the
process under test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from gateway.config.keys import generate_key, hash_key
from gateway.stores.embedded import EmbeddedServers, free_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
THROUGH_GATEWAY = ("gateway", "routed", "cached")  # the targets served by the full gateway, counted in its ledger
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say something short about gateways."}],
        "max_tokens": 16}

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"errors":%%d,"non2xx":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d,"mean_us":%%.1f}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


# Limits no benchmark reaches: every request is counted, none refused
UNBOUND_LIMITS = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "tokens_per_hour": 10**12,
                  "concurrent_requests": 10**6, "calls_per_day": 10**9, "monthly_budget_usd": 10**6}


@dataclass
class Measurement:
    target: str
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float | None
    rss_mb: float | None


def _wait(process: subprocess.Popen, url: str | None = None, port: int | None = None, timeout: float = 30) -> None:
    """Until ``url`` answers (or ``port`` accepts connections); fail at once if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if url is not None:
                urllib.request.urlopen(url, timeout=1).read()
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url or f"port {port}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wrk(url: str, script: Path, connections: int, duration: float) -> dict:
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    )
    line = next(l for l in result.stdout.splitlines() if l.startswith("WRKJSON "))
    return json.loads(line.removeprefix("WRKJSON "))


def _measure(name: str, url: str, pid: int, script: Path, connections: int, duration: float) -> Measurement:
    before = _cpu_seconds(pid)
    stats = _wrk(url, script, connections, duration)
    cpu = _cpu_seconds(pid) - before
    requests = stats["requests"]
    return Measurement(
        target=name, concurrency=connections, requests=requests, errors=stats["errors"] + stats["non2xx"],
        rps=requests / (stats["duration_us"] / 1e6), p50_ms=stats["p50_us"] / 1000, p99_ms=stats["p99_us"] / 1000,
        cpu_ms_per_request=cpu * 1000 / requests if requests else None, rss_mb=_rss_mb(pid),
    )


def _median(runs: list[Measurement]) -> Measurement:
    """One figure per target: the median of its rounds, field by field (the machine is shared and noisy)."""
    middle = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    first = runs[0]
    return Measurement(
        target=first.target, concurrency=first.concurrency, requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs), rps=middle([r.rps for r in runs]),
        p50_ms=middle([r.p50_ms for r in runs]), p99_ms=middle([r.p99_ms for r in runs]),
        cpu_ms_per_request=middle([r.cpu_ms_per_request for r in runs]), rss_mb=max(r.rss_mb for r in runs),
    )


def run_benchmark(duration: float = 5.0, latency_ms: float = 5.0, output: Path | None = None, rounds: int = 3,
                  baseline: Path | None = None, concurrencies: tuple[int, ...] = (1, 64, 128)) -> dict:
    """``baseline``: a checkout of another version of the gateway, whose core and whole gateway are measured in the
    same run, interleaved with this one's (an A/B on one noisy machine)."""
    if shutil.which("wrk") is None:
        raise SystemExit("gateway bench needs wrk (Debian: apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    processes: list[subprocess.Popen] = []
    python = sys.executable
    try:
        sim_port, pass_port, gw_port, core_port = free_port(), free_port(), free_port(), free_port()
        sim = start_simulator(sim_port, "--ttft-ms", str(latency_ms), "--max-num-seqs", "4096")
        processes.append(sim)

        key = generate_key()
        config = workdir / "config"
        config.mkdir()
        on_sim = [{"name": "sim", "api_base": f"http://127.0.0.1:{sim_port}/v1", "model": "sim"}]
        # "bench" is forwarded as named; "auto" is classified and routed between the two sized models (with the
        # cascade's judgement of every small-model answer), all on the same simulator.
        (config / "models.yaml").write_text(yaml.safe_dump({"models": {
            "bench": {"deployments": on_sim},
            "bench-small": {"size": "small", "deployments": on_sim},
            "bench-large": {"size": "large", "deployments": on_sim}}}))
        # Every limit is checked and counted, none binds: the load measures their cost, not their refusals.
        (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {"bench": {
            "name": "Benchmark", "tier": "enterprise", "limits": UNBOUND_LIMITS,
            "keys": [{"name": "bench", "sha256": hash_key(key)}]}}}))
        stores = EmbeddedServers(workdir / "stores")
        env = {**os.environ, "GATEWAY_BUILTIN_SIMULATOR": "0", "GATEWAY_DATA_DIR": str(workdir / "data"),
               "REDIS_URL": stores.start_redis(), "DATABASE_URL": stores.start_postgres()}
        with open(workdir / "gateway.log", "wb") as log:
            gateway = subprocess.Popen([python, "-m", "gateway", "serve", "--port", str(gw_port), "--config-dir",
                                        str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(gateway)
        with open(workdir / "core.log", "wb") as log:
            core = subprocess.Popen([python, "-m", "gateway", "serve", "--port", str(core_port), "--config-dir",
                                     str(config)], env={**env, "GATEWAY_STATELESS": "1"}, stdout=log,
                                    stderr=subprocess.STDOUT)
        processes.append(core)
        baseline_targets = []
        if baseline is not None:
            old_env = {**env, "PYTHONPATH": str(baseline.resolve()), "GATEWAY_DATA_DIR": str(workdir / "data-old")}
            for name, extra in (("baseline-core", {"GATEWAY_STATELESS": "1"}), ("baseline-gateway", {})):
                port = free_port()
                with open(workdir / f"{name}.log", "wb") as log:
                    process = subprocess.Popen([python, "-m", "gateway", "serve", "--port", str(port), "--config-dir",
                                                str(config)], env={**old_env, **extra}, cwd=baseline, stdout=log,
                                               stderr=subprocess.STDOUT)
                processes.append(process)
                _wait(process, url=f"http://127.0.0.1:{port}/health/ready")
                baseline_targets.append((name, port, process))
        passthrough = subprocess.Popen([python, "-m", "gateway.bench.passthrough", str(pass_port),
                                        f"http://127.0.0.1:{sim_port}/v1"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        processes.append(passthrough)
        _wait(gateway, url=f"http://127.0.0.1:{gw_port}/health/ready")
        _wait(core, url=f"http://127.0.0.1:{core_port}/health/ready")
        _wait(passthrough, port=pass_port)

        def load_script(name: str, body: dict) -> Path:
            path = workdir / f"{name}.lua"
            path.write_text(WRK_SCRIPT % {"body": json.dumps(body), "key": key})
            return path

        script = load_script("load", BODY)
        routed_script = load_script("routed", {**BODY, "model": "auto"})
        # The same question every time, deterministic: after the first, every request is answered from the cache.
        cached_script = load_script("cached", {**BODY, "temperature": 0})
        chat = "/v1/chat/completions"
        targets = [
            ("direct", f"http://127.0.0.1:{sim_port}{chat}", sim.pid, script),
            ("passthrough", f"http://127.0.0.1:{pass_port}{chat}", passthrough.pid, script),
            ("core", f"http://127.0.0.1:{core_port}{chat}", core.pid, script),
            ("gateway", f"http://127.0.0.1:{gw_port}{chat}", gateway.pid, script),
            ("routed", f"http://127.0.0.1:{gw_port}{chat}", gateway.pid, routed_script),
            ("cached", f"http://127.0.0.1:{gw_port}{chat}", gateway.pid, cached_script),
        ] + [(name, f"http://127.0.0.1:{port}{chat}", process.pid, script) for name, port, process in baseline_targets]
        measurements, sent = [], 0
        for connections in concurrencies:
            for name, url, _, load in targets:  # warm up: connections, caches, allocator
                warmed = _wrk(url, load, connections, 2)["requests"]
                if name in THROUGH_GATEWAY:
                    sent += warmed
            rounds_by_target: dict[str, list[Measurement]] = {name: [] for name, *_ in targets}
            for _ in range(rounds):  # interleaved, so that a noisy moment hits every target alike
                for name, url, pid, load in targets:
                    rounds_by_target[name].append(_measure(name, url, pid, load, connections, duration))
            for name, runs in rounds_by_target.items():
                measurement = _median(runs)
                measurements.append(measurement)
                print(f"  {name:<12} c={connections:<4} {measurement.rps:8.0f} req/s  p50 {measurement.p50_ms:7.2f} ms"
                      f"  p99 {measurement.p99_ms:7.2f} ms  cpu {measurement.cpu_ms_per_request or 0:.3f} ms/req"
                      f"  errors {measurement.errors}", file=sys.stderr, flush=True)
        gateway.terminate()  # graceful: the ledger is flushed before the process ends
        gateway.wait(timeout=60)
        logged = sum(1 for line in (workdir / "gateway.log").read_text().splitlines()
                     if '"event":"request"' in line and '"route":"chat.completions"' in line)
        rows = _ledger_rows(env["DATABASE_URL"])
        sent += sum(m.requests for m in measurements if m.target in THROUGH_GATEWAY)
        report = _report(measurements, latency_ms, duration, rounds, logged, rows, sent, bool(baseline_targets),
                         concurrencies)
        report["classifier_microseconds_per_request"] = classifier_cost()
    finally:
        stop_processes(processes)
        if "stores" in locals():
            stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report(report, output)


def one_model_config(folder: Path, sim_port: int) -> str:
    """A config folder with one model ("bench", on the simulator at ``sim_port``) and one tenant whose limits
    never bind; returns the tenant's key."""
    key = generate_key()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models.yaml").write_text(yaml.safe_dump({"models": {"bench": {"deployments": [
        {"name": "sim", "api_base": f"http://127.0.0.1:{sim_port}/v1", "model": "sim"}]}}}))
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {"bench": {
        "name": "Benchmark", "tier": "enterprise", "limits": UNBOUND_LIMITS,
        "keys": [{"name": "bench", "sha256": hash_key(key)}]}}}))
    return key


def start_simulator(port: int, *options: str) -> subprocess.Popen:
    """``gateway sim`` on ``port`` with ``options``, returned once it answers /health."""
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--port", str(port), *options],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _ready(sim, f"http://127.0.0.1:{port}/health", 30)


def start_gateway(config: Path, port: int, env: dict, log: Path, timeout: float = 300) -> subprocess.Popen:
    """``gateway serve`` on ``port`` for the config folder ``config``, its output in ``log``, returned once ready."""
    with open(log, "ab") as handle:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port), "--config-dir",
                                    str(config)], env=env, stdout=handle, stderr=subprocess.STDOUT)
    return _ready(process, f"http://127.0.0.1:{port}/health/ready", timeout)


def _ready(process: subprocess.Popen, url: str, timeout: float) -> subprocess.Popen:
    try:
        _wait(process, url=url, timeout=timeout)
    except BaseException:
        process.kill()  # a process that never became ready is not left behind
        raise
    return process


def stop_processes(processes: list[subprocess.Popen], timeout: float = 10) -> None:
    """Terminate every process still running, then wait for each (killing one that does not stop in time)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()


def write_report(report: dict, output: Path | None) -> dict:
    """Print a benchmark's report as JSON, and write it to ``output`` too when given."""
    text = json.dumps(report, indent=2)
    if output:
        output.write_text(text + "\n")
    print(text)
    return report


def classifier_cost(calls: int = 20_000) -> dict:
    """Microseconds per classification of chat requests (medians of five runs), in this process."""
    import statistics

    from gateway.routing.classifier import Classifier
    from gateway.routing.scorer import LearnedScorer

    bodies = [{"model": "auto", "messages": [{"role": "user", "content": text}]} for text in CLASSIFIED_PROMPTS]
    long_body = {"model": "auto", "messages": [{"role": "system", "content": "You are a careful analyst."},
                                               {"role": "user", "content": LONG_PROMPT}]}
    scorer = LearnedScorer.load()
    classifier = Classifier(weights=scorer.blend, scorer=scorer)  # as the shipped models.yaml runs it

    def per_call(sample: list[dict]) -> float:
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for index in range(calls):
                classifier.classify(sample[index % len(sample)])
            runs.append((time.perf_counter() - started) / calls * 1e6)
        return round(statistics.median(runs), 1)

    return {"short_chat_prompts": per_call(bodies), "a_3000_character_prompt": per_call([long_body])}


CLASSIFIED_PROMPTS = (
    "Hi, how are you?",
    "Tell me about incident management",
    "Analyze the root cause of database outage last night and recommend changes to the replication architecture",
    "We had a security breach exposing patient records; draft the HIPAA incident response plan",
    "Write a Python function that merges two sorted lists",
    "Translate 'good morning' to French",
)
LONG_PROMPT = ("Our payments service times out under load. The database connection pool is sized at 20, the "
               "service runs 12 replicas, and p99 latency rises from 80 ms to 4 s during the evening peak. ") * 16


def _ledger_rows(dsn: str) -> int:
    import asyncio

    import asyncpg

    async def count() -> int:
        connection = await asyncpg.connect(dsn)
        try:
            return await connection.fetchval("SELECT count(*) FROM usage_ledger")
        finally:
            await connection.close()

    return asyncio.run(count())


def _report(measurements: list[Measurement], latency_ms: float, duration: float, rounds: int, logged: int,
            rows: int, sent: int, with_baseline: bool = False, concurrencies: tuple[int, ...] = (1, 64, 128)) -> dict:
    by = {(m.target, m.concurrency): m for m in measurements}
    summary = {}
    most = max(concurrencies)
    for c in concurrencies:
        direct, floor, gw, core = by[("direct", c)], by[("passthrough", c)], by[("gateway", c)], by[("core", c)]
        routed, cached = by[("routed", c)], by[("cached", c)]
        summary[f"c{c}"] = {
            "gateway_added_p50_ms": round(gw.p50_ms - direct.p50_ms, 3),
            "gateway_added_p99_ms": round(gw.p99_ms - direct.p99_ms, 3),
            "passthrough_added_p50_ms": round(floor.p50_ms - direct.p50_ms, 3),
            "passthrough_added_p99_ms": round(floor.p99_ms - direct.p99_ms, 3),
            "gateway_throughput_ratio_to_direct": round(gw.rps / direct.rps, 3),
            "passthrough_throughput_ratio_to_direct": round(floor.rps / direct.rps, 3),
            "gateway_cpu_ms_per_request": round(gw.cpu_ms_per_request, 4),
            "passthrough_cpu_ms_per_request": round(floor.cpu_ms_per_request, 4),
            "gateway_cpu_ratio_to_passthrough": round(gw.cpu_ms_per_request / floor.cpu_ms_per_request, 3),
            "core_added_p50_ms": round(core.p50_ms - direct.p50_ms, 3),
            "core_added_p99_ms": round(core.p99_ms - direct.p99_ms, 3),
            "core_throughput_ratio_to_direct": round(core.rps / direct.rps, 3),
            "core_cpu_ms_per_request": round(core.cpu_ms_per_request, 4),
            "core_cpu_ratio_to_passthrough": round(core.cpu_ms_per_request / floor.cpu_ms_per_request, 3),
            "gateway_cpu_ratio_to_core": round(gw.cpu_ms_per_request / core.cpu_ms_per_request, 3),
            "routed_added_p50_ms": round(routed.p50_ms - direct.p50_ms, 3),
            "routed_added_p99_ms": round(routed.p99_ms - direct.p99_ms, 3),
            "routed_throughput_ratio_to_direct": round(routed.rps / direct.rps, 3),
            "routed_cpu_ms_per_request": round(routed.cpu_ms_per_request, 4),
            "routed_cpu_ratio_to_gateway": round(routed.cpu_ms_per_request / gw.cpu_ms_per_request, 3),
            # A hit calls no model: its whole latency is the gateway's (auth, limits, the Redis read, the ledger).
            "cache_hit_p50_ms": round(cached.p50_ms, 3),
            "cache_hit_p99_ms": round(cached.p99_ms, 3),
            "cache_hit_rps": round(cached.rps),
            "cache_hit_throughput_ratio_to_direct": round(cached.rps / direct.rps, 3),
            "cache_hit_cpu_ms_per_request": round(cached.cpu_ms_per_request, 4),
        }
        if with_baseline:
            old_core, old_gateway = by[("baseline-core", c)], by[("baseline-gateway", c)]
            summary[f"c{c}"].update({
                "baseline_core_cpu_ms_per_request": round(old_core.cpu_ms_per_request, 4),
                "baseline_gateway_cpu_ms_per_request": round(old_gateway.cpu_ms_per_request, 4),
                "core_cpu_ratio_to_baseline": round(core.cpu_ms_per_request / old_core.cpu_ms_per_request, 3),
                "gateway_cpu_ratio_to_baseline": round(gw.cpu_ms_per_request / old_gateway.cpu_ms_per_request, 3),
                "baseline_gateway_added_p50_ms": round(old_gateway.p50_ms - direct.p50_ms, 3),
                "baseline_gateway_added_p99_ms": round(old_gateway.p99_ms - direct.p99_ms, 3),
            })
    return {
        "setup": {"simulator_latency_ms": latency_ms, "seconds_per_run": duration, "rounds": rounds, "workers": 1,
                  "cpus": os.cpu_count(), "load_generator": "wrk -t1"},
        "summary": summary,
        "gateway_rss_mb": round(by[("gateway", most)].rss_mb, 1),
        "core_rss_mb": round(by[("core", most)].rss_mb, 1),
        "passthrough_rss_mb": round(by[("passthrough", most)].rss_mb, 1),
        "gateway_requests_completed": sent,  # as wrk counts them, warm-ups included
        "gateway_request_log_lines": logged,
        "gateway_ledger_rows": rows,
        "runs": [asdict(m) for m in measurements],
    }
