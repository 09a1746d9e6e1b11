"""``gateway router train | evaluate | calibrate``: the learned scorer, its blend and its thresholds, judged on
labelled data both on a random held-out half and leave-group-out (see fit.py)."""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from gateway.routing import fit
from gateway.routing.classifier import DEFAULT_WEIGHTS, Classifier, Thresholds
from gateway.routing.evaluate import (Example, RouterReport, accuracies, credible, groups_of, judge_scores,
                                      load_examples, split, subject_means, svg)
from gateway.routing.scorer import DEFAULT_PATH, LearnedScorer
from gateway.routing.share import score_at_share

# The labelled MMLU prompts shipped with the package (RouteLLM's, Apache-2.0: data/LICENSE-RouteLLM);
# GATEWAY_ROUTING_DATA names another file.
PACKAGED_DATA = Path(__file__).with_name("data") / "mmlu_routing.jsonl.gz"
DEFAULT_DATA = Path(os.environ.get("GATEWAY_ROUTING_DATA") or PACKAGED_DATA)
LARGE_SHARE, CRITICAL_SHARE = 0.2, 0.02  # the shares a trained scorer's own thresholds are set for
MINIMUM_EXAMPLES = 50


class CannotTrain(ValueError):
    """Too few examples (to train on, or to judge a router by), or examples that all say the same."""


def train(examples: Sequence[Example], output: Path, use_all: bool, source: str) -> dict:
    """Fit a scorer and choose its blend leave-group-out; write it (with its report) to ``output``."""
    _enough(examples)
    if len({e.gain for e in examples}) < 2:
        raise CannotTrain(f"all {len(examples)} labelled examples say the same (the large model was "
                          f"{'always' if examples[0].gain > 0.5 else 'never'} needed): there is nothing to learn")
    started = time.perf_counter()
    usable, left_out = credible(examples)
    grouped = _grouped(usable)
    train_set = usable if use_all else split(usable)[0]
    ridge = fit.choose_ridge(train_set)  # by folds inside what is trained on, never the held-out half
    fold_list = fit.folds(grouped, ridge)
    rules = fit.choose_weights(fold_list, {k: v for k, v in DEFAULT_WEIGHTS.items() if k in fit.TUNED},
                               with_learned=False)
    blend = fit.choose_weights(fold_list, {**rules, "learned": 1.0}, with_learned=True)
    traffic = [e for e in train_set if e.prompt is None]  # the gateway's own, beside a labelled file
    files = [e for e in train_set if e.prompt is not None]
    own_weight = fit.adapt(files, traffic, blend, ridge)[0] if traffic and files else 1
    scorer = fit.train_scorer(files + traffic * own_weight if own_weight != 1 else train_set, ridge)
    classifier = Classifier(weights=blend, scorer=scorer)
    scores = [_score(classifier, e) for e in train_set]
    thresholds = _thresholds(scores, LARGE_SHARE, CRITICAL_SHARE)["thresholds"]
    report = {
        "source": source,
        "examples": len(examples),
        "left_out_subjects": left_out,
        "trained_on": len(train_set),
        "split": "all" if use_all else "training half",
        "target": "the large model's gain: 1 where only it is right, 0 where only the small one is; drawn towards "
                  "its subject's mean gain by the smoothing",
        "ridge": {"alpha": ridge.alpha, "smoothing": ridge.smoothing, "cross_validated_apgr": ridge.cv_apgr,
                  "chosen_by": f"{fit.CV_FOLDS} folds inside the examples trained on",
                  "traffic_weight": own_weight},
        "groups": _group_note(grouped, usable),
        _folds_name(grouped, usable): _fold_report(fold_list, {"rules": rules, "this scorer's blend": blend,
                                                    "learned scorer alone": {"learned": 1.0}}),
        "blend": blend,
        "rules_without_a_scorer": rules,
        "thresholds": thresholds,
    }
    if not use_all:
        report["held_out_half"] = _held_out(split(examples)[1], classifier, rules)
    scorer.meta = {"trained_on": source, "examples": len(train_set), "split": report["split"],
                   "seconds": round(time.perf_counter() - started, 1), "blend": blend, "thresholds": thresholds,
                   "ridge": {"alpha": ridge.alpha, "smoothing": ridge.smoothing}, "report": report}
    scorer.save(output)
    return {"output": str(output), "weights": len(scorer.weights), **report,
            "models_yaml": f"router:\n  classifier:\n    scorer: {output}"}


