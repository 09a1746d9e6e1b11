"""``gateway bench fine-tuning``: what a training job on the gateway's own worker does to serving, and what a job
costs the gateway.

A tiny Llama (two layers, random weights, a word-level tokenizer; built here, nothing downloaded) is the base model
of a fleet pool whose node is the simulator. One tenant's short chat requests (wrk, 8 connections, through the
fleet) are measured with and without another tenant's job training (a long LoRA run in the trainer's process),
rounds interleaved. Also: the time from ``POST /v1/fine_tuning/jobs`` to the first chat answered with the new
adapter (a job of 12 examples, 2 epochs), and the gateway's own work per job: checking a 10,000-example training
file and writing it to storage. Needs the ``train`` extra.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from gateway.bench.run import (UNBOUND_LIMITS, WRK_SCRIPT, _measure, _median, start_gateway, start_simulator,
                               stop_processes, write_report)
from gateway.config.keys import generate_key, hash_key
from gateway.stores.embedded import EmbeddedServers, free_port

BASE = "llama-base"
WORDS = ("hello thanks order refund shipping where is my parcel it arrives tomorrow we are sorry please wait "
         "your account was updated can i help with anything else yes no").split()


def build_base_model(folder: Path) -> None:
    """A two-layer Llama with random weights and a word-level tokenizer of its own, in Hugging Face's layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocabulary = {token: i for i, token in enumerate(["<pad>", "<unk>", "</s>", "user:", "assistant:", "system:",
                                                       *WORDS])}
    words = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocabulary), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=2, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)


def examples(count: int, words: int = 5) -> bytes:
    """``count`` chat examples in OpenAI's fine-tuning format, of the base model's words."""
    lines = []
    for i in range(count):
        question = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))
        lines.append(json.dumps({"messages": [{"role": "system", "content": "please help"},
                                              {"role": "user", "content": question},
                                              {"role": "assistant", "content": "we are sorry please wait"}]}))
    return ("\n".join(lines) + "\n").encode()


def _call(port: int, method: str, path: str, key: str, body: dict | None = None, files: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"}
    data = None
    if files is not None:
        boundary = "benchboundary"
        data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n"
                f"Content-Type: application/jsonl\r\n\r\n").encode() + files + f"\r\n--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def _wait(port: int, key: str, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = _call(port, "GET", f"/v1/fine_tuning/jobs/{job_id}", key)
        if job["status"] in states:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(job)
        time.sleep(0.2)


def _own_work() -> dict:
    """The gateway's work per job, in this process: checking a 10,000-example file, writing it to storage."""
    from gateway.finetune import datasets
    from gateway.finetune.storage import Storage

    content = examples(10_000, words=40)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        stats = datasets.check(content, "training_file", 4096, 50_000_000, 10)
        timings.append(time.perf_counter() - started)
    folder = tempfile.mkdtemp(prefix="gateway-bench-storage-")
    try:
        storage = Storage(folder)
        started = time.perf_counter()
        asyncio.run(storage.write(content, "t", "datasets", "j", "train.jsonl"))
        written = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"examples": stats.examples, "megabytes": round(len(content) / 1e6, 1), "tokens": stats.tokens,
            "check_ms": round(min(timings) * 1000, 1), "storage_write_ms": round(written * 1000, 1)}


