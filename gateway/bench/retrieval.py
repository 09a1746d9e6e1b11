"""``gateway bench retrieval`` and ``gateway bench semantic``: how well retrieval finds, what it costs, and how
safe the semantic cache's hits are.

Retrieval quality: a corpus assembled from Python's own documentation topics (``pydoc_data.topics``, shipped with
every Python, under the PSF licence): each topic's first sentence is the query, and the topic without that
sentence the document to find among all of them. Chunks are embedded by the embedded model and searched in
Qdrant's local mode, through the gateway's own code; recall@5 and nDCG@10 over documents (a document ranks at its
best chunk).

Cost, through a running gateway (embedded stores, the simulator answering at once): a chat with retrieval
against the same chat without, and a chat whose semantic-cache lookup misses against one with the semantic cache
off; p50 and p99 of each.

The semantic cache: the pairs in ``data/semantic_pairs.tsv`` (questions in other words, and questions alike that
ask something else): the share of paraphrases answered from the cache and of near misses wrongly answered, at
several thresholds, with and without the guard.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from gateway.bench.run import start_gateway, write_report

PAIRS = Path(__file__).with_name("data") / "semantic_pairs.tsv"


def topics_corpus() -> list[tuple[str, str]]:
    """(query, document) per documentation topic: its first sentence, and the rest of it."""
    from pydoc_data.topics import topics

    corpus = []
    for text in topics.values():
        lines = text.splitlines()
        body = "\n".join(lines[2:]).strip()  # the title and its underline left out
        body = re.sub(r"\n(Added|Changed|New) in version [^\n]*", "", body)
        found = re.search(r"^(.{40,400}?[.:])(\s|$)", body.replace("\n", " "), re.S)
        if found is None:
            continue
        query = found.group(1).strip()
        rest = body.replace("\n", " ")[found.end():].strip()
        if len(rest.split()) >= 30:
            corpus.append((query, rest))
    return corpus


async def _quality(workdir: Path) -> dict:
    from gateway.retrieval import documents
    from gateway.retrieval.minilm import model
    from gateway.retrieval.vectors import Vectors

    corpus = topics_corpus()
    vectors = Vectors(path=workdir / "qdrant")
    embedder = model()
    started = time.perf_counter()
    chunks = 0
    for number, (_, document) in enumerate(corpus):
        texts = documents.chunks_of(document)
        embedded, _ = await asyncio.to_thread(embedder.embed, texts)
        await vectors.put("bench", "bench", "corpus", f"doc{number}", f"doc{number}", texts, embedded)
        chunks += len(texts)
    indexing = time.perf_counter() - started
    recall5 = ndcg10 = 0.0
    for number, (query, _) in enumerate(corpus):
        embedded, _ = await asyncio.to_thread(embedder.embed, [query])
        hits = await vectors.search("bench", "bench", ["corpus"], embedded[0], 60)
        ranked = list(dict.fromkeys(hit.file_id for hit in hits))
        rank = ranked.index(f"doc{number}") + 1 if f"doc{number}" in ranked else None
        recall5 += rank is not None and rank <= 5
        ndcg10 += 1 / math.log2(rank + 1) if rank is not None and rank <= 10 else 0.0
    await vectors.close()
    return {"corpus": "Python's documentation topics (pydoc_data.topics, PSF licence)", "documents": len(corpus),
            "chunks": chunks, "queries": len(corpus), "recall_at_5": round(recall5 / len(corpus), 3),
            "ndcg_at_10": round(ndcg10 / len(corpus), 3),
            "indexing_chunks_per_second": round(chunks / indexing, 1)}


WIDE_PAIRS = Path(__file__).with_name("data") / "semantic_pairs_wide.tsv"


def semantic_pairs() -> list[tuple[str, str, str]]:
    return [tuple(line.rstrip("\n").split("\t")) for line in PAIRS.read_text().splitlines()
            if line and not line.startswith("#")]


def wide_pairs() -> list[tuple[str, str, str, str, str]]:
    """(split, kind, subkind, first, second): the guard's choices were made on the "tune" rows only."""
    return [tuple(line.rstrip("\n").split("\t")) for line in WIDE_PAIRS.read_text().splitlines()
            if line and not line.startswith("#")]


