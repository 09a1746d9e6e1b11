"""Load models.yaml and tenants.yaml, validate them and compile the snapshot the request path reads."""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from gateway.config.schema import (BUILTIN_EMBEDDER, BUILTIN_SIMULATOR, FLEET_PREFIX, VIA_LITELLM, KeyAccessFields,
                                   KeyLimitsSpec, LimitsSpec, ModelsFile, TenantSpec, TenantsFile, ToolsRule)
from gateway.config.issuers import compile_issuers, static_key_problems
from gateway.config.routing import compile_router, tenant_routes
from gateway.guardrails.policy import compile_rules
from gateway.config.tiers import BUILTIN_TIERS
from gateway.config.types import (
    MEMBER, Adapter, ApiKey, CachePolicy, Deployment, EndUserLimits, EndUsers, FallbackPolicy, FleetConfig,
    FleetNode, GatewayConfig, KeyAccess, KeyLimits, LiteLLMCall, Limits, Model, Pool, Pricing, RouterConfig,
    TailscaleDiscovery, Tenant,
)
from gateway.config.yaml_source import ConfigError, YamlDocument, read_yaml
from gateway.config.secrets import SecretUnavailable, Secrets
from gateway.config.trainers import compile_trainers
from gateway.config.origins import parse_origins

MODELS_FILE = "models.yaml"
TENANTS_FILE = "tenants.yaml"

@dataclass(frozen=True)
class ApiKeyRecord:
    tenant_id: str
    name: str
    sha256: str
    expires_at: float | None = None


@dataclass(frozen=True)
class ApiTenantRecord:
    """A tenant made through the admin API, as PostgreSQL keeps it."""

    spec: TenantSpec
    created_at: float | None = None  # unix time; a tenant id used again starts a new tenant
    spec_json: str | None = None  # the spec as the directory stores it, kept for the local copy


@dataclass(frozen=True)
class ApiState:
    """Tenants and keys made through the admin API (kept in PostgreSQL), to merge with tenants.yaml."""

    tenants: dict[str, TenantSpec | ApiTenantRecord] = field(default_factory=dict)
    keys: tuple[ApiKeyRecord, ...] = ()


@dataclass(frozen=True)
class BaseConfig:
    """Everything the two files say, compiled: what every tenant made through the admin API is compiled against."""

    models: dict[str, Model]
    router: RouterConfig | None
    profiles: dict
    models_file: ModelsFile
    tiers: dict[str, tuple[Limits, frozenset[str]]]
    fleet: FleetConfig | None
    trainers: dict  # gateway.config.trainers.Trainer by name
    tenants: dict[str, Tenant]  # tenants.yaml's
    keys: dict[str, ApiKey]  # tenants.yaml's
    admin_keys: dict[str, ApiKey]
    jwt_issuers: tuple  # gateway.config.issuers.JwtIssuer
    yaml_key_names: dict[str, tuple[str, ...]]
    cors_origins: frozenset[str]  # GATEWAY_CORS_ORIGINS: origins every tenant may be called from
    sources: tuple[Path, ...]
    warnings: tuple[str, ...]
    secrets: Secrets


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_config(
    config_dir: Path,
    *,
    simulator_url: str | None = None,
    environ: Mapping[str, str] | None = None,
    api_state: ApiState | None = None,
    secrets: Secrets | None = None,
) -> GatewayConfig:
    """Read and validate both files of ``config_dir``; raise ConfigError listing every problem found.

    ``simulator_url`` is where deployments with ``api_base: builtin:simulator`` send requests; without it they are
    unavailable. ``api_state`` holds the tenants and keys made through the admin API, merged with the file's; a
    tenant of it that cannot be compiled is a problem here (the live config store skips it instead).
    """
    base = load_base(config_dir, simulator_url=simulator_url, environ=environ, secrets=secrets)
    tenants: dict[str, Tenant] = {}
    problems: list[str] = []
    for tenant_id, record in (api_state.tenants.items() if api_state else ()):
        if tenant_id in base.tenants:
            continue
        if isinstance(record, TenantSpec):
            record = ApiTenantRecord(record)
        try:
            tenants[tenant_id] = compile_api_tenant(base, tenant_id, record)
        except ConfigError as exc:
            problems.extend(exc.problems)
    keys: dict[str, ApiKey] = {}
    for record in (api_state.keys if api_state else ()):
        if record.tenant_id in tenants or record.tenant_id in base.tenants:
            _add_key(keys, record.sha256, compile_key(record.tenant_id, record.name, record.expires_at,
                                                      key_access(record.access)),
                     f"key '{record.name}' of tenant '{record.tenant_id}' (admin API)", problems, base.keys)
    if problems:
        raise ConfigError(problems)
    return assemble(base, tenants, keys)


