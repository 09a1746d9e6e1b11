"""``gateway router train | evaluate | calibrate``: the learned scorer and the thresholds, judged on real data."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gateway.routing.classifier import Classifier, Thresholds
from gateway.routing.evaluate import RouterReport, judge, load_examples, split, svg, threshold_for_share
from gateway.routing.scorer import DEFAULT_PATH, LearnedScorer

# The labelled MMLU prompts shipped with the package (RouteLLM's, Apache-2.0: data/LICENSE-RouteLLM);
# GATEWAY_ROUTING_DATA names another file.
PACKAGED_DATA = Path(__file__).with_name("data") / "mmlu_routing.jsonl.gz"
DEFAULT_DATA = Path(os.environ.get("GATEWAY_ROUTING_DATA") or PACKAGED_DATA)


def train(data: Path, output: Path, use_all: bool) -> dict:
    """Fit the scorer on the training half (or on everything with ``use_all``) and write it to ``output``."""
    examples = load_examples(data)
    train_set = examples if use_all else split(examples)[0]
    started = time.perf_counter()
    scorer = LearnedScorer.train([(e.prompt, e.strong_correct and not e.weak_correct) for e in train_set])
    scorer.meta = {"trained_on": data.name, "examples": len(train_set), "split": "all" if use_all else "train half",
                   "label": "large model right where the small one is wrong",
                   "seconds": round(time.perf_counter() - started, 1)}
    scorer.save(output)
    return {"output": str(output), **scorer.meta, "weights": len(scorer.weights)}


def evaluate(data: Path, scorer_path: Path, image: Path | None) -> dict:
    """Judge the rules, the learned scorer and both together on the held-out half, beside the random router."""
    test = split(load_examples(data))[1]
    scorer = LearnedScorer.load(scorer_path)
    rules = Classifier(scorer=None)
    combined = Classifier(scorer=scorer)
    reports = [
        judge("rules", lambda text: rules.score_text(text)[0], test),
        judge("learned scorer", scorer.score, test),
        judge("rules + learned (the gateway's classifier)", lambda text: combined.score_text(text)[0], test),
    ]
    weak = sum(e.weak_correct for e in test) / len(test)
    strong = sum(e.strong_correct for e in test) / len(test)
    if image is not None:
        image.write_text(svg(reports, weak, strong, f"{data.name}: {len(test)} held-out prompts"))
    return {
        "data": data.name,
        "held_out_prompts": len(test),
        "small_model_accuracy": round(weak, 4),
        "large_model_accuracy": round(strong, 4),
        "routers": [_summary(r, weak, strong) for r in reports] + [
            {"name": "random", "apgr": 0.5, "share_for_half_the_gap": 0.5, "share_for_80_percent_of_the_gap": 0.8}],
    }


def calibrate(data: Path, scorer_path: Path, large_share: float, critical_share: float | None) -> dict:
    """The thresholds that send ``large_share`` of requests like these to the large model (COMPLEX and up) and
    ``critical_share`` to the largest (CRITICAL), measured on the held-out half."""
    examples = split(load_examples(data))[1]
    classifier = Classifier(scorer=LearnedScorer.load(scorer_path))
    scores = [classifier.score_text(e.prompt)[0] for e in examples]
    result = _thresholds(scores, large_share, critical_share)
    sent = [s >= result["thresholds"]["complex"] for s in scores]
    accuracy = sum((e.strong_correct if big else e.weak_correct) for e, big in zip(examples, sent)) / len(examples)
    return {"data": data.name, "prompts": len(examples), **result, "accuracy_on_this_data": round(accuracy, 4)}


async def calibrate_from_ledger(database_url: str, tenant: str | None, days: int, large_share: float,
                                critical_share: float | None) -> dict:
    """The same thresholds from the scores of the requests the gateway has routed (its usage ledger)."""
    import asyncpg

    query = ("SELECT route_score FROM usage_ledger WHERE route_score IS NOT NULL "
             "AND created_at >= now() - make_interval(days => $1)" + (" AND tenant_id = $2" if tenant else ""))
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(query, days, *([tenant] if tenant else []))
    finally:
        await connection.close()
    if not rows:
        raise SystemExit("gateway router calibrate: no routed requests in the ledger for that period")
    scores = [row["route_score"] for row in rows]
    result = {"source": "ledger", "tenant": tenant, "days": days, "requests": len(scores),
              **_thresholds(scores, large_share, critical_share)}
    if len(scores) < 200:
        result["warning"] = "fewer than 200 routed requests: these thresholds are rough"
    return result


def _thresholds(scores: list[float], large_share: float, critical_share: float | None) -> dict:
    current = Thresholds()
    complex_at = threshold_for_share(scores, large_share)
    critical_at = threshold_for_share(scores, critical_share) if critical_share else max(current.critical,
                                                                                          complex_at)
    moderate_at = min(current.moderate, complex_at)
    reached = sum(s >= complex_at for s in scores) / len(scores)
    return {
        "large_share_asked": large_share,
        "large_share_reached": round(reached, 4),
        "critical_share_reached": round(sum(s >= critical_at for s in scores) / len(scores), 4),
        "thresholds": {"moderate": round(moderate_at, 4), "complex": round(complex_at, 4),
                       "critical": round(max(critical_at, complex_at), 4)},
        "models_yaml": (f"router:\n  classifier:\n    thresholds: {{moderate: {moderate_at:.4f}, "
                        f"complex: {complex_at:.4f}, critical: {max(critical_at, complex_at):.4f}}}"),
    }


def _summary(report: RouterReport, weak: float, strong: float) -> dict:
    at = dict(report.points)
    return {
        "name": report.name,
        "apgr": round(report.apgr, 4),
        "share_for_half_the_gap": report.share_for_half_gap,
        "share_for_80_percent_of_the_gap": report.share_for_80_percent,
        "accuracy_at_20_percent_large": round(at[0.2], 4),
        "accuracy_at_50_percent_large": round(at[0.5], 4),
        "microseconds_per_call": round(report.microseconds_per_call, 1),
    }


def print_json(result: dict) -> None:
    """The result as JSON; lines meant for models.yaml are printed after it as they are to be pasted."""
    pasted = result.pop("models_yaml", None)
    print(json.dumps(result, indent=2))
    if pasted:
        print("# for models.yaml:")
        print(pasted)


__all__ = ["DEFAULT_DATA", "DEFAULT_PATH", "train", "evaluate", "calibrate", "calibrate_from_ledger", "print_json"]