def evaluate(data: Path, scorer_path: Path, image: Path | None, every_row: bool = False,
             learning: bool = False) -> dict:
    """The rules, the learned scorer, the gateway's classifier and prompt length, on the held-out half (or, for
    data the scorer never saw, on ``every_row``) and leave-group-out, beside the random router; what one decision
    costs; and with ``learning``, how the router improves on each group as it learns from labelled examples of it."""
    examples = _enough(load_examples(data))
    scorer = LearnedScorer.load(scorer_path)
    blend = scorer.blend or {**DEFAULT_WEIGHTS, "learned": 1.0}
    ridge = fit.Ridge(**(scorer.meta.get("ridge") or {}))
    # A file that names no subjects is not the data the scorer was trained on (the packaged MMLU rows all name
    # theirs): every row of it is judged, as none of it can be in the scorer's training half.
    every_row = every_row or not any(e.subject for e in examples)
    test = examples if every_row else split(examples)[1]
    gateway = Classifier(weights=blend, scorer=scorer)
    rules = Classifier(scorer=None)
    named = {"rules (no scorer)": [_score(rules, e) for e in test],
             "learned scorer alone": [scorer.score_features(fit.features(e)) for e in test],
             "rules + learned (the gateway's classifier)": [_score(gateway, e) for e in test],
             "prompt length alone": [len(e.prompt or "") for e in test]}
    reports = [judge_scores(name, scores, test) for name, scores in named.items()]
    weak, strong = accuracies(test)
    if image is not None:
        title = f"{data.name}: {len(test)} {'' if every_row else 'held-out '}prompts"
        image.write_text(svg(reports[:3], weak, strong, title))
    usable, left_out = credible(examples)
    grouped = _grouped(usable)
    prompts = [e.prompt for e in test[:2000] if e.prompt]
    report = {
        "data": data.name,
        "judged_on": "every row" if every_row else "the held-out half",
        "prompts_judged": len(test),
        "small_model_accuracy": round(weak, 4),
        "large_model_accuracy": round(strong, 4),
        "routers": [_summary(r, weak, strong) for r in reports] + [
            {"name": "random", "apgr": 0.5, "share_for_half_the_gap": 0.5, "share_for_80_percent_of_the_gap": 0.8}],
        "held_out_without_left_out_subjects": {
            name: round(judge_scores(name, [s for s, e in zip(scores, test) if e.subject not in left_out],
                                     [e for e in test if e.subject not in left_out]).apgr, 4)
            for name, scores in named.items()},
        "left_out_subjects": left_out,
        "groups": _group_note(grouped, usable),
        _folds_name(grouped, usable): _fold_report(fit.folds(grouped, ridge), {
            "rules (no scorer)": rules.weights, "rules + learned (the gateway's classifier)": blend,
            "learned scorer alone": {"learned": 1.0}, "prompt length alone": {"length": 1.0}}),
        "microseconds_per_decision": {
            "rules + learned (the gateway's classifier)": round(fit.decision_microseconds(gateway, prompts), 1),
            "rules (no scorer)": round(fit.decision_microseconds(rules, prompts), 1)},
    }
    if len({e.subject for e in examples}) > 1:
        report["subject_oracle"] = _subject_oracle(test, grouped)
        if not every_row:
            report["subject_known"] = _subject_known(split(usable)[0], [e for e in test if e.subject not in left_out])
    if learning:
        curves = fit.learning_curve(grouped, blend, ridge=ridge)
        report["learning_from_labelled_examples"] = {
            "what": "per group: a scorer trained on the other groups plus this many labelled examples of this one, "
                    f"judged on the rest of it (at least {fit.LEARNING_TEST_MINIMUM})",
            **{name: {str(size): {"mean_apgr": round(sum(each.values()) / len(each), 4) if each else None,
                                  "groups": {k: round(v, 4) for k, v in each.items()}}
                      for size, each in curves[key].items()}
               for name, key in (("this scorer's blend", "blend"),
                                 ("adapted to the family's own labels (their weight, the blend chosen on them)",
                                  "rechosen"),
                                 ("learned scorer alone", "learned"))}}
    return report