def _first_answer_through_a_trainer(workdir: Path, models: dict, tenants: str, env: dict, key: str,
                                    training_file: str) -> float:
    """The same job on a trainer off the gateways (``python -m gateway.finetune.remote`` started as a command, as
    an ``ssh`` to a GPU node would), through a gateway whose own workers train nothing: POST to the first answer."""
    port = free_port()
    config = workdir / "config-trainer"
    config.mkdir()
    (config / "models.yaml").write_text(yaml.safe_dump({**models, "fine_tuning": {
        **models["fine_tuning"], "gateway_workers": False, "report_url": f"http://127.0.0.1:{port}",
        "trainers": {"node": {"kind": "command", "command": [sys.executable, "-m", "gateway.finetune.remote"]}}}}))
    (config / "tenants.yaml").write_text(tenants)
    # storage of its own: the first gateway, whose workers train, takes only jobs whose data is in its storage
    gateway = start_gateway(config, port, {**env, "GATEWAY_DATA_DIR": str(workdir / "data-trainer"),
                                           "GATEWAY_FINETUNE_STORAGE": str(workdir / "storage-trainer")},
                            workdir / "gateway-trainer.log")
    try:
        started = time.monotonic()
        job = _call(port, "POST", "/v1/fine_tuning/jobs", key, {"model": "llama", "training_file": training_file,
                                                                 "hyperparameters": {"n_epochs": 2, "batch_size": 4}})
        done = _wait(port, key, job["id"], ("succeeded", "failed"))
        if done["status"] != "succeeded":
            raise RuntimeError(f"the job through the trainer failed: {done['error']}")
        _call(port, "POST", "/v1/chat/completions", key,
              {"model": done["fine_tuned_model"], "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5})
        return time.monotonic() - started
    finally:
        stop_processes([gateway])


def run_fine_tuning_benchmark(duration: float = 5.0, rounds: int = 3, output: Path | None = None) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("gateway bench needs wrk (Debian: apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-fine-tuning-"))
    processes = []
    stores = EmbeddedServers(workdir / "stores")
    try:
        build_base_model(workdir / "base")
        sim_port, gw_port = free_port(), free_port()
        processes.append(start_simulator(sim_port, "--ttft-ms", "5", "--max-num-seqs", "4096", "--model", BASE,
                                         "--base-config", str(workdir / "base" / "config.json")))
        keys = {"serving": generate_key(), "training": generate_key()}
        config = workdir / "config"
        config.mkdir()
        models = {"fleet": {"pools": {"gpus": {"model": BASE, "weights": str(workdir / "base"), "nodes": [
                      {"url": f"http://127.0.0.1:{sim_port}/v1", "name": "node0"}]}}},
                  "models": {"llama": {"deployments": [{"name": "gpus", "api_base": "fleet:gpus"}]}},
                  "fine_tuning": {"max_epochs": 100}}
        (config / "models.yaml").write_text(yaml.safe_dump(models))
        tenants = yaml.safe_dump({"tenants": {name: {
            "name": name.title(), "tier": "enterprise", "limits": UNBOUND_LIMITS,
            "keys": [{"name": name, "sha256": hash_key(key)}]} for name, key in keys.items()}})
        (config / "tenants.yaml").write_text(tenants)
        env = {**os.environ, "GATEWAY_BUILTIN_SIMULATOR": "0", "GATEWAY_DATA_DIR": str(workdir / "data"),
               "REDIS_URL": stores.start_redis(), "DATABASE_URL": stores.start_postgres(),
               "GATEWAY_FINETUNE_STORAGE": str(workdir / "storage")}
        gateway = start_gateway(config, gw_port, env, workdir / "gateway.log")
        processes.append(gateway)
        trainer_key = keys["training"]
        small = _call(gw_port, "POST", "/v1/files", trainer_key, files=examples(12))["id"]
        started = time.monotonic()
        job = _call(gw_port, "POST", "/v1/fine_tuning/jobs", trainer_key,
                    {"model": "llama", "training_file": small, "hyperparameters": {"n_epochs": 2, "batch_size": 4}})
        done = _wait(gw_port, trainer_key, job["id"], ("succeeded", "failed"))
        _call(gw_port, "POST", "/v1/chat/completions", trainer_key,
              {"model": done["fine_tuned_model"], "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5})
        to_first_answer = time.monotonic() - started
        through_trainer = _first_answer_through_a_trainer(workdir, models, tenants, env, trainer_key, small)

        script = workdir / "chat.lua"
        script.write_text(WRK_SCRIPT % {"key": keys["serving"], "body": json.dumps(
            {"model": "llama", "messages": [{"role": "user", "content": "Say something short."}], "max_tokens": 8})})
        url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        _measure("warm-up", url, gateway.pid, script, 8, 2)
        long = _call(gw_port, "POST", "/v1/files", trainer_key, files=examples(40))["id"]
        runs: dict[str, list] = {"alone": [], "while a job trains": []}
        for _ in range(rounds):
            runs["alone"].append(_measure("alone", url, gateway.pid, script, 8, duration))
            training = _call(gw_port, "POST", "/v1/fine_tuning/jobs", trainer_key,
                             {"model": "llama", "training_file": long,
                              "hyperparameters": {"n_epochs": 100, "batch_size": 1}})
            _wait(gw_port, trainer_key, training["id"], ("running",))
            time.sleep(2)  # the trainer's process has loaded the model and trains
            runs["while a job trains"].append(_measure("training", url, gateway.pid, script, 8, duration))
            _call(gw_port, "POST", f"/v1/fine_tuning/jobs/{training['id']}/cancel", trainer_key)
            _wait(gw_port, trainer_key, training["id"], ("cancelled", "failed", "succeeded"))
        measured = {name: _median(each) for name, each in runs.items()}
        alone, loaded = measured["alone"], measured["while a job trains"]
        report = {
            "setup": {"serving": "wrk, 8 connections, a short chat through the fleet", "training":
                      "LoRA on a 2-layer Llama (hidden size 32), batch 1, on the gateway's own worker",
                      "seconds_per_run": duration, "rounds": rounds, "cpus": os.cpu_count()},
            "serving_tenant": {name: {"p50_ms": round(m.p50_ms, 2), "p99_ms": round(m.p99_ms, 2),
                                      "requests_per_second": round(m.rps), "errors": m.errors}
                               for name, m in measured.items()},
            "p99_ratio": round(loaded.p99_ms / alone.p99_ms, 3),
            "p50_ratio": round(loaded.p50_ms / alone.p50_ms, 3),
            "seconds_from_job_to_first_answer": round(to_first_answer, 2),
            "seconds_from_job_to_first_answer_through_a_command_trainer": round(through_trainer, 2),
            "gateway_work_per_job": _own_work(),
        }
    finally:
        stop_processes(processes)
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return write_report(report, output)
