"""Trainers off the gateways: a command the gateway runs and a Kubernetes Job it makes (against an API server that
speaks Kubernetes' paths and runs the Job's container here), each running ``python -m gateway.finetune.remote``,
which fetches the job's data and reports its steps, checkpoints and adapter to the gateways over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, GatewayProcess, free_port, http_request, ledger_row, processes_with_env
from gateway.bench.fine_tuning import examples

pytest.importorskip("peft", reason="the trainer's extra (pip install -e .[train]) is not installed")

from test_fine_tuning import ADMIN_KEY, Setup  # noqa: E402  (after the skip: it needs the extra too)

REMOTE = [sys.executable, "-m", "gateway.finetune.remote"]
FAILING = [sys.executable, "-c", "import sys; print('CUDA out of memory on gpu-7', file=sys.stderr); sys.exit(3)"]


def _setup(tmp_path: Path, trainers: dict, **options) -> Setup:
    port = free_port()
    return Setup(tmp_path, port=port, models=("llama", "llama-broken", "llama-nowhere"), fine_tuning={
        "gateway_workers": False, "retry_seconds": 0.5,
        "report_url": f"http://127.0.0.1:{options.pop('report_port', port)}",
        "trainers": trainers}, **options)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    setup = None
    try:
        setup = _setup(tmp_path_factory.mktemp("trainers"), {
            "gpu": {"kind": "command", "command": REMOTE, "models": ["llama"]},
            "broken": {"kind": "command", "command": FAILING, "models": ["llama-broken"]},
            "nowhere": {"kind": "command", "command": ["/nonexistent/trainer"], "models": ["llama-nowhere"]}},
            env={"GATEWAY_FINETUNE_STALE_SECONDS": "30"})
        yield setup
    finally:
        if setup is not None:
            setup.stop()


def _first_step(client, job_id: str) -> None:
    """Until the job has trained a step (its first metrics event)."""
    deadline = time.monotonic() + 120
    while not [e for e in client.fine_tuning.jobs.list_events(job_id).data if e.type == "metrics"]:
        assert time.monotonic() < deadline, client.fine_tuning.jobs.retrieve(job_id)
        time.sleep(0.2)


def _finished(setup: Setup, job_id: str, timeout: float = 240.0):
    return setup.wait("acme", job_id, ("succeeded", "failed", "cancelled"), timeout)


def test_a_command_trainer_trains_the_job_and_its_adapter_serves_at_once(remote, stores):
    client = remote.client("acme")
    training = remote.upload("acme", examples(12))
    validation = remote.upload("acme", examples(4), "valid.jsonl")
    job = client.fine_tuning.jobs.create(model="llama", training_file=training, validation_file=validation,
                                         hyperparameters={"n_epochs": 2, "batch_size": 4}, suffix="remote")
    done = _finished(remote, job.id)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert "Started on trainer 'gpu'" in messages
    assert len([e for e in events if e.type == "metrics"]) == 6
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].metrics.valid_loss is not None
    adapter = remote.storage / "acme" / "adapters" / job.id
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    answer = client.chat.completions.with_raw_response.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "where is my parcel"}], max_tokens=5)
    assert answer.headers["x-gateway-adapter"] == done.fine_tuned_model
    row = ledger_row(stores, f"{job.id}-training")
    assert row["status"] == 200 and float(row["cost_usd"]) > 0 and row["tenant_id"] == "acme"


def test_a_trainer_that_cannot_run_or_dies_fails_the_job_with_why(remote):
    client = remote.client("acme")
    training = remote.upload("acme", examples(12))
    died = client.fine_tuning.jobs.create(model="llama-broken", training_file=training)
    never = client.fine_tuning.jobs.create(model="llama-nowhere", training_file=training)
    failed = _finished(remote, died.id, timeout=90)  # each run lost, the job queued again, then failed
    assert failed.status == "failed" and failed.error.code == "runner_lost"
    assert "CUDA out of memory on gpu-7; exit code 3" in failed.error.message
    failed = _finished(remote, never.id, timeout=60)
    assert failed.status == "failed" and failed.error.code == "runner_lost"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(never.id, limit=100).data]
    assert any("Trainer 'nowhere' could not start the job: /nonexistent/trainer" in m for m in messages)
    waits = [m.rsplit(", in ", 1)[1] for m in messages if "could not start" in m and "at the earliest" in m]
    assert sorted(waits) == ["0.5 s at the earliest", "1 s at the earliest", "2 s at the earliest"]  # doubled


def test_cancel_stops_the_run_on_its_trainer(remote):
    client = remote.client("acme")
    training = remote.upload("acme", examples(40))
    job = client.fine_tuning.jobs.create(model="llama", training_file=training,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    _first_step(client, job.id)
    client.fine_tuning.jobs.cancel(job.id)
    assert _finished(remote, job.id, timeout=30).status == "cancelled"
    log = remote.gateway.config_dir / "data" / "training" / "runs" / f"{job.id}-0.log"
    deadline = time.monotonic() + 30
    while "stopped by the gateways" not in log.read_text() and "Terminated" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def _run_processes(remote: Setup, job_id: str) -> list[int]:
    """The processes of a job's run here (the remote program and its trainer), found by the report URL in their
    environment."""
    return processes_with_env("GATEWAY_TRAINER_URL", f"{remote.gateway.url}/v1/fine_tuning/trainer/jobs/{job_id}",
                              exact=True)


def test_a_run_killed_on_its_node_is_resumed_from_its_checkpoint_by_a_new_run(remote):
    client = remote.client("acme")
    training = remote.upload("acme", examples(40))
    job = client.fine_tuning.jobs.create(model="llama", training_file=training,
                                         hyperparameters={"n_epochs": 3, "batch_size": 1})
    deadline = time.monotonic() + 120
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.monotonic() < deadline, client.fine_tuning.jobs.retrieve(job.id)
        time.sleep(0.2)
    processes = _run_processes(remote, job.id)
    assert len(processes) == 2
    for pid in processes:  # the node crashed: no last word
        os.kill(pid, signal.SIGKILL)
    done = _finished(remote, job.id)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    messages = [e.message for e in events]
    assert any("ended without reporting its end (" in m and "killed by signal 9" in m and "queued again" in m
               for m in messages)
    assert any(m.startswith("Started on trainer 'gpu'; resuming from the checkpoint of step") for m in messages)
    assert max(e.data["step"] for e in events if e.type == "metrics") == 120


def test_the_report_routes_take_only_the_current_runs_token(remote):
    """Without a token, with one made up, with bad events or file names: OpenAI-shaped refusals, nothing stored."""
    base = "/v1/fine_tuning/trainer/jobs/ftjob-0123456789abcdef01234567"
    port = remote.gateway.port
    status, body = http_request(port, "GET", base)
    assert status == 401 and body["error"]["code"] == "invalid_trainer_token"
    made_up = {"Authorization": "Bearer ftrun-made-up"}
    status, body = http_request(port, "POST", base + "/events", json.dumps({"event": "done"}).encode(), made_up)
    assert status == 409 and body["error"]["code"] == "run_not_current"
    status, body = http_request(port, "PUT", base + "/adapter/adapter_model.safetensors", b"x" * 10, made_up)
    assert status == 409
    status, body = http_request(port, "POST", base + "/events", json.dumps({"event": "step", "step": -1}).encode(),
                                made_up)
    assert status == 400 and body["error"]["param"] in ("event", "step", "body.step")
    status, _ = http_request(port, "GET", base + "/data/..%2F..%2Fetc%2Fpasswd", headers=made_up)
    assert status in (404, 409)


def test_the_run_goes_on_when_the_gateway_that_started_it_is_killed(tmp_path):
    """Gateway A starts the run and is killed (SIGKILL) while it trains; the run reports to gateway B (the report
    URL: the load balancer in real life), which finishes the job."""
    port_b = free_port()
    setup = _setup(tmp_path, {"gpu": {"kind": "command", "command": REMOTE}}, report_port=port_b,
                   env={"GATEWAY_DATA_DIR": str(tmp_path / "data-a")})
    second = None
    try:
        second = GatewayProcess(setup.gateway.config_dir, port=port_b, env={
            "GATEWAY_FINETUNE_STORAGE": str(setup.storage), "GATEWAY_FINETUNE_TRAINER": "0",
            "GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_DATA_DIR": str(tmp_path / "data-b")})
        client = setup.client("acme")
        training = setup.upload("acme", examples(40))
        job = client.fine_tuning.jobs.create(model="llama", training_file=training,
                                             hyperparameters={"n_epochs": 3, "batch_size": 1})
        _first_step(client, job.id)
        setup.gateway.process.kill()
        setup.gateway.process.wait(timeout=10)
        client = second.client(setup.keys["acme"], timeout=60)
        deadline = time.monotonic() + 180
        while (done := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, done
            time.sleep(0.3)
        assert done.status == "succeeded", done.error
        steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data
                 if e.type == "metrics"]
        assert max(steps) == 120
        answer = client.chat.completions.with_raw_response.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "hello"}], max_tokens=3)
        assert answer.headers["x-gateway-adapter"] == done.fine_tuned_model
    finally:
        setup.stop()
        if second is not None:
            second.stop()


def _wait_for_delete(kube: "KubeApi", job_id: str, run: int) -> None:
    deadline = time.monotonic() + 30
    while not any(r["method"] == "DELETE" and r["path"].endswith(f"/ft-{job_id.removeprefix('ftjob-')}-{run}")
                  for r in kube.requests()):
        assert time.monotonic() < deadline, kube.requests()[-3:]
        time.sleep(0.2)


class KubeApi:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.token = "kube-token-0123456789"
        self.log = folder / "kube-api.jsonl"
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kube_api.py"), "--port",
                                         str(self.port), "--token", self.token, "--log", str(self.log)])
        deadline = time.monotonic() + 30
        while True:
            try:
                http_request(self.port, "GET", "/version")
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("the Kubernetes API stand-in did not start")
                time.sleep(0.05)

    def requests(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)


def test_a_kubernetes_trainer_makes_a_job_that_trains_and_one_cancelled_is_deleted(tmp_path):
    kube = KubeApi(tmp_path)
    setup = None
    try:
        template = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "placeholder"}, "spec": {
            "backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "trainer", "image": "registry.example/gateway-trainer:1", "command": REMOTE[:1],
                "args": [*REMOTE[1:], "--workdir", str(tmp_path)],
                "env": [{"name": "JOB", "value": "{job_id}"}],
                "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}}}
        config_template = tmp_path / "trainer-job.yaml"
        config_template.write_text(yaml.safe_dump(template))
        silent = json.loads(json.dumps(template))  # a pod that never reports (stuck pulling, wedged)
        silent["spec"]["template"]["spec"]["containers"][0].update(command=["sleep"], args=["600"])
        (tmp_path / "silent-job.yaml").write_text(yaml.safe_dump(silent))
        cluster = {"kind": "kubernetes", "api_server": f"http://127.0.0.1:{kube.port}", "namespace": "training",
                   "token": "env:KUBE_TOKEN"}
        setup = _setup(tmp_path, {
            "k8s": {**cluster, "job_template": str(config_template), "models": ["llama"]},
            "silent": {**cluster, "job_template": str(tmp_path / "silent-job.yaml"), "models": ["llama-broken"],
                       "start_seconds": 1}},
            env={"KUBE_TOKEN": kube.token, "GATEWAY_FINETUNE_STALE_SECONDS": "3"})
        client = setup.client("acme")
        training = setup.upload("acme", examples(12))
        job = client.fine_tuning.jobs.create(model="llama", training_file=training,
                                             hyperparameters={"n_epochs": 1, "batch_size": 4})
        done = _finished(setup, job.id)
        assert done.status == "succeeded", done.error
        posted = [r for r in kube.requests() if r["method"] == "POST"]
        made, secret = posted[0]["body"], posted[1]["body"]
        assert posted[0]["path"] == "/apis/batch/v1/namespaces/training/jobs"
        name = made["metadata"]["name"]
        assert name.startswith("ft-") and made["metadata"]["labels"]["gateway/fine-tuning-job"] == job.id
        env = {e["name"]: e for e in made["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["JOB"]["value"] == job.id
        assert env["GATEWAY_TRAINER_URL"]["value"].endswith(f"/v1/fine_tuning/trainer/jobs/{job.id}")
        assert env["GATEWAY_TRAINER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "token"}
        assert secret["metadata"]["ownerReferences"][0]["name"] == name
        assert secret["stringData"]["token"].startswith("ftrun-")
        assert "ftrun-" not in json.dumps(made)  # the token is in the Secret only

        longer = client.fine_tuning.jobs.create(model="llama", training_file=setup.upload("acme", examples(40)),
                                                hyperparameters={"n_epochs": 50, "batch_size": 1})
        _first_step(client, longer.id)
        client.fine_tuning.jobs.cancel(longer.id)
        assert _finished(setup, longer.id, timeout=30).status == "cancelled"
        _wait_for_delete(kube, longer.id, 0)

        # a run that never reports is taken for lost: its Job deleted, the job queued for a new run
        stuck = client.fine_tuning.jobs.create(model="llama-broken", training_file=training)
        _wait_for_delete(kube, stuck.id, 0)
        messages = [e.message for e in client.fine_tuning.jobs.list_events(stuck.id, limit=100).data]
        assert any("The trainer that ran this job stopped" in m and "queued again" in m for m in messages)
        client.fine_tuning.jobs.cancel(stuck.id)
        assert _finished(setup, stuck.id, timeout=30).status == "cancelled"
    finally:
        if setup is not None:
            setup.stop()
        kube.stop()
