"""The shape of models.yaml and tenants.yaml, validated once at load (never on the request path)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool, StrictFloat, StrictInt,
                      Tag, WithJsonSchema, create_model, field_validator, model_validator)
from pydantic.fields import FieldInfo

from gateway.config.types import FallbackPolicy

BUILTIN_SIMULATOR = "builtin:simulator"
BUILTIN_EMBEDDER = "builtin:embedder"  # the embedded embedding model (all-MiniLM-L6-v2), served by the gateway
FLEET_PREFIX = "fleet:"  # api_base: fleet:<pool> sends a deployment's requests to a pool of vLLM nodes
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"  # safe in a URL path segment
ORIGIN_PATTERN = r"^(\*|https?://[A-Za-z0-9.:_\[\]-]+)/?$"  # as browsers send Origin (IDN hosts in punycode)
TEXT_PATTERN = r"^[^\x00]*$"  # what jsonb can store: no NUL (said in the schema too, so that clients can know)
NAMED_PATTERN = r"^[^\x00]*[^\s\x00][^\x00]*$"  # the same, and not blank

# What the stores and their readers accept: PostgreSQL's jsonb has no NUL character, Redis scripts count in
# doubles (exact to 2**53), spend is counted in billionths of a dollar in 64 bits, and dates must survive a trip
# through timestamptz in any time zone.
MAX_COUNT = 10**15
MAX_USD = 1e9
FIRST_DATE, LAST_DATE = dt.date(1970, 1, 1), dt.date(9999, 12, 31)
DATE_PATTERN = r"^(19[7-9][0-9]|[2-9][0-9]{3})-[0-9]{2}-[0-9]{2}$"  # the same range, as the OpenAPI document says it


def _no_nul(value: Any) -> Any:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _no_nul(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key)
            _no_nul(item)
    return value


def calendar_date(value: Any) -> Any:
    """A date as YAML writes it or as ISO text (YYYY-MM-DD), inside the range the stores can hold."""
    if isinstance(value, dt.datetime):
        day = value.date()
    elif isinstance(value, dt.date):
        day = value
    elif isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        try:
            day = dt.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"'{value}' is not a date of the calendar") from None
    else:
        raise ValueError("must be a date written YYYY-MM-DD")
    if not FIRST_DATE <= day <= LAST_DATE:
        raise ValueError(f"must be between {FIRST_DATE} and {LAST_DATE}")
    return value if isinstance(value, (dt.date, dt.datetime)) else day


CalendarDate = Annotated[dt.date | dt.datetime, BeforeValidator(calendar_date),
                         WithJsonSchema({"type": "string", "format": "date", "pattern": DATE_PATTERN})]
def _whole_number(value: Any) -> Any:
    """An integer as JSON Schema counts one (3077 or 3077.0), never a boolean or a string of digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        value = int(value)
    return value


