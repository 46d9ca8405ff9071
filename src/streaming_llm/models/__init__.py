"""Loading models (aliases, GGUF, local folders, hub ids) and quantizing their weights."""