def load_base(config_dir: Path, *, simulator_url: str | None = None,
              environ: Mapping[str, str] | None = None, secrets: Secrets | None = None) -> BaseConfig:
    """Read and validate both files; raise ConfigError listing every problem found (a secret in Vault that cannot
    be read among them, named by its reference)."""
    secrets = secrets if secrets is not None else Secrets(os.environ if environ is None else environ)
    environ = secrets.environ
    problems: list[str] = []
    models_doc = tenants_doc = None
    models_file = tenants_file = None
    try:
        models_doc = read_yaml(config_dir / MODELS_FILE)
        models_file = _validate(models_doc, ModelsFile)
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        tenants_doc = read_yaml(config_dir / TENANTS_FILE)
        tenants_file = _validate(tenants_doc, TenantsFile)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems or models_file is None or tenants_file is None:
        raise ConfigError(problems)

    try:
        secrets.load(key_references(models_file) | tenant_key_references(tenants_file.tenants.values()),
                     strict=True)
    except SecretUnavailable as exc:
        raise ConfigError([f"a secret cannot be read: {problem}" for problem in str(exc).split("; ")]) from None
    cache_policy = _cache_policy(CachePolicy(), models_file.defaults.cache)
    warnings: list[str] = []
    fleet = _compile_fleet(models_file, secrets, warnings)
    trainers = compile_trainers(models_file.fine_tuning, config_dir, secrets, problems)
    models = _compile_models(models_file, models_doc, simulator_url, secrets, cache_policy, problems, fleet)
    router, profiles = compile_router(models_file, models_doc, models, config_dir, problems, warnings)
    if problems:
        raise ConfigError(problems)
    tiers = _compile_tiers(tenants_file)
    context = _TenantContext(models, router, profiles, models_file, tiers, fleet)
    tenants: dict[str, Tenant] = {}
    keys: dict[str, ApiKey] = {}
    for tenant_id, spec in tenants_file.tenants.items():
        where = tenants_doc.where(("tenants", tenant_id))
        tier_where = tenants_doc.where(("tenants", tenant_id, "tier"))
        tenant = _compile_tenant(context, tenant_id, spec, "yaml", where, tier_where, None, problems)
        if tenant is None:
            continue
        tenants[tenant_id] = tenant
        for index, key in enumerate(spec.keys):
            where = tenants_doc.where(("tenants", tenant_id, "keys", index))
            _add_key(keys, key.sha256, compile_key(tenant_id, key.name, _unix_time(key.expires), key_access(key),
                                                   _key_limits(key.limits),
                                                   compile_rules(key.guardrails, models, problems, where)),
                     where, problems)
    for tenant_id, tenant in tenants.items():
        for index, pattern in enumerate(tenant.model_patterns):
            if pattern in tenant.unmatched_patterns:
                warnings.append(f"{tenants_doc.where(('tenants', tenant_id, 'models', index))}: '{pattern}' admits "
                                f"no model of models.yaml nor a router alias: tenant '{tenant_id}' cannot use it")
    admin_keys = {}
    for index, key in enumerate(tenants_file.admin_keys):
        if key.sha256 in keys or key.sha256 in admin_keys:
            problems.append(f"{tenants_doc.where(('admin_keys', index))}: an admin key must not also be a tenant key")
        admin_keys[key.sha256] = ApiKey("", key.name, _unix_time(key.expires))
    problems += static_key_problems(tenants_file.jwt_issuers, lambda i: tenants_doc.where(("jwt_issuers", i)))
    for index, issuer in enumerate(tenants_file.jwt_issuers):
        if issuer.tenant is not None and issuer.tenant not in tenants:
            warnings.append(f"{tenants_doc.where(('jwt_issuers', index, 'tenant'))}: jwt issuer '{issuer.name}' "
                            f"names tenant '{issuer.tenant}', which tenants.yaml does not declare")
    if problems:
        raise ConfigError(problems)
    warnings += [
        f"{models_doc.where(('models', m.name))}: model '{m.name}' has no usable deployment: "
        + "; ".join(f"{d.name}: {d.unavailable_reason}" for d in m.deployments)
        for m in models.values()
        if not m.serving
    ]
    return BaseConfig(
        models=models, router=router, profiles=profiles, models_file=models_file, tiers=tiers, fleet=fleet,
        trainers=trainers,
        tenants=tenants,
        keys=keys, admin_keys=admin_keys, jwt_issuers=compile_issuers(tenants_file.jwt_issuers),
        yaml_key_names={tenant_id: tuple(k.name for k in t.keys) for tenant_id, t in tenants_file.tenants.items()},
        cors_origins=parse_origins(environ.get("GATEWAY_CORS_ORIGINS", "")),
        sources=(models_doc.path, tenants_doc.path), warnings=tuple(warnings), secrets=secrets,
    )


