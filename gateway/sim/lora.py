"""vLLM's runtime LoRA adapters: registered by name, served from ``max_loras`` slots kept in LRU order."""

from __future__ import annotations

import asyncio
from collections import OrderedDict


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
        self.active: OrderedDict[str, None] = OrderedDict()  # the adapters in slots, least recently used first
        self.swaps = 0

    def load(self, name: str | None, path: str | None) -> str:
        # Messages and status codes as vLLM's /v1/load_lora_adapter gives them.
        if not name or not path:
            raise LoraError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.registered:
            raise LoraError(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        self.registered[name] = path
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, name: str | None) -> str:
        if not name:
            raise LoraError(400, "either 'lora_name' and 'lora_int_id' needs to be provided.", "InvalidUserInput")
        if name not in self.registered:
            raise LoraError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.registered[name]
        self.active.pop(name, None)
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def use(self, name: str) -> bool:
        """Put ``name`` in a slot (evicting the least recently used one); True if it had to be swapped in."""
        if name in self.active:
            self.active.move_to_end(name)
            return False
        while len(self.active) >= self.max_loras:
            self.active.popitem(last=False)
        self.active[name] = None
        self.swaps += 1
        if self.swap_seconds:
            await asyncio.sleep(self.swap_seconds)
        return True
