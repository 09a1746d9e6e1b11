"""The OpenAI operations that go through the pipeline."""

from gateway.pipeline.context import Endpoint
from gateway.pipeline.parse import check_chat, check_completion, check_embedding, check_moderation

CHAT = Endpoint("chat.completions", "/chat/completions", "chat", check_chat)
COMPLETIONS = Endpoint("completions", "/completions", "chat", check_completion)
EMBEDDINGS = Endpoint("embeddings", "/embeddings", "embedding", check_embedding)
MODERATIONS = Endpoint("moderations", "/moderations", "moderation", check_moderation)