def compile_api_tenant(base: BaseConfig, tenant_id: str, record: ApiTenantRecord) -> Tenant:
    """A tenant made through the admin API, compiled against the files' models, tiers and profiles."""
    problems: list[str] = []
    where = f"tenant '{tenant_id}' (admin API)"
    context = _TenantContext(base.models, base.router, base.profiles, base.models_file, base.tiers, base.fleet)
    tenant = _compile_tenant(context, tenant_id, record.spec, "api", where, where, record.created_at, problems)
    if tenant is None or problems:
        raise ConfigError(problems or [f"{where}: cannot be compiled"])
    return tenant


def assemble(base: BaseConfig, api_tenants: dict[str, Tenant], api_keys: dict[str, ApiKey]) -> GatewayConfig:
    """The snapshot the request path reads: the files' tenants and keys with the admin API's merged in (a tenant
    id declared in tenants.yaml wins)."""
    tenants = {**api_tenants, **base.tenants} if api_tenants else base.tenants
    keys = {**api_keys, **base.keys} if api_keys else base.keys
    models_file = base.models_file
    return GatewayConfig(
        models=base.models,
        tenants=tenants,
        keys=keys,
        admin_keys=base.admin_keys,
        jwt_issuers=base.jwt_issuers,
        reference_model=models_file.defaults.reference_model,
        router=base.router,
        fallback_policy=FallbackPolicy(**models_file.defaults.fallbacks.model_dump()),
        request_timeout=models_file.defaults.request_timeout,
        fleet=base.fleet,
        trainers=base.trainers,
        secrets=base.secrets,
        uses_litellm=any(d.litellm is not None and d.wire is None for m in base.models.values()
                         for d in m.deployments),
        fine_tuning=models_file.fine_tuning,
        cache_policy=_cache_policy(CachePolicy(), models_file.defaults.cache),
        tiers=frozenset(base.tiers),
        yaml_key_names=base.yaml_key_names,
        cors_origins=base.cors_origins,
        tenant_origins=frozenset(o for t in tenants.values() if t.cors_origins for o in t.cors_origins),
        sources=base.sources,
        warnings=base.warnings,
    )