def whole(low: int, high: int) -> Any:
    """A whole number from ``low`` to ``high``, with those bounds in the JSON schema too."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_whole_number)]


Count = whole(0, MAX_COUNT)
Usd = Annotated[StrictFloat, Field(ge=0, le=MAX_USD)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return _no_nul(value)


class Timeouts(Strict):
    connect: StrictFloat = Field(5.0, gt=0, le=3600, description="seconds to open a connection to the upstream")
    read: StrictFloat = Field(300.0, gt=0, le=86400,
                              description="seconds to wait for the next bytes from the upstream")


class Pricing(Strict):
    input_per_million: StrictFloat = Field(0.0, ge=0, le=1e6)
    output_per_million: StrictFloat = Field(0.0, ge=0, le=1e6)


# Providers that do not speak OpenAI's API, named as LiteLLM names them (the gateway speaks Anthropic's and Gemini's
# itself for chat models; the rest, and their embeddings, go through LiteLLM); and the names of
# OpenAI-compatible ones, which stay on the direct path (a deployment may name them so that a tenant's own key for
# that provider is used).
VIA_LITELLM = ("anthropic", "gemini", "vertex_ai", "bedrock", "azure")
OPENAI_COMPATIBLE = ("openai", "openrouter", "groq", "together", "vllm")
PROVIDERS = VIA_LITELLM + OPENAI_COMPATIBLE


class DeploymentSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    api_base: str | None = Field(None, min_length=1, description="base URL up to /v1, builtin:simulator, or "
                                                                 "fleet:<pool>; a provider's own by default")
    provider: Literal[PROVIDERS] | None = Field(None, description="anthropic, gemini: spoken by the gateway; "
                                                                  "vertex_ai, bedrock, azure: through LiteLLM; "
                                                                  "openai, openrouter, groq, together, vllm: "
                                                                  "OpenAI's API, named")
    api_version: str | None = Field(None, max_length=40, pattern=TEXT_PATTERN, description="azure: the API version")
    credentials: dict[Literal["aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                              "vertex_credentials"], str] = Field(
        default_factory=dict, description="other secrets a provider needs, as references (env:VAR, vault:...)")
    params: dict[Literal["aws_region_name", "vertex_project", "vertex_location"], str] = Field(
        default_factory=dict, description="other settings a provider needs")
    model: str | None = Field(None, min_length=1, description="the model name the upstream knows (a fleet pool's "
                                                              "deployment: the pool's model by default)")
    api_key: str | None = Field(None, description="env:VAR or vault:<mount>/<path>#<field>; the deployment is off "
                                                  "while it cannot be read")
    priority: whole(0, 1000) = Field(0,
                                description="requests go to the usable deployments of the lowest priority")
    timeouts: Timeouts | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    apis: list[Literal["messages", "responses"]] | None = Field(
        None, description="the APIs besides chat completions the upstream serves: a client's request in one of them "
                          "goes to it as it came (messages: Anthropic's, the default of provider anthropic; "
                          "responses: OpenAI's, the default of provider openai); others are translated")

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str | None) -> str | None:
        if value is None or value in (BUILTIN_SIMULATOR, BUILTIN_EMBEDDER) or value.startswith(("${", FLEET_PREFIX)):
            return value
        if not re.match(r"^https?://", value):
            raise ValueError(f"must start with http:// or https:// (or be {BUILTIN_SIMULATOR}, {BUILTIN_EMBEDDER} or "
                             f"fleet:<pool>), got '{value}'")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _upstream_model(self) -> "DeploymentSpec":
        fleet = self.api_base is not None and self.api_base.startswith(FLEET_PREFIX)
        provider = self.provider or (self.model.split("/", 1)[0] if self.model and "/" in self.model else None)
        if self.model is None and not fleet:
            raise ValueError("model: the model name the upstream knows is required")
        if self.api_base is None and provider not in VIA_LITELLM:
            raise ValueError("api_base: required, unless `provider` names one of " + ", ".join(VIA_LITELLM))
        if fleet and provider in VIA_LITELLM:
            raise ValueError("a fleet pool's deployment speaks OpenAI's API: it takes no provider of LiteLLM's")
        if (self.credentials or self.params or self.api_version) and provider not in VIA_LITELLM:
            raise ValueError("credentials, params and api_version belong to a deployment with a provider")
        return self

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        return key_reference(value)

    @field_validator("credentials")
    @classmethod
    def _credentials(cls, value: dict[str, str]) -> dict[str, str]:
        for reference in value.values():
            key_reference(reference)
        return value


def key_reference(value: str | None) -> str | None:
    """A secret is named, never written: env:VAR, or vault:<mount>/<path>#<field>."""
    if value is not None and not re.fullmatch(KEY_REFERENCE_PATTERN, value):
        raise ValueError("must be a reference such as env:OPENAI_API_KEY or vault:secret/gateway/openai#api_key; "
                         "secrets are never written in YAML")
    return value


VAULT_REFERENCE = r"vault:[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+#[A-Za-z0-9_.-]+"
KEY_REFERENCE_PATTERN = rf"^(env:[A-Za-z_][A-Za-z0-9_]*|{VAULT_REFERENCE})$"
KeyReference = Annotated[str, Field(pattern=KEY_REFERENCE_PATTERN, max_length=500)]


class CachePolicySpec(Strict):
    """The response cache's policy; a field left out is taken from the level below (tenant, model, defaults)."""

    enabled: StrictBool | None = None
    ttl_seconds: whole(1, 30 * 86400) | None = None
    max_entry_bytes: whole(1, 64 * 1024 * 1024) | None = None
    nondeterministic: StrictBool | None = Field(None, description="also cache requests with temperature above 0 "
                                                                  "and no seed")
    semantic: StrictBool | None = Field(None, description="also answer a chat whose question is close in meaning to "
                                                          "one answered before (same tenant, model and parameters)")
    semantic_threshold: Annotated[float, Field(ge=0.5, le=1.0, allow_inf_nan=False)] | None = Field(
        None, description="the least cosine similarity of a semantic hit")
    semantic_with_tools: StrictBool | None = Field(None, description="also for requests that offer tools")


class ModelSpec(Strict):
    type: Literal["chat", "embedding", "moderation"] = "chat"
    cache: CachePolicySpec | None = None
    fallbacks: list[str] = Field(
        default_factory=list, description="models tried in turn when every deployment of this one has failed")
    size: Literal["small", "large", "largest"] | None = Field(
        None, description="how the usage dashboard counts it: the small-model share counts 'small' models")
    description: str = ""
    owned_by: str = "gateway"
    context_window: whole(1, 10**9) | None = None
    pricing: Pricing = Pricing()
    deployments: list[DeploymentSpec] = Field(min_length=1)

    @field_validator("deployments")
    @classmethod
    def _unique_names(cls, value: list[DeploymentSpec]) -> list[DeploymentSpec]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"deployment names must be unique within a model: {', '.join(duplicates)}")
        return value


_FALLBACKS = FallbackPolicy()  # the defaults, kept where the request path reads them


class FallbackSpec(Strict):
    max_attempts: whole(1, 10) = Field(_FALLBACKS.max_attempts,
                                    description="upstream calls one request may make, fallbacks included")
    failures_before_cooldown: whole(1, 1000) = Field(_FALLBACKS.failures_before_cooldown,
                                                description="failures in a row that cool a deployment down")
    cooldown_seconds: StrictFloat = Field(_FALLBACKS.cooldown_seconds, ge=0, le=86400,
                                    description="how long a cooled-down deployment is passed over")


