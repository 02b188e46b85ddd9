"""The model client: OpenAI-compatible calls, their errors and prices."""
