"""`gateway router train | evaluate | calibrate` on the MMLU routing data shipped with the package and on the
gateway's ledger."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from gateway.routing.commands import DEFAULT_DATA
from gateway.routing.scorer import DEFAULT_PATH, LearnedScorer


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


def test_evaluate_reports_the_held_out_half_and_every_group_left_out(tmp_path):
    image = tmp_path / "curve.svg"
    report = router("evaluate", "--svg", str(image))
    assert report["judged_on"] == "the held-out half" and report["prompts_judged"] > 6000
    routers = {r["name"]: r for r in report["routers"]}
    gateway = routers["rules + learned (the gateway's classifier)"]
    assert gateway["apgr"] > 0.62 and routers["learned scorer alone"]["apgr"] > 0.6
    assert routers["random"]["apgr"] == 0.5
    assert gateway["share_for_half_the_gap"] < 0.4
    assert report["left_out_subjects"] == ["high_school_mathematics"]  # the large model graded below chance
    folds = report["leave_group_out"]["rules + learned (the gateway's classifier)"]
    assert set(folds["folds"]) == {"stem", "humanities", "social_sciences", "other"}
    assert folds["mean_apgr"] == pytest.approx(sum(folds["folds"].values()) / 4, abs=1e-3)
    assert folds["mean_apgr"] > report["leave_group_out"]["rules (no scorer)"]["mean_apgr"] - 0.02 > 0.5
    oracle = report["subject_oracle"]  # knows each subject's mean gain on the very prompts judged
    assert oracle["leave_group_out"]["mean_apgr"] > folds["mean_apgr"] and oracle["held_out_apgr"] > gateway["apgr"]
    assert set(oracle["leave_group_out"]["folds"]) == set(folds["folds"])
    known = report["subject_known"]  # told each subject, its mean gain from the training half
    assert 0.55 < known["held_out_apgr"] < oracle["held_out_apgr"] and known["prompts_judged"] > 6000
    assert 0 < report["microseconds_per_decision"]["rules + learned (the gateway's classifier)"] < 1000
    svg = image.read_text()
    assert svg.startswith("<svg") and "random router" in svg and "APGR" in svg


def test_data_the_scorer_never_saw_is_judged_on_every_row(tmp_path):
    rows = [{"prompt": f"A train leaves at {i} and travels {i * 3} miles; " + "then it stops. " * (i % 7)
             + "How far has it gone?", "weak_correct": i % 7 < 3, "strong_correct": i % 5 != 0} for i in range(300)]
    outside = tmp_path / "outside.jsonl"
    outside.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = router("evaluate", "--data", str(outside), "--every-row")
    assert report["judged_on"] == "every row" and report["prompts_judged"] == 300
    # without subjects the file cannot be the scorer's training data: every row is judged unasked, and its folds,
    # drawn at random in one domain, are not called leave-group-out
    unasked = router("evaluate", "--data", str(outside))
    assert unasked["judged_on"] == "every row" and unasked["prompts_judged"] == 300
    assert "leave_group_out" not in unasked and "random_folds_in_domain" in unasked


def test_the_learning_curve_judges_each_group_on_examples_it_never_trained_on(tmp_path):
    sample = tmp_path / "sample.jsonl"
    lines = gzip.decompress(DEFAULT_DATA.read_bytes()).decode().splitlines()
    sample.write_text("\n".join(lines[::3]) + "\n")  # every third: the larger families keep 1,200+ examples
    curve = router("evaluate", "--data", str(sample), "--learning-curve")["learning_from_labelled_examples"]
    for router_name in ("this scorer's blend", "learned scorer alone"):
        by_size = curve[router_name]
        assert list(by_size) == ["0", "250", "500", "1000"]
        groups = set(by_size["0"]["groups"])
        assert groups and groups <= {"stem", "humanities", "social_sciences", "other"}
        for size in by_size.values():
            assert set(size["groups"]) == groups and 0.3 < size["mean_apgr"] < 0.8


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


def test_train_writes_a_scorer_with_its_blend_and_never_the_shipped_one(tmp_path):
    sample = tmp_path / "sample.jsonl"
    lines = gzip.decompress(DEFAULT_DATA.read_bytes()).decode().splitlines()
    sample.write_text("\n".join(lines[::20]) + "\n")  # every twentieth: all subjects, a few seconds
    output = tmp_path / "scorer.json"
    report = router("train", "--data", str(sample), "--scorer", str(output))
    assert report["weights"] > 100 and output.exists()
    assert set(report["leave_group_out"]["this scorer's blend"]["folds"]) == {"stem", "humanities",
                                                                            "social_sciences", "other"}
    assert report["held_out_half"]["examples"] > 200
    scorer = LearnedScorer.load(output)
    assert scorer.blend == report["blend"] and scorer.blend["critical_words"] == 0.5  # a rule, kept
    assert set(scorer.thresholds) == {"moderate", "complex", "critical"}
    assert 0 < scorer.score("What is the capital of France?") < 1
    assert router("evaluate", "--data", str(sample), "--scorer", str(output))["prompts_judged"] > 200

    shipped = DEFAULT_PATH.read_bytes()
    for args in (("train",), ("train", "--scorer", str(DEFAULT_PATH))):
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "router", *args, "--data", str(sample)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "never overwritten" in done.stderr
    assert DEFAULT_PATH.read_bytes() == shipped


def test_train_from_the_ledger_learns_cascades_and_feedback(stores, tmp_path):
    """Rows as the gateway writes them: hashed words and signals, the cascade's judgement; a bad rating of a sure
    answer counts as needing the large model. Folds hold out one tenant at a time."""
    _migrate(stores)
    from gateway.routing.scorer import features_of

    rows = []
    for i in range(240):
        hard = i % 3 == 0
        text = f"please {'prove the theorem about' if hard else 'say hello to'} item {i}"
        example = json.dumps({"words": list(features_of(text)), "signals": {"length": 0.02}})
        rows.append((f"learn-{i}", f"learner-{i % 3}", example, hard and i % 2 == 0))
    stores.query("INSERT INTO usage_ledger (request_id, created_at, tenant_id, route, complexity, status, "
                 "route_example, cascaded) SELECT r, now(), t, 'chat.completions', 'simple', 200, e::jsonb, c "
                 "FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[]) AS u(r, t, e, c) "
                 "ON CONFLICT DO NOTHING", [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                 [r[3] for r in rows])
    stores.query("INSERT INTO feedback (tenant_id, request_id, rating, created_at, updated_at) "
                 "SELECT 'learner-' || (i % 3), 'learn-' || i, -1, now(), now() FROM generate_series(3, 239, 6) i "
                 "ON CONFLICT DO NOTHING")
    output = tmp_path / "traffic.json"
    report = router("train", "--from-ledger", "--days", "1", "--scorer", str(output),
                    env={"DATABASE_URL": stores.database_url})
    labelled = int(re.match(r"ledger \((\d+) labelled requests\)", report["source"]).group(1))
    assert labelled >= 240  # other tests' traffic in the same database counts too
    folds = report["leave_group_out"]["learned scorer alone"]["folds"]
    assert set(folds) >= {"learner-0", "learner-1", "learner-2"}
    scorer = LearnedScorer.load(output)
    assert scorer.score("please prove the theorem about item 7") > scorer.score("please say hello to item 7")


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



def test_data_that_is_not_labelled_rows_is_refused_by_line(tmp_path):
    for text, words in (("not json\n", "line 1"), ('{"prompt": "x", "weak_correct": true}\n', "strong_correct"),
                        ('[1, 2]\n', "line 1"), ('{"prompt": 5, "weak_correct": 1, "strong_correct": 0}\n', "prompt")):
        data = tmp_path / "bad.jsonl"
        data.write_text(text)
        for command in (["evaluate"], ["train", "--scorer", str(tmp_path / "s.json")]):
            done = subprocess.run([sys.executable, "-m", "gateway.cli", "router", *command, "--data", str(data)],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode != 0 and "Traceback" not in done.stderr, (text, done.stderr)
            assert str(data) in done.stderr and words in done.stderr, (text, done.stderr)
    row = '{"prompt": "What is 2 + 2?", "weak_correct": true, "strong_correct": false}\n'
    for rows in (0, 1, 49):
        data.write_text(row * rows)
        for command in (["evaluate"], ["evaluate", "--every-row"], ["calibrate", "--large-share", "0.2"]):
            done = subprocess.run([sys.executable, "-m", "gateway.cli", "router", *command, "--data", str(data)],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode != 0 and "at least 50" in done.stderr, (rows, command, done.stderr)
    for text in ("[]", "not json", '{"weights": {}}', '{"buckets": 8, "max_tokens": 4, "bias": 0, "weights": []}'):
        scorer = tmp_path / "scorer.json"
        scorer.write_text(text)
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "router", "calibrate", "--large-share", "0.2",
                               "--scorer", str(scorer)], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "Traceback" not in done.stderr, (text, done.stderr)
        assert str(scorer) in done.stderr and "not a scorer" in done.stderr, (text, done.stderr)
        config = tmp_path / "config"
        shutil.copytree(ROOT / "config", config, dirs_exist_ok=True)
        shutil.copy(scorer, config / "mine.json")
        models = yaml.safe_load((config / "models.yaml").read_text())
        models["router"]["classifier"]["scorer"] = "mine.json"
        (config / "models.yaml").write_text(yaml.safe_dump(models))
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", "--config-dir", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "cannot load the scorer" in done.stderr, (text, done.stderr)
    data = tmp_path / "bad.jsonl.gz"
    data.write_bytes(b"not gzip")
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "router", "evaluate", "--data", str(data)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "gzip" in done.stderr, done.stderr


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
