"""``gateway bench summary``: the performance targets side by side from one run, each as a ratio.

It runs the benchmarks that measure them, one after another on the same machine (the main one at 1 and 64
connections, providers, two workers, large prompts), and writes one table: each figure, what was measured, the
target and whether it is met. Each benchmark's own report is kept under ``reports`` in the JSON output.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from gateway.bench.large_prompts import run_large_prompt_benchmark
from gateway.bench.providers import run_provider_benchmark
from gateway.bench.run import run_benchmark
from gateway.bench.workers import run_workers_benchmark


def figures(main: dict, providers: dict, workers: dict, large: dict) -> list[dict]:
    """Each target as measured: (figure, measured, target, unit, met)."""
    rows = []

    def row(figure: str, measured: float, target: float, unit: str, at_most: bool = True) -> None:
        met = measured <= target if at_most else measured >= target
        rows.append({"figure": figure, "measured": round(measured, 3), "target": target, "unit": unit,
                     "at_most": at_most, "met": met})

    for c in ("c1", "c64"):
        summary = main["summary"][c]
        row(f"whole gateway's CPU per request / the pass-through's, {c[1:]} connection(s)",
            summary["gateway_cpu_ratio_to_passthrough"], 1.5, "×")
    c1 = main["summary"]["c1"]
    row("whole gateway's added p50 over the pass-through's, 1 connection",
        c1["gateway_added_p50_ms"] - c1["passthrough_added_p50_ms"], 0.5, "ms")
    direct = providers["protocols"]["openai"]  # the direct path: an OpenAI-compatible upstream, untranslated
    for protocol in ("anthropic", "gemini"):
        measured = providers["protocols"][protocol]
        row(f"{protocol.capitalize()} through the gateway: CPU per request / the direct path's",
            measured["cpu_ratio_to_direct_path"], 1.3, "×")
        row(f"{protocol.capitalize()} through the gateway: added p50 over the direct path's",
            measured["added_p50_ms"] - direct["added_p50_ms"], 0.5, "ms")  # "a few hundred microseconds"
    row("two workers against one: the gateway's scaling / the pass-through's", workers[
        "gateway_scaling_against_the_passthroughs"], 0.9, "×", at_most=False)
    row("other tenants' p99 while 100,000-word prompts arrive / without them", large["p99_ratio"], 1.2, "×")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| Figure | Measured | Target | Met |", "|---|---|---|---|"]
    for r in rows:
        measured = f"{r['measured']:.2f} {r['unit']}".replace(" ×", "×")
        target = f"{'≤' if r['at_most'] else '≥'} {r['target']:g} {r['unit']}".replace(" ×", "×")
        lines.append(f"| {r['figure']} | {measured} | {target} | {'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines)


def run_summary_benchmark(duration: float = 5.0, rounds: int = 3, output: Path | None = None) -> dict:
    reports = {}
    with contextlib.redirect_stdout(sys.stderr):  # each benchmark's own report goes to stderr; the table to stdout
        print("main: direct, pass-through, core, gateway at 1 and 64 connections", flush=True)
        reports["main"] = run_benchmark(duration=duration, rounds=rounds, concurrencies=(1, 64))
        print("providers: Anthropic, Gemini (and Azure through LiteLLM) against their direct paths", flush=True)
        reports["providers"] = run_provider_benchmark(duration=duration, rounds=rounds)
        print("workers: two processes against one", flush=True)
        reports["workers"] = run_workers_benchmark(duration=duration, rounds=rounds)
        print("large prompts: other tenants' latency while 100,000-word prompts arrive", flush=True)
        reports["large_prompts"] = run_large_prompt_benchmark(duration=duration, rounds=rounds)
    rows = figures(reports["main"], reports["providers"], reports["workers"], reports["large_prompts"])
    report = {"figures": rows, "reports": reports}
    if output:
        output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    return report
