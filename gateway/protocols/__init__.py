"""The other APIs clients speak to the gateway (Anthropic's Messages, OpenAI's Responses), each told in chat
completions' terms on the way in and back in its own on the way out, so that the pipeline serves them unchanged.

The package's ``__init__`` imports nothing (see ``gateway.pipeline.build``).
"""
