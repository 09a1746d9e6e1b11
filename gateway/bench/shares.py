"""``gateway bench shares``: the thresholds that keep a target share of large-model calls, on a change of traffic.

The shipped classifier scores a stream of requests: first MMLU questions (the held-out half of the packaged data),
then arithmetic word problems (made here from templates with a fixed seed: a kind of traffic the router was not
fitted to, whose scores sit elsewhere). Each request goes large when its score reaches the threshold in force; the
threshold is set again every ``UPDATE_EVERY`` requests, as the gateway does when requests come faster than one
every ``GATEWAY_SHARE_INTERVAL / UPDATE_EVERY`` seconds. Two keepers side by side: the flat quantile of the last
2,000 scores (the keeper before this one) and the recency-weighted one the gateway runs. Reported: the share sent
large per 100 requests after the shift (whose own sampling spread is about 0.04), the share per 300 from the 300th
request after it on, and the spread in steady traffic.
"""

from __future__ import annotations

import random
from pathlib import Path

from gateway.bench.run import write_report
from gateway.routing.share import UPDATE_EVERY, WINDOW, recent_score_at_share, score_at_share

TARGET = 0.25
BEFORE, AFTER = 2000, 2000
NAMES = ("Maria", "Tom", "Aiko", "Ravi", "Lena", "Omar", "Chen", "Sofia")
THINGS = ("apples", "tickets", "marbles", "books", "cupcakes", "stamps", "pencils", "coins")


def word_problems(count: int, seed: int = 11) -> list[str]:
    draw = random.Random(seed)
    templates = (
        "{a} has {x} {t}. {b} gives {a} {y} more, then {a} sells {z}. How many {t} does {a} have now?",
        "A shop sells {t} at ${x} each. {a} buys {y} and pays with ${w}. How much change does {a} get?",
        "{a} reads {x} pages a day for {y} days, then {z} pages on the last day. How many pages in total?",
        "There are {x} {t} shared equally among {y} children, and {z} are left over. How many does each child get?",
        "{a} earns ${x} an hour and works {y} hours a week. After spending ${z}, how much is left each week?",
    )
    problems = []
    for _ in range(count):
        a, b = draw.sample(NAMES, 2)
        x, y, z = draw.randint(3, 90), draw.randint(2, 12), draw.randint(1, 20)
        problems.append(draw.choice(templates).format(a=a, b=b, t=draw.choice(THINGS), x=x, y=y, z=z,
                                                      w=x * y + draw.randint(1, 50)))
    return problems


def simulate(scores: list[float], keeper: str) -> list[bool]:
    """Whether each request went large, the threshold set every UPDATE_EVERY requests by ``keeper``."""
    threshold, sent, window = None, [], []
    for index, score in enumerate(scores):
        sent.append(threshold is not None and score >= threshold)
        window.insert(0, score)
        del window[WINDOW:]
        if (index + 1) % UPDATE_EVERY == 0 and len(window) >= 100:
            threshold = (recent_score_at_share(window, TARGET) if keeper == "recency-weighted"
                         else score_at_share(window, TARGET))
    return sent


def _summary(sent: list[bool]) -> dict:
    after = sent[BEFORE:]
    per_hundred = [round(sum(after[i:i + 100]) / 100, 2) for i in range(0, len(after), 100)]
    settled = next((i * 100 for i in range(len(per_hundred)) if all(
        abs(share - TARGET) <= 0.04 for share in per_hundred[i:])), None)
    steady = [sum(sent[i:i + 100]) / 100 for i in range(500, BEFORE, 100)]
    per_300 = [round(sum(after[i:i + 300]) / 300, 3) for i in range(300, len(after) - 299, 300)]
    return {"share_per_100_after_the_shift": per_hundred,
            "requests_until_within_0.04_for_good": settled,
            "share_after_300": round(sum(after[300:]) / len(after[300:]), 4),
            "share_per_300_from_300_on": per_300,
            "per_300_within_0.04": all(abs(share - TARGET) <= 0.04 for share in per_300),
            "steady_traffic_share_per_100": {"min": round(min(steady), 2), "max": round(max(steady), 2),
                                             "mean": round(sum(steady) / len(steady), 4)}}


def run_share_benchmark(output: Path | None = None) -> dict:
    from gateway.routing.commands import PACKAGED_DATA, _shipped_classifier
    from gateway.routing.evaluate import load_examples, split

    classifier = _shipped_classifier(None)
    mmlu = [e.prompt for e in split(load_examples(PACKAGED_DATA))[1]]
    random.Random(5).shuffle(mmlu)
    texts = mmlu[:BEFORE] + word_problems(AFTER)
    scores = [classifier.score_text(text)[0] for text in texts]
    report = {
        "what": f"target_large_share {TARGET}: {BEFORE} MMLU questions, then {AFTER} arithmetic word problems; "
                f"thresholds set every {UPDATE_EVERY} requests",
        "share_of_word_problems_at_the_old_threshold": round(
            sum(s >= score_at_share(scores[:BEFORE], TARGET) for s in scores[BEFORE:]) / AFTER, 4),
        "keepers": {keeper: _summary(simulate(scores, keeper)) for keeper in ("flat 2,000", "recency-weighted")},
    }
    return write_report(report, output)
