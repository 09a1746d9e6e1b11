"""The shape of models.yaml and tenants.yaml, validated once at load (never on the request path)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.config.types import FallbackPolicy
from gateway.routing.classifier import Thresholds

BUILTIN_SIMULATOR = "builtin:simulator"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(Strict):
    connect: float = Field(5.0, gt=0, description="seconds to open a connection to the upstream")
    read: float = Field(300.0, gt=0, description="seconds to wait for the next bytes from the upstream")


class Pricing(Strict):
    input_per_million: float = Field(0.0, ge=0)
    output_per_million: float = Field(0.0, ge=0)


class DeploymentSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    api_base: str = Field(min_length=1, description="base URL up to /v1, or builtin:simulator")
    model: str = Field(min_length=1, description="the model name the upstream knows")
    api_key: str | None = Field(None, description="env:VAR; the deployment is off while VAR is unset")
    priority: int = Field(0, ge=0, description="requests go to the usable deployments of the lowest priority")
    timeouts: Timeouts | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        if value == BUILTIN_SIMULATOR or value.startswith("${"):
            return value
        if not re.match(r"^https?://", value):
            raise ValueError(f"must start with http:// or https:// (or be {BUILTIN_SIMULATOR}), got '{value}'")
        return value.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("env:"):
            raise ValueError("must be a reference such as env:OPENAI_API_KEY; secrets are never written in YAML")
        return value


class CachePolicySpec(Strict):
    """The response cache's policy; a field left out is taken from the level below (tenant, model, defaults)."""

    enabled: bool | None = None
    ttl_seconds: int | None = Field(None, ge=1, le=30 * 86400)
    max_entry_bytes: int | None = Field(None, ge=1)
    nondeterministic: bool | None = Field(None, description="also cache requests with temperature above 0 and "
                                                            "no seed")


class ModelSpec(Strict):
    type: Literal["chat", "embedding"] = "chat"
    cache: CachePolicySpec | None = None
    fallbacks: list[str] = Field(
        default_factory=list, description="models tried in turn when every deployment of this one has failed")
    size: Literal["small", "large", "largest"] | None = Field(
        None, description="how the usage dashboard counts it: the small-model share counts 'small' models")
    description: str = ""
    owned_by: str = "gateway"
    context_window: int | None = Field(None, gt=0)
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


_FALLBACKS, _THRESHOLDS = FallbackPolicy(), Thresholds()  # the defaults, kept where the request path reads them


class FallbackSpec(Strict):
    max_attempts: int = Field(_FALLBACKS.max_attempts, ge=1, le=10,
                              description="upstream calls one request may make, fallbacks included")
    failures_before_cooldown: int = Field(_FALLBACKS.failures_before_cooldown, ge=1,
                                          description="failures in a row that cool a deployment down")
    cooldown_seconds: float = Field(_FALLBACKS.cooldown_seconds, ge=0,
                                    description="how long a cooled-down deployment is passed over")


class ModelDefaults(Strict):
    timeouts: Timeouts = Timeouts()
    cache: CachePolicySpec = CachePolicySpec()
    fallbacks: FallbackSpec = FallbackSpec()
    reference_model: str | None = Field(
        None, description="savings are reported against sending every request to this model")


COMPLEXITIES = ("simple", "moderate", "complex", "critical")
MARKER_LISTS = ("simple", "complex", "critical", "technical", "reasoning")


class ProfileModels(Strict):
    """A model for each complexity; a field left out is taken from the profile below."""

    simple: str | None = None
    moderate: str | None = None
    complex: str | None = None
    critical: str | None = None


class ProfileSpec(ProfileModels):
    long_context: str | None = Field(None, description="where a request too long for the chosen model goes")
    cascade_threshold: float | None = Field(None, ge=0, le=1)
    economy: ProfileModels | None = Field(None, description="models used once the tenant's spend passes the soft "
                                                            "budget limit")
    over_budget: ProfileModels | None = Field(None, description="models used once the monthly budget is spent "
                                                                "(free ones, typically)")
    tiers: dict[str, ProfileModels] = Field(default_factory=dict, description="changes for tenants of a tier")


