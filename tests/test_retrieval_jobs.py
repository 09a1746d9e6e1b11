"""Indexing as a job: deletion is final at every stage of it, a crash leaves nothing a start does not reconcile,
the tenant's limits pace it instead of failing it, and its progress shows."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import openai
import pytest
import yaml

from conftest import ROOT, GatewayProcess, free_port, http_request, processes_with_env
from gateway.retrieval import documents
from retrieval_setup import client, long_text, start, vectors_of, wait_indexed


def _progress(api: openai.OpenAI, store_id: str, file_id: str) -> dict:
    return api.vector_stores.files.retrieve(file_id, vector_store_id=store_id).model_extra["progress"]


def _embedding_started(api: openai.OpenAI, store_id: str, file_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (_progress(api, store_id, file_id)["chunks_done"] or 0):
        assert time.monotonic() < deadline, "indexing never started"
        time.sleep(0.05)


def _billed(stores, tenant: str = "acme") -> int:
    return stores.query("SELECT count(*) AS n FROM usage_ledger WHERE tenant_id = $1 AND key_name = 'retrieval'",
                        tenant)[0]["n"]


def test_deletion_is_final_at_every_stage_of_indexing(sim, tmp_path, stores):
    folder = tmp_path / "deleting"
    gateway, keys = start(folder, sim.url, env={"GATEWAY_INDEXING_CONCURRENCY": "1"})
    try:
        api = client(gateway, keys["acme"])
        upload = lambda name, words: api.files.create(  # noqa: E731
            file=(name, io.BytesIO(long_text(words, name).encode())), purpose="assistants")
        embedding, queued = upload("embedding.txt", 30_000), upload("queued.txt", 2_000)
        store = api.vector_stores.create(name="busy", file_ids=[embedding.id])
        _embedding_started(api, store.id, embedding.id)
        api.vector_stores.files.create(store.id, file_id=queued.id)  # waits: one file at a time
        assert _progress(api, store.id, queued.id)["chunks_done"] == 0
        assert api.files.delete(queued.id).deleted  # deleted while queued
        assert api.files.delete(embedding.id).deleted  # deleted while its chunks are embedded
        assert api.vector_stores.retrieve(store.id).file_counts.total == 0
        assert api.vector_stores.search(store.id, query="embedding serviced every spring").data == []

        taken_out = upload("taken_out.txt", 20_000)
        kept = api.vector_stores.create(name="kept", file_ids=[taken_out.id])
        _embedding_started(api, kept.id, taken_out.id)
        api.vector_stores.files.delete(taken_out.id, vector_store_id=kept.id)  # out of the store, file kept
        dropped_file = upload("dropped.txt", 20_000)
        dropped = api.vector_stores.create(name="dropped", file_ids=[dropped_file.id])
        _embedding_started(api, dropped.id, dropped_file.id)
        assert api.vector_stores.delete(dropped.id).deleted
        assert api.vector_stores.search(kept.id, query="taken_out serviced every spring").data == []
        assert {f.id for f in api.files.list().data} >= {taken_out.id, dropped_file.id}

        time.sleep(0.5)  # the ledger's last rows are written
        settled = _billed(stores)
        time.sleep(2.0)
        assert _billed(stores) == settled  # nothing more embedded, nor billed, for what was deleted
    finally:
        gateway.stop()
    for file_id in (embedding.id, queued.id, taken_out.id, dropped_file.id):
        assert vectors_of(folder, file_id) == 0, file_id


def test_a_crash_leaves_nothing_that_the_next_start_does_not_reconcile(sim, tmp_path, stores):
    folder = tmp_path / "crash"
    gateway, keys = start(folder, sim.url, env={"GATEWAY_INDEXING_CONCURRENCY": "2"})
    try:
        api = client(gateway, keys["acme"])
        orphan = api.files.create(file=("orphan.txt", io.BytesIO(long_text(12_000, "orphan").encode())),
                                  purpose="assistants")
        resumed = api.files.create(file=("resumed.txt", io.BytesIO(long_text(9_000, "furnace").encode())),
                                   purpose="assistants")
        lost = api.vector_stores.create(name="lost", file_ids=[orphan.id])
        store = api.vector_stores.create(name="resumed", file_ids=[resumed.id])
        _embedding_started(api, lost.id, orphan.id)
        _embedding_started(api, store.id, resumed.id)
    finally:
        gateway.stop(signal.SIGKILL)  # mid-write, with no chance to tidy up
    deadline = time.monotonic() + 10  # its embedding model's processes do not outlive it
    while left := processes_with_env("GATEWAY_DATA_DIR", str(gateway.config_dir / "data"), exact=True):
        assert time.monotonic() < deadline, f"processes {left} outlived the gateway that started them"
        time.sleep(0.2)
    assert vectors_of(folder, orphan.id) > 0
    # The file left its store, and the crash took the removal of its vectors with it
    stores.query("DELETE FROM vector_store_files WHERE file_id = $1", orphan.id)
    gateway = GatewayProcess(folder)
    try:
        api = client(gateway, keys["acme"])
        assert wait_indexed(api, store.id).file_counts.completed == 1  # taken up where it stopped
        hits = api.vector_stores.search(store.id, query="furnace serviced every spring", max_num_results=3).data
        assert hits and {hit.file_id for hit in hits} == {resumed.id}
        deadline = time.monotonic() + 30
        while not any("removed the vectors of" in line.get("message", "") for line in gateway.log_lines()):
            assert time.monotonic() < deadline, "no reconciliation"
            time.sleep(0.1)
    finally:
        gateway.stop()
    assert vectors_of(folder, orphan.id) == 0 and vectors_of(folder, resumed.id) > 0


def test_the_tenants_limits_pace_indexing_instead_of_failing_it(sim, tmp_path, stores):
    # 1,500 words are 12 chunks, about 2,260 tokens: past a minute's 2,000 in two requests, so one wait. The
    # session's Redis is shared: what other tests' tenant "acme" used in the last minute would make it two.
    import redis

    shared = redis.Redis.from_url(stores.redis_url)
    try:
        for key in shared.scan_iter("gw:{acme}:*"):
            shared.delete(key)
    finally:
        shared.close()
    gateway, keys = start(tmp_path / "paced", sim.url, limits={"tokens_per_minute": 2000})
    try:
        api = client(gateway, keys["acme"])
        text = long_text(1_500, "heater")
        document = api.files.create(file=("paced.txt", io.BytesIO(text.encode())), purpose="assistants")
        store = api.vector_stores.create(name="paced", file_ids=[document.id])
        store = wait_indexed(api, store.id, timeout=200)
        assert store.file_counts.completed == 1, api.vector_stores.files.list(store.id).data
        chunks = len(documents.chunks_of(text))
        assert _progress(api, store.id, document.id) == {"chunks_done": chunks, "chunks_total": chunks}
        refused = stores.query("SELECT count(*) AS n FROM usage_ledger WHERE tenant_id = 'acme' AND key_name = "
                               "'retrieval' AND status = 429")[0]["n"]
        assert refused >= 1  # it met the limit, and waited
        assert api.vector_stores.search(store.id, query="heater servicing", max_num_results=1).data
    finally:
        gateway.stop()


def test_a_file_that_can_never_be_indexed_fails_saying_why(sim, tmp_path):
    gateway, keys = start(tmp_path / "never", sim.url, limits={"tokens_per_minute": 40})
    try:
        api = client(gateway, keys["acme"])
        document = api.files.create(file=("big.txt", io.BytesIO(long_text(400, "pump").encode())),
                                    purpose="assistants")
        store = wait_indexed(api, api.vector_stores.create(name="never", file_ids=[document.id]).id)
        assert store.file_counts.failed == 1
        failed = api.vector_stores.files.retrieve(document.id, vector_store_id=store.id)
        assert "can never be indexed" in failed.last_error.message
    finally:
        gateway.stop()


def test_token_ids_are_embedded_as_their_text_and_chat_models_come_first(sim, tmp_path):
    gateway, keys = start(tmp_path / "tokens", sim.url)
    try:
        api = client(gateway, keys["acme"])
        as_text = api.embeddings.create(model="all-minilm-l6-v2", input="hello world").data[0].embedding
        status, as_ids = http_request(gateway.port, "POST", "/v1/embeddings",
                                      b'{"model": "all-minilm-l6-v2", "input": [[15339, 1917]]}',
                                      {"Authorization": f"Bearer {keys['acme']}"})  # LangChain's OpenAIEmbeddings
        assert status == 200
        assert as_ids["data"][0]["embedding"] == pytest.approx(as_text, abs=1e-5)
        status, error = http_request(gateway.port, "POST", "/v1/embeddings",
                                     b'{"model": "all-minilm-l6-v2", "input": [[1.5]]}',
                                     {"Authorization": f"Bearer {keys['acme']}"})
        assert status == 400 and error["error"]["param"] == "input"
        models = [m.id for m in api.models.list().data]
        assert models.index("small") < models.index("all-minilm-l6-v2")  # Open WebUI starts on the first
    finally:
        gateway.stop()


def test_a_nul_inside_text_separates_words():
    assert documents.text_of(b"alpha beta\x00gamma", "text").split() == ["alpha", "beta", "gamma"]


def test_several_workers_need_a_qdrant_server(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--workers", "2", "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "GATEWAY_DATA_DIR": str(tmp_path / "data")})
    assert done.returncode != 0 and "QDRANT_URL" in done.stderr and "Traceback" not in done.stderr


def test_an_embedding_model_that_fails_for_a_while_is_retried(sim, tmp_path):
    """The stores' embedding model on an upstream that answers 502 for a while: the file waits and completes."""
    folder = tmp_path / "flaky"
    gateway, keys = start(folder, sim.url, env={"GATEWAY_RETRIEVAL_MODEL": "sim-embed"})
    gateway.stop()
    models = yaml.safe_load((folder / "models.yaml").read_text())
    models["models"]["sim-embed"] = {"type": "embedding", "deployments": [
        {"name": "sim-embed", "api_base": f"{sim.url}/v1", "model": "sim-embed"}]}
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    gateway = GatewayProcess(folder, env={"GATEWAY_RETRIEVAL_MODEL": "sim-embed"})
    try:
        api = client(gateway, keys["acme"])
        sim.control(error_rate=1.0, error_status=502)
        document = api.files.create(file=("flaky.txt", io.BytesIO(long_text(300, "valve").encode())),
                                    purpose="assistants")
        store = api.vector_stores.create(name="flaky", file_ids=[document.id])
        time.sleep(3.5)  # a few tries, each refused
        assert api.vector_stores.retrieve(store.id).file_counts.in_progress == 1
        sim.control(error_rate=0.0)
        store = wait_indexed(api, store.id, timeout=90)
        assert store.file_counts.completed == 1, api.vector_stores.files.list(store.id).data
    finally:
        sim.reset()
        gateway.stop()