def calibrate(data: Path, scorer_path: Path | None, large_share: float, critical_share: float | None) -> dict:
    """The thresholds that send ``large_share`` of requests like these to the large model (COMPLEX and up) and
    ``critical_share`` to the largest (CRITICAL), measured on the held-out half."""
    examples = split(_enough(load_examples(data)))[1]
    classifier = _shipped_classifier(scorer_path)
    scores = [_score(classifier, e) for e in examples]
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


async def ledger_examples(database, tenant: str | None, days: int) -> list[Example]:
    """The gateway's own traffic as labelled examples: every routed request a small model answered, with what the
    gateway kept of it (hashed words, signals). Its label: the tenant's feedback when there is some (bad: the large
    model was needed; good: it was not), else the cascade's judgement of the small model's answer (unsure: needed).
    Grouped by tenant, so that the folds hold out one tenant at a time. ``database``: a connection or a pool."""
    query = ("SELECT l.tenant_id, l.route_example, l.cascaded, f.rating FROM usage_ledger l "
             "LEFT JOIN feedback f ON f.tenant_id = l.tenant_id AND f.request_id = l.request_id "
             "WHERE l.route_example IS NOT NULL AND l.created_at >= now() - make_interval(days => $1)"
             + (" AND l.tenant_id = $2" if tenant else ""))
    rows = await database.fetch(query, days, *([tenant] if tenant else []))
    examples = []
    for row in rows:
        kept = json.loads(row["route_example"])
        if row["rating"] is not None:
            needed = row["rating"] < 0
        elif row["cascaded"] is not None:
            needed = bool(row["cascaded"])
        else:
            continue  # neither judged nor rated: no label
        examples.append(Example(None, "", not needed, True, row["tenant_id"] or "",
                                tuple(kept["words"]), dict(kept["signals"])))
    return examples


def _enough(examples: Sequence[Example]) -> Sequence[Example]:
    if len(examples) < MINIMUM_EXAMPLES:
        raise CannotTrain(f"{len(examples)} labelled examples; at least {MINIMUM_EXAMPLES} are needed")
    return examples


def _shipped_classifier(scorer_path: Path | None) -> Classifier:
    if scorer_path is None:
        scorer_path = DEFAULT_PATH
    scorer = LearnedScorer.load(scorer_path)
    return Classifier(weights=scorer.blend or {**DEFAULT_WEIGHTS, "learned": 1.0}, scorer=scorer)


def _score(classifier: Classifier, example: Example) -> float:
    """The classifier's score for an example, from its text, or from what the gateway kept of it."""
    if example.prompt is not None:
        return classifier.score_text(example.prompt)[0]
    found = dict(fit.signals_of(example))
    if classifier.scorer is not None:
        found["learned"] = classifier.scorer.score_features(fit.features(example))
    return sum(classifier.weights.get(name, 0.0) * value for name, value in found.items())


def _grouped(examples: list[Example]) -> list[Example]:
    """The examples with groups to hold out; when they have fewer than two, four groups drawn by hash (then the
    folds are not out of domain, and the report says so)."""
    if len(groups_of(examples)) >= 2:
        return examples

    def drawn(example: Example) -> str:
        key = (example.prompt or str(example.features)).encode()
        return f"draw-{zlib.crc32(key) % 4}"

    return [replace(e, group=drawn(e)) for e in examples]


def _folds_name(grouped: list[Example], usable: list[Example]) -> str:
    """What the folds are called in a report: leave-group-out only when they hold out real groups."""
    return "leave_group_out" if grouped is usable else "random_folds_in_domain"