class ModelDefaults(Strict):
    timeouts: Timeouts = Timeouts()
    cache: CachePolicySpec = CachePolicySpec()
    fallbacks: FallbackSpec = FallbackSpec()
    reference_model: str | None = Field(
        None, description="savings are reported against sending every request to this model")
    request_timeout: StrictFloat = Field(600.0, gt=0, le=86400, description=(
        "seconds one request may take in all (fallbacks, cascade and a whole stream included); its concurrency "
        "slot is held no longer than this"))


COMPLEXITIES = ("simple", "moderate", "complex", "critical")
MARKER_LISTS = ("simple", "complex", "critical", "technical", "reasoning", "multi_step", "negation",
                "constraints")


RULE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DETECTED = ("email", "payment_card", "iban", "us_ssn", "ip_address", "secrets")
Word = Annotated[str, Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)]
Words = Annotated[list[Word], Field(min_length=1, max_length=5000)]
def keyed(key: dict, value: type[BaseModel] | dict, most: int) -> WithJsonSchema:
    """The JSON schema of a dict whose keys must match ``key`` (minLength, maxLength, pattern): said as
    propertyNames, so that a key off the pattern is invalid in the schema as it is here (pydantic's own
    patternProperties would let it through with any value)."""
    values = value.model_json_schema() if isinstance(value, type) else value
    return WithJsonSchema({"type": "object", "maxProperties": most, "propertyNames": key,
                           "additionalProperties": values})


# keywords by topic: the names are labels (any text), said as propertyNames so that clients can know
Topics = Annotated[dict[Annotated[str, Field(min_length=1, max_length=64, pattern=TEXT_PATTERN)], Words],
                   Field(max_length=100),
                   WithJsonSchema({"type": "object", "maxProperties": 100,
                                   "propertyNames": {"minLength": 1, "maxLength": 64, "pattern": TEXT_PATTERN},
                                   "additionalProperties": {"type": "array", "minItems": 1, "maxItems": 5000,
                                                            "items": {"type": "string", "minLength": 1,
                                                                      "maxLength": 200, "pattern": TEXT_PATTERN}}})]
Direction = Literal["input", "output", "both"]


class _Rule(Strict):
    name: str = Field(pattern=RULE_NAME_PATTERN, description="the rule's name, in refusals, the ledger, the metrics")
    direction: Direction = Field("input", description="the request (input), the answer (output), or both")
    action: Literal["block", "redact", "flag"] = Field(
        "block", description="block: refuse (or end the answer); redact: mask what was found (drop a refused tool); "
                             "flag: let it through and record it")
    message: str | None = Field(None, max_length=500, pattern=TEXT_PATTERN,
                                description="what a refused client is told (the rule's name by default)")


class _RequestRule(_Rule):
    direction: Literal["input"] = Field("input", description="these checks read the request only")


class DetectedRule(_Rule):
    """Personal data or secrets, found by pattern and confirmed by checksum where the kind has one."""

    check: Literal[DETECTED]


class PhoneRule(_Rule):
    check: Literal["phone"]
    regions: list[Annotated[str, Field(pattern=r"^[A-Z]{2}$")]] = Field(
        default_factory=lambda: ["US"], min_length=1, max_length=50,
        description="the countries whose national numbers are read (ISO codes); +... numbers always")


class DenyListRule(_Rule):
    check: Literal["deny_list"]
    words: Words = Field(description="the words and phrases (whole, any case)")


class RegexRule(_Rule):
    check: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=2000, pattern=TEXT_PATTERN,
                         description="a regular expression in RE2's syntax (its cost grows with the text only; "
                                     "look-arounds and back-references are refused)")

    @field_validator("pattern")
    @classmethod
    def _re2(cls, value: str) -> str:
        from gateway.guardrails.detect import regex_detector

        regex_detector(value)  # a ValueError naming what RE2 refused
        return value


class TopicsRule(_RequestRule):
    check: Literal["topics"]
    action: Literal["block", "flag"] = "block"
    refused_topics: Topics = Field(default_factory=dict, description="keywords of each topic refused")
    allowed_topics: Topics = Field(default_factory=dict, description="a request must touch one of these topics")

    @model_validator(mode="after")
    def _some(self) -> "TopicsRule":
        if not self.refused_topics and not self.allowed_topics:
            raise ValueError("a topics check needs refused_topics or allowed_topics")
        return self

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["refused_topics"], "properties": {"refused_topics": {"minProperties": 1}}},
        {"required": ["allowed_topics"], "properties": {"allowed_topics": {"minProperties": 1}}}]})


class SizeRule(_RequestRule):
    check: Literal["max_prompt_tokens"]
    action: Literal["block", "flag"] = "block"
    max_tokens: whole(1, 10_000_000) = Field(description="the most tokens a prompt may have")


class ToolsRule(_RequestRule):
    check: Literal["tools"]
    allowed_tools: list[Word] | None = Field(None, max_length=1000,
                                             description="function names a request may offer (* and ?)")
    refused_tools: list[Word] = Field(default_factory=list, max_length=1000,
                                      description="function names a request may not offer (* and ?)")

    @model_validator(mode="after")
    def _some(self) -> "ToolsRule":
        if self.allowed_tools is None and not self.refused_tools:
            raise ValueError("a tools check needs allowed_tools or refused_tools")
        return self

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["allowed_tools"], "properties": {"allowed_tools": {"type": "array"}}},
        {"required": ["refused_tools"], "properties": {"refused_tools": {"minItems": 1}}}]})


