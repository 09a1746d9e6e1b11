"""A worker admits a tenant far from its limits from a lease on them: a share counted in Redis at once, given back
exactly when the lease ends; never past a limit, across gateways."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time

import openai
import redis as redis_client
import yaml

from conftest import GatewayProcess
from gateway.config.keys import generate_key
from gateway.observability import metrics
from gateway.stores.limit_scripts import ADMIT, SETTLE
from gateway.stores.limits import Limiter
from gateway.stores.resp import Script
from test_limits_hardening import _limiter_run, _tenant_object
from test_limits_headroom import SlowRedis, _config

HELLO = [{"role": "user", "content": "hi"}]
LARGE = {"requests_per_minute": 100_000, "tokens_per_minute": 10**8, "concurrent_requests": 1000,
         "monthly_budget_usd": 100.0, "calls_per_day": 10**6}


def _counts(valkey, tenant_id: str) -> dict:
    """What Redis counts of a tenant: the windows' totals, the month's spend and the requests in flight."""
    def total(name: str) -> int:
        return int(valkey.hget(f"gw:{{{tenant_id}}}:win:{name}", "-1") or 0)

    month = time.strftime("%Y%m", time.gmtime())
    return {"requests": total("req:m"), "calls": total("req:d"), "tokens": total("tok:m"),
            "tokens_hour": total("tok:h"), "spend": int(valkey.get(f"gw:{{{tenant_id}}}:spend:{month}") or 0),
            "in_flight": valkey.zcard(f"gw:{{{tenant_id}}}:inflight")}


def _leases(tenant_id: str, outcome: str) -> float:
    return metrics.LIMIT_LEASES.labels(tenant_id, outcome)._value.get()


def test_a_tenant_far_from_its_limits_is_admitted_from_the_lease_and_given_back_exactly(stores):
    """After one admission by Redis (which asks for a lease), the next requests are admitted with no command to Redis;
    while the lease lives Redis counts all of it, and once it has ended exactly what was used: requests, the tokens
    and spend the answers really took, and no slot, also for a request that outlived the lease."""
    tenant, key = _tenant_object(f"lease-{time.time_ns() % 10**9}", **LARGE)
    admit, settle = Script(ADMIT).sha.encode(), Script(SETTLE).sha.encode()

    async def scenario(limiter: Limiter) -> tuple[dict, dict, int]:
        await limiter.ping()  # connected
        now = time.time()
        plan = limiter.plan(tenant, key, now, 600)
        assert limiter.admit_leased(plan, 100, 1000, now) is None  # no lease yet: one is asked for
        first = await limiter.admit(plan, "first", 100, 1000, now)
        requests = next(i for i, check in enumerate(plan.checks) if check.name == "requests per minute")
        assert first.used(requests) == 1  # the lease is asked for after it: its headers do not count the lease
        limiter.settle(first, "first", {"tokens": 50, "budget": 500})
        await asyncio.sleep(0.05)
        held = limiter.admit_leased(plan, 100, 1000, time.time())  # runs past the lease's end
        sent = len(redis.sent)
        for _ in range(9):
            admission = limiter.admit_leased(plan, 100, 1000, time.time())
            assert admission is not None and admission.admitted
            limiter.settle(admission, "ignored", {"tokens": 40, "budget": 400})
        await asyncio.sleep(0.05)
        assert len(redis.sent) == sent  # settled into the lease: nothing for Redis
        with redis_client.Redis.from_url(stores.redis_url) as valkey:
            during = _counts(valkey, tenant.id)
        await asyncio.sleep(limiter.lease_seconds + 0.2)  # the lease ends; the first request it admitted is running
        assert plan.lease is None
        limiter.settle(held, "ignored", {"tokens": 70, "budget": 700})
        await asyncio.sleep(0.05)
        with redis_client.Redis.from_url(stores.redis_url) as valkey:
            after = _counts(valkey, tenant.id)
        return during, after, redis.sent.count(admit) + redis.sent.count(settle)

    with SlowRedis(stores.redis_url, delay=0) as redis:
        during, after, commands = _limiter_run(redis.url, scenario)
    assert during["requests"] > 11 and during["in_flight"] > 1  # the lease is counted whole while it lives
    assert _leases(tenant.id, "granted") == 1
    assert after == {"requests": 11, "calls": 11, "tokens": 50 + 9 * 40 + 70, "tokens_hour": 50 + 9 * 40 + 70,
                     "spend": 500 + 9 * 400 + 700, "in_flight": 0}
    # the admission, the lease, the first request's settle, what the lease gave back (one call), the late settle
    assert commands == 5


def test_a_closing_limiter_gives_its_lease_back(stores):
    tenant, key = _tenant_object(f"lease-close-{time.time_ns() % 10**9}", **LARGE)

    async def scenario(limiter: Limiter) -> None:
        plan = limiter.plan(tenant, key, time.time(), 600)
        limiter.admit_leased(plan, 100, 1000, time.time())
        await limiter.admit(plan, "first", 100, 1000, time.time())  # not settled: it is still running
        await asyncio.sleep(0.05)
        for _ in range(3):
            admission = limiter.admit_leased(plan, 100, 1000, time.time())
            limiter.settle(admission, "ignored", {"tokens": 10, "budget": 100})

    _limiter_run(stores.redis_url, scenario)
    with redis_client.Redis.from_url(stores.redis_url) as valkey:
        counts = _counts(valkey, tenant.id)
    assert counts == {"requests": 4, "calls": 4, "tokens": 100 + 30, "tokens_hour": 130, "spend": 1000 + 300,
                      "in_flight": 1}


def test_a_tenant_past_half_of_a_limit_gets_no_lease(stores):
    """A lease is at most a sixteenth of every limit and granted only while the tenant stays within half of each:
    limits too small for one, or a tenant past half of one, are admitted request by request."""
    small, small_key = _tenant_object(f"lease-small-{time.time_ns() % 10**9}", requests_per_minute=60)
    busy, busy_key = _tenant_object(f"lease-busy-{time.time_ns() % 10**9}", requests_per_minute=160)

    async def scenario(limiter: Limiter) -> None:
        plan = limiter.plan(small, small_key, time.time(), 600)
        assert limiter.admit_leased(plan, 10, 0, time.time()) is None
        await asyncio.sleep(0.05)
        assert limiter.admit_leased(plan, 10, 0, time.time()) is None and not plan.lease_asked
        plan = limiter.plan(busy, busy_key, time.time(), 600)
        for i in range(81):
            assert (await limiter.admit(plan, f"r{i}", 10, 0, time.time())).admitted
        assert limiter.admit_leased(plan, 10, 0, time.time()) is None  # asked for, and refused
        await asyncio.sleep(0.05)
        assert plan.lease is None and limiter.admit_leased(plan, 10, 0, time.time()) is None

    _limiter_run(stores.redis_url, scenario)
    assert _leases(busy.id, "refused") == 1 and _leases(busy.id, "granted") == 0


def test_two_gateways_with_leases_never_admit_past_a_limit_and_count_exactly(sim, stores, tmp_path):
    """Two gateways, a limit of 256 requests a minute, 400 requests sent at once to both: leases admit the first
    ones, and no more than the limit passes; once the gateways have stopped (giving back their leases), Redis counts
    exactly the requests admitted and the tokens they used, and nothing in flight."""
    key = generate_key()
    config = _config(tmp_path / "c", sim.url, key, requests_per_minute=256, tokens_per_minute=10**8)
    tenant, = yaml.safe_load((config / "tenants.yaml").read_text())["tenants"]
    proxy = SlowRedis(stores.redis_url, delay=0).__enter__()  # counts the admissions sent
    one = GatewayProcess(config, env={"REDIS_URL": proxy.url})
    two = GatewayProcess(config, env={"REDIS_URL": proxy.url, "GATEWAY_DATA_DIR": str(tmp_path / "d2")})

    def call(client: openai.OpenAI) -> tuple[int, int]:
        try:
            answer = client.chat.completions.create(model="small", messages=HELLO, max_tokens=5)
            return 200, answer.usage.total_tokens
        except openai.RateLimitError as refused:
            assert refused.code == "rate_limit_exceeded" and "requests per minute" in refused.message
            return 429, 0

    try:
        clients = [one.client(key), two.client(key)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: call(clients[i % 2]), range(400)))
    finally:
        one.stop()
        two.stop()
        proxy.__exit__(None, None, None)
    admissions = proxy.sent.count(Script(ADMIT).sha.encode())
    assert admissions <= 400 - 2 * 256 // 16  # more than a lease of each gateway was admitted from leases
    admitted = [tokens for status, tokens in results if status == 200]
    assert 256 - 2 * 256 // 16 <= len(admitted) <= 256  # at most each gateway's lease's room was held back
    with redis_client.Redis.from_url(stores.redis_url) as valkey:
        counts = _counts(valkey, tenant)
    assert (counts["requests"], counts["tokens"], counts["in_flight"]) == (len(admitted), sum(admitted), 0)


def test_a_deleted_tenants_lease_gives_nothing_back_to_a_new_tenant_of_the_same_id(stores):
    """A tenant deleted (its keys cleared) while a worker holds a lease on its limits, and made again under the same
    id: what the old lease gives back finds none of its slots, and so corrects none of the new tenant's counts."""
    tenant_id = f"lease-again-{time.time_ns() % 10**9}"
    old, old_key = _tenant_object(tenant_id, **LARGE)
    new, new_key = _tenant_object(tenant_id, **LARGE)

    async def scenario(limiter: Limiter) -> None:
        plan = limiter.plan(old, old_key, time.time(), 600)
        limiter.admit_leased(plan, 100, 1000, time.time())
        await limiter.admit(plan, "old", 100, 1000, time.time())
        await asyncio.sleep(0.05)
        held = limiter.admit_leased(plan, 100, 1000, time.time())
        assert held is not None
        await limiter.forget(tenant_id)
        plan = limiter.plan(new, new_key, time.time(), 600)
        admission = await limiter.admit(plan, "new", 100, 1000, time.time())
        assert admission.admitted
        limiter.settle(held, "ignored", {"tokens": 0, "budget": 0})  # the old tenant's request ends after
        await asyncio.sleep(0.05)

    _limiter_run(stores.redis_url, scenario)
    with redis_client.Redis.from_url(stores.redis_url) as valkey:
        counts = _counts(valkey, tenant_id)
    assert counts == {"requests": 1, "calls": 1, "tokens": 100, "tokens_hour": 100, "spend": 1000, "in_flight": 1}


