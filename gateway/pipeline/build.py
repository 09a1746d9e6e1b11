"""``build_pipeline``: the request path's stages, in the order they run.

The package's ``__init__`` imports nothing, so that a stage importing a sibling (``tokens``) never runs into a
package half made.
"""


from __future__ import annotations

from typing import Callable

from gateway.config.store import ConfigStore
from gateway.pipeline.access import authorize_model
from gateway.pipeline.auth import Authenticate
from gateway.pipeline.cache import LookupCache, serve_cached
from gateway.pipeline.context import RequestContext
from gateway.pipeline.forward.stage import Forward
from gateway.pipeline.guard import CheckGuardrails
from gateway.pipeline.limits import EnforceLimits
from gateway.pipeline.parse import read_json_body
from gateway.pipeline.prompt import apply_system_prompt
from gateway.pipeline.route import RouteRequest
from gateway.pipeline.runner import Load, Pipeline
from gateway.routing.share import ShareKeeper
from gateway.stores.cache import ResponseCache
from gateway.stores.ledger import Ledger
from gateway.stores.limits import Limiter
from gateway.upstreams.client import UpstreamClient
from gateway.upstreams.fleet import Fleet
from gateway.pipeline.retrieve import Retrieve
from gateway.upstreams.select import DeploymentSelector


def build_pipeline(
    config: ConfigStore,
    client: UpstreamClient,
    limiter: Limiter | None,
    ledger: Ledger | None,
    cache: ResponseCache | None,
    *,
    max_body_bytes: int,
    log_prompts: bool,
    refuse_without_redis: bool,
    fleet: Callable[[], Fleet | None] = lambda: None,
    providers: Callable[[], object] = lambda: None,
    shares: ShareKeeper | None = None,
    selector: DeploymentSelector | None = None,
    retrieval: Callable[[], object] = lambda: None,
    semantic: Callable[[], object] = lambda: None,
    calls: Callable[[], object] = lambda: None,
) -> Pipeline:
    async def read_request(ctx: RequestContext) -> None:
        await read_json_body(ctx, max_body_bytes)

    load = Load()
    stages = [
        Authenticate(config),  # who is calling (401 / 403)
        read_request,  # the body, and the fields the gateway acts on (400 / 413)
        authorize_model,  # may this tenant use this model, can it serve this request (404 / 400 / 503)
        CheckGuardrails(calls),  # the tenant's and key's rules: the request masked or refused (400); answers watched
        apply_system_prompt,  # the tenant's instructions before the client's
        Retrieve(retrieval),  # "retrieval": the tenant's stores searched, the chunks given as context (404 / 409)
        LookupCache(cache, semantic),  # a repeat of an answered request is found; new answers are kept at the end
        RouteRequest(limiter, shares),  # "auto": complexity, profile, context window, budget; fits? (400)
        EnforceLimits(limiter, refuse_without_redis, load),  # limits and budget reserved, settled at the end (429)
        serve_cached,  # the cached answer, if there is one
        # deployments, fallbacks, cascade; the answer relayed as it comes
        Forward(client, selector or DeploymentSelector(), fleet, providers),
    ]
    if limiter is None:  # a stateless gateway: no Redis
        stages = [stage for stage in stages if not isinstance(stage, EnforceLimits)]
    if cache is None:
        stages = [stage for stage in stages if not isinstance(stage, LookupCache) and stage is not serve_cached]
    return Pipeline(
        stages,
        log_prompts=log_prompts,
        ledger=ledger,  # every request, answered or refused, gets its row
        load=load,
    )
