"""Stage: may this tenant use the model it asked for, and can that model serve this kind of request."""

from __future__ import annotations

from gateway.config.types import ApiKey, GatewayConfig, Model, Tenant
from gateway.errors import GatewayError, bad_request, model_not_found
from gateway.pipeline.context import RequestContext


def visible_model(config: GatewayConfig, tenant: Tenant, name: str) -> Model:
    """The model ``name`` if the tenant may use it (one of its adapters names its base model); otherwise the same
    404 whether it exists or not."""
    adapter = tenant.adapters.get(name) if tenant.adapters else None
    if adapter is not None:
        name = adapter.base
    model = config.models.get(name)
    if model is None or name not in tenant.allowed_models:
        raise model_not_found(name if adapter is None else adapter.name)
    return model


def key_may_ask_for(key: ApiKey, name: str) -> None:
    """A 403 if the key is limited to other models than ``name`` (a name, an alias or an adapter, as asked for)."""
    if not key.access.admits(name):
        raise GatewayError(403, f"The API key '{key.name}' may not use the model `{name}`.", type="permission_error",
                           param="model", code="model_not_allowed")


async def authorize_model(ctx: RequestContext) -> None:
    if ctx.api_key.access.models is not None:
        key_may_ask_for(ctx.api_key, ctx.model_requested)
    profile = ctx.tenant.routes.get(ctx.model_requested)
    if profile is not None:
        if ctx.endpoint.model_type != "chat":
            raise bad_request(f"The model `{ctx.model_requested}` is routed among chat models and cannot serve "
                              f"{ctx.endpoint.route}.", param="model", code="model_not_supported")
        ctx.profile = profile  # the routing stage picks the model
        return
    model = visible_model(ctx.config, ctx.tenant, ctx.model_requested)
    if ctx.tenant.adapters:  # the tenant's own adapter: asked for by name, or its default for this model
        ctx.adapter = ctx.tenant.adapters.get(ctx.model_requested) or ctx.tenant.default_adapters.get(model.name)
    if model.type != ctx.endpoint.model_type:
        what = {"embedding": "an embedding model", "moderation": "a moderation model"}.get(model.type, "a chat model")
        raise bad_request(f"The model `{model.name}` is {what} and cannot serve {ctx.endpoint.route}.",
                          param="model", code="model_not_supported")
    if not model.serving:
        raise GatewayError(503, f"No deployment of model `{model.name}` is available right now.",
                           type="upstream_error", code="model_unavailable")
    ctx.model = model