def _validate(doc: YamlDocument, schema: type[BaseModel]) -> Any:
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError([f"{doc.where(())}: the file must hold a mapping at the top level"])
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = tuple(error["loc"])
            field = ".".join(str(part) for part in location) or "(top level)"
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field (check the spelling)"
            problems.append(f"{doc.where(location)}: {field}: {message}")
        raise ConfigError(problems) from None


def _secret(reference: str | None, secrets: Secrets, missing: list[str]) -> str | None:
    """The value of a key reference; None, with the reason noted in ``missing``, when it cannot be had."""
    if reference is None:
        return None
    value = secrets.get(reference)
    if value is None:
        missing.append(secrets.why_missing(reference))
    return value


def key_references(spec: ModelsFile) -> set[str]:
    """Every secret the models file names."""
    references = set()
    for model in spec.models.values():
        for d in model.deployments:
            references.update(r for r in (d.api_key, *d.credentials.values()) if r)
    for pool in (spec.fleet.pools.values() if spec.fleet is not None else ()):
        references.update(r for r in (pool.api_key, *(n.api_key for n in pool.nodes)) if r)
    references.update(t.token for t in spec.fine_tuning.trainers.values() if t.token)
    return references


def _compile_fleet(spec: ModelsFile, secrets: Secrets, warnings: list[str]) -> FleetConfig | None:
    fleet = spec.fleet
    if fleet is None:
        return None
    pools = {}
    for name, pool in fleet.pools.items():
        missing: list[str] = []
        key = _secret(pool.api_key, secrets, missing)
        nodes = []
        for node in pool.nodes:
            node_key = _secret(node.api_key, secrets, missing) if node.api_key else key
            nodes.append(FleetNode(node.url.rstrip("/"), node.name or urlsplit(node.url).netloc, node_key,
                                   node.weight))
        if missing:
            warnings.append(f"fleet pool '{name}': {'; '.join(sorted(set(missing)))}: its nodes are asked without "
                            f"that key")
        discovery = pool.discovery.tailscale if pool.discovery is not None else None
        pools[name] = Pool(name, pool.model, key, pool.max_loras, tuple(nodes), None if discovery is None else
                           TailscaleDiscovery(discovery.tag, discovery.port, discovery.scheme, discovery.path,
                                              discovery.command), pool.weights)
    placement = fleet.placement
    return FleetConfig(pools, fleet.refresh_seconds, fleet.failures_before_drain, fleet.load_timeout,
                       placement.strategy, placement.queue_weight, placement.kv_weight)