class ModelRule(_Rule):
    """A guard model of models.yaml, asked through the gateway (a moderation model, or a chat model answering as
    Llama Guard does), about the request, the answer, or both."""

    check: Literal["model"]
    action: Literal["block", "flag"] = "block"
    model: str = Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)
    categories: Annotated[dict[Annotated[str, Field(min_length=1, max_length=64, pattern=TEXT_PATTERN)],
                               Literal["block", "flag", "allow"]],
                          keyed({"minLength": 1, "maxLength": 64, "pattern": TEXT_PATTERN},
                                {"type": "string", "enum": ["block", "flag", "allow"]}, 100)] = Field(
        default_factory=dict, max_length=100, description="what a flagged category does (moderation categories or "
                                                          "Llama Guard's S1...S14; * for the others); the rule's "
                                                          "action by default")
    # the bounds on each member of the union, so that the JSON schema says them too (not only the validation)
    timeout_seconds: Annotated[StrictFloat, Field(gt=0, le=60)] | Annotated[StrictInt, Field(gt=0, le=60)] = Field(
        2.0, description="how long the guard may take")
    on_failure: Literal["open", "closed"] = Field(
        "open", description="when the guard model fails or is late, let the request through (open, recorded) or "
                            "refuse it (closed, 503)")


def _rule_kind(value: Any) -> str | None:
    check = value.get("check") if isinstance(value, dict) else getattr(value, "check", None)
    return "detected" if check in DETECTED else check if isinstance(check, str) else None


GuardrailSpec = Annotated[Union[
    Annotated[DetectedRule, Tag("detected")], Annotated[PhoneRule, Tag("phone")],
    Annotated[DenyListRule, Tag("deny_list")], Annotated[RegexRule, Tag("regex")],
    Annotated[TopicsRule, Tag("topics")], Annotated[SizeRule, Tag("max_prompt_tokens")],
    Annotated[ToolsRule, Tag("tools")], Annotated[ModelRule, Tag("model")],
], Discriminator(_rule_kind, custom_error_type="invalid_check", custom_error_message=(
    "check must be one of: email, phone, payment_card, iban, us_ssn, ip_address, secrets, deny_list, regex, topics, "
    "max_prompt_tokens, tools, model"))]


class ProfileModels(Strict):
    """A model for each complexity; a field left out is taken from the profile below."""

    simple: str | None = None
    moderate: str | None = None
    complex: str | None = None
    critical: str | None = None


class ProfileSpec(ProfileModels):
    long_context: str | None = Field(None, description="where a request too long for the chosen model goes")
    cascade_threshold: StrictFloat | None = Field(None, ge=0, le=1)
    target_large_share: StrictFloat | None = Field(None, gt=0, lt=1, description="the share of routed requests "
                                                   "sent to large models; thresholds follow the traffic to keep it")
    economy: ProfileModels | None = Field(None, description="models used once the tenant's spend passes the soft "
                                                            "budget limit")
    over_budget: ProfileModels | None = Field(None, description="models used once the monthly budget is spent "
                                                                "(free ones, typically)")
    tiers: dict[str, ProfileModels] = Field(default_factory=dict, description="changes for tenants of a tier")
    guardrails: list[GuardrailSpec] = Field(default_factory=list, max_length=50,
                                            description="checks of the requests this profile routes, after the "
                                                        "tenant's and the key's (the default profile's apply to all)")


class ThresholdsSpec(Strict):
    """Thresholds set by the admin; a field left out is the scorer's own (or, without a scorer, the default)."""

    moderate: StrictFloat | None = None
    complex: StrictFloat | None = None
    critical: StrictFloat | None = None


class ClassifierSpec(Strict):
    scorer: str = Field("builtin", description="builtin, none, or the path of a file made by gateway router train")
    weights: dict[str, StrictFloat] = Field(default_factory=dict, description="changes to the scorer's signal "
                                                                              "weights")
    thresholds: ThresholdsSpec = ThresholdsSpec()
    markers: dict[Literal[MARKER_LISTS], list[str]] = Field(default_factory=dict,
                                                            description="replace a built-in marker list")


class CascadeSpec(Strict):
    enabled: StrictBool = True
    threshold: StrictFloat = Field(0.6, ge=0, le=1, description="answers of a small model below this are asked "
                                                                "again of the next model up")
    uncertainty_phrases: list[str] | None = None


class BudgetRoutingSpec(Strict):
    soft_limit: StrictFloat = Field(0.8, gt=0, le=1, description="share of the monthly budget after which the "
                                                           "profile's economy models are used")


class AliasSpec(Strict):
    description: str = ""
    profile: str | None = Field(None, description="always use this profile instead of the tenant's")
    guardrails: list[GuardrailSpec] = Field(default_factory=list, max_length=50,
                                            description="checks of the requests for this alias, after the profile's")


class LearningSpec(Strict):
    keep_examples: StrictBool = Field(True, description="keep the hashed words and signals of routed requests a small "
                                                        "model answered in the ledger, to train on")


