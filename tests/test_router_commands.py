"""`gateway router train | evaluate | calibrate` on the MMLU routing data shipped with the package and on the
gateway's ledger."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.routing.commands import DEFAULT_DATA
from gateway.routing.scorer import LearnedScorer


def router_output(*args: str, env: dict | None = None) -> str:
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "GATEWAY_ROUTING_DATA"}
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "router", *args], capture_output=True, text=True,
                          timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    return done.stdout


def router(*args: str, env: dict | None = None) -> dict:
    """The command's JSON report (what it prints after it, for models.yaml, is left out)."""
    return json.loads(router_output(*args, env=env).split("\n# for models.yaml:", 1)[0])


def test_the_data_ships_with_the_package():
    assert DEFAULT_DATA.name == "mmlu_routing.jsonl.gz" and DEFAULT_DATA.exists()
    assert (DEFAULT_DATA.parent / "LICENSE-RouteLLM").exists()


def test_evaluate_draws_the_curve_and_beats_random(tmp_path):
    image = tmp_path / "curve.svg"
    report = router("evaluate", "--svg", str(image))
    assert report["held_out_prompts"] > 6000
    routers = {r["name"]: r for r in report["routers"]}
    gateway = routers["rules + learned (the gateway's classifier)"]
    assert gateway["apgr"] > 0.58 and routers["learned scorer"]["apgr"] > 0.58
    assert routers["random"]["apgr"] == 0.5
    assert gateway["share_for_half_the_gap"] < 0.4
    assert gateway["microseconds_per_call"] > 0
    svg = image.read_text()
    assert svg.startswith("<svg") and "random router" in svg and "APGR" in svg


def test_calibrate_sets_thresholds_for_a_large_model_share():
    report = router("calibrate", "--large-share", "0.3", "--critical-share", "0.05")
    assert abs(report["large_share_reached"] - 0.3) < 0.01
    assert abs(report["critical_share_reached"] - 0.05) < 0.01
    thresholds = report["thresholds"]
    assert thresholds["moderate"] <= thresholds["complex"] <= thresholds["critical"]
    pasted = router_output("calibrate", "--large-share", "0.3").split("# for models.yaml:\n", 1)[1]
    assert yaml.safe_load(pasted)["router"]["classifier"]["thresholds"]["complex"] == pytest.approx(
        thresholds["complex"], abs=0.05)
    assert "\\n" not in pasted


def test_train_writes_a_scorer_the_classifier_loads(tmp_path):
    sample = tmp_path / "sample.jsonl"
    lines = gzip.decompress(DEFAULT_DATA.read_bytes()).decode().splitlines()[:600]
    sample.write_text("\n".join(lines) + "\n")
    output = tmp_path / "scorer.json"
    report = router("train", "--data", str(sample), "--scorer", str(output))
    assert report["weights"] > 100 and output.exists()
    scorer = LearnedScorer.load(output)
    assert 0 < scorer.score("What is the capital of France?") < 1
    assert router("evaluate", "--data", str(sample), "--scorer", str(output))["held_out_prompts"] > 200


def test_calibrate_from_the_ledger(stores):
    _migrate(stores)
    stores.query("INSERT INTO usage_ledger (request_id, created_at, tenant_id, route, complexity, route_score, "
                 "status) SELECT 'cal-' || i, now(), 'calibrated', 'chat.completions', 'simple', i / 1000.0, 200 "
                 "FROM generate_series(1, 1000) AS i ON CONFLICT DO NOTHING")
    report = router("calibrate", "--from-ledger", "--tenant", "calibrated", "--large-share", "0.25",
                    env={"DATABASE_URL": stores.database_url})
    assert report["requests"] == 1000 and report["large_share_reached"] == 0.25
    assert report["thresholds"]["complex"] == pytest.approx(0.751, abs=0.002)


def test_bad_arguments_are_refused():
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "router", "calibrate", "--large-share", "1.5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "between 0 and 1" in done.stderr
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "router", "evaluate", "--data",
                           str(Path("/nonexistent.jsonl"))], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no data" in done.stderr


def _migrate(stores) -> None:
    """The ledger's table exists once any gateway of the session has started; make it if none has yet."""
    import asyncio

    import asyncpg

    from gateway.stores.migrations import migrate

    async def run() -> None:
        connection = await asyncpg.connect(stores.database_url)
        try:
            await migrate(connection)
        finally:
            await connection.close()

    asyncio.run(run())
