"""Using adapters: the chat CLI (`python -m serve.chat`) and, to come, the OpenAI-compatible server."""