class RouterSpec(Strict):
    aliases: dict[str, AliasSpec] = Field(default_factory=lambda: {"auto": AliasSpec()})
    classifier: ClassifierSpec = ClassifierSpec()
    profiles: dict[str, ProfileSpec] = Field(default_factory=dict)
    cascade: CascadeSpec = CascadeSpec()
    budget: BudgetRoutingSpec = BudgetRoutingSpec()
    learning: LearningSpec = LearningSpec()


URL_PATTERN = r"^https?://[^\s/]+(/[^\s]*)?$"


class FleetNodeSpec(Strict):
    url: str = Field(pattern=URL_PATTERN, description="the node's OpenAI-compatible base URL, up to /v1 "
                                                      "(a Tailscale MagicDNS name or 100.x address is a URL like any)")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="how the node is named (default host:port)")
    api_key: str | None = Field(None, description="env:VAR: vLLM's --api-key, if the node has one (default: the "
                                                  "pool's)")
    weight: StrictFloat = Field(1.0, gt=0, le=1000, description="a node of weight 2 takes twice the load")

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        return key_reference(value)


class TailscaleDiscoverySpec(Strict):
    tag: str = Field("tag:vllm", pattern=r"^tag:[A-Za-z0-9-]+$", description="the ACL tag of the vLLM nodes")
    port: whole(1, 65535) = Field(8000, description="the port vLLM listens on")
    scheme: Literal["http", "https"] = "http"
    path: str = Field("/v1", pattern=r"^/[^\s]*$")
    command: str = Field("tailscale", min_length=1, description="the tailscale CLI (its status --json is read)")


class DiscoverySpec(Strict):
    tailscale: TailscaleDiscoverySpec


class PoolSpec(Strict):
    model: str = Field(min_length=1, description="the base model the pool's nodes serve (vLLM's --model)")
    api_key: str | None = Field(None, description="env:VAR: the nodes' --api-key")
    max_loras: whole(1, 1024) = Field(4, description="adapter slots of a node whose metrics do not say")
    nodes: list[FleetNodeSpec] = Field(default_factory=list)
    discovery: DiscoverySpec | None = None
    weights: str | None = Field(None, min_length=1, max_length=1000, pattern=TEXT_PATTERN,
                                description="the base model's weights in Hugging Face's layout (a folder), for "
                                            "fine-tuning: without them the pool's model cannot be fine-tuned")

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        return key_reference(value)

    @model_validator(mode="after")
    def _has_nodes(self) -> "PoolSpec":
        if not self.nodes and self.discovery is None:
            raise ValueError("a pool needs nodes, or discovery to find them")
        return self


class PlacementSpec(Strict):
    strategy: Literal["adapter_aware", "round_robin", "least_loaded"] = Field(
        "adapter_aware", description="adapter_aware: see docs/fleet.md; the others for comparison")
    queue_weight: StrictFloat = Field(0.25, ge=0, le=100, description="score lost per request in flight or "
                                                                      "waiting on a node")
    kv_weight: StrictFloat = Field(1.0, ge=0, le=100, description="score lost at a full KV cache")


class FleetSpec(Strict):
    refresh_seconds: StrictFloat = Field(5.0, ge=0.1, le=3600, description="how often each node is checked")
    failures_before_drain: whole(1, 100) = Field(3, description="failed requests in a row that drain a node")
    load_timeout: StrictFloat = Field(120.0, gt=0, le=3600, description="seconds a node may take to load an "
                                                                         "adapter")
    placement: PlacementSpec = PlacementSpec()
    pools: dict[str, PoolSpec] = Field(min_length=1)

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, value: dict[str, PoolSpec]) -> dict[str, PoolSpec]:
        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"'{name}' is not a valid pool name (letters, digits, . _ : / -)")
        return value


class TrainerSpec(Strict):
    """A trainer off the gateways: a GPU node of the mesh that a command or a Kubernetes Job starts. It is given
    the job's report URL and token, fetches its data from the gateways, and reports its progress, checkpoints and
    adapter back over HTTP (``python -m gateway.finetune.remote``)."""

    kind: Literal["command", "kubernetes"] = Field(description="command: a program the gateway runs (ssh, srun, a "
                                                               "script); kubernetes: a Job made from a template")
    concurrency: whole(1, 64) = Field(1, description="jobs this trainer runs at once, counted across every gateway")
    models: list[Annotated[str, Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)]] = Field(
        default_factory=list, max_length=100, description="the base models it trains; empty: every one")
    weights: dict[str, Annotated[str, Field(min_length=1, max_length=1000, pattern=TEXT_PATTERN)]] = Field(
        default_factory=dict, description="a base model's weights as the trainer's node finds them (by default "
                                          "its fleet pool's `weights`)")
    start_seconds: StrictFloat = Field(600.0, gt=0, le=86_400, description="how long a started trainer may take "
                                                                           "to report for the first time")
    command: list[Annotated[str, Field(min_length=1, max_length=1000, pattern=TEXT_PATTERN)]] = Field(
        default_factory=list, max_length=64, description="command: the program and its arguments, run without a "
        "shell; {job_id}, {report_url} and {token} in them are replaced (the URL and token are also in its "
        "environment as GATEWAY_TRAINER_URL and GATEWAY_TRAINER_TOKEN)")
    api_server: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=500,
                                   description="kubernetes: the API server's URL")
    namespace: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                           description="kubernetes: where the Jobs are made")
    token: str | None = Field(None, description="kubernetes: a service account's bearer token, as a reference "
                                                "(env:VAR or vault:...)")
    ca_file: str | None = Field(None, max_length=1000, pattern=TEXT_PATTERN,
                                description="kubernetes: the CA bundle the API server's certificate is checked with")
    job_template: str | None = Field(None, max_length=1000, pattern=TEXT_PATTERN,
                                     description="kubernetes: a batch/v1 Job manifest (YAML), relative to the config "
                                                 "folder; its containers get the report URL and token")

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        return key_reference(value)

    @model_validator(mode="after")
    def _complete(self) -> "TrainerSpec":
        if self.kind == "command" and not self.command:
            raise ValueError("a command trainer needs `command`")
        if self.kind == "kubernetes" and (self.api_server is None or self.job_template is None):
            raise ValueError("a kubernetes trainer needs `api_server` and `job_template`")
        return self


