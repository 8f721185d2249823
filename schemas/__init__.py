"""Every wire type of jetbatch: OpenAI's objects (openai.py) and the bus messages (messages.py)."""
