"""The request path, one module a stage. ``build.build_pipeline`` lists the stages in the order they run:

authenticate -> read the body -> model access -> guardrails -> the tenant's system prompt -> retrieval -> the response cache
(exact, then semantic) -> route -> limits -> the cached answer -> forward (deployments, fallbacks, cascade, relay).
"""
