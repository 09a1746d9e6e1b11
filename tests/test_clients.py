"""Clients people point at the gateway, used as their own documentation shows: the openai Node SDK and the litellm
SDK (the openai Python SDK, LangChain and LlamaIndex are used throughout the other tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_CLIENT = Path(__file__).parent / "clients" / "node"
HELLO = [{"role": "user", "content": "hello from litellm"}]


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (tests/run.sh installs them)")
    if not (NODE_CLIENT / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_CLIENT, check=True,
                       timeout=300)
    return NODE_CLIENT / "client.mjs"


def test_openai_node_sdk(gateway, keys, node_client):
    done = subprocess.run(["node", str(node_client), f"{gateway.url}/v1", keys.acme], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "small" in seen["models"] and "embed" in seen["models"]
    assert seen["answer"]["object"] == "chat.completion" and seen["answer"]["text"]
    assert seen["answer"]["usage"]["completion_tokens"] == 8 and seen["answer"]["request_id"]
    assert seen["stream"]["text"].strip() == seen["answer"]["text"].strip()
    assert seen["stream"]["usage"]["completion_tokens"] == 8
    assert seen["tool"] == {"name": "get_weather", "arguments": {"city": seen["tool"]["arguments"]["city"]}}
    assert seen["embeddings"] and len(seen["embeddings"]) == 2
    assert seen["bad_key"]["status"] == 401 and seen["bad_key"]["code"] == "invalid_api_key"
    assert seen["unknown_model"]["status"] == 404 and seen["unknown_model"]["code"] == "model_not_found"


def test_litellm_sdk_as_a_client(gateway, keys, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list from the internet
    import litellm

    options = {"api_base": f"{gateway.url}/v1", "api_key": keys.acme, "num_retries": 0}
    answer = litellm.completion(model="openai/small", messages=HELLO, max_tokens=6, **options)
    assert answer.choices[0].message.content and answer.usage.completion_tokens == 6
    chunks = list(litellm.completion(model="openai/small", messages=HELLO, max_tokens=6, stream=True,
                                     stream_options={"include_usage": True}, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == answer.choices[0].message.content.strip()
    embedded = litellm.embedding(model="openai/embed", input=["a", "b"], **options)
    assert len(embedded.data) == 2
    with pytest.raises(litellm.AuthenticationError):
        litellm.completion(model="openai/small", messages=HELLO, **{**options, "api_key": "sk-not-a-key"})
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(model="openai/no-such-model", messages=HELLO, **options)