class FineTuningSpec(Strict):
    concurrency: whole(1, 64) = Field(1, description="jobs one gateway trains at once (its own worker processes)")
    gateway_workers: StrictBool = Field(True, description="whether the gateways' own workers train (off where only "
                                                    "`trainers` should)")
    trainers: dict[str, TrainerSpec] = Field(default_factory=dict, description="trainers off the gateways, by name")
    retry_seconds: StrictFloat = Field(15.0, ge=0, le=3600, description="how long a job whose trainer could not "
                                       "start it waits before it is tried again (doubled at each try)")
    report_url: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=500,
                                   description="where trainers reach the gateways (a load balancer in front of "
                                               "them), for their reports; needed with `trainers`")
    jobs_per_tenant: whole(1, 1000) = Field(2, description="a tenant's jobs validating, queued or running at once")
    gpu_second_usd: StrictFloat = Field(0.0, ge=0, le=100, description="what a second of training costs the "
                                                                          "tenant (in its ledger and budget)")
    max_dataset_tokens: whole(1, 10**10) = Field(50_000_000, description="tokens a job may train on, in all")
    max_epochs: whole(1, 100) = Field(10, description="the most epochs a job may ask for")

    @field_validator("trainers")
    @classmethod
    def _trainer_names(cls, value: dict[str, TrainerSpec]) -> dict[str, TrainerSpec]:
        for name in value:
            if not re.match(r"^[a-z0-9][a-z0-9-]{0,30}$", name):
                raise ValueError(f"'{name}' is not a valid trainer name (lowercase letters, digits and -, 31 at most)")
        return value

    @model_validator(mode="after")
    def _reachable(self) -> "FineTuningSpec":
        if self.trainers and self.report_url is None:
            raise ValueError("`trainers` need `report_url`: where they reach the gateways with their reports")
        return self


class ModelsFile(Strict):
    defaults: ModelDefaults = ModelDefaults()
    models: dict[str, ModelSpec] = Field(min_length=1)
    router: RouterSpec = RouterSpec()
    fleet: FleetSpec | None = None
    fine_tuning: FineTuningSpec = FineTuningSpec()

    @model_validator(mode="after")
    def _fleet_pools_exist(self) -> "ModelsFile":
        pools = self.fleet.pools if self.fleet is not None else {}
        for name, model in self.models.items():
            for deployment in model.deployments:
                pool = (deployment.api_base or "").removeprefix(FLEET_PREFIX)
                if (deployment.api_base or "").startswith(FLEET_PREFIX) and pool not in pools:
                    raise ValueError(f"models.{name}: deployment '{deployment.name}' names the fleet pool '{pool}', "
                                     f"which the fleet section does not declare")
        return self

    @model_validator(mode="after")
    def _reference_exists(self) -> "ModelsFile":
        reference = self.defaults.reference_model
        if reference is not None and reference not in self.models:
            raise ValueError(f"defaults.reference_model '{reference}' is not a model of this file")
        return self

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"'{name}' is not a valid model name (letters, digits, . _ : / -)")
        return value


FEATURES = ("router", "analytics", "sso", "custom_model")


class LimitsSpec(Strict):
    """Limits of a tier, or a tenant's overrides of its tier's (a field left out is inherited)."""

    requests_per_minute: Count | None = None
    tokens_per_minute: Count | None = None
    tokens_per_hour: Count | None = None
    concurrent_requests: Count | None = None
    calls_per_day: Count | None = None
    monthly_budget_usd: Usd | None = None
    completion_reservation: whole(1, 10**7) | None = Field(
        None, description="completion tokens reserved for a request that does not set max_tokens")


class EndUserLimitsSpec(Strict):
    """Limits of each of a tenant's end users (a field left out: no such limit)."""

    requests_per_minute: Count | None = None
    tokens_per_day: Count | None = None
    monthly_budget_usd: Usd | None = None


END_USER_PATTERN = r"^[^\x00]{1,256}$"


class EndUsersSpec(Strict):
    """A tenant's end users (the body's user, Open WebUI's forwarded user header, a token's user claim)."""

    limits: EndUserLimitsSpec = Field(EndUserLimitsSpec(), description="every end user's limits")
    users: Annotated[dict[Annotated[str, Field(pattern=END_USER_PATTERN)], EndUserLimitsSpec],
                     keyed({"minLength": 1, "maxLength": 256, "pattern": END_USER_PATTERN}, EndUserLimitsSpec,
                           10_000)] = Field(
        default_factory=dict, max_length=10_000, description="one end user's own limits, in place of the default")
    required: StrictBool = Field(False, description="a request that names no end user is refused (400)")


