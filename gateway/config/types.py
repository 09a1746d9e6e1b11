"""The config as the request path uses it: resolved, indexed and immutable.

A request takes one ``GatewayConfig`` snapshot when it starts and uses it to the end, so a reload in the middle of
a request never mixes two configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.routing.classifier import Classifier


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    model: str  # the logical model it serves
    upstream_model: str
    api_base: str  # resolved base URL ending before /chat/completions
    api_key: str | None = field(repr=False)  # never in a log line or an error
    # what every upstream request carries: content type, auth, the YAML's extra headers
    headers: dict[str, str] = field(repr=False)
    connect_timeout: float
    read_timeout: float
    priority: int  # the usable deployments of the lowest priority serve; the others stand by
    is_simulator: bool
    # Why the deployment cannot be used (an unset environment variable, say); None when it can.
    unavailable_reason: str | None = None
    pool: str | None = None  # a fleet pool: its nodes serve the requests (api_base is unused)
    node: str | None = None  # set on the deployments the fleet makes of its nodes, one a node
    provider: str | None = None  # its provider, when named (a tenant's own key for it is used)
    litellm: "LiteLLMCall | None" = field(default=None, repr=False)  # a provider reached through LiteLLM
    # The provider whose own API the gateway speaks for chat completions ("anthropic", "gemini"), else None
    wire: str | None = None
    # The APIs besides chat completions it serves ("messages", "responses"): such a request goes to it as it came
    apis: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class LiteLLMCall:
    """How LiteLLM reaches a provider that does not speak OpenAI's API."""

    model: str  # LiteLLM's name: "anthropic/claude-sonnet-4-5"
    params: dict[str, str] = field(repr=False)  # api_key, api_base, api_version, cloud credentials and settings


@dataclass(frozen=True, slots=True)
class Adapter:
    """A tenant's LoRA adapter: what the tenant asks for, and what a node loads."""

    name: str  # the model name the tenant uses
    base: str  # the gateway model it applies to
    path: str  # lora_path for the node
    lora_name: str  # the name nodes know it by: "<tenant>/<name>", so that tenants never share one
    default: bool  # also used for the tenant's requests for the base model
    on_failure: str  # "error" or "base"
    fine_tuned: bool = False  # made by one of the tenant's fine-tuning jobs (not declared in its settings)
    schedule: str | None = None  # the tenant's fine-tuning schedule whose job made it


@dataclass(frozen=True, slots=True)
class FleetNode:
    url: str
    name: str
    api_key: str | None = field(repr=False, default=None)
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class TailscaleDiscovery:
    tag: str
    port: int
    scheme: str
    path: str
    command: str


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    model: str  # the base model its nodes serve
    api_key: str | None = field(repr=False)
    max_loras: int
    nodes: tuple[FleetNode, ...]
    discovery: TailscaleDiscovery | None
    weights: str | None = None  # the base model's weights, for fine-tuning


@dataclass(frozen=True, slots=True)
class FleetConfig:
    pools: dict[str, Pool]
    refresh_seconds: float
    failures_before_drain: int
    load_timeout: float
    strategy: str
    queue_weight: float
    kv_weight: float


@dataclass(frozen=True, slots=True)
class Pricing:
    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


@dataclass(frozen=True, slots=True)
class CachePolicy:
    enabled: bool = True
    ttl_seconds: int = 3600
    max_entry_bytes: int = 1 << 20
    nondeterministic: bool = False  # cache requests with temperature above 0 and no seed
    semantic: bool = False  # answer chats whose question is close in meaning to an answered one
    semantic_threshold: float = 0.9  # the least cosine similarity of a semantic hit (measured: docs/retrieval.md)
    semantic_with_tools: bool = False


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    type: str  # "chat", "embedding" or "moderation"
    size: str | None  # "small", "large", "largest" or unset
    description: str
    owned_by: str
    context_window: int | None
    pricing: Pricing
    deployments: tuple[Deployment, ...]
    # The deployments requests go to: the usable ones of the lowest priority number.
    serving: tuple[Deployment, ...]
    fallbacks: tuple[str, ...] = ()  # models tried in turn once every deployment of this one has failed
    standby: tuple[Deployment, ...] = ()  # usable deployments of higher priority numbers, tried after the serving
    cache: CachePolicy = CachePolicy()

    @property
    def simulated(self) -> bool:
        return bool(self.serving) and all(d.is_simulator for d in self.serving)


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    max_attempts: int = 3
    failures_before_cooldown: int = 3
    cooldown_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class Profile:
    """How one tenant's requests to one router alias are routed (industry, tier and the tenant's changes resolved)."""

    name: str  # "finance", "finance/professional", "finance+tenant": what the routing-rule header shows
    models: dict[str, str]  # complexity -> model
    economy: dict[str, str]  # complexity -> model, past the soft budget limit
    over_budget: dict[str, str]  # complexity -> model, once the budget is spent
    long_context: str | None
    cascade: bool
    cascade_threshold: float
    ladder: tuple[str, ...]  # the profile's models from smallest to largest: where a cascade goes next
    target_large_share: float | None = None  # thresholds follow the traffic to keep this share on large models
    guardrails: tuple = ()  # the profile's (the default profile's first) and the alias's rules, after the tenant's
    share_scope: str = ""  # whose traffic the share is kept over: "profile:<name>" or "tenant:<id>"
    large_from: str = "complex"  # the lowest complexity whose model is not a small one


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    description: str
    profile: str | None  # a fixed profile, or None for the tenant's own
    guardrails: tuple = ()  # gateway.guardrails.policy.Guardrail of the requests for this alias