def _compile_models(
    spec: ModelsFile, doc: YamlDocument, simulator_url: str | None, secrets: Secrets,
    cache_policy: CachePolicy, problems: list[str], fleet: FleetConfig | None = None,
) -> dict[str, Model]:
    environ = secrets.environ
    models: dict[str, Model] = {}
    for name, model_spec in spec.models.items():
        deployments = []
        for d in model_spec.deployments:
            timeouts = d.timeouts or spec.defaults.timeouts
            missing: list[str] = []
            api_base = _expand(d.api_base, environ, missing) if d.api_base else None
            pool = (fleet.pools[api_base.removeprefix(FLEET_PREFIX)]
                    if api_base and api_base.startswith(FLEET_PREFIX) else None)
            upstream_model = _expand(d.model, environ, missing) if d.model else pool.model
            provider, upstream_model = provider_of(d.provider, upstream_model, api_base)
            headers = {k: _expand(v, environ, missing) for k, v in d.headers.items()}
            api_key = _secret(d.api_key, secrets, missing)
            headers = {"Content-Type": "application/json", **headers}
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            is_simulator = api_base == BUILTIN_SIMULATOR
            reason = None
            via = None
            if provider in VIA_LITELLM:
                credentials = {k: _secret(r, secrets, missing) for k, r in d.credentials.items()}
                via = LiteLLMCall(f"{provider}/{upstream_model}", {
                    k: v for k, v in {"api_key": api_key, "api_base": api_base, "api_version": d.api_version,
                                      **d.params, **credentials}.items() if v is not None})
            if missing:
                reason = "; ".join(sorted(set(missing)))
            elif pool is not None or via is not None:
                pass  # the fleet knows which of the pool's nodes can take a request; LiteLLM knows the provider
            elif is_simulator:
                if simulator_url is None:
                    reason = "the built-in simulator is not running"
                api_base = f"{simulator_url}/v1" if simulator_url else api_base
            elif api_base == BUILTIN_EMBEDDER:  # served on the same built-in loopback server
                if simulator_url is None:
                    reason = "the gateway's built-in servers are off (GATEWAY_BUILTIN_SIMULATOR=0)"
                api_base = f"{simulator_url}/embedder/v1" if simulator_url else api_base
            elif not re.match(r"^https?://", api_base):
                reason = f"api_base '{api_base}' is not an http(s) URL"
            wire = provider if provider in SPOKEN_PROVIDERS and model_spec.type == "chat" else None
            if not api_base and provider in DEFAULT_API_BASES:
                api_base = DEFAULT_API_BASES[provider]  # where the gateway sends a request in the provider's API
            deployments.append(
                Deployment(
                    name=d.name,
                    model=name,
                    upstream_model=upstream_model,
                    api_base=(api_base or "").rstrip("/"),
                    api_key=api_key,
                    headers=headers,
                    connect_timeout=timeouts.connect,
                    read_timeout=timeouts.read,
                    priority=d.priority,
                    is_simulator=is_simulator,
                    unavailable_reason=reason,
                    pool=pool.name if pool is not None else None,
                    provider=provider,
                    litellm=via,
                    wire=wire,
                    apis=frozenset(d.apis if d.apis is not None else _DEFAULT_APIS.get(provider, ())),
                )
            )
        available = [d for d in deployments if d.unavailable_reason is None]
        first = min((d.priority for d in available), default=0)
        serving = [d for d in available if d.priority == first]
        # A real deployment never falls back to the simulator: a made-up answer is worse than an error.
        simulated = all(d.is_simulator for d in serving)
        standby = sorted((d for d in available if d not in serving and (simulated or not d.is_simulator)),
                         key=lambda d: d.priority)
        models[name] = Model(
            name=name,
            type=model_spec.type,
            size=model_spec.size,
            description=model_spec.description,
            owned_by="gateway-simulator" if serving and all(d.is_simulator for d in serving) else model_spec.owned_by,
            context_window=model_spec.context_window,
            pricing=Pricing(model_spec.pricing.input_per_million, model_spec.pricing.output_per_million),
            deployments=tuple(deployments),
            serving=tuple(serving),
            fallbacks=tuple(model_spec.fallbacks),
            standby=tuple(standby),
            cache=_cache_policy(cache_policy, model_spec.cache),
        )
    for name, model_spec in spec.models.items():
        for index, fallback in enumerate(model_spec.fallbacks):
            other = models.get(fallback)
            if other is None or other.type != models[name].type or fallback == name:
                problems.append(f"{doc.where(('models', name, 'fallbacks', index))}: '{fallback}' is not another "
                                f"{models[name].type} model of this file")
    return models


