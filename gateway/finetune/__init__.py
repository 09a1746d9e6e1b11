"""Fine-tuning: OpenAI's fine-tuning API for a tenant's own LoRA adapters, trained and put on the fleet."""