def _wide_report(threshold: float) -> dict:
    """Wrong hits and paraphrase hits on both parts of the wide set, each near-miss kind counted."""
    from gateway.retrieval.minilm import model
    from gateway.retrieval.semantic import same_ask

    report: dict = {}
    for split, kind, subkind, first, second in wide_pairs():
        vectors, _ = model().embed([first, second])
        hit = float(vectors[0] @ vectors[1]) >= threshold and same_ask(first, second)
        part = report.setdefault(split, {"paraphrases": 0, "paraphrases_answered": 0, "near_misses": 0,
                                         "near_misses_answered_wrongly": 0, "wrong_by_kind": {}})
        if kind == "paraphrase":
            part["paraphrases"] += 1
            part["paraphrases_answered"] += hit
        else:
            part["near_misses"] += 1
            part["near_misses_answered_wrongly"] += hit
            counts = part["wrong_by_kind"].setdefault(subkind, [0, 0])
            counts[0] += hit
            counts[1] += 1
    for part in report.values():
        part["paraphrase_hit_rate"] = round(part["paraphrases_answered"] / part["paraphrases"], 3)
        part["wrong_hit_rate"] = round(part["near_misses_answered_wrongly"] / part["near_misses"], 4)
    return report


def run_semantic_benchmark(output: Path | None = None) -> dict:
    from gateway.config.types import CachePolicy
    from gateway.retrieval.minilm import model
    from gateway.retrieval.semantic import same_ask

    scored = []
    for kind, first, second in semantic_pairs():
        vectors, _ = model().embed([first, second])
        scored.append((kind, float(vectors[0] @ vectors[1]), same_ask(first, second)))
    shipped = CachePolicy().semantic_threshold
    rows = {}
    for threshold in (0.85, 0.88, 0.9, 0.92, 0.95, 0.97):
        for guard in (True, False):
            hits = [k for k, s, same in scored if s >= threshold and (same or not guard)]
            rows[f"{threshold} {'with' if guard else 'without'} the guard"] = {
                "paraphrases_answered": round(hits.count("paraphrase") / _count(scored, "paraphrase"), 3),
                "near_misses_answered_wrongly": round(hits.count("near_miss") / _count(scored, "near_miss"), 3)}
    report = {"pairs": {"paraphrase": _count(scored, "paraphrase"), "near_miss": _count(scored, "near_miss")},
              "shipped_threshold": shipped, "at_shipped": rows[f"{shipped} with the guard"], "thresholds": rows,
              "wide_set_at_shipped": _wide_report(shipped)}
    return write_report(report, output)


def _count(scored, kind: str) -> int:
    return sum(1 for k, *_ in scored if k == kind)


