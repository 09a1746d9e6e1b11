"""Fine-tuning end to end, on this machine: a tiny causal language model built here from a config (random weights,
nothing downloaded), OpenAI's fine-tuning API driven by the official openai client, a real LoRA run on the
gateway's own worker, the adapter written to storage, loaded by the simulator's node (which checks its files and
shapes against the base model) and used by a chat request through the gateway."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
import redis
import yaml

from conftest import GatewayProcess, Simulator, http_request, ledger_row
from console_setup import browser, page, sign_in, until  # noqa: F401  (the console's browser, for its page)
from gateway.bench.fine_tuning import BASE, build_base_model, examples
from gateway.config.keys import generate_key, hash_key

pytest.importorskip("peft", reason="the trainer's extra (pip install -e .[train]) is not installed")

ADMIN_KEY = "sk-admin-fine-tuning-0123456789"


class Setup:
    def __init__(self, tmp_path: Path, storage: str | None = None, env: dict | None = None,
                 fine_tuning: dict | None = None, port: int | None = None, models: tuple[str, ...] = ("llama",)
                 ) -> None:
        self.weights = tmp_path / "base"
        build_base_model(self.weights)
        self.sim = Simulator("--model", BASE, "--max-loras", "2", "--base-config", str(self.weights / "config.json"))
        self.keys = {name: generate_key() for name in ("acme", "other")}
        config = tmp_path / "config"
        config.mkdir()
        models = {"fleet": {"refresh_seconds": 0.3, "load_timeout": 20, "pools": {"gpus": {
                      "model": BASE, "weights": str(self.weights),
                      "nodes": [{"url": f"{self.sim.url}/v1", "name": "node0"}]}}},
                  "models": {**{name: {"context_window": 120, "deployments": [
                      {"name": "gpus", "api_base": "fleet:gpus"}]} for name in models},
                             "plain": {"deployments": [{"name": "sim", "api_base": f"{self.sim.url}/v1",
                                                        "model": BASE}]}},
                  "fine_tuning": {"jobs_per_tenant": 3, "gpu_second_usd": 0.001, "max_epochs": 100,
                                  **(fine_tuning or {})}}
        (config / "models.yaml").write_text(yaml.safe_dump(models))
        (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {
            name: {"name": name, "tier": "enterprise", "keys": [{"name": "k", "sha256": hash_key(key)}],
                   "limits": {"monthly_budget_usd": 1.0} if name == "other" else {}}
            for name, key in self.keys.items()}}))
        self.storage = tmp_path / "storage"
        try:
            self.gateway = self._start_gateway(config, storage, env, port)
        except BaseException:
            self.sim.stop()
            raise

    def _start_gateway(self, config: Path, storage: str | None, env: dict | None, port: int | None):
        return GatewayProcess(config, env={"GATEWAY_FINETUNE_STORAGE": storage or str(self.storage),
                                           "GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_FINETUNE_SCHEDULE_SECONDS": "0.5",
                                           "GATEWAY_FINETUNE_BEAT_SECONDS": "1", **(env or {})}, port=port)

    def client(self, tenant: str) -> openai.OpenAI:
        return self.gateway.client(self.keys[tenant], timeout=60)

    def upload(self, tenant: str, content: bytes, name: str = "train.jsonl", purpose: str = "fine-tune") -> str:
        return self.client(tenant).files.create(file=(name, content), purpose=purpose).id

    def wait(self, tenant: str, job_id: str, states: tuple[str, ...], timeout: float = 240.0):
        deadline = time.monotonic() + timeout
        while True:
            job = self.client(tenant).fine_tuning.jobs.retrieve(job_id)
            if job.status in states:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.3)

    def stop(self) -> None:
        self.gateway.stop()
        self.sim.stop()


@pytest.fixture(scope="module")
def tuning(tmp_path_factory):
    setup = None
    try:
        setup = Setup(tmp_path_factory.mktemp("fine-tuning"))
        yield setup
    finally:
        if setup is not None:
            setup.stop()


def test_a_job_trains_an_adapter_that_serves_the_tenant_at_once(tuning, stores):
    client = tuning.client("acme")
    training = tuning.upload("acme", examples(12))
    validation = tuning.upload("acme", examples(4), "valid.jsonl")
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(model="llama", training_file=training, validation_file=validation,
                                         hyperparameters={"n_epochs": 2, "batch_size": 4}, suffix="support", seed=7,
                                         metadata={"team": "care"})
    assert job.status == "queued" and job.hyperparameters.n_epochs == 2 and job.seed == 7
    done = tuning.wait("acme", job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft:llama:acme:support:") and done.trained_tokens > 0
    answer = client.chat.completions.with_raw_response.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "where is my parcel"}], max_tokens=5)
    first_answer_seconds = time.monotonic() - started
    assert answer.headers["x-gateway-adapter"] == done.fine_tuned_model
    assert f"acme/{done.fine_tuned_model}" in tuning.sim.stats()["lora_registered"]
    print(f"\nfrom POST /v1/fine_tuning/jobs to the first chat answered with the adapter: {first_answer_seconds:.1f} s")
    adapter = tuning.storage / "acme" / "adapters" / job.id
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    losses = [e.data["train_loss"] for e in events if e.type == "metrics"]
    assert len(losses) == 6 and all(isinstance(loss, float) for loss in losses)
    assert any("successfully completed" in e.message for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(c.fine_tuning_job_id == job.id for c in checkpoints)
    assert [m.id for m in client.models.list().data].count(done.fine_tuned_model) == 1
    assert done.fine_tuned_model not in [m.id for m in tuning.client("other").models.list().data]
    listed = client.fine_tuning.jobs.list(extra_query={"metadata[team]": "care"}).data
    assert [j.id for j in listed] == [job.id]
    row = ledger_row(stores, f"{job.id}-training")
    assert row["tenant_id"] == "acme" and row["route"] == "fine_tuning.jobs" and float(row["cost_usd"]) > 0
    month = time.strftime("%Y%m", time.gmtime())
    spent = int(redis.Redis.from_url(stores.redis_url).get(f"gw:{{acme}}:spend:{month}") or 0)
    assert spent >= int(float(row["cost_usd"]) * 1e9) - 1 > 0  # paid from the same monthly budget as requests


def test_a_tenant_whose_budget_is_spent_cannot_start_a_job(tuning, stores):
    month = time.strftime("%Y%m", time.gmtime())
    store = redis.Redis.from_url(stores.redis_url)
    store.set(f"gw:{{other}}:spend:{month}", int(1.5e9))  # $1.50 of a $1 budget
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            tuning.client("other").fine_tuning.jobs.create(model="llama",
                                                           training_file=tuning.upload("other", examples(10)))
        assert caught.value.code == "insufficient_quota"
    finally:
        store.delete(f"gw:{{other}}:spend:{month}")


def test_another_tenants_job_and_model_are_not_found(tuning):
    job = tuning.client("acme").fine_tuning.jobs.create(model="llama", training_file=tuning.upload("acme",
                                                                                                   examples(10)))
    other = tuning.client("other")
    for call in (lambda: other.fine_tuning.jobs.retrieve(job.id), lambda: other.fine_tuning.jobs.cancel(job.id),
                 lambda: other.fine_tuning.jobs.list_events(job.id),
                 lambda: other.fine_tuning.jobs.checkpoints.list(job.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):  # acme's file, for another tenant's job
        other.fine_tuning.jobs.create(model="llama", training_file=job.training_file)
    tuning.client("acme").fine_tuning.jobs.cancel(job.id)


@pytest.mark.parametrize("content, line, code", [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}\nnot json\n',
     2, "invalid_training_file"),
    (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', 1, "invalid_training_file"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n', 1,
     "empty_assistant_turn"),
    (b'{"messages": [{"role": "user", "content": "hi\\u0000"}, {"role": "assistant", "content": "x"}]}\n'
     b'{"messages": [{"role": "user", "content": "hi"}]}\n', 2, "no_assistant_turn"),
])
def test_a_bad_training_file_is_a_400_naming_its_line(tuning, content, line, code):
    with pytest.raises(openai.BadRequestError) as caught:
        tuning.upload("acme", content)
    assert caught.value.code == code and f"line {line} " in caught.value.message, caught.value.message


def test_a_job_that_cannot_be_made_is_a_4xx_naming_the_field(tuning):
    client = tuning.client("acme")
    good = tuning.upload("acme", examples(10))
    jobs_before = len(client.fine_tuning.jobs.list(limit=100).data)
    document = tuning.upload("acme", b"some notes", "notes.txt", purpose="assistants")
    long_example = json.dumps({"messages": [{"role": "user", "content": "hello " * 200},
                                            {"role": "assistant", "content": "yes"}]}).encode() + b"\n"
    cases = [
        (dict(model="gpt-4o-mini", training_file=good), "model", openai.BadRequestError),
        (dict(model="plain", training_file=good), "model", openai.BadRequestError),  # no pool weights
        (dict(model="llama", training_file=document), "training_file", openai.BadRequestError),
        (dict(model="llama", training_file="file-nosuchfile"), "training_file", openai.NotFoundError),
        (dict(model="llama", training_file=good, hyperparameters={"n_epochs": 0}), "hyperparameters.n_epochs",
         openai.BadRequestError),
        (dict(model="llama", training_file=good, hyperparameters={"learning_rate_multiplier": 99}),
         "hyperparameters.learning_rate_multiplier", openai.BadRequestError),
        (dict(model="llama", training_file=good, suffix="bad suffix!"), "suffix", openai.BadRequestError),
        (dict(model="llama", training_file=tuning.upload("acme", long_example + examples(10))), "training_file",
         openai.BadRequestError),  # one example past the base model's context window
        (dict(model="llama", training_file=tuning.upload("acme", examples(3))), "training_file",
         openai.BadRequestError),  # too few examples
    ]
    for arguments, param, error in cases:
        with pytest.raises(error) as caught:
            client.fine_tuning.jobs.create(**arguments)
        assert caught.value.param == param, (arguments, caught.value.body)
    assert len(client.fine_tuning.jobs.list(limit=100).data) == jobs_before  # none was made


def test_cancel_stops_a_running_job_and_a_finished_one_cannot_be_cancelled(tuning):
    client = tuning.client("acme")
    job = client.fine_tuning.jobs.create(model="llama", training_file=tuning.upload("acme", examples(40)),
                                         hyperparameters={"n_epochs": 100, "batch_size": 1})
    tuning.wait("acme", job.id, ("running",))
    deadline = time.monotonic() + 60
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    client.fine_tuning.jobs.cancel(job.id)
    cancelled = tuning.wait("acme", job.id, ("cancelled", "failed", "succeeded"), timeout=30)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.cancel(job.id)
    assert caught.value.code == "job_already_finished"


def test_a_job_whose_training_file_is_deleted_fails_with_that_reason(tuning):
    client = tuning.client("acme")
    training = tuning.upload("acme", examples(40))
    job = client.fine_tuning.jobs.create(model="llama", training_file=training,
                                         hyperparameters={"n_epochs": 100, "batch_size": 1})
    tuning.wait("acme", job.id, ("running",))
    client.files.delete(training)
    failed = tuning.wait("acme", job.id, ("failed", "cancelled", "succeeded"), timeout=30)
    assert failed.status == "failed" and failed.error.code == "training_file_deleted"


def test_a_job_whose_gateway_died_is_queued_again_then_failed_never_left_running(tuning, stores):
    """A job ``running`` with a heartbeat that stopped (its gateway was killed): queued again to resume, and after
    three restarts failed with that reason. (Rows made here, on a storage no gateway of the test keeps, so that
    none trains them.)"""
    insert = ("INSERT INTO fine_tuning_jobs (id, tenant_id, model, training_file, hyperparameters, seed, status, "
              "runner, heartbeat_at, storage, restarts, cancel_requested, gpu_seconds, gpu_second_usd) VALUES ($1, "
              "'acme', 'llama', 'file-x', '{\"n_epochs\": 1, \"batch_size\": 1, \"learning_rate_multiplier\": 1.0}', 1, "
              "'running', 'gone:1', now() - interval '10 minutes', 'elsewhere', $2, $3, 12, 0.001)")
    stores.query(insert, "ftjob-orphan-restarted", 0, False)
    stores.query(insert, "ftjob-orphan-given-up", 3, False)
    stores.query(insert, "ftjob-orphan-cancelled", 0, True)  # cancelled while its gateway was down
    again = tuning.wait("acme", "ftjob-orphan-restarted", ("queued",), timeout=30)
    assert again.error is None
    events = tuning.client("acme").fine_tuning.jobs.list_events("ftjob-orphan-restarted").data
    assert any("queued again to resume" in e.message for e in events)
    failed = tuning.wait("acme", "ftjob-orphan-given-up", ("failed",), timeout=30)
    assert failed.error.code == "runner_lost"
    assert tuning.wait("acme", "ftjob-orphan-cancelled", ("cancelled", "queued"), timeout=30).status == "cancelled"
    lost = ledger_row(stores, "ftjob-orphan-restarted-training")  # its time up to its last heartbeat is billed
    assert lost["status"] == 503 and float(lost["cost_usd"]) == pytest.approx(0.012)
    tuning.client("acme").fine_tuning.jobs.cancel("ftjob-orphan-restarted")


def test_a_gateway_killed_mid_job_is_resumed_from_the_checkpoint_by_the_next(tuning, tmp_path):
    """SIGKILL while a job trains, after its first checkpoint; the next gateway on the same storage finds the job
    without a heartbeat, queues it again, and trains it from that checkpoint to the end."""
    env = {"GATEWAY_FINETUNE_STORAGE": str(tmp_path / "storage"), "GATEWAY_FINETUNE_STALE_SECONDS": "3",
           "GATEWAY_FINETUNE_BEAT_SECONDS": "1",
           "GATEWAY_ADMIN_KEY": ADMIN_KEY}
    first = GatewayProcess(tuning.gateway.config_dir, env={**env, "GATEWAY_DATA_DIR": str(tmp_path / "data-1")})
    second = None
    try:
        client = first.client(tuning.keys["acme"], timeout=60)
        training = client.files.create(file=("train.jsonl", examples(40)), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model="llama", training_file=training,
                                             hyperparameters={"n_epochs": 3, "batch_size": 1})
        deadline = time.monotonic() + 120
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
            assert time.monotonic() < deadline, client.fine_tuning.jobs.retrieve(job.id)
            time.sleep(0.2)
        first.process.kill()  # no shutdown, no last word: a crash
        first.process.wait(timeout=10)
        second = GatewayProcess(tuning.gateway.config_dir, env={**env, "GATEWAY_DATA_DIR": str(tmp_path / "data-2")})
        client = second.client(tuning.keys["acme"], timeout=60)
        deadline = time.monotonic() + 180
        while (done := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, done
            time.sleep(0.3)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert any("queued again to resume" in m for m in messages)
        resumed = [m for m in messages if m.startswith("Resuming from the checkpoint of step")]
        assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 40
        steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data
                 if e.type == "metrics"]
        assert max(steps) == 120
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_the_node_refuses_an_adapter_that_does_not_fit_its_base_model(tuning, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                           "target_modules": ["q_proj", "v_proj"]}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": np.zeros((8, 64), dtype=np.float32),  # the base's hidden size is 32
               f"{prefix}.lora_B.weight": np.zeros((32, 8), dtype=np.float32)}, str(wrong / "adapter_model.safetensors"))
    status, body = http_request(tuning.sim.port, "POST", "/v1/load_lora_adapter",
                                json.dumps({"lora_name": "wrong", "lora_path": str(wrong)}).encode())
    assert status == 400 and "the base model needs [8, 32]" in json.dumps(body), body
    status, body = http_request(tuning.sim.port, "POST", "/v1/load_lora_adapter",
                                json.dumps({"lora_name": "missing", "lora_path": str(tmp_path / "none")}).encode())
    assert status == 400 and "No adapter found" in json.dumps(body), body


def test_a_deleted_tenants_jobs_and_adapters_do_not_pass_to_the_next_tenant_of_its_id(tuning):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    tenant = f"ft-reused-{time.time_ns() % 10**9}"  # the test's own: the stores are the session's

    def new_tenant() -> openai.OpenAI:
        status, made = http_request(tuning.gateway.port, "POST", "/api/v1/organizations",
                                    json.dumps({"id": tenant, "name": "Reused", "tier": "enterprise"}).encode(),
                                    admin)
        assert status == 201, made
        status, key = http_request(tuning.gateway.port, "POST", f"/api/v1/organizations/{tenant}/keys",
                                   json.dumps({"name": "k"}).encode(), admin)
        assert status == 201, key
        return tuning.gateway.client(key["key"], timeout=60)

    first = new_tenant()
    training = first.files.create(file=("train.jsonl", examples(12)), purpose="fine-tune").id
    done = first.fine_tuning.jobs.create(model="llama", training_file=training, hyperparameters={"n_epochs": 1})
    deadline = time.monotonic() + 120
    while first.fine_tuning.jobs.retrieve(done.id).status != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    model = first.fine_tuning.jobs.retrieve(done.id).fine_tuned_model
    status, changed = http_request(tuning.gateway.port, "PATCH", f"/api/v1/organizations/{tenant}",
                                   json.dumps({"fine_tuned_defaults": {"llama": model}}).encode(), admin)
    assert status == 200 and changed["fine_tuned_models"] == [model] and model not in changed["adapters"], changed
    deadline = time.monotonic() + 10
    while True:  # the tenant's requests for the base model now run on its fine-tuned adapter
        raw = first.chat.completions.with_raw_response.create(model="llama", messages=[{"role": "user",
                                                                                       "content": "hello"}],
                                                              max_tokens=3)
        if raw.headers.get("x-gateway-adapter") == model:
            break
        assert time.monotonic() < deadline, dict(raw.headers)
        time.sleep(0.2)
    running = first.fine_tuning.jobs.create(model="llama", training_file=training,
                                            hyperparameters={"n_epochs": 100, "batch_size": 1})
    assert (tuning.storage / tenant / "adapters" / done.id).is_dir()
    status, _ = http_request(tuning.gateway.port, "DELETE", f"/api/v1/organizations/{tenant}", headers=admin)
    assert status == 200
    second = new_tenant()
    assert second.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        second.fine_tuning.jobs.retrieve(running.id)
    with pytest.raises(openai.NotFoundError):
        second.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}])
    assert model not in [m.id for m in second.models.list().data]
    time.sleep(2)  # a heartbeat (a second here): the job that was training has stopped, and wrote nothing back
    assert not (tuning.storage / tenant).exists()


def test_datasets_and_adapters_live_in_an_s3_compatible_store(tmp_path):
    """moto's server as the S3-compatible store: the job's dataset and adapter land in the bucket, and the node is
    given the adapter's URL."""
    import subprocess
    import sys

    import boto3

    from gateway.stores.embedded import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    setup = None
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                s3 = boto3.client("s3", endpoint_url=credentials["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                                  aws_secret_access_key="testing", region_name="us-east-1")
                s3.create_bucket(Bucket="tuning")
                break
            except Exception:
                assert time.monotonic() < deadline and server.poll() is None, "moto's server did not start"
                time.sleep(0.2)
        setup = Setup(tmp_path, storage="s3://tuning/gateway", env=credentials)
        client = setup.client("acme")
        job = client.fine_tuning.jobs.create(model="llama", training_file=setup.upload("acme", examples(12)),
                                             hyperparameters={"n_epochs": 1, "batch_size": 4})
        done = setup.wait("acme", job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        keys = {item["Key"] for item in s3.list_objects_v2(Bucket="tuning")["Contents"]}
        assert f"gateway/acme/datasets/{job.id}/train.jsonl" in keys
        assert {f"gateway/acme/adapters/{job.id}/adapter_config.json",
                f"gateway/acme/adapters/{job.id}/adapter_model.safetensors"} <= keys
        answer = client.chat.completions.with_raw_response.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "hello"}], max_tokens=3)
        assert answer.headers["x-gateway-adapter"] == done.fine_tuned_model
        assert f"acme/{done.fine_tuned_model}" in setup.sim.stats()["lora_registered"]
    finally:
        if setup is not None:
            setup.stop()
        server.terminate()
        server.wait(timeout=10)


