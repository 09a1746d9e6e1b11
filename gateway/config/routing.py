"""The router section of models.yaml and the tenants' routing, compiled into what the request path reads.

Every tenant gets, for every router alias it may use, one resolved ``Profile``: the layers below laid over each
other, a later one winning field by field:

    the `default` profile, its `tiers:` entry for the tenant's tier,
    the tenant's profile (its `routing.profile`, else its industry), that profile's `tiers:` entry,
    the tenant's own `routing:` models.

A profile model the tenant may not use is replaced by the nearest smaller one of the profile it may use (or
the nearest larger one).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from gateway.config.schema import COMPLEXITIES, ModelsFile, ProfileModels, ProfileSpec, TenantSpec
from gateway.config.types import Alias, Model, Profile, RouterConfig
from gateway.config.yaml_source import YamlDocument
from gateway.guardrails.policy import compile_rules
from gateway.routing.classifier import DEFAULT_WEIGHTS, LEARNED_WEIGHT, Classifier, Thresholds
from gateway.routing.confidence import UNCERTAINTY_PHRASES
from gateway.routing.scorer import DEFAULT_PATH, LearnedScorer
from gateway.routing.signals import SIGNALS, Vocabulary

_SIZE_ORDER = {"small": 0, "large": 1, "largest": 2}


def unknown_chat_models(layer: ProfileModels, models: dict[str, Model]) -> list[tuple[str, str]]:
    """(complexity, name) for each model ``layer`` names that is not a chat model of ``models``."""
    named = ((complexity, getattr(layer, complexity)) for complexity in COMPLEXITIES)
    return [(complexity, name) for complexity, name in named
            if name is not None and (name not in models or models[name].type != "chat")]


def compile_router(spec: ModelsFile, doc: YamlDocument, models: dict[str, Model], config_dir: Path,
                   problems: list[str], warnings: list[str]) -> tuple[RouterConfig | None, dict[str, ProfileSpec]]:
    """The router and its profiles by name (with a `default` one derived from model sizes when none is given)."""
    router = spec.router
    for alias in router.aliases:
        if alias in models:
            problems.append(f"{doc.where(('router', 'aliases', alias))}: router alias '{alias}' is also a model name")
    profiles = dict(router.profiles)
    if "default" not in profiles:
        derived = _default_from_sizes(models)
        if derived is None:
            if router.aliases and "router" in (doc.data or {}):
                problems.append(f"{doc.where(('router', 'profiles'))}: no `default` profile, and the models' sizes "
                                f"do not give one (a small, a large model)")
            elif router.aliases:
                warnings.append(f"{doc.where(())}: router aliases are off: no `default` profile and no small and "
                                f"large models to make one from")
            return None, {}
        profiles["default"] = derived
    for name, profile in profiles.items():
        _check_profile(profile, ("router", "profiles", name), doc, models, problems)
        compile_rules(profile.guardrails, models, problems, doc.where(("router", "profiles", name, "guardrails")))
    for alias_name, alias in router.aliases.items():
        if alias.profile is not None and alias.profile not in profiles:
            problems.append(f"{doc.where(('router', 'aliases', alias_name, 'profile'))}: unknown profile "
                            f"'{alias.profile}' (profiles: {', '.join(sorted(profiles))})")
    classifier = _classifier(spec, doc, config_dir, problems)
    aliases = {name: Alias(name, a.description or "Routed by the gateway: the model is chosen per request.",
                           a.profile, compile_rules(a.guardrails, models, problems,
                                                    doc.where(("router", "aliases", name, "guardrails"))))
               for name, a in router.aliases.items()}
    phrases = tuple(p.lower() for p in (router.cascade.uncertainty_phrases or UNCERTAINTY_PHRASES))
    return RouterConfig(aliases, frozenset(profiles), classifier, router.budget.soft_limit, phrases,
                        router.learning.keep_examples), profiles


def tenant_routes(spec: ModelsFile, router: RouterConfig | None, profiles: dict[str, ProfileSpec],
                  tenant_id: str, tenant: TenantSpec, allowed: frozenset[str], features: frozenset[str], where: str,
                  models: dict[str, Model], problems: list[str]) -> dict[str, Profile]:
    """For each alias this tenant may use, its resolved profile."""
    if router is None or "router" not in features:
        return {}
    own = tenant.routing
    if own is not None:
        if own.profile is not None and own.profile not in profiles:
            problems.append(f"{where}: routing.profile: unknown profile '{own.profile}' "
                            f"(profiles: {', '.join(sorted(profiles))})")
            return {}
        unknown = unknown_chat_models(own, models)
        if unknown:
            complexity, name = unknown[0]
            problems.append(f"{where}: routing.{complexity}: '{name}' is not a chat model of models.yaml")
            return {}
    routes = {}
    for alias in router.aliases.values():
        if alias.name not in allowed:
            continue
        base = alias.profile or (own.profile if own and own.profile else None) or (
            tenant.industry if tenant.industry in profiles else "default")
        profile = _resolve(spec, profiles, base, tenant_id, tenant, allowed, models)
        if profile is not None and alias.guardrails:
            profile = replace(profile, guardrails=profile.guardrails + alias.guardrails)
        routes[alias.name] = profile
    return {name: profile for name, profile in routes.items() if profile is not None}


def _resolve(spec: ModelsFile, profiles: dict[str, ProfileSpec], base: str, tenant_id: str, tenant: TenantSpec,
             allowed: frozenset[str], models: dict[str, Model]) -> Profile | None:
    default, chosen = profiles["default"], profiles[base]  # the same profile twice is harmless below
    tier_layers = [default.tiers.get(tenant.tier), chosen.tiers.get(tenant.tier)]
    layers: list[ProfileModels | None] = [default, chosen, *tier_layers]
    name = base + (f"/{tenant.tier}" if any(tier_layers) else "")
    own = tenant.routing
    if own is not None and any(getattr(own, c) for c in COMPLEXITIES):
        layers.append(own)
        name += "+tenant"
    chosen_models = _laid_over(layers)
    if len(chosen_models) < len(COMPLEXITIES):
        return None
    everything = _ladder(chosen_models.values(), models)
    if not any(m in allowed for m in everything):
        return None
    resolved = {c: _nearest_allowed(m, everything, allowed) for c, m in chosen_models.items()}

    economy = _cheaper(resolved, [default.economy, chosen.economy], allowed)
    over_budget = _cheaper(economy or resolved, [default.over_budget, chosen.over_budget], allowed)
    long_context = chosen.long_context or default.long_context
    threshold = next(v for v in ((own.cascade_threshold if own else None), chosen.cascade_threshold,
                                 default.cascade_threshold, spec.router.cascade.threshold) if v is not None)
    cascade = spec.router.cascade.enabled if own is None or own.cascade is None else own.cascade
    own_share = own.target_large_share if own is not None else None
    share = own_share or chosen.target_large_share  # a profile's own: another profile's would not suit it
    large_from = next((c for c in COMPLEXITIES if (models[resolved[c]].size or "large") != "small"), COMPLEXITIES[-1])
    return Profile(
        name=name,
        models=resolved,
        economy=economy,
        over_budget=over_budget,
        long_context=long_context if long_context in allowed else None,
        cascade=cascade,
        cascade_threshold=threshold,
        ladder=tuple(_ladder(resolved.values(), models)),
        target_large_share=share,
        share_scope=f"tenant:{tenant_id}" if own_share else f"profile:{name}",
        large_from=large_from,
        guardrails=compile_rules(default.guardrails, models) + (
            compile_rules(chosen.guardrails, models) if chosen is not default else ()),
    )


def _cheaper(models: dict[str, str], layers: list, allowed: frozenset[str]) -> dict[str, str]:
    """The models of an economy or over-budget column ({} when the profile has none)."""
    if not any(layers):
        return {}
    wanted = _laid_over([models, *layers])
    return {c: (m if m in allowed else models[c]) for c, m in wanted.items()}


def _laid_over(layers: list) -> dict[str, str]:
    result: dict[str, str] = {}
    for layer in layers:
        if layer is None:
            continue
        for complexity in COMPLEXITIES:
            value = layer.get(complexity) if isinstance(layer, dict) else getattr(layer, complexity)
            if value is not None:
                result[complexity] = value
    return result


def _ladder(names, models: dict[str, Model]) -> list[str]:
    """Distinct models from smallest to largest (by size, then by output price)."""
    distinct = list(dict.fromkeys(names))
    return sorted(distinct, key=lambda n: (_SIZE_ORDER.get(models[n].size or "", 1),
                                            models[n].pricing.output_per_million))


def _nearest_allowed(name: str, ladder: list[str], allowed: frozenset[str]) -> str:
    if name in allowed:
        return name
    index = ladder.index(name) if name in ladder else 0
    for candidate in [*reversed(ladder[:index]), *ladder[index + 1:]]:
        if candidate in allowed:
            return candidate
    return name


def _default_from_sizes(models: dict[str, Model]) -> ProfileSpec | None:
    by_size: dict[str, str] = {}
    for model in models.values():
        if model.type == "chat" and model.size and model.size not in by_size:
            by_size[model.size] = model.name
    if "small" not in by_size or "large" not in by_size:
        return None
    return ProfileSpec(simple=by_size["small"], moderate=by_size["small"], complex=by_size["large"],
                       critical=by_size.get("largest", by_size["large"]))


def _check_profile(profile: ProfileSpec, location: tuple, doc: YamlDocument, models: dict[str, Model],
                   problems: list[str]) -> None:
    def check(layer: ProfileModels | None, path: tuple) -> None:
        if layer is None:
            return
        for complexity, name in unknown_chat_models(layer, models):
            problems.append(f"{doc.where(path + (complexity,))}: '{name}' is not a chat model of this file")

    check(profile, location)
    check(profile.economy, location + ("economy",))
    check(profile.over_budget, location + ("over_budget",))
    for tier, layer in profile.tiers.items():
        check(layer, location + ("tiers", tier))
    if profile.long_context is not None and profile.long_context not in models:
        problems.append(f"{doc.where(location + ('long_context',))}: '{profile.long_context}' is not a model of "
                        f"this file")


def _classifier(spec: ModelsFile, doc: YamlDocument, config_dir: Path, problems: list[str]) -> Classifier:
    """The rules' weights, or the scorer's own blend and thresholds, with the admin's changes laid over them."""
    settings = spec.router.classifier
    scorer = None
    if settings.scorer != "none":
        path = DEFAULT_PATH if settings.scorer == "builtin" else (config_dir / settings.scorer)
        try:
            scorer = _load_scorer(path.resolve(), path.stat().st_mtime)
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{doc.where(('router', 'classifier', 'scorer'))}: cannot load the scorer {path}: {exc}")
    weights = dict(DEFAULT_WEIGHTS)
    thresholds = Thresholds()
    if scorer is not None:
        weights = scorer.blend or {**DEFAULT_WEIGHTS, "learned": LEARNED_WEIGHT}
        thresholds = Thresholds(**scorer.thresholds) if scorer.thresholds else thresholds
    for name, value in settings.weights.items():
        if name not in DEFAULT_WEIGHTS and name != "learned":
            problems.append(f"{doc.where(('router', 'classifier', 'weights', name))}: unknown signal '{name}' "
                            f"(signals: {', '.join((*SIGNALS, 'learned'))})")
        weights[name] = value
    given = settings.thresholds.model_dump(exclude_none=True)
    thresholds = replace(thresholds, **given)
    if not thresholds.moderate <= thresholds.complex <= thresholds.critical:
        problems.append(f"{doc.where(('router', 'classifier', 'thresholds'))}: thresholds must rise: moderate "
                        f"({thresholds.moderate}) <= complex ({thresholds.complex}) <= critical "
                        f"({thresholds.critical})")
    return Classifier(weights=weights, thresholds=thresholds, vocabulary=Vocabulary.from_lists(settings.markers),
                      scorer=scorer)


@functools.lru_cache(maxsize=4)
def _load_scorer(path: Path, modified: float) -> LearnedScorer:
    return LearnedScorer.load(path)
