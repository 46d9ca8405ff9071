"""Chat: the multi-turn session on one stream, and the terminal REPL."""
