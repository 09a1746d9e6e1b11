"""Routed traffic as the router's share keeper and its statistics see it: only answered requests count, and the
threshold catches up with a change of traffic within a few hundred requests."""

from __future__ import annotations

import json
import random
import time

import pytest
import yaml

from conftest import GatewayProcess, http_request, simulators
from gateway.config.keys import generate_key, hash_key
from gateway.routing.scorer import LearnedScorer
from gateway.routing.share import (HALF_LIFE, MINIMUM_SCORES, ShareKeeper, recent_score_at_share,
                                   thresholds_for_share)
from gateway.routing.classifier import Thresholds


@pytest.fixture
def routed(tmp_path, stores):
    with simulators("small", "large") as sims:
        key = generate_key()
        models = {"models": {
            "mini": {"size": "small", "deployments": [{"name": "m", "api_base": f"{sims['small'].url}/v1",
                                                        "model": "mini"}]},
            "big": {"size": "large", "deployments": [{"name": "b", "api_base": f"{sims['large'].url}/v1",
                                                       "model": "big"}]}},
            "router": {"profiles": {"default": {"simple": "mini", "moderate": "mini", "complex": "big",
                                                "critical": "big", "target_large_share": 0.25}}}}
        tenants = {"tenants": {"slow": {"name": "Slow", "tier": "enterprise", "limits": {"requests_per_minute": 2},
                                        "keys": [{"name": "k", "sha256": hash_key(key)}]}}}
        (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
        (tmp_path / "tenants.yaml").write_text(yaml.safe_dump(tenants))
        gateway = GatewayProcess(tmp_path, env={"GATEWAY_SHARE_INTERVAL": "0.2",
                                                "DATABASE_URL": stores.new_database("shares")})
        try:
            yield gateway, key
        finally:
            gateway.stop()


def _auto(gateway, key: str, text: str) -> tuple[int, dict]:
    return http_request(gateway.port, "POST", "/v1/chat/completions",
                        json.dumps({"model": "auto", "messages": [{"role": "user", "content": text}],
                                    "max_tokens": 4}).encode(),
                        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def test_refused_requests_are_not_routed_requests(routed):
    gateway, key = routed
    answers = [_auto(gateway, key, f"Explain the trade-offs of approach {i}") for i in range(5)]
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == 2 and statuses.count(429) == 3, statuses
    refused = [body for status, body in answers if status == 429]
    deadline = time.monotonic() + 10
    while True:
        status, stats = http_request(gateway.port, "GET", "/v1/routing/stats",
                                     headers={"Authorization": f"Bearer {key}"})
        assert status == 200, stats
        if stats["routed_requests"] + stats["not_answered"] >= 5:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.3)
    assert stats["routed_requests"] == 2 and stats["not_answered"] == 3
    assert sum(stats["by_complexity"].values()) == 2 and sum(stats["by_model"].values()) == 2
    assert "answered" in stats["large_share"]["denominators"]["routed_to_large"]
    recent = stats["large_share"]["targets"]["auto"]["recent_decisions"]
    assert recent["requests"] == 2  # the refused ones moved nothing
    assert refused[0]["error"]["code"] == "rate_limit_exceeded"


def test_the_threshold_catches_up_with_a_change_of_traffic():
    """Scores from one distribution, then from one shifted up: sent large when they reach the threshold in force,
    set every 50 requests; within 300 requests of the shift the share is back at the target."""
    draw = random.Random(3)
    scores = [draw.gauss(0.0, 1.0) for _ in range(2000)] + [draw.gauss(1.5, 1.0) for _ in range(2000)]
    base, threshold, sent, window = Thresholds(), None, [], []
    for index, score in enumerate(scores):
        sent.append(threshold is not None and score >= threshold)
        window.insert(0, score)
        if (index + 1) % 50 == 0:
            threshold = thresholds_for_share(base, "complex", window[:1000], 0.25).complex
    for start in range(2300, 4000, 300):  # every 300 requests from the 300th after the shift on
        share = sum(sent[start:start + 300]) / len(sent[start:start + 300])
        assert abs(share - 0.25) <= 0.04, (start, share)
    steady = [sum(sent[i:i + 300]) / 300 for i in range(500, 2000, 300)]
    assert max(steady) - min(steady) <= 0.08  # steady traffic: no swing beyond sampling noise


def test_recency_weighting_and_the_keepers_record():
    assert recent_score_at_share([float(i) for i in range(1000)], 0.5, half_life=10**9) == pytest.approx(499, abs=1)
    newest_high = [10.0] * HALF_LIFE * 4 + [0.0] * 1000  # newest first
    assert recent_score_at_share(newest_high, 0.5) == 10.0  # the recent traffic decides, not the older majority
    keeper = ShareKeeper()
    for i in range(MINIMUM_SCORES):
        keeper.observe("default", i / 100, 0.2, "complex", went_large=i % 5 == 0)
    assert keeper.due.is_set()
    pending = keeper.take_pending()
    assert not keeper.due.is_set() and list(keeper.local["default"])[0] == pending["default"][-1]  # newest first
    keeper.update("default", Thresholds(), list(keeper.local["default"]))
    status = keeper.status("default")
    assert status["recent_decisions"] == {"requests": MINIMUM_SCORES, "large_share": 0.2, "off_target": 0.0}


def test_the_shipped_scorer_is_a_ridge_that_reads_256_words(tmp_path):
    scorer = LearnedScorer.load()
    assert scorer.kind == "ridge" and scorer.max_tokens == 256 and scorer.documents > 1000
    assert scorer.meta["ridge"]["alpha"] > 0 and 0 < scorer.meta["ridge"]["smoothing"] <= 1
    hard = scorer.score("Prove that every finite integral domain is a field, then compute its characteristic.")
    assert isinstance(hard, float) and scorer.score("") == scorer.prior
    scorer.save(tmp_path / "again.json")
    again = LearnedScorer.load(tmp_path / "again.json")
    assert again.score("What is the capital of France?") == pytest.approx(
        scorer.score("What is the capital of France?"), abs=1e-3)
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "ridge", "buckets": 8, "max_tokens": 4, "bias": 0,
                                                   "weights": {}, "documents": 2, "df": {"3": [1]}}))
    with pytest.raises(ValueError):
        LearnedScorer.load(tmp_path / "bad.json")
