"""The semantic cache's guard: a near miss is a miss. Measured with the embedded model on both parts of the wide
pair set (the guard's choices were made on its "tune" rows; "held_out" reports them)."""

from __future__ import annotations

import pytest

from gateway.bench.retrieval import _wide_report
from gateway.config.types import CachePolicy
from gateway.retrieval.semantic import same_ask


@pytest.mark.parametrize("first, second", [
    ("Which mushrooms are safe to eat raw?", "Which mushrooms are not safe to eat raw?"),
    ("Did Microsoft buy GitHub?", "Did GitHub buy Microsoft?"),
    ("Are all mushrooms poisonous?", "Are any mushrooms poisonous?"),
    ("Can I take ibuprofen with coffee?", "Should I take ibuprofen with coffee?"),
    ("How do I zoom in on a map?", "How do I zoom out on a map?"),
    ("How do I cook rice?", "How do I cook rice in a microwave?"),
    ("What was the interest rate in the UK?", "What is the interest rate in the UK?"),
    ("Convert 10 miles to kilometers.", "Convert 10 kilometers to miles."),
])
def test_near_misses_of_every_kind_are_misses(first, second):
    assert not same_ask(first, second) and not same_ask(second, first)


@pytest.mark.parametrize("first, second", [
    ("How do I change the password of my account?", "How can I change my account's password?"),
    ("What is the capital of Japan?", "Which city is the capital of Japan?"),
    ("When was the Eiffel Tower built?", "In what year was the Eiffel Tower built?"),
    ("Give me a recipe for pancakes.", "What is a recipe for pancakes?"),
])
def test_rewordings_still_share_an_answer(first, second):
    assert same_ask(first, second) and same_ask(second, first)


def test_wrong_hits_under_one_percent_and_paraphrases_over_forty_on_both_parts():
    report = _wide_report(CachePolicy().semantic_threshold)
    for part in ("tune", "held_out"):
        assert report[part]["wrong_hit_rate"] < 0.01, report[part]
        assert report[part]["paraphrase_hit_rate"] >= 0.40, report[part]