class KeyLimitsSpec(Strict):
    requests_per_minute: Count | None = None
    tokens_per_minute: Count | None = None
    concurrent_requests: Count | None = None


ROLES = ("member", "viewer", "tenant_admin")
ROUTE_GROUPS = ("chat", "embeddings", "moderations", "files", "usage", "fine_tuning")


class KeyAccessFields(Strict):
    """What a key may do: its role, and the routes, models and tools it is limited to (all, when left out)."""

    role: Literal[ROLES] = Field("member", description="member: the OpenAI routes; viewer: reads its tenant's usage "
                                 "and requests only; tenant_admin: a member that also manages its own tenant "
                                 "through the admin API")
    routes: list[Literal[ROUTE_GROUPS]] | None = Field(
        None, max_length=len(ROUTE_GROUPS), description="route groups the key may call: chat (chat completions, "
        "completions, messages, responses, feedback), embeddings, moderations, files (files and vector stores), "
        "usage (usage, routing stats, account), fine_tuning (fine-tuning jobs)")
    models: list[Annotated[str, Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)]] | None = Field(
        None, max_length=1000, description="patterns (* and ?) of the model names the key may ask for, within "
        "its tenant's")
    tools: list[Word] | None = Field(None, max_length=1000, description="function names (* and ?) a request of "
                                     "this key may offer")


class KeySpec(KeyAccessFields):
    name: str = Field(pattern=KEY_NAME_PATTERN, description="letters, digits, . _ @ -")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key; the key itself is never stored")
    expires: CalendarDate | None = None
    limits: KeyLimitsSpec | None = None
    guardrails: list[GuardrailSpec] = Field(default_factory=list, max_length=50,
                                            description="checks of this key's requests, after the tenant's")


class TierSpec(Strict):
    limits: LimitsSpec = LimitsSpec()
    features: list[Literal[FEATURES]] | None = None


class TenantRoutingSpec(ProfileModels):
    """A tenant's changes to its routing: another profile, other models, its own cascade setting."""

    profile: str | None = Field(None, max_length=128, pattern=TEXT_PATTERN)
    cascade: StrictBool | None = None
    cascade_threshold: StrictFloat | None = Field(None, ge=0, le=1)
    target_large_share: StrictFloat | None = Field(None, gt=0, lt=1, description="the share of this tenant's "
                                                   "routed requests sent to large models")


ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AdapterSpec(Strict):
    """A tenant's fine-tuned LoRA adapter on a model served by a fleet pool; the tenant asks for it by its name."""

    base: str = Field(min_length=1, max_length=200, pattern=TEXT_PATTERN, description="the model of models.yaml "
                                                                                      "it applies to")
    path: str = Field(min_length=1, max_length=1000, pattern=TEXT_PATTERN,
                      description="where a node loads it from (vLLM's lora_path)")
    default: StrictBool = Field(False, description="the tenant's requests for the base model run on it too (if "
                                                   "several say so, the first written)")
    on_failure: Literal["error", "base"] = Field(
        "error", description="when no node can load it: a 503 naming it, or the base model without it")


class FineTuningHyperparameters(Strict):
    n_epochs: Literal["auto"] | whole(1, 100) = "auto"
    batch_size: Literal["auto"] | whole(1, 256) = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[StrictFloat, Field(gt=0, le=10)] | Annotated[
        StrictInt, Field(gt=0, le=10)] = "auto"


