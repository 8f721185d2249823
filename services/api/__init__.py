"""The api service: OpenAI-compatible HTTP in front of JetStream and PostgreSQL."""
