"""The floor the benchmark compares against: the least a Python proxy can do with the gateway's own libraries.

uvicorn (uvloop, httptools) serves, orjson reads the body and swaps the model name, one pooled aiohttp session
forwards it and the answer goes back as it came. No auth, no config, no logging, no metrics.
Run: python -m gateway.bench.passthrough PORT UPSTREAM_BASE_URL [WORKERS]
"""

from __future__ import annotations

import os
import sys

import aiohttp
import orjson
import uvicorn


def build(upstream: str):
    state: dict = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await state["session"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = orjson.loads(b"".join(chunks))
        body["model"] = "sim"
        async with state["session"].post(upstream + scope["path"], data=orjson.dumps(body),
                                         headers={"Content-Type": "application/json"}) as response:
            answer = await response.read()
            status = response.status
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    return app


def create_app():
    """The app for ``--workers`` (uvicorn imports it in each worker): its upstream from PASSTHROUGH_UPSTREAM."""
    return build(os.environ["PASSTHROUGH_UPSTREAM"])


if __name__ == "__main__":
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/").removesuffix("/v1")
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    options = dict(host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                   access_log=False)
    if workers > 1:
        os.environ["PASSTHROUGH_UPSTREAM"] = upstream
        uvicorn.run("gateway.bench.passthrough:create_app", factory=True, workers=workers, **options)
    else:
        uvicorn.run(build(upstream), **options)