def test_a_crashed_gateways_lease_stays_counted_within_its_bounds(sim, stores, tmp_path):
    """A gateway killed (SIGKILL) while it holds a lease cannot give it back: what it did not use stays counted, within
    the lease's bounds (a sixteenth of a window's limit, a 256th of the budget, slots that expire with the request
    timeout), and the next gateway admits the tenant as before."""
    key = generate_key()
    config = _config(tmp_path / "c", sim.url, key, **LARGE)
    models = yaml.safe_load((config / "models.yaml").read_text())
    models["defaults"] = {"request_timeout": 2}
    (config / "models.yaml").write_text(yaml.safe_dump(models))
    tenant, = yaml.safe_load((config / "tenants.yaml").read_text())["tenants"]
    gateway = GatewayProcess(config, env={"GATEWAY_LIMITS_LEASE_SECONDS": "10"})  # alive when the gateway dies
    try:
        client = gateway.client(key)
        client.chat.completions.create(model="small", messages=HELLO, max_tokens=5)
        time.sleep(0.2)  # the lease it asked for is granted
        for _ in range(9):
            client.chat.completions.create(model="small", messages=HELLO, max_tokens=5)
        time.sleep(0.6)  # the ledger's rows are written
    finally:
        gateway.stop(signal.SIGKILL)
    spent = stores.query("SELECT count(*) AS n, sum(cost_usd) AS usd FROM usage_ledger WHERE tenant_id = $1", tenant)[0]
    assert spent["n"] == 10
    with redis_client.Redis.from_url(stores.redis_url) as valkey:
        counts = _counts(valkey, tenant)
        slots = valkey.zrange(f"gw:{{{tenant}}}:inflight", 0, -1, withscores=True)
    assert 10 < counts["requests"] <= 10 + LARGE["requests_per_minute"] // 16  # the lease's unused part, no more
    assert float(spent["usd"]) * 1e9 < counts["spend"] <= float(spent["usd"]) * 1e9 + 100.0 * 1e9 / 256 + 10
    assert slots and all(expiry / 1000 - time.time() < 2 + 30 + 1 for _, expiry in slots)  # they expire soon
    again = GatewayProcess(config, env={"GATEWAY_DATA_DIR": str(tmp_path / "d2")})
    try:
        raw = again.client(key).chat.completions.with_raw_response.create(model="small", messages=HELLO, max_tokens=5)
        assert raw.http_response.status_code == 200 and "x-ratelimit-remaining-requests" in raw.headers
    finally:
        again.stop()


