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
    prompt: str
    subject: str
    weak_correct: bool
    strong_correct: bool


def load_examples(path: Path) -> list[Example]:
    """The rows of ``path``, less the prompts listed in mmlu_contaminated_prompts.jsonl beside it, if any."""
    contaminated: set[str] = set()
    listing = path.with_name("mmlu_contaminated_prompts.jsonl")  # beside the data, compressed or not
    if listing.exists():
        for line in listing.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                contaminated.update(row.get(k, "") for k in ("eval_prompt", "train_prompt"))
    examples = []
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            if row["prompt"] not in contaminated:
                examples.append(Example(row["prompt"], row.get("subject", ""), bool(row["weak_correct"]),
                                        bool(row["strong_correct"])))
    return examples


def split(examples: Sequence[Example], test_percent: int = 50) -> tuple[list[Example], list[Example]]:
    """A fixed train/test split by a hash of the prompt: the same on every machine and run."""
    train, test = [], []
    for example in examples:
        (test if zlib.crc32(example.prompt.encode()) % 100 < test_percent else train).append(example)
    return train, test


def curve(scores: Sequence[float], examples: Sequence[Example], points: int = 100) -> list[tuple[float, float]]:
    """(share sent to the large model, accuracy) as the share goes from 0 to 1, highest scores first."""
    order = sorted(range(len(examples)), key=lambda i: -scores[i])
    n = len(examples)
    correct = sum(e.weak_correct for e in examples)
    result, sent = [(0.0, correct / n)], 0
    for step in range(1, points + 1):
        until = round(n * step / points)
        while sent < until:
            example = examples[order[sent]]
            correct += example.strong_correct - example.weak_correct
            sent += 1
        result.append((step / points, correct / n))
    return result


def apgr(points: Sequence[tuple[float, float]], weak: float, strong: float) -> float:
    """The average performance gap recovered over the curve (trapezoids)."""
    gap = strong - weak
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


def threshold_for_share(scores: Sequence[float], share: float) -> float:
    """The score above which ``share`` of these requests fall: the COMPLEX threshold for that large-model share."""
    ordered = sorted(scores, reverse=True)
    index = min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))
    return ordered[index]


@dataclass
class RouterReport:
    name: str
    points: list[tuple[float, float]]
    apgr: float
    share_for_half_gap: float | None
    share_for_80_percent: float | None
    microseconds_per_call: float


def judge(name: str, score: Callable[[str], float], examples: Sequence[Example]) -> RouterReport:
    started = time.perf_counter()
    scores = [score(e.prompt) for e in examples]
    elapsed = time.perf_counter() - started
    weak = sum(e.weak_correct for e in examples) / len(examples)
    strong = sum(e.strong_correct for e in examples) / len(examples)
    points = curve(scores, examples)
    return RouterReport(name, points, apgr(points, weak, strong), share_for_quality(points, weak, strong, 0.5),
                        share_for_quality(points, weak, strong, 0.8), elapsed / len(examples) * 1e6)


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
