"""The HTTP server (`streaming-llm serve`): OpenAI-compatible routes over persistent sessions.

app.py (routes, validation, errors, auth), schemas.py (request/response bodies), sessions.py
(session manager, model thread), conversations.py (what a session holds), store.py (durable
storage), serve.py (the CLI verb). Importing this package imports nothing heavy.
"""
