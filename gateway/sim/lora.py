"""vLLM's runtime LoRA adapters, as a node sees them.

An adapter is *registered* by ``POST /v1/load_lora_adapter`` (which reads its weights: ``swap_seconds``) and then
answers to its name as a model. At most ``max_loras`` adapters are *active* (in the GPU's adapter slots) at once;
a request for a registered adapter that is not active waits until a slot is free or held by an adapter no request
is running with, evicts that one (least recently used first) and pays ``swap_seconds`` to bring its own in. A
request for a name that was never registered is refused with vLLM's 404. Messages and status codes are vLLM's.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict


class LoraError(Exception):
    def __init__(self, status: int, message: str, type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type


class LoraSlots:
    def __init__(self, max_loras: int, swap_seconds: float = 0.0) -> None:
        self.max_loras = max_loras
        self.swap_seconds = swap_seconds
        self.registered: dict[str, str] = {}  # name -> path
        self.active: OrderedDict[str, None] = OrderedDict()  # in a slot, least recently used first
        self.running: Counter[str] = Counter()  # requests running with each adapter
        self.waiting: Counter[str] = Counter()  # requests waiting for each adapter's slot
        self.loads = 0  # load_lora_adapter calls that registered an adapter
        self.unloads = 0
        self.swaps = 0  # adapters brought into a slot (by a load or by a request)
        self._changed = asyncio.Condition()

    async def load(self, name: str | None, path: str | None) -> str:
        if not name or not path:
            raise LoraError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.registered:
            raise LoraError(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        self.registered[name] = path
        self.loads += 1
        await self._activate(name)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: str | None) -> str:
        if not name:
            raise LoraError(400, "either 'lora_name' and 'lora_int_id' needs to be provided.", "InvalidUserInput")
        if name not in self.registered:
            raise LoraError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.registered[name]
        self.unloads += 1
        if not self.running[name]:
            self.active.pop(name, None)
        async with self._changed:
            self._changed.notify_all()
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def acquire(self, name: str) -> None:
        """A request runs with adapter ``name``: bring it into a slot (waiting for one if need be)."""
        if name in self.active:
            self.active.move_to_end(name)
            self.running[name] += 1
            return
        self.waiting[name] += 1
        try:
            await self._activate(name, run=True)
        finally:
            self.waiting[name] -= 1
            if not self.waiting[name]:
                del self.waiting[name]

    async def release(self, name: str) -> None:
        self.running[name] -= 1
        if not self.running[name]:
            del self.running[name]
            if name not in self.registered:  # unloaded while it ran
                self.active.pop(name, None)
            async with self._changed:
                self._changed.notify_all()

    async def _activate(self, name: str, run: bool = False) -> None:
        """Bring ``name`` into a slot; with ``run``, count a request running with it from the moment it has one
        (so that no one evicts it while its weights arrive)."""
        async with self._changed:
            while name not in self.active and len(self.active) >= self.max_loras:
                idle = next((n for n in self.active if not self.running[n]), None)
                if idle is not None:
                    del self.active[idle]
                    break
                await self._changed.wait()
            if run:
                self.running[name] += 1
            if name in self.active:
                self.active.move_to_end(name)
                return
            self.active[name] = None  # the slot is taken now; the weights arrive after the swap
            self.swaps += 1
        if self.swap_seconds:
            await asyncio.sleep(self.swap_seconds)
