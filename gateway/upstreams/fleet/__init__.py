"""The inference fleet: vLLM nodes across a mesh, load-aware placement, per-tenant LoRA adapters."""

from gateway.upstreams.fleet.manager import AdapterLoadFailed, Fleet

__all__ = ["AdapterLoadFailed", "Fleet"]
