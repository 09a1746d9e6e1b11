"""``gateway bench guardrails``: what the policy stage costs, and how well the personal-data checks find what they
look for.

Cost: the request checks of a policy with every built-in check on (the seven detectors, a deny list, a regular
expression, topics, the prompt's size, tools), timed in this process on a typical chat request and on a
100,000-word prompt, and the stage's cost with no policy (a tuple's truth test).

Quality: labelled sets generated with Faker: sentences that carry one value of a kind (e-mail addresses, phone
numbers of seven countries, payment cards, IBANs, US SSNs, IPv4 and IPv6 addresses, provider keys) and sentences
that carry look-alikes (order numbers, dates, times, versions, prices, numbers that fail the kind's checksum, UUIDs,
hashes). The detectors' choices (a card's 13 to 19 digits, the phone patterns, an IP address before a full stop)
were made looking at the set of seed 2026 ("tune"); the set of seed 7 ("held_out") was generated and measured once,
after them. A value counts as found when a span of its kind covers it; a span of a kind over no value of that kind
is a false positive.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from gateway.bench.run import write_report
from gateway.guardrails.detect import DETECTORS
from gateway.guardrails.policy import Verdict, compile_rules, inspect_request
from gateway.tokens import prompt_tokens

SEED = 2026
SETS = {"tune": 2026, "held_out": 7}
KINDS = tuple(DETECTORS)
LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT")
TEMPLATES = ("Please reach me via {}.", "The value on file is {} as of last week.", "{} was written on the form.",
             "Send it to {} before Friday, thanks.", "Our records list ({}) for this account.")


def _policy() -> tuple:
    from pydantic import TypeAdapter

    from gateway.config.schema import GuardrailSpec

    specs = [{"name": kind, "check": kind, "action": "redact"} for kind in KINDS] + [
        {"name": "rivals", "check": "deny_list", "words": ["Globex", "Initech", "Umbrella Corp"], "action": "flag"},
        {"name": "jailbreak", "check": "regex", "pattern": "(?i)ignore (all|previous) instructions", "action": "flag"},
        {"name": "politics", "check": "topics", "refused_topics": {"politics": ["election", "senator"]},
         "action": "flag"},
        {"name": "size", "check": "max_prompt_tokens", "max_tokens": 10_000_000, "action": "flag"},
        {"name": "tools", "check": "tools", "refused_tools": ["run_*"], "action": "redact"},
    ]
    return compile_rules([TypeAdapter(GuardrailSpec).validate_python(spec) for spec in specs])


def _typical() -> dict:
    return {"model": "m", "messages": [
        {"role": "system", "content": "You are a helpful assistant for a bank's customers."},
        {"role": "user", "content": "Hi, I moved last month and my statements still go to the old address. Can you "
                                    "tell me how to change it, and whether the card I use for bills changes too?"},
        {"role": "assistant", "content": "Of course. You can change your address in the app under Settings."},
        {"role": "user", "content": "Thanks. And what is the fee for a transfer abroad?"}]}


def _huge(words: int = 100_000) -> dict:
    rng = random.Random(SEED)
    vocabulary = ("the report shows that our network and every tenant of the service had a good quarter with "
                  "fewer errors and lower latency than the plan said 2024 budget review item 17 of 40").split()
    return {"model": "m", "messages": [{"role": "user", "content": " ".join(rng.choice(vocabulary)
                                                                          for _ in range(words))}]}


def _cost(rules: tuple, body: dict, rounds: int) -> float:
    """Milliseconds of this process's CPU a request's checks take (the median of ``rounds``)."""
    import copy

    times = []
    for _ in range(rounds):
        request = copy.deepcopy(body)
        started = time.process_time()
        inspect_request(rules, request, Verdict(), lambda: prompt_tokens(request))
        times.append((time.process_time() - started) * 1000)
    return sorted(times)[len(times) // 2]


def labelled_set(seed: int = SEED, per_kind: int = 400) -> list[tuple[str, list[tuple[str, str]]]]:
    """(sentence, [(kind, value)]) pairs: ``per_kind`` sentences of each kind, and twice as many look-alikes."""
    from faker import Faker

    rng = random.Random(seed)
    fakers = {locale: Faker(locale) for locale in LOCALES}
    for index, faker in enumerate(fakers.values()):
        faker.seed_instance(seed + index)
    us = fakers["en_US"]
    makers = {
        "email": lambda f: f.email(),
        "phone": lambda f: f.phone_number(),
        "payment_card": lambda f: us.credit_card_number(),
        "iban": lambda f: f.iban(),
        "us_ssn": lambda f: us.ssn(),
        "ip_address": lambda f: us.ipv4_public() if rng.random() < 0.6 else us.ipv6(),
        "secrets": lambda f: rng.choice((
            lambda: "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
            lambda: "ghp_" + us.pystr(min_chars=36, max_chars=36),
            lambda: "sk-proj-" + us.pystr(min_chars=40, max_chars=48),
            lambda: "xoxb-" + "-".join(str(us.random_number(digits=12, fix_len=True)) for _ in range(2)),
            lambda: "AIza" + us.pystr(min_chars=35, max_chars=35),
        ))(),
    }
    items = []
    for kind, make in makers.items():
        for _ in range(per_kind):
            faker = fakers[rng.choice(LOCALES)]
            value = make(faker)
            items.append((rng.choice(TEMPLATES).format(value), [(kind, value)]))
    look_alikes = (
        lambda: f"order #{us.random_number(digits=rng.choice((8, 10, 12, 16)), fix_len=True)}",
        lambda: us.date(pattern=rng.choice(("%Y-%m-%d", "%d/%m/%Y", "%m-%d-%Y"))),
        lambda: us.time(),
        lambda: f"version {rng.randint(0, 20)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}",
        lambda: f"${us.pydecimal(left_digits=5, right_digits=2, positive=True)}",
        lambda: _broken_card(us.credit_card_number()),
        lambda: us.uuid4(),
        lambda: us.sha1(),
        lambda: f"{rng.randint(100, 999)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}0",
        lambda: f"room {rng.randint(1, 999)}, floor {rng.randint(1, 40)}",
    )
    for _ in range(per_kind * 2):
        items.append((rng.choice(TEMPLATES).format(rng.choice(look_alikes)()), []))
    rng.shuffle(items)
    return items


def _broken_card(number: str) -> str:
    last = (int(number[-1]) + 1) % 10
    return number[:-1] + str(last)


def quality(items) -> dict:
    result = {}
    for kind in KINDS:
        detect = DETECTORS[kind]
        found = missed = wrong = 0
        for sentence, values in items:
            spans = detect(sentence)
            wanted = [(sentence.index(value), sentence.index(value) + len(value)) for k, value in values if k == kind]
            for start, end in wanted:
                if any(s <= start + 1 and e >= end - 1 for s, e in spans):
                    found += 1
                else:
                    missed += 1
            for s, e in spans:
                if not any(s <= end and e >= start for start, end in wanted):
                    wrong += 1
        result[kind] = {"values": found + missed, "found": found, "missed": missed, "false_positives": wrong,
                        "precision": round(found / (found + wrong), 3) if found + wrong else None,
                        "recall": round(found / (found + missed), 3) if found + missed else None}
    return result


def run_guardrail_benchmark(rounds: int = 50, output: Path | None = None) -> dict:
    rules = _policy()
    typical, huge = _typical(), _huge()
    report = {
        "cost_ms": {
            "typical_chat_request": round(_cost(rules, typical, rounds * 20), 4),
            "a_100000_word_prompt": round(_cost(rules, huge, max(3, rounds // 10)), 2),
            "no_policy": 0.0,  # the stage tests one empty tuple and returns
        },
        "prompt_words": {"typical": sum(len(m["content"].split()) for m in typical["messages"]),
                         "huge": len(huge["messages"][0]["content"].split())},
    }
    try:
        sets = {name: labelled_set(seed) for name, seed in SETS.items()}
    except ImportError:
        report["quality"] = "pip install faker to measure the detectors on the labelled sets"
    else:
        report["quality"] = {name: {"set": f"{len(items)} sentences generated with Faker (seed {SETS[name]}, "
                                           f"locales {', '.join(LOCALES)})", "by_kind": quality(items)}
                             for name, items in sets.items()}
    return write_report(report, output)