def test_a_schedule_makes_its_job_once_a_period(tuning):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    tenant = f"ft-nightly-{time.time_ns() % 10**9}"  # the test's own: the stores are the session's
    status, _ = http_request(tuning.gateway.port, "POST", "/api/v1/organizations",
                             json.dumps({"id": tenant, "name": "Nightly", "tier": "enterprise"}).encode(), admin)
    assert status == 201
    status, key = http_request(tuning.gateway.port, "POST", f"/api/v1/organizations/{tenant}/keys",
                               json.dumps({"name": "k"}).encode(), admin)
    client = tuning.gateway.client(key["key"], timeout=60)
    training = client.files.create(file=("train.jsonl", examples(10)), purpose="fine-tune").id
    schedules = [{"name": "daily", "every_hours": 24, "model": "llama", "training_file": training,
                  "hyperparameters": {"n_epochs": 1}, "suffix": "daily", "make_default": True},
                 {"name": "broken", "every_hours": 24, "model": "llama", "training_file": "file-gone"}]
    status, body = http_request(tuning.gateway.port, "PATCH", f"/api/v1/organizations/{tenant}",
                                json.dumps({"fine_tuning_schedules": schedules}).encode(), admin)
    assert status == 200, body
    deadline = time.monotonic() + 20
    while not client.fine_tuning.jobs.list().data:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(2)  # several more looks: still one job this period
    made = client.fine_tuning.jobs.list().data
    assert len(made) == 1 and made[0].metadata == {"schedule": "daily"} and made[0].suffix == "daily"
    assert any(f"schedule broken of tenant {tenant} cannot make its job" in line.get("message", "")
               for line in tuning.gateway.log_lines())
    deadline = time.monotonic() + 240
    while (done := client.fine_tuning.jobs.retrieve(made[0].id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, done
        time.sleep(0.3)
    assert done.status == "succeeded", done.error
    deadline = time.monotonic() + 10  # make_default: the tenant's requests for the base model get the new adapter
    while True:
        answer = client.chat.completions.with_raw_response.create(
            model="llama", messages=[{"role": "user", "content": "hello"}], max_tokens=3)
        if answer.headers.get("x-gateway-adapter") == done.fine_tuned_model:
            break
        assert time.monotonic() < deadline, dict(answer.headers)
        time.sleep(0.2)
    http_request(tuning.gateway.port, "DELETE", f"/api/v1/organizations/{tenant}", headers=admin)


def test_a_job_is_stopped_when_its_tenants_budget_runs_out(tuning, stores):
    """Training is paid from the tenant's monthly budget: a job that would spend past it stops, failed with why,
    its time billed."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    tenant = f"ft-thrifty-{time.time_ns() % 10**9}"
    status, body = http_request(tuning.gateway.port, "POST", "/api/v1/organizations", json.dumps(
        {"id": tenant, "name": "Thrifty", "tier": "enterprise", "limits": {"monthly_budget_usd": 0.003}}).encode(),
                                admin)
    assert status == 201, body
    try:
        status, key = http_request(tuning.gateway.port, "POST", f"/api/v1/organizations/{tenant}/keys",
                                   json.dumps({"name": "k"}).encode(), admin)
        client = tuning.gateway.client(key["key"], timeout=60)
        training = client.files.create(file=("train.jsonl", examples(40)), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model="llama", training_file=training,
                                             hyperparameters={"n_epochs": 50, "batch_size": 1})
        deadline = time.monotonic() + 120
        while (done := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, done
            time.sleep(0.3)
        assert done.status == "failed" and done.error.code == "budget_exhausted", done.error
        assert "monthly budget ($0.003) ran out" in done.error.message
        row = ledger_row(stores, f"{job.id}-training")
        assert row["status"] == 500 and float(row["cost_usd"]) >= 0.003
    finally:
        http_request(tuning.gateway.port, "DELETE", f"/api/v1/organizations/{tenant}", headers=admin)


def test_the_console_starts_follows_and_cancels_jobs(tuning, page, tmp_path):
    key = tuning.keys["acme"]
    sign_in(page, tuning.gateway, key)
    page.wait_for_selector("[data-page=fine-tuning]")
    page.click("[data-page=fine-tuning]")
    page.wait_for_selector("[data-form=fine-tune]")
    training = tmp_path / "console.jsonl"
    training.write_bytes(examples(12))
    page.set_input_files("[data-form=fine-tune] input[type=file]", str(training))
    page.fill("[data-form=fine-tune] input[name=n_epochs]", "2")
    page.fill("[data-form=fine-tune] input[name=suffix]", "console")
    page.click("[data-form=fine-tune] button")
    page.wait_for_selector("[data-stat=status]")
    job_id = page.inner_text("#view h1")
    until(lambda: page.inner_text("[data-stat=status] .value") == "succeeded", timeout=120)
    page.wait_for_selector("svg[data-chart=loss] rect.bar")
    # 12 examples, 2 epochs, the batch size "auto" chose for so few: 1
    assert page.eval_on_selector("svg[data-chart=loss]", "c => Number(c.dataset.points)") == 24
    assert page.inner_text("[data-stat=fine_tuned_model] .value").startswith("ft:llama:acme:console:")
    long = tuning.client("acme").fine_tuning.jobs.create(
        model="llama", training_file=tuning.upload("acme", examples(40)),
        hyperparameters={"n_epochs": 100, "batch_size": 1})
    page.goto(f"{tuning.gateway.url}/console/#/fine-tuning/{long.id}")
    page.wait_for_selector("[data-action=cancel]")
    page.click("[data-action=cancel]")
    until(lambda: page.inner_text("[data-stat=status] .value") == "cancelled", timeout=30)
    page.goto(f"{tuning.gateway.url}/console/#/fine-tuning")
    page.wait_for_selector("[data-table=jobs]")
    listed = page.inner_text("[data-table=jobs]")
    assert job_id in listed and long.id in listed
