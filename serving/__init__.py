"""tenantlora serving: the OpenAI-compatible HTTP layer, the vLLM engine wrapper and settings."""
