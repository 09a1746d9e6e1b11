"""The OpenAI routes, and Anthropic's Messages API, served as plain ASGI (the hot path), under /v1 and bare as clients
with a bare base URL call them. Generation goes through the pipeline (another API's requests translated at its
edges, see gateway.protocols); the model list answers from the config."""

from __future__ import annotations

from typing import Awaitable, Callable

import orjson

from gateway.asgi import LOG_FIELDS, Receive, Scope, Send, send_response
from gateway.config.store import ConfigStore
from gateway.errors import GatewayError, model_not_found
from gateway.pipeline.runner import Pipeline
from gateway.pipeline.access import key_may_ask_for, visible_model
from gateway.pipeline.auth import identify, identify_again
from gateway.pipeline.context import Endpoint, RequestContext
from gateway.pipeline.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, MODERATIONS
from gateway.pipeline.parse import read_json_body
from gateway.tokens import prompt_tokens
from gateway.protocols.anthropic import CountTokens, Messages, count_tokens_answer
from gateway.protocols.edge import Outbound
from gateway.protocols.responses import Responses
from gateway.stores.responses import ResponseStore

MESSAGES = Endpoint("messages", "/chat/completions", "chat", lambda body: None, Messages())
COUNT_TOKENS = Endpoint("messages.count_tokens", "/chat/completions", "chat", lambda body: None, CountTokens())

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class OpenAIRoutes:
    def __init__(self, config: ConfigStore, pipeline: Pipeline, max_body_bytes: int,
                 responses: Callable[[], ResponseStore | None] = lambda: None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.max_body_bytes = max_body_bytes
        table: dict[str, tuple[str, Handler]] = {}
        self._pipeline: dict[str, str] = {}  # path -> method of the routes the pipeline serves
        for path, method, handler in (
            ("/chat/completions", "POST", self._endpoint(CHAT)),
            ("/completions", "POST", self._endpoint(COMPLETIONS)),
            ("/embeddings", "POST", self._endpoint(EMBEDDINGS)),
            ("/moderations", "POST", self._endpoint(MODERATIONS)),
            ("/messages", "POST", self._endpoint(MESSAGES)),
            ("/responses", "POST", self._endpoint(Endpoint("responses", "/chat/completions", "chat",
                                                           lambda body: None, Responses(responses)))),
            ("/messages/count_tokens", "POST", self._count_tokens),
            ("/models", "GET", self._list_models),
        ):
            table[path] = table["/v1" + path] = (method, handler)
            if path not in ("/models", "/messages/count_tokens"):
                self._pipeline[path] = self._pipeline["/v1" + path] = method
        self.table = table

    def answers_for_itself(self, scope: Scope) -> bool:
        """Whether the pipeline will answer this request (it gives its answer the request id and logs it)."""
        return self._pipeline.get(scope["path"]) == scope["method"]

    def match(self, path: str) -> tuple[str, Handler] | None:
        route = self.table.get(path)
        if route is None and (path.startswith("/v1/models/") or path.startswith("/models/")):
            return "GET", self._get_model
        return route

    async def __call__(self, scope: Scope, receive: Receive, send: Send, route: tuple[str, Handler]) -> None:
        method, handler = route
        if scope["method"] != method:
            error = GatewayError(405, f"{scope['method']} is not allowed on {scope['path']}; use {method}.",
                                 code="method_not_allowed", headers={"allow": method})
            await send_response(send, 405, error.body(), [(b"allow", method.encode())])
            return
        await handler(scope, receive, send)

    def _endpoint(self, endpoint: Endpoint) -> Handler:
        if endpoint.dialect is not None:
            async def translated(scope: Scope, receive: Receive, send: Send) -> None:
                ctx = RequestContext(scope, receive, send, self.config.current, endpoint)
                ctx.send = Outbound(ctx, send, endpoint.dialect)
                await self.pipeline.run(ctx)

            return translated

        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            await self.pipeline.run(RequestContext(scope, receive, send, self.config.current, endpoint))

        return handle

    async def _count_tokens(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anthropic's ``POST /v1/messages/count_tokens``: the prompt's tokens as the gateway counts them (tiktoken's
        cl100k, as for its limits), for a model the tenant may use; nothing is sent upstream or billed."""
        ctx = RequestContext(scope, receive, send, self.config.current, COUNT_TOKENS)
        try:
            ctx.tenant, ctx.api_key, ctx.config = await self._identify(scope, "chat")
            scope[LOG_FIELDS] = {"tenant": ctx.tenant.id, "key": ctx.api_key.name, "route": COUNT_TOKENS.route}
            await read_json_body(ctx, self.max_body_bytes)
            key_may_ask_for(ctx.api_key, ctx.model_requested)
            if ctx.model_requested not in ctx.tenant.routes:
                visible_model(ctx.config, ctx.tenant, ctx.model_requested)
        except GatewayError as error:
            status, body = COUNT_TOKENS.dialect.error(error.status, orjson.loads(error.body())["error"])
            await send_response(send, status, body)
            return
        await send_response(send, 200, count_tokens_answer(prompt_tokens(ctx.body)))

    async def _identify(self, scope: Scope, group: str) -> tuple:
        config = self.config.current
        try:
            tenant, key = identify(scope, config, group)
        except GatewayError as error:
            return await identify_again(scope, self.config, error, group)
        return tenant, key, config

    async def _list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            tenant, key, config = await self._identify(scope, "models")
        except GatewayError as error:
            await send_response(send, error.status, error.body())
            return
        scope[LOG_FIELDS] = {"tenant": tenant.id, "key": key.name, "route": "models.list"}
        admits = key.access.admits
        # Chat models before embedding models: Open WebUI starts a new user's chat on the first model listed
        serving = [config.models[name] for name in tenant.allowed_models
                   if name in config.models and config.models[name].serving and admits(name)]
        data = [_model_card(model) for model in sorted(serving, key=lambda m: (m.type != "chat", m.name))]
        data += [_alias_card(name) for name in sorted(tenant.routes) if admits(name)]
        data += [_adapter_card(adapter, tenant.id) for name, adapter in sorted(tenant.adapters.items())
                 if adapter.base in config.models and config.models[adapter.base].serving and admits(name)]
        await send_response(send, 200, orjson.dumps({"object": "list", "data": data}))

    async def _get_model(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path"].split("/models/", 1)[1]
        try:
            tenant, key, config = await self._identify(scope, "models")
            scope[LOG_FIELDS] = {"tenant": tenant.id, "key": key.name, "route": "models.retrieve", "model": name}
            if not key.access.admits(name):
                raise model_not_found(name)
            if name in tenant.routes:
                card = _alias_card(name)
            elif name in tenant.adapters:
                visible_model(config, tenant, name)
                card = _adapter_card(tenant.adapters[name], tenant.id)
            else:
                card = _model_card(visible_model(config, tenant, name))
        except GatewayError as error:
            await send_response(send, error.status, error.body())
            return
        await send_response(send, 200, orjson.dumps(card))


_CREATED = 1735689600  # 2025-01-01: a fixed date, so listings are stable across restarts


def _model_card(model) -> dict:
    return {"id": model.name, "object": "model", "created": _CREATED, "owned_by": model.owned_by}


def _adapter_card(adapter, tenant_id: str) -> dict:
    return {"id": adapter.name, "object": "model", "created": _CREATED, "owned_by": tenant_id,
            "parent": adapter.base}


def _alias_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "gateway-router"}