@dataclass(frozen=True)
class RouterConfig:
    aliases: dict[str, Alias]
    profiles: frozenset[str]  # the names of models.yaml's profiles
    classifier: "Classifier"
    soft_budget_limit: float
    uncertainty_phrases: tuple[str, ...]
    keep_examples: bool = True  # keep what the router read of requests a small model answered, to learn from


@dataclass(frozen=True, slots=True)
class Limits:
    """A tenant's effective limits (tier, then the tenant's overrides); None means no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_hour: int | None = None
    concurrent_requests: int | None = None
    calls_per_day: int | None = None
    monthly_budget_usd: float | None = None
    completion_reservation: int = 1024


@dataclass(frozen=True, slots=True)
class EndUserLimits:
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    monthly_budget_usd: float | None = None


@dataclass(frozen=True, slots=True)
class EndUsers:
    """A tenant's limits per end user: the default, and the users who have their own."""

    limits: EndUserLimits = EndUserLimits()
    users: dict[str, EndUserLimits] = field(default_factory=dict)
    required: bool = False

    def of(self, user: str) -> EndUserLimits:
        return self.users.get(user, self.limits)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None


@dataclass(frozen=True, slots=True)
class KeyAccess:
    """A key's role and what it is limited to (None: no limit beyond its tenant's)."""

    role: str = "member"  # member, viewer or tenant_admin
    routes: frozenset[str] | None = None  # route groups (config.schema.ROUTE_GROUPS)
    models: tuple[str, ...] | None = None  # patterns of the model names it may ask for
    tools: tuple[str, ...] | None = None  # patterns of the function names its requests may offer

    def permits(self, group: str) -> bool:
        """Whether the key may call a route of ``group`` ("models": listing models, which every key may)."""
        if group == "models":
            return True
        if self.role == "viewer" and group != "usage":
            return False
        return self.routes is None or group in self.routes

    def admits(self, model: str) -> bool:
        return self.models is None or any(fnmatchcase(model, pattern) for pattern in self.models)

    def view(self) -> dict:
        return {"role": self.role, "routes": sorted(self.routes) if self.routes is not None else None,
                "models": list(self.models) if self.models is not None else None,
                "tools": list(self.tools) if self.tools is not None else None}


MEMBER = KeyAccess()


@dataclass(frozen=True, slots=True)
class ApiKey:
    tenant_id: str
    name: str
    expires_at: float | None  # unix time
    limits: KeyLimits | None = None
    guardrails: tuple = ()  # gateway.guardrails.policy.Guardrail: checked after the tenant's
    access: KeyAccess = MEMBER


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    enabled: bool
    model_patterns: tuple[str, ...]
    allowed_models: frozenset[str]  # model names of models.yaml that the patterns admit
    unmatched_patterns: tuple[str, ...] = ()  # patterns that admit no model (most likely misspelt; warned of)
    tier: str = "basic"
    industry: str | None = None
    system_prompt: str | None = None
    limits: Limits = Limits()
    features: frozenset[str] = frozenset()
    routes: dict[str, Profile] = field(default_factory=dict)  # router alias -> this tenant's profile for it
    cache: dict[str, object] = field(default_factory=dict)  # the tenant's changes to the cache policy
    cors_origins: frozenset[str] = frozenset()  # browser origins this tenant's keys may be used from
    provider_keys: dict[str, str] = field(default_factory=dict)  # provider -> reference of the tenant's own key
    adapters: dict[str, Adapter] = field(default_factory=dict)  # by the model name the tenant asks for
    default_adapters: dict[str, Adapter] = field(default_factory=dict)  # base model -> adapter used for it
    fine_tuned_defaults: dict[str, str] = field(default_factory=dict)  # base model -> its fine-tuned model to use
    fine_tuning_schedules: tuple = ()  # config.schema.FineTuningScheduleSpec: jobs made again every so often
    guardrails: tuple = ()  # gateway.guardrails.policy.Guardrail, in order
    end_users: EndUsers | None = None  # limits per end user, if the tenant sets any
    source: str = "yaml"  # "yaml" or "api" (made through the admin API, kept in PostgreSQL)
    created_at: float | None = None  # unix time the admin API made it; its usage starts there


@dataclass(frozen=True)
class GatewayConfig:
    models: dict[str, Model]
    tenants: dict[str, Tenant]
    keys: dict[str, ApiKey]  # hex SHA-256 of the key -> key
    admin_keys: dict[str, ApiKey] = field(default_factory=dict)  # hex SHA-256 -> key (tenant_id empty)
    jwt_issuers: tuple = ()  # gateway.config.issuers.JwtIssuer: whose tokens authenticate tenants
    reference_model: str | None = None  # what savings are measured against
    router: RouterConfig | None = None
    fallback_policy: FallbackPolicy = FallbackPolicy()
    request_timeout: float = 600.0  # seconds a whole request may take; bounds its concurrency slot too
    fleet: FleetConfig | None = None
    secrets: object = None  # the Secrets the key references were read from (tenants' own keys are read at a request)
    uses_litellm: bool = False  # some deployment is reached through LiteLLM
    fine_tuning: object = None  # gateway.config.schema.FineTuningSpec: the trainers' settings and prices
    trainers: dict = field(default_factory=dict)  # gateway.config.trainers.Trainer by name: trainers off the gateways
    cache_policy: CachePolicy = CachePolicy()  # for router aliases (the model is not known when the cache is read)
    tiers: frozenset[str] = frozenset()
    yaml_key_names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tenant id -> names in the file
    cors_origins: frozenset[str] = frozenset()  # origins any tenant may be called from (GATEWAY_CORS_ORIGINS)
    tenant_origins: frozenset[str] = frozenset()  # origins some tenant's own `cors_origins` allows
    sources: tuple[Path, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    @property
    def uses_simulator(self) -> bool:
        return any(d.is_simulator for m in self.models.values() for d in m.serving)
