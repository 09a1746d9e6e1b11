"""`gateway bench` refuses arguments it cannot use before it starts, and leaves no server behind when stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _bench(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "bench", *args], capture_output=True, text=True,
                          timeout=60, **options)


def test_arguments_it_cannot_use_are_refused_before_anything_runs(tmp_path):
    started = time.monotonic()
    for args, words in ((["--baseline", str(tmp_path / "nowhere")], "--baseline"),
                        (["--baseline", str(tmp_path)], "not a checkout of the gateway"),
                        (["--output", str(tmp_path / "missing" / "out.json")], "--output"),
                        (["tenants", "--output", str(tmp_path / "missing" / "out.json")], "--output")):
        done = _bench(*args)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    assert time.monotonic() - started < 30  # refused at once, not after the measurements


def _valkeys() -> set[str]:
    return set(subprocess.run(["pgrep", "-f", "valkey-server"], capture_output=True, text=True).stdout.split())


def _parent(pid: str) -> str:
    return subprocess.run(["ps", "-o", "ppid=", "-p", pid], capture_output=True, text=True).stdout.strip()


def test_a_bench_stopped_with_sigterm_stops_the_servers_it_started(tmp_path):
    valkeys = _valkeys()
    bench = subprocess.Popen([sys.executable, "-m", "gateway.cli", "bench", "tenants", "--tenants", "20000"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        seen = ""
        for line in bench.stdout:
            seen += line
            if "making" in line:  # its stores and gateway are up
                break
        assert "making" in seen, seen
        bench.send_signal(signal.SIGTERM)
        try:
            assert bench.wait(timeout=60) != 0
        except subprocess.TimeoutExpired:  # where it is stuck: every thread's stack, from faulthandler
            bench.send_signal(signal.SIGUSR1)
            time.sleep(2)
            bench.kill()
            raise AssertionError("the bench did not stop within 60 s of SIGTERM:\n" + bench.stdout.read()[-20000:])
    finally:
        bench.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
        # Valkey's command line does not name its folder: a new one left behind is the bench's if its parent is
        # gone (or is the bench); one a test beside this one started has that test's process for parent
        left += sorted(pid for pid in _valkeys() - valkeys if _parent(pid) in ("1", str(bench.pid)))
        if not left:
            break
        time.sleep(0.5)
    assert not left, subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(left)], capture_output=True,
                                    text=True).stdout


def test_the_guardrails_benchmark_reports_cost_and_quality(tmp_path):
    import json
    import subprocess
    import sys

    output = tmp_path / "guardrails.json"
    done = subprocess.run([sys.executable, "-m", "gateway", "bench", "guardrails", "--rounds", "3", "--output",
                           str(output)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["cost_ms"]["typical_chat_request"] > 0 and report["prompt_words"]["huge"] == 100_000
    for name in ("tune", "held_out"):
        by_kind = report["quality"][name]["by_kind"]
        assert set(by_kind) == {"email", "phone", "payment_card", "iban", "us_ssn", "ip_address", "secrets"}
        assert by_kind["iban"]["values"] == 400 and by_kind["email"]["recall"] > 0.9


def test_the_summary_puts_each_target_beside_its_measure():
    """`gateway bench summary` reads the four benchmarks' reports into one table of ratios and targets."""
    from gateway.bench.summary import figures, table

    main = {"summary": {"c1": {"gateway_cpu_ratio_to_passthrough": 2.0, "gateway_added_p50_ms": 1.2,
                               "passthrough_added_p50_ms": 0.6},
                        "c64": {"gateway_cpu_ratio_to_passthrough": 1.4}}}
    providers = {"protocols": {"openai": {"cpu_ratio_to_direct_path": 1.0, "added_p50_ms": 2.0},
                               "anthropic": {"cpu_ratio_to_direct_path": 1.05, "added_p50_ms": 2.15},
                               "gemini": {"cpu_ratio_to_direct_path": 1.4, "added_p50_ms": 2.6}}}
    rows = figures(main, providers, {"gateway_scaling_against_the_passthroughs": 1.3}, {"p99_ratio": 0.9})
    met = {r["figure"]: r["met"] for r in rows}
    assert met["whole gateway's CPU per request / the pass-through's, 1 connection(s)"] is False
    assert met["whole gateway's CPU per request / the pass-through's, 64 connection(s)"] is True
    added = next(r for r in rows if r["figure"].startswith("whole gateway's added p50"))
    assert added["measured"] == 0.6 and added["met"] is False
    assert met["Gemini through the gateway: CPU per request / the direct path's"] is False
    assert met["Anthropic through the gateway: added p50 over the direct path's"] is True
    assert met["Gemini through the gateway: added p50 over the direct path's"] is False
    assert met["two workers against one: the gateway's scaling / the pass-through's"] is True
    text = table(rows)
    assert "| 2.00× | ≤ 1.5× | **no** |" in text and "| 0.90× | ≤ 1.2× | yes |" in text
