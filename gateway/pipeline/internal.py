"""Requests the gateway makes to itself for a tenant (the embeddings of retrieval, a guard model's verdict), through
the same pipeline as a client's: the tenant's model access, limits and budget apply, and each call has its ledger
row and cost. A guard model's call is not itself guarded (``GUARD_CALL``)."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import orjson

from gateway.config.types import MEMBER, ApiKey, Tenant
from gateway.errors import GatewayError
from gateway.pipeline.auth import INTERNAL_CALLER
from gateway.pipeline.context import RequestContext
from gateway.pipeline.endpoints import CHAT, EMBEDDINGS, MODERATIONS

GUARD_CALL = "gateway.guard_call"  # scope key of a guard model's call: the guardrails do not check it again

if TYPE_CHECKING:
    import numpy as np


class InternalCalls:
    def __init__(self, pipeline: Callable[[], object], config: Callable[[], object]) -> None:
        self._pipeline = pipeline
        self._config = config

    async def embed(self, tenant: Tenant, api_key: ApiKey, model: str, texts: list[str]) -> np.ndarray:
        """Unit vectors of ``texts`` from ``model``, billed to ``tenant``; a GatewayError as the client would get."""
        import numpy as np  # imported when retrieval is first used: a gateway that never retrieves never loads it

        status, answer, headers = await self._post(tenant, api_key, "/v1/embeddings",
                                                   {"model": model, "input": texts, "encoding_format": "base64"})
        if status != 200:
            error = answer.get("error") or {}
            retry_after = headers.get(b"retry-after")
            raise GatewayError(status, f"Embedding with '{model}' failed: {error.get('message', status)}",
                               type=error.get("type") or "server_error", code=error.get("code"),
                               headers={"retry-after": retry_after.decode()} if retry_after else None)
        rows = sorted(answer["data"], key=lambda row: row["index"])
        vectors = np.stack([np.frombuffer(base64.b64decode(row["embedding"]), dtype=np.float32) for row in rows])
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    async def guard(self, tenant: Tenant, api_key: ApiKey, model: str, kind: str, text: str,
                    answer: str | None = None) -> tuple[int, dict]:
        """A guard model's answer about ``text`` (the request), or about ``answer`` to it: a moderation model's
        (``kind`` "moderation": it reads the answer alone) or a chat model's, asked as Llama Guard is (the request as
        the user's turn, the answer as the agent's, whose turn it then judges); the status and the answer's JSON."""
        if kind == "moderation":
            status, verdict, _ = await self._post(tenant, api_key, "/v1/moderations", {
                "model": model, "input": text if answer is None else answer}, endpoint=MODERATIONS, guard=True)
        else:
            messages = [{"role": "user", "content": text}]
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
            status, verdict, _ = await self._post(tenant, api_key, "/v1/chat/completions", {
                "model": model, "messages": messages, "max_tokens": 20, "temperature": 0}, endpoint=CHAT, guard=True)
        return status, verdict

    async def _post(self, tenant: Tenant, api_key: ApiKey, path: str, body: dict, endpoint=EMBEDDINGS,
                    guard: bool = False) -> tuple[int, dict, dict]:
        payload = orjson.dumps(body)
        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
                 "http_version": "1.1", "scheme": "http", "client": None, "server": None, "root_path": "",
                 INTERNAL_CALLER: (tenant, _unlimited(api_key))}
        if guard:
            scope[GUARD_CALL] = True
        sent = False
        answer: dict = {"status": 0, "body": bytearray(), "headers": {}}

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await asyncio.Event().wait()  # never disconnects
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = dict(message.get("headers") or ())
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")

        await self._pipeline().run(RequestContext(scope, receive, send, self._config(), endpoint))
        return answer["status"], orjson.loads(bytes(answer["body"]) or b"{}"), answer["headers"]


def _unlimited(api_key: ApiKey) -> ApiKey:
    """The key the gateway's own call is made with: the caller's (its limits and usage), without the routes, models
    and tools the caller is limited to: the tenant's retrieval and guard models are the gateway's choice, not its."""
    return api_key if api_key.access is MEMBER else replace(api_key, access=MEMBER)
