"""A gateway with the embedded embedding model and two tenants, for the retrieval tests."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import yaml

from conftest import GatewayProcess
from gateway.config.keys import generate_key, hash_key

DOCUMENTS = {
    "passwords.md": "# Resetting your password\n\nTo reset a forgotten password, open the sign-in page and choose "
                    "'Forgot password'. We e-mail you a link that stays valid for thirty minutes. Follow it and pick "
                    "a new password of at least twelve characters. If the e-mail does not arrive, check the spam "
                    "folder or ask your administrator to reset the account.",
    "billing.txt": "Invoices are issued on the first day of every month. You can pay by card or by bank transfer. "
                   "A refund for an annual plan is prorated to the unused months and reaches your card within ten "
                   "working days. Change the billing address under Settings, then Billing.",
    "garden.html": "<html><head><style>p{}</style><script>var x = 1;</script></head><body><h1>Tomatoes</h1><p>Plant "
                   "tomato seedlings after the last frost, in full sun, sixty centimetres apart. Water the soil, not "
                   "the leaves, and stake the plants when they flower.</p></body></html>",
}


def pdf_with(text: str) -> bytes:
    """A one-page PDF whose text layer says ``text``."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def start(folder: Path, sim_url: str, limits: dict | None = None,
          env: dict[str, str] | None = None) -> tuple[GatewayProcess, dict[str, str]]:
    """The gateway and the keys of its two tenants (``limits`` for both, if given)."""
    keys = {name: generate_key() for name in ("acme", "globex")}
    folder.mkdir(parents=True, exist_ok=True)
    models = {"models": {
        "small": {"size": "small", "pricing": {"input_per_million": 1, "output_per_million": 2},
                  "deployments": [{"name": "small-sim", "api_base": f"{sim_url}/v1", "model": "sim-small"}]},
        "all-minilm-l6-v2": {"type": "embedding", "pricing": {"input_per_million": 0.01, "output_per_million": 0},
                             "deployments": [{"name": "embedded", "api_base": "builtin:embedder",
                                              "model": "all-MiniLM-L6-v2"}]},
    }}
    tenants = {"tenants": {name: {"name": name.title(), "tier": "enterprise", "cache": {"semantic": True},
                                  **({"limits": limits} if limits else {}),
                                  "keys": [{"name": "k", "sha256": hash_key(key)}]} for name, key in keys.items()}}
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    (folder / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    return GatewayProcess(folder, env=env), keys


def vectors_of(folder: Path, file_id: str | None = None) -> int:
    """Points left in the stopped gateway's local Qdrant (of one file, or all)."""
    from qdrant_client import QdrantClient, models

    path = folder / "data" / "qdrant"
    if not path.exists():
        return 0
    qdrant = QdrantClient(path=str(path))
    try:
        name = "gateway_chunks_all_minilm_l6_v2"
        if not qdrant.collection_exists(name):
            return 0
        where = None if file_id is None else models.Filter(must=[models.FieldCondition(
            key="file_id", match=models.MatchValue(value=file_id))])
        return qdrant.count(name, count_filter=where, exact=True).count
    finally:
        qdrant.close()


def long_text(words: int, topic: str = "boiler") -> str:
    sentence = f"Section {{i}} explains how the {topic} of model {{m}} is serviced every spring."
    return " ".join(sentence.format(i=i, m=i % 9) for i in range(words // 13 + 1))


def client(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def wait_indexed(api: openai.OpenAI, store_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        store = api.vector_stores.retrieve(store_id)
        if store.file_counts.in_progress == 0:
            return store
        assert time.monotonic() < deadline, store
        time.sleep(0.3)
