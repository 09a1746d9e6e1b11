"""The embedded embedding model served as OpenAI's ``/v1/embeddings``, on the gateway's own loopback server.

Deployments with ``api_base: builtin:embedder`` send requests here; the gateway reaches it through its usual path,
so keys, limits, the ledger, costs and metrics apply as to any embedding model.

The model runs in processes of its own (spawned on first use; each loads the model in about 0.6 s and 100 MB),
with one BLAS thread each: a file being indexed never holds the gateway's event loop or its interpreter lock. Bulk
work (more than a few inputs: indexing's batches) runs in one process at a lower CPU priority, so that requests
come first on a busy machine; a few short inputs (a search's query, a chat's question) run in another, so that
they never queue behind a batch. Stopping the gateway ends both at once, whatever they are computing.
Input may be text or, as LangChain's ``OpenAIEmbeddings`` sends it, lists of cl100k token ids (decoded to text
first: this model has a tokenizer of its own).
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import orjson

from gateway.asgi import BodyTooLarge, Receive, Scope, Send, read_body, send_response

MAX_INPUTS = 2048
THREADS = "1"  # BLAS threads of each model process
INTERACTIVE_INPUTS, INTERACTIVE_CHARACTERS = 4, 8000  # what a search or a chat's question sends
BULK_NICENESS = 10  # indexing yields the CPU to requests


def _one_thread(niceness: int = 0, parent: int | None = None) -> None:
    """A model process's start: BLAS and tokenizers to one thread, before numpy is imported there; and a watch on
    the gateway that started it."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[name] = THREADS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if niceness:
        os.nice(niceness)
    if parent is not None:
        threading.Thread(target=_end_with, args=(parent,), name="parent-watch", daemon=True).start()


def _end_with(parent: int) -> None:
    """A model process ends when the gateway that started it is gone (killed, crashed: it had no chance to end
    it), instead of living on, orphaned, for ever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _embed(texts: list[str]):
    from gateway.retrieval.minilm import model

    return model().embed(texts)


class Embedder:
    def __init__(self) -> None:
        self._pools: dict[bool, ProcessPoolExecutor] = {}  # bulk or not -> its model process

    def _executor(self, bulk: bool) -> ProcessPoolExecutor:
        if bulk not in self._pools:
            self._pools[bulk] = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_one_thread,
                                                    initargs=(BULK_NICENESS if bulk else 0, os.getpid()))
        return self._pools[bulk]

    async def embed(self, texts: list[str]):
        """Vectors and token count of ``texts``, from a model process (started again if it died)."""
        bulk = len(texts) > INTERACTIVE_INPUTS or sum(map(len, texts)) > INTERACTIVE_CHARACTERS
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor(bulk), _embed, texts)
        except BrokenProcessPool:
            self._end(bulk)
            raise

    def close(self) -> None:
        """End the model processes now: nothing waits for a batch under way."""
        for bulk in list(self._pools):
            self._end(bulk)

    def _end(self, bulk: bool) -> None:
        pool = self._pools.pop(bulk, None)
        if pool is None:
            return
        processes = list((pool._processes or {}).values())  # noqa: SLF001 (the executor has no public kill)
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.kill()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from gateway.retrieval.minilm import DIMENSIONS, MODEL_NAME, ModelMissing, model_zip

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
        texts = _texts(body.get("input") if isinstance(body, dict) else None)
        if texts is None:
            await _error(send, 400, "'input' must be a string, a list of strings, a list of token ids or a list of "
                                    "lists of token ids", "input")
            return
        if len(texts) > MAX_INPUTS:
            await _error(send, 400, f"at most {MAX_INPUTS} inputs per request", "input")
            return
        dimensions = body.get("dimensions")
        if dimensions not in (None, DIMENSIONS):
            await _error(send, 400, f"this model's vectors have {DIMENSIONS} dimensions", "dimensions")
            return
        try:
            model_zip()  # said here, at once, rather than from the model's process
            vectors, tokens = await self.embed(texts)
        except ModelMissing as exc:
            await _error(send, 503, str(exc))
            return
        except BrokenProcessPool:
            await _error(send, 503, "the embedding model's process stopped; it is started again for the next request")
            return
        base64_wanted = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if base64_wanted else v.tolist()}
                for i, v in enumerate(vectors)]
        await _json(send, 200, {"object": "list", "data": data, "model": MODEL_NAME,
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _texts(source) -> list[str] | None:
    """The texts to embed: strings as they are, cl100k token ids decoded; None if the input is neither."""
    if isinstance(source, str):
        return [source]
    if not isinstance(source, list) or not source:
        return None
    if all(isinstance(item, str) for item in source):
        return source
    if all(_token_ids(item) for item in source):
        return [_decode(item) for item in source]
    if _token_ids(source):
        return [_decode(source)]
    return None


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 200_000 for i in value)


def _decode(ids: list[int]) -> str:
    from gateway.tokens import decode

    return decode(ids)


async def _json(send: Send, status: int, document: dict) -> None:
    await send_response(send, status, orjson.dumps(document))


async def _error(send: Send, status: int, message: str, param: str | None = None) -> None:
    await _json(send, status, {"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                         "server_error", "param": param, "code": None}})
