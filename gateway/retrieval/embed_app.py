"""The embedded embedding model served as OpenAI's ``/v1/embeddings``, on the gateway's own loopback server.

Deployments with ``api_base: builtin:embedder`` send requests here; the gateway reaches it through its usual path,
so keys, limits, the ledger, costs and metrics apply as to any embedding model. The model is loaded on the first
request (0.6 s, about 100 MB) and runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64

import orjson

from gateway.asgi import BodyTooLarge, Receive, Scope, Send, read_body, send_response

MAX_INPUTS = 2048


class Embedder:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from gateway.retrieval.minilm import DIMENSIONS, MODEL_NAME, ModelMissing, model  # numpy: on first use

        path = scope["path"]
        if (scope["method"], path) == ("GET", "/v1/models"):
            await _json(send, 200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model",
                                                                  "owned_by": "gateway-embedder"}]})
            return
        if (scope["method"], path) != ("POST", "/v1/embeddings"):
            await _error(send, 404, f"{scope['method']} {path} is not served here")
            return
        try:
            body = orjson.loads(await read_body(receive, 32 * 1024 * 1024))
        except (BodyTooLarge, orjson.JSONDecodeError):
            await _error(send, 400, "the body is not JSON (or larger than 32 MB)")
            return
        texts = body.get("input") if isinstance(body, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            await _error(send, 400, "'input' must be a string or a list of strings", "input")
            return
        if len(texts) > MAX_INPUTS:
            await _error(send, 400, f"at most {MAX_INPUTS} inputs per request", "input")
            return
        dimensions = body.get("dimensions")
        if dimensions not in (None, DIMENSIONS):
            await _error(send, 400, f"this model's vectors have {DIMENSIONS} dimensions", "dimensions")
            return
        try:
            vectors, tokens = await asyncio.to_thread(lambda: model().embed(texts))
        except ModelMissing as exc:
            await _error(send, 503, str(exc))
            return
        base64_wanted = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if base64_wanted else v.tolist()}
                for i, v in enumerate(vectors)]
        await _json(send, 200, {"object": "list", "data": data, "model": MODEL_NAME,
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def _json(send: Send, status: int, document: dict) -> None:
    await send_response(send, status, orjson.dumps(document))


async def _error(send: Send, status: int, message: str, param: str | None = None) -> None:
    await _json(send, status, {"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                         "server_error", "param": param, "code": None}})
