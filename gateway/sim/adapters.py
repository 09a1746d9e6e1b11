"""An adapter's files checked against the base model, as vLLM does when it loads one: ``adapter_config.json``
(a LoRA, its rank, the modules it adapts) and ``adapter_model.safetensors`` (each tensor's shape against the base
model's ``config.json``: lora_A is rank × the layer's input size, lora_B its output size × rank). The tensors'
header is read without loading them."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

_TENSOR = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterMismatch(Exception):
    pass


def shapes(path: Path) -> dict[str, list[int]]:
    """The tensors' shapes in a safetensors file, from its header."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        if size > 100_000_000:
            raise AdapterMismatch("the safetensors header is not one")
        header = json.loads(handle.read(size))
    return {name: spec["shape"] for name, spec in header.items() if name != "__metadata__"}


def check(folder: str, base: dict) -> None:
    """Raise AdapterMismatch if the adapter in ``folder`` cannot apply to the base model of config ``base``."""
    root = Path(folder)
    config_path, weights = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise AdapterMismatch(f"No adapter found for {folder}: adapter_config.json and adapter_model.safetensors "
                              "are needed")
    config = json.loads(config_path.read_text())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterMismatch(f"the adapter in {folder} is not a LoRA adapter")
    rank = int(config.get("r") or 0)
    hidden = int(base["hidden_size"])
    heads = int(base["num_attention_heads"])
    head_dim = int(base.get("head_dim") or hidden // heads)
    kv = int(base.get("num_key_value_heads") or heads) * head_dim
    inner = int(base.get("intermediate_size") or 4 * hidden)
    sizes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
             "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inner), "up_proj": (hidden, inner),
             "down_proj": (inner, hidden)}
    found = 0
    for name, shape in shapes(weights).items():
        matched = _TENSOR.search(name)
        if matched is None:
            continue
        layer, module, half = int(matched.group(1)), matched.group(2), matched.group(3)
        if layer >= int(base["num_hidden_layers"]):
            raise AdapterMismatch(f"{name}: the base model has {base['num_hidden_layers']} layers")
        if module not in sizes:
            continue
        size_in, size_out = sizes[module]
        expected = [rank, size_in] if half == "A" else [size_out, rank]
        if list(shape) != expected:
            raise AdapterMismatch(f"{name} has shape {shape}, the base model needs {expected}")
        found += 1
    if not found:
        raise AdapterMismatch(f"the adapter in {folder} adapts none of the base model's layers")