def run_retrieval_benchmark(requests: int = 100, output: Path | None = None, index_mb: float = 1.0,
                            compare_python: str | None = None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-retrieval-"))
    try:
        quality = asyncio.run(_quality(workdir))
        cost = _cost(workdir, requests)
        isolation = _isolation(workdir / "isolation", requests, index_mb)
        throughput = _throughput(compare_python)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report({"quality": quality, "cost_ms": cost, "while_indexing": isolation,
                         "embedding_throughput": throughput}, output)


_THROUGHPUT = """
import json, sys, time
texts = json.load(open(sys.argv[1]))
{load}
embed(texts[:8])
started = time.perf_counter()
embed(texts)
print(json.dumps({{"chunks_per_second": len(texts) / (time.perf_counter() - started)}}))
"""
_OURS = "from gateway.retrieval.minilm import model\nembed = lambda texts: model().embed(texts)"
_SENTENCE_TRANSFORMERS = """
import tempfile, zipfile, torch
from sentence_transformers import SentenceTransformer
torch.set_num_threads(1)
folder = tempfile.mkdtemp()
zipfile.ZipFile(sys.argv[2]).extractall(folder)
st = SentenceTransformer(folder, device="cpu")
st.max_seq_length = 256
embed = lambda texts: st.encode(texts, batch_size=32)
"""


def _throughput(compare_python: str | None, chunks: int = 96) -> dict:
    """Chunks of 160 words embedded a second on one core (one BLAS thread, each in a process of its own): the
    embedded model, and sentence-transformers (PyTorch) with the same weights when ``compare_python`` is an
    interpreter that has it."""
    import json
    import subprocess
    import sys

    from gateway.retrieval import documents
    from gateway.retrieval.minilm import model_zip

    text = " ".join(body for _, body in topics_corpus())
    texts = documents.chunks_of(text)[:chunks]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(texts, handle)
    env = {**os.environ, **{name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}

    def run(python: str, load: str) -> float:
        done = subprocess.run([python, "-c", _THROUGHPUT.format(load=load), handle.name, str(model_zip())],
                              capture_output=True, text=True, env=env, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])["chunks_per_second"]

    try:
        ours = run(sys.executable, _OURS)
        report = {"chunks": len(texts), "embedded_model_chunks_per_second": round(ours, 2)}
        if compare_python:
            theirs = run(compare_python, _SENTENCE_TRANSFORMERS)
            report.update(sentence_transformers_chunks_per_second=round(theirs, 2),
                          ratio_to_sentence_transformers=round(ours / theirs, 3))
        return report
    finally:
        os.unlink(handle.name)


def _isolation(workdir: Path, requests: int, index_mb: float) -> dict:
    """Another tenant's chat and search while a large file is indexed, against the same alone; and how long the
    file takes."""
    import openai

    from gateway.config.keys import generate_key, hash_key
    from gateway.stores.embedded import EmbeddedServers, free_port

    workdir.mkdir(parents=True)
    stores = EmbeddedServers(workdir / "stores")
    gateway = None
    try:
        keys = {"busy": generate_key(), "other": generate_key()}
        config = _models_folder(workdir)
        unbound = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "tokens_per_hour": 10**12,
                   "calls_per_day": 10**9}
        (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {
            name: {"name": name, "tier": "enterprise", "limits": unbound,
                   "keys": [{"name": "k", "sha256": hash_key(key)}]} for name, key in keys.items()}}))
        port = free_port()
        env = {**os.environ, "REDIS_URL": stores.start_redis(), "DATABASE_URL": stores.start_postgres(),
               "GATEWAY_DATA_DIR": str(workdir / "data"), "GATEWAY_SIMULATOR_TTFT_MS": "0",
               "GATEWAY_SIMULATOR_ITL_MS": "0"}
        gateway = start_gateway(config, port, env, workdir / "gateway.log")
        api = {name: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
               for name, key in keys.items()}
        small = [api["other"].files.create(file=(f"t{i}.txt", io.BytesIO(body.encode())), purpose="assistants").id
                 for i, (_, body) in enumerate(topics_corpus()[:5])]
        store = api["other"].vector_stores.create(name="small", file_ids=small)
        while api["other"].vector_stores.retrieve(store.id).file_counts.in_progress:
            time.sleep(0.3)

        def measure() -> dict:
            chat, search = [], []
            for i in range(requests):
                started = time.perf_counter()
                api["other"].chat.completions.create(model="chat", max_tokens=8,
                                                     messages=[{"role": "user", "content": f"hello {i}"}])
                chat.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                api["other"].vector_stores.search(store.id, query=f"how do I use a loop {i}", max_num_results=3)
                search.append((time.perf_counter() - started) * 1000)
            return {"chat": _percentiles(chat), "search": _percentiles(search)}

        alone = measure()
        corpus = " ".join(body for _, body in topics_corpus())
        size = int(index_mb * 1024 * 1024)
        big = (corpus * (size // len(corpus) + 1))[:size]
        file_id = api["busy"].files.create(file=("big.txt", io.BytesIO(big.encode())), purpose="assistants").id
        started = time.perf_counter()
        big_store = api["busy"].vector_stores.create(name="big", file_ids=[file_id])
        during = measure()
        indexed_during = api["busy"].vector_stores.retrieve(big_store.id).file_counts.in_progress == 0
        while api["busy"].vector_stores.retrieve(big_store.id).file_counts.in_progress:
            time.sleep(1.0)
        seconds = time.perf_counter() - started
        chunks = api["busy"].vector_stores.files.retrieve(file_id, vector_store_id=big_store.id).model_extra["chunks"]
        return {"other_tenant_alone_ms": alone, "other_tenant_while_indexing_ms": during,
                "p99_ratio": {kind: round(during[kind]["p99"] / alone[kind]["p99"], 2) for kind in alone},
                "p50_ratio": {kind: round(during[kind]["p50"] / alone[kind]["p50"], 2) for kind in alone},
                "measured_while_still_indexing": not indexed_during,
                "indexed_file_mb": index_mb, "indexed_chunks": chunks, "indexing_seconds": round(seconds, 1),
                "indexing_chunks_per_second": round(chunks / seconds, 2)}
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
            gateway.wait(timeout=30)
        stores.stop()


def _cost(workdir: Path, requests: int) -> dict:
    import openai

    from gateway.config.keys import generate_key, hash_key
    from gateway.stores.embedded import EmbeddedServers, free_port

    stores = EmbeddedServers(workdir / "stores")
    gateway = None
    try:
        key, cached_key = generate_key(), generate_key()
        config = _models_folder(workdir)
        unbound = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "tokens_per_hour": 10**12}
        (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {
            "plain": {"name": "P", "tier": "enterprise", "limits": unbound,
                      "keys": [{"name": "k", "sha256": hash_key(key)}]},
            "semantic": {"name": "S", "tier": "enterprise", "limits": unbound, "cache": {"semantic": True},
                         "keys": [{"name": "k", "sha256": hash_key(cached_key)}]}}}))
        port = free_port()
        env = {**os.environ, "REDIS_URL": stores.start_redis(), "DATABASE_URL": stores.start_postgres(),
               "GATEWAY_DATA_DIR": str(workdir / "data"), "GATEWAY_SIMULATOR_TTFT_MS": "0",
               "GATEWAY_SIMULATOR_ITL_MS": "0"}
        gateway = start_gateway(config, port, env, workdir / "gateway.log")
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)
        documents = [api.files.create(file=(f"topic{i}.txt", io.BytesIO(text.encode())), purpose="assistants").id
                     for i, (_, text) in enumerate(topics_corpus()[:20])]
        store = api.vector_stores.create(name="bench", file_ids=documents)
        while api.vector_stores.retrieve(store.id).file_counts.in_progress:
            time.sleep(0.5)
        question = [{"role": "user", "content": "How do I write an assertion?"}]

        def timed(call) -> list[float]:
            call(-1)  # warm
            times = []
            for i in range(requests):
                started = time.perf_counter()
                call(i)
                times.append((time.perf_counter() - started) * 1000)
            return times

        plain = timed(lambda i: api.chat.completions.create(model="chat", messages=question, max_tokens=8))
        retrieved = timed(lambda i: api.chat.completions.create(
            model="chat", messages=question, max_tokens=8, extra_body={"retrieval": {"vector_store_ids": [store.id]}}))
        cached_api = api.with_options(api_key=cached_key)
        unique = lambda api_, i: api_.chat.completions.create(  # noqa: E731
            model="chat", temperature=0, max_tokens=8, messages=[{"role": "user", "content": f"Question {i} about "
                                                                   f"the warranty of product {i * 7919 % 1000}"}])
        exact_miss = timed(lambda i: unique(api, i + 1000))
        semantic_miss = timed(lambda i: unique(cached_api, i))
        return {"requests": requests, "chat": _percentiles(plain), "chat_with_retrieval": _percentiles(retrieved),
                "retrieval_added_p50": round(statistics.median(retrieved) - statistics.median(plain), 2),
                "cache_miss_exact_only": _percentiles(exact_miss),
                "cache_miss_with_semantic_lookup": _percentiles(semantic_miss),
                "semantic_lookup_added_p50": round(statistics.median(semantic_miss) - statistics.median(exact_miss),
                                                   2)}
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
            gateway.wait(timeout=30)
        stores.stop()


def _models_folder(workdir: Path) -> Path:
    """A config folder with models.yaml only: a chat model on the built-in simulator, and the embedded embedder."""
    config = workdir / "config"
    config.mkdir()
    (config / "models.yaml").write_text(yaml.safe_dump({"models": {
        "chat": {"deployments": [{"name": "sim", "api_base": "builtin:simulator", "model": "sim"}]},
        "all-minilm-l6-v2": {"type": "embedding", "deployments": [
            {"name": "embedded", "api_base": "builtin:embedder", "model": "all-MiniLM-L6-v2"}]}}}))
    return config


def _percentiles(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"p50": round(statistics.median(ordered), 2), "p99": round(ordered[min(len(ordered) - 1,
                                                                                   int(0.99 * len(ordered)))], 2)}