def _group_note(grouped: list[Example], usable: list[Example]) -> str:
    groups = groups_of(grouped)
    if grouped is not usable:
        return f"the examples name fewer than two groups: {len(groups)} random folds instead (not out of domain)"
    return f"{len(groups)} groups held out one at a time: {', '.join(groups)}"


def _fold_report(fold_list: list[fit.Fold], routers: dict[str, dict[str, float]]) -> dict:
    report = {}
    for name, weights in routers.items():
        mean, each = fit.mean_apgr(fold_list, weights)
        report[name] = {"mean_apgr": round(mean, 4), "folds": {k: round(v, 4) for k, v in each.items()}}
    return report


def _subject_oracle(test: list[Example], grouped: list[Example]) -> dict:
    """A ceiling for routers that know a request's subject: scoring each prompt by the mean gain of its subject in
    the very prompts judged, which no router can know in advance."""
    def apgr(examples: list[Example]) -> float:
        means = subject_means(examples)
        return round(judge_scores("", [means[e.subject] for e in examples], examples).apgr, 4)

    folds = {group: apgr([e for e in grouped if e.group == group]) for group in groups_of(grouped)}
    return {"what": "each prompt scored by its subject's true mean gain on the prompts judged: out of reach of any "
                    "router, it shows how much of the gap subjects alone could explain",
            "held_out_apgr": apgr(test),
            "leave_group_out": {"mean_apgr": round(sum(folds.values()) / len(folds), 4) if folds else None,
                                "folds": folds}}


def _subject_known(train: list[Example], test: list[Example]) -> dict:
    """What the labels at hand allow a router that is told every request's subject: each held-out prompt scored by
    its subject's mean gain on the training half (its words and shape add nothing)."""
    means = subject_means(train)
    judged = [e for e in test if e.subject in means]
    scores = [means[e.subject] for e in judged]
    return {"what": "each held-out prompt (credible subjects) scored by its subject's mean gain on the training half: "
                    "a router told every request's subject, with the labels at hand",
            "held_out_apgr": round(judge_scores("", scores, judged).apgr, 4), "prompts_judged": len(judged)}


def _held_out(test: list[Example], classifier: Classifier, rules: dict[str, float]) -> dict:
    without_scorer = Classifier(weights={**rules}, scorer=None)
    return {"examples": len(test),
            "apgr": {"rules": round(judge_scores("", [_score(without_scorer, e) for e in test], test).apgr, 4),
                     "this scorer's blend": round(judge_scores("", [_score(classifier, e) for e in test],
                                                               test).apgr, 4)}}


def _thresholds(scores: list[float], large_share: float, critical_share: float | None) -> dict:
    current = Thresholds()
    complex_at = score_at_share(scores, large_share)
    critical_at = score_at_share(scores, critical_share) if critical_share else max(current.critical,
                                                                                          complex_at)
    moderate_at = min(complex_at, score_at_share(scores, min(0.95, large_share * 2)))
    reached = sum(s >= complex_at for s in scores) / len(scores)
    critical_at = max(critical_at, complex_at)
    return {
        "large_share_asked": large_share,
        "large_share_reached": round(reached, 4),
        "critical_share_reached": round(sum(s >= critical_at for s in scores) / len(scores), 4),
        "thresholds": {"moderate": round(moderate_at, 4), "complex": round(complex_at, 4),
                       "critical": round(critical_at, 4)},
        "models_yaml": (f"router:\n  classifier:\n    thresholds: {{moderate: {moderate_at:.4f}, "
                        f"complex: {complex_at:.4f}, critical: {critical_at:.4f}}}"),
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
    }


def print_json(result: dict) -> None:
    """The result as JSON; lines meant for models.yaml are printed after it as they are to be pasted."""
    pasted = result.pop("models_yaml", None)
    print(json.dumps(result, indent=2))
    if pasted:
        print("# for models.yaml:")
        print(pasted)


__all__ = ["CannotTrain", "DEFAULT_DATA", "DEFAULT_PATH", "train", "evaluate", "calibrate", "calibrate_from_ledger",
           "print_json"]