def _expand(value: str, environ: Mapping[str, str], missing: list[str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; note the variables that are unset and have no default."""

    def substitute(match: re.Match[str]) -> str:
        variable, default = match.group(1), match.group(2)
        found = environ.get(variable)
        if found:
            return found
        if default is not None:
            return default
        missing.append(variable)
        return ""

    return _ENV_REFERENCE.sub(substitute, value) if "${" in value else value


def _compile_tiers(spec: TenantsFile) -> dict[str, tuple[Limits, frozenset[str]]]:
    """Built-in tiers with the file's changes laid over them field by field, plus the file's own tiers."""
    tiers: dict[str, tuple[Limits, frozenset[str]]] = {}
    for name in {*BUILTIN_TIERS, *spec.tiers}:
        builtin = BUILTIN_TIERS.get(name, {"limits": {}, "features": []})
        override = spec.tiers.get(name)
        limits = dict(builtin["limits"])
        features = builtin["features"]
        if override is not None:
            limits.update(override.limits.model_dump(exclude_none=True))
            if override.features is not None:
                features = override.features
        tiers[name] = (Limits(**limits), frozenset(features))
    return tiers


def _cache_policy(base: CachePolicy, changes) -> CachePolicy:
    return replace(base, **changes.model_dump(exclude_none=True)) if changes is not None else base


def _tenant_limits(tier: Limits, overrides: LimitsSpec) -> Limits:
    return replace(tier, **overrides.model_dump(exclude_none=True))


def key_access(fields: dict | KeyAccessFields | None) -> KeyAccess:
    """A key's role and limits as the request path checks them (fields as KeyAccessFields validates them)."""
    if not fields:
        return MEMBER
    spec = fields if isinstance(fields, KeyAccessFields) else KeyAccessFields.model_validate(
        {name: value for name, value in fields.items() if name in KeyAccessFields.model_fields})
    if spec.role == "member" and spec.routes is None and spec.models is None and spec.tools is None:
        return MEMBER
    return KeyAccess(spec.role, frozenset(spec.routes) if spec.routes is not None else None,
                     tuple(spec.models) if spec.models is not None else None,
                     tuple(spec.tools) if spec.tools is not None else None)


def key_tools_rule(access: KeyAccess) -> tuple:
    """The tools a key may offer, as the first of its guardrails (a request offering another is refused)."""
    if access.tools is None:
        return ()
    return compile_rules([ToolsRule(name="key-tools", check="tools", allowed_tools=list(access.tools),
                                    message="This key may not offer one of the tools of this request.")])


def compile_key(tenant_id: str, name: str, expires_at: float | None, access: KeyAccess = MEMBER,
                limits: KeyLimits | None = None, guardrails: tuple = ()) -> ApiKey:
    return ApiKey(tenant_id, name, expires_at, limits, key_tools_rule(access) + guardrails, access)


def _end_users(spec) -> EndUsers | None:
    if spec is None:
        return None
    return EndUsers(EndUserLimits(**spec.limits.model_dump()),
                    {user: EndUserLimits(**limits.model_dump()) for user, limits in spec.users.items()}, spec.required)


def _key_limits(spec: KeyLimitsSpec | None) -> KeyLimits | None:
    if spec is None or not spec.model_dump(exclude_none=True):
        return None
    return KeyLimits(**spec.model_dump())


@dataclass(frozen=True)
class _TenantContext:
    models: dict[str, Model]
    router: RouterConfig | None
    profiles: dict
    models_file: ModelsFile
    tiers: dict[str, tuple[Limits, frozenset[str]]]
    fleet: FleetConfig | None


def _compile_tenant(context: _TenantContext, tenant_id: str, t: TenantSpec, source: str, where: str,
                    tier_where: str, created_at: float | None, problems: list[str]) -> Tenant | None:
    if t.tier not in context.tiers:
        problems.append(f"{tier_where}: unknown tier '{t.tier}' (tiers: {', '.join(sorted(context.tiers))})")
        return None
    tier_limits, tier_features = context.tiers[t.tier]
    aliases = context.router.aliases if context.router is not None else {}
    names = (*context.models, *aliases)
    admitted = {pattern: [name for name in names if fnmatch.fnmatchcase(name, pattern)] for pattern in t.models}
    allowed = frozenset(name for names_admitted in admitted.values() for name in names_admitted)
    features = frozenset(t.features) if t.features is not None else tier_features
    before = len(problems)
    routes = tenant_routes(context.models_file, context.router, context.profiles, tenant_id, t, allowed, features,
                           where, context.models, problems)
    adapters = _compile_adapters(context, tenant_id, t, where, problems)
    if len(problems) > before:
        return None
    return Tenant(
        id=tenant_id,
        name=t.name,
        enabled=t.enabled,
        model_patterns=tuple(t.models),
        allowed_models=allowed,
        unmatched_patterns=tuple(pattern for pattern, names_admitted in admitted.items() if not names_admitted),
        tier=t.tier,
        industry=t.industry,
        system_prompt=t.system_prompt,
        limits=_tenant_limits(tier_limits, t.limits),
        features=features,
        routes=routes,
        cache=t.cache.model_dump(exclude_none=True) if t.cache is not None else {},
        cors_origins=frozenset(o.rstrip("/") for o in t.cors_origins),
        provider_keys=dict(t.provider_keys),
        adapters=adapters,
        default_adapters={a.base: a for a in adapters.values() if a.default},
        fine_tuned_defaults=dict(t.fine_tuned_defaults),
        fine_tuning_schedules=tuple(t.fine_tuning_schedules),
        guardrails=compile_rules(t.guardrails, context.models, problems, where),
        end_users=_end_users(t.end_users),
        source=source,
        created_at=created_at,
    )


# Providers whose own API the gateway speaks for chat models (gateway.upstreams.translated), and where they are
SPOKEN_PROVIDERS = ("anthropic", "gemini")
DEFAULT_API_BASES = {"anthropic": "https://api.anthropic.com",
                     "gemini": "https://generativelanguage.googleapis.com/v1beta"}
# The APIs besides chat completions a provider serves by default (a deployment's `apis:` says otherwise)
_DEFAULT_APIS = {"anthropic": ("messages",), "openai": ("responses",)}

# OpenAI-compatible providers known by their API's host: a tenant's own key for them is used without the
# deployment having to say `provider:`.
_PROVIDER_HOSTS = {"api.openai.com": "openai", "openrouter.ai": "openrouter", "api.groq.com": "groq",
                   "api.together.xyz": "together"}


def provider_of(declared: str | None, model: str, api_base: str | None = None) -> tuple[str | None, str]:
    """A deployment's provider and its model's name there: ``provider: anthropic`` and ``model: claude-...``,
    LiteLLM's form ``model: anthropic/claude-...``, or the host of a well-known OpenAI-compatible API."""
    if declared is not None:
        return declared, model.removeprefix(f"{declared}/") if declared in VIA_LITELLM else model
    prefix, _, rest = model.partition("/")
    if prefix in VIA_LITELLM and rest:
        return prefix, rest
    host = urlsplit(api_base).hostname if api_base and api_base.startswith(("http://", "https://")) else None
    return _PROVIDER_HOSTS.get(host or ""), model


def tenant_key_references(tenants) -> set[str]:
    """The tenants' own provider keys (bring your own key)."""
    return {reference for tenant in tenants for reference in tenant.provider_keys.values()}


def _compile_adapters(context: _TenantContext, tenant_id: str, t: TenantSpec, where: str,
                      problems: list[str]) -> dict[str, Adapter]:
    """A tenant's adapters; each applies to a model of the files that a fleet pool serves (whether the tenant may
    use that model is checked at each request, as for any model)."""
    adapters: dict[str, Adapter] = {}
    defaults: set[str] = set()
    for name, spec in t.adapters.items():
        base = context.models.get(spec.base)
        if base is None or not any(d.pool for d in base.deployments):
            problems.append(f"{where}: adapters.{name}: base '{spec.base}' is not a model served by a fleet pool")
            continue
        default = spec.default and spec.base not in defaults
        if default:
            defaults.add(spec.base)
        adapters[name] = Adapter(name, spec.base, spec.path, f"{tenant_id}/{name}", default, spec.on_failure)
    return adapters


def _add_key(keys: dict[str, ApiKey], digest: str, key: ApiKey, where: str, problems: list[str],
             also: dict[str, ApiKey] | None = None) -> None:
    other = keys.get(digest) or (also.get(digest) if also else None)
    if other is not None:
        problems.append(f"{where}: the same key is already registered as '{other.name}' of tenant '{other.tenant_id}'")
        return
    keys[digest] = key


def _unix_time(value: dt.date | dt.datetime | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time.min)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()
