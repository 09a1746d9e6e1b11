"""What one request carries through the pipeline: its input, the decisions of each stage, and its outcome."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from gateway.asgi import REQUEST_ID, Headers, Receive, Scope, Send
from gateway.config.types import Adapter, ApiKey, Deployment, GatewayConfig, Model, Profile, Tenant


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One OpenAI operation the pipeline serves."""

    route: str  # as it appears in logs and metrics: "chat.completions"
    upstream_path: str  # appended to a deployment's api_base
    model_type: str  # the kind of model it needs: "chat" or "embedding"
    validate: Callable[[dict], None]  # raises GatewayError naming the bad field
    # Another API served in chat completions' terms (gateway.protocols): its request is translated by
    # ``dialect.inbound`` when the body is read, its answers by the edge ``send`` it puts in front of the client
    dialect: Any = None

    @property
    def is_chat(self) -> bool:
        """A chat completion in the pipeline's terms (chat completions themselves, or an API translated to them)."""
        return self.upstream_path == "/chat/completions"


Finisher = Callable[["RequestContext"], Awaitable[None] | None]  # a coroutine function, or a plain one


UNREAD_USER = object()


class RequestContext:
    __slots__ = (
        "request_id", "started", "started_at", "scope", "receive", "send", "config", "endpoint",
        "tenant", "api_key", "body", "model_requested", "model", "deployment", "stream", "usage_injected",
        "status", "error_type", "prompt_tokens", "completion_tokens",
        "upstream_started", "upstream_seconds", "overhead_seconds", "responded", "client_disconnected",
        "response_headers", "finishers", "reserved_tokens", "reserved_cost_nano", "limits_degraded", "cost_usd",
        "body_size", "prompt_estimate", "profile", "complexity", "route_score", "routing_rule", "route_signals",
        "route_example", "citations", "retrieval", "cascade_to", "cascaded", "confidence", "attempts",
        "cache_entry", "cache_hit", "semantic_similarity", "cache_capture", "answer_bytes", "answer_content_type",
        "adapter", "adapter_bypassed", "leases", "upstream_model", "tenant_paid_usd", "native_body", "native_answer",
        "protocol_state", "guard", "answer_cut", "end_user", "walking", "abort_with",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, config: GatewayConfig, endpoint: Endpoint) -> None:
        self.request_id = scope.get(REQUEST_ID) or "req_" + os.urandom(12).hex()
        self.started = time.perf_counter()
        self.started_at = time.time()
        self.scope = scope
        self.receive = receive
        self.send = send
        self.config = config  # one snapshot for the whole request, whatever reloads meanwhile
        self.endpoint = endpoint
        self.tenant: Tenant | None = None
        self.api_key: ApiKey | None = None
        self.body: dict[str, Any] = {}
        self.model_requested: str | None = None
        self.model: Model | None = None
        self.deployment: Deployment | None = None
        self.stream = False
        self.usage_injected = False  # the gateway asked the upstream for stream usage the client did not ask for
        self.status = 0
        self.error_type: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.upstream_started = 0.0
        self.upstream_seconds = 0.0
        self.overhead_seconds = 0.0
        self.responded = False  # a stage has sent the whole answer; later stages do not run
        self.client_disconnected = False
        self.response_headers: Headers = [(b"x-request-id", self.request_id.encode())]
        self.finishers: list[Finisher] = []
        self.reserved_tokens = 0
        self.reserved_cost_nano = 0
        self.limits_degraded = False  # admitted without counting: Redis was unreachable
        self.cost_usd = 0.0  # every upstream call of this request, cascades and partial answers included
        self.tenant_paid_usd = 0.0  # the part of it made with the tenant's own provider keys
        self.body_size = 0
        self.prompt_estimate: int | None = None  # prompt tokens as tiktoken counts them, once counted
        # Routing (requests for a router alias such as "auto")
        self.profile: Profile | None = None
        self.complexity: str | None = None
        self.route_score: float | None = None
        self.routing_rule: str | None = None  # what decided the model: "finance:complex->gpt-4o"
        self.route_signals: str | None = None  # the signals that moved the score most
        self.route_example: str | None = None  # JSON of what the router keeps to learn from (hashed words, signals)
        self.semantic_similarity: float | None = None  # a semantic cache hit: how close its question was
        self.citations: list[dict] | None = None  # the chunks a chat with retrieval was given, for its answer
        self.retrieval: str | None = None  # JSON for the ledger: the stores searched and the chunks used
        self.cascade_to: Model | None = None  # asked if the first model's answer is unsure
        self.cascaded = False
        self.confidence: float | None = None
        self.attempts: list[dict] = []  # every upstream call: model, deployment, status, tokens, cost
        # Response cache
        self.cache_entry: tuple[dict, bytes] | None = None  # found in the cache: served without an upstream
        self.cache_hit = False
        self.cache_capture = 0  # when above 0, the answer's bytes (up to this many) are kept for the cache
        self.answer_bytes: bytes | None = None  # the whole answer as the client got it (stream: every event)
        self.answer_content_type = b"application/json"
        # The fleet (models served by pools of vLLM nodes)
        self.adapter: Adapter | None = None  # the tenant's LoRA adapter this request runs on
        self.adapter_bypassed = False  # no node could load it, and the tenant's choice is the base model then
        self.leases: list = []  # (attempt, node deployment, adapter) of the node calls not yet accounted for
        self.upstream_model: str | None = None  # the model name sent upstream, when it is not the deployment's
        # Another API's request (Anthropic's Messages, OpenAI's Responses): the body as the client sent it, whether
        # the answer came in that API from an upstream that speaks it, and what its translation keeps meanwhile
        self.native_body: dict | None = None
        self.native_answer = False
        self.protocol_state: Any = None
        self.guard: Any = None  # the guardrails' verdict (gateway.guardrails.policy.Verdict), when the policy has rules
        self.answer_cut = False  # a guardrail ended the answer: the relay stops reading the upstream
        self.end_user: str | None | object = UNREAD_USER  # the tenant's end user, once read (pipeline.users)
        self.walking = False  # the stages are running (the pipeline has not begun to finish the request)
        self.abort_with: Any = None  # a GatewayError to answer with when the request's task is cancelled for it

    def failed_attempts(self) -> str | None:
        """The upstream calls that failed, as "deployment:status,...", or None."""
        return ",".join(f"{a['deployment']}:{a['status']}" for a in self.attempts if a.get("error")) or None

    def on_finish(self, finisher: Finisher) -> None:
        """Run ``finisher`` once the request is over, answered or not (in reverse order of registration); a
        coroutine function's coroutine is awaited."""
        self.finishers.append(finisher)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
