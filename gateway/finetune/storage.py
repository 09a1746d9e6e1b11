"""Where datasets and adapters are kept: a storage URL read through fsspec, laid out per tenant.

``GATEWAY_FINETUNE_STORAGE`` is a local folder (the default: ``<data dir>/finetune``) or an object store URL
fsspec knows (``s3://bucket/prefix`` with s3fs installed; its endpoint from ``AWS_ENDPOINT_URL`` for an
S3-compatible server, credentials as boto reads them). Layout::

    <tenant>/datasets/<job>/train.jsonl, validation.jsonl   the files a job trains on, as they were at its start
    <tenant>/jobs/<job>/checkpoints/step-<n>/               adapters saved along the way
    <tenant>/adapters/<job>/                                the job's adapter (adapter_config.json,
                                                            adapter_model.safetensors), as vLLM loads it

Every call runs in a worker thread: object stores answer over the network.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import AsyncIterator

import fsspec


class Storage:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def location(self, *parts: str) -> str:
        """What a node is given to load from: a local path, or the object store's URL."""
        return self.path(*parts) if self.local else self.fs.unstrip_protocol(self.path(*parts))

    async def write(self, data: bytes, *parts: str) -> None:
        await asyncio.to_thread(self._write, self.path(*parts), data)

    def _write(self, path: str, data: bytes) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as handle:
            handle.write(data)

    async def read(self, *parts: str) -> bytes:
        return await asyncio.to_thread(self.fs.cat_file, self.path(*parts))

    async def exists(self, *parts: str) -> bool:
        return await asyncio.to_thread(self.fs.exists, self.path(*parts))

    async def names(self, *parts: str) -> list[str]:
        """The names of the files under ``parts`` (none if there is no such folder)."""
        def names() -> list[str]:
            path = self.path(*parts)
            if not self.fs.isdir(path):
                return []
            return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)
                          if self.fs.isfile(p) and not p.endswith(".partial"))
        return await asyncio.to_thread(names)

    async def chunks(self, *parts: str, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        """A file's bytes, a chunk at a time (each read in a worker thread)."""
        handle = await asyncio.to_thread(self.fs.open, self.path(*parts), "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, size):
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    async def write_chunks(self, chunks: AsyncIterator[bytes], *parts: str) -> int:
        """A file written from chunks as they come; nothing is left of it if they stop with an error. Its size."""
        path = self.path(*parts)
        partial = f"{path}.partial"
        await asyncio.to_thread(self.fs.makedirs, path.rsplit("/", 1)[0], exist_ok=True)
        handle = await asyncio.to_thread(self.fs.open, partial, "wb")
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                await asyncio.to_thread(handle.write, chunk)
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(self.fs.mv, partial, path)
        except BaseException:
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(self._forget, partial)
            raise
        return size

    def _forget(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path)

    async def upload(self, folder: Path, *parts: str) -> None:
        """A local folder's files (not its subfolders) copied under ``parts``."""
        def copy() -> None:
            target = self.path(*parts)
            self.fs.makedirs(target, exist_ok=True)
            for item in sorted(folder.iterdir()):
                if item.is_file():
                    self.fs.put_file(str(item), f"{target}/{item.name}")
        await asyncio.to_thread(copy)

    async def download(self, folder: Path, *parts: str) -> None:
        def copy() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            for name in self.fs.ls(self.path(*parts), detail=False):
                self.fs.get_file(name, str(folder / os.path.basename(name.rstrip("/"))))
        await asyncio.to_thread(copy)

    async def remove(self, *parts: str) -> None:
        def remove() -> None:
            path = self.path(*parts)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        await asyncio.to_thread(remove)
