"""What the simulator does: its timing, its capacity and the faults it injects (changeable while it runs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class SimSettings:
    models: list[str] = field(default_factory=list)  # names served; empty: any name is served
    ttft_ms: float = 0.0  # time to first token
    itl_ms: float = 0.0  # time between tokens
    max_num_seqs: int = 256  # requests generated at once; the rest wait
    max_model_len: int = 131072
    kv_cache_tokens: int = 262144  # capacity behind vllm:kv_cache_usage_perc
    max_loras: int = 4
    lora_swap_ms: float = 0.0  # time to bring an adapter into a slot (on a load, and for a request after eviction)
    lora_load_error_status: int | None = None  # answer every load_lora_adapter with this status (a bad path, say)
    base_config: str | None = None  # the base model's config.json: adapters' files are then checked against it
    embedding_dim: int = 384
    api_key: str | None = None  # like vLLM's --api-key: /v1 routes then need "Authorization: Bearer KEY"
    # Faults
    error_rate: float = 0.0  # share of requests answered with error_status
    error_status: int = 500
    hang_rate: float = 0.0  # share of requests never answered (until the client leaves)
    slow_stream_ms: float = 0.0  # extra time between streamed tokens
    break_stream_after: int | None = None  # close the connection after this many streamed tokens
    record_requests: int = 100  # bodies kept for /sim/requests

    def update(self, changes: dict) -> list[str]:
        """Apply ``changes``; return the problems (unknown names, wrong types) instead of raising."""
        known = {f.name: f for f in fields(self)}
        problems = []
        for name, value in changes.items():
            if name not in known:
                problems.append(f"unknown setting '{name}'")
                continue
            current = getattr(self, name)
            if value is not None and current is not None and not isinstance(value, type(current)):
                if isinstance(current, float) and isinstance(value, int):
                    value = float(value)
                else:
                    problems.append(f"'{name}' must be {type(current).__name__}")
                    continue
            setattr(self, name, value)
        return problems

    def as_dict(self) -> dict:
        return asdict(self)
