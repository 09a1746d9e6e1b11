"""Judging a router on labelled prompts: the cost/quality curve, APGR, and thresholds for a target share.

A data set row is a prompt with whether the small (weak) and the large (strong) model answered it correctly.
A router scores each prompt; sending the highest-scoring share x of prompts to the large model gives an
accuracy for every x from 0 to 1: the cost/quality curve. The performance gap recovered at x is
(accuracy - small model's) / (large model's - small model's); APGR is its average over x. A random router
draws the straight line between the two models and scores 0.5.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


@dataclass(frozen=True)
class Example:
    """A labelled request: its text (or, for one from the gateway's traffic, only its hashed words and signals),
    its group (MMLU's family of subjects, or the tenant), and whether each model answered it well."""

    prompt: str | None
    subject: str
    weak_correct: bool
    strong_correct: bool
    group: str = ""
    features: tuple[int, ...] | None = None
    signals: dict[str, float] | None = None

    @property
    def gain(self) -> float:
        """What sending it to the large model is worth, 0 (it loses) to 1 (it wins); 0.5 when both agree."""
        return (self.strong_correct - self.weak_correct + 1) / 2


# MMLU's 57 subjects in the four families of its authors (Hendrycks et al.): the groups held out one at a time.
FAMILIES: dict[str, tuple[str, ...]] = {
    "stem": ("abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
             "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
             "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
             "high_school_computer_science", "high_school_mathematics", "high_school_physics",
             "high_school_statistics", "machine_learning"),
    "humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
    "social_sciences": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "other": ("anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
              "professional_medicine", "virology"),
}
_FAMILY_OF = {subject: family for family, subjects in FAMILIES.items() for subject in subjects}
CHANCE = 0.25  # four options: a model graded below this on a whole subject was graded wrongly, not found wanting


class BadData(ValueError):
    """A data file that is not labelled rows: the message names the file and the line."""


def load_examples(path: Path) -> list[Example]:
    """The rows of ``path``, less the prompts listed in mmlu_contaminated_prompts.jsonl beside it, if any.

    A row is a JSON object with ``prompt`` (text), ``weak_correct`` and ``strong_correct`` (true/false or 1/0), and
    optionally ``subject``; anything else is a BadData naming the line."""
    contaminated: set[str] = set()
    listing = path.with_name("mmlu_contaminated_prompts.jsonl")  # beside the data, compressed or not
    if listing.exists():
        for line in listing.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                contaminated.update(row.get(k, "") for k in ("eval_prompt", "train_prompt"))
    examples = []
    try:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        kind = "a gzip file of UTF-8 text" if path.suffix == ".gz" else "UTF-8 text"
        raise BadData(f"{path}: not {kind} ({exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            row = _row(path, number, line)
            if row["prompt"] not in contaminated:
                subject = row.get("subject") or ""
                examples.append(Example(row["prompt"], subject, bool(row["weak_correct"]),
                                        bool(row["strong_correct"]), _FAMILY_OF.get(subject, subject)))
    return examples


def _row(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise BadData(f"{path}, line {number}: not JSON ({exc})") from None
    if not isinstance(row, dict):
        raise BadData(f"{path}, line {number}: a row is a JSON object with prompt, weak_correct and strong_correct")
    if not isinstance(row.get("prompt"), str):
        raise BadData(f"{path}, line {number}: 'prompt' must be text")
    for name in ("weak_correct", "strong_correct"):
        if row.get(name) not in (True, False, 0, 1):
            raise BadData(f"{path}, line {number}: '{name}' must be true or false (or 1 or 0)")
    if not isinstance(row.get("subject", ""), (str, type(None))):
        raise BadData(f"{path}, line {number}: 'subject' must be text")
    return row


def credible(examples: Sequence[Example], minimum: int = 20) -> tuple[list[Example], list[str]]:
    """The examples less the subjects whose grading cannot be believed: a model below chance on a whole subject of
    at least ``minimum`` questions (the large model's 3% on high-school mathematics is a failure to read its
    answers, and would teach the scorer that arithmetic needs no large model). And the subjects left out."""
    by_subject: dict[str, list[Example]] = {}
    for example in examples:
        by_subject.setdefault(example.subject, []).append(example)
    left_out = sorted(subject for subject, rows in by_subject.items() if subject and len(rows) >= minimum and min(
        sum(e.weak_correct for e in rows), sum(e.strong_correct for e in rows)) < CHANCE * len(rows))
    return [e for e in examples if e.subject not in left_out], left_out


def subject_means(examples: Sequence[Example]) -> dict[str, float]:
    """Each subject's mean gain over ``examples``."""
    by_subject: dict[str, list[float]] = {}
    for example in examples:
        by_subject.setdefault(example.subject, []).append(example.gain)
    return {subject: sum(gains) / len(gains) for subject, gains in by_subject.items()}


def groups_of(examples: Sequence[Example]) -> list[str]:
    """The groups to hold out one at a time: every group with at least 5% of the examples."""
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.group] = counts.get(example.group, 0) + 1
    return sorted(group for group, count in counts.items() if group and count >= 0.05 * len(examples))


def split(examples: Sequence[Example], test_percent: int = 50) -> tuple[list[Example], list[Example]]:
    """A fixed train/test split by a hash of the prompt: the same on every machine and run."""
    train, test = [], []
    for example in examples:
        key = example.prompt.encode() if example.prompt is not None else bytes(str(example.features), "ascii")
        (test if zlib.crc32(key) % 100 < test_percent else train).append(example)
    return train, test


def curve(scores: Sequence[float], examples: Sequence[Example], points: int = 100) -> list[tuple[float, float]]:
    """(share sent to the large model, accuracy) as the share goes from 0 to 1, highest scores first.

    Requests with equal scores are sent in no particular order, so within a run of ties each one counts as the
    run's mean: the curve is what random tie-breaking gives on average, whatever order the rows come in."""
    order = sorted(range(len(examples)), key=lambda i: -scores[i])
    n = len(examples)
    gains = [examples[i].strong_correct - examples[i].weak_correct for i in order]
    start = 0
    while start < n:  # each run of tied scores gets its mean gain
        end = start + 1
        while end < n and scores[order[end]] == scores[order[start]]:
            end += 1
        if end - start > 1:
            gains[start:end] = [sum(gains[start:end]) / (end - start)] * (end - start)
        start = end
    correct = sum(e.weak_correct for e in examples)
    result, sent = [(0.0, correct / n)], 0
    for step in range(1, points + 1):
        until = round(n * step / points)
        while sent < until:
            correct += gains[sent]
            sent += 1
        result.append((step / points, correct / n))
    return result


def apgr(points: Sequence[tuple[float, float]], weak: float, strong: float) -> float:
    """The average performance gap recovered over the curve (trapezoids)."""
    gap = strong - weak
    if not gap:
        return 0.5  # both models as good: no router can do better or worse than another
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        area += (x1 - x0) * ((y0 - weak) + (y1 - weak)) / 2 / gap
    return area


def share_for_quality(points: Sequence[tuple[float, float]], weak: float, strong: float,
                      recovered: float) -> float | None:
    """The smallest share of large-model calls that recovers ``recovered`` of the gap (e.g. 0.5, 0.8)."""
    target = weak + recovered * (strong - weak)
    for share, accuracy in points:
        if accuracy >= target:
            return share
    return None


@dataclass
class RouterReport:
    name: str
    points: list[tuple[float, float]]
    apgr: float
    share_for_half_gap: float | None
    share_for_80_percent: float | None
    microseconds_per_call: float


def judge(name: str, score: Callable[[Example], float], examples: Sequence[Example]) -> RouterReport:
    started = time.perf_counter()
    scores = [score(e) for e in examples]
    elapsed = time.perf_counter() - started
    return judge_scores(name, scores, examples, elapsed / len(examples) * 1e6)


def judge_scores(name: str, scores: Sequence[float], examples: Sequence[Example],
                 microseconds: float = 0.0) -> RouterReport:
    weak, strong = accuracies(examples)
    points = curve(scores, examples)
    return RouterReport(name, points, apgr(points, weak, strong), share_for_quality(points, weak, strong, 0.5),
                        share_for_quality(points, weak, strong, 0.8), microseconds)


def accuracies(examples: Sequence[Example]) -> tuple[float, float]:
    """The small (weak) and the large (strong) model's accuracy on ``examples``."""
    return (sum(e.weak_correct for e in examples) / len(examples),
            sum(e.strong_correct for e in examples) / len(examples))


def apgr_of(scores: Sequence[float], examples: Sequence[Example]) -> float:
    weak, strong = accuracies(examples)
    return apgr(curve(scores, examples), weak, strong) if strong != weak else 0.5


def svg(reports: Sequence[RouterReport], weak: float, strong: float, title: str) -> str:
    """The cost/quality curves as an SVG image, with the random router's line and both models' accuracy."""
    width, height, margin = 640, 440, 56
    low, high = weak - 0.02, max(strong, max(y for r in reports for _, y in r.points)) + 0.02

    def at(x: float, y: float) -> str:
        left = margin + x * (width - 2 * margin)
        top = height - margin - (y - low) / (high - low) * (height - 2 * margin)
        return f"{left:.1f},{top:.1f}"

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
             f'<polyline points="{at(0, low)} {at(1, low)}" stroke="black" fill="none"/>',
             f'<polyline points="{at(0, low)} {at(0, high)}" stroke="black" fill="none"/>']
    for tick in range(0, 11, 2):
        x = tick / 10
        parts.append(f'<text x="{at(x, low).split(",")[0]}" y="{height - margin + 16}" text-anchor="middle">'
                     f'{int(x * 100)}%</text>')
    for value, label in ((weak, f"small model {weak:.3f}"), (strong, f"large model {strong:.3f}")):
        parts.append(f'<polyline points="{at(0, value)} {at(1, value)}" stroke="#999" stroke-dasharray="4 4" '
                     f'fill="none"/><text x="{width - margin - 4}" y="{float(at(1, value).split(",")[1]) - 4}" '
                     f'text-anchor="end" fill="#666">{label}</text>')
    parts.append(f'<polyline points="{at(0, weak)} {at(1, strong)}" stroke="#999" fill="none"/>')
    for index, report in enumerate(reports):
        colour = colours[index % len(colours)]
        parts.append(f'<polyline points="{" ".join(at(x, y) for x, y in report.points)}" stroke="{colour}" '
                     f'stroke-width="2" fill="none"/>')
        parts.append(f'<text x="{margin + 10}" y="{margin + 6 + 16 * index}" fill="{colour}">{report.name}: '
                     f'APGR {report.apgr:.3f}</text>')
    parts.append(f'<text x="{margin + 10}" y="{margin + 6 + 16 * len(reports)}" fill="#999">random router: APGR '
                 f'0.500</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">share of calls sent to the large '
                 f'model</text><text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" '
                 f'text-anchor="middle">accuracy</text></svg>')
    return "\n".join(parts) + "\n"