class FineTuningScheduleSpec(Strict):
    """A job made again every ``every_hours`` from the files it names (at most one a period, across replicas)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    every_hours: whole(1, 8760)
    model: str = Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)
    training_file: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    validation_file: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    hyperparameters: FineTuningHyperparameters = FineTuningHyperparameters()
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    make_default: StrictBool = Field(False, description="the newest model this schedule trained becomes the tenant's "
                                                  "default for the base model (unless fine_tuned_defaults names one)")


class TenantFields(Strict):
    """What describes a tenant, in tenants.yaml and through the admin API alike."""

    name: str = Field(min_length=1, max_length=200, pattern=NAMED_PATTERN)
    enabled: StrictBool = True
    tier: str = Field("basic", max_length=64, pattern=TEXT_PATTERN)
    industry: str | None = Field(None, max_length=64, pattern=TEXT_PATTERN)
    models: list[Annotated[str, Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)]] = Field(
        default_factory=lambda: ["*"], max_length=1000, description="patterns of model names, * and ? allowed")
    system_prompt: str | None = Field(None, max_length=100_000, pattern=TEXT_PATTERN)
    limits: LimitsSpec = LimitsSpec()
    features: list[Literal[FEATURES]] | None = None  # replaces the tier's list when given
    routing: TenantRoutingSpec | None = None
    cache: CachePolicySpec | None = None
    cors_origins: list[Annotated[str, Field(pattern=ORIGIN_PATTERN, max_length=300)]] = Field(
        default_factory=list, max_length=100, description="browser origins this tenant's keys may be used from")
    provider_keys: dict[Literal[PROVIDERS], KeyReference] = Field(
        default_factory=dict, description="the tenant's own keys for providers (bring your own key), as references "
                                          "(vault:... or env:...); its requests to that provider use them")
    adapters: Annotated[dict[Annotated[str, Field(pattern=ADAPTER_NAME_PATTERN)], AdapterSpec],
                        keyed({"pattern": ADAPTER_NAME_PATTERN}, AdapterSpec, 100)] = Field(
        default_factory=dict, max_length=100, description="the tenant's LoRA adapters on fleet models, by the model "
                                                          "name the tenant asks for")
    guardrails: list[GuardrailSpec] = Field(default_factory=list, max_length=50,
                                            description="checks of every request and answer of this tenant, in order")
    end_users: EndUsersSpec | None = Field(None, description="limits and a budget per end user of the tenant")
    fine_tuned_defaults: dict[Annotated[str, Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)],
                              Annotated[str, Field(min_length=1, max_length=300, pattern=TEXT_PATTERN)]] = Field(
        default_factory=dict, max_length=100, description="base model -> one of the tenant's fine-tuned models "
                                                          "(ft:...), used for its requests for the base model")
    fine_tuning_schedules: list[FineTuningScheduleSpec] = Field(default_factory=list, max_length=20, description=(
        "fine-tuning jobs made again on a schedule, from the files they name"))

    @field_validator("provider_keys")
    @classmethod
    def _provider_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for reference in value.values():
            key_reference(reference)
        return value


class TenantSpec(TenantFields):
    keys: list[KeySpec] = Field(default_factory=list)


def partial(model: type[BaseModel], name: str) -> type[BaseModel]:
    """``model`` with every field optional and unset by default, each keeping its own checks (a PATCH body).

    A field that has a default may be sent as null (back to its default); one that is required may not.
    """
    fields = {}
    for field_name, info in model.model_fields.items():
        optional = FieldInfo.merge_field_infos(info, default=None)
        optional.default_factory = None
        fields[field_name] = (info.annotation if info.is_required() else info.annotation | None, optional)
    return create_model(name, __base__=Strict, **fields)


JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
CLAIM_PATTERN = r"^[A-Za-z0-9_:/.-]{1,200}$"


class JwtIssuerSpec(Strict):
    """An identity provider whose signed tokens (JWTs) the gateway takes instead of an API key."""

    name: str = Field(pattern=KEY_NAME_PATTERN, description="in the ledger and the logs as the key's name, jwt:<name>")
    issuer: str = Field(min_length=1, max_length=2000, pattern=TEXT_PATTERN, description="the tokens' iss, exactly")
    audience: list[Annotated[str, Field(min_length=1, max_length=2000, pattern=TEXT_PATTERN)]] = Field(
        min_length=1, max_length=20, description="values of aud the gateway accepts (one of them)")
    jwks_url: str | None = Field(None, pattern=URL_PATTERN, max_length=2000,
                                 description="where the issuer publishes its signing keys (JWKS), read again every "
                                             "refresh_seconds and when a token names a key not read yet")
    jwks: dict | None = Field(None, description="the signing keys themselves, as a JWKS document ({keys: [...]})")
    algorithms: list[Literal[JWT_ALGORITHMS]] = Field(default_factory=lambda: ["RS256"], min_length=1,
                                                      description="signature algorithms accepted (never none, never "
                                                                  "a shared secret)")
    tenant_claim: str | None = Field(None, pattern=CLAIM_PATTERN, description="the claim naming the tenant's id")
    tenant: str | None = Field(None, pattern=TENANT_ID_PATTERN, description="or: the tenant of every token")
    user_claim: str = Field("sub", pattern=CLAIM_PATTERN, description="the claim naming the tenant's end user")
    leeway_seconds: int = Field(30, ge=0, le=300, description="clock skew allowed on exp and nbf")
    refresh_seconds: int = Field(600, ge=10, le=86400)
    routes: list[Literal[ROUTE_GROUPS]] | None = Field(None, max_length=len(ROUTE_GROUPS),
                                                       description="route groups its tokens may call")
    models: list[Annotated[str, Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)]] | None = Field(
        None, max_length=1000, description="patterns of the model names its tokens may ask for")

    @model_validator(mode="after")
    def _one_of_each(self) -> "JwtIssuerSpec":
        if (self.jwks_url is None) == (self.jwks is None):
            raise ValueError("give the issuer's keys as jwks_url or as jwks, one of them")
        if (self.tenant_claim is None) == (self.tenant is None):
            raise ValueError("name the tenant by a claim (tenant_claim) or give it (tenant), one of them")
        return self


class TenantsFile(Strict):
    tiers: dict[str, TierSpec] = Field(default_factory=dict)
    admin_keys: list[KeySpec] = Field(default_factory=list)
    jwt_issuers: list[JwtIssuerSpec] = Field(default_factory=list, max_length=50,
                                             description="identity providers whose tokens authenticate tenants")
    tenants: dict[str, TenantSpec] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _tenant_ids(cls, value: dict[str, TenantSpec]) -> dict[str, TenantSpec]:
        for tenant_id in value:
            if not re.match(TENANT_ID_PATTERN, str(tenant_id)):
                raise ValueError(f"'{tenant_id}' is not a valid tenant id (lower-case letters, digits, _ and -)")
        return value
