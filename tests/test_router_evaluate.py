"""The judge of routers: the cost/quality curve and APGR do not depend on the order of the data's rows."""

from __future__ import annotations

import random

import pytest

from gateway.routing.evaluate import Example, apgr_of, curve


def _examples(seed: int) -> list[Example]:
    rows = [Example(f"q{i}", "s", weak_correct=i % 3 == 0, strong_correct=i % 2 == 0) for i in range(300)]
    random.Random(seed).shuffle(rows)
    return rows


def test_a_router_that_cannot_tell_requests_apart_scores_one_half_in_any_row_order():
    for seed in range(5):
        examples = _examples(seed)
        assert apgr_of([0.0] * len(examples), examples) == pytest.approx(0.5)


def test_ties_count_as_their_mean_and_distinct_scores_keep_their_order():
    examples = [Example("a", "s", False, True), Example("b", "s", True, False), Example("c", "s", False, True),
                Example("d", "s", True, True)]
    tied = curve([1.0, 1.0, 0.0, 0.0], examples, points=4)
    assert [round(y, 3) for _, y in tied] == [0.5, 0.5, 0.5, 0.625, 0.75]
    ordered = curve([4.0, 3.0, 2.0, 1.0], examples, points=4)
    assert [round(y, 3) for _, y in ordered] == [0.5, 0.75, 0.5, 0.75, 0.75]
