"""The request path, one module a stage. ``build_pipeline`` lists the stages in the order they run."""

from __future__ import annotations

from gateway.pipeline.access import authorize_model
from gateway.pipeline.auth import authenticate
from gateway.pipeline.context import RequestContext
from gateway.pipeline.forward import Forward
from gateway.pipeline.parse import read_json_body
from gateway.pipeline.runner import Pipeline
from gateway.upstreams.client import UpstreamClient
from gateway.upstreams.select import DeploymentSelector


def build_pipeline(client: UpstreamClient, *, max_body_bytes: int, log_prompts: bool) -> Pipeline:
    async def read_request(ctx: RequestContext) -> None:
        await read_json_body(ctx, max_body_bytes)

    return Pipeline(
        [
            authenticate,  # who is calling (401 / 403)
            read_request,  # the body, and the fields the gateway acts on (400 / 413)
            authorize_model,  # may this tenant use this model, can it serve this request (404 / 400 / 503)
            Forward(client, DeploymentSelector()),  # to a deployment, answer relayed as it arrives
        ],
        log_prompts=log_prompts,
    )
