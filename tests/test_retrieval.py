"""Files and vector stores through the official openai client: real embeddings from the embedded model, Qdrant's
local mode, every id the tenant's own, bad input refused in OpenAI's shape."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from conftest import GatewayProcess, http_request, ledger_row
from retrieval_setup import DOCUMENTS, client, pdf_with, start, wait_indexed

ADMIN_KEY = "sk-admin-retrieval-setup-" + "a" * 20


@pytest.fixture(scope="module")
def setup(sim, tmp_path_factory):
    gateway, keys = start(tmp_path_factory.mktemp("retrieval"), sim.url, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    yield gateway, keys
    gateway.stop()


@pytest.fixture(scope="module")
def indexed(setup):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    files = {name: api.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants")
             for name, text in DOCUMENTS.items()}
    files["manual.pdf"] = api.files.create(file=("manual.pdf", io.BytesIO(pdf_with(
        "To calibrate the espresso machine, hold the steam button for five seconds."))), purpose="assistants")
    store = api.vector_stores.create(name="Help centre", file_ids=[f.id for f in files.values()])
    assert store.status == "in_progress" and store.file_counts.total == 4
    store = wait_indexed(api, store.id)
    assert store.status == "completed" and store.file_counts.completed == 4, store
    return store, files


def test_the_embedded_model_gives_real_embeddings(setup):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    answer = api.embeddings.create(model="all-minilm-l6-v2", input=["The new movie is awesome",
                                                                    "The new movie is so great"])
    first, second = (item.embedding for item in answer.data)
    assert len(first) == 384 and answer.usage.prompt_tokens > 0
    assert sum(a * b for a, b in zip(first, second)) == pytest.approx(0.8939, abs=0.001)  # as sentence-transformers


def test_files_are_indexed_and_searched_by_meaning(setup, indexed):
    gateway, keys = setup
    store, files = indexed
    api = client(gateway, keys["acme"])
    for question, expected in (("I forgot my login, how do I get a new one?", "passwords.md"),
                               ("when do I get my money back if I cancel a yearly subscription", "billing.txt"),
                               ("how far apart should vegetable plants be", "garden.html"),
                               ("coffee machine setup", "manual.pdf")):
        page = api.vector_stores.search(store.id, query=question, max_num_results=4)
        assert page.data[0].filename == expected, (question, [(r.filename, r.score) for r in page.data])
        assert page.data[0].file_id == files[expected].id and page.data[0].score > page.data[-1].score
    html = api.vector_stores.search(store.id, query="tomatoes", max_num_results=1).data[0].content[0].text
    assert "Tomatoes" in html and "var x" not in html and "<p>" not in html  # markup and scripts left out
    listed = api.vector_stores.files.list(store.id)
    assert {f.id for f in listed.data} == {f.id for f in files.values()} and all(f.status == "completed"
                                                                                 for f in listed.data)


def test_another_tenant_sees_nothing_of_it(setup, indexed):
    gateway, keys = setup
    store, files = indexed
    other = client(gateway, keys["globex"])
    assert other.files.list().data == [] and other.vector_stores.list().data == []
    file_id = files["billing.txt"].id
    for call in (lambda: other.files.retrieve(file_id), lambda: other.files.content(file_id),
                 lambda: other.files.delete(file_id), lambda: other.vector_stores.retrieve(store.id),
                 lambda: other.vector_stores.delete(store.id), lambda: other.vector_stores.files.list(store.id),
                 lambda: other.vector_stores.search(store.id, query="refund"),
                 lambda: other.vector_stores.files.create(store.id, file_id=file_id)):
        with pytest.raises(openai.NotFoundError):
            call()
    mine = other.vector_stores.create(name="mine")
    with pytest.raises(openai.NotFoundError):  # attaching another tenant's file to one's own store
        other.vector_stores.files.create(mine.id, file_id=file_id)
    assert client(gateway, keys["acme"]).files.retrieve(file_id).filename == "billing.txt"  # still there


def test_deleting_removes_the_vectors(setup):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    kept = api.files.create(file=("kept.txt", io.BytesIO(b"Parking is free after six in the evening.")),
                            purpose="assistants")
    gone = api.files.create(file=("gone.txt", io.BytesIO(b"The staff canteen serves soup on Fridays.")),
                            purpose="assistants")
    store = api.vector_stores.create(name="short-lived", file_ids=[kept.id, gone.id])
    wait_indexed(api, store.id)
    assert api.vector_stores.search(store.id, query="soup", max_num_results=1).data[0].file_id == gone.id
    assert api.files.delete(gone.id).deleted
    assert {r.file_id for r in api.vector_stores.search(store.id, query="soup").data} == {kept.id}
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(gone.id)
    api.vector_stores.files.delete(kept.id, vector_store_id=store.id)
    assert api.vector_stores.search(store.id, query="parking").data == []
    assert api.vector_stores.delete(store.id).deleted
    with pytest.raises(openai.NotFoundError):
        api.vector_stores.retrieve(store.id)


def test_unreadable_files_fail_with_the_reason(setup):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    broken = api.files.create(file=("broken.pdf", io.BytesIO(b"%PDF-1.4 this is not really a pdf")),
                              purpose="assistants")
    latin = api.files.create(file=("latin.txt", io.BytesIO("café crème".encode("latin-1"))), purpose="assistants")
    store = api.vector_stores.create(name="bad", file_ids=[broken.id, latin.id])
    store = wait_indexed(api, store.id)
    assert store.file_counts.failed == 2
    errors = {f.id: f.last_error.message for f in api.vector_stores.files.list(store.id).data}
    assert "PDF" in errors[broken.id] and "UTF-8" in errors[latin.id]
    assert api.vector_stores.search(store.id, query="café").data == []  # nothing half-indexed


def test_bad_input_is_refused_in_openais_shape(setup, indexed):
    gateway, keys = setup
    store, _ = indexed
    api = client(gateway, keys["acme"])
    headers = {"Authorization": f"Bearer {keys['acme']}"}
    with pytest.raises(openai.BadRequestError, match="not a kind of file"):
        api.files.create(file=("tool.exe", io.BytesIO(b"MZ")), purpose="assistants")
    with pytest.raises(openai.BadRequestError, match="empty"):
        api.files.create(file=("empty.txt", io.BytesIO(b"")), purpose="assistants")
    status, error = http_request(gateway.port, "POST", "/v1/files", b'{"file": "x"}',
                                 {**headers, "Content-Type": "application/json"})
    assert status == 400 and error["error"]["code"] == "invalid_content_type"
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nhello\r\n"
            f"--{boundary}--\r\n").encode()
    status, error = http_request(gateway.port, "POST", "/v1/files", body,
                                 {**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and error["error"]["param"] == "purpose"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassis\x00tants\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nhello\r\n"
            f"--{boundary}--\r\n").encode()
    status, error = http_request(gateway.port, "POST", "/v1/files", body,
                                 {**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and error["error"]["param"] == "purpose", error  # PostgreSQL cannot store a NUL
    for bad, param in (({"query": ""}, "query"), ({"query": "x", "max_num_results": 0}, "max_num_results"),
                       ({"query": "x", "max_num_results": 10**9}, "max_num_results"),
                       ({"query": "a\u0000b"}, "query"), ({"query": "x", "unknown": 1}, "unknown")):
        status, error = http_request(gateway.port, "POST", f"/v1/vector_stores/{store.id}/search",
                                     json.dumps(bad).encode(), headers)
        assert status == 400 and error["error"]["param"] == param, (bad, error)
    status, error = http_request(gateway.port, "POST", "/v1/vector_stores/vs_nothing/search", b'{"query": "x"}',
                                 headers)
    assert status == 404 and error["error"]["code"] == "vector_store_not_found"
    status, error = http_request(gateway.port, "POST", "/v1/vector_stores", b'{"file_ids": ["file-nope"]}', headers)
    assert status == 404 and error["error"]["code"] == "file_not_found"
    for metadata, param in (({"k": "v" * 513}, "metadata.k"), ({"k" * 65: "v"}, "metadata.kkkk"),
                            ({str(i): "v" for i in range(17)}, "metadata")):
        status, error = http_request(gateway.port, "POST", "/v1/vector_stores",
                                     json.dumps({"name": "x", "metadata": metadata}).encode(), headers)
        assert status == 400 and error["error"]["param"].startswith(param), (metadata, error)
    status, error = http_request(gateway.port, "GET", "/v1/files", headers={"Authorization": "Bearer sk-wrong"})
    assert status == 401
    for method, path in (("GET", "/v1/files/file-a%00"), ("GET", "/v1/files/file-a%00/content"),
                         ("DELETE", "/v1/files/file-a%00"), ("GET", "/v1/vector_stores/vs%00"),
                         ("DELETE", "/v1/vector_stores/vs%00"), ("GET", "/v1/vector_stores/vs%00/files"),
                         ("GET", f"/v1/vector_stores/{store.id}/files/f%00"),
                         ("DELETE", f"/v1/vector_stores/{store.id}/files/f%00")):
        status, error = http_request(gateway.port, method, path, headers=headers)
        assert status == 400 and error["error"]["code"] == "invalid_path", (path, error)


def test_a_store_is_renamed_and_its_metadata_replaced(setup):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    store = api.vector_stores.create(name="Drafts", metadata={"team": "support", "stage": "draft"})
    renamed = api.vector_stores.update(store.id, name="Published")
    assert renamed.name == "Published" and renamed.metadata == {"team": "support", "stage": "draft"}
    changed = api.vector_stores.update(store.id, metadata={"stage": "live"})
    assert changed.name == "Published" and changed.metadata == {"stage": "live"}  # replaced, as OpenAI does
    cleared = api.vector_stores.update(store.id, name=None, metadata=None)
    assert cleared.name is None and cleared.metadata == {}
    assert api.vector_stores.retrieve(store.id).model_dump()["metadata"] == {}
    with pytest.raises(openai.NotFoundError):
        client(gateway, keys["globex"]).vector_stores.update(store.id, name="Taken")
    expiring = api.vector_stores.update(store.id, expires_after={"anchor": "last_active_at", "days": 7})
    assert expiring.expires_after.days == 7 and expiring.expires_at
    assert api.vector_stores.update(store.id, expires_after=None).expires_after is None
    with pytest.raises(openai.BadRequestError, match="expires_after"):
        api.vector_stores.update(store.id, expires_after={"anchor": "created_at", "days": 7})
    with pytest.raises(openai.BadRequestError, match="expires_after"):
        api.vector_stores.update(store.id, expires_after={"anchor": "last_active_at", "days": 10**9})
    with pytest.raises(openai.BadRequestError):
        api.vector_stores.update(store.id, metadata={"k": "v" * 513})
    assert api.vector_stores.retrieve(store.id).name is None


def test_a_store_still_indexing_is_not_searched(setup):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    long_text = " ".join(f"Paragraph {i} explains the warranty terms of product line {i % 7}." for i in range(2500))
    big = api.files.create(file=("warranty.txt", io.BytesIO(long_text.encode())), purpose="assistants")
    store = api.vector_stores.create(name="slow", file_ids=[big.id])
    with pytest.raises(openai.ConflictError, match="still indexing"):
        api.vector_stores.search(store.id, query="warranty")
    wait_indexed(api, store.id, timeout=300)
    assert api.vector_stores.search(store.id, query="warranty", max_num_results=2).data


def test_embeddings_for_retrieval_are_billed_to_the_tenant(setup, indexed, stores):
    gateway, keys = setup
    rows = stores.query("SELECT key_name, route, model, prompt_tokens, cost_usd FROM usage_ledger WHERE tenant_id = "
                        "'acme' AND key_name = 'retrieval'")
    assert rows and all(r["route"] == "embeddings" and r["model"] == "all-minilm-l6-v2" for r in rows)
    assert sum(r["prompt_tokens"] for r in rows) > 100 and sum(float(r["cost_usd"]) for r in rows) > 0


def test_a_chat_with_retrieval_gets_the_chunks_and_cites_them(setup, indexed, sim, stores):
    gateway, keys = setup
    store, files = indexed
    api = client(gateway, keys["acme"])
    raw = api.chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "How long is the password reset link valid?"}],
        extra_body={"retrieval": {"vector_store_ids": [store.id], "max_results": 2}})
    answer = json.loads(raw.text)
    assert answer["citations"][0]["file_id"] == files["passwords.md"].id and len(answer["citations"]) == 2
    assert answer["citations"][0]["index"] == 1 and answer["citations"][0]["vector_store_id"] == store.id
    assert raw.headers["x-gateway-citations"].startswith(files["passwords.md"].id + "#0:")
    sent = sim.last_request()
    assert "retrieval" not in sent  # the gateway's own field never goes upstream
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "system", "user"] and "thirty minutes" in sent["messages"][1]["content"]
    assert "[1] passwords.md" in sent["messages"][1]["content"]
    row = ledger_row(stores, raw.headers["x-request-id"])
    kept = row["retrieval"] if isinstance(row["retrieval"], dict) else json.loads(row["retrieval"])
    assert kept["vector_store_ids"] == [store.id] and kept["chunks"][0]["file_id"] == files["passwords.md"].id
    status, recent = http_request(gateway.port, "GET", "/api/v1/requests?tenant=acme&limit=50",
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    shown = next(r for r in recent["data"] if r["request_id"] == raw.headers["x-request-id"])
    assert status == 200 and shown["retrieval"] == kept  # the admin sees what the chat read

    stream = api.chat.completions.with_raw_response.create(
        model="small", stream=True, messages=[{"role": "user", "content": "tomato spacing?"}],
        extra_body={"retrieval": {"vector_store_ids": [store.id]}})
    assert stream.headers["x-gateway-citations"].startswith(files["garden.html"].id)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream.parse() if chunk.choices)


def test_chat_retrieval_refuses_what_it_cannot_do(setup, indexed):
    gateway, keys = setup
    store, _ = indexed
    headers = {"Authorization": f"Bearer {keys['acme']}"}
    question = [{"role": "user", "content": "refund?"}]
    for retrieval, status, param in (("vs_x", 400, "retrieval"), ({"vector_store_ids": []}, 400,
                                                                  "retrieval.vector_store_ids"),
                                     ({"vector_store_ids": [store.id], "max_results": 0}, 400,
                                      "retrieval.max_results"),
                                     ({"vector_store_ids": [store.id], "rank": 1}, 400, "retrieval.rank"),
                                     ({"vector_store_ids": ["vs_unknown"]}, 404, "retrieval.vector_store_ids")):
        got, error = http_request(gateway.port, "POST", "/v1/chat/completions", json.dumps(
            {"model": "small", "messages": question, "retrieval": retrieval}).encode(), headers)
        assert got == status and error["error"]["param"] == param, (retrieval, error)
    got, error = http_request(gateway.port, "POST", "/v1/chat/completions", json.dumps(
        {"model": "small", "messages": question, "retrieval": {"vector_store_ids": [store.id]}}).encode(),
        {"Authorization": f"Bearer {keys['globex']}"})
    assert got == 404  # another tenant's store


def test_the_semantic_cache_answers_a_question_asked_in_other_words(setup):
    gateway, keys = setup
    api = client(gateway, keys["globex"])

    def ask(question: str, api=api, **extra):
        extra = {"max_tokens": 12, **extra}
        raw = api.chat.completions.with_raw_response.create(
            model="small", temperature=0, messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": question}], **extra)
        return raw.headers["x-gateway-cache"], raw.parse().choices[0].message.content

    first, answer = ask("How do I change the password of my account?")
    assert first == "miss"
    kind, again = ask("How can I change my account's password?")
    assert kind.startswith("semantic-hit; similarity=0.9") and again == answer
    assert ask("How do I change the e-mail address of my account?")[0] == "miss"  # close in words, not in meaning
    assert ask("How can I change my account's password?", max_tokens=13)[0] == "miss"  # other parameters
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    assert ask("How can one change the password of an account?", tools=tools)[0] == "miss"  # tools: exact only
    assert ask("How can I change my account's password?", api=client(gateway, keys["acme"]))[0] == "miss"  # tenants


def test_an_upload_cut_off_or_too_large_keeps_nothing(setup):
    import socket

    gateway, keys = setup
    api = client(gateway, keys["globex"])
    before = {f.id for f in api.files.list().data}
    boundary = "cut0ff"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"half.txt\"\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as connection:
        connection.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + keys["globex"].encode()
                           + f"\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                             f"Content-Length: {len(head) + 100_000}\r\n\r\n".encode() + head + b"half of it " * 100)
    time.sleep(0.5)  # the gateway sees the client leave half way
    assert {f.id for f in api.files.list().data} == before
    too_large = b"x" * (16 * 1024 * 1024 + 1)  # past GATEWAY_MAX_BODY_BYTES
    with pytest.raises(openai.APIStatusError) as refused:
        api.files.create(file=("huge.txt", io.BytesIO(too_large)), purpose="assistants")
    assert refused.value.status_code == 413
    assert {f.id for f in api.files.list().data} == before


def test_indexing_cut_short_by_a_restart_is_finished_by_the_next_start(sim, tmp_path):
    gateway, keys = start(tmp_path / "restart", sim.url)
    try:
        api = client(gateway, keys["acme"])
        text = " ".join(f"Section {i} describes how the boiler of model {i % 9} is serviced every spring." for i in
                        range(600))
        document = api.files.create(file=("boilers.txt", io.BytesIO(text.encode())), purpose="assistants")
        store = api.vector_stores.create(name="interrupted", file_ids=[document.id])
    finally:
        gateway.stop()  # while the file is being indexed
    gateway = GatewayProcess(tmp_path / "restart")
    try:
        api = client(gateway, keys["acme"])
        assert wait_indexed(api, store.id).file_counts.completed == 1
        assert api.vector_stores.search(store.id, query="boiler servicing", max_num_results=1).data
    finally:
        gateway.stop()


def test_a_tenant_id_used_again_starts_without_the_old_tenants_documents(sim, tmp_path):
    admin_key = "sk-admin-retrieval-" + "r" * 24
    gateway, _ = start(tmp_path / "reuse", sim.url)
    gateway.stop()
    gateway = GatewayProcess(tmp_path / "reuse", env={"GATEWAY_ADMIN_KEY": admin_key})
    admin = {"Authorization": f"Bearer {admin_key}"}
    try:
        def new_tenant() -> openai.OpenAI:
            status, made = http_request(gateway.port, "POST", "/api/v1/organizations",
                                        json.dumps({"name": "Reused", "id": "reused"}).encode(), admin)
            assert status == 201, made
            status, key = http_request(gateway.port, "POST", "/api/v1/organizations/reused/keys", b"{}", admin)
            return client(gateway, key["key"])

        api = new_tenant()
        old = api.files.create(file=("secret.txt", io.BytesIO(b"The old tenant's launch date is in May.")),
                               purpose="assistants")
        store = api.vector_stores.create(name="old", file_ids=[old.id])
        wait_indexed(api, store.id)
        status, _ = http_request(gateway.port, "DELETE", "/api/v1/organizations/reused", headers=admin)
        assert status == 200
        api = new_tenant()
        assert api.files.list().data == [] and api.vector_stores.list().data == []
        for call in (lambda: api.files.retrieve(old.id), lambda: api.vector_stores.retrieve(store.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        mine = api.vector_stores.create(name="new")
        assert api.vector_stores.search(mine.id, query="launch date").data == []
    finally:
        gateway.stop()


def test_lists_are_newest_first_and_page_by_cursor(setup):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    made = [api.vector_stores.create(name=f"page {i}").id for i in range(3)]
    newest_first = [s.id for s in api.vector_stores.list(limit=100).data]
    assert [i for i in newest_first if i in made] == made[::-1]  # OpenAI's default order
    oldest_first = api.vector_stores.list(limit=100, order="asc")
    assert [s.id for s in oldest_first.data] == newest_first[::-1] and oldest_first.has_more is False
    assert [s.id for s in api.vector_stores.list(limit=1)] == newest_first  # the SDK follows after= page by page
    assert [s.id for s in api.vector_stores.list(limit=2, before=newest_first[2]).data] == newest_first[:2]
    assert api.vector_stores.list(limit=len(newest_first)).has_more is False
    uploaded = [api.files.create(file=(f"p{i}.txt", io.BytesIO(b"page")), purpose="assistants").id for i in range(2)]
    listed = [f.id for f in api.files.list(limit=1)]
    assert [i for i in listed if i in uploaded] == uploaded[::-1]
    assert [f.id for f in api.files.list(order="asc", limit=100).data] == listed[::-1]
    other_purpose = api.files.create(file=("batch.txt", io.BytesIO(b"page")), purpose="batch").id
    assert other_purpose not in [f.id for f in api.files.list(purpose="assistants", limit=100).data]
    assert [f.id for f in api.files.list(purpose="batch").data] == [other_purpose]
    store = api.vector_stores.create(name="ordered", file_ids=uploaded)
    in_store = [f.id for f in api.vector_stores.files.list(store.id, order="asc", limit=1)]
    assert in_store == uploaded
    status, error = http_request(gateway.port, "GET", "/v1/vector_stores?order=sideways",
                                 headers={"Authorization": f"Bearer {keys['acme']}"})
    assert status == 400 and error["error"]["param"] == "order"


def test_file_batches_as_the_sdks_poll_them(setup):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    store = api.vector_stores.create(name="batched")
    batch = api.vector_stores.file_batches.upload_and_poll(store.id, files=[
        ("hours.txt", io.BytesIO(b"The support desk answers from nine to five on weekdays.")),
        ("holidays.md", io.BytesIO(b"# Holidays\n\nThe office is closed on the first of May."))])
    assert batch.status == "completed" and batch.file_counts.completed == 2 and batch.file_counts.total == 2
    assert batch.object == "vector_store.files_batch" and batch.vector_store_id == store.id
    listed = api.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id)
    assert len(listed.data) == 2 and all(f.status == "completed" for f in listed.data)
    again = api.vector_stores.file_batches.create_and_poll(store.id, file_ids=[listed.data[0].id])
    assert again.status == "completed" and again.file_counts.total == 1
    assert api.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id).file_counts.total == 1
    long_file = api.files.create(file=("long.txt", io.BytesIO(
        " ".join(f"Clause {i} of the lease." for i in range(6000)).encode())), purpose="assistants")
    slow = api.vector_stores.file_batches.create(store.id, file_ids=[long_file.id])
    cancelled = api.vector_stores.file_batches.cancel(slow.id, vector_store_id=store.id)
    assert cancelled.status == "cancelled" and cancelled.file_counts.cancelled == 1
    assert api.vector_stores.retrieve(store.id).file_counts.cancelled == 1
    assert long_file.id not in {r.file_id for r in api.vector_stores.search(store.id, query="lease clause").data}
    for call in (lambda: api.vector_stores.file_batches.retrieve("vsfb_nope", vector_store_id=store.id),
                 lambda: client(gateway, keys["globex"]).vector_stores.file_batches.retrieve(
                     batch.id, vector_store_id=store.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert api.vector_stores.file_batches.create(store.id).status == "completed"  # an empty batch, done at once


def test_attributes_filters_and_ranking_options(setup):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    store = api.vector_stores.create(name="filtered", expires_after={"anchor": "last_active_at", "days": 7})
    assert store.expires_after.days == 7 and store.expires_at > store.created_at
    texts = {"2023.txt": ("Revenue grew by four percent in the fiscal year.", {"year": 2023, "region": "emea"}),
             "2024.txt": ("Revenue grew by nine percent in the fiscal year.", {"year": 2024, "region": "apac"}),
             "draft.txt": ("Revenue forecasts are drafts until approved.", {"year": 2024, "draft": True})}
    ids = {}
    for name, (text, attributes) in texts.items():
        made = api.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants")
        ids[name] = made.id
        api.vector_stores.files.create(store.id, file_id=made.id, attributes=attributes)
    wait_indexed(api, store.id)
    search = lambda **options: {r.filename for r in api.vector_stores.search(  # noqa: E731
        store.id, query="revenue growth", **options).data}
    assert search() == set(texts)
    assert search(filters={"type": "eq", "key": "year", "value": 2024}) == {"2024.txt", "draft.txt"}
    assert search(filters={"type": "gte", "key": "year", "value": 2024}) == {"2024.txt", "draft.txt"}
    assert search(filters={"type": "and", "filters": [{"type": "eq", "key": "year", "value": 2024},
                                                      {"type": "ne", "key": "draft", "value": True}]}) == {"2024.txt"}
    assert search(filters={"type": "or", "filters": [{"type": "eq", "key": "region", "value": "emea"},
                                                     {"type": "eq", "key": "draft", "value": True}]}) == {
        "2023.txt", "draft.txt"}
    assert search(filters={"type": "eq", "key": "year", "value": "2024"}) == set()  # a string is not a number
    assert search(ranking_options={"score_threshold": 0.99}) == set()
    page = api.vector_stores.search(store.id, query=["nine percent", "forecast drafts"], max_num_results=2)
    assert {r.filename for r in page.data} == {"2024.txt", "draft.txt"}
    assert page.data[0].attributes in (texts["2024.txt"][1], texts["draft.txt"][1])
    changed = api.vector_stores.files.update(ids["draft.txt"], vector_store_id=store.id, attributes={"year": 2025})
    assert changed.attributes == {"year": 2025}
    assert search(filters={"type": "eq", "key": "year", "value": 2025}) == {"draft.txt"}
    content = api.vector_stores.files.content(ids["2023.txt"], vector_store_id=store.id)
    assert [part.text for part in content.data] == [texts["2023.txt"][0]]
    headers = {"Authorization": f"Bearer {keys['acme']}"}
    for bad, param in (({"query": "x", "rewrite_query": True}, "rewrite_query"),
                       ({"query": "x", "filters": {"type": "like", "key": "a", "value": 1}}, "filters"),
                       ({"query": "x", "ranking_options": {"score_threshold": 2}}, "ranking_options"),
                       ({"query": ["x"] * 11}, "query"), ({"query": []}, "query"),
                       ({"query": "x", "filters": _nested(12)}, None)):
        status, error = http_request(gateway.port, "POST", f"/v1/vector_stores/{store.id}/search",
                                     json.dumps(bad).encode(), headers)
        assert status == 400 and (param is None or error["error"]["param"].startswith(param)), (bad, error)
    for attributes in ({str(i): i for i in range(17)}, {"k": "v" * 513}, {"k": 2**60}, {"k": {"nested": 1}},
                       {"k\u0000": 1}):
        status, error = http_request(gateway.port, "POST", f"/v1/vector_stores/{store.id}/files",
                                     json.dumps({"file_id": ids["2023.txt"], "attributes": attributes}).encode(),
                                     headers)
        assert status == 400 and error["error"]["param"].startswith("attributes"), (attributes, error)
    status, error = http_request(gateway.port, "POST", "/v1/vector_stores", json.dumps(
        {"name": "x", "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 100}}}).encode(),
        headers)
    assert status == 400 and error["error"]["param"].startswith("chunking_strategy"), error


def _nested(depth: int) -> dict:
    condition = {"type": "eq", "key": "year", "value": 1}
    for _ in range(depth):
        condition = {"type": "and", "filters": [condition]}
    return condition


def test_a_store_past_its_expiry_is_removed(setup, stores):
    gateway, keys = setup
    api = client(gateway, keys["acme"])
    document = api.files.create(file=("old.txt", io.BytesIO(b"The archive keeps minutes of 1998.")),
                                purpose="assistants")
    store = api.vector_stores.create(name="ephemeral", file_ids=[document.id],
                                     expires_after={"anchor": "last_active_at", "days": 1})
    wait_indexed(api, store.id)
    stores.query("UPDATE vector_stores SET last_active_at = now() - interval '2 days' WHERE id = $1", store.id)
    deadline = time.monotonic() + 90
    while True:
        try:
            api.vector_stores.retrieve(store.id)
        except openai.NotFoundError:
            break
        assert time.monotonic() < deadline, "the expired store is still there"
        time.sleep(0.5)
    assert api.files.retrieve(document.id).id == document.id  # its files stay, as after a DELETE