class ThresholdsSpec(Strict):
    moderate: float = _THRESHOLDS.moderate
    complex: float = _THRESHOLDS.complex
    critical: float = _THRESHOLDS.critical

    @model_validator(mode="after")
    def _rising(self) -> "ThresholdsSpec":
        if not self.moderate <= self.complex <= self.critical:
            raise ValueError("thresholds must rise: moderate <= complex <= critical")
        return self


class ClassifierSpec(Strict):
    scorer: str = Field("builtin", description="builtin, none, or the path of a file made by gateway router train")
    weights: dict[str, float] = Field(default_factory=dict, description="changes to the default signal weights")
    thresholds: ThresholdsSpec = ThresholdsSpec()
    markers: dict[Literal[MARKER_LISTS], list[str]] = Field(default_factory=dict,
                                                            description="replace a built-in marker list")


class CascadeSpec(Strict):
    enabled: bool = True
    threshold: float = Field(0.6, ge=0, le=1, description="answers of a small model below this are asked again "
                                                          "of the next model up")
    uncertainty_phrases: list[str] | None = None


class BudgetRoutingSpec(Strict):
    soft_limit: float = Field(0.8, gt=0, le=1, description="share of the monthly budget after which the "
                                                           "profile's economy models are used")


class AliasSpec(Strict):
    description: str = ""
    profile: str | None = Field(None, description="always use this profile instead of the tenant's")


class RouterSpec(Strict):
    aliases: dict[str, AliasSpec] = Field(default_factory=lambda: {"auto": AliasSpec()})
    classifier: ClassifierSpec = ClassifierSpec()
    profiles: dict[str, ProfileSpec] = Field(default_factory=dict)
    cascade: CascadeSpec = CascadeSpec()
    budget: BudgetRoutingSpec = BudgetRoutingSpec()


class ModelsFile(Strict):
    defaults: ModelDefaults = ModelDefaults()
    models: dict[str, ModelSpec] = Field(min_length=1)
    router: RouterSpec = RouterSpec()

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

    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    tokens_per_hour: int | None = Field(None, ge=0)
    concurrent_requests: int | None = Field(None, ge=0)
    calls_per_day: int | None = Field(None, ge=0)
    monthly_budget_usd: float | None = Field(None, ge=0)
    completion_reservation: int | None = Field(
        None, ge=1, description="completion tokens reserved for a request that does not set max_tokens")


class KeyLimitsSpec(Strict):
    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    concurrent_requests: int | None = Field(None, ge=0)


class KeySpec(Strict):
    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key; the key itself is never stored")
    expires: dt.date | dt.datetime | None = None
    limits: KeyLimitsSpec | None = None


class TierSpec(Strict):
    limits: LimitsSpec = LimitsSpec()
    features: list[Literal[FEATURES]] | None = None


class TenantRoutingSpec(ProfileModels):
    """A tenant's changes to its routing: another profile, other models, its own cascade setting."""

    profile: str | None = None
    cascade: bool | None = None
    cascade_threshold: float | None = Field(None, ge=0, le=1)


class TenantSpec(Strict):
    name: str = Field(min_length=1)
    enabled: bool = True
    tier: str = "basic"
    industry: str | None = None
    models: list[str] = Field(default_factory=lambda: ["*"], description="patterns of model names, * and ? allowed")
    system_prompt: str | None = None
    limits: LimitsSpec = LimitsSpec()
    features: list[Literal[FEATURES]] | None = None  # replaces the tier's list when given
    routing: TenantRoutingSpec | None = None
    cache: CachePolicySpec | None = None
    keys: list[KeySpec] = Field(default_factory=list)


class TenantsFile(Strict):
    tiers: dict[str, TierSpec] = Field(default_factory=dict)
    admin_keys: list[KeySpec] = Field(default_factory=list)
    tenants: dict[str, TenantSpec] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _tenant_ids(cls, value: dict[str, TenantSpec]) -> dict[str, TenantSpec]:
        for tenant_id in value:
            if not re.match(TENANT_ID_PATTERN, str(tenant_id)):
                raise ValueError(f"'{tenant_id}' is not a valid tenant id (lower-case letters, digits, _ and -)")
        return value