def test_counts_from_leases_match_the_ledger_after_streams_and_cancellations_on_two_gateways(sim, stores, tmp_path):
    """Twelve clients on two gateways, each request answered whole, streamed, or dropped after its first chunk: once
    the gateways have stopped, Redis's windows and the month's spend are exactly the ledger's requests, tokens and
    cost, and nothing is in flight."""
    key = generate_key()
    config = _config(tmp_path / "c", sim.url, key, **LARGE)
    tenant, = yaml.safe_load((config / "tenants.yaml").read_text())["tenants"]
    one = GatewayProcess(config)
    two = GatewayProcess(config, env={"GATEWAY_DATA_DIR": str(tmp_path / "d2")})

    def client_requests(index: int) -> None:
        client = (one, two)[index % 2].client(key)
        for turn in range(12):
            kind = (index + turn) % 3
            if kind == 0:
                client.chat.completions.create(model="small", messages=HELLO, max_tokens=8)
                continue
            stream = client.chat.completions.create(model="small", messages=HELLO, max_tokens=8, stream=True)
            for _ in stream:
                if kind == 2:
                    break  # the client goes away mid-answer
            stream.close()

    sim.control(ttft_ms=10.0, itl_ms=5.0)
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            list(pool.map(client_requests, range(12)))
    finally:
        sim.control(ttft_ms=0.0, itl_ms=0.0)
        one.stop()
        two.stop()
    ledger = stores.query("SELECT count(*) AS n, sum(prompt_tokens + completion_tokens) AS tokens, "
                          "sum(cost_usd) AS usd FROM usage_ledger WHERE tenant_id = $1", tenant)[0]
    with redis_client.Redis.from_url(stores.redis_url) as valkey:
        counts = _counts(valkey, tenant)
    assert ledger["n"] == 144
    assert (counts["requests"], counts["tokens"], counts["in_flight"]) == (144, ledger["tokens"], 0)
    assert abs(counts["spend"] - float(ledger["usd"]) * 1e9) <= 144  # a billionth of a dollar a request, rounded


def test_a_request_larger_than_the_whole_lease_goes_to_redis_and_the_lease_goes_on(stores):
    tenant, key = _tenant_object(f"lease-large-{time.time_ns() % 10**9}", **LARGE)

    async def scenario(limiter: Limiter) -> None:
        plan = limiter.plan(tenant, key, time.time(), 600)
        limiter.admit_leased(plan, 100, 1000, time.time())
        await limiter.admit(plan, "first", 100, 1000, time.time())
        await asyncio.sleep(0.05)
        lease = plan.lease
        assert lease is not None and limiter.admit_leased(plan, 10**6, 1000, time.time()) is None
        assert plan.lease is lease and not lease.ended  # the large request did not end it
        assert (await limiter.admit(plan, "large", 10**6, 1000, time.time())).admitted
        assert limiter.admit_leased(plan, 100, 1000, time.time()).lease is lease

    _limiter_run(stores.redis_url, scenario)
