"""Deterministic text, token counts, log-probabilities and embeddings derived from the prompt.

The same prompt always gets the same answer, so tests can compare a cached or replayed answer with the original.
A token is a whitespace-separated word here; ``usage`` counts those.
"""

from __future__ import annotations

import hashlib
import math
import re
import random
import struct
from dataclasses import dataclass

UNSURE_MARKER = "sim:unsure"
UNSURE_OPENING = ["I'm", " not", " sure,", " but"]
SAY = re.compile(r"sim:say\[(.*?)\]", re.S)  # the answer is this text, word by word (what a test needs said)

_VOCABULARY = (
    "the of and to in is that for it as with was on be by this are or from at an which have not has but can "
    "model request answer system data value result time first state token gateway tenant cache route stream "
    "server client latency budget limit usage cost query prompt reply simple large small fast slow good clear "
    "network node service config policy record event metric signal level report check plan step task work "
    "because when where while after before since until then also only just more most less each every some "
    "many few other new old long short high low open closed ready known often usually likely rarely"
).split()
_WORDS = [" " + w for w in _VOCABULARY]


def seed_of(text: str, salt: int = 0) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, salt=salt.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


def count_tokens(text: str) -> int:
    return len(text.split())


def natural_length(seed: int) -> int:
    """How many tokens the model 'wants' to say when nothing limits it: 8 to 64."""
    return 8 + seed % 57


@dataclass(slots=True)
class Completion:
    tokens: list[str]
    logprobs: list[float]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def complete(prompt_text: str, max_tokens: int | None, index: int = 0, ignore_eos: bool = False) -> Completion:
    """The answer to ``prompt_text``; choice ``index`` of n gets a different answer to the same prompt."""
    seed = seed_of(prompt_text, index)
    rng = random.Random(seed)
    wanted = natural_length(seed)
    if ignore_eos and max_tokens:
        wanted = max_tokens
    count = wanted if max_tokens is None else min(wanted, max_tokens)
    unsure = UNSURE_MARKER in prompt_text
    said = SAY.search(prompt_text)
    if said is not None:
        words = said.group(1).split(" ")
        tokens = [words[0]] + [" " + w for w in words[1:]]
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        return Completion(tokens=tokens, logprobs=[-0.01] * len(tokens),
                          finish_reason="length" if len(tokens) < len(words) else "stop")
    tokens: list[str] = []
    if unsure:
        tokens.extend(UNSURE_OPENING[:count])
    while len(tokens) < count:
        if tokens:
            tokens.append(rng.choice(_WORDS))
        else:
            tokens.append(rng.choice(_VOCABULARY).capitalize())
    if unsure:
        logprobs = [-(0.9 + rng.random() * 1.2) for _ in tokens]
    else:
        logprobs = [-(0.005 + rng.random() * 0.06) for _ in tokens]
    finish = "length" if max_tokens is not None and wanted > max_tokens else "stop"
    return Completion(tokens=tokens, logprobs=logprobs, finish_reason=finish)


def top_alternatives(token: str, logprob: float, count: int, seed: int) -> list[tuple[str, float]]:
    """``count`` candidates for one position, the sampled token first, in falling probability."""
    if count <= 0:
        return []
    rng = random.Random(seed)
    candidates = [(token, logprob)]
    remaining = max(1e-6, 1.0 - math.exp(logprob))
    while len(candidates) < count:
        word = rng.choice(_WORDS)
        if any(word == c[0] for c in candidates):
            continue
        share = remaining * (0.3 + rng.random() * 0.4)
        remaining -= share
        candidates.append((word, math.log(max(share, 1e-9))))
    return candidates


def embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector of ``dimensions`` floats derived from ``text``."""
    rng = random.Random(seed_of(text, 7))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def pack_float32(vector: list[float]) -> bytes:
    return struct.pack(f"<{len(vector)}f", *vector)
